"""The multi-process path (jax.distributed): experiments/multiprocess_check.py
runs 2 processes on localhost into one shared workdir, interrupted and
resumed, and compares every step's loss with 1 process."""

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
