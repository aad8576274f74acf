"""Honest splits (config.data.validation, genre_jax/data/splits.py), the
unlabelled MIND-large test split and its leaderboard file (run.py
--mode=predict, genre_jax/predict.py)."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from genre_jax import config as config_lib
from genre_jax import predict as predict_lib
from genre_jax import train
from genre_jax.config import load_preset
from genre_jax.data import builders
from genre_jax.data import checks
from genre_jax.data import mind
from genre_jax.data import splits
from genre_jax.data import synthetic
from genre_jax.data import types
from genre_jax.errors import ConfigError, DataFormatError
from tests.helpers import ROOT, TINY_BEHAVIORS, TINY_NEWS, shrink, write_tsv

_LINE = re.compile(r"(\S+) \[(\d+(?:,\d+)*)\]")


def _config(data_dir, validation="dev", seed=0, **train_overrides):
  config = shrink(load_preset("nrms"), data_dir, **train_overrides)
  config.data.validation = validation
  config.data.split_seed = seed
  return config


@pytest.fixture(scope="module")
def raw(data_dir):
  """The tiny synthetic dataset as prepared: train, dev, test."""
  return builders.load_dataset(_config(data_dir).data)


def _split(raw, data_dir, validation, seed=0):
  return splits.apply_validation(raw, _config(data_dir, validation, seed).data)


def _keys(dataset, split) -> set[tuple[str, str]]:
  """(source split, impression id) of a split's rows: MIND impression ids
  are unique within one file only (train and test both count from 1)."""
  sources = dataset.info.get("validation", {}).get("sources", {})
  source = sources.get(split, split)
  return {(source, i) for i in dataset.splits[split].impression_ids}


def _row(b: types.Behaviors, m: int):
  h = b.history_items[b.history_offsets[m]:b.history_offsets[m + 1]]
  c = slice(b.cand_offsets[m], b.cand_offsets[m + 1])
  return (b.user_ids[m], int(b.users[m]), h.tolist(), b.cand_items[c].tolist(),
          b.cand_labels[c].tolist())


def _same_rows(part: types.Behaviors, whole: types.Behaviors) -> None:
  """Each row of `part` is the row of `whole` with its impression id."""
  where = {imp: m for m, imp in enumerate(whole.impression_ids)}
  for m, imp in enumerate(part.impression_ids):
    assert _row(part, m) == _row(whole, where[imp])


# --- The split function ------------------------------------------------------


def test_dev_leaves_the_dataset_as_it_is(raw, data_dir):
  assert _split(raw, data_dir, "dev") is raw
  assert list(raw.splits) == ["train", "dev", "test"]


def test_train_users_holds_out_whole_users(raw, data_dir):
  before = {s: b.impression_ids.copy() for s, b in raw.splits.items()}
  popularity = raw.items.popularity.copy()
  ds = _split(raw, data_dir, "train_users:0.2")
  assert list(ds.splits) == ["train", "valid", "dev", "test"]
  original, train_, valid = (raw.splits["train"], ds.splits["train"],
                             ds.splits["valid"])
  held = set(valid.user_ids)
  users = set(original.user_ids)
  assert len(held) == round(0.2 * len(users))
  assert ds.info["validation"]["held_out_users"] == len(held)
  # Every impression of a held-out user left train; the others stayed.
  assert not held & set(train_.user_ids)
  assert set(train_.user_ids) == users - held
  assert len(train_) + len(valid) == len(original)
  assert sorted([*train_.impression_ids, *valid.impression_ids]) == sorted(
      original.impression_ids)
  _same_rows(valid, original)
  _same_rows(train_, original)
  # Train candidate counts (popularity) are the new train's.
  assert ds.items.popularity.tolist() == np.bincount(
      train_.cand_items, minlength=len(ds.items.ids)).tolist()
  assert popularity.tolist() == np.bincount(
      original.cand_items, minlength=len(ds.items.ids)).tolist()
  # Validation and the reported test never share an impression.
  assert ds.info["validation"]["sources"]["valid"] == "train"
  assert not _keys(ds, "valid") & _keys(ds, "test")
  assert ds.splits["dev"] is raw.splits["dev"]
  assert ds.splits["test"] is raw.splits["test"]
  # Pure: the dataset passed in is as it was.
  assert {s: b.impression_ids.tolist() for s, b in raw.splits.items()} == {
      s: b.tolist() for s, b in before.items()}
  assert raw.items.popularity.tolist() == popularity.tolist()
  assert "validation" not in raw.info


def test_dev_half_makes_valid_and_test_from_dev(raw, data_dir, caplog):
  with caplog.at_level("WARNING"):
    ds = _split(raw, data_dir, "dev_half")
  assert "own test split" in caplog.text  # the real test is dropped, loudly
  assert list(ds.splits) == ["train", "valid", "test"]
  dev, valid, test = raw.splits["dev"], ds.splits["valid"], ds.splits["test"]
  assert len(valid) == len(dev) // 2 and len(valid) + len(test) == len(dev)
  assert not set(valid.impression_ids) & set(test.impression_ids)
  assert sorted([*valid.impression_ids, *test.impression_ids]) == sorted(
      dev.impression_ids)
  _same_rows(valid, dev)
  _same_rows(test, dev)
  assert ds.info["validation"]["sources"] == {
      "train": "train", "valid": "dev", "test": "dev"}
  assert ds.info["validation"]["dropped"] == ["test"]
  assert ds.splits["train"] is raw.splits["train"]
  assert ds.items is raw.items
  assert ds.info["read_stats"]["test"] == raw.info["read_stats"]["dev"]


@pytest.mark.parametrize("validation", ["train_users:0.3", "dev_half"])
def test_the_split_is_seeded(raw, data_dir, validation):
  def valid_ids(seed):
    return _split(raw, data_dir, validation, seed).splits[
        "valid"].impression_ids.tolist()

  assert valid_ids(0) == valid_ids(0)
  assert valid_ids(0) != valid_ids(1)


def test_applying_twice(raw, data_dir):
  ds = _split(raw, data_dir, "dev_half")
  assert _split(ds, data_dir, "dev_half") is ds
  for other, seed in (("dev_half", 1), ("dev", 0), ("train_users:0.2", 0)):
    with pytest.raises(ConfigError, match="already split with 'dev_half'"):
      _split(ds, data_dir, other, seed)


def test_take_rows_keeps_every_field():
  b = types.Behaviors(
      impression_ids=np.array(["a", "b", "c"], object),
      user_ids=np.array(["U1", "U2", "U1"], object),
      users=np.array([1, 2, 1], np.int32),
      history_offsets=np.array([0, 2, 2, 5]),
      history_items=np.array([1, 2, 3, 4, 5], np.int32),
      cand_offsets=np.array([0, 1, 3, 4]),
      cand_items=np.array([6, 7, 8, 9], np.int32),
      cand_labels=np.array([1, 0, 1, 1], np.int8),
      profiles=np.array([10, 0, 11], np.int32))
  part = splits.take_rows(b, np.array([2, 0]))
  assert part.impression_ids.tolist() == ["c", "a"]
  assert [_row(part, m) for m in range(2)] == [_row(b, 2), _row(b, 0)]
  assert part.profiles.tolist() == [11, 10]
  assert part.history_offsets.tolist() == [0, 3, 5]


# --- Config -------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "bogus", "train_users", "train_users:", "train_users:0", "train_users:1",
    "train_users:x", "train_users:nan", "dev_half:0.5", "Dev"])
def test_a_bad_validation_value_is_one_config_error(value):
  config = config_lib.base_config()
  config.data.validation = value
  with pytest.raises(ConfigError) as e:
    config_lib.validate(config)
  assert str(e.value) == (
      f"config.data.validation={value!r}: must be dev, dev_half or "
      "train_users:<share> with 0 < share < 1")


@pytest.mark.parametrize("validation, dev_split, words", [
    ("dev", "valid", "there is no valid split"),
    ("dev_half", "test", "test is held out"),
    ("train_users:0.1", "test", "test is held out"),
    ("dev", "dev", None), ("dev", "test", None), ("dev_half", "dev", None),
    ("dev_half", "valid", None), ("train_users:0.1", "valid", None),
])
def test_validation_and_dev_split_together(validation, dev_split, words):
  config = config_lib.base_config()
  config.data.validation, config.eval.dev_split = validation, dev_split
  if words is None:
    config_lib.validate(config)
    return
  with pytest.raises(ConfigError, match=words) as e:
    config_lib.validate(config)
  assert "config.eval.dev_split=" in str(e.value)
  assert f"config.data.validation='{validation}'" in str(e.value)


@pytest.mark.slow
def test_run_py_refuses_a_bad_validation_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, str(ROOT / "run.py"), "--config=configs/nrms.py",
       f"--workdir={tmp_path / 'run'}",
       f"--config.data.data_dir={tmp_path / 'data'}",
       "--config.data.validation=train_users:2"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert errors == ["error: config.data.validation='train_users:2': must be "
                    "dev, dev_half or train_users:<share> with 0 < share < 1"]
  assert not (tmp_path / "data").exists()


# --- Training selects on valid and reports the held-out test ------------------


@pytest.mark.slow
@pytest.mark.parametrize("validation", ["train_users:0.2", "dev_half"])
def test_selection_on_valid_and_the_held_out_test(raw, data_dir, tmp_path,
                                                  validation):
  config = _config(data_dir, validation, max_steps=2)
  workdir = tmp_path / "run"
  summary = train.train_and_evaluate(config, str(workdir))
  records = json.loads((workdir / "metrics.json").read_text())
  assert records and {r["split"] for r in records} == {"valid"}
  ds = _split(raw, data_dir, validation)
  assert summary["selected_on"] == "valid" and summary["held_out"] == "test"
  assert set(summary) & {"valid", "dev", "test"} == set(ds.splits) - {"train"}
  for split in ("valid", "test"):
    m = summary[split]["all"]
    assert m["num_impressions"] + m["num_skipped"] == len(ds.splits[split])
  assert not _keys(ds, "valid") & _keys(ds, "test")
  if validation == "dev_half":  # the test reported is the other dev half
    assert set(ds.splits["test"].impression_ids) < set(
        raw.splits["dev"].impression_ids)
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["selected_on"] == "valid" and final["held_out"] == "test"
  assert final["test"]["all"]["auc"] == pytest.approx(
      summary["test"]["all"]["auc"])


# --- MIND format: readers, splits, predict ------------------------------------


def _strip_labels(line: str) -> str:
  fields = line.split("\t")
  fields[4] = " ".join(t.rsplit("-", 1)[0] for t in fields[4].split())
  return "\t".join(fields)


def test_an_unlabelled_test_file_reads_without_labels(tmp_path):
  items = mind.read_news(write_tsv(tmp_path / "news.tsv", TINY_NEWS))
  rows = [r[:4] + [" ".join(t[:-2] for t in r[4].split())]
          for r in TINY_BEHAVIORS["train"]]
  path = write_tsv(tmp_path / "test.tsv", rows)
  b, stats = mind.read_behaviors(path, items.index(), {},
                                 allow_unlabelled=True)
  assert not b.is_labelled() and not stats.labelled
  assert (b.cand_labels == types.UNLABELLED).all()
  assert b.cand_items.tolist() == [3, 4, 5, 1, 3, 5, 4]
  assert stats.rows_without_click == 0
  with pytest.raises(DataFormatError, match="malformed token 'N3'"):
    mind.read_behaviors(path, items.index(), {})  # train and dev need labels
  mixed = write_tsv(tmp_path / "mixed.tsv", [rows[0], TINY_BEHAVIORS["dev"][0]])
  with pytest.raises(DataFormatError) as e:
    mind.read_behaviors(mixed, items.index(), {}, allow_unlabelled=True)
  assert (e.value.line, e.value.field) == (2, "impressions")
  assert "has a label, but the file's first row has none" in str(e.value)


def test_read_mind_dir_only_test_may_be_unlabelled(tmp_path, make_tiny_mind):
  root = pathlib.Path(make_tiny_mind(tmp_path / "ok"))
  path = root / "test" / "behaviors.tsv"
  path.write_text("".join(_strip_labels(line) + "\n" for line in
                          path.read_text().splitlines()))
  ds = mind.read_mind_dir(root)
  assert ds.splits["train"].is_labelled() and ds.splits["dev"].is_labelled()
  assert not ds.splits["test"].is_labelled()
  assert ds.info["read_stats"]["test"]["labelled"] is False
  with pytest.raises(ConfigError, match="has no labels"):
    checks.check_trainable(ds, "test")
  checks.check_trainable(ds, "dev")  # the unlabelled test is not scored
  with pytest.raises(ConfigError, match="unlabelled leaderboard test"):
    splits.apply_validation(ds, _config(tmp_path, "dev_half").data)
  bad = pathlib.Path(make_tiny_mind(tmp_path / "bad"))
  path = bad / "dev" / "behaviors.tsv"
  path.write_text("".join(_strip_labels(line) + "\n" for line in
                          path.read_text().splitlines()))
  with pytest.raises(DataFormatError, match="malformed token"):
    mind.read_mind_dir(bad)


def _mind_release(root: pathlib.Path, variant: str,
                  unlabelled_test: bool) -> pathlib.Path:
  """A MIND-format release (official layout, one folder per split) made of
  the tiny synthetic data; MINDlarge_test without labels when asked."""
  source = root / "source"
  synthetic.write_synthetic(str(source), num_users=150, num_items=200,
                            num_topics=4, seed=0)
  release = root / "release"
  for split in ("train", "dev") + (("test",) if unlabelled_test else ()):
    folder = release / f"MIND{variant}_{split}"
    folder.mkdir(parents=True)
    shutil.copy(source / "news.tsv", folder / "news.tsv")
    lines = (source / split / "behaviors.tsv").read_text().splitlines()
    if split == "test":
      lines = [_strip_labels(line) for line in lines]
    (folder / "behaviors.tsv").write_text("".join(l + "\n" for l in lines))
  return release


def _mind_config(data_dir, release, variant, validation, **train_overrides):
  config = _config(data_dir, validation, **train_overrides)
  config.data.name, config.data.variant = "mind", variant
  config.data.path = str(release)
  return config


@pytest.mark.slow
def test_mind_dev_half_run_selects_and_tests_on_other_impressions(tmp_path):
  release = _mind_release(tmp_path, "small", unlabelled_test=False)
  config = _mind_config(tmp_path / "data", release, "small", "dev_half",
                        max_steps=2)
  workdir = tmp_path / "run"
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary["selected_on"] == "valid" and summary["held_out"] == "test"
  assert "dev" not in summary and "note" not in summary
  records = json.loads((workdir / "metrics.json").read_text())
  assert {r["split"] for r in records} == {"valid"}
  _, dataset, _, _ = train.load_for_inference(str(workdir))
  valid, test = dataset.splits["valid"], dataset.splits["test"]
  dev_ids = [line.split("\t")[0] for line in (
      release / "MINDsmall_dev" / "behaviors.tsv").read_text().splitlines()]
  assert not set(valid.impression_ids) & set(test.impression_ids)
  assert sorted([*valid.impression_ids, *test.impression_ids]) == sorted(
      dev_ids)
  for split in ("valid", "test"):
    m = summary[split]["all"]
    assert m["num_impressions"] + m["num_skipped"] == len(
        dataset.splits[split])


@pytest.mark.slow
def test_mind_large_predict_writes_the_leaderboard_file(tmp_path):
  release = _mind_release(tmp_path, "large", unlabelled_test=True)
  config = _mind_config(tmp_path / "data", release, "large", "dev",
                        max_steps=2)
  workdir = tmp_path / "run"
  summary = train.train_and_evaluate(config, str(workdir))
  # MIND has no labelled test: dev selected the model and is all there is.
  assert "test" not in summary and "dev" in summary
  assert summary["held_out"] is None and "no held-out metrics" in summary[
      "note"]
  done = subprocess.run(
      [sys.executable, str(ROOT / "run.py"), "--mode=predict",
       f"--workdir={workdir}", "--split=test"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  out = workdir / "prediction"
  assert result["complete"] and not result["labelled"]
  text = (out / "prediction.txt").read_text()
  with zipfile.ZipFile(out / "prediction.zip") as zf:
    assert zf.namelist() == ["prediction.txt"]
    assert zf.read("prediction.txt").decode() == text
  file_rows = [line.split("\t") for line in (
      release / "MINDlarge_test" / "behaviors.tsv").read_text().splitlines()]
  _, dataset, evaluator, params = train.load_for_inference(str(workdir))
  scores, _, _ = evaluator.scores(params, dataset.splits["test"])
  _check_prediction(text, [r[0] for r in file_rows],
                    [len(r[4].split()) for r in file_rows], scores)
  assert result["impressions"] == len(file_rows)
  # No metric is ever computed on it.
  refused = subprocess.run(
      [sys.executable, str(ROOT / "run.py"), "--mode=eval",
       f"--workdir={workdir}", "--split=test"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert ("error: --split=test: the test split has no labels" in
          refused.stderr), refused.stderr[-3000:]


def _check_prediction(text: str, impression_ids, counts, scores) -> None:
  """prediction.txt: one `<id> [r1,...]` line per impression in order, r_i
  the rank of candidate i by score (numpy's argsort), ties in order."""
  lines = text.splitlines()
  assert text.endswith("\n") and len(lines) == len(impression_ids)
  for m, line in enumerate(lines):
    match = _LINE.fullmatch(line)
    assert match, line
    assert match.group(1) == impression_ids[m]
    ranks = np.array([int(r) for r in match.group(2).split(",")])
    assert len(ranks) == counts[m]
    order = np.argsort(-scores[m, :counts[m]], kind="stable")
    assert ranks[order].tolist() == list(range(1, counts[m] + 1))
    want = np.empty(counts[m], int)
    want[np.argsort(-scores[m, :counts[m]], kind="stable")] = np.arange(
        1, counts[m] + 1)
    assert ranks.tolist() == want.tolist()


def test_ranks_break_ties_by_candidate_order():
  assert predict_lib.candidate_ranks(
      np.array([0.1, 0.5, 0.5, -1.0, 0.5])).tolist() == [4, 1, 2, 5, 3]
  text = predict_lib.prediction_lines(
      ["7", "8"], np.array([[0.2, 0.9, 0.0], [1.0, 1.0, 0.0]]),
      np.array([3, 2]))
  assert text == "7 [2,1,3]\n8 [1,2]\n"


def test_predict_on_real_mind_rows(mind_sample_dir, tmp_path):
  """The real rows of the MIND sample: train, dev and a test split with its
  labels stripped, read by the MIND builder; an untrained model's ranks
  (no training on the sample) match the Evaluator's scores."""
  lines = (mind_sample_dir / "behaviors.tsv").read_text(
      encoding="utf-8").splitlines()
  parts = {"train": lines[:4000], "dev": lines[4000:4500],
           "test": [_strip_labels(line) for line in lines[4500:]]}
  release = tmp_path / "release"
  for split, rows in parts.items():
    folder = release / f"MINDdemo_{split}"
    folder.mkdir(parents=True)
    shutil.copy(mind_sample_dir / "news.tsv", folder / "news.tsv")
    (folder / "behaviors.tsv").write_text(
        "".join(line + "\n" for line in rows), encoding="utf-8")
  config = _mind_config(tmp_path / "data", release, "demo", "dev")
  dataset = builders.load_dataset(config.data)
  test = dataset.splits["test"]
  assert not test.is_labelled() and dataset.splits["dev"].is_labelled()
  # The rows and candidates the reader kept: those news.tsv knows, in order.
  known = set(dataset.items.ids[1:])
  kept = [(r[0], [i for i in r[4].split() if i in known])
          for r in (line.split("\t") for line in parts["test"])]
  kept = [(imp, cands) for imp, cands in kept if cands]
  assert test.impression_ids.tolist() == [imp for imp, _ in kept]
  assert [dataset.items.ids[i] for i in test.cand_items] == [
      i for _, cands in kept for i in cands]

  mesh = train.make_mesh()
  host_items, spec = train.model_inputs(config, dataset)
  parts_, state = train.init_model(config, spec, total_steps=1)
  items = jax.device_put(host_items,
                         jax.sharding.NamedSharding(mesh, train.P()))
  evaluator = train.Evaluator(config, parts_, items, mesh,
                              dataset.items.num_items)
  scores, _, _ = evaluator.scores(state["params"], test)
  out = tmp_path / "prediction"
  summary = predict_lib.write_predictions(
      str(out), "test", test, scores, dataset.info["read_stats"]["test"])
  _check_prediction((out / "prediction.txt").read_text(),
                    [imp for imp, _ in kept], [len(c) for _, c in kept],
                    scores)
  stats = dataset.info["read_stats"]["test"]
  assert summary["impressions"] == len(kept) == stats["rows_kept"]
  assert not summary["complete"]  # the sample's news.tsv lacks most ids
  assert summary["rows_dropped"] == stats["rows_dropped"] > 0
  assert summary["candidates_dropped"] == stats["candidate_ids_dropped"]
