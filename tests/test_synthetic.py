"""Tests for the synthetic MIND-format generator and its oracle."""

import datetime
import json
import os
import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from genre_jax.data import mind
from genre_jax.data import synthetic

SMALL = dict(num_users=150, num_items=300, num_topics=6)
_TIME = re.compile(r"^\d{1,2}/\d{1,2}/2019 \d{1,2}:\d\d:\d\d [AP]M$")
_WORD_TEXT = re.compile(r"^[a-z]+( [a-z]+)*$")


def _read_all(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def data():
  return synthetic.generate(num_users=600, num_items=800, num_topics=8,
                            seed=3)


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
  a = synthetic.write_synthetic(str(tmp_path / "a"), seed=1, **SMALL)
  b = synthetic.write_synthetic(str(tmp_path / "b"), seed=1, **SMALL)
  synthetic.write_synthetic(str(tmp_path / "c"), seed=2, **SMALL)
  files_a, files_b = _read_all(tmp_path / "a"), _read_all(tmp_path / "b")
  files_c = _read_all(tmp_path / "c")
  assert sorted(files_a) == sorted(
      ["news.tsv", "oracle.json", "train/behaviors.tsv", "dev/behaviors.tsv",
       "test/behaviors.tsv"])
  assert files_a == files_b
  assert a == b
  assert files_a["news.tsv"] != files_c["news.tsv"]
  assert files_a["train/behaviors.tsv"] != files_c["train/behaviors.tsv"]
  assert json.loads(files_a["oracle.json"]) == a


def test_files_parse_as_mind(tmp_path):
  root = tmp_path / "synth"
  synthetic.write_synthetic(str(root), seed=0, **SMALL)
  news = (root / "news.tsv").read_text().splitlines()
  assert len(news) == SMALL["num_items"]
  for k, line in enumerate(news):
    cols = line.split("\t")
    assert len(cols) == 8
    assert cols[0] == f"N{k + 1}"
    assert cols[1].isalpha() and cols[2].isalpha()
    assert _WORD_TEXT.match(cols[3]) and 6 <= len(cols[3].split()) <= 12
    assert _WORD_TEXT.match(cols[4]) and 15 <= len(cols[4].split()) <= 30
    assert cols[5:] == ["", "[]", "[]"]
  last_time = None
  for split in synthetic.SPLITS:
    lines = (root / split / "behaviors.tsv").read_text().splitlines()
    assert lines, split
    for m, line in enumerate(lines):
      imp_id, user, time, history, imps = line.split("\t")
      assert imp_id == str(m + 1)
      assert re.match(r"^U\d+$", user)
      assert _TIME.match(time), time
      assert all(re.match(r"^N\d+$", h) for h in history.split())
      pairs = [c.rsplit("-", 1) for c in imps.split()]
      assert 5 <= len(pairs) <= 20
      assert {label for _, label in pairs} <= {"0", "1"}
      assert sum(label == "1" for _, label in pairs) >= 1
    first = _parse_time(lines[0].split("\t")[2])
    assert last_time is None or first >= last_time  # train, dev, test by time
    last_time = _parse_time(lines[-1].split("\t")[2])
  ds = mind.read_mind_dir(str(root))
  assert ds.items.num_items == SMALL["num_items"]
  assert set(ds.splits) == set(synthetic.SPLITS)


def _parse_time(s):
  return datetime.datetime.strptime(s, "%m/%d/%Y %I:%M:%S %p")


def test_oracle_matches_sklearn_and_beats_random(data):
  result = synthetic.oracle(data, seed=3)
  for name in ("dev", "test"):  # sklearn is slow; train uses the same code.
    split = data.splits[name]
    aucs = [roc_auc_score(split.cand_labels[lo:hi], split.cand_scores[lo:hi])
            for lo, hi in zip(split.cand_offsets[:-1], split.cand_offsets[1:])
            if 0 < split.cand_labels[lo:hi].sum() < hi - lo]
    assert result[name]["auc"] == pytest.approx(np.mean(aucs), abs=1e-9)
  assert result["test"]["auc"] > 0.7
  assert result["test"]["auc"] < 0.95
  assert abs(result["random_auc"] - 0.5) < 0.03


def test_planted_scores_are_the_preference_model(data):
  # Within an impression the planted logit is pref . topics + quality up to
  # one positive scale: recover the scale from two items and check the rest.
  split = data.splits["train"]
  lo, hi = split.cand_offsets[0], split.cand_offsets[1]
  items = split.cand_items[lo:hi] - 1
  affinity = data.item_topics[items] @ data.user_prefs[split.users[0] - 1]
  residual = split.cand_scores[lo:hi] - data.quality[items]
  scale = np.polyfit(affinity, residual, 1)
  assert scale[0] > 0
  np.testing.assert_allclose(residual, scale[0] * affinity, atol=1e-9)


def test_histories_have_cold_users_and_grow_with_clicks(data):
  train = data.splits["train"]
  lengths = np.diff(train.history_offsets)
  assert lengths.min() >= 1
  assert np.mean(lengths <= 5) > 0.05
  assert lengths.max() > 20
  # A test impression's history holds all the user's train clicks.
  test = data.splits["test"]
  u = test.users[0]
  hist = set(test.history_items[test.history_offsets[0]:
                                test.history_offsets[1]])
  for m in np.nonzero(train.users == u)[0]:
    lo, hi = train.cand_offsets[m], train.cand_offsets[m + 1]
    clicked = train.cand_items[lo:hi][train.cand_labels[lo:hi] == 1]
    assert set(clicked) <= hist
    # Candidates are never already in the user's history.
    h = train.history_items[train.history_offsets[m]:train.history_offsets[m + 1]]
    assert not set(train.cand_items[lo:hi]) & set(h)


def test_some_impressions_have_two_clicks(data):
  train = data.splits["train"]
  clicks = np.add.reduceat(train.cand_labels.astype(int),
                           train.cand_offsets[:-1])
  assert clicks.min() >= 1
  assert 0.05 < np.mean(clicks > 1) < 0.5


def test_bad_sizes_raise():
  with pytest.raises(ValueError, match="num_items"):
    synthetic.generate(num_users=10, num_items=5, num_topics=3)


def test_topic_ceiling_is_the_preference_without_quality(data):
  # topic_auc scores candidates by pref . topics alone (the scale is positive
  # and shared within an impression, so it does not change the ranking).
  result = synthetic.oracle(data)
  split = data.splits["test"]
  users = np.repeat(split.users, np.diff(split.cand_offsets)) - 1
  affinity = np.einsum("nt,nt->n", data.item_topics[split.cand_items - 1],
                       data.user_prefs[users])
  aucs = [roc_auc_score(split.cand_labels[lo:hi], affinity[lo:hi])
          for lo, hi in zip(split.cand_offsets[:-1], split.cand_offsets[1:])
          if 0 < split.cand_labels[lo:hi].sum() < hi - lo]
  assert result["test"]["topic_auc"] == pytest.approx(np.mean(aucs), abs=1e-9)
  assert 0.55 < result["test"]["topic_auc"] < result["test"]["auc"]
