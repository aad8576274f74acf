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
import hashlib
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


class _NotAsked(RuntimeError):
  """A prompt skipped because the provider stopped (see give_up_after)."""


class _Refused(RuntimeError):
  """A prompt the endpoint will not answer (HTTP 4xx, content filter)."""


class _Retryable(Exception):
  """A failed request worth trying again (429, 5xx, timeout, connection)."""

  def __init__(self, message: str, retry_after: float | None = None):
    super().__init__(message)
    self.retry_after = retry_after


_RETRY_CODES = (408, 409, 429, 500, 502, 503, 504)

# Largest backoff exponent: 2**attempt stays a finite float for any
# max_retries (max_backoff caps the delay long before anyway).
_MAX_BACKOFF_EXPONENT = 60


def _read_before(response, deadline: float) -> bytes:
  """The response body, or TimeoutError once the monotonic `deadline` has
  passed: a socket timeout bounds each read, not a reply that trickles in
  a few bytes at a time."""
  chunks = []
  while chunk := response.read1(65536):
    chunks.append(chunk)
    if time.monotonic() > deadline:
      raise TimeoutError("the reply took longer than the timeout to arrive")
  return b"".join(chunks)


def _message_text(choice: Any) -> str:
  """The reply text of one completion choice, or _Retryable / _Refused.

  Content is a string or a list of parts ({"type": "text", "text": ...},
  joined). An empty reply filtered by the endpoint is a refusal (asking
  again gets the same); any other empty or unreadable reply is retried.
  """
  finish = choice.get("finish_reason") if isinstance(choice, dict) else None
  message = choice.get("message") if isinstance(choice, dict) else None
  if isinstance(message, dict):
    content = message.get("content")
  elif finish == "content_filter":
    content = None
  else:
    raise _Retryable(f"unreadable completion: message is "
                     f"{type(message).__name__}, not an object")
  if isinstance(content, list):
    texts = []
    for part in content:
      if not isinstance(part, dict):
        raise _Retryable(f"unreadable completion: a content part is "
                         f"{type(part).__name__}, not an object")
      if part.get("type") == "text":
        if not isinstance(part.get("text"), str):
          raise _Retryable("unreadable completion: a text part without text")
        texts.append(part["text"])
    content = "".join(texts)
  elif content is not None and not isinstance(content, str):
    raise _Retryable(f"unreadable completion: content is "
                     f"{type(content).__name__}, not a string")
  if content and content.strip():
    return valid_utf8(content)
  refusal = message.get("refusal") if isinstance(message, dict) else None
  if finish == "content_filter" or (isinstance(refusal, str) and refusal):
    raise _Refused(f"refused (finish_reason={finish}): "
                   f"{valid_utf8(str(refusal or ''))[:200]}".rstrip(": "))
  raise _Retryable(f"empty completion (finish_reason={finish})")


