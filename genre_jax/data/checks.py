"""Checks that a prepared dataset can train and select a model at all.

A dataset can be well-formed row by row and still useless as a whole (every
history empty, no dev impression with both a click and a non-click). Training
on it would run for minutes and report a constant model's metrics, so it is
refused up front, naming the file and the counts.
"""

from __future__ import annotations

import numpy as np

from genre_jax.data import types
from genre_jax.errors import ConfigError, DataFormatError


def _file_of(dataset: types.Dataset, split: str) -> str:
  stats = dataset.info.get("read_stats", {}).get(split, {})
  return str(stats.get("path") or f"{dataset.name} split '{split}'")


def split_counts(behaviors: types.Behaviors) -> dict[str, int]:
  """Impressions in all, with a history (or a GENRE profile), with a click,
  and scorable (a click and a non-click: what AUC, MRR and nDCG need)."""
  rows = np.repeat(np.arange(len(behaviors)), behaviors.num_candidates())
  clicks = np.bincount(rows, weights=behaviors.cand_labels == 1,
                       minlength=len(behaviors))
  skips = np.bincount(rows, weights=behaviors.cand_labels == 0,
                      minlength=len(behaviors))
  history = behaviors.history_lengths() > 0
  if behaviors.profiles is not None:
    history |= behaviors.profiles > 0
  return {"impressions": len(behaviors), "with_history": int(history.sum()),
          "with_click": int((clicks > 0).sum()),
          "scorable": int(((clicks > 0) & (skips > 0)).sum())}


def check_trainable(dataset: types.Dataset, dev_split: str) -> None:
  """Raises DataFormatError (naming the file, split and counts) unless the
  train split has clicks and histories, and the dev split (the split that
  selects the model: dev, test or the "valid" of config.data.validation)
  and a labelled test split, when there is one, have an impression to
  score; ConfigError for a dev_split the dataset lacks or that has no
  labels (an unlabelled test split is only ever ranked, never scored)."""
  if dev_split not in dataset.splits:
    raise ConfigError(f"config.eval.dev_split='{dev_split}': the dataset has "
                      f"the splits {sorted(dataset.splits)}")
  if not dataset.splits[dev_split].is_labelled():
    raise ConfigError(
        f"config.eval.dev_split='{dev_split}': that split has no labels "
        "(MIND-large's test), so it cannot select a model; select on dev")
  train = split_counts(dataset.splits["train"])
  where = _file_of(dataset, "train")
  if not train["with_click"]:
    raise DataFormatError(
        where, None, "impressions",
        f"the train split has no clicked candidate in its "
        f"{train['impressions']} impressions (labels are the -1 of "
        "'ITEM-1'): there is nothing to learn")
  if not train["with_history"]:
    raise DataFormatError(
        where, None, "history",
        f"every history of the train split is empty (0 of "
        f"{train['impressions']} impressions has a known history item): "
        "every user looks the same, so the model could only learn item "
        "popularity; check the history column (item ids of news.tsv, "
        "space-separated)")
  for split in dict.fromkeys([dev_split, "test"]):
    if split not in dataset.splits or not dataset.splits[split].is_labelled():
      continue
    counts = split_counts(dataset.splits[split])
    if not counts["scorable"]:
      role = ("model selection, config.eval.dev_split" if split == dev_split
              else "the reported test metrics")
      raise DataFormatError(
          _file_of(dataset, split), None, "impressions",
          f"no impression of the {split} split ({role}) can be scored: of "
          f"{counts['impressions']} impressions, {counts['with_click']} have "
          "a click and none has both a click and a non-click, which AUC, "
          "MRR and nDCG need")
