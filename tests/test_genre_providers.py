"""Tests of the GENRE providers: replay, openai (against a local HTTP server
that fails on purpose) and local (a tiny random Llama from transformers)."""

import collections
import concurrent.futures
import json
import pathlib
import subprocess
import sys
import threading
import time

import pytest

from genre_jax.errors import ConfigError, DataFormatError
from genre_jax.genre import generate
from genre_jax.genre import providers
from genre_jax.genre.providers import Prompt
from genre_jax.genre.providers import local as local_provider
from genre_jax.genre.providers import openai as openai_provider
from tests.helpers import FakeServer, build_tiny_llama

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
GENRE = DATA / "goodreads" / "genre"


# --- a fake OpenAI-compatible server ------------------------------------------


@pytest.fixture
def server():
  fake = FakeServer()
  yield fake
  fake.close()


def _openai(server, **kwargs):
  options = dict(model="test-model", base_url=server.url,
                 api_key_env="GENRE_TEST_KEY", concurrency=2, max_retries=3,
                 timeout=0.25, backoff=0.01, max_backoff=0.05)
  options.update(kwargs)
  return providers.get_provider("openai", **options)


def _prompts(texts):
  return [Prompt(f"generator:book:U{i}", "system", t)
          for i, t in enumerate(texts)]


class _CountedUrlopen:
  """urllib.request.urlopen, counting the requests the client has open.

  Counted on the client: the server also sees requests the client has
  already given up on (a timed-out one still sleeping there), which a
  bound on the client's concurrency does not cover.
  """

  def __init__(self, urlopen):
    self.urlopen = urlopen
    self.lock = threading.Lock()
    self.open = 0
    self.max_open = 0

  def _enter(self):
    with self.lock:
      self.open += 1
      self.max_open = max(self.max_open, self.open)

  def _leave(self):
    with self.lock:
      self.open -= 1

  def __call__(self, *args, **kwargs):
    self._enter()
    try:
      response = self.urlopen(*args, **kwargs)
    except BaseException:
      self._leave()
      raise
    counter = self

    class Counted:
      def __enter__(self):
        return response.__enter__()

      def __exit__(self, *exc):
        try:
          return response.__exit__(*exc)
        finally:
          counter._leave()

    return Counted()


def test_openai_retries_timeouts_and_bounded_concurrency(server, monkeypatch):
  monkeypatch.setenv("GENRE_TEST_KEY", "sk-test-secret")
  texts = ([f"ok:{i}" for i in range(8)] +
           ["500-once:a", "429-once:b", "sleep-once:c", "trickle-once:d"])
  urlopen = _CountedUrlopen(openai_provider.urllib.request.urlopen)
  monkeypatch.setattr(openai_provider.urllib.request, "urlopen", urlopen)
  provider = _openai(server)
  replies = provider.generate(_prompts(texts))
  assert replies == [f"echo: {t}" for t in texts]
  counts = collections.Counter(server.log)
  assert all(counts[t] == 1 for t in texts[:8])
  assert counts["500-once:a"] == counts["429-once:b"] == 2
  # A reply trickling in, each read within the timeout, is cut off too.
  assert counts["sleep-once:c"] == counts["trickle-once:d"] == 2
  assert provider.stats["retries"] == 4
  assert provider.stats["requests"] == len(texts) + 4
  assert 1 <= urlopen.max_open <= 2
  assert urlopen.open == 0
  assert set(server.auth) == {"Bearer sk-test-secret"}


def test_openai_gives_up_and_does_not_retry_client_errors(server):
  provider = _openai(server, max_retries=2, raise_on_failure=False)
  replies = provider.generate(_prompts(["broken:x", "bad:y", "ok:z"]))
  assert replies == ["", "", "echo: ok:z"]
  counts = collections.Counter(server.log)
  assert counts["broken:x"] == 3 and counts["bad:y"] == 1
  assert provider.stats["failures"] == 2
  assert server.auth[0] is None  # GENRE_TEST_KEY unset: no header.


