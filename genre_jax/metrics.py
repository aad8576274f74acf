"""Ranking metrics per impression: AUC (= GAUC here), MRR, nDCG@5, nDCG@10.

Every metric is computed within one impression (its candidates and labels) and
then averaged over impressions, as in the MIND leaderboard protocol. An
impression whose candidates are all clicked or all not clicked has no defined
AUC; it is skipped (and counted), never a crash and never a silent 0.5.

Padded candidates are left out through `mask` alone: no score value stands
for "padding", so any real score ranks as itself. An impression with a
non-finite (NaN or infinite) score on a real candidate gets NaN metrics, and
so does any average over it: a diverged model never looks like a ranking.

Tied scores are averaged over every order of the tied candidates (uniformly
random tie-breaking): AUC counts a tied pair as half-correct, exactly like
scikit-learn's `roc_auc_score`, and MRR and nDCG@k are their expectations.
A constant scorer thus gets the same figures whatever the candidate order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

METRIC_KEYS = ("auc", "mrr", "ndcg5", "ndcg10")


def _tie_group_means(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
  """Mean of `values` over each run of equal keys, at every position. [M, C].

  starts: [M, C] bool, True where a new run (tie group) begins along axis 1.
  """
  num_rows, num_cols = values.shape
  position = np.broadcast_to(np.arange(num_cols), (num_rows, num_cols))
  ends = np.ones((num_rows, num_cols), bool)
  ends[:, :-1] = starts[:, 1:]
  first = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
  last = np.minimum.accumulate(
      np.where(ends, position, num_cols - 1)[:, ::-1], axis=1)[:, ::-1]
  cumsum = np.concatenate(
      [np.zeros((num_rows, 1)), np.cumsum(values, axis=1)], axis=1)
  group_sum = (np.take_along_axis(cumsum, last + 1, axis=1) -
               np.take_along_axis(cumsum, first, axis=1))
  return group_sum / (last - first + 1)


def impression_metrics(scores: np.ndarray, labels: np.ndarray,
                       mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Per-impression metrics for padded arrays.

  Args:
    scores: [M, C] float scores.
    labels: [M, C] 0/1 labels.
    mask: [M, C] bool, True on real candidates (default: all real).

  Returns:
    Dict of [M] float64 arrays for METRIC_KEYS (NaN where the impression is
    not valid or a real candidate's score is not finite) plus "valid" ([M]
    bool: the impression has at least one clicked and one non-clicked
    candidate).
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels, np.float64)
  mask = np.ones(scores.shape, bool) if mask is None else np.asarray(mask, bool)
  labels = np.where(mask, labels, 0.0)
  num_pos = labels.sum(1)
  num_real = mask.sum(1)
  num_neg = num_real - num_pos
  valid = (num_pos > 0) & (num_neg > 0)
  finite = np.isfinite(scores)
  broken = (mask & ~finite).any(1)  # [M] metrics are NaN

  # Real candidates first (by score, descending), then the padding; the
  # scores of padding and of broken rows are zeroed so they sort harmlessly.
  clean = np.where(mask & finite, scores, 0.0)
  order = np.lexsort((-clean, ~mask), axis=1)  # [M, C]
  sorted_scores = np.take_along_axis(clean, order, axis=1)
  sorted_mask = np.take_along_axis(mask, order, axis=1)
  sorted_labels = np.take_along_axis(labels, order, axis=1)
  # Tie groups: runs of equal score among real candidates (padding apart).
  starts = np.ones(scores.shape, bool)
  starts[:, 1:] = ((sorted_scores[:, 1:] != sorted_scores[:, :-1]) |
                   (sorted_mask[:, 1:] != sorted_mask[:, :-1]))
  # Under random tie-breaking, rank r holds a positive with probability
  # p / g (its tie group's g candidates hold p positives).
  hit = _tie_group_means(sorted_labels, starts)  # [M, C]
  ranks = np.arange(1, scores.shape[1] + 1)  # descending, 1-based

  with np.errstate(invalid="ignore", divide="ignore"):
    # AUC (Mann-Whitney) from the expected descending rank sum of positives:
    # ascending rank = num_real + 1 - descending rank.
    pos_rank_sum = num_pos * (num_real + 1) - (hit * ranks).sum(1)
    auc = (pos_rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)
    mrr = (hit / ranks).sum(1) / num_pos
    out = {"auc": auc, "mrr": mrr}
    discounts = 1.0 / np.log2(ranks + 1)
    ideal = -np.sort(-labels, axis=1)
    for k in (5, 10):
      dcg = (hit[:, :k] * discounts[:k]).sum(1)  # labels are 0/1
      idcg = ((2 ** ideal[:, :k] - 1) * discounts[:k]).sum(1)
      out[f"ndcg{k}"] = dcg / idcg
  out = {k: np.where(valid & ~broken, v, np.nan) for k, v in out.items()}
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
