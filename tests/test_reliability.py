"""run.py under bad settings, unusable data, two writers, faults and damage.

Every case goes through the entry point as a user would meet it: exit status
2, one `error:` line naming what to fix, no traceback, nothing written that a
later correct run would trip on; and after a fault, the same command again
gives the metrics of an uninterrupted run.
"""

import contextlib
import glob
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from genre_jax import workdir as workdir_lib
from tests.helpers import TINY_NEWS, shrink_flags, write_tsv

# Every test here runs a script or run.py end to end: the full suite's.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_flags(data_dir, epochs=2):
  """A 16-wide NRMS on small synthetic data, two epochs of a few dozen steps.

  Constant learning rate and no deduplication: training one epoch and then
  raising train.epochs to two gives the same model as two epochs at once, so
  a resumed or recovered run can be compared with an uninterrupted one.
  """
  return ["--config=configs/nrms.py", *shrink_flags(data_dir, epochs),
          "--config.train.decay=constant", "--config.train.dedup_items=False",
          "--config.train.checkpoint_every=4"]


def run_py(*args, preexec_fn=None, timeout=600):
  return subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, args)],
                        capture_output=True, text=True, cwd=ROOT,
                        timeout=timeout, preexec_fn=preexec_fn)


def assert_one_error_line(result, *expected):
  """Exit 2, no traceback, one `error:` line holding every expected text."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  for text in expected:
    assert str(text) in errors[0], errors[0]
  return errors[0]


def metrics_of(workdir):
  """The dev and test metrics of a finished run (timings left out)."""
  final = json.loads((pathlib.Path(workdir) / "final_metrics.json").read_text())
  return {split: final[split] for split in ("dev", "test")}


def assert_same_metrics(got, want):
  for split in want:
    for users in ("all", "cold"):
      for key, value in want[split][users].items():
        assert got[split][users][key] == pytest.approx(
            value, abs=1e-6, nan_ok=True), (split, users, key)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """An uninterrupted two-epoch run: (workdir, its metrics)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  result = run_py(*tiny_flags(data_dir), f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, metrics_of(workdir)


@pytest.fixture(scope="module")
def one_epoch(data_dir, tmp_path_factory):
  """The reference config trained for its first epoch only."""
  workdir = tmp_path_factory.mktemp("one_epoch") / "run"
  result = run_py(*tiny_flags(data_dir, epochs=1), f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def copy_of(workdir, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(workdir, target)
  return target


def saves(workdir, which="latest"):
  folder = pathlib.Path(workdir) / "checkpoints" / which
  return sorted((p for p in folder.iterdir() if p.name.isdigit()),
                key=lambda p: int(p.name))


# --- 1 and 4: settings that would train nothing, or crash later -------------


@pytest.mark.parametrize("override, expected", [
    ("data.num_negatives=0", "config.data.num_negatives=0: must be an "
     "integer >= 1"),
    ("model.dropout=2.0", "config.model.dropout=2.0: must be a finite "
     "number >= 0 and < 1"),
    ("model.dropout=-0.5", "config.model.dropout=-0.5: must be"),
    ("train.max_steps=-5", "config.train.max_steps=-5: must be an integer "
     ">= 0"),
    ("train.epochs=0", "config.train.epochs=0: must be an integer >= 1"),
    ("train.checkpoint_every=-1", "config.train.checkpoint_every=-1: must "
     "be an integer >= 0"),
    ("eval.dev_split=train", "config.eval.dev_split='train': must be one "
     "of dev, test"),
    ("train.log_every=0", "config.train.log_every=0: must be an integer "
     ">= 1"),
    ("eval.dev_split=bogus", "config.eval.dev_split='bogus': must be one "
     "of dev, test"),
    ("train.lr=nan", "config.train.lr=nan: must be a finite number > 0"),
    ("model.item_encoder=cnnn", "config.model.item_encoder='cnnn': must be "
     "one of cnn, fastformer, hybrid, id, lm, pooling, self_attention, "
     "transformer"),
])
def test_a_setting_out_of_range_is_refused_before_any_work(override,
                                                           expected, tmp_path):
  data, workdir = tmp_path / "data", tmp_path / "run"
  result = run_py(*tiny_flags(data), f"--config.{override}",
                  f"--workdir={workdir}")
  assert_one_error_line(result, expected)
  # Refused before the data is prepared or the workdir made.
  assert not data.exists() and not workdir.exists()


# --- 2: data that can train or select nothing -------------------------------


def _tiny_release(root, behaviors=None, news=TINY_NEWS):
  """A Goodreads-layout folder; behaviors: split -> rows (default: tiny)."""
  from tests.helpers import TINY_BEHAVIORS
  behaviors = {**TINY_BEHAVIORS, **(behaviors or {})}
  write_tsv(root / "news.tsv", news)
  for split, rows in behaviors.items():
    write_tsv(root / split / "behaviors.tsv", rows)
  return root


@pytest.mark.parametrize("case, expected", [
    ("no_history", ["train/behaviors.tsv", "every history of the train "
                    "split is empty (0 of 3 impressions"]),
    ("dev_unscorable", ["dev/behaviors.tsv", "no impression of the dev "
                        "split", "of 2 impressions, 2 have a click"]),
    ("empty_news", ["news.tsv", "no rows: an empty news file"]),
    ("empty_dev", ["dev/behaviors.tsv", "no rows: the dev split's "
                   "behaviors file is empty"]),
])
def test_unusable_data_is_refused_before_training(case, expected, tmp_path):
  behaviors, news = {}, TINY_NEWS
  if case == "no_history":
    behaviors["train"] = [["1", "U1", "", "", "N3-1 N4-0 N5-0"],
                          ["2", "U2", "", "", "N1-0 N3-1"],
                          ["3", "U1", "", "", "N5-1 N4-0"]]
  elif case == "dev_unscorable":  # only clicks: AUC needs a non-click too
    behaviors["dev"] = [["4", "U3", "", "N4", "N1-1"],
                        ["5", "U2", "", "N1", "N2-1 N5-1"]]
  elif case == "empty_news":
    news = []
  else:
    behaviors["dev"] = []
  root = _tiny_release(tmp_path / "release", behaviors, news)
  workdir = tmp_path / "run"
  result = run_py(
      "--config=configs/nrms.py:goodreads", f"--config.data.path={root}",
      f"--config.data.data_dir={tmp_path / 'data'}",
      "--config.data.num_negatives=1", "--config.model.embed_dim=16",
      "--config.model.hidden_dim=16", "--config.model.num_heads=2",
      "--config.train.batch_size=4", f"--workdir={workdir}")
  line = assert_one_error_line(result, *expected)
  assert str(root) in line
  # Nothing trained, evaluated or saved.
  assert not (workdir / "checkpoints").exists()
  assert not (workdir / "final_metrics.json").exists()
  assert not (workdir / "metrics.json").exists()


# --- 3: one writer per workdir ----------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(data_dir, tmp_path):
  workdir = tmp_path / "run"
  with workdir_lib.exclusive(str(workdir), "a test holding the lock"):
    trained = run_py(*tiny_flags(data_dir), f"--workdir={workdir}")
    generated = run_py(
        "--mode=generate", "--config=configs/nrms.py",
        f"--config.data.data_dir={data_dir}", "--generate.provider=replay",
        f"--generate.replay.path={tmp_path}", f"--workdir={workdir}")
  for result in (trained, generated):
    assert_one_error_line(result, f"--workdir={workdir} is in use by another "
                          f"run (pid {os.getpid()} on",
                          "a test holding the lock")
  assert not (workdir / "checkpoints").exists()
  assert not (workdir / "config.json").exists()


def test_a_killed_runs_lock_is_taken_over_and_the_run_resumes(
    data_dir, reference, tmp_path):
  workdir = tmp_path / "run"
  args = [sys.executable, str(ROOT / "run.py"), *tiny_flags(data_dir),
          "--config.train.checkpoint_every=1", f"--workdir={workdir}"]
  process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "latest").is_dir() or not saves(
        workdir):
      assert process.poll() is None, "the run ended before it was killed"
      assert time.time() < deadline
      time.sleep(0.02)
    # Every step is saved (a tenth of a second each): it is still training.
    assert process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
  finally:
    if process.poll() is None:
      process.kill()
  assert json.loads((workdir / ".lock").read_text())["pid"] == process.pid
  resumed = run_py(*tiny_flags(data_dir), "--config.train.checkpoint_every=1",
                   f"--workdir={workdir}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"last held by pid {process.pid}" in resumed.stderr
  assert_same_metrics(metrics_of(workdir), reference[1])
  # One writer: the evaluation log is in step order, best/ holds one save.
  steps = [r["step"] for r in json.loads((workdir / "metrics.json").read_text())]
  assert steps == sorted(steps) and len(steps) == 2
  assert len(saves(workdir, "best")) == 1


# --- 4: workdirs that cannot be written ------------------------------------


@contextlib.contextmanager
def read_only_folder(path):
  """`path` as a folder this test's run.py cannot write: permissions for a
  user, a read-only tmpfs for root (whom permissions do not stop)."""
  path.mkdir(parents=True)
  if os.geteuid() != 0:
    path.chmod(0o555)
    try:
      yield
    finally:
      path.chmod(0o755)
    return
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m",
                            "genre_jax_test", str(path)], capture_output=True)
  if mounted.returncode:
    pytest.skip("running as root, and mounting a read-only tmpfs is not "
                f"permitted here: {mounted.stderr.decode().strip()}")
  try:
    yield
  finally:
    subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("case", ["a_file", "under_a_file", "read_only"])
def test_a_workdir_that_cannot_be_written_is_one_line(case, data_dir,
                                                      tmp_path):
  blocker = tmp_path / "blocker"
  blocker.write_text("not a folder")
  with contextlib.ExitStack() as stack:
    if case == "a_file":
      workdir, expected = blocker, "is a file, not a folder"
    elif case == "under_a_file":
      workdir, expected = blocker / "run", "a parent of"
    else:
      folder = tmp_path / "read_only"
      stack.enter_context(read_only_folder(folder))
      workdir, expected = folder / "run", "cannot create"
    result = run_py(*tiny_flags(data_dir), f"--workdir={workdir}")
  assert_one_error_line(result, f"--workdir={workdir}", expected)
  assert blocker.read_text() == "not a folder"


@contextlib.contextmanager
def small_storage(kind, tmp_path):
  """(folder for the workdir, preexec_fn for run.py, lift()) with too little
  room for a checkpoint: a 1 MiB tmpfs (a full disk: ENOSPC) or a file-size
  limit of 256 KiB (EFBIG). lift() makes room again."""
  folder = tmp_path / "small"
  folder.mkdir()
  if kind == "fsize":
    def limit():
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (2**18, 2**18))
    yield folder, limit, lambda: None
    return
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m",
                            "genre_jax_test", str(folder)],
                           capture_output=True)
  if mounted.returncode:
    pytest.skip("a full disk is made with a small tmpfs, and mounting one "
                f"is not permitted here: {mounted.stderr.decode().strip()}")
  try:
    yield folder, None, lambda: subprocess.run(
        ["mount", "-o", "remount,size=64m", str(folder)], check=True)
  finally:
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("kind", ["tmpfs", "fsize"])
def test_a_full_disk_is_one_line_and_the_same_command_resumes(
    kind, data_dir, reference, tmp_path):
  with small_storage(kind, tmp_path) as (folder, preexec_fn, lift):
    workdir = folder / "run"
    full = run_py(*tiny_flags(data_dir), f"--workdir={workdir}",
                  preexec_fn=preexec_fn)
    assert_one_error_line(full, f"a write under {workdir}", "failed:",
                          "run the same command again")
    assert not saves(workdir)
    lift()
    again = run_py(*tiny_flags(data_dir), f"--workdir={workdir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_metrics(metrics_of(workdir), reference[1])


def test_a_damaged_evaluation_log_stops_an_extension_before_training(
    data_dir, one_epoch, tmp_path):
  workdir = copy_of(one_epoch, tmp_path)
  (workdir / "metrics.json").write_text('[{"step": 10,\n "auc": ')
  before = [p.name for p in saves(workdir)]
  result = run_py(*tiny_flags(data_dir), f"--workdir={workdir}")
  assert_one_error_line(result, f"{workdir / 'metrics.json'}:2: not valid "
                        "JSON", "move it away to start a new log")
  assert [p.name for p in saves(workdir)] == before
  assert (workdir / "metrics.json").read_text() == '[{"step": 10,\n "auc": '


# --- 5: damaged checkpoints -------------------------------------------------


def damage(save, how):
  """Damages the params of one checkpoint save as a disk or a user might."""
  data = sorted(glob.glob(f"{save}/params/**/d/*", recursive=True),
                key=os.path.getsize)
  assert data
  if how == "truncate":
    for path in data:
      os.truncate(path, os.path.getsize(path) // 2)
  elif how == "empty_metadata":
    (save / "params" / "_METADATA").write_text("")
  elif how == "delete":
    os.remove(data[-1])
  else:
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncate", "empty_metadata", "delete"])
def test_a_damaged_latest_save_is_reported_and_the_previous_resumes(
    how, data_dir, one_epoch, reference, tmp_path):
  workdir = copy_of(one_epoch, tmp_path)
  newest = saves(workdir)[-1]
  damage(newest, how)
  result = run_py(*tiny_flags(data_dir), f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  reports = [l for l in result.stderr.splitlines() if "is damaged" in l]
  assert len(reports) == 1 and str(newest) in reports[0], result.stderr[-3000:]
  assert (workdir / "checkpoints" / "damaged" / f"latest-{newest.name}").is_dir()
  assert_same_metrics(metrics_of(workdir), reference[1])


def test_every_latest_save_damaged_resumes_from_best(data_dir, one_epoch,
                                                     reference, tmp_path):
  workdir = copy_of(one_epoch, tmp_path)
  assert len(saves(workdir)) == 2  # the two newest are kept
  for save in saves(workdir):
    damage(save, "truncate")
  result = run_py(*tiny_flags(data_dir), f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert sum("is damaged" in l for l in result.stderr.splitlines()) == 2
  assert_same_metrics(metrics_of(workdir), reference[1])


def test_nothing_readable_left_is_one_line(data_dir, one_epoch, tmp_path):
  workdir = copy_of(one_epoch, tmp_path)
  for save in saves(workdir) + saves(workdir, "best"):
    damage(save, "delete")
  result = run_py(*tiny_flags(data_dir), f"--workdir={workdir}")
  assert_one_error_line(result, "no checkpoint of this run can be read",
                        "train again from the start")
  # Moved aside, so a new run in this workdir starts clean.
  assert not saves(workdir) and not saves(workdir, "best")


def test_eval_on_a_damaged_best_names_it_and_how_to_rebuild_it(one_epoch,
                                                               tmp_path):
  workdir = copy_of(one_epoch, tmp_path)
  best = saves(workdir, "best")[-1]
  damage(best, "truncate")
  for mode in ("eval", "recommend"):
    result = run_py(f"--mode={mode}", f"--workdir={workdir}", "--user_ids=U1")
    assert_one_error_line(result, f"{best}: the checkpoint is damaged",
                          "train the same config again",
                          f"{workdir / 'config.json'}")
  assert best.is_dir()  # eval and recommend only read
