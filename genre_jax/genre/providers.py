"""LLM providers for GENRE: one `generate(prompts) -> replies` interface.

Three providers, registered by name in `PROVIDERS`:

  replay  serves released generations (the Goodreads GENRE files, the MIND
          `id<TAB>response` layout, or files written by generate.py) by key.
  openai  any OpenAI-compatible /v1/chat/completions endpoint, standard
          library only: bounded thread concurrency, a token-bucket rate limit,
          retries with exponential backoff and jitter, and a resumable
          append-only JSONL cache so no answered prompt is ever asked again.
  local   batched generation with the Flax Llama decoder (local_provider.py,
          imported only when used): greedy or top-p sampling, EOS and stop
          strings, a jitted decode step.

A prompt key is "scheme:domain:id" (e.g. "summarizer:book:B123"); providers
return replies in the order of the prompts given.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import dataclasses
import http.client
import json
import os
import pathlib
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

from absl import logging

from genre_jax.errors import ConfigError, DataFormatError
from genre_jax.genre import parsing
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


# --- replay -------------------------------------------------------------------

# Id field of JSONL generation rows, by scheme (the rest are per user).
_ID_FIELD = {"summarizer": "item_id"}


def id_field(scheme: str) -> str:
  """The JSONL id field of a scheme's generation file."""
  return _ID_FIELD.get(scheme, "user_id")


def _as_text(response: Any) -> str:
  """A released response as reply text (lists and objects as JSON)."""
  if isinstance(response, str):
    return response
  return json.dumps(response, ensure_ascii=False)


