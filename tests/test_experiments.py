"""The experiment scripts run and end with their line of JSON.

Each script is run as a user would, in a subprocess, at the smallest
settings it offers; the figures themselves are checked for sanity only
(speed is measured by the scripts, never asserted in tests).
"""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

from absl import flags
import numpy as np
import pytest

from tests.helpers import LIST_IMPORTS, imported_modules

# Every test here runs a script or run.py end to end: the full suite's.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args, timeout=900):
  result = subprocess.run([sys.executable, str(ROOT / "experiments" / script),
                           *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) >= 2, "a readable table must come before the JSON"
  return _strict_json(lines[-1]), result.stdout


def _strict_json(line: str):
  """json.loads that rejects NaN and Infinity, as JSON parsers do."""

  def reject(constant):
    raise AssertionError(f"{constant} in the JSON line (not JSON): {line}")

  return json.loads(line, parse_constant=reject)



@pytest.mark.parametrize("script, args, expected", [
    ("benchmark.py", ["--smoke", "--presets=no_such_preset"],
     "error: no preset "),
    ("benchmark.py", ["--smoke", "--set=train.batchsize=8"],
     "error: config override 'train.batchsize=8': no field"),
    ("benchmark.py", ["--smoke", "--only_row=1"],
     "error: --only_row=1: the plan has 1 rows"),
    ("init_scale.py", ["--presets=no_such_preset"], "error: no preset "),
    ("goodreads_baselines.py", ["--data_dir=DATA", "--presets=nrms",
                                "--set=model.no_such_field=1"],
     "error: config override 'model.no_such_field=1': no field"),
    ("bench_input.py", ["--data_dir=MISSING"],
     "error: MIND data folder MISSING does not exist"),
    ("bench_mlm.py", ["--set=pretrain.mask_rate=0.0"],
     "error: config.pretrain.mask_rate=0.0: must be a finite number > 0 "
     "and <= 1"),
    ("lm_parity.py", ["--lm_path=MISSING"],
     "error: MISSING/config.json: no config.json"),
    ("benchmark.py", ["--anchor", "--smoke", "--anchor_results=MISSING"],
     "error: --anchor_results=MISSING: cannot read it"),
    # Flags renamed to their one meaning (experiments/common_flags.py).
    ("goodreads_baselines.py", ["--data_cache=DATA"],
     "error: --data_cache is now --cache_dir"),
    ("init_scale.py", ["--data_path=DATA"],
     "error: --data_path is now --data_dir"),
    ("benchmark.py", ["--smoke", "--no_such_flag"],
     "error: Unknown command line flag 'no_such_flag'"),
    ("benchmark.py", ["--anchor", "--anchor_models=nrms,dien"],
     "error: --anchor_models=nrms,dien: choose from nrms,bert_full,"
     "bert_last1"),
    ("benchmark.py", ["--smoke", "--pack_ablation", "--presets=nrms"],
     "error: --pack_ablation: nrms encode items without an LM"),
])
def test_bad_input_to_a_script_is_one_line(script, args, expected, tmp_path):
  # A typo in a preset, an override or a path: one line, exit status 2, no
  # traceback, and nothing measured or trained first (a benchmark used to
  # report such a preset as "skipped" and exit 0).
  missing = str(tmp_path / "missing")
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "news.tsv").write_text("")
  result = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / script),
       *(a.replace("MISSING", missing).replace("DATA", str(tmp_path / "data"))
         for a in args),
       f"--workdir_root={tmp_path}/runs" if script.startswith("goodreads")
       else "--verbosity=0"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-3000:])
  assert expected.replace("MISSING", missing) in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "runs").exists()

def test_bench_lm_cache_is_exact(tmp_path):
  figures, _ = _run("bench_lm_cache.py", f"--cache_dir={tmp_path}",
                    "--steps=3", "--batch_size=4", "--history_len=3",
                    "--max_len=12", "--set=data.synthetic.num_users=100",
                    "--set=data.synthetic.num_items=300",
                    "--set=data.history_len=2")
  # A --set of a shape the flags also set wins, as for every other field
  # (the batches used to keep the flag's history length, silently).
  assert figures["history_len"] == 2
  assert figures["cached_samples_per_s"] > 0
  assert figures["uncached_samples_per_s"] > 0
  assert figures["max_loss_diff"] < 1e-4  # the cache changes nothing


def test_bench_mlm_logits_at_masked_slots_change_no_loss(tmp_path):
  import torch
  import transformers

  from genre_jax.lm import hf

  # A tiny random BERT with a masked-LM head and MiniLM's tokenizer.
  torch.manual_seed(0)
  transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=30522, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=64,
      max_position_embeddings=64)).save_pretrained(tmp_path)
  os.symlink(os.path.join(hf.model_dir(), hf.TOKENIZER_FILE),
             tmp_path / hf.TOKENIZER_FILE)
  figures, table = _run("bench_mlm.py", "--steps=2", "--batch_size=4",
                        "--max_len=20", f"--set=model.lm.path={tmp_path}")
  assert figures["masked_slots"] == 3  # ceil(0.15 * 20)
  assert figures["max_loss_diff"] < 1e-4
  full, gathered = figures["rows"]
  assert (full["logits_at"], gathered["logits_at"]) == ("all positions",
                                                        "masked slots")
  # XLA counts the decoder's matmuls at 3 of 20 positions, not 20.
  assert gathered["gflops"] < full["gflops"]
  assert "speed-up" in table


def test_bench_input(goodreads_dir):
  figures, _ = _run("bench_input.py", f"--data_dir={goodreads_dir}")
  assert figures["num_items"] == 16833
  assert (figures["num_train"], figures["num_dev"], figures["num_test"]) == (
      101001, 19967, 20365)
  assert figures["samples_per_s"] > 0


def test_goodreads_baselines_runs(goodreads_dir, goodreads_cache, tmp_path):
  figures, table = _run(
      "goodreads_baselines.py", f"--data_dir={goodreads_dir}",
      "--presets=nrms", f"--workdir_root={tmp_path}/runs",
      f"--cache_dir={goodreads_cache}", "--set=train.max_steps=2",
      "--set=model.embed_dim=32", "--set=model.hidden_dim=32",
      "--set=model.num_heads=2")
  result = figures["nrms"]
  assert set(result["test"]) >= {"auc", "mrr", "ndcg5", "ndcg10",
                                 "num_impressions"}
  assert result["test"]["num_impressions"] == 20365
  assert 0.0 < result["test_cold"]["auc"] < 1.0
  assert pathlib.Path(result["workdir"], "config.json").is_file()
  assert "nrms" in table


def test_lm_parity_on_the_default_minilm():
  figures, _ = _run("lm_parity.py", "--num_titles=8")
  assert figures["kind"] == "bert"
  assert figures["max_abs_diff"] <= 1e-4


