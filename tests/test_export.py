"""run.py --mode=export: vectors that reproduce the model's scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from genre_jax import train
from genre_jax.config import load_preset
from tests.helpers import ROOT, shrink


@pytest.mark.slow
def test_exported_vectors_reproduce_the_scores(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = shrink(load_preset("nrms"), data_dir, max_steps=4)
  train.train_and_evaluate(config, workdir)
  out = tmp_path / "vectors"
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, "run.py"), "--mode=export",
       f"--workdir={workdir}", f"--out={out}", "--split=test"],
      capture_output=True, text=True, cwd=ROOT, check=False)
  assert done.returncode == 0, done.stderr
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  items, users = np.load(out / "items.npy"), np.load(out / "users.npy")
  item_ids = (out / "item_ids.txt").read_text().splitlines()
  user_rows = [line.split("\t") for line in
               (out / "users.tsv").read_text().splitlines()]
  assert summary["items"] == list(items.shape)
  assert summary["users"] == list(users.shape)

  _, dataset, evaluator, params = train.load_for_inference(workdir)
  behaviors = dataset.splits["test"]
  assert item_ids == list(dataset.items.ids[1:])
  assert [r[0] for r in user_rows] == list(behaviors.impression_ids)
  assert [r[1] for r in user_rows] == list(behaviors.user_ids)
  scores, _, masks = evaluator.scores(params, behaviors)  # [M, C]
  counts = behaviors.num_candidates()
  for m in range(0, len(behaviors), max(1, len(behaviors) // 50)):
    start = behaviors.cand_offsets[m]
    rows = behaviors.cand_items[start:start + counts[m]]  # item rows
    want = items[rows - 1] @ users[m]  # dot predictor
    np.testing.assert_allclose(want, scores[m, :counts[m]], rtol=1e-4,
                               atol=1e-4)
