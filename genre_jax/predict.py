"""Writes a trained run's MIND leaderboard submission (run.py --mode=predict).

`prediction.txt` has one line per impression of a split, in file order:
`<impression id> [r1,r2,...,rC]` (no spaces inside the brackets), r_i the
1-based rank of candidate i (candidates in the file's order) by the best
checkpoint's score, highest first. Equal scores rank in candidate order:
the earlier candidate gets the smaller rank. That is the MIND competition's
format (msnews.github.io): its scorer walks the truth file and this one line
by line, so every impression must be there, in order. `prediction.zip`
holds `prediction.txt` alone, ready to upload; `prediction.json` says what
was written.

The split is usually MIND-large's unlabelled test (`--split=test`), but any
split works (a labelled one gives a file to check the scorer with).
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from genre_jax import workdir as workdir_lib
from genre_jax.data.types import Behaviors
from genre_jax.errors import ConfigError
from genre_jax.train import evaluation

PREDICTION_FILE, PREDICTION_ZIP = "prediction.txt", "prediction.zip"
SUMMARY_FILE = "prediction.json"


def candidate_ranks(scores: np.ndarray) -> np.ndarray:
  """[C] 1-based rank of each candidate's score, highest first; ties go to
  the earlier candidate (a stable sort of the negated scores; a NaN score
  ranks last)."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  ranks = np.empty(len(order), dtype=np.int64)
  ranks[order] = np.arange(1, len(order) + 1)
  return ranks


def prediction_lines(impression_ids, scores: np.ndarray,
                     counts: np.ndarray) -> str:
  """The prediction.txt text: impression m's first counts[m] scores of
  scores[m] ([M, C], padded) ranked, one line each."""
  return "".join(
      f"{imp} [{','.join(map(str, candidate_ranks(row[:n]).tolist()))}]\n"
      for imp, row, n in zip(impression_ids, scores, counts))


def predict(workdir: str, out_dir: str, split: str = "test") -> dict:
  """Ranks `split`'s candidates with the run's best checkpoint and writes
  prediction.txt, prediction.zip and prediction.json under out_dir; returns
  the summary (prediction.json's content)."""
  _, dataset, evaluator, params = evaluation.load_for_inference(workdir)
  if split not in dataset.splits:
    raise ConfigError(f"--split={split}: the dataset has "
                      f"{sorted(dataset.splits)}")
  behaviors = dataset.splits[split]
  if not len(behaviors):
    raise ConfigError(f"--split={split}: the split has no impressions")
  scores, _, _ = evaluator.scores(params, behaviors)  # [M, C]
  return write_predictions(
      out_dir, split, behaviors, scores,
      dataset.info.get("read_stats", {}).get(split, {}))


def write_predictions(out_dir: str, split: str, behaviors: Behaviors,
                      scores: np.ndarray, read_stats: dict | None = None
                      ) -> dict:
  """Writes the files of `behaviors` ranked by `scores` ([M, C], padded, as
  Evaluator.scores gives them) under out_dir; returns the summary.

  read_stats (mind.ReadStats as a dict) says what the reader dropped: rows
  or candidates whose ids news.tsv lacks are missing from the file too, and
  the leaderboard would refuse it ("complete": False).
  """
  text = prediction_lines(behaviors.impression_ids, scores,
                          behaviors.num_candidates())
  workdir_lib.make_workdir(out_dir, "--out")
  workdir_lib.atomic_write_text(os.path.join(out_dir, PREDICTION_FILE), text)
  with workdir_lib.atomic_output(os.path.join(out_dir, PREDICTION_ZIP)) as tmp:
    with zipfile.ZipFile(tmp, "x", zipfile.ZIP_DEFLATED) as zf:
      zf.writestr(PREDICTION_FILE, text)
  stats = read_stats or {}
  dropped = (int(stats.get("rows_dropped", 0)),
             int(stats.get("candidate_ids_dropped", 0)))
  summary = {
      "out_dir": out_dir, "split": split, "impressions": len(behaviors),
      "candidates": int(behaviors.num_candidates().sum()),
      "labelled": behaviors.is_labelled(),
      "files": [PREDICTION_FILE, PREDICTION_ZIP],
      "ties": "equal scores rank in candidate order (earlier first)",
      "rows_dropped": dropped[0], "candidates_dropped": dropped[1],
      "complete": not any(dropped)}
  workdir_lib.atomic_write_text(os.path.join(out_dir, SUMMARY_FILE),
                                json.dumps(summary, indent=2))
  return summary