def test_genre_goodreads_quick_grid_runs(goodreads_dir, goodreads_cache,
                                        tmp_path):
  figures, table = _run(
      "genre_goodreads.py", f"--data_dir={goodreads_dir}", "--quick",
      f"--workdir_root={tmp_path}/runs", f"--out_dir={tmp_path}/out",
      f"--cache_dir={goodreads_cache}", "--set=train.max_steps=2",
      "--set=model.embed_dim=32", "--set=model.hidden_dim=32",
      "--set=model.num_heads=2")
  cells = {(c["model"], c["variant"]): c for c in figures["cells"]}
  assert set(cells) == {("nrms", "original"), ("nrms", "summarizer")}
  # Gains pair the runs by seed.
  gain = figures["gains"]["nrms"]["summarizer"]
  assert gain["seeds"] == [0]
  for key in ("auc", "cold_auc"):
    assert gain[key] == pytest.approx(
        cells[("nrms", "summarizer")]["per_seed"]["0"][key] -
        cells[("nrms", "original")]["per_seed"]["0"][key], abs=2e-5)
  assert (tmp_path / "out" / "results_quick.md").is_file()
  # One seed measures no spread: the JSON says null, the table shows none.
  assert cells[("nrms", "original")]["test"]["auc"][1] is None
  rows = [line for line in table.splitlines() if line.startswith("| nrms |")]
  assert len(rows) == 2 and not any("±" in row for row in rows)
  summ_row = next(row for row in rows if row.startswith("| nrms | summarizer |"))
  assert summ_row.rstrip(" |").endswith(
      f"{gain['auc']:+.4f} (cold {gain['cold_auc']:+.4f}; seeds 0)")

  # --finished_only reads the same runs back and trains nothing; a grid
  # with no finished run is an error, not an empty table.
  common = (f"--data_dir={goodreads_dir}", f"--cache_dir={goodreads_cache}",
            "--set=train.max_steps=2", "--set=model.embed_dim=32",
            "--set=model.hidden_dim=32", "--set=model.num_heads=2")
  again, _ = _run("genre_goodreads.py", "--quick", "--finished_only",
                  f"--workdir_root={tmp_path}/runs",
                  f"--out_dir={tmp_path}/again", *common)
  assert again["cells"] == figures["cells"]
  assert again["gains_over"] == {}

  # --gains_over adds a table of changes over a further variant.
  over, over_table = _run(
      "genre_goodreads.py", "--quick", "--finished_only",
      "--gains_over=original,summarizer", f"--workdir_root={tmp_path}/runs",
      f"--out_dir={tmp_path}/over", *common)
  assert over["gains"] == figures["gains"]
  back = over["gains_over"]["summarizer"]["nrms"]["original"]
  assert back["seeds"] == [0]
  assert back["auc"] == pytest.approx(-gain["auc"], abs=2e-5)
  assert back["per_seed_cold_auc"] == [back["cold_auc"]]
  assert "change over `summarizer`" in over_table
  assert f"| nrms | original | 0 | {back['auc']:+.4f} |" in over_table
  unknown = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "genre_goodreads.py"),
       "--quick", "--finished_only", "--gains_over=profiler",
       f"--workdir_root={tmp_path}/runs", f"--out_dir={tmp_path}/over", *common],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert unknown.returncode != 0
  assert "--gains_over=profiler: compare with variants of this grid" in (
      unknown.stderr)

  def finished_only(runs: str, out: str,
                    env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "genre_goodreads.py"),
         "--quick", "--finished_only", f"--workdir_root={tmp_path}/{runs}",
         f"--out_dir={tmp_path}/{out}", *common],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)

  empty = finished_only("none", "none_out")
  assert empty.returncode != 0
  assert "no finished run" in empty.stderr
  assert not (tmp_path / "none").exists()

  # Each finished run left a record (config, final metrics) in
  # --out_dir/run_metrics that stands in for its workdir: with the workdirs
  # gone, the table is the same and nothing is trained.
  records = sorted((tmp_path / "out" / "run_metrics").glob("*.json"))
  assert [r.stem.rsplit("-", 1)[0] for r in records] == [
      "nrms-original-s0", "nrms-summarizer-s0"]
  for record in records:
    saved = json.loads(record.read_text())
    assert saved["final_metrics"] == json.loads(
        (tmp_path / "runs" / record.stem / "final_metrics.json").read_text())
    # Records are committed to results folders: no machine's folders (where
    # the data and the prepared cache lay) in them.
    assert not {"path", "data_dir"} & set(saved["config"]["data"])
    assert str(tmp_path) not in record.read_text()
  recorded = finished_only("gone", "out", env=LIST_IMPORTS)
  assert recorded.returncode == 0, recorded.stderr[-2000:]
  assert json.loads(recorded.stdout.strip().splitlines()[-1])["cells"] == (
      figures["cells"])
  assert not (tmp_path / "gone").exists()
  # Tabulating trains nothing, so it loads no JAX (seconds to import).
  assert not imported_modules(recorded.stderr) & {"jax", "flax", "orbax"}
  # A grid run into an out_dir holding records of runs outside it tabulates
  # those too (read back, never trained), so a grid of one new cell adds to
  # results.md/json instead of replacing them; records of other settings
  # (another --set digest) are not this grid's and are left alone.
  more = tmp_path / "more" / "run_metrics"
  more.mkdir(parents=True)
  for record in records:
    (more / record.name).write_text(record.read_text())
  seed1 = json.loads(records[1].read_text())
  seed1["config"]["train"]["seed"] = 1
  seed1_record = more / records[1].name.replace("-s0-", "-s1-")
  seed1_record.write_text(json.dumps(seed1))
  (more / "nrms-original-s3-0123abcd.json").write_text("not read")
  extended = finished_only("gone", "more")
  assert extended.returncode == 0, extended.stderr[-2000:]
  assert "with 1 more finished runs recorded in --out_dir" in extended.stdout
  written = json.loads((tmp_path / "more" / "results_quick.json").read_text())
  assert written == json.loads(extended.stdout.strip().splitlines()[-1])
  by_variant = {c["variant"]: c for c in written["cells"]}
  assert by_variant["original"]["seeds"] == [0]
  assert by_variant["summarizer"]["seeds"] == [0, 1]
  assert by_variant["summarizer"]["per_seed"]["1"] == (
      by_variant["summarizer"]["per_seed"]["0"])
  assert written["gains"]["nrms"]["summarizer"]["seeds"] == [0]
  # A record that is not the run its name says is an error naming it.
  seed1["config"]["train"]["seed"] = 2
  seed1_record.write_text(json.dumps(seed1))
  misnamed = finished_only("gone", "more")
  assert misnamed.returncode != 0
  assert f"{seed1_record}: this holds a run with another config" in (
      misnamed.stderr)
  assert "train.seed: 2 there, 1 now" in misnamed.stderr
  # A record of another config, or an unreadable one, is an error naming
  # its file, never read as this run.
  summ_record = records[1]
  good = summ_record.read_text()
  saved = json.loads(good)
  saved["config"]["data"]["max_len"]["title"] = 7
  summ_record.write_text(json.dumps(saved))
  other = finished_only("gone", "out")
  assert other.returncode != 0
  assert f"{summ_record}: this holds a run with another config" in other.stderr
  assert "data.max_len.title: 7 there, 32 now" in other.stderr
  summ_record.write_text('{\n  "run": \n')
  broken = finished_only("gone", "out")
  assert broken.returncode != 0
  assert f"{summ_record}:3: not valid JSON" in broken.stderr
  assert "Traceback" not in broken.stderr
  saved = json.loads(good)
  del saved["final_metrics"]["test"]["cold"]["auc"]
  summ_record.write_text(json.dumps(saved))
  partial = finished_only("gone", "out")
  assert partial.returncode != 0
  assert "final_metrics.test.cold.auc is missing" in partial.stderr
  saved = json.loads(good)
  saved["final_metrics"]["test"] = []
  summ_record.write_text(json.dumps(saved))
  wrong = finished_only("gone", "out")
  assert wrong.returncode != 0
  assert "final_metrics.test.all.auc is missing" in wrong.stderr
  assert "Traceback" not in wrong.stderr
  summ_record.write_text(good)

  # A run made before a config key existed is still this run when the key
  # now holds its default (the behaviour the run had)...
  [summ_dir] = (tmp_path / "runs").glob("nrms-summarizer-s0-*")
  saved = json.loads((summ_dir / "config.json").read_text())
  del saved["model"]["scaled_dot"]
  (summ_dir / "config.json").write_text(json.dumps(saved))
  older = finished_only("runs", "older_out")
  assert older.returncode == 0, older.stderr[-2000:]
  assert json.loads(older.stdout.strip().splitlines()[-1])["cells"] == (
      figures["cells"])
  # ... while a run that set the key otherwise is not.
  saved["model"]["scaled_dot"] = True
  (summ_dir / "config.json").write_text(json.dumps(saved))
  flipped = finished_only("runs", "flipped_out")
  assert flipped.returncode != 0
  assert "model.scaled_dot: True there, False now" in flipped.stderr

  # A workdir trained with another config (e.g. by an older version of the
  # script) is an error naming the differing field, never read as this run.
  del saved["model"]["scaled_dot"]
  saved["data"]["max_len"]["title"] = 7
  (summ_dir / "config.json").write_text(json.dumps(saved))
  stale = finished_only("runs", "stale_out")
  assert stale.returncode != 0
  assert "another config" in stale.stderr
  assert "data.max_len.title: 7 there, 32 now" in stale.stderr

  # An unreadable config.json names its file and line, with no traceback.
  (summ_dir / "config.json").write_text('{\n  "data": \n')
  broken = finished_only("runs", "broken_out")
  assert broken.returncode != 0
  assert f"{summ_dir / 'config.json'}:" in broken.stderr
  assert "Traceback" not in broken.stderr