@PROVIDERS.register("replay")
class ReplayProvider(Provider):
  """Serves released generations by key instead of asking an LLM.

  `path` is one generation file (its replies serve every scheme) or a folder
  holding one file per scheme: `files[scheme]` if given, else the first of
  `{scheme}.jsonl`, `{scheme}.tsv`, `{scheme}_*.jsonl` (sorted; so
  "generator" finds the Goodreads `generator_v1.jsonl`). A key whose id has
  no reply is counted (`stats["missing"]`) and answered with "" (parsed as
  empty), or raises KeyError when `strict`.
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
    replies = []
    for prompt in prompts:
      scheme, _, subject = split_key(prompt.key)
      table = self._table(scheme)
      if subject in table:
        self.stats["served"] += 1
        replies.append(_as_text(table[subject]))
        continue
      self.stats["missing"] += 1
      if self.strict:
        raise KeyError(f"replay: no reply for '{prompt.key}' in {table.path}")
      replies.append("")
    return replies


# --- openai -------------------------------------------------------------------


class TokenBucket:
  """Allows `rate` acquisitions per second on average, bursts up to `burst`."""

  def __init__(self, rate: float, burst: float = 1.0):
    self.rate = rate
    self.capacity = max(1.0, burst)
    self._tokens = self.capacity
    self._last = time.monotonic()
    self._lock = threading.Lock()

  def acquire(self) -> None:
    """Blocks until one token is available, then takes it."""
    if self.rate <= 0:
      return
    while True:
      with self._lock:
        now = time.monotonic()
        self._tokens = min(self.capacity,
                           self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
          self._tokens -= 1.0
          return
        wait = (1.0 - self._tokens) / self.rate
      time.sleep(wait)


class ReplyCache:
  """Append-only JSONL of answered prompts: {"key", "response", "model"}.

  Every answer is written as one line, flushed and fsync'd at once, so a
  crash loses at most the line being written. On open, a line that is not
  valid JSON (a torn write) is skipped and counted in `torn`; later answers
  start on a fresh line. Duplicate keys keep the last answer.
  """

  def __init__(self, path: str):
    self.path = pathlib.Path(path).expanduser()
    self.answers: dict[str, str] = {}
    self.torn = 0
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
        self.answers[row["key"]] = row["response"]

  def __contains__(self, key: str) -> bool:
    return key in self.answers

  def add(self, key: str, response: str, model: str) -> None:
    line = json.dumps({"key": key, "response": response, "model": model},
                      ensure_ascii=False) + "\n"
    with self._lock:
      self._file.write(line.encode("utf-8"))
      self._file.flush()
      os.fsync(self._file.fileno())
      self.answers[key] = response

  def close(self) -> None:
    self._file.close()


class _NotAsked(RuntimeError):
  """A prompt skipped because the provider stopped (see give_up_after)."""


class _Retryable(Exception):
  """A failed request worth trying again (429, 5xx, timeout, connection)."""

  def __init__(self, message: str, retry_after: float | None = None):
    super().__init__(message)
    self.retry_after = retry_after


_RETRY_CODES = (408, 409, 429, 500, 502, 503, 504)


@PROVIDERS.register("openai")
class OpenAIProvider(Provider):
  """Chat completions from an OpenAI-compatible endpoint (stdlib only).

  Requests run on `concurrency` threads, at most `rate` per second (0 = no
  limit). A 429, 5xx, timeout or connection error is retried up to
  `max_retries` times after `backoff * 2**attempt` seconds (capped at
  `max_backoff`, times a random factor in [0.5, 1]; a Retry-After header is
  honoured up to the cap). With a `cache_path`, answers are appended to a
  ReplyCache as they arrive and cached keys are never requested again.
  Prompts still unanswered at the end raise ProviderError (all answers that
  did arrive are cached), or come back as "" when `raise_on_failure=False`.
  After `give_up_after` prompts in a row got no answer (0 = never), the rest
  are not asked and ProviderError is raised either way: the endpoint is
  down or refuses us, and retrying every prompt would take hours.
  The API key is read from the environment variable named `api_key_env`;
  without it, no Authorization header is sent (local servers need none).
  """

  def __init__(self, model: str, *, base_url: str = "https://api.openai.com/v1",
               api_key_env: str = "OPENAI_API_KEY", cache_path: str = "",
               concurrency: int = 4, rate: float = 0.0, max_retries: int = 5,
               timeout: float = 60.0, backoff: float = 1.0,
               max_backoff: float = 30.0, temperature: float = 0.0,
               max_tokens: int = 256, raise_on_failure: bool = True,
               give_up_after: int = 8, seed: int = 0):
    super().__init__()
    if concurrency < 1:
      raise ConfigError(f"openai provider: concurrency must be >= 1, got "
                        f"{concurrency}")
    if max_retries < 0:
      raise ConfigError(f"openai provider: max_retries must be >= 0, got "
                        f"{max_retries}")
    if give_up_after < 0:
      raise ConfigError(f"openai provider: give_up_after must be >= 0, got "
                        f"{give_up_after}")
    self.model = model
    self.url = base_url.rstrip("/") + "/chat/completions"
    self._api_key = os.environ.get(api_key_env, "")
    if not self._api_key:
      logging.warning("openai provider: environment variable %s is not set; "
                      "sending requests without an API key", api_key_env)
    self.concurrency = concurrency
    self.bucket = TokenBucket(rate, burst=max(1.0, rate))
    self.max_retries = max_retries
    self.timeout = timeout
    self.backoff = backoff
    self.max_backoff = max_backoff
    self.temperature = temperature
    self.max_tokens = max_tokens
    self.raise_on_failure = raise_on_failure
    self.give_up_after = give_up_after
    self._failures_in_a_row = 0
    self._stopped = threading.Event()  # Set when give_up_after is reached.
    self._random = random.Random(seed)
    self._stats_lock = threading.Lock()
    self.cache = ReplyCache(cache_path) if cache_path else None
    if self.cache is not None:
      self.stats["torn_cache_lines"] = self.cache.torn

  def _count(self, name: str) -> None:
    with self._stats_lock:
      self.stats[name] += 1

  def _request(self, prompt: Prompt) -> str:
    """One POST; the reply text, or _Retryable / RuntimeError on failure."""
    body = {
        "model": self.model,
        "messages": [{"role": "system", "content": prompt.system},
                     {"role": "user", "content": prompt.user}],
        "temperature": self.temperature,
        "max_tokens": self.max_tokens,
    }
    headers = {"Content-Type": "application/json"}
    if self._api_key:
      headers["Authorization"] = f"Bearer {self._api_key}"
    request = urllib.request.Request(
        self.url, data=json.dumps(body).encode("utf-8"), headers=headers,
        method="POST")
    try:
      with urllib.request.urlopen(request, timeout=self.timeout) as response:
        payload = response.read()
    except urllib.error.HTTPError as e:
      detail = e.read(300).decode("utf-8", "replace")
      if e.code in _RETRY_CODES:
        retry_after = e.headers.get("Retry-After") if e.headers else None
        try:
          after = float(retry_after) if retry_after else None
        except ValueError:
          after = None
        raise _Retryable(f"HTTP {e.code}: {detail}", after) from None
      raise RuntimeError(f"HTTP {e.code} from {self.url}: {detail}") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError,
            ConnectionError, http.client.HTTPException) as e:
      raise _Retryable(f"{type(e).__name__}: {e}") from None
    try:
      message = json.loads(payload)["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
      raise _Retryable(f"unreadable completion ({type(e).__name__}): "
                       f"{payload[:200]!r}") from None
    return message.get("content") or ""

  def _ask(self, prompt: Prompt) -> str:
    """Asks with retries; caches and returns the answer."""
    attempt = 0
    while True:
      if self._stopped.is_set():
        raise _NotAsked(f"'{prompt.key}': not asked, the provider stopped")
      self.bucket.acquire()
      self._count("requests")
      try:
        answer = self._request(prompt)
        break
      except _Retryable as e:
        if attempt == self.max_retries:
          self._no_answer()
          raise RuntimeError(f"'{prompt.key}': gave up after "
                             f"{attempt + 1} tries: {e}") from None
        self._count("retries")
        delay = min(self.max_backoff, self.backoff * 2 ** attempt)
        with self._stats_lock:
          delay *= 0.5 + 0.5 * self._random.random()
        if e.retry_after is not None:
          delay = min(self.max_backoff, max(delay, e.retry_after))
        logging.info("openai: '%s' try %d failed (%s); retrying in %.2fs",
                     prompt.key, attempt + 1, e, delay)
        time.sleep(delay)
        attempt += 1
      except RuntimeError:
        self._no_answer()
        raise
    with self._stats_lock:
      self._failures_in_a_row = 0
    if self.cache is not None:
      self.cache.add(prompt.key, answer, self.model)
    return answer

  def _no_answer(self) -> None:
    """Counts a prompt given up on; stops the provider after too many."""
    with self._stats_lock:
      self._failures_in_a_row += 1
      if self.give_up_after and self._failures_in_a_row >= self.give_up_after:
        self._stopped.set()

  def generate(self, prompts: Sequence[Prompt]) -> list[str]:
    answers: dict[str, str] = {}
    todo: dict[str, Prompt] = {}
    for prompt in prompts:
      if self.cache is not None and prompt.key in self.cache:
        answers[prompt.key] = self.cache.answers[prompt.key]
        self.stats["cache_hits"] += 1
      else:
        todo.setdefault(prompt.key, prompt)
    failed, last_error = {}, ""
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      futures = {pool.submit(self._ask, p): key for key, p in todo.items()}
      for future in concurrent.futures.as_completed(futures):
        key = futures[future]
        try:
          answers[key] = future.result()
        except RuntimeError as e:
          failed[key] = str(e)
          self.stats["failures"] += 1
          if not isinstance(e, _NotAsked):
            last_error = str(e)
            logging.warning("openai: %s", e)
    if self._stopped.is_set():
      raise ProviderError(
          f"openai: stopped asking after {self.give_up_after} prompts in a "
          f"row got no answer from {self.url} (is it up, and are the model "
          f"and key right?); last: {last_error or '?'}. Answers received "
          f"are cached: the same command resumes (give_up_after=0 never "
          f"stops, e.g. when only some prompts are refused).", sorted(failed))
    if failed and self.raise_on_failure:
      first = next(iter(failed.values()))
      raise ProviderError(f"openai: {len(failed)} of {len(todo)} prompts got "
                          f"no answer (answers received are cached); first: "
                          f"{first}", sorted(failed))
    return [answers.get(p.key, "") for p in prompts]

  def close(self) -> None:
    if self.cache is not None:
      self.cache.close()


# --- local --------------------------------------------------------------------


@PROVIDERS.register("local")
def _local_provider(**kwargs) -> Provider:
  """local_provider.LocalProvider, imported on use: it loads JAX and Flax."""
  from genre_jax.genre import local_provider  # pylint: disable=g-import-not-at-top
  return local_provider.LocalProvider(**kwargs)
