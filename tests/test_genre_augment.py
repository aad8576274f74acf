"""GENRE augmentation in the data layer: summaries, profiles, generated items.

Hand-made generation files beside a tiny MIND-format dataset exercise every
path through load_dataset, the batchers, the model and the evaluator; the
real Goodreads release is checked when ../shared/data is present.
"""

import json
import pathlib

import numpy as np
import pytest

from genre_jax import data as data_lib
from genre_jax import train
from genre_jax.data import batching
from genre_jax.data import genre_augment as augment
from genre_jax.config import load_preset
from tests.helpers import shrink


def _write_jsonl(path, rows):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def tiny_genre(tmp_path, make_tiny_mind):
  """The tiny dataset in the Goodreads layout, with a genre/ folder."""
  root = make_tiny_mind(tmp_path / "tiny")
  _write_jsonl(f"{root}/genre/summarizer.jsonl", [
      {"item_id": "N1", "response": "[description] first try"},
      {"item_id": "N1", "response": "[description] A golf comeback story."},
      {"item_id": "N2", "response": "[description] Election results."},
      {"item_id": "N3", "response": ""},  # broken: keeps its title
  ])
  _write_jsonl(f"{root}/genre/profiler.jsonl", [
      {"user_id": "U1", "response": ["golf", "tennis"]},
      {"user_id": "U2", "response": "not a list at all ["},  # truncated
  ])
  _write_jsonl(f"{root}/genre/generator_v1.jsonl", [
      {"user_id": "U2", "response": json.dumps(
          {"title": "Wimbledon diaries", "description": "Tennis memoir."})},
      {"user_id": "U3", "response": "{\"title\": \"cut off"},  # truncated
  ])
  return root


def _config(root, data_dir, **genre):
  config = load_preset("nrms")
  config.data.name = "goodreads_genre"
  config.data.path = str(root)
  config.data.data_dir = str(data_dir)
  config.data.history_len = 4
  config.data.num_negatives = 1
  for key, value in genre.items():
    config.data.genre[key] = value
  return config


def test_summaries_add_a_field_and_broken_replies_keep_the_title(
    tiny_genre, tmp_path):
  config = _config(tiny_genre, tmp_path / "d", summarizer="release")
  config.data.fields = ("title", "summary")
  dataset = data_lib.load_dataset(config.data)
  items = dataset.items
  row = items.index()
  assert items.text["summary"][row["N1"]] == "A golf comeback story."  # last
  assert items.text["summary"][row["N2"]] == "Election results."
  assert items.text["summary"][row["N3"]] == items.text["title"][row["N3"]]
  assert "summary" in items.tokens and items.masks["summary"][row["N1"]].any()
  report = dataset.info["genre"]["summarizer"]
  assert report["items_summarized"] == 2
  assert report["statuses"]["empty"] == 1


def test_summary_can_replace_the_title(tiny_genre, tmp_path):
  config = _config(tiny_genre, tmp_path / "d", summarizer="release",
                   summary_field="title")
  dataset = data_lib.load_dataset(config.data)
  row = dataset.items.index()
  assert dataset.items.text["title"][row["N2"]] == "Election results."
  assert dataset.items.text["title"][row["N4"]] == "Soup of the day"