def test_openai_stops_asking_when_the_endpoint_is_down(server):
  # Every prompt fails: after give_up_after in a row the rest are not asked,
  # and that is an error even with raise_on_failure=False.
  provider = _openai(server, max_retries=1, give_up_after=3,
                     raise_on_failure=False)
  texts = [f"broken:{i}" for i in range(40)]
  with pytest.raises(providers.ProviderError) as error:
    provider.generate(_prompts(texts))
  assert "stopped asking after 3 prompts in a row got no answer" in str(
      error.value)
  assert "HTTP 500" in str(error.value)
  assert "--generate.openai.give_up_after=0 never stops" in str(error.value)
  assert "raise_on_failure" not in str(error.value)  # Nothing was refused.
  assert len(error.value.failed) == 40
  # At most the 3 failures plus one in flight on the other thread, 2 tries
  # each, reached the server.
  assert provider.stats["failures"] == 40
  assert len(server.log) <= (3 + 1) * 2


def test_openai_an_answer_resets_the_count_of_failures_in_a_row(server):
  provider = _openai(server, max_retries=0, give_up_after=2, concurrency=1,
                     raise_on_failure=False)
  texts = ["broken:a", "ok:b", "broken:c", "ok:d", "broken:e", "ok:f"]
  replies = provider.generate(_prompts(texts))
  assert replies == ["", "echo: ok:b", "", "echo: ok:d", "", "echo: ok:f"]
  assert provider.stats["failures"] == 3

def test_openai_resumes_from_cache_after_a_crash(server, tmp_path):
  cache = tmp_path / "cache.jsonl"
  texts = ["ok:a", "ok:b", "broken:c", "ok:d"]
  first = _openai(server, cache_path=str(cache), max_retries=1)
  with pytest.raises(providers.ProviderError) as error:
    first.generate(_prompts(texts))
  first.close()
  assert error.value.failed == ["generator:book:U2"]
  lines = [json.loads(l) for l in cache.read_text().splitlines()]
  assert sorted(l["key"] for l in lines) == [
      "generator:book:U0", "generator:book:U1", "generator:book:U3"]
  # A crash mid-write leaves a torn last line.
  with open(cache, "a") as f:
    f.write('{"key": "generator:book:U9", "respo')
  server.broken = False
  del server.log[:]
  second = _openai(server, cache_path=str(cache))
  assert second.stats["torn_cache_lines"] == 1
  replies = second.generate(_prompts(texts + ["ok:e"]))
  second.close()
  assert replies == [f"echo: {t}" for t in texts + ["ok:e"]]
  assert sorted(server.log) == ["broken:c", "ok:e"]
  assert second.stats["cache_hits"] == 3
  # Nothing is asked a third time, and the torn line did not eat an answer.
  del server.log[:]
  third = _openai(server, cache_path=str(cache))
  assert third.generate(_prompts(texts + ["ok:e"])) == replies
  third.close()
  assert not server.log
  assert third.stats["torn_cache_lines"] == 1


def test_openai_cache_serves_an_answer_only_to_the_same_request(server,
                                                               tmp_path):
  cache = str(tmp_path / "cache.jsonl")
  prompts = _prompts(["ok:a", "ok:b"])

  def asked(prompts, **kwargs):
    """The request bodies one provider run sent to the server."""
    before = len(server.bodies)
    provider = _openai(server, cache_path=cache, **kwargs)
    assert provider.generate(prompts) == [f"echo: {p.user}" for p in prompts]
    provider.close()
    return server.bodies[before:]

  assert len(asked(prompts)) == 2
  # Another model, sampling setting or prompt wording is asked again ...
  assert {b["model"] for b in asked(prompts, model="other")} == {"other"}
  assert len(asked(prompts, temperature=0.7)) == 2
  assert len(asked(prompts, max_tokens=64)) == 2
  assert len(asked([Prompt(p.key, "new system", p.user)
                    for p in prompts])) == 2
  reworded = asked(_prompts(["ok:a, more history", "ok:b"]))
  assert [b["messages"][1]["content"] for b in reworded] == [
      "ok:a, more history"]
  # ... and every answer is kept: asking any of them again asks nothing.
  assert not asked(prompts)
  assert not asked(prompts, model="other")
  assert not asked(prompts, temperature=0.7)


