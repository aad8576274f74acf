r"""Content-free reference points on a MIND-format dataset: item co-occurrence
and popularity, with no text and no training.

How much of a title-only model's AUC could it get without reading the
titles? On Goodreads most titles are unique, so a word-piece model can learn
them as item identities; this script measures what item identity alone gives:

  cooccurrence  score(c) = sum over history items h of
                n(h, c) / sqrt(n(h) n(c)), where n(h, c) counts the train
                users who have both h and c (in a history or clicked) and
                n(i) those who have i: item-based collaborative filtering.
  spectral      score(c) = sum over history items h of <e_h, e_c>, e the
                --spectral_dim top spectral vectors of those normalised
                counts (data/cooccurrence.py; what model.hybrid.spectral_dim
                gives the id and hybrid item encoders).
  popularity    score(c) = how often c was shown in train impressions; the
                Goodreads negatives are drawn in proportion to popularity,
                so this should sit near 0.5.

Only the train split is read for the counts, as the models are trained on it.

  python experiments/goodreads_cooccurrence.py --data_dir=../shared/data/goodreads

Prints a table (--metrics, by default AUC, MRR, nDCG@5, nDCG@10, for all and
cold users per split)
and ends with one line of JSON: {scorer: {split: {"all": {...}, "cold":
{...}}}}.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from genre_jax import metrics
from genre_jax.data import mind
from genre_jax.data.cooccurrence import spectral_item_vectors, user_item_pairs
from genre_jax.data import types
from genre_jax.errors import exit_on_input_error
from genre_jax.logs import json_line

import common_flags

_DATA_DIR = common_flags.data_dir()
_SPLITS = common_flags.splits(["dev", "test"])
_COLD = common_flags.cold_threshold()
_SPECTRAL_DIM = flags.DEFINE_integer(
    "spectral_dim", 256, "Dimensions of the spectral scorer (0: skip it).")
_METRICS = flags.DEFINE_list(
    "metrics", list(metrics.METRIC_KEYS),
    f"Metrics to report ({metrics.METRIC_FORMS}).")


class Cooccurrence:
  """Item-item co-occurrence counts over users, looked up by pair. [P] keys."""

  def __init__(self, users: np.ndarray, items: np.ndarray, num_items: int):
    self.num_items = num_items
    self.item_users = np.bincount(items, minlength=num_items).astype(np.float64)
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    keys = []
    for s, e in zip(starts, ends):  # every ordered pair of one user's items
      own = items[s:e]
      a, b = np.meshgrid(own, own, indexing="ij")
      off_diagonal = a != b
      keys.append(a[off_diagonal] * num_items + b[off_diagonal])
    self.keys, self.counts = np.unique(
        np.concatenate(keys) if keys else np.zeros(0, np.int64),
        return_counts=True)

  def count(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """n(a, b) for aligned arrays of item indices."""
    keys = a.astype(np.int64) * self.num_items + b
    at = np.clip(np.searchsorted(self.keys, keys), 0, max(len(self.keys) - 1,
                                                          0))
    if not len(self.keys):
      return np.zeros(len(keys))
    return np.where(self.keys[at] == keys, self.counts[at], 0).astype(
        np.float64)

  def scores(self, split: types.Behaviors) -> np.ndarray:
    """[sum_c] candidate scores: normalised co-occurrence with the history."""
    hist_len, num_cand = split.history_lengths(), split.num_candidates()
    # Every (history item, candidate) pair of a row, flattened.
    pairs_per_row = hist_len * num_cand
    row = np.repeat(np.arange(len(split)), pairs_per_row)
    within = np.arange(pairs_per_row.sum()) - np.repeat(
        np.cumsum(pairs_per_row) - pairs_per_row, pairs_per_row)
    h = split.history_items[split.history_offsets[row] + within // num_cand[row]]
    c_flat = split.cand_offsets[row] + within % num_cand[row]
    c = split.cand_items[c_flat]
    norm = np.sqrt(np.maximum(self.item_users[h] * self.item_users[c], 1.0))
    return np.bincount(c_flat, weights=self.count(h, c) / norm,
                       minlength=len(split.cand_items))


def spectral_scores(split: types.Behaviors, vectors: np.ndarray,
                    chunk: int = 65536) -> np.ndarray:
  """[sum_c] candidate scores sum_h <e_h, e_c> (vectors [N+1, k])."""
  rows = np.repeat(np.arange(len(split)), split.history_lengths())
  users = np.zeros((len(split), vectors.shape[1]))
  np.add.at(users, rows, vectors[split.history_items])  # [R, k]
  cand_rows = np.repeat(np.arange(len(split)), split.num_candidates())
  scores = np.empty(len(split.cand_items))
  for start in range(0, len(scores), chunk):
    at = slice(start, start + chunk)
    scores[at] = np.einsum("ck,ck->c", vectors[split.cand_items[at]],
                           users[cand_rows[at]])
  return scores


def table(results: dict[str, dict[str, dict]]) -> str:
  return metrics.format_table(
      [("scorer", 14), ("split", 7)],
      [((scorer, split), r) for scorer, by_split in results.items()
       for split, r in by_split.items()])


def main(argv: Sequence[str]) -> None:
  del argv
  data_dir = os.path.abspath(os.path.expanduser(_DATA_DIR.value))
  splits = ["train"] + [s for s in _SPLITS.value if s != "train"]
  try:
    dataset = mind.read_mind_dir(data_dir, splits)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(f"--data_dir={data_dir}: {e}") from e
  missing = [s for s in splits if s not in dataset.splits]
  if missing:
    raise app.UsageError(f"--data_dir={data_dir} has no split {missing}")
  wanted = tuple(_METRICS.value)
  unknown = [m for m in wanted if not metrics.is_metric_name(m)]
  if unknown or not wanted:
    raise app.UsageError(f"--metrics: {unknown or 'none'}: use "
                         f"{metrics.METRIC_FORMS}")
  train = dataset.splits["train"]
  cooc = Cooccurrence(*user_item_pairs(train), len(dataset.items.ids))
  popularity = dataset.items.popularity.astype(np.float64)
  if _SPECTRAL_DIM.value < 0:
    raise app.UsageError(f"--spectral_dim={_SPECTRAL_DIM.value}: must be >= 0")
  tick = time.time()
  vectors = (spectral_item_vectors(train, dataset.items.num_items,
                                   _SPECTRAL_DIM.value)
             if _SPECTRAL_DIM.value else None)
  # What a run with model.hybrid.spectral_dim pays once (then cached).
  spectral_seconds = time.time() - tick if vectors is not None else None
  results: dict[str, dict[str, dict]] = {"cooccurrence": {}, "popularity": {}}
  if vectors is not None:
    results = {"cooccurrence": {}, "spectral": {}, "popularity": {}}
  for name in splits[1:]:
    split = dataset.splits[name]
    results["cooccurrence"][name] = metrics.behaviors_metrics(
        split, cooc.scores(split), _COLD.value, wanted)
    if vectors is not None:
      results["spectral"][name] = metrics.behaviors_metrics(
          split, spectral_scores(split, vectors), _COLD.value, wanted)
    results["popularity"][name] = metrics.behaviors_metrics(
        split, popularity[split.cand_items], _COLD.value, wanted)
  # The folder as given: a results folder keeps this table.
  print(f"Content-free scorers on {_DATA_DIR.value} (counts from train: "
        f"{len(train)} impressions, {len(cooc.keys)} co-occurring item pairs"
        + (f"; spectral: {_SPECTRAL_DIM.value} dimensions computed in "
           f"{spectral_seconds:.1f} s" if vectors is not None else "") + ")")
  print(table(results))
  print(json_line({**results, "spectral_seconds": spectral_seconds}))


if __name__ == "__main__":
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
