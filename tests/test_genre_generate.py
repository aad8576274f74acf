"""Tests of the GENRE generation driver on a tiny hand-made dataset, with a
scripted provider, the replay provider and the local Llama provider."""

import json

import numpy as np
import pytest

from genre_jax.data import mind
from genre_jax.data.genre_parsing import Status
from genre_jax.data.types import Behaviors, Dataset, ItemTable
from genre_jax.errors import ConfigError
from genre_jax.genre import generate
from genre_jax.genre import providers

from tests.helpers import build_tiny_llama


def _behaviors(rows, clicked=6, negative=None):
  """Behaviors from (user id, history item rows[, clicked item]) rows.

  Each row shows its clicked item (default `clicked`) and, if given, one
  unclicked `negative`.
  """
  rows = [(r[0], r[1], r[2] if len(r) > 2 else clicked) for r in rows]
  histories = [h for _, h, _ in rows]
  offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
  per_row = 1 if negative is None else 2
  cands = [[c] if negative is None else [c, negative] for _, _, c in rows]
  return Behaviors(
      impression_ids=np.array([str(i) for i in range(len(rows))], object),
      user_ids=np.array([u for u, _, _ in rows], object),
      users=np.arange(1, len(rows) + 1, dtype=np.int32),
      history_offsets=offsets.astype(np.int64),
      history_items=np.array(sum(histories, []), np.int32),
      cand_offsets=np.arange(0, per_row * len(rows) + 1, per_row,
                             dtype=np.int64),
      cand_items=np.array(sum(cands, []), np.int32),
      cand_labels=np.array([1, 0][:per_row] * len(rows), np.int8))


TITLES = ["", "Dune", "Emma", "The Hobbit", "Beloved", "Ulysses",
          "Middlemarch", "Rebecca", "Persuasion", "Walden", "Lolita"]


def _items(titles):
  n = len(titles)
  return ItemTable(
      ids=np.array(["", *[f"B{i}" for i in range(1, n)]], object),
      text={"title": np.array(titles, object),
            "abstract": np.array([""] * n, object),
            "category": np.array(["", *["book"] * (n - 1)], object),
            "subcategory": np.array([""] * n, object)})


def tiny_dataset():
  """6 books, 4 users: U1 has 7 items (warm), U2 and U3 are cold, U4 empty.

  Every impression's click is B6, in no history (MIND-like: histories
  predate the impressions).
  """
  splits = {
      "train": _behaviors([("U1", [1, 2, 3]), ("U2", [4]), ("U4", [])]),
      "dev": _behaviors([("U1", [1, 2, 3, 4, 5, 1, 2]), ("U3", [2, 5])]),
      "test": _behaviors([("U2", [4, 1])]),
  }
  return Dataset(name="tiny", items=_items(TITLES[:7]),
                 user_vocab=np.array(["", "U1", "U2", "U3", "U4"], object),
                 splits=splits)


def leave_last_out_dataset(full):
  """The Goodreads protocol over user -> full history h of n items: train
  predicts h[t] from h[:t] (1 <= t <= n-3), dev h[n-2] from h[:n-2] (when
  non-empty), test h[n-1] from h[:n-1]; B10 is every row's negative."""
  rows = {"train": [], "dev": [], "test": []}
  for user, h in full.items():
    n = len(h)
    rows["train"] += [(user, h[:t], h[t]) for t in range(1, n - 2)]
    if n > 2:
      rows["dev"].append((user, h[:n - 2], h[n - 2]))
    rows["test"].append((user, h[:n - 1], h[n - 1]))
  return Dataset(name="goodreads_tiny", items=_items(TITLES),
                 user_vocab=np.array(["", *full], object),
                 splits={k: _behaviors(v, negative=10)
                         for k, v in rows.items()})


class ScriptedProvider(providers.Provider):
  """Answers like a well-behaved LLM would, and records every prompt."""

  def __init__(self):
    super().__init__()
    self.prompts = []

  def generate(self, prompts):
    self.prompts += prompts
    replies = []
    for prompt in prompts:
      scheme, _, subject = providers.split_key(prompt.key)
      if scheme == "summarizer":
        replies.append(f"[description] About {subject}.")
      elif scheme == "profiler":
        replies.append(json.dumps([f"likes {subject}", "classics"]))
      elif subject == "U3":
        replies.append('{"title": "Cut')  # A truncated reply.
      else:
        replies.append(json.dumps({"title": f"For {subject}",
                                   "description": "A book."}))
    return replies


