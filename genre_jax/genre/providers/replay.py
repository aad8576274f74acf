"""The `replay` provider: serves released or previously written GENRE
generation files by prompt key instead of asking an LLM."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

from absl import logging

from genre_jax.data import genre_parsing as parsing
from genre_jax.errors import ConfigError
from genre_jax.genre.providers.base import (PROVIDERS, Prompt, Provider,
                                            ProviderError, split_key,
                                            valid_utf8)

# Id field of JSONL generation rows, by scheme (the rest are per user).
_ID_FIELD = {"summarizer": "item_id"}


def id_field(scheme: str) -> str:
  """The JSONL id field of a scheme's generation file."""
  return _ID_FIELD.get(scheme, "user_id")


def _as_text(response: Any) -> str:
  """A released response as reply text (lists and objects as JSON)."""
  if not isinstance(response, str):
    response = json.dumps(response, ensure_ascii=False)
  return valid_utf8(response)


@PROVIDERS.register("replay")
class ReplayProvider(Provider):
  """Serves released generations by key instead of asking an LLM.

  `path` is one generation file (its replies serve every scheme) or a folder
  holding one file per scheme: `files[scheme]` if given, else the first of
  `{scheme}.jsonl`, `{scheme}.tsv`, `{scheme}_*.jsonl` (sorted; so
  "generator" finds the Goodreads `generator_v1.jsonl`), `*.{scheme}.jsonl`
  (a chain run's profiler step, `chain.profiler.jsonl`, so a chain run's
  folder replays as it is). A key whose id has
  no reply is counted (`stats["missing"]`) and answered with "" (parsed as
  empty), or, when `strict`, raises ProviderError (which run.py reports in
  one line) naming the keys and files.
  """

  def __init__(self, path: str, *, files: dict[str, str] | None = None,
               strict: bool = False):
    super().__init__()
    self.path = pathlib.Path(path).expanduser()
    if not self.path.exists():
      raise ConfigError(f"replay path {self.path} does not exist")
    self.files = dict(files or {})
    self.strict = strict
    self._tables: dict[str, parsing.Generations] = {}

  def _file_for(self, scheme: str) -> pathlib.Path:
    if self.path.is_file():
      return self.path
    if scheme in self.files:
      candidates = [self.path / self.files[scheme]]
    else:
      candidates = [self.path / f"{scheme}.jsonl", self.path / f"{scheme}.tsv"]
      candidates += sorted(self.path.glob(f"{scheme}_*.jsonl"))
      # A chain run's profiler step: <out>.profiler.jsonl.
      candidates += sorted(self.path.glob(f"*.{scheme}.jsonl"))
    for candidate in candidates:
      if candidate.is_file():
        return candidate
    raise ConfigError(f"replay: no generation file for scheme '{scheme}' in "
                      f"{self.path} (tried {[c.name for c in candidates]})")

  def _table(self, scheme: str) -> parsing.Generations:
    if scheme not in self._tables:
      path = self._file_for(scheme)
      self._tables[scheme] = parsing.load_generations(str(path),
                                                      id_field(scheme))
      logging.info("replay: %d replies for '%s' from %s",
                    len(self._tables[scheme]), scheme, path)
    return self._tables[scheme]

  def generate(self, prompts: Sequence[Prompt]) -> list[str]:
    replies, missing = [], {}
    for prompt in prompts:
      scheme, _, subject = split_key(prompt.key)
      table = self._table(scheme)
      if subject in table:
        self.stats["served"] += 1
        replies.append(_as_text(table[subject]))
        continue
      self.stats["missing"] += 1
      missing.setdefault(prompt.key, table.path)
      replies.append("")
    if missing and self.strict:
      key, path = next(iter(missing.items()))
      raise ProviderError(
          f"replay: no reply for '{key}' in {path} ({len(missing)} of "
          f"{len(prompts)} prompts have none; strict=False answers them with "
          f"\"\", parsed as empty)", list(missing))
    return replies
