"""Tests of the GENRE generation driver on a tiny hand-made dataset, with a
scripted provider, the replay provider and the local Llama provider."""

import json

import numpy as np
import pytest

from genre_jax.data.types import Behaviors, Dataset, ItemTable
from genre_jax.genre import generate
from genre_jax.genre import providers
from genre_jax.genre.parsing import Status

from tests.test_genre_providers import build_tiny_llama


def _behaviors(rows):
  """Behaviors from (user id, history item rows) pairs, one candidate each."""
  histories = [h for _, h in rows]
  offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
  return Behaviors(
      impression_ids=np.array([str(i) for i in range(len(rows))], object),
      user_ids=np.array([u for u, _ in rows], object),
      users=np.arange(1, len(rows) + 1, dtype=np.int32),
      history_offsets=offsets.astype(np.int64),
      history_items=np.array(sum(histories, []), np.int32),
      cand_offsets=np.arange(len(rows) + 1, dtype=np.int64),
      cand_items=np.ones(len(rows), np.int32),
      cand_labels=np.ones(len(rows), np.int8))


def tiny_dataset():
  """5 books, 4 users: U1 has 7 items (warm), U2 and U3 are cold, U4 empty."""
  titles = ["", "Dune", "Emma", "The Hobbit", "Beloved", "Ulysses"]
  n = len(titles)
  items = ItemTable(
      ids=np.array(["", "B1", "B2", "B3", "B4", "B5"], object),
      text={"title": np.array(titles, object),
            "abstract": np.array([""] * n, object),
            "category": np.array(["", *["book"] * (n - 1)], object),
            "subcategory": np.array([""] * n, object)})
  splits = {
      "train": _behaviors([("U1", [1, 2, 3]), ("U2", [4]), ("U4", [])]),
      "dev": _behaviors([("U1", [1, 2, 3, 4, 5, 1, 2]), ("U3", [2, 5])]),
      "test": _behaviors([("U2", [4, 1])]),
  }
  return Dataset(name="tiny", items=items,
                 user_vocab=np.array(["", "U1", "U2", "U3", "U4"], object),
                 splits=splits)


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
  histories = generate.user_histories(tiny_dataset())
  assert histories == {"U1": [1, 2, 3, 4, 5, 1, 2], "U2": [4, 1], "U4": [],
                       "U3": [2, 5]}


def test_summarizer_writes_every_item(tmp_path):
  provider = ScriptedProvider()
  out = tmp_path / "summarizer.jsonl"
  summary = generate.run_generation("summarizer", "book", provider,
                                    tiny_dataset(), str(out), chunk_size=2)
  assert _rows(out) == [
      {"item_id": f"B{i}", "response": f"[description] About B{i}.",
       "status": "ok"} for i in range(1, 6)]
  assert summary["count"] == 5 and summary["statuses"] == {"ok": 5}
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
  assert summary["statuses"] == {"ok": 1, "empty": 4}
  assert summary["provider_stats"] == {"served": 1, "missing": 4}
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