def test_cache_rows_without_a_fingerprint_are_not_served(server, tmp_path):
  cache = tmp_path / "cache.jsonl"
  cache.write_text(json.dumps({"key": "generator:book:U0",
                               "response": "stale answer",
                               "model": "test-model"}) + "\n")
  provider = _openai(server, cache_path=str(cache))
  assert provider.stats["ignored_cache_rows"] == 1
  assert provider.generate(_prompts(["ok:a"])) == ["echo: ok:a"]
  provider.close()
  assert server.log == ["ok:a"]
  again = _openai(server, cache_path=str(cache))
  assert again.generate(_prompts(["ok:a"])) == ["echo: ok:a"]
  again.close()
  assert server.log == ["ok:a"] and again.stats["cache_hits"] == 1


def test_openai_odd_replies_are_retried_refused_or_joined(server, tmp_path):
  # A list of content parts is joined; no message or empty content is
  # retried; content filtered by the endpoint is a refusal, not retried.
  # Nothing empty or unreadable reaches the cache, which stays readable.
  cache = tmp_path / "cache.jsonl"
  texts = ["parts:a", "null-message:b", "empty-once:c", "filtered:d"]
  provider = _openai(server, cache_path=str(cache), max_retries=2,
                     give_up_after=0, raise_on_failure=False)
  replies = provider.generate(_prompts(texts))
  provider.close()
  assert replies == ["echo: parts:a", "", "echo: empty-once:c", ""]
  assert collections.Counter(server.log) == {
      "parts:a": 1, "null-message:b": 3, "empty-once:c": 2, "filtered:d": 1}
  assert provider.stats["refused"] == 1
  assert provider.stats["unanswered"] == 2
  rows = [json.loads(l) for l in cache.read_text().splitlines()]
  assert sorted(r["response"] for r in rows) == ["echo: empty-once:c",
                                                 "echo: parts:a"]
  del server.log[:]
  again = _openai(server, cache_path=str(cache), max_retries=0,
                  raise_on_failure=False)
  assert again.generate(_prompts(texts)) == replies
  again.close()
  assert sorted(server.log) == ["filtered:d", "null-message:b"]
  with pytest.raises(openai_provider._Retryable, match="content is int"):  # pylint: disable=protected-access
    openai_provider._message_text({"message": {"content": 42}})  # pylint: disable=protected-access


def test_openai_reply_with_a_lone_surrogate_is_valid_utf8(server, tmp_path):
  cache = tmp_path / "cache.jsonl"
  provider = _openai(server, cache_path=str(cache))
  replies = provider.generate(_prompts(["surrogate:a"]))
  provider.close()
  assert replies == ["echo: ? cut"]
  assert json.loads(cache.read_text())["response"] == "echo: ? cut"


def test_openai_interrupt_cancels_the_prompts_not_yet_asked(
    server, tmp_path, monkeypatch):
  # Ctrl-C while waiting for answers: as_completed raises KeyboardInterrupt
  # once the first answer is in.
  as_completed = concurrent.futures.as_completed

  def interrupted(futures):
    for future in as_completed(futures):
      yield future
      raise KeyboardInterrupt

  monkeypatch.setattr(openai_provider.concurrent.futures, "as_completed",
                      interrupted)
  cache = tmp_path / "cache.jsonl"
  texts = [f"slow:{i}" for i in range(20)]
  provider = _openai(server, cache_path=str(cache))
  start = time.monotonic()
  with pytest.raises(KeyboardInterrupt):
    provider.generate(_prompts(texts))
  assert time.monotonic() - start < 1.0
  time.sleep(0.5)  # Requests in flight finish; no queued one may start.
  provider.close()
  assert 1 <= len(server.log) <= 5
  # The answers that arrived are cached: a re-run asks only the rest.
  cached = len(cache.read_text().splitlines())
  assert cached >= 1
  monkeypatch.undo()
  del server.log[:]
  again = _openai(server, cache_path=str(cache), concurrency=8)
  assert again.generate(_prompts(texts)) == [f"echo: {t}" for t in texts]
  again.close()
  assert len(server.log) == 20 - cached