def test_profiles_and_generated_items_are_synthetic_history_only(
    tiny_genre, tmp_path):
  config = _config(tiny_genre, tmp_path / "d", profiler="release",
                   generator=("release",))
  dataset = data_lib.load_dataset(config.data)
  items = dataset.items
  row = items.index()
  profile = row[augment.PROFILE_PREFIX + "U1"]
  generated = row[augment.GENERATED_PREFIX + "0:U2"]
  assert items.synthetic[profile] and items.synthetic[generated]
  assert items.text["title"][profile] == "golf, tennis"
  assert items.text["title"][generated] == "Wimbledon diaries"
  assert augment.PROFILE_PREFIX + "U2" not in row  # truncated reply: none
  assert augment.GENERATED_PREFIX + "0:U3" not in row
  train_split = dataset.splits["train"]
  # U1's rows point at U1's profile; U2 has none.
  for m, user in enumerate(train_split.user_ids):
    assert train_split.profiles[m] == (profile if user == "U1" else 0)
  # U2's generated item is the newest history item of each of its rows, and
  # does not count towards its history length.
  for split in dataset.splits.values():
    lengths = split.real_history_lengths(items.synthetic)
    for m, user in enumerate(split.user_ids):
      hist = split.history_items[split.history_offsets[m]:
                                 split.history_offsets[m + 1]]
      if user == "U2":
        assert hist[-1] == generated
        assert lengths[m] == len(hist) - 1
      else:
        assert generated not in hist
  # Synthetic items are never candidates or negatives.
  batcher = batching.TrainBatcher(train_split, items, batch_size=4,
                                  history_len=4, num_negatives=1, seed=0)
  for epoch in range(5):
    for batch in batcher.epoch(epoch):
      cands = batch["candidates"][batch["candidate_mask"]]
      assert not items.synthetic[cands].any()
      assert set(batch["profile"][batch["weights"] > 0]) <= {0, profile}


@pytest.mark.slow
def test_a_model_trains_and_evaluates_with_every_augmentation(
    tmp_path, make_tiny_mind):
  # A synthetic dataset big enough to train on, with GENRE files for it.
  base = shrink(load_preset("nrms"), tmp_path / "d")
  dataset = data_lib.load_dataset(base.data)
  root = pathlib.Path(dataset.info["source"])
  ids = [str(i) for i in dataset.items.ids[1:]]
  users = sorted({str(u) for s in dataset.splits.values() for u in s.user_ids})
  genre = tmp_path / "genre"
  _write_jsonl(genre / "summarizer.jsonl",
               [{"item_id": i, "response": f"[description] about {i}"}
                for i in ids[::2]])
  _write_jsonl(genre / "profiler.jsonl",
               [{"user_id": u, "response": ["alpha", "beta"]}
                for u in users[::3]])
  _write_jsonl(genre / "gen.jsonl", [
      {"user_id": u, "response": json.dumps({"title": f"book for {u}",
                                             "description": "x"})}
      for u in users])
  config = shrink(load_preset("nrms"), tmp_path / "d", max_steps=3)
  # Synthetic test histories are long: a threshold that makes some test
  # users cold, so that counting generated items would change who is.
  config.data.cold_threshold = 14
  config.data.fields = ("title", "summary")
  config.data.max_len.summary = 8
  config.data.genre.summarizer = str(genre / "summarizer.jsonl")
  config.data.genre.profiler = str(genre / "profiler.jsonl")
  config.data.genre.generator = (str(genre / "gen.jsonl"),)
  config.data.genre.domain = "book"
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["steps"] == 3
  assert np.isfinite(summary["test"]["all"]["auc"])
  # Cold users are counted on real history items only: exactly the scorable
  # (two-class) test impressions with at most cold_threshold real items,
  # some of which the generated item alone would have made warm.
  augmented = data_lib.load_dataset(config.data)
  test = augmented.splits["test"]
  real = test.real_history_lengths(augmented.items.synthetic)
  cold = real <= config.data.cold_threshold
  clicks = np.add.reduceat(test.cand_labels.astype(int), test.cand_offsets[:-1])
  scorable = (clicks > 0) & (clicks < test.num_candidates())
  assert summary["test"]["cold"]["num_impressions"] == (cold & scorable).sum()
  assert (cold & scorable & (test.history_lengths() >
                             config.data.cold_threshold)).any()
  assert root.is_dir()


def test_unknown_release_table_is_a_clear_error(tiny_genre, tmp_path):
  config = _config(tiny_genre, tmp_path / "d", summarizer="release:nope")
  with pytest.raises(Exception, match="no GENRE table 'nope'"):
    data_lib.load_dataset(config.data)


