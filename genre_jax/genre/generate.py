"""The GENRE generation driver: dataset -> prompts -> provider -> JSONL file.

run_generation builds one prompt per item (summarizer) or per user (profiler:
every user with a history; generator and chain: cold users only), asks the
provider in chunks while logging progress, parses every reply, and writes
{"item_id"|"user_id", "response", "status"} rows atomically, the layout of
the Goodreads GENRE release, so a written file can be served back by the
`replay` provider.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Sequence

from absl import logging

import ml_collections
import numpy as np

from genre_jax import workdir
from genre_jax.data import genre_parsing as parsing
from genre_jax.data.types import Dataset
from genre_jax.errors import ConfigError
from genre_jax.genre import prompts as prompts_lib
from genre_jax.genre import providers as providers_lib

# Seconds between two progress lines.
_LOG_EVERY_S = 5.0


def item_dicts(dataset: Dataset) -> list[dict[str, str]]:
  """Row index -> {field: raw text} for every item (row 0 is padding)."""
  text = dataset.items.text
  return [{name: str(values[i] or "") for name, values in text.items()}
          for i in range(len(dataset.items.ids))]


def _split_names(dataset: Dataset) -> list[str]:
  """Split names: train, dev, test first, then any others sorted."""
  names = [s for s in ("train", "dev", "test") if s in dataset.splits]
  return names + sorted(set(dataset.splits) - set(names))


def longest_histories(dataset: Dataset) -> dict[str, list[int]]:
  """User id -> their longest history (item rows, oldest first) over splits.

  Users appear in order of first sight over the train, dev and test splits;
  a longer history seen later replaces a shorter one.
  """
  histories: dict[str, list[int]] = {}
  for name in _split_names(dataset):
    behaviors = dataset.splits[name]
    offsets = behaviors.history_offsets
    lengths = behaviors.history_lengths()
    for row, user in enumerate(behaviors.user_ids):
      user = str(user)
      if lengths[row] > len(histories.get(user, ())):
        histories[user] = behaviors.history_items[
            offsets[row]:offsets[row + 1]].tolist()
      else:
        histories.setdefault(user, [])
  return histories


def eval_clicks(dataset: Dataset) -> dict[str, set[int]]:
  """User id -> items they clicked in any split but train (dev, test, ...)."""
  clicks: dict[str, set[int]] = {}
  for name in _split_names(dataset):
    if name == "train":
      continue
    behaviors = dataset.splits[name]
    clicked = behaviors.cand_labels == 1
    rows = np.repeat(np.arange(len(behaviors)), behaviors.num_candidates())
    for row, item in zip(rows[clicked], behaviors.cand_items[clicked]):
      clicks.setdefault(str(behaviors.user_ids[row]), set()).add(int(item))
  return clicks


def user_histories(dataset: Dataset) -> dict[str, list[int]]:
  """User id -> the history their prompts show (item rows, oldest first).

  That is the longest history over the splits (longest_histories) less every
  item the user clicked in a dev, test or other evaluation impression, order
  kept, so no evaluation label reaches an LLM prompt, hence neither a
  generated profile or item. Under leave-last-out (Goodreads: test predicts
  h[n-1] from h[:n-1], dev h[n-2] from h[:n-2]) the test row's history holds
  the dev positive; this leaves h[:n-2]. On MIND, where histories predate the
  impressions, nothing changes. Train clicks stay: they are the training
  period's own signal (a train row's profile may mention its positive, which
  can mislead training but never inflate a dev or test score), and dropping
  them would leave cold users with almost nothing to go on.
  """
  clicks = eval_clicks(dataset)
  return {user: [i for i in history if i not in clicks.get(user, ())]
          for user, history in longest_histories(dataset).items()}


_BAR_WIDTH = 30


class _Progress:
  """A progress bar with rate and ETA, logged at most every few seconds."""

  def __init__(self, name: str, total: int):
    self.name = name
    self.total = total
    self.start = time.monotonic()
    self._last = self.start

  def line(self, done: int, now: float) -> str:
    elapsed = max(now - self.start, 1e-9)
    rate = done / elapsed
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    filled = int(_BAR_WIDTH * done / max(self.total, 1))
    bar = "#" * filled + "." * (_BAR_WIDTH - filled)
    return (f"{self.name} [{bar}] {done}/{self.total} "
            f"({100.0 * done / max(self.total, 1):.1f}%) {rate:.1f}/s "
            f"ETA {_fmt_seconds(eta)}")

  def update(self, done: int) -> None:
    now = time.monotonic()
    if now - self._last < _LOG_EVERY_S and done < self.total:
      return
    self._last = now
    logging.info("%s", self.line(done, now))


def _fmt_seconds(seconds: float) -> str:
  if seconds == float("inf"):
    return "?"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  return f"{minutes}m{secs:02d}s"


def _ask(scheme: prompts_lib.Scheme, provider: providers_lib.Provider,
         subjects: Sequence[str], user_texts: Sequence[str],
         chunk_size: int) -> list[str]:
  """The provider's replies to one scheme's prompts, asked in chunks."""
  progress = _Progress(f"{scheme.name}:{scheme.domain}", len(subjects))
  replies: list[str] = []
  for start in range(0, len(subjects), chunk_size):
    chunk = [providers_lib.Prompt(scheme.key(s), scheme.system, text)
             for s, text in zip(subjects[start:start + chunk_size],
                                user_texts[start:start + chunk_size])]
    replies += provider.generate(chunk)
    progress.update(len(replies))
  return replies


def write_generations(path: str, id_field: str, subjects: Sequence[str],
                      replies: Sequence[str],
                      parsed: Sequence[parsing.Parsed]) -> None:
  """Writes JSONL rows {id_field, "response", "status"} atomically."""
  workdir.atomic_write_text(path, "".join(
      json.dumps({id_field: subject, "response": reply,
                  "status": result.status.value}, ensure_ascii=False) + "\n"
      for subject, reply, result in zip(subjects, replies, parsed)))


def _run_step(scheme: prompts_lib.Scheme, provider: providers_lib.Provider,
              subjects: Sequence[str], user_texts: Sequence[str],
              out_path: str, chunk_size: int) -> tuple[list[parsing.Parsed],
                                                       dict[str, Any]]:
  """Asks, parses and writes one scheme step; its parses and summary."""
  start = time.monotonic()
  replies = _ask(scheme, provider, subjects, user_texts, chunk_size)
  summary = parsing.ParseSummary(f"{scheme.name}:{scheme.domain}")
  parsed = [summary.add(scheme.parse(r)) for r in replies]
  id_field = "item_id" if scheme.target == "item" else "user_id"
  write_generations(out_path, id_field, subjects, replies, parsed)
  summary.log()
  return parsed, {
      "scheme": scheme.name,
      "domain": scheme.domain,
      "out_path": str(out_path),
      "count": len(subjects),
      "statuses": summary.as_dict(),
      "usable_rate": summary.usable_rate,
      "seconds": time.monotonic() - start,
  }


def profile_path(out_path: str) -> str:
  """Where a chain run writes its profiler step: `<out>.profiler.jsonl`."""
  path = pathlib.Path(out_path)
  stem = path.name
  if stem.endswith(".jsonl"):
    stem = stem[:-len(".jsonl")]
  return str(path.with_name(f"{stem}.profiler.jsonl"))


def run_generation(scheme: str, domain: str,
                   provider: providers_lib.Provider, dataset: Dataset,
                   out_path: str, *, cold_threshold: int = 5, limit: int = 0,
                   chunk_size: int = 64,
                   scheme_options: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
  """Runs one GENRE scheme over a dataset and writes its generations file.

  Args:
    scheme: "summarizer" | "profiler" | "generator" | "chain".
    domain: "news" | "book" (prompt wording and fields).
    provider: answers the prompts.
    dataset: items and behaviour splits.
    out_path: the JSONL to write; a chain run also writes its profiler step
      to `profile_path(out_path)`.
    cold_threshold: generator/chain users have a longest history of at most
      this many items (users with no history are skipped: nothing to go on).
      Prompts show user_histories, which holds no evaluation click.
    limit: ask for at most this many subjects (0 = all).
    chunk_size: prompts per provider call (at least 1).
    scheme_options: keyword arguments of prompts.get_scheme (max_history, ...).

  Returns:
    A summary dict: counts, parse statuses, usable rate, seconds, provider
    stats (and the profiler step's summary under "profiler" for chain).

  Raises:
    ConfigError: chunk_size below 1.
  """
  if chunk_size < 1:
    raise ConfigError(f"--generate.chunk_size={chunk_size}: prompts per "
                      "provider call must be at least 1")
  start = time.monotonic()
  steps = prompts_lib.steps(scheme, domain, **(scheme_options or {}))
  items = item_dicts(dataset)
  final = steps[-1]
  if final.target == "item":
    subjects = [str(i) for i in dataset.items.ids[1:]]
    user_texts = [final.build(item) for item in items[1:]]
    subjects, user_texts = _limit(subjects, limit), _limit(user_texts, limit)
    _, summary = _run_step(final, provider, subjects, user_texts, out_path,
                           chunk_size)
  else:
    histories = user_histories(dataset)
    skipped = sum(1 for h in histories.values() if not h)
    users = [u for u, h in histories.items() if h]
    if final.name in ("generator", "chain"):
      # Cold as the test rows count it: by the longest history's length.
      longest = longest_histories(dataset)
      users = [u for u in users if len(longest[u]) <= cold_threshold]
    users = _limit(users, limit)
    history_items = {u: [items[i] for i in histories[u]] for u in users}
    profiles: dict[str, Any] = {u: None for u in users}
    profiler_summary = None
    if len(steps) == 2:
      first = steps[0]
      texts = [first.build(history_items[u]) for u in users]
      parsed, profiler_summary = _run_step(first, provider, users, texts,
                                           profile_path(out_path), chunk_size)
      profiles = {u: p.value for u, p in zip(users, parsed)}
    texts = [final.build(history_items[u], profiles[u]) for u in users]
    _, summary = _run_step(final, provider, users, texts, out_path,
                           chunk_size)
    summary["users_without_history"] = skipped
    if final.name in ("generator", "chain"):
      summary["cold_threshold"] = cold_threshold
    if profiler_summary is not None:
      summary["profiler"] = profiler_summary
  summary["provider_stats"] = dict(provider.stats)
  summary["seconds"] = time.monotonic() - start
  return summary


def _limit(values: list, limit: int) -> list:
  return values[:limit] if limit > 0 else values


def generate_config() -> ml_collections.ConfigDict:
  """Settings of `run.py --mode=generate`, overridable as --generate.X=..."""
  g = ml_collections.ConfigDict()
  # summarizer | profiler | generator | chain.
  g.scheme = "summarizer"
  # replay | openai | local.
  g.provider = "replay"
  # Prompt wording and reply format: auto (book for Goodreads) | news | book.
  g.domain = "auto"
  # Output JSONL ("" = WORKDIR/<scheme>.jsonl).
  g.out = ""
  # Ask for at most this many items/users (0 = all).
  g.limit = 0
  # Prompts per provider call (progress is reported between calls).
  g.chunk_size = 64
  # Most recent history items shown in user prompts.
  g.max_history = 20
  # replay: a released generations file, or a folder with one per scheme.
  g.replay = ml_collections.ConfigDict(dict(path="", strict=False))
  # openai: any OpenAI-compatible chat-completions endpoint.
  g.openai = ml_collections.ConfigDict(dict(
      base_url="https://api.openai.com/v1", model="gpt-3.5-turbo",
      api_key_env="OPENAI_API_KEY",
      # Append-only answer cache ("" = OUT.cache.jsonl): re-runs never ask
      # again for an answered prompt.
      cache="", concurrency=4, rate=0.0, max_retries=5, timeout=60.0,
      backoff=1.0, max_backoff=30.0,
      # Stop after this many prompts in a row got no answer (0 = never).
      give_up_after=8,
      # False: unanswered prompts come back "", parsed as empty; run completes.
      raise_on_failure=True,
      temperature=0.0, max_tokens=256))
  # local: our Flax decoder (KV cache) on a local Hugging Face model
  # directory of any causal family of lm/families.py, read from config.json's
  # model_type: Llama 1/2/3, Mistral, Qwen2/2.5, Qwen3 or OPT.
  g.local = ml_collections.ConfigDict(dict(
      model_dir="", dtype="float32", batch_size=8, max_new_tokens=128,
      max_prompt_len=1024, temperature=0.0, top_p=1.0, stop=(), seed=0,
      # Append-only reply cache ("" = OUT.cache.jsonl), as for openai.
      cache=""))
  return g


def make_provider(g: ml_collections.ConfigDict,
                  out_path: str) -> providers_lib.Provider:
  """The provider `g.provider` built from its settings in `g`."""
  if g.provider == "replay":
    if not g.replay.path:
      raise ConfigError("--generate.provider=replay needs "
                        "--generate.replay.path (a generations file or folder)")
    return providers_lib.get_provider("replay", path=g.replay.path,
                                      strict=bool(g.replay.strict))
  if g.provider == "openai":
    options = g.openai.to_dict()
    options["cache_path"] = options.pop("cache") or f"{out_path}.cache.jsonl"
    options["raise_on_failure"] = bool(options.get("raise_on_failure", True))
    return providers_lib.get_provider("openai", **options)
  if g.provider == "local":
    options = g.local.to_dict()
    if not options["model_dir"]:
      raise ConfigError("--generate.provider=local needs "
                        "--generate.local.model_dir (a Hugging Face causal "
                        "LM directory: Llama, Mistral, Qwen2/3 or OPT)")
    options["stop"] = tuple(options["stop"])
    options["cache_path"] = options.pop("cache") or f"{out_path}.cache.jsonl"
    return providers_lib.get_provider("local", **options)
  raise ConfigError(f"--generate.provider={g.provider}: choose replay, "
                    "openai or local")