def test_openai_refused_prompts_can_be_left_unanswered(server, tmp_path):
  texts = ["ok:a", "bad:b", "ok:c"]
  strict = _openai(server, give_up_after=0)
  with pytest.raises(providers.ProviderError) as error:
    strict.generate(_prompts(texts))
  message = str(error.value)
  assert "1 of 3 prompts got no answer (1 refused by the endpoint)" in message
  assert "'generator:book:U1': HTTP 400" in message
  assert "--generate.openai.raise_on_failure=False" in message
  assert "give_up_after" not in message
  lenient = _openai(server, raise_on_failure=False)
  assert lenient.generate(_prompts(texts)) == ["echo: ok:a", "",
                                               "echo: ok:c"]
  assert lenient.stats["unanswered"] == 1
  assert lenient.stats["refused"] == 1
  # The setting exists on the command line and reaches the provider.
  g = generate.generate_config()
  assert g.openai.raise_on_failure is True
  g.provider = "openai"
  g.openai.base_url = server.url
  g.openai.raise_on_failure = False
  provider = generate.make_provider(g, str(tmp_path / "out.jsonl"))
  assert provider.raise_on_failure is False
  provider.close()


@pytest.mark.slow
def test_run_generate_completes_despite_a_refused_prompt(
    server, tmp_path, make_tiny_mind):
  root = make_tiny_mind(tmp_path / "tiny")
  server.refuse = ("Soup of the day",)  # The title of item N4.

  def run(*flags):
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--mode=generate",
         "--config=configs/nrms.py", "--config.data.name=goodreads_genre",
         f"--config.data.path={root}", f"--config.data.data_dir={tmp_path}/d",
         "--generate.scheme=summarizer", "--generate.provider=openai",
         f"--generate.openai.base_url={server.url}",
         "--generate.openai.model=test", f"--workdir={tmp_path}/w", *flags],
        capture_output=True, text=True, cwd=ROOT, timeout=600)

  refused = run()
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert "--generate.openai.raise_on_failure=False" in refused.stderr
  assert "Traceback" not in refused.stderr
  done = run("--generate.openai.raise_on_failure=False")
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["provider_stats"]["unanswered"] == 1
  assert summary["provider_stats"]["cache_hits"] == 4
  rows = [json.loads(l) for l in
          pathlib.Path(summary["out_path"]).read_text().splitlines()]
  assert [r["item_id"] for r in rows if not r["response"]] == ["N4"]
  assert len(server.log) == 5 + 1  # Only the refused prompt asked twice.


def test_openai_backoff_does_not_overflow_with_many_retries(monkeypatch):
  provider = providers.get_provider(
      "openai", model="m", base_url="http://127.0.0.1:9/v1",
      api_key_env="GENRE_TEST_KEY", max_retries=1100, max_backoff=0.0,
      raise_on_failure=False)

  def unavailable(prompt):
    raise openai_provider._Retryable(f"'{prompt.key}': HTTP 503")  # pylint: disable=protected-access

  monkeypatch.setattr(provider, "_request", unavailable)
  assert provider.generate(_prompts(["x"])) == [""]
  assert provider.stats["requests"] == 1101


