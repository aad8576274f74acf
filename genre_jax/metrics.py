"""Ranking metrics of scored impressions, and beyond-accuracy metrics of
top-K recommendation lists.

Accuracy metrics (`evaluate_scores`, names as in config.eval.metrics):

  Per impression, then averaged over impressions (the MIND leaderboard
  protocol): "auc" (AUC within one impression, what MIND calls AUC), "mrr",
  "ndcg5" / "ndcg10" / "ndcg@K" (nDCG at K with gains 2^label - 1), "hit@K"
  (1 when a clicked candidate is among the top K) and "recall@K" (the share
  of the impression's clicked candidates among its top K). An impression
  whose candidates are all clicked or all not clicked has no defined AUC;
  it is skipped (and counted in num_skipped) by every per-impression metric,
  never a crash and never a silent 0.5.

  Pooled over the candidates of every selected impression (one-class
  impressions included, as they still hold candidates):
  "gauc" (per-user AUC: the AUC over all candidates of one user's
  impressions pooled together, averaged over users weighted by their number
  of impressions, as in DIN (Zhou et al., 2018); users whose pooled labels
  are all one class are skipped and num_gauc_users counts the others),
  "global_auc" (one AUC over every candidate of every impression) and
  "logloss" (mean binary cross-entropy of sigmoid(score) against the
  labels, over every candidate).

Padded candidates are left out through `mask` alone: no score value stands
for "padding", so any real score ranks as itself. An impression with a
non-finite (NaN or infinite) score on a real candidate gets NaN metrics, and
so does any average or pooled figure over it: a diverged model never looks
like a ranking.

Tied scores are averaged over every order of the tied candidates (uniformly
random tie-breaking): AUC (all three kinds) counts a tied pair as
half-correct, exactly like scikit-learn's `roc_auc_score`, and MRR, nDCG@K,
Hit@K and Recall@K are their expectations. A constant scorer thus gets the
same figures whatever the candidate order.

Beyond-accuracy metrics of recommendation lists (`beyond_accuracy`): see
catalogue_coverage, intra_list_diversity, novelty and long_tail_share.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

# The default metrics (config.eval.metrics), the ones MIND reports.
METRIC_KEYS = ("auc", "mrr", "ndcg5", "ndcg10")
# Metrics pooled over candidates rather than averaged over impressions.
POOLED_METRICS = ("gauc", "global_auc", "logloss")
# The forms a metric name takes, in words (config errors list them).
METRIC_FORMS = ("auc, gauc, global_auc, mrr, ndcg5, ndcg10, ndcg@K, hit@K, "
                "recall@K, logloss (K an integer >= 1, e.g. ndcg@20, hit@5)")
_AT_K = re.compile(r"(ndcg|hit|recall)@([1-9][0-9]{0,5})")


def parse_metric(name) -> tuple[str, int | None] | None:
  """(kind, K) of a metric name: ("ndcg", 5) for "ndcg5" and "ndcg@5",
  ("hit", 3) for "hit@3", ("auc", None) for "auc"; None if not a name."""
  if not isinstance(name, str):
    return None
  if name in ("auc", "mrr") or name in POOLED_METRICS:
    return name, None
  if name in ("ndcg5", "ndcg10"):
    return "ndcg", int(name[4:])
  match = _AT_K.fullmatch(name)
  return (match.group(1), int(match.group(2))) if match else None


def is_metric_name(name) -> bool:
  return parse_metric(name) is not None


def evaluated_metrics(names: Sequence[str] = METRIC_KEYS) -> tuple[str, ...]:
  """The metrics an evaluation computes for config.eval.metrics `names`:
  those, in order, and "auc" after them if they lack it (model selection
  and early stopping use it). Raises ValueError on an unknown name."""
  names = tuple(names)
  bad = [n for n in names if not is_metric_name(n)]
  if bad:
    raise ValueError(f"unknown metric names {bad}; valid: {METRIC_FORMS}")
  return names + (() if "auc" in names else ("auc",))


def _group_bounds(starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """First and last position of the run (tie group) holding each position.

  starts: [M, C] bool, True where a new run begins along axis 1.
  """
  num_rows, num_cols = starts.shape
  position = np.broadcast_to(np.arange(num_cols), (num_rows, num_cols))
  ends = np.ones((num_rows, num_cols), bool)
  ends[:, :-1] = starts[:, 1:]
  first = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
  last = np.minimum.accumulate(
      np.where(ends, position, num_cols - 1)[:, ::-1], axis=1)[:, ::-1]
  return first, last


def _tie_group_means(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
  """Mean of `values` over each run of equal keys, at every position. [M, C].

  starts: [M, C] bool, True where a new run (tie group) begins along axis 1.
  """
  first, last = _group_bounds(starts)
  cumsum = np.concatenate(
      [np.zeros((values.shape[0], 1)), np.cumsum(values, axis=1)], axis=1)
  group_sum = (np.take_along_axis(cumsum, last + 1, axis=1) -
               np.take_along_axis(cumsum, first, axis=1))
  return group_sum / (last - first + 1)


def _expected_hit(sorted_labels: np.ndarray, starts: np.ndarray,
                  num_real: np.ndarray, k: int) -> np.ndarray:
  """[M] probability that a clicked candidate is in the top k under random
  tie-breaking (k past the real candidates: all of them)."""
  num_rows = sorted_labels.shape[0]
  top = np.clip(np.minimum(k, num_real), 1, None).astype(np.int64)  # [M]
  first, last = _group_bounds(starts)
  rows = np.arange(num_rows)
  f, l = first[rows, top - 1], last[rows, top - 1]  # the boundary group
  cumsum = np.concatenate(
      [np.zeros((num_rows, 1)), np.cumsum(sorted_labels, axis=1)], axis=1)
  before = cumsum[rows, f]  # clicks in the groups wholly in the top k
  size = (l - f + 1).astype(np.float64)
  clicks = cumsum[rows, l + 1] - before
  drawn = top - f  # the boundary group's places in the top k
  # P(none of `drawn` candidates drawn from `size` holding `clicks` clicked).
  miss = np.ones(num_rows)
  for i in range(int(drawn.max(initial=0))):
    with np.errstate(invalid="ignore", divide="ignore"):
      factor = np.clip((size - clicks - i) / (size - i), 0.0, 1.0)
    miss = np.where(i < drawn, miss * factor, miss)
  return np.where(before > 0, 1.0, 1.0 - miss)


def impression_metrics(scores: np.ndarray, labels: np.ndarray,
                       mask: np.ndarray | None = None,
                       metrics: Sequence[str] = METRIC_KEYS
                       ) -> dict[str, np.ndarray]:
  """Per-impression metrics for padded arrays.

  Args:
    scores: [M, C] float scores.
    labels: [M, C] 0/1 labels.
    mask: [M, C] bool, True on real candidates (default: all real).
    metrics: metric names; the per-impression ones (auc, mrr, ndcg*,
      hit@K, recall@K) are computed, pooled ones (POOLED_METRICS) ignored.

  Returns:
    Dict of [M] float64 arrays, one per per-impression name of `metrics`
    (NaN where the impression is not valid or a real candidate's score is
    not finite), plus "valid" ([M] bool: the impression has at least one
    clicked and one non-clicked candidate).
  """
  wanted = [(n, parse_metric(n)) for n in metrics if n not in POOLED_METRICS]
  for name, parsed in wanted:
    if parsed is None:
      raise ValueError(f"unknown metric '{name}'; valid: {METRIC_FORMS}")
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
  discounts = 1.0 / np.log2(ranks + 1)
  ideal = None  # labels sorted descending, for nDCG

  out = {}
  with np.errstate(invalid="ignore", divide="ignore"):
    for name, (kind, k) in wanted:
      if kind == "auc":
        # AUC (Mann-Whitney) from the expected descending rank sum of
        # positives: ascending rank = num_real + 1 - descending rank.
        pos_rank_sum = num_pos * (num_real + 1) - (hit * ranks).sum(1)
        out[name] = ((pos_rank_sum - num_pos * (num_pos + 1) / 2) /
                     (num_pos * num_neg))
      elif kind == "mrr":
        out[name] = (hit / ranks).sum(1) / num_pos
      elif kind == "ndcg":
        if ideal is None:
          ideal = -np.sort(-labels, axis=1)
        dcg = (hit[:, :k] * discounts[:k]).sum(1)  # labels are 0/1
        idcg = ((2 ** ideal[:, :k] - 1) * discounts[:k]).sum(1)
        out[name] = dcg / idcg
      elif kind == "recall":
        out[name] = hit[:, :k].sum(1) / num_pos
      else:  # hit
        out[name] = _expected_hit(sorted_labels, starts, num_real, k)
  out = {k: np.where(valid & ~broken, v, np.nan) for k, v in out.items()}
  out["valid"] = valid
  return out


def summarize(per_impression: dict[str, np.ndarray],
              select: np.ndarray | None = None,
              metrics: Sequence[str] | None = None) -> dict[str, float]:
  """Averages per-impression metrics over valid (and selected) impressions.

  Returns the means of `metrics` (default: every metric of per_impression,
  in its order) plus num_impressions (averaged over) and num_skipped
  (selected impressions with a single class).
  """
  valid = per_impression["valid"]
  select = np.ones_like(valid) if select is None else np.asarray(select, bool)
  use = valid & select
  if metrics is None:
    metrics = [k for k in per_impression if k != "valid"]
  out = {}
  for key in metrics:
    out[key] = float(per_impression[key][use].mean()) if use.any() else float(
        "nan")
  out["num_impressions"] = int(use.sum())
  out["num_skipped"] = int((select & ~valid).sum())
  return out


def _grouped_auc(groups: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                 num_groups: int):
  """AUC of each group's candidates (ties half-correct): ([G] auc, [G]
  positives, [G] negatives); NaN where a group has one class."""
  order = np.lexsort((scores, groups))
  g, s, y = groups[order], scores[order], labels[order]
  n = len(s)
  new = np.ones(n, bool)  # a new run of equal (group, score)
  new[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
  run = np.cumsum(new) - 1
  run_start = np.flatnonzero(new)
  run_len = np.diff(np.append(run_start, n))
  rank = np.arange(n) - np.searchsorted(g, g, side="left") + 1  # in group
  mean_rank = (rank[run_start] + (run_len - 1) / 2)[run]  # ascending
  pos = np.bincount(g, weights=y, minlength=num_groups)
  neg = np.bincount(g, minlength=num_groups) - pos
  rank_sum = np.bincount(g, weights=y * mean_rank, minlength=num_groups)
  with np.errstate(invalid="ignore", divide="ignore"):
    auc = (rank_sum - pos * (pos + 1) / 2) / (pos * neg)
  return np.where((pos > 0) & (neg > 0), auc, np.nan), pos, neg


def pooled_metrics(scores: np.ndarray, labels: np.ndarray,
                   mask: np.ndarray | None = None,
                   metrics: Sequence[str] = POOLED_METRICS, *,
                   users: np.ndarray | None = None,
                   select: np.ndarray | None = None) -> dict[str, float]:
  """The pooled metrics of `metrics` (gauc, global_auc, logloss) over the
  real candidates of the selected impressions (see the module docstring).

  users: [M] int user of each impression (needed for gauc). With gauc the
  result also holds num_gauc_users (users with both classes, averaged over).
  Any non-finite score among those candidates makes every figure NaN.
  """
  wanted = [n for n in metrics if n in POOLED_METRICS]
  if not wanted:
    return {}
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels, np.float64)
  mask = np.ones(scores.shape, bool) if mask is None else np.asarray(mask, bool)
  select = (np.ones(len(scores), bool) if select is None
            else np.asarray(select, bool))
  real = mask & select[:, None]  # [M, C]
  s, y = scores[real], labels[real]
  broken = not np.isfinite(s).all()
  nan = float("nan")
  out = {}
  for name in wanted:
    if name == "global_auc":
      auc = _grouped_auc(np.zeros(len(s), np.int64), s, y, 1)[0][0]
      out[name] = nan if broken or not len(s) else float(auc)
    elif name == "logloss":
      # -[y log sigmoid(s) + (1 - y) log(1 - sigmoid(s))], stably.
      out[name] = (nan if broken or not len(s) else
                   float(np.mean(np.logaddexp(0.0, s) - y * s)))
    else:  # gauc
      if users is None:
        raise ValueError("gauc needs the user of every impression (users)")
      codes, users = np.unique(np.asarray(users), return_inverse=True)
      users = users.reshape(-1)
      row_users = np.broadcast_to(users[:, None], scores.shape)[real]
      auc, _, _ = _grouped_auc(row_users, s, y, len(codes))
      # Weights: the user's selected impressions with a real candidate.
      weight = np.bincount(users[select & mask.any(1)],
                           minlength=len(codes)).astype(np.float64)
      ok = np.isfinite(auc)
      out[name] = (nan if broken or not ok.any() else
                   float(np.sum(weight[ok] * auc[ok]) / np.sum(weight[ok])))
      out["num_gauc_users"] = int(ok.sum())
  return out


def evaluate_scores(scores: np.ndarray, labels: np.ndarray,
                    mask: np.ndarray | None = None, *,
                    metrics: Sequence[str] = METRIC_KEYS,
                    users: np.ndarray | None = None,
                    selections: Mapping[str, np.ndarray | None] | None = None
                    ) -> dict[str, dict[str, float]]:
  """`metrics` of padded [M, C] scores on each selection of impressions.

  The scores are ranked once; each selection ({"all": None, "cold": [M]
  bool}, default {"all": None}) gets its averages and pooled figures.
  users: [M] user of each impression (any ids; needed for gauc).

  Returns {selection: {metric: value, ..., "num_impressions",
  "num_skipped"(, "num_gauc_users")}}, metrics in the order given.
  """
  metrics = tuple(metrics)
  for name in metrics:
    if not is_metric_name(name):
      raise ValueError(f"unknown metric '{name}'; valid: {METRIC_FORMS}")
  if selections is None:
    selections = {"all": None}
  per = impression_metrics(scores, labels, mask, metrics)
  result = {}
  for key, select in selections.items():
    summary = summarize(per, select)
    summary.update(pooled_metrics(scores, labels, mask, metrics, users=users,
                                  select=select))
    counts = [k for k in summary if k.startswith("num_")]
    result[key] = {k: summary[k] for k in (*metrics, *counts)}
  return result


def behaviors_metrics(split, flat_scores: np.ndarray, cold_threshold: int,
                      metrics: Sequence[str] = METRIC_KEYS
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
  cold = split.history_lengths() <= cold_threshold
  return evaluate_scores(scores, labels, mask, metrics=metrics,
                         users=np.asarray(split.user_ids),
                         selections={"all": None, "cold": cold})


def format_table(labels: Sequence[tuple[str, int]],
                 rows: Sequence[tuple[Sequence[str], dict]]) -> str:
  """A text table of behaviors_metrics results, one row each: label
  columns (name, width) first, then the rows' metrics (METRIC_KEYS by
  default) for all and cold users."""
  keys = [k for k in (rows[0][1]["all"] if rows else METRIC_KEYS)
          if not k.startswith("num_")]
  width = max([8] + [len(k) + 1 for k in keys])
  cold_width = max([12] + [len(k) + 6 for k in keys])  # "cold " + k, a space
  header = ("".join(f"{name:<{w}}" for name, w in labels)
            + "".join(f"{k:>{width}}" for k in keys)
            + "".join(f"{'cold ' + k:>{cold_width}}" for k in keys))
  lines = [header, "-" * len(header)]
  for values, r in rows:
    lines.append("".join(f"{v:<{w}}" for v, (_, w) in zip(values, labels))
                 + "".join(f"{r['all'][k]:>{width}.4f}" for k in keys)
                 + "".join(f"{r['cold'][k]:>{cold_width}.4f}" for k in keys))
  return "\n".join(lines)


# --- Beyond accuracy: top-K lists over the catalogue --------------------------
#
# Lists are [U, K] item rows (1..N); 0 (the padding item) marks an empty
# place of a list shorter than K and is ignored everywhere.


def catalogue_coverage(lists: np.ndarray, num_items: int | None = None, *,
                       catalogue: np.ndarray | None = None) -> float:
  """Distinct recommended items / catalogue size.

  The catalogue is the items `catalogue` ([N+1] bool) marks, or the real
  items 1..num_items; recommended items outside it are not counted.
  """
  lists = np.asarray(lists, np.int64)
  if catalogue is None:
    catalogue = np.arange(num_items + 1) > 0
  catalogue = np.asarray(catalogue, bool).copy()
  catalogue[0] = False
  items = np.unique(lists[lists > 0])
  size = int(catalogue.sum())
  return float(catalogue[items].sum() / size) if size else float("nan")


def intra_list_diversity(lists: np.ndarray, item_vecs: np.ndarray) -> float:
  """Mean over lists of the mean pairwise cosine distance (1 - cosine
  similarity) of the item vectors within a list (each unordered pair of
  places once). Lists with fewer than two items are left out; NaN if all
  are. A zero vector has cosine 0 with any other."""
  lists = np.asarray(lists, np.int64)
  vecs = np.asarray(item_vecs, np.float64)
  norms = np.linalg.norm(vecs, axis=-1, keepdims=True)
  unit = vecs / np.maximum(norms, 1e-12)
  means = []
  chunk = max(1, 2**22 // max(lists.shape[1] * vecs.shape[-1], 1))
  for start in range(0, len(lists), chunk):  # bounded [u, K, D] memory
    part = lists[start:start + chunk]
    real = part > 0  # [u, K]
    x = unit[part] * real[..., None]  # [u, K, D]
    # Sum of cosines over ordered pairs i != j: |sum x|^2 - sum |x|^2.
    total = x.sum(1)  # [u, D]
    cosines = (total * total).sum(1) - (x * x).sum((1, 2))
    n = real.sum(1)
    count = n * (n - 1)  # ordered pairs
    keep = count > 0
    means.append(1.0 - cosines[keep] / count[keep])
  means = np.concatenate(means) if means else np.zeros(0)
  return float(np.mean(means)) if len(means) else float("nan")


def item_probabilities(popularity: np.ndarray) -> np.ndarray:
  """[N+1] add-one smoothed share of the train interactions of each real
  item: (count_i + 1) / (sum_j count_j + N); row 0 (padding) gets 0."""
  counts = np.asarray(popularity, np.float64).copy()
  counts[0] = 0.0
  num_items = len(counts) - 1
  p = (counts + 1.0) / (counts.sum() + num_items)
  p[0] = 0.0
  return p


def novelty(lists: np.ndarray, popularity: np.ndarray) -> float:
  """Mean self-information -log2 p(i) of the recommended items, in bits:
  p = item_probabilities(popularity) (add-one smoothing, so an item never
  seen in training is finite, the most novel), averaged over a list's
  items, then over lists (empty lists left out)."""
  lists = np.asarray(lists, np.int64)
  real = lists > 0
  with np.errstate(divide="ignore"):
    info = np.where(real, -np.log2(item_probabilities(popularity))[lists], 0)
  count = real.sum(1)
  keep = count > 0
  return (float(np.mean(info.sum(1)[keep] / count[keep])) if keep.any()
          else float("nan"))


def short_head(popularity: np.ndarray, share: float = 0.8) -> np.ndarray:
  """[N+1] bool, the short head: the most popular items that together make
  up `share` of the train interactions. Items are taken by count
  (descending, ties by item row) until the ones taken hold at least that
  share; the item that reaches it is in the head. Zero-count items and row
  0 never are; with no interaction at all the head is empty."""
  counts = np.asarray(popularity, np.float64).copy()
  counts[0] = 0.0
  total = counts.sum()
  head = np.zeros(len(counts), bool)
  if total <= 0:
    return head
  order = np.lexsort((np.arange(len(counts)), -counts))
  before = np.cumsum(counts[order]) - counts[order]  # interactions ahead
  head[order] = (before < share * total) & (counts[order] > 0)
  return head


def long_tail_share(lists: np.ndarray, popularity: np.ndarray,
                    share: float = 0.8) -> float:
  """Share of the recommended places (over all lists) holding an item
  outside the short head (short_head: the most popular items making up
  `share` = 80% of train interactions)."""
  lists = np.asarray(lists, np.int64)
  items = lists[lists > 0]
  if not len(items):
    return float("nan")
  return float(np.mean(~short_head(popularity, share)[items]))


def interaction_counts(behaviors, num_rows: int) -> np.ndarray:
  """[num_rows] train interactions of each item of a Behaviors split: the
  number of distinct users with it in a history or a clicked candidate."""
  hist_rows = np.repeat(np.arange(len(behaviors)), behaviors.history_lengths())
  cand_rows = np.repeat(np.arange(len(behaviors)), behaviors.num_candidates())
  clicked = np.asarray(behaviors.cand_labels) == 1
  rows = np.concatenate([hist_rows, cand_rows[clicked]])
  items = np.concatenate([behaviors.history_items,
                          behaviors.cand_items[clicked]]).astype(np.int64)
  _, users = np.unique(np.asarray(behaviors.user_ids), return_inverse=True)
  pairs = np.unique(users.reshape(-1)[rows].astype(np.int64) * num_rows + items)
  return np.bincount(pairs % num_rows, minlength=num_rows).astype(np.int64)


def beyond_accuracy(lists: np.ndarray, item_vecs: np.ndarray,
                    popularity: np.ndarray, *,
                    catalogue: np.ndarray | None = None) -> dict[str, float]:
  """Beyond-accuracy figures of top-K lists.

  Args:
    lists: [U, K] recommended item rows, 0 for an empty place.
    item_vecs: [N+1, D] item vectors (row 0: padding).
    popularity: [N+1] train interaction counts per item.
    catalogue: [N+1] bool, the recommendable items (default: rows 1..N).

  Returns:
    {"coverage", "diversity", "novelty", "long_tail_share", "num_lists"}:
    catalogue_coverage, intra_list_diversity, novelty (bits) and
    long_tail_share.
  """
  lists = np.asarray(lists, np.int64).reshape(len(lists), -1)
  num_items = len(popularity) - 1
  return {
      "coverage": catalogue_coverage(lists, num_items, catalogue=catalogue),
      "diversity": intra_list_diversity(lists, item_vecs),
      "novelty": novelty(lists, popularity),
      "long_tail_share": long_tail_share(lists, popularity),
      "num_lists": int(len(lists)),
  }
