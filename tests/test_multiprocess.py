"""The multi-process path (jax.distributed): experiments/multiprocess_check.py
runs 2 processes on localhost into one shared workdir, interrupted and
resumed, and compares every step's loss with 1 process; once more with the
newest save damaged before the resume."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume(tmp_path):
  result = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "multiprocess_check.py"),
       "--steps=4", "--interrupt_at=3", "--checkpoint_every=3",
       "--nouninterrupted", f"--workdir_root={tmp_path}"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 0, (result.stdout[-3000:] +
                                  result.stderr[-3000:])
  line = json.loads(result.stdout.strip().splitlines()[-1])
  assert line["processes"] == 2
  assert line["steps"] == 4
  assert line["max_loss_diff"] <= 1e-5
  assert line["resumed_at"] == 3  # the checkpoint both processes saved
  assert line["problems"] == []
  # Process 0 alone wrote the shared workdir's files, and only once each.
  workdir = tmp_path / "resumed"
  assert json.loads((workdir / "final_metrics.json").read_text())["steps"] == 4
  assert [r["step"] for r in json.loads(
      (workdir / "metrics.json").read_text())] == [4]


@pytest.mark.slow
def test_two_processes_move_a_damaged_save_aside_once_and_resume(tmp_path):
  # Saves at steps 2 and 4; step 4's parameters are truncated. Both
  # processes must fail to read it, agree, let process 0 alone move it to
  # checkpoints/damaged/ and resume from step 2 (before the fix, the second
  # process's move found the folder gone and the run ended in an error).
  result = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "multiprocess_check.py"),
       "--steps=5", "--interrupt_at=4", "--checkpoint_every=2",
       "--nouninterrupted", "--damage_newest", f"--workdir_root={tmp_path}"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 0, (result.stdout[-3000:] +
                                  result.stderr[-3000:])
  line = json.loads(result.stdout.strip().splitlines()[-1])
  assert line["damaged_newest"] and line["resumed_at"] == 2
  assert line["max_loss_diff"] <= 1e-5
  assert line["problems"] == []
  damaged = tmp_path / "resumed" / "checkpoints" / "damaged"
  assert [p.name for p in damaged.iterdir()] == ["latest-1"]