def _rows(path):
  return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_user_histories_take_the_longest():
  dataset = tiny_dataset()
  histories = generate.longest_histories(dataset)
  assert histories == {"U1": [1, 2, 3, 4, 5, 1, 2], "U2": [4, 1], "U4": [],
                       "U3": [2, 5]}
  # Histories that predate the impressions (MIND) are shown whole.
  assert generate.user_histories(dataset) == histories


# Full histories: U1 warm (dev positive B6, test positive B7), U2 and U3 cold
# (U3 too short for a dev row).
_FULL = {"U1": [1, 2, 3, 4, 5, 6, 7], "U2": [3, 8, 2], "U3": [9, 4]}


def test_prompt_histories_hold_no_evaluation_click():
  dataset = leave_last_out_dataset(_FULL)
  histories = generate.user_histories(dataset)
  # h[:n-2] (the dev row's history); train positives (B2..B5 of U1) stay.
  assert histories == {"U1": [1, 2, 3, 4, 5], "U2": [3], "U3": [9]}
  for name in ("dev", "test"):
    b = dataset.splits[name]
    for m, user in enumerate(b.user_ids):
      cands = slice(b.cand_offsets[m], b.cand_offsets[m + 1])
      clicked = b.cand_items[cands][b.cand_labels[cands] == 1]
      assert not set(clicked.tolist()) & set(histories[user]), (name, user)


@pytest.mark.parametrize("scheme", ["profiler", "generator", "chain"])
def test_prompts_never_show_an_evaluation_positive(tmp_path, scheme):
  provider = ScriptedProvider()
  generate.run_generation(scheme, "book", provider,
                          leave_last_out_dataset(_FULL),
                          str(tmp_path / "out.jsonl"), cold_threshold=10)
  positives = {"U1": ["Middlemarch", "Rebecca"], "U2": ["Persuasion", "Emma"],
               "U3": ["Beloved"]}
  assert provider.prompts
  for prompt in provider.prompts:
    user = providers.split_key(prompt.key)[2]
    assert not [t for t in positives[user] if t in prompt.user], prompt
  assert "Ulysses" in provider.prompts[0].user  # U1's last train positive.


def test_goodreads_prompt_histories_are_the_dev_histories(goodreads_dir):
  dataset = mind.read_mind_dir(str(goodreads_dir))
  histories = generate.user_histories(dataset)
  for name in ("dev", "test"):
    b = dataset.splits[name]
    clicked_rows = np.repeat(np.arange(len(b)), b.num_candidates())
    clicked = b.cand_labels == 1
    leaks = sum(int(item) in histories[b.user_ids[m]]
                for m, item in zip(clicked_rows[clicked],
                                   b.cand_items[clicked]))
    assert leaks == 0, name
  dev = dataset.splits["dev"]
  assert all(histories[user] == dev.history_items[
      dev.history_offsets[m]:dev.history_offsets[m + 1]].tolist()
             for m, user in enumerate(dev.user_ids))


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_chunk_size_below_one_is_a_config_error(tmp_path, chunk_size):
  out = tmp_path / "summarizer.jsonl"
  with pytest.raises(ConfigError, match="chunk_size"):
    generate.run_generation("summarizer", "book", ScriptedProvider(),
                            tiny_dataset(), str(out), chunk_size=chunk_size)
  assert not out.exists()


def test_summarizer_writes_every_item(tmp_path):
  provider = ScriptedProvider()
  out = tmp_path / "summarizer.jsonl"
  summary = generate.run_generation("summarizer", "book", provider,
                                    tiny_dataset(), str(out), chunk_size=2)
  assert _rows(out) == [
      {"item_id": f"B{i}", "response": f"[description] About B{i}.",
       "status": "ok"} for i in range(1, 7)]
  assert summary["count"] == 6 and summary["statuses"] == {"ok": 6}
  assert "[title] The Hobbit" in provider.prompts[2].user
  assert provider.prompts[2].key == "summarizer:book:B3"
  assert not list(tmp_path.glob(".*tmp"))  # No temp file left behind.