def test_init_scale_compares_scalings(tmp_path):
  figures, table = _run(
      "init_scale.py", "--presets=nrms,fastformer", "--compare_scaling",
      "--batches=1", f"--cache_dir={tmp_path}",
      "--set=data.synthetic.num_users=100",
      "--set=data.synthetic.num_items=300")
  assert "score std" in table
  rows = {(r["preset"], r["scaled_dot"]): r for r in figures["rows"]}
  assert set(rows) == {(p, s) for p in ("nrms", "fastformer")
                       for s in (False, True)}
  for preset in ("nrms", "fastformer"):
    plain, scaled = rows[preset, False], rows[preset, True]
    # Same weights and batch: only the scores change, by exactly 1/sqrt(256).
    assert plain["item_norm"] == pytest.approx(scaled["item_norm"])
    assert scaled["score_std"] == pytest.approx(plain["score_std"] / 16,
                                                rel=1e-3)
  # The unscaled Fastformer starts far from a uniform softmax; NRMS does not.
  fast = rows["fastformer", False]
  assert fast["loss"] > fast["uniform_loss"] + 1.0
  assert rows["nrms", False]["loss"] == pytest.approx(
      rows["nrms", False]["uniform_loss"], abs=0.05)
  assert rows["fastformer", True]["loss"] < fast["loss"]


def test_genre_goodreads_summary_length_override_reaches_the_title(
    monkeypatch):
  # With summaries in place of titles the title field is cut at
  # data.max_len.summary, also when an override sets that length.
  # The scripts import common_flags from their own folder, which Python
  # puts on sys.path only for `python experiments/x.py`.
  monkeypatch.syspath_prepend(str(ROOT / "experiments"))
  spec = importlib.util.spec_from_file_location(
      "genre_goodreads", ROOT / "experiments" / "genre_goodreads.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  try:
    flags.FLAGS(["genre_goodreads.py", "--workdir_root=/nonexistent",
                 "--set=data.max_len.summary=64"])
    summarized = script.variant_config("nrms", "summarizer", 0)
    assert summarized.data.max_len.title == 64
    assert summarized.data.genre.summary_field == "title"
    original = script.variant_config("nrms", "original", 0)
    assert original.data.max_len.title == 16  # the Goodreads titles' own
  finally:
    flags.FLAGS.unparse_flags()


def test_genre_goodreads_never_drops_a_tabulated_run(tmp_path):
  # A results file tabulating runs this invocation can neither read back
  # nor train (e.g. a grid made before run records existed) is refused
  # before any training, and left as it was.
  out = tmp_path / "out"
  out.mkdir()
  old = {"cells": [
      {"model": "nrms", "variant": "original", "n_seeds": 2, "seeds": [0, 5]},
      {"model": "naml", "variant": "all", "n_seeds": 1,
       "per_seed": {"1": {"auc": 0.7, "cold_auc": 0.7}}}],
         "gains": {}, "quick": False, "overrides": []}
  results = out / "results.json"
  results.write_text(json.dumps(old))

  def tabulate(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "genre_goodreads.py"),
         "--finished_only", f"--workdir_root={tmp_path}/runs",
         f"--out_dir={out}", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=300)

  dropped = tabulate("--models=nrms", "--variants=original", "--seeds=0")
  assert dropped.returncode != 0
  assert (f"{results} tabulates runs that this table would drop "
          "(nrms/original seeds 5; naml/all seeds 1)") in dropped.stderr
  assert "Traceback" not in dropped.stderr
  # Runs made with other overrides are another grid, not these.
  results.write_text(json.dumps(old | {"overrides": ["train.epochs=1"]}))
  other = tabulate("--models=nrms", "--variants=original", "--seeds=0,5",
                   "--set=train.epochs=2")
  assert other.returncode != 0
  assert ("made with the overrides train.epochs=1, not train.epochs=2"
          in other.stderr)
  assert json.loads(results.read_text())["overrides"] == ["train.epochs=1"]
  # A grid that covers every tabulated run gets past the check (and, having
  # no finished run here, stops at that).
  results.write_text(json.dumps(old))
  covered = tabulate("--models=nrms,naml", "--variants=original,all",
                     "--seeds=0,1,5")
  assert covered.returncode != 0
  assert "no finished run" in covered.stderr
  assert json.loads(results.read_text()) == old
  # A results file it cannot read is named, never overwritten.
  results.write_text(json.dumps({"cells": [{"variant": "all"}]}))
  unreadable = tabulate("--models=nrms", "--variants=original", "--seeds=0")
  assert unreadable.returncode != 0
  assert f"{results}: cannot read the results it holds (KeyError" in (
      unreadable.stderr)
  assert "Traceback" not in unreadable.stderr


