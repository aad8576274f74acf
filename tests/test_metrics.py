"""Metric code against scikit-learn and a direct per-impression numpy reference."""

import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from genre_jax import metrics


def _reference(scores, labels):
  """Metrics of one impression by brute force: MRR and nDCG@k averaged over
  every order of its tied candidates (each equally likely), AUC by sklearn."""
  scores, labels = np.asarray(scores, float), np.asarray(labels, float)
  groups = [np.flatnonzero(scores == s) for s in np.unique(scores)[::-1]]
  orders = np.array([np.concatenate(p) for p in itertools.product(
      *(itertools.permutations(g) for g in groups))])  # [P, n]
  y = labels[orders]  # [P, n] labels in ranked order
  rank = np.arange(1, len(labels) + 1)
  mrr = np.sum(y / rank, axis=1) / labels.sum()

  def dcg(y_sorted, k):  # [..., n] -> [...]
    return np.sum((2 ** y_sorted[..., :k] - 1) / np.log2(rank[:k] + 1), -1)

  ideal = np.sort(labels)[::-1]
  return {
      "auc": roc_auc_score(labels, scores),
      "mrr": mrr.mean(),
      "ndcg5": (dcg(y, 5) / dcg(ideal, 5)).mean(),
      "ndcg10": (dcg(y, 10) / dcg(ideal, 10)).mean(),
  }


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn_and_reference(seed):
  rng = np.random.default_rng(seed)
  num_rows, width = 60, 25
  lengths = rng.integers(2, width + 1, num_rows)
  scores = rng.normal(size=(num_rows, width))
  # Coarse scores on some short rows so ties are exercised (the reference
  # enumerates every order of the tied candidates).
  lengths[::3] = np.minimum(lengths[::3], 7)
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
  # The figures are means over the selected impressions only (random
  # scores: the first half's differ from all rows').
  for key in metrics.METRIC_KEYS:
    assert half[key] == pytest.approx(np.mean(got[key][:2000]), rel=1e-12)
    assert half[key] != pytest.approx(summary[key], rel=1e-6), key


def test_ties_are_averaged_over_random_orders_not_candidate_order():
  # A constant scorer ranks nothing: it gets the same (chance) figures
  # wherever the clicked item is listed, not MRR 1.0 when it comes first.
  labels = np.eye(4)  # [4, 4]: the clicked item at each position in turn
  got = metrics.impression_metrics(np.zeros((4, 4)), labels)
  expected_mrr = np.mean(1 / np.arange(1, 5))  # 0.5208
  np.testing.assert_allclose(got["mrr"], expected_mrr, rtol=1e-12)
  np.testing.assert_allclose(got["auc"], 0.5, rtol=1e-12)
  np.testing.assert_allclose(
      got["ndcg5"], np.mean(1 / np.log2(np.arange(2, 6))), rtol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_small_tied_padded_impressions_match_brute_force(seed):
  # Several positives, ties across and within classes, padding with scores
  # that would tie with or outrank real ones if they were compared.
  rng = np.random.default_rng(100 + seed)
  num_rows, width = 80, 7
  lengths = rng.integers(2, width + 1, num_rows)
  scores = rng.integers(-2, 3, (num_rows, width)).astype(float)
  scores[::4] = rng.normal(size=scores[::4].shape)  # some rows untied
  labels = (rng.random((num_rows, width)) < 0.4).astype(np.int8)
  mask = np.arange(width)[None] < lengths[:, None]
  scores[~mask] = rng.choice([-np.inf, np.inf, np.nan, 0.0, 2.0],
                             int((~mask).sum()))
  got = metrics.impression_metrics(scores, labels, mask)
  checked = 0
  for i in range(num_rows):
    y, s = labels[i, :lengths[i]], scores[i, :lengths[i]]
    if y.min() == y.max():
      assert not got["valid"][i] and np.isnan(got["auc"][i])
      continue
    ref = _reference(s, y)
    for key in metrics.METRIC_KEYS:
      np.testing.assert_allclose(got[key][i], ref[key], rtol=1e-9,
                                 err_msg=f"row {i} {key}")
    checked += 1
  assert checked > num_rows // 2


def test_non_finite_real_scores_give_nan_never_a_figure():
  # A diverged model (NaN or infinite scores) must not look like a ranking,
  # and a real -inf must not tie with the padding.
  labels = np.array([[1, 0, 0, 0]] * 4 + [[0, 1, 0, 0]])
  mask = np.array([[True, True, True, True]] * 4 + [[True, True, False,
                                                      False]])
  scores = np.array([
      [np.nan] * 4,  # all NaN
      [0.3, np.nan, 0.1, 0.2],  # one NaN
      [np.inf, 0.0, 0.1, 0.2],  # +inf on the clicked item
      [0.3, -np.inf, 0.1, 0.2],  # -inf on a real candidate
      [-np.inf, 0.0, -np.inf, -np.inf],  # -inf real, -inf padding
  ])
  got = metrics.impression_metrics(scores, labels, mask)
  assert got["valid"].all()
  for key in metrics.METRIC_KEYS:
    assert np.isnan(got[key]).all(), (key, got[key])
    # Any average over such an impression is NaN too.
    assert np.isnan(metrics.summarize(got)[key])
  # Non-finite scores on padding alone are ignored.
  fine = metrics.impression_metrics(
      np.array([[0.0, 1.0, np.nan, -np.inf]]), np.array([[0, 1, 0, 0]]),
      np.array([[True, True, False, False]]))
  for key in metrics.METRIC_KEYS:
    assert fine[key][0] == 1.0, key