@pytest.mark.slow
def test_goodreads_release(goodreads_dir, goodreads_cache):
  config = _config(goodreads_dir, goodreads_cache, summarizer="release",
                   profiler="release", generator=("release",))
  config.data.fields = ("title", "summary")
  dataset = data_lib.load_dataset(config.data)
  report = dataset.info["genre"]
  assert report["summarizer"]["items"] == 16833
  assert report["summarizer"]["items_summarized"] > 16000
  assert report["profiler"]["users_profiled"] > 20000
  # The generator targets cold users (history of 5 or fewer).
  test = dataset.splits["test"]
  real = test.real_history_lengths(dataset.items.synthetic)
  with_generated = test.history_lengths() > real
  assert with_generated.any()
  assert (real[with_generated] <= 5).all()


def _history(split, m):
  return split.history_items[split.history_offsets[m]:
                             split.history_offsets[m + 1]]


def test_generated_items_join_cold_users_only(tiny_genre, tmp_path):
  # U1 is cold in train, warm (6 items) in test; U4 is warm everywhere. The
  # generations file covers all three users: only cold rows get the item.
  from tests.helpers import write_tsv  # pylint: disable=g-import-not-at-top
  from genre_jax.data import mind  # pylint: disable=g-import-not-at-top
  write_tsv(f"{tiny_genre}/test/behaviors.tsv", [
      ["6", "U1", "", "N1 N2 N3 N5 N4 N1", "N4-1 N2-0"],
      ["7", "U4", "", "N1 N2 N3 N4 N5 N2", "N2-1 N3-0"]])
  gen = tmp_path / "gen.jsonl"
  _write_jsonl(gen, [
      {"user_id": u, "response": json.dumps(
          {"title": f"book for {u}", "description": "x"})}
      for u in ("U1", "U2", "U4")])
  config = _config(tiny_genre, tmp_path / "d", generator=(str(gen),))
  assert config.data.cold_threshold == 5
  dataset = data_lib.load_dataset(config.data)
  row = dataset.items.index()
  generated = {u: row[f"{augment.GENERATED_PREFIX}0:{u}"]
               for u in ("U1", "U2", "U4")}
  for name, split in dataset.splits.items():
    real = split.real_history_lengths(dataset.items.synthetic)
    for m, user in enumerate(split.user_ids):
      hist = _history(split, m)
      if user not in generated:
        assert len(hist) == real[m]
      elif real[m] <= config.data.cold_threshold:
        assert hist[-1] == generated[user], (name, user)
        assert len(hist) == real[m] + 1
      else:
        assert len(hist) == real[m] == 6, (name, user)
        assert not dataset.items.synthetic[hist].any()
  assert dataset.info["genre"]["generator_cold"] == {
      "cold_threshold": 5, "users_extended": 2, "users_skipped_not_cold": 1,
      "users_partly_skipped": 1}
  # A behaviors file read later (--eval_file): the same rule, per row.
  path = write_tsv(tmp_path / "eval.tsv", [
      ["1", "U2", "", "N1 N2 N3 N4 N5 N1", "N2-1"],
      ["2", "U2", "", "N1", "N2-1"]])
  user_index = {u: i for i, u in enumerate(dataset.user_vocab) if i > 0}
  behaviors, _ = mind.read_behaviors(path, row, user_index)
  augment.extend_behaviors(behaviors, dataset)
  assert len(_history(behaviors, 0)) == 6
  assert _history(behaviors, 0)[-1] != generated["U2"]
  assert list(_history(behaviors, 1)) == [row["N1"], generated["U2"]]


def test_apply_user_extras_takes_the_cold_threshold(tiny_genre, tmp_path):
  dataset = data_lib.load_dataset(_config(tiny_genre, tmp_path / "d").data)
  train_split = dataset.splits["train"]  # U1: 2 and 3 items, U2: none
  before = train_split.history_lengths().copy()
  users = augment.apply_user_extras(train_split, {}, {"U1": [1], "U2": [2]},
                                    cold_threshold=2)
  after = train_split.history_lengths()
  np.testing.assert_array_equal(after - before, [1, 1, 0])
  assert users == {"extended": {"U1", "U2"}, "skipped": {"U1"}}