def test_cache_rejects_rows_without_fields(tmp_path):
  cache = tmp_path / "cache.jsonl"
  cache.write_text('{"key": "k", "response": "r"}\n{"key": "k2"}\n')
  with pytest.raises(DataFormatError,
                     match=r"cache.jsonl:2: field 'response'"):
    providers.ReplyCache(str(cache))
  cache.write_text('{"key": "k", "response": "r", "fingerprint": 1}\n')
  with pytest.raises(DataFormatError,
                     match=r"cache.jsonl:1: field 'fingerprint'"):
    providers.ReplyCache(str(cache))


def test_token_bucket_limits_rate():
  bucket = providers.TokenBucket(rate=50.0, burst=1.0)
  start = time.monotonic()
  for _ in range(11):
    bucket.acquire()
  assert time.monotonic() - start >= 0.18


# --- replay -------------------------------------------------------------------


def test_replay_files_missing_keys_and_strict(tmp_path):
  (tmp_path / "summarizer.jsonl").write_text(
      '{"item_id": "B1", "response": "[description] one"}\n'
      '{"item_id": "B1", "response": "[description] two"}\n')
  (tmp_path / "profiler.tsv").write_text("U1\t['x', 'y']\n")
  replay = providers.get_provider("replay", path=str(tmp_path))
  replies = replay.generate([
      Prompt("summarizer:book:B1", "", ""),
      Prompt("summarizer:book:B2", "", ""),
      Prompt("profiler:book:U1", "", "")])
  assert replies == ["[description] two", "", "['x', 'y']"]
  assert replay.stats == {"served": 2, "missing": 1}
  strict = providers.get_provider("replay", path=str(tmp_path), strict=True)
  # A ProviderError, which run.py reports in one line, naming key and file.
  with pytest.raises(providers.ProviderError,
                     match=r"no reply for 'summarizer:book:B2' in .*"
                     r"summarizer.jsonl") as error:
    strict.generate([Prompt("summarizer:book:B1", "", ""),
                     Prompt("summarizer:book:B2", "", "")])
  assert error.value.failed == ["summarizer:book:B2"]
  with pytest.raises(ConfigError, match="no generation file"):
    replay.generate([Prompt("generator:book:U1", "", "")])


def test_replay_serves_a_chain_runs_folder(tmp_path):
  # A chain run writes chain.jsonl and its profiler step chain.profiler.jsonl.
  (tmp_path / "chain.jsonl").write_text(
      '{"user_id": "U1", "response": "{\\"title\\": \\"T\\"}"}\n')
  (tmp_path / "chain.profiler.jsonl").write_text(
      '{"user_id": "U1", "response": "[\\"space opera\\"]"}\n')
  replay = providers.get_provider("replay", path=str(tmp_path))
  assert replay.generate([Prompt("profiler:book:U1", "", ""),
                          Prompt("chain:book:U1", "", "")]) == [
                              '["space opera"]', '{"title": "T"}']


def test_replay_replies_are_valid_utf8(tmp_path):
  # JSON may hold half a surrogate pair, which no UTF-8 writer takes.
  (tmp_path / "summarizer.jsonl").write_text(
      '{"item_id": "B1", "response": "cut \\ud83d here"}\n'
      '{"item_id": "B2", "response": ["cut \\ud83d"]}\n')
  replay = providers.get_provider("replay", path=str(tmp_path))
  replies = replay.generate([Prompt("summarizer:book:B1", "", ""),
                             Prompt("summarizer:book:B2", "", "")])
  assert replies == ["cut ? here", '["cut ?"]']
  for reply in replies:
    reply.encode("utf-8")