def test_genre_goodreads_interrupted_grid_keeps_its_finished_runs(
    goodreads_dir, goodreads_cache, tmp_path):
  # The table is rewritten after every trained run: a grid that stops on a
  # later run (here the profiler's replies are missing) leaves a table of
  # the runs it finished, marked in progress, and the same grid resumes.
  data = tmp_path / "goodreads"
  (data / "genre").mkdir(parents=True)
  for entry in goodreads_dir.iterdir():
    if entry.name != "genre":
      (data / entry.name).symlink_to(entry)
  out = tmp_path / "out"
  args = [sys.executable, str(ROOT / "experiments" / "genre_goodreads.py"),
          f"--data_dir={data}", "--models=nrms",
          "--variants=original,profiler", "--seeds=0",
          f"--workdir_root={tmp_path}/runs", f"--out_dir={out}",
          f"--cache_dir={goodreads_cache}", "--set=train.max_steps=2",
          "--set=model.embed_dim=32", "--set=model.hidden_dim=32",
          "--set=model.num_heads=2"]
  stopped = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                           timeout=900)
  assert stopped.returncode != 0
  assert "carries no GENRE table 'profiler'" in stopped.stderr
  assert "Traceback" not in stopped.stderr
  partial = json.loads((out / "results.json").read_text())
  assert [(c["variant"], c["seeds"]) for c in partial["cells"]] == [
      ("original", [0])]
  assert partial["grid_complete"] is False
  assert "in progress: 1 of 2 grid runs finished" in (
      out / "results.md").read_text()

  # With the replies back, the same command trains only the missing run.
  (data / "genre" / "profiler.jsonl").symlink_to(
      goodreads_dir / "genre" / "profiler.jsonl")
  resumed = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                           timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert resumed.stderr.count("Training nrms on") == 1
  final = json.loads(resumed.stdout.strip().splitlines()[-1])
  assert final["grid_complete"] is True
  assert [c["variant"] for c in final["cells"]] == ["original", "profiler"]
  assert final["cells"][:1] == partial["cells"]
  assert json.loads((out / "results.json").read_text()) == final
  assert "in progress" not in (out / "results.md").read_text()


def test_cooccurrence_matches_a_brute_force_reference(tmp_path):
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  item_ids = [f"B{i}" for i in range(40)]
  write_tsv(tmp_path / "news.tsv",
            [[i, "book", "", f"title {i}", "", "", "[]", "[]"]
             for i in item_ids])
  rows = {"train": [], "test": []}
  for split, count in (("train", 300), ("test", 60)):
    for m in range(count):
      user = f"U{rng.integers(25)}"
      # Users like items near their own number: co-occurrence is informative.
      own = int(user[1:])
      picks = rng.choice(40, size=7, replace=False, p=_near(own))
      history = " ".join(item_ids[k] for k in picks[:rng.integers(0, 5)])
      cands = [f"{item_ids[picks[5]]}-1"] + [
          f"{item_ids[k]}-0" for k in rng.choice(40, 3, replace=False)
          if k != picks[5]]
      rows[split].append([str(m), user, "", history, " ".join(cands)])
  for split, split_rows in rows.items():
    write_tsv(tmp_path / split / "behaviors.tsv", split_rows)

  figures, table = _run("goodreads_cooccurrence.py", f"--data_dir={tmp_path}",
                        "--splits=test", "--cold_threshold=2")
  assert "cooccurrence" in table and "popularity" in table

  # The reference: sets of users per item, sklearn's AUC per impression.
  owners: dict[str, set[str]] = {}
  shown: dict[str, int] = {}
  for _, user, _, history, cands in rows["train"]:
    for item in history.split() + [c[:-2] for c in cands.split()
                                   if c.endswith("-1")]:
      owners.setdefault(item, set()).add(user)
    for c in cands.split():
      shown[c[:-2]] = shown.get(c[:-2], 0) + 1

  def cooc(h, c):
    if h == c:
      return 0.0
    a, b = owners.get(h, set()), owners.get(c, set())
    return len(a & b) / max(len(a) * len(b), 1) ** 0.5

  expected = {"cooccurrence": ([], []), "popularity": ([], [])}
  for _, _, _, history, cands in rows["test"]:
    history = history.split()
    labels = [int(c[-1]) for c in cands.split()]
    items = [c[:-2] for c in cands.split()]
    for name, scores in (
        ("cooccurrence", [sum(cooc(h, c) for h in history) for c in items]),
        ("popularity", [shown.get(c, 0) for c in items])):
      auc = roc_auc_score(labels, scores)
      expected[name][0].append(auc)
      if len(history) <= 2:
        expected[name][1].append(auc)
  for name, (all_aucs, cold_aucs) in expected.items():
    got = figures[name]["test"]
    assert got["all"]["auc"] == pytest.approx(np.mean(all_aucs), abs=1e-9)
    assert got["cold"]["auc"] == pytest.approx(np.mean(cold_aucs), abs=1e-9)
    assert got["all"]["num_impressions"] == 60
  # Planted taste: co-occurrence ranks better than chance; popularity is
  # what it is, but both read the same impressions.
  assert figures["cooccurrence"]["test"]["all"]["auc"] > 0.6

  # Any metrics: the same scores, the columns asked for.
  chosen, table = _run("goodreads_cooccurrence.py", f"--data_dir={tmp_path}",
                       "--splits=test", "--cold_threshold=2",
                       "--metrics=auc,gauc,hit@1")
  got = chosen["cooccurrence"]["test"]["all"]
  assert got["auc"] == figures["cooccurrence"]["test"]["all"]["auc"]
  assert {"gauc", "hit@1"} <= set(got) and "mrr" not in got
  assert "hit@1" in table.splitlines()[1] and "mrr" not in table


