"""Metric code against scikit-learn and a direct per-impression numpy reference."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from genre_jax import metrics


def _reference(scores, labels):
  """MIND-evaluation-style metrics for one impression, written row by row."""
  order = np.argsort(-scores, kind="stable")
  y = labels[order]
  mrr = np.sum(y / (np.arange(len(y)) + 1)) / np.sum(y)

  def dcg(y_sorted, k):
    y_sorted = y_sorted[:k]
    return np.sum((2 ** y_sorted - 1) / np.log2(np.arange(len(y_sorted)) + 2))

  ideal = np.sort(labels)[::-1]
  return {
      "auc": roc_auc_score(labels, scores),
      "mrr": mrr,
      "ndcg5": dcg(y, 5) / dcg(ideal, 5),
      "ndcg10": dcg(y, 10) / dcg(ideal, 10),
  }


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn_and_reference(seed):
  rng = np.random.default_rng(seed)
  num_rows, width = 60, 25
  lengths = rng.integers(2, width + 1, num_rows)
  scores = rng.normal(size=(num_rows, width))
  # Coarse scores on some rows so ties are exercised.
  scores[::3] = np.round(scores[::3])
  labels = (rng.random((num_rows, width)) < 0.2).astype(np.int8)
  mask = np.arange(width)[None] < lengths[:, None]
  for i in range(num_rows):  # guarantee both classes on most rows
    labels[i, rng.integers(lengths[i])] = 1
  labels[5, :] = 1  # a one-class row: must be skipped
  got = metrics.impression_metrics(scores, labels, mask)
  one_class = 0
  for i in range(num_rows):
    real = slice(0, lengths[i])
    y, s = labels[i, real], scores[i, real]
    if y.min() == y.max():
      assert not got["valid"][i]
      one_class += 1
      continue
    ref = _reference(s, y)
    for key in metrics.METRIC_KEYS:
      np.testing.assert_allclose(got[key][i], ref[key], rtol=1e-9, err_msg=key)
  summary = metrics.summarize(got)
  assert one_class >= 1 and summary["num_skipped"] == one_class
  assert summary["num_impressions"] == num_rows - one_class


def test_padding_scores_are_ignored():
  scores = np.array([[0.1, 0.9, 0.5, 100.0, -100.0]])
  labels = np.array([[0, 1, 0, 1, 1]])
  mask = np.array([[True, True, True, False, False]])
  got = metrics.impression_metrics(scores, labels, mask)
  assert got["auc"][0] == 1.0 and got["mrr"][0] == 1.0
  assert got["ndcg5"][0] == 1.0


def test_summarize_selection_and_random_scorer_near_half():
  rng = np.random.default_rng(0)
  labels = np.zeros((4000, 20))
  labels[:, 0] = 1
  got = metrics.impression_metrics(rng.random((4000, 20)), labels)
  summary = metrics.summarize(got)
  assert abs(summary["auc"] - 0.5) < 0.02
  half = metrics.summarize(got, select=np.arange(4000) < 2000)
  assert half["num_impressions"] == 2000