def test_replay_goodreads_release():
  if not GENRE.is_dir():
    pytest.skip(f"GENRE release not found at {GENRE} (../shared/data absent)")
  replay = providers.get_provider("replay", path=str(GENRE))
  replies = replay.generate([Prompt("profiler:book:U0", "", ""),
                             Prompt("generator:book:U0", "", ""),
                             Prompt("summarizer:book:B89376", "", "")])
  assert json.loads(replies[0]) == ["ballet", "love", "disabilities",
                                    "family", "animals"]
  assert json.loads(replies[1])["title"] == "Educated"  # generator_v1.jsonl
  assert replies[2].startswith("[description] Heaven is a book")
  v2 = providers.get_provider("replay", path=str(GENRE),
                              files={"generator": "generator_v2.jsonl"})
  assert json.loads(v2.generate([Prompt("generator:book:U0", "", "")])[0])[
      "title"] == "The Kite Runner"


# --- local --------------------------------------------------------------------



@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


_LOCAL_PROMPTS = [
    Prompt("generator:book:U1", "you recommend books", "books liked : dune"),
    Prompt("generator:book:U2", "you recommend books to a reader",
           "books liked : the hobbit , dune , emma , the sea and the dragons"),
    Prompt("generator:book:U3", "reply with json", "books liked : emma"),
]