def write_tsv(path: pathlib.Path, rows: list[list[str]]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


def _near(center: int) -> np.ndarray:
  """Item probabilities peaked around item `center` (of 40)."""
  weights = np.exp(-0.5 * ((np.arange(40) - center) / 3.0) ** 2) + 0.01
  return weights / weights.sum()


def test_baselines_with_permuted_titles(tmp_path, make_tiny_mind):
  source = pathlib.Path(make_tiny_mind(tmp_path / "release"))
  figures, table = _run(
      "goodreads_baselines.py", f"--data_dir={source}", "--presets=nrms",
      "--permute_titles", "--seed=3", f"--workdir_root={tmp_path}/runs",
      f"--cache_dir={tmp_path}/cache", "--set=train.max_steps=1",
      "--set=model.embed_dim=16", "--set=data.num_negatives=1", "--set=model.hidden_dim=16",
      "--set=model.num_heads=2")
  assert "titles permuted among the books" in table
  assert figures["nrms"]["test"]["num_impressions"] == 1
  copy = tmp_path / "runs" / "permuted_titles_data_s3"
  before = [line.split("\t") for line in
            (source / "news.tsv").read_text(encoding="utf-8").splitlines()]
  after = [line.split("\t") for line in
           (copy / "news.tsv").read_text(encoding="utf-8").splitlines()]
  # Every column but the title is the item's own; the titles are the same
  # multiset, moved between items (seeded: a second call changes nothing).
  assert [r[:3] + r[4:] for r in after] == [r[:3] + r[4:] for r in before]
  assert sorted(r[3] for r in after) == sorted(r[3] for r in before)
  assert [r[3] for r in after] != [r[3] for r in before]
  for split in ("train", "dev", "test"):
    assert (copy / split / "behaviors.tsv").read_text() == (
        source / split / "behaviors.tsv").read_text()
  mtime = (copy / "news.tsv").stat().st_mtime_ns
  again, _ = _run(
      "goodreads_baselines.py", f"--data_dir={source}", "--presets=nrms",
      "--permute_titles", "--seed=3", f"--workdir_root={tmp_path}/runs",
      f"--cache_dir={tmp_path}/cache", "--set=train.max_steps=1",
      "--set=model.embed_dim=16", "--set=data.num_negatives=1", "--set=model.hidden_dim=16",
      "--set=model.num_heads=2")
  assert (copy / "news.tsv").stat().st_mtime_ns == mtime
  assert again["nrms"]["test"] == figures["nrms"]["test"]
  # Bad settings are a one-line error naming the preset, not a traceback.
  bad = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "goodreads_baselines.py"),
       f"--data_dir={source}", "--presets=nrms", "--permute_titles",
       "--seed=3", f"--workdir_root={tmp_path}/bad_runs",
       f"--cache_dir={tmp_path}/cache", "--set=train.max_steps=1"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert bad.returncode != 0
  assert "nrms: cannot find 4 distinct eligible negatives" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_content_similarity_matches_sklearn_and_transformers(tmp_path):
  """TF-IDF against scikit-learn's, MiniLM against transformers' BertModel,
  both mean-pooled into users and scored by inner product; AUC by sklearn."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from sklearn.feature_extraction.text import TfidfVectorizer  # pylint: disable=g-import-not-at-top
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  from genre_jax.data import tokenize as tokenize_lib  # pylint: disable=g-import-not-at-top
  from genre_jax.lm import hf  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  words = ("dragon wizard castle quest sword magic murder detective clue "
           "crime police alibi love wedding heart romance kiss letters "
           "river winter garden city island war song ghost").split()

  def text(topic, n):  # words mostly from the topic's eight, some from any
    return " ".join(rng.choice(words[8 * topic:8 * topic + 8]) if
                    rng.random() < 0.6 else rng.choice(words)
                    for _ in range(n))

  books = [(f"B{i}", i % 3) for i in range(45)]
  write_tsv(tmp_path / "news.tsv",
            [[b, "book", "", text(t, 2), "", "", "[]", "[]"]
             for b, t in books])
  summaries = {b: text(t, 6) for b, t in books}
  (tmp_path / "genre").mkdir()
  (tmp_path / "genre" / "summarizer.jsonl").write_text("".join(
      json.dumps({"item_id": b, "response": f"[description] {s}"}) + "\n"
      for b, s in summaries.items()))
  rows = []
  for m in range(120):
    own = [b for b, t in books if t == m % 3]
    history = list(rng.choice(own, rng.integers(1, 8), replace=False))
    pos = rng.choice([b for b in own if b not in history])
    negs = rng.choice([b for b, _ in books if b not in history and b != pos],
                      4, replace=False)
    cands = [f"{pos}-1"] + [f"{b}-0" for b in negs]
    rows.append([str(m), f"U{m}", "", " ".join(history), " ".join(cands)])
  for split in ("train", "dev", "test"):
    write_tsv(tmp_path / split / "behaviors.tsv", rows)

  figures, table = _run("goodreads_content_similarity.py",
                        f"--data_dir={tmp_path}",
                        f"--cache_dir={tmp_path / 'cache'}", "--splits=test")
  assert "tfidf" in table and "summary (32)" in table

  news = [line.split("\t") for line in
          (tmp_path / "news.tsv").read_text().splitlines()]
  titles = {r[0]: r[3] for r in news}
  path = hf.model_dir()
  tokenizer = tokenize_lib.load_tokenizer(path)
  tokenizer.no_padding()
  tokenizer.no_truncation()
  model = transformers.BertModel.from_pretrained(path).eval()

  def pieces(text):
    return tokenizer.encode(text, add_special_tokens=False).tokens

  def minilm(texts):
    batch = transformers.AutoTokenizer.from_pretrained(path)(
        texts, padding=True, return_tensors="pt")
    with torch.no_grad():
      hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"][..., None].float()
    mean = (hidden * weights).sum(1) / weights.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()

  ids = [b for b, _ in books]
  for text_name, text in (("title", titles), ("summary", summaries)):
    corpus = [text[b] for b in ids]
    vectors = {
        "tfidf": TfidfVectorizer(analyzer=pieces, smooth_idf=False)
                 .fit_transform(corpus).toarray(),
        "minilm": minilm(corpus)}
    for scorer, matrix in vectors.items():
      row_of = {b: matrix[i] for i, b in enumerate(ids)}
      aucs = []
      for _, _, _, history, cands in rows:
        user = np.mean([row_of[h] for h in history.split()], 0)
        labels = [int(c[-1]) for c in cands.split()]
        scores = [user @ row_of[c[:-2]] for c in cands.split()]
        aucs.append(roc_auc_score(labels, scores))
      got = figures[scorer][text_name]["test"]["all"]
      assert got["num_impressions"] == 120
      assert got["auc"] == pytest.approx(np.mean(aucs), abs=1e-6), (
          scorer, text_name)
  # Planted: summaries carry six words of the book's topic, titles two.
  assert (figures["tfidf"]["summary"]["test"]["all"]["auc"]
          > figures["tfidf"]["title"]["test"]["all"]["auc"])


def _write_leak_release(tmp_path):
  """A tiny release: five users; generated titles copy the test click (U0,
  U1), the book before it (U2), nothing (U3), or are unreadable (U4)."""
  books = {f"B{i}": f"Book  {i}" for i in range(12)}
  write_tsv(tmp_path / "news.tsv",
            [[i, "book", "", t, "", "", "[]", "[]"] for i, t in books.items()])
  sequences = {"U0": ["B0", "B1", "B2"], "U1": ["B3", "B4"],
               "U2": ["B5", "B6", "B7"], "U3": ["B8", "B9"],
               "U4": ["B10", "B11"]}
  rows = []
  for n, (user, seq) in enumerate(sequences.items()):
    negative = "B11" if seq[-1] != "B11" else "B0"
    rows.append([str(n), user, "", " ".join(seq[:-1]),
                 f"{negative}-0 {seq[-1]}-1"])
  write_tsv(tmp_path / "test" / "behaviors.tsv", rows)
  write_tsv(tmp_path / "train" / "behaviors.tsv", rows[:1])
  replies = {"U0": "book 2", "U1": " BOOK 4 ", "U2": "Book 6", "U3": "Other"}
  lines = [json.dumps({"user_id": u, "response": json.dumps(
      {"title": t, "description": "d"})}) for u, t in replies.items()]
  lines.append(json.dumps({"user_id": "U4", "response": "no json here"}))
  (tmp_path / "genre").mkdir()
  (tmp_path / "genre" / "generator_v1.jsonl").write_text(
      "\n".join(lines) + "\n", encoding="utf-8")


def test_release_leak_counts_copied_titles(tmp_path):
  _write_leak_release(tmp_path)
  figures, table = _run("genre_release_leak.py", f"--data_dir={tmp_path}",
                        "--positions=3")
  assert "test click" in table and "3rd last" in table
  got = figures["generator_v1.jsonl"]
  assert got["users"] == 4
  assert got["positions"]["1"] == {"matches": 2, "users": 4, "rate": 0.5}
  assert got["positions"]["2"] == {"matches": 1, "users": 4, "rate": 0.25}
  assert got["positions"]["3"] == {"matches": 0, "users": 2, "rate": 0.0}
  # Chance pairs each title with another user's test click: U0's "book 2"
  # and U1's "book 4" can each match at most once, and never their own.
  assert got["chance"]["users"] <= 4
  assert got["chance"]["matches"] <= 2


def test_release_leak_on_the_goodreads_release(goodreads_dir):
  figures, _ = _run("genre_release_leak.py", f"--data_dir={goodreads_dir}")
  assert set(figures) == {"generator_v1.jsonl", "generator_v2.jsonl"}
  for result in figures.values():
    assert result["users"] > 1000
    assert set(result["positions"]) == {"1", "2", "3", "4", "5"}


def test_release_leak_position_without_users_is_null_not_nan(tmp_path):
  # No sequence has 4 books: that rate is undefined, written as null (a NaN
  # made the JSON line unreadable); a split the data lacks is one line.
  _write_leak_release(tmp_path)
  figures, table = _run("genre_release_leak.py", f"--data_dir={tmp_path}",
                        "--positions=4")
  assert figures["generator_v1.jsonl"]["positions"]["4"] == {
      "matches": 0, "users": 0, "rate": None}
  assert "0/0 (-)" in table
  bad = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "genre_release_leak.py"),
       f"--data_dir={tmp_path}", "--split=bogus"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert f"error: --split=bogus: {tmp_path} has no such split" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_cooccurrence_without_cold_users_ends_with_strict_json(
    tmp_path, make_tiny_mind):
  # No user has a history of at most -1 items: the cold metrics are
  # undefined and must come out as null, never as NaN.
  source = make_tiny_mind(tmp_path / "data")
  figures, _ = _run("goodreads_cooccurrence.py", f"--data_dir={source}",
                    "--cold_threshold=-1")
  cold = figures["cooccurrence"]["test"]["cold"]
  assert cold["num_impressions"] == 0 and cold["auc"] is None


@pytest.mark.parametrize("script, flag", [
    ("benchmark.py", "--steps=0"),     # was a StatisticsError traceback
    ("benchmark.py", "--group=0"),     # was a ZeroDivisionError traceback
    ("lm_parity.py", "--num_titles=0"),  # read every title of news.tsv
    ("init_scale.py", "--batches=0"),  # every figure NaN
    ("goodreads_content_similarity.py", "--batch_size=0"),  # range() error
])
def test_a_count_below_one_is_a_one_line_error(script, flag):
  result = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / script), flag],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert f"error: {flag}: must be >= " in result.stderr
  assert "Traceback" not in result.stderr


def test_benchmark_smoke_rows_in_their_own_processes_and_mfu_per_device():
  # Two rows: each is measured in a child process (JAX cannot reset the
  # allocator's peak, so rows sharing one would report the largest so far).
  # On two devices the analytic FLOPs are the global batch's, the matmul
  # rate one device's: MFU divides by the device count (it used to report
  # the global FLOPs against one device, twice the true MFU).
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=2"}
  result = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "benchmark.py"),
       "--presets=nrms,naml", "--smoke"],
      capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = _strict_json(result.stdout.strip().splitlines()[-1])
  assert figures["num_devices"] == 2 and figures["matmul_flops_per_s"] > 0
  assert figures["rows_in_child_processes"]
  nrms, naml = figures["rows"]
  assert (nrms["label"], naml["label"]) == ("nrms smoke", "naml smoke")
  for row in (nrms, naml):
    assert row["samples_per_s"] > 0 and row["step_ms"] > 0
    assert row["items_encoded_per_s"] > 0
    assert row["impressions_scored_per_s"] > 0
  assert "samples/s" in result.stdout and "naml smoke" in result.stdout
  # Each row against its own process's matmul rate.
  assert nrms["flops_per_step_analytic"] > 0
  assert nrms["mfu"] == pytest.approx(
      nrms["flops_per_step_analytic"] / 2 / (nrms["step_ms"] / 1e3) /
      nrms["matmul_flops_per_s"])


def test_benchmark_pack_ablation_times_padded_then_packed_rows():
  # The same preset and batches, tuned LM layers on padded rows and then on
  # packed ones: the speed claim for model.lm.pack comes from this script.
  result = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "benchmark.py"),
       "--presets=once_nrms", "--smoke", "--pack_ablation", "--eval=False"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = _strict_json(result.stdout.strip().splitlines()[-1])
  padded, packed = figures["rows"]
  assert (padded["label"], packed["label"]) == (
      "once_nrms smoke padded", "once_nrms smoke packed")
  assert (padded["lm_pack"], packed["lm_pack"]) == (False, True)
  for row in (padded, packed):
    assert row["samples_per_s"] > 0 and np.isfinite(row["final_loss"])
  assert "once_nrms smoke packed" in result.stdout


def test_benchmark_anchor_side_by_side_at_smoke_size(tmp_path):
  # `--anchor` runs the in-repo PyTorch anchor on the configs of its rows,
  # then our rows, and puts both in one table with the ratio ours / anchor;
  # --anchor_results reads a saved anchor.json instead of running it.
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  args = [sys.executable, str(ROOT / "experiments" / "benchmark.py"),
          "--anchor", "--smoke", "--anchor_models=nrms", "--noeval"]
  result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = _strict_json(result.stdout.strip().splitlines()[-1])
  [row] = figures["rows"]
  assert (row["label"], row["batch"], row["history"], row["title_len"]) == (
      "NRMS b2", 2, 50, 30)  # the anchor's --smoke shapes
  assert figures["anchor"]["source"] == os.path.join(
      "third_party", "torch_anchor", "torch_anchor.py")
  assert figures["anchor"]["device"] == "cpu"
  [anchor] = figures["anchor"]["results"]
  assert (anchor["model"], anchor["batch"], anchor["mode"]) == (
      "nrms", 2, "eager")
  [side] = figures["comparison"]
  assert side["anchor_config"] == "nrms_b2"
  assert side["anchor_samples_per_s"]["eager"] == anchor["samples_per_s"] > 0
  assert side["ratio"]["eager"] == pytest.approx(
      row["samples_per_s"] / anchor["samples_per_s"])
  table = result.stdout[:result.stdout.rindex("\n{")]
  assert "ours beside the PyTorch anchor's" in table
  assert "anchor eager" in table and "ours/eager" in table
  assert f"{side['ratio']['eager']:.2f}x" in table
  assert "Traceback" not in result.stderr

  saved = tmp_path / "anchor.json"
  saved.write_text(json.dumps({"env": {"torch": "2.13.0"}, "results": [
      {"model": "nrms", "batch": 2, "mode": "eager", "samples_per_s": 4.0},
      {"model": "nrms", "batch": 2, "mode": "compile",
       "error": "skipped: time budget (500s)"}]}))
  reused = subprocess.run(args + [f"--anchor_results={saved}"],
                          capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=env)
  assert reused.returncode == 0, reused.stderr[-3000:]
  again = _strict_json(reused.stdout.strip().splitlines()[-1])
  assert "running the PyTorch anchor" not in reused.stderr
  [side] = again["comparison"]
  assert side["ratio"] == {"eager": pytest.approx(
      again["rows"][0]["samples_per_s"] / 4.0)}
  assert side["anchor_samples_per_s"] == {"eager": 4.0, "compile": None}
  assert "failed" in reused.stdout  # the compile config that did not run


def test_no_experiment_script_edits_sys_path():
  # The package is installed (pip install -e .): scripts import it as any
  # user code does, and their shared flags from common_flags beside them.
  edit = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*\+?=")
  for script in sorted((ROOT / "experiments").glob("*.py")):
    assert not edit.search(script.read_text()), script.name


def test_permuted_titles_copy_of_another_dataset_is_an_error(
    tmp_path, make_tiny_mind):
  # The copy under --workdir_root is named by seed only: a second dataset
  # with the same root and seed used to get the first one's copy (and its
  # finished runs), silently.
  first = make_tiny_mind(tmp_path / "first")
  second = make_tiny_mind(tmp_path / "second")
  target = tmp_path / "runs" / "permuted_titles_data_s0"
  script = (
      "import importlib.util, os, sys\n"
      "sys.path.insert(0, os.path.dirname(sys.argv[1]))  # common_flags\n"
      "spec = importlib.util.spec_from_file_location('gb', sys.argv[1])\n"
      "gb = importlib.util.module_from_spec(spec)\n"
      "spec.loader.exec_module(gb)\n"
      "from absl import app\n"
      "assert gb.permuted_titles_copy(sys.argv[2], sys.argv[4], 0) == "
      "sys.argv[4]\n"
      "assert gb.permuted_titles_copy(sys.argv[2], sys.argv[4], 0) == "
      "sys.argv[4]\n"
      "try:\n"
      "  gb.permuted_titles_copy(sys.argv[3], sys.argv[4], 0)\n"
      "except app.UsageError as e:\n"
      "  print(e)\n")
  result = subprocess.run(
      [sys.executable, "-c", script,
       str(ROOT / "experiments" / "goodreads_baselines.py"), str(first),
       str(second), str(target)],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert ("holds titles permuted from another dataset (its 'train' is not "
          f"{second}/train); use another --workdir_root") in result.stdout


@pytest.mark.slow  # about 30 s: three tiny models, two greedy decodes, MiniLM
def test_lm_parity_checks_every_family_on_tiny_random_models():
  # Each family named is written as a tiny random model (every weight, bias
  # and norm drawn), its every layer compared with transformers on right-
  # and left-padded batches, and the causal ones' greedy KV-cache decoding
  # token for token; the real MiniLM comparison is a row of its own.
  figures, table = _run("lm_parity.py", "--families=bert,qwen3,opt",
                        "--num_titles=4")
  diffs = figures["families"]
  assert {"bert", "qwen3", "opt", "minilm (real)"} <= set(diffs)
  for name, diff in diffs.items():
    assert diff <= 1e-4, (name, diff)
  assert figures["greedy_match"] == {"qwen3": True, "opt": True}
  assert figures["layers"] == {"bert": 2, "qwen3": 2, "opt": 2}
  assert all(len(states) == 3 for row in figures["per_layer"].values()
             for states in row.values())  # embeddings + 2 layers, each pad
  assert figures["failed"] == []
  assert "minilm (real)" in table


# sweep.py at its smallest: the synthetic data, two steps a run.
_SWEEP_TINY = ("--set=train.max_steps=2", "--set=data.synthetic.num_users=200",
               "--set=data.synthetic.num_items=300", "--set=model.embed_dim=32",
               "--set=model.hidden_dim=32", "--set=model.num_heads=2")


@pytest.mark.slow  # 90 s on a busy 2-core CPU: eight tiny runs, then re-reads
def test_sweep_tabulates_pairs_gains_by_seed_and_never_retrains(tmp_path):
  import statistics  # pylint: disable=g-import-not-at-top

  runs = tmp_path / "runs"
  grid = ["--presets=nrms,naml", "--seeds=0,1", f"--workdir_root={runs}",
          f"--cache_dir={tmp_path}/cache", *_SWEEP_TINY]
  args = [*grid, "--grid=plain=;short=data.max_len.title=8",
          "--baseline=plain", "--metrics=auc,mrr,cold_auc"]
  figures, table = _run("sweep.py", *args)
  cells = {c["cell"]: c for c in figures["cells"]}
  assert list(cells) == ["nrms/plain", "nrms/short", "naml/plain",
                         "naml/short"]
  assert figures["grid_complete"] is True
  assert json.loads((runs / "results.json").read_text()) == figures
  assert (runs / "results.md").read_text() in table

  # One record a run, <preset>-<set>-s<seed>-<digest of --set>, with no
  # machine path, holding the workdir's final metrics.
  final = {}
  for path in sorted((runs / "run_metrics").glob("*.json")):
    text = path.read_text()
    assert str(tmp_path) not in text
    record = json.loads(text)
    assert not {"path", "data_dir"} & set(record["config"]["data"])
    assert record["final_metrics"] == json.loads(
        (runs / path.stem / "final_metrics.json").read_text())
    final[path.stem.rsplit("-", 1)[0]] = record["final_metrics"]
  assert sorted(final) == sorted(f"{p}-{s}-s{seed}" for p in ("nrms", "naml")
                                 for s in ("plain", "short") for seed in (0, 1))

  def auc(preset, set_name, seed):
    return final[f"{preset}-{set_name}-s{seed}"]["test"]["all"]["auc"]

  # Mean ± sample sd over the seeds, in the JSON and the table.
  for name, cell in cells.items():
    values = [auc(*name.split("/"), seed) for seed in (0, 1)]
    assert cell["seeds"] == [0, 1]
    mean, sd = cell["metrics"]["auc"]
    assert (mean, sd) == pytest.approx(
        (statistics.fmean(values), statistics.stdev(values)), abs=1e-5)
    assert f"| {name} | 2 | {mean:.4f} ± {sd:.4f} |" in table
  # A gain over the baseline is the mean of the per-seed differences.
  assert set(figures["gains"]["plain"]) == {"nrms/short", "naml/short"}
  for preset in ("nrms", "naml"):
    gain = figures["gains"]["plain"][f"{preset}/short"]
    diffs = [auc(preset, "short", s) - auc(preset, "plain", s) for s in (0, 1)]
    assert gain["over"] == f"{preset}/plain"
    assert gain["seeds"] == [0, 1]
    assert gain["per_seed_auc"] == pytest.approx(diffs, abs=2e-5)
    assert gain["auc"] == pytest.approx(statistics.fmean(diffs), abs=2e-5)
    assert f"| {preset}/short | {preset}/plain | 0,1 | {gain['auc']:+.4f} (" in (
        table)
    assert f"| {gain['auc']:+.4f} (seeds 0,1) |" in table

  # The same command again reads every run back: nothing trained, no JAX
  # loaded, every checkpoint file as it was.
  def checkpoint_files():
    return {p: (p.stat().st_mtime_ns, p.stat().st_size)
            for p in runs.glob("*/checkpoints/**/*") if p.is_file()}

  before = checkpoint_files()
  assert before
  again = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "sweep.py"), *args],
      capture_output=True, text=True, cwd=ROOT, timeout=300, env=LIST_IMPORTS)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Training" not in again.stderr
  assert not imported_modules(again.stderr) & {"jax", "flax", "orbax"}
  assert _strict_json(again.stdout.strip().splitlines()[-1])["cells"] == (
      figures["cells"])
  assert checkpoint_files() == before

  # A grid-spec module gives the same grid; a flag replaces its value, and a
  # cell (preset/set) as the baseline compares every cell with that one.
  spec = tmp_path / "grid_spec.py"
  spec.write_text(
      "GRID = {'presets': ['nrms', 'naml'],\n"
      "        'overrides': {'plain': [], 'short': ['data.max_len.title=8']},\n"
      "        'seeds': [0, 1], 'metrics': ['auc'],\n"
      "        'baselines': ['nrms/plain']}\n")
  by_spec, _ = _run("sweep.py", f"--spec={spec}", "--seeds=1",
                    "--finished_only", f"--workdir_root={tmp_path}/gone",
                    f"--out_dir={runs}", *_SWEEP_TINY)
  assert [(c["cell"], c["seeds"]) for c in by_spec["cells"]] == [
      (name, [1]) for name in cells]
  over_nrms = by_spec["gains"]["nrms/plain"]
  assert set(over_nrms) == {"nrms/short", "naml/plain", "naml/short"}
  assert over_nrms["naml/plain"]["per_seed_auc"] == pytest.approx(
      [auc("naml", "plain", 1) - auc("nrms", "plain", 1)], abs=2e-5)
  assert not (tmp_path / "gone").exists()

  # A set redefined under the same name finds workdirs of another config:
  # one error line, before anything is trained.
  other = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "sweep.py"), *grid,
       "--grid=plain=;short=data.max_len.title=6", "--verbosity=-1"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert other.returncode == 2
  [line] = other.stderr.strip().splitlines()
  assert line.startswith(f"error: {runs}/nrms-short-s0-")
  assert ("this holds a run with another config (data.max_len.title: 8 "
          "there, 6 now)") in line
  assert checkpoint_files() == before


@pytest.mark.slow
def test_memory_plan_on_tiny_shapes():
  # Abstract parameters of a tiny Llama, no weights: 1 device replicated
  # and 2 fake devices FSDP-sharded.
  figures, out = _run("memory_plan.py", "--config=configs/llama_nrms.py",
                      "--models=custom", "--hidden=128", "--layers=3",
                      "--heads=4", "--intermediate=256", "--vocab=1000",
                      "--devices=1,2", "--grid=headline", "--num_items=50",
                      "--max_len=8", "--set=train.batch_size=4",
                      "--set=model.lm.lora.rank=4", timeout=300)
  assert "| FSDP |" in out
  replicated, sharded = figures["rows"]
  assert (replicated["devices"], replicated["fsdp"]) == (1, False)
  assert (sharded["devices"], sharded["fsdp"]) == (2, True)
  for row in figures["rows"]:
    assert row["tune_from"] == 1 and row["cache_on"] == "host"
    assert min(row["argument"], row["temp"], row["total"]) > 0
    assert row["total"] == (row["argument"] + row["temp"] + row["output"] -
                            row["alias"])
  assert sharded["argument"] < replicated["argument"]
