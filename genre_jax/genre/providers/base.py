"""Shared parts of the GENRE providers: Prompt, the Provider interface, the
PROVIDERS registry and the ReplyCache of answered prompts."""

from __future__ import annotations

import abc
import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import threading
from typing import Any, Sequence

from absl import logging

from genre_jax.errors import DataFormatError
from genre_jax.registry import Registry

PROVIDERS = Registry("GENRE provider")


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One request: a stable key, the system prompt and the user prompt."""

  key: str
  system: str
  user: str


class ProviderError(RuntimeError):
  """Some prompts got no answer (the answers that did arrive are kept)."""

  def __init__(self, message: str, failed: Sequence[str]):
    super().__init__(message)
    self.failed = list(failed)


class Provider(abc.ABC):
  """Turns prompts into raw reply strings, one per prompt, in order."""

  def __init__(self):
    self.stats: collections.Counter[str] = collections.Counter()

  @abc.abstractmethod
  def generate(self, prompts: Sequence[Prompt]) -> list[str]:
    """The raw replies to `prompts`, aligned with them."""


def get_provider(name: str, **kwargs) -> Provider:
  """Builds the provider registered as `name` with its keyword arguments."""
  return PROVIDERS.get(name)(**kwargs)


def split_key(key: str) -> tuple[str, str, str]:
  """(scheme, domain, id) of a prompt key; a bare id gives ("", "", id)."""
  parts = key.split(":", 2)
  if len(parts) != 3:
    return "", "", key
  return parts[0], parts[1], parts[2]


def valid_utf8(text: str) -> str:
  """`text` with unencodable code points (lone surrogates) as "?".

  JSON may escape half a surrogate pair ("\\ud83d"); such a string cannot be
  written as UTF-8, so every reply is made writable before anyone stores it.
  """
  return text.encode("utf-8", "replace").decode("utf-8")


def request_fingerprint(settings: dict[str, Any], prompt: Prompt) -> str:
  """A short hash of everything that shapes the answer to `prompt`: the
  provider's model and sampling `settings`, and the prompt's texts."""
  request = {**settings, "system": prompt.system, "user": prompt.user}
  text = json.dumps(request, sort_keys=True, ensure_ascii=True)
  return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16]


class ReplyCache:
  """Append-only JSONL of answered prompts.

  Rows are {"key", "fingerprint", "response", "model"}. An answer is served
  only for the same key and request fingerprint (model, prompt texts and
  sampling settings: see `request_fingerprint`), so re-running with
  another model or prompt wording asks again, and one file can hold the
  answers of several. Rows without a fingerprint (written by older versions)
  or with an empty response are never served; they are counted in
  `ignored`.

  Every answer is written as one line, flushed and fsync'd at once, so a
  crash loses at most the line being written. On open, a line that is not
  valid JSON (a torn write) is skipped and counted in `torn`; later answers
  start on a fresh line. Duplicate (key, fingerprint) rows keep the last.
  """

  def __init__(self, path: str):
    self.path = pathlib.Path(path).expanduser()
    self.answers: dict[tuple[str, str], str] = {}
    self.torn = 0
    self.ignored = 0
    self._lock = threading.Lock()
    if self.path.exists():
      self._read()
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, "a+b")
    self._file.seek(0, os.SEEK_END)
    if self._file.tell():
      self._file.seek(-1, os.SEEK_END)
      if self._file.read(1) != b"\n":
        self._file.write(b"\n")
        self._file.flush()

  def _read(self) -> None:
    with open(self.path, encoding="utf-8", errors="replace") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          self.torn += 1
          logging.warning("%s:%d: unreadable cache line (torn write?), "
                          "skipped", self.path, lineno)
          continue
        for field in ("key", "response"):
          if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise DataFormatError(self.path, lineno, field,
                                  "a cache row needs a string here")
        fingerprint = row.get("fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, str):
          raise DataFormatError(self.path, lineno, "fingerprint",
                                "a cache row needs a string here")
        if not fingerprint or not row["response"]:
          self.ignored += 1
          continue
        self.answers[row["key"], fingerprint] = row["response"]
    if self.ignored:
      logging.warning("%s: %d cache rows have no request fingerprint (an "
                      "older format) or no answer; they are not served, "
                      "their prompts are asked again", self.path,
                      self.ignored)

  def get(self, key: str, fingerprint: str) -> str | None:
    """The cached answer to `key` asked as `fingerprint`, else None."""
    return self.answers.get((key, fingerprint))

  def add(self, key: str, fingerprint: str, response: str,
          model: str) -> None:
    """Appends one answer (made valid UTF-8) and syncs it to disk."""
    if not response:
      raise ValueError(f"'{key}': an empty answer is never cached")
    response = valid_utf8(response)
    line = json.dumps({"key": key, "fingerprint": fingerprint,
                       "response": response, "model": model},
                      ensure_ascii=False) + "\n"
    with self._lock:
      self._file.write(line.encode("utf-8", "replace"))
      self._file.flush()
      os.fsync(self._file.fileno())
      self.answers[key, fingerprint] = response

  def close(self) -> None:
    self._file.close()