@PROVIDERS.register("openai")
class OpenAIProvider(Provider):
  """Chat completions from an OpenAI-compatible endpoint (stdlib only).

  Requests run on `concurrency` threads, at most `rate` per second (0 = no
  limit). A request may take `timeout` seconds in all (a reply still
  arriving then is cut off). A 429, 5xx, timeout, connection error or empty
  reply is retried up
  to `max_retries` times after `backoff * 2**attempt` seconds (capped at
  `max_backoff`, times a random factor in [0.5, 1]; a Retry-After header is
  honoured up to the cap); another 4xx or a content-filtered reply is a
  refusal, not retried. With a `cache_path`, answers are appended to a
  ReplyCache as they arrive, and a prompt asked the same way (see
  `fingerprint`) is never requested again. Prompts still unanswered at the
  end raise ProviderError (all answers that did arrive are cached), or come
  back as "" (counted in `stats["unanswered"]`) when
  `raise_on_failure=False`: the way to finish a run despite prompts the
  endpoint always refuses. After `give_up_after` prompts in a row got no
  answer (0 = never), the rest are not asked and ProviderError is raised
  either way: the endpoint is down or refuses us, and retrying every prompt
  would take hours. A KeyboardInterrupt cancels the prompts not yet asked.
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
      self.stats["ignored_cache_rows"] = self.cache.ignored

  def fingerprint(self, prompt: Prompt) -> str:
    """A short hash of everything that shapes the answer to `prompt`."""
    return request_fingerprint(
        {"model": self.model, "temperature": float(self.temperature),
         "max_tokens": int(self.max_tokens)}, prompt)

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
    deadline = time.monotonic() + self.timeout
    try:
      with urllib.request.urlopen(request, timeout=self.timeout) as response:
        payload = _read_before(response, deadline)
    except urllib.error.HTTPError as e:
      detail = e.read(300).decode("utf-8", "replace")
      if e.code in _RETRY_CODES:
        retry_after = e.headers.get("Retry-After") if e.headers else None
        try:
          after = float(retry_after) if retry_after else None
        except ValueError:
          after = None
        raise _Retryable(f"HTTP {e.code}: {detail}", after) from None
      raise _Refused(f"HTTP {e.code} from {self.url}: {detail}") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError,
            ConnectionError, http.client.HTTPException) as e:
      raise _Retryable(f"{type(e).__name__}: {e}") from None
    try:
      choice = json.loads(payload)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError) as e:
      raise _Retryable(f"unreadable completion ({type(e).__name__}): "
                       f"{payload[:200]!r}") from None
    return _message_text(choice)

  def _ask(self, prompt: Prompt, fingerprint: str,
           cancelled: threading.Event) -> str:
    """Asks with retries; caches and returns the answer."""
    attempt = 0
    while True:
      if self._stopped.is_set() or cancelled.is_set():
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
        delay = min(self.max_backoff, self.backoff *
                    2.0 ** min(attempt, _MAX_BACKOFF_EXPONENT))
        with self._stats_lock:
          delay *= 0.5 + 0.5 * self._random.random()
        if e.retry_after is not None:
          delay = min(self.max_backoff, max(delay, e.retry_after))
        logging.info("openai: '%s' try %d failed (%s); retrying in %.2fs",
                     prompt.key, attempt + 1, e, delay)
        time.sleep(delay)
        attempt += 1
      except RuntimeError as e:
        self._no_answer()
        if isinstance(e, _Refused):
          self._count("refused")
          raise _Refused(f"'{prompt.key}': {e}") from None
        raise
    with self._stats_lock:
      self._failures_in_a_row = 0
    if self.cache is not None:
      self.cache.add(prompt.key, fingerprint, answer, self.model)
    return answer

  def _no_answer(self) -> None:
    """Counts a prompt given up on; stops the provider after too many."""
    with self._stats_lock:
      self._failures_in_a_row += 1
      if self.give_up_after and self._failures_in_a_row >= self.give_up_after:
        self._stopped.set()

  def generate(self, prompts: Sequence[Prompt]) -> list[str]:
    answers: dict[str, str] = {}
    todo: dict[str, tuple[Prompt, str]] = {}
    for prompt in prompts:
      fingerprint = self.fingerprint(prompt)
      cached = (self.cache.get(prompt.key, fingerprint)
                if self.cache is not None else None)
      if cached is not None:
        answers[prompt.key] = cached
        self.stats["cache_hits"] += 1
      else:
        todo.setdefault(prompt.key, (prompt, fingerprint))
    failed, refused, last_error = {}, 0, ""
    cancelled = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(self.concurrency)
    try:
      futures = {pool.submit(self._ask, p, f, cancelled): key
                 for key, (p, f) in todo.items()}
      for future in concurrent.futures.as_completed(futures):
        key = futures[future]
        try:
          answers[key] = future.result()
        except RuntimeError as e:
          failed[key] = str(e)
          self.stats["failures"] += 1
          refused += isinstance(e, _Refused)
          if not isinstance(e, _NotAsked):
            last_error = str(e)
            logging.warning("openai: %s", e)
    except BaseException:
      # Ctrl-C (or a bug): drop the queued prompts instead of asking them
      # all first; requests in flight finish and their answers are cached.
      cancelled.set()
      pool.shutdown(wait=False, cancel_futures=True)
      raise
    pool.shutdown()
    if self._stopped.is_set():
      advice = ("the same command resumes once it answers "
                "(--generate.openai.give_up_after=0 never stops)")
      if refused:
        advice += (f"; {refused} prompts were refused: if only some prompts "
                   "are, add --generate.openai.raise_on_failure=False too")
      raise ProviderError(
          f"openai: stopped asking after {self.give_up_after} prompts in a "
          f"row got no answer from {self.url} (is it up, and are the model "
          f"and key right?); last: {last_error or '?'}. Answers received "
          f"are cached: {advice}.", sorted(failed))
    if failed and self.raise_on_failure:
      first = next(iter(failed.values()))
      raise ProviderError(
          f"openai: {len(failed)} of {len(todo)} prompts got no answer "
          f"({refused} refused by the endpoint); first: {first}. Answers "
          f"received are cached: the same command asks only the rest again. "
          f"If the endpoint refuses some prompts every time, "
          f"--generate.openai.raise_on_failure=False finishes the run with "
          f"them answered \"\" (parsed as empty).", sorted(failed))
    if failed:
      self.stats["unanswered"] += len(failed)
      logging.warning("openai: %d of %d prompts got no answer and are "
                      "answered \"\" (raise_on_failure=False)", len(failed),
                      len(todo))
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