def test_profiler_and_generator_pick_users(tmp_path):
  provider = ScriptedProvider()
  out = tmp_path / "profiler.jsonl"
  summary = generate.run_generation("profiler", "book", provider,
                                    tiny_dataset(), str(out))
  assert [r["user_id"] for r in _rows(out)] == ["U1", "U2", "U3"]
  assert summary["users_without_history"] == 1
  u1 = provider.prompts[0].user
  assert "1. Dune" in u1 and "7. Emma" in u1
  out = tmp_path / "generator.jsonl"
  summary = generate.run_generation("generator", "book", provider,
                                    tiny_dataset(), str(out),
                                    cold_threshold=5)
  rows = _rows(out)
  assert [(r["user_id"], r["status"]) for r in rows] == [
      ("U2", "ok"), ("U3", "truncated")]
  assert summary["statuses"] == {"ok": 1, "truncated": 1}
  assert summary["usable_rate"] == 0.5
  limited = generate.run_generation("generator", "book", provider,
                                    tiny_dataset(), str(out), limit=1)
  assert limited["count"] == 1 and len(_rows(out)) == 1


def test_chain_conditions_on_the_profile_and_replays(tmp_path):
  provider = ScriptedProvider()
  out = tmp_path / "chain.jsonl"
  summary = generate.run_generation("chain", "news", provider, tiny_dataset(),
                                    str(out))
  keys = [p.key for p in provider.prompts]
  assert keys == ["profiler:news:U2", "profiler:news:U3", "chain:news:U2",
                  "chain:news:U3"]
  # The news profiler wants a {"topics", "regions"} object: a list is not.
  assert summary["profiler"]["statuses"] == {"malformed": 2}
  assert "Profile:\n(none)" in provider.prompts[2].user
  assert (tmp_path / "chain.profiler.jsonl").is_file()
  # Replaying the written files reproduces the run without the LLM.
  replay = providers.get_provider(
      "replay", path=str(tmp_path), files={"profiler": "chain.profiler.jsonl"})
  again = generate.run_generation("chain", "news", replay, tiny_dataset(),
                                  str(tmp_path / "again.jsonl"))
  assert _rows(tmp_path / "again.jsonl") == _rows(out)
  assert again["provider_stats"] == {"served": 4}


def test_replay_of_missing_ids_marks_them_empty(tmp_path):
  (tmp_path / "summarizer.jsonl").write_text(
      '{"item_id": "B2", "response": "[description] Emma, a novel."}\n')
  replay = providers.get_provider("replay", path=str(tmp_path))
  out = tmp_path / "out.jsonl"
  summary = generate.run_generation("summarizer", "book", replay,
                                    tiny_dataset(), str(out))
  assert summary["statuses"] == {"ok": 1, "empty": 5}
  assert summary["provider_stats"] == {"served": 1, "missing": 5}
  assert _rows(out)[1] == {"item_id": "B2",
                           "response": "[description] Emma, a novel.",
                           "status": "ok"}


def test_provider_failure_leaves_the_output_untouched(tmp_path):
  out = tmp_path / "summarizer.jsonl"
  out.write_text("previous run\n")

  class Failing(providers.Provider):

    def generate(self, prompts):
      raise providers.ProviderError("down", [p.key for p in prompts])

  with pytest.raises(providers.ProviderError):
    generate.run_generation("summarizer", "book", Failing(), tiny_dataset(),
                            str(out))
  assert out.read_text() == "previous run\n"


def test_local_provider_end_to_end(tmp_path):
  model_dir = build_tiny_llama(tmp_path / "llama")
  provider = providers.get_provider("local", model_dir=str(model_dir),
                                    batch_size=2, max_new_tokens=6)
  out = tmp_path / "generator.jsonl"
  summary = generate.run_generation("generator", "book", provider,
                                    tiny_dataset(), str(out))
  rows = _rows(out)
  assert [r["user_id"] for r in rows] == ["U2", "U3"]
  assert all(r["response"] and r["status"] == Status.MALFORMED.value
             for r in rows)  # Random weights write no JSON.
  assert summary["provider_stats"]["generated_tokens"] == 12
  replay = providers.get_provider("replay", path=str(out))
  assert replay.generate([providers.Prompt("generator:book:U2", "", "")]) == [
      rows[0]["response"]]
