"""The `openai` provider: any OpenAI-compatible /v1/chat/completions endpoint,
standard library only (threads, rate limit, retries, resumable reply cache)."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

from absl import logging

from genre_jax.errors import ConfigError
from genre_jax.genre.providers.base import (PROVIDERS, Prompt, Provider,
                                            ProviderError, ReplyCache,
                                            request_fingerprint, valid_utf8)


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