def _hf_greedy(model_dir, prompts, max_new_tokens):
  """Reference replies from transformers' own greedy generate."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
  model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
  encodings = [tokenizer.encode(local_provider.render_plain(p.system, p.user)).ids
               for p in prompts]
  length = max(map(len, encodings))
  ids = torch.zeros((len(prompts), length), dtype=torch.long)
  mask = torch.zeros((len(prompts), length), dtype=torch.long)
  for row, tokens in enumerate(encodings):
    ids[row, length - len(tokens):] = torch.tensor(tokens)
    mask[row, length - len(tokens):] = 1
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=2,
                         pad_token_id=0)
  replies = []
  for row in out[:, length:].tolist():
    row = row[:row.index(2)] if 2 in row else row
    replies.append(tokenizer.decode(row, skip_special_tokens=True).strip())
  return replies


@pytest.mark.slow
def test_local_greedy_matches_transformers(tiny_llama):
  provider = providers.get_provider("local", model_dir=str(tiny_llama),
                                    batch_size=2, max_new_tokens=6)
  replies = provider.generate(_LOCAL_PROMPTS)
  assert replies == _hf_greedy(tiny_llama, _LOCAL_PROMPTS, 6)
  assert provider.generate(_LOCAL_PROMPTS[::-1]) == replies[::-1]
  assert provider.stats["generated_tokens"] == 2 * 3 * 6  # No EOS drawn.


def test_local_stops_at_eos_and_stop_strings(tiny_llama, tmp_path):
  base = providers.get_provider("local", model_dir=str(tiny_llama),
                                batch_size=2, max_new_tokens=6)
  words = base.generate(_LOCAL_PROMPTS[:1])[0].split()
  stop = providers.get_provider(
      "local", model_dir=str(tiny_llama), batch_size=2, max_new_tokens=6,
      stop=[" " + words[2]], stop_check_every=1)
  assert stop.generate(_LOCAL_PROMPTS[:1]) == [" ".join(words[:2])]
  assert stop.stats["generated_tokens"] == 3
  # Make the reply's third word an end-of-sequence token.
  eos_dir = tmp_path / "eos"
  eos_dir.mkdir()
  for f in tiny_llama.iterdir():
    (eos_dir / f.name).symlink_to(f)
  vocab = json.loads((tiny_llama / "tokenizer.json").read_text())
  eos_id = vocab["model"]["vocab"][words[2]]
  (eos_dir / "generation_config.json").unlink()
  (eos_dir / "generation_config.json").write_text(
      json.dumps({"eos_token_id": [2, eos_id]}))
  eos = providers.get_provider("local", model_dir=str(eos_dir), batch_size=2,
                               max_new_tokens=6)
  assert eos.generate(_LOCAL_PROMPTS[:1]) == [" ".join(words[:2])]
  assert eos.stats["generated_tokens"] == 3


def test_local_top_p_sampling_runs(tiny_llama):
  provider = providers.get_provider("local", model_dir=str(tiny_llama),
                                    batch_size=2, max_new_tokens=6,
                                    temperature=1.0, top_p=0.9, seed=3)
  replies = provider.generate(_LOCAL_PROMPTS)
  assert len(replies) == 3 and all(r.strip() for r in replies)
  again = providers.get_provider("local", model_dir=str(tiny_llama),
                                 batch_size=2, max_new_tokens=6,
                                 temperature=1.0, top_p=0.9, seed=3)
  assert again.generate(_LOCAL_PROMPTS) == replies
  # It samples: not transformers' greedy replies, and another seed draws
  # others (a provider that dropped temperature would decode greedily).
  assert replies != _hf_greedy(tiny_llama, _LOCAL_PROMPTS, 6)
  other = providers.get_provider("local", model_dir=str(tiny_llama),
                                 batch_size=2, max_new_tokens=6,
                                 temperature=1.0, top_p=0.9, seed=4)
  assert other.generate(_LOCAL_PROMPTS) != replies


@pytest.mark.slow
def test_local_replies_are_cached_per_batch_and_resumed(tiny_llama, tmp_path,
                                                       monkeypatch):
  cache = tmp_path / "local.cache.jsonl"

  def local(**kwargs):
    return providers.get_provider("local", model_dir=str(tiny_llama),
                                  batch_size=2, max_new_tokens=6,
                                  cache_path=str(cache), **kwargs)

  # A crash in the second batch keeps the first batch's replies.
  crashing = local()
  real = type(crashing)._generate_batch
  calls = []

  def crash_on_second(self, token_lists):
    calls.append(len(token_lists))
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(self, token_lists)

  monkeypatch.setattr(type(crashing), "_generate_batch", crash_on_second)
  with pytest.raises(KeyboardInterrupt):
    crashing.generate(_LOCAL_PROMPTS)
  monkeypatch.undo()
  crashing.close()
  rows = [json.loads(line) for line in cache.read_text().splitlines()]
  assert [r["key"] for r in rows] == [p.key for p in _LOCAL_PROMPTS[:2]]

  # The same command again decodes only the third prompt, and the replies
  # are those of a run never interrupted.
  resumed = local()
  replies = resumed.generate(_LOCAL_PROMPTS)
  assert resumed.stats["cache_hits"] == 2
  assert resumed.stats["generated_tokens"] == 6
  assert replies == _hf_greedy(tiny_llama, _LOCAL_PROMPTS, 6)
  resumed.close()
  # Other generation settings ask again.
  longer = providers.get_provider("local", model_dir=str(tiny_llama),
                                  batch_size=2, max_new_tokens=7,
                                  cache_path=str(cache))
  longer.generate(_LOCAL_PROMPTS)
  assert longer.stats["cache_hits"] == 0
  assert longer.stats["generated_tokens"] == 3 * 7


def test_sample_next_top_p_keeps_the_nucleus():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  logits = np.log(np.array([[0.1, 0.4, 0.2, 0.3]] * 400, np.float32))
  draws = np.asarray(local_provider.sample_next(
      logits, jax.random.key(0), temperature=1.0, top_p=0.6))
  assert set(draws.tolist()) == {1, 3}  # 0.4 + 0.3 reaches 0.6.
  assert abs((draws == 1).mean() - 0.4 / 0.7) < 0.1
  greedy = local_provider.sample_next(logits[:2], jax.random.key(0),
                                 temperature=0.0, top_p=1.0)
  assert np.asarray(greedy).tolist() == [1, 1]


def test_chat_template_renders_and_falls_back(tmp_path):
  template = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}>"
              "{{ m.content }}\n{% endfor %}"
              "{% if add_generation_prompt %}<assistant>{% endif %}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": template, "bos_token": "<s>"}))
  render = local_provider.chat_renderer(tmp_path)
  assert render("S", "U") == "<s><system>S\n<user>U\n<assistant>"
  refusing = "{{ raise_exception('no system role') }}"
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": refusing}))
  assert local_provider.chat_renderer(tmp_path) is None
