"""Ranking metrics per impression: AUC (= GAUC here), MRR, nDCG@5, nDCG@10.

Every metric is computed within one impression (its candidates and labels) and
then averaged over impressions, as in the MIND leaderboard protocol. An
impression whose candidates are all clicked or all not clicked has no defined
AUC; it is skipped (and counted), never a crash and never a silent 0.5.

Scores of padded candidates are ignored through `mask`. AUC treats tied scores
as half-correct, exactly like scikit-learn's `roc_auc_score`. MRR and nDCG rank
candidates by descending score; ties keep candidate order (stable sort), as
the MIND evaluation script does with numpy's argsort.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

METRIC_KEYS = ("auc", "mrr", "ndcg5", "ndcg10")


def _average_ranks(scores: np.ndarray) -> np.ndarray:
  """Ascending 1-based ranks per row, ties sharing their average rank. [M, C]."""
  num_rows, num_cols = scores.shape
  order = np.argsort(scores, axis=1, kind="stable")
  sorted_scores = np.take_along_axis(scores, order, axis=1)
  position = np.broadcast_to(np.arange(num_cols), (num_rows, num_cols))
  starts = np.ones((num_rows, num_cols), bool)
  starts[:, 1:] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
  ends = np.ones((num_rows, num_cols), bool)
  ends[:, :-1] = starts[:, 1:]
  first = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
  last = np.minimum.accumulate(
      np.where(ends, position, num_cols - 1)[:, ::-1], axis=1)[:, ::-1]
  ranks_sorted = (first + last) / 2.0 + 1.0
  ranks = np.empty_like(ranks_sorted)
  np.put_along_axis(ranks, order, ranks_sorted, axis=1)
  return ranks


def impression_metrics(scores: np.ndarray, labels: np.ndarray,
                       mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Per-impression metrics for padded arrays.

  Args:
    scores: [M, C] float scores.
    labels: [M, C] 0/1 labels.
    mask: [M, C] bool, True on real candidates (default: all real).

  Returns:
    Dict of [M] float64 arrays for METRIC_KEYS plus "valid" ([M] bool: the
    impression has at least one clicked and one non-clicked candidate).
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels, np.float64)
  mask = np.ones(scores.shape, bool) if mask is None else np.asarray(mask, bool)
  labels = np.where(mask, labels, 0.0)
  num_pos = labels.sum(1)
  num_real = mask.sum(1)
  num_neg = num_real - num_pos
  valid = (num_pos > 0) & (num_neg > 0)

  # AUC (Mann-Whitney): padded candidates get -inf so they rank lowest; the
  # ranks of real candidates are then shifted by the number of pads.
  ranked = np.where(mask, scores, -np.inf)
  ranks = _average_ranks(ranked) - (scores.shape[1] - num_real)[:, None]
  pos_rank_sum = (ranks * labels).sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    auc = (pos_rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)

  # MRR and nDCG: descending order, ties in candidate order.
  order = np.argsort(-ranked, axis=1, kind="stable")
  sorted_labels = np.take_along_axis(labels, order, axis=1)
  positions = np.arange(1, scores.shape[1] + 1)
  with np.errstate(invalid="ignore", divide="ignore"):
    mrr = (sorted_labels / positions).sum(1) / num_pos
  discounts = 1.0 / np.log2(positions + 1)
  ideal = -np.sort(-labels, axis=1)
  out = {"auc": auc, "mrr": mrr}
  for k in (5, 10):
    dcg = ((2 ** sorted_labels[:, :k] - 1) * discounts[:k]).sum(1)
    idcg = ((2 ** ideal[:, :k] - 1) * discounts[:k]).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
      out[f"ndcg{k}"] = dcg / idcg
  out = {k: np.where(valid, v, np.nan) for k, v in out.items()}
  out["valid"] = valid
  return out


def summarize(per_impression: dict[str, np.ndarray],
              select: np.ndarray | None = None) -> dict[str, float]:
  """Averages per-impression metrics over valid (and selected) impressions.

  Returns METRIC_KEYS means plus num_impressions (averaged over) and
  num_skipped (selected impressions with a single class).
  """
  valid = per_impression["valid"]
  select = np.ones_like(valid) if select is None else np.asarray(select, bool)
  use = valid & select
  out = {}
  for key in METRIC_KEYS:
    out[key] = float(per_impression[key][use].mean()) if use.any() else float(
        "nan")
  out["num_impressions"] = int(use.sum())
  out["num_skipped"] = int((select & ~valid).sum())
  return out


def behaviors_metrics(split, flat_scores: np.ndarray, cold_threshold: int
                      ) -> dict[str, dict[str, float]]:
  """Summarized metrics of one score per candidate of a Behaviors split.

  flat_scores: [sum_c] scores in split.cand_items order. Returns {"all": ...,
  "cold": ...}, cold = impressions with at most cold_threshold history items.
  """
  num_cand = split.num_candidates()
  mask = np.arange(int(num_cand.max(initial=0)))[None, :] < num_cand[:, None]
  scores, labels = np.zeros(mask.shape), np.zeros(mask.shape)
  scores[mask] = flat_scores  # [M, C]
  labels[mask] = split.cand_labels
  per_impression = impression_metrics(scores, labels, mask)
  cold = split.history_lengths() <= cold_threshold
  return {"all": summarize(per_impression),
          "cold": summarize(per_impression, cold)}


def format_table(labels: Sequence[tuple[str, int]],
                 rows: Sequence[tuple[Sequence[str], dict]]) -> str:
  """A text table of behaviors_metrics results, one row each: label
  columns (name, width) first, then METRIC_KEYS for all and cold users."""
  header = ("".join(f"{name:<{width}}" for name, width in labels)
            + "".join(f"{k:>8}" for k in METRIC_KEYS)
            + "".join(f"{'cold ' + k:>12}" for k in METRIC_KEYS))
  lines = [header, "-" * len(header)]
  for values, r in rows:
    lines.append("".join(f"{v:<{w}}" for v, (_, w) in zip(values, labels))
                 + "".join(f"{r['all'][k]:>8.4f}" for k in METRIC_KEYS)
                 + "".join(f"{r['cold'][k]:>12.4f}" for k in METRIC_KEYS))
  return "\n".join(lines)
