"""Metric code against scikit-learn and a direct per-impression numpy reference."""

import functools
import itertools
import json

import jax
import numpy as np
import pytest
from sklearn.metrics import log_loss, ndcg_score, roc_auc_score

from genre_jax import metrics
from genre_jax.data.types import Behaviors


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


# --- Chosen metrics (config.eval.metrics), pooled metrics, losses -------------

AT_K = ("ndcg5", "ndcg10", "ndcg@1", "ndcg@3", "ndcg@7", "hit@1", "hit@2",
        "hit@4", "hit@30", "recall@1", "recall@3", "recall@30")


def _brute_at_k(scores, labels, names):
  """hit@K, recall@K and ndcg@K of one impression averaged over every
  order of its tied candidates, by enumeration."""
  scores, labels = np.asarray(scores, float), np.asarray(labels, float)
  groups = [np.flatnonzero(scores == s) for s in np.unique(scores)[::-1]]
  orders = np.array([np.concatenate(p) for p in itertools.product(
      *(itertools.permutations(g) for g in groups))])
  y = labels[orders]  # [P, n]
  disc = 1 / np.log2(np.arange(2, len(labels) + 2))
  ideal = np.sort(labels)[::-1]
  out = {}
  for name in names:
    kind, k = metrics.parse_metric(name)
    if kind == "hit":
      out[name] = y[:, :k].max(1).mean()
    elif kind == "recall":
      out[name] = (y[:, :k].sum(1) / labels.sum()).mean()
    else:
      out[name] = ((y[:, :k] * disc[:k]).sum(1) /
                   (ideal[:k] * disc[:k]).sum()).mean()
  return out


def _random_impressions(seed, num_rows=80, width=7, tie_levels=5):
  """Small padded impressions with ties in scores, several clicks and
  NaN/inf scores on the padding."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, width + 1, num_rows)
  scores = rng.integers(-2, tie_levels - 2, (num_rows, width)).astype(float)
  scores[::4] = rng.normal(size=scores[::4].shape)
  labels = (rng.random((num_rows, width)) < 0.35).astype(np.int8)
  mask = np.arange(width)[None] < lengths[:, None]
  scores[~mask] = rng.choice([-np.inf, np.inf, np.nan, 0.0, 2.0],
                             int((~mask).sum()))
  return scores, labels, mask


@pytest.mark.parametrize("seed", range(3))
def test_at_k_metrics_match_sklearn_and_brute_force(seed):
  scores, labels, mask = _random_impressions(200 + seed)
  got = metrics.impression_metrics(scores, labels, mask, ("auc",) + AT_K)
  checked = 0
  for i in range(len(scores)):
    n = mask[i].sum()
    y, s = labels[i, :n], scores[i, :n]
    if y.min() == y.max():
      assert not got["valid"][i]
      assert all(np.isnan(got[name][i]) for name in AT_K)
      continue
    ref = _brute_at_k(s, y, AT_K)
    for name in AT_K:
      np.testing.assert_allclose(got[name][i], ref[name], rtol=1e-9,
                                 err_msg=f"row {i} {name}")
      kind, k = metrics.parse_metric(name)
      if kind == "ndcg":  # sklearn averages tied scores' gains the same way
        np.testing.assert_allclose(
            got[name][i], ndcg_score(y[None], s[None], k=k), rtol=1e-9,
            err_msg=f"row {i} {name}")
    assert got["auc"][i] == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    checked += 1
  assert checked > 30
  # "ndcg5" and "ndcg@5" are one metric under two names.
  both = metrics.impression_metrics(scores, labels, mask, ("ndcg5", "ndcg@5"))
  np.testing.assert_array_equal(both["ndcg5"], both["ndcg@5"])


def test_at_k_metrics_without_ties_on_wide_rows():
  rng = np.random.default_rng(7)
  num_rows, width = 50, 40
  lengths = rng.integers(2, width + 1, num_rows)
  scores = rng.normal(size=(num_rows, width))
  labels = (rng.random((num_rows, width)) < 0.15).astype(float)
  labels[np.arange(num_rows), 0] = 1
  labels[np.arange(num_rows), 1] = 0
  mask = np.arange(width)[None] < lengths[:, None]
  names = ("hit@3", "recall@5", "ndcg@12", "mrr")
  got = metrics.impression_metrics(scores, labels, mask, names)
  for i in range(num_rows):
    n = lengths[i]
    y = labels[i, :n][np.argsort(-scores[i, :n])]
    assert got["hit@3"][i] == float(y[:3].max())
    assert got["recall@5"][i] == pytest.approx(y[:5].sum() / y.sum())
    assert got["mrr"][i] == pytest.approx(
        np.sum(y / np.arange(1, n + 1)) / y.sum())
    assert got["ndcg@12"][i] == pytest.approx(
        ndcg_score(labels[i, :n][None], scores[i, :n][None], k=12))


def _gauc_reference(scores, labels, mask, users, select):
  """Per-user pooled AUC (sklearn), weighted by the user's impressions."""
  total = weight = 0.0
  for user in np.unique(users[select]):
    rows = select & (users == user)
    y, s = labels[rows][mask[rows]], scores[rows][mask[rows]]
    if y.min() == y.max():
      continue
    total += rows.sum() * roc_auc_score(y, s)
    weight += rows.sum()
  return total / weight


@pytest.mark.parametrize("seed", range(3))
def test_pooled_metrics_match_sklearn(seed):
  scores, labels, mask = _random_impressions(300 + seed, num_rows=120,
                                             width=9)
  rng = np.random.default_rng(seed)
  users = np.array([f"U{u}" for u in rng.integers(0, 25, len(scores))],
                   dtype=object)
  cold = rng.random(len(scores)) < 0.4
  names = ("gauc", "global_auc", "logloss", "auc", "hit@2")
  result = metrics.evaluate_scores(scores, labels, mask, metrics=names,
                                   users=users,
                                   selections={"all": None, "cold": cold})
  for key, select in (("all", np.ones(len(scores), bool)), ("cold", cold)):
    got = result[key]
    assert list(got)[:len(names)] == list(names)
    real = mask & select[:, None]
    y, s = labels[real], scores[real]
    assert got["global_auc"] == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    assert got["logloss"] == pytest.approx(
        log_loss(y, 1 / (1 + np.exp(-s)), labels=[0, 1]), rel=1e-9)
    assert got["gauc"] == pytest.approx(
        _gauc_reference(scores, labels, mask, users, select), rel=1e-12)
    per = metrics.impression_metrics(scores, labels, mask, names)
    assert got["auc"] == pytest.approx(
        np.mean(per["auc"][per["valid"] & select]), rel=1e-12)
    assert got["num_impressions"] == int((per["valid"] & select).sum())


def test_gauc_on_a_hand_built_example():
  # U1: two impressions pooled: clicks scored 0.9 and 0.2, non-clicks 0.1
  # and 0.8: 3 of 4 pairs right, AUC 0.75, weight 2. U2: one impression,
  # AUC 0.5, weight 1. U3: no click at all: skipped.
  scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.3, 0.6, 0.1],
                     [0.5, 0.4, 0.0]])
  labels = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]])
  mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]], bool)
  users = np.array(["U1", "U1", "U2", "U3"], dtype=object)
  got = metrics.evaluate_scores(scores, labels, mask, users=users,
                                metrics=("gauc", "auc"))["all"]
  assert got["gauc"] == pytest.approx((2 * 0.75 + 1 * 0.5) / 3)
  assert got["num_gauc_users"] == 2
  assert got["auc"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)  # per impression
  # Only the second and third impressions: U1 0.0 and U2 0.5, weight 1 each.
  some = metrics.evaluate_scores(
      scores, labels, mask, users=users, metrics=("gauc",),
      selections={"some": np.array([False, True, True, False])})["some"]
  assert some["gauc"] == pytest.approx(0.25)
  # A non-finite score of a user's real candidate: NaN, never a figure.
  broken = scores.copy()
  broken[0, 0] = np.nan
  for name in ("gauc", "global_auc", "logloss"):
    assert np.isnan(metrics.evaluate_scores(
        broken, labels, mask, users=users, metrics=(name,))["all"][name])


def test_metric_names_and_the_config_rule():
  from genre_jax import config as config_lib
  from genre_jax.errors import ConfigError

  assert metrics.parse_metric("ndcg10") == ("ndcg", 10)
  assert metrics.parse_metric("recall@20") == ("recall", 20)
  for bad in ("ndcg", "ndcg@0", "hit@", "hit@-1", "HIT@3", "precision@3",
              "auc ", 5):
    assert not metrics.is_metric_name(bad), bad
  assert metrics.evaluated_metrics(("mrr",)) == ("mrr", "auc")
  config = config_lib.base_config()
  assert config.eval.metrics == metrics.METRIC_KEYS
  config.eval.metrics = ("gauc", "hit@5", "recall@10", "ndcg@20",
                         "global_auc", "logloss")
  config_lib.validate(config)
  for bad in (("auc", "hit@0"), (), ("auc", "auc"), ("precision@5",)):
    config.eval.metrics = bad
    with pytest.raises(ConfigError) as e:
      config_lib.validate(config)
    assert "config.eval.metrics=" in str(e.value)
    assert "hit@K, recall@K, logloss" in str(e.value)


def test_beyond_accuracy_on_a_hand_built_example():
  vecs = np.array([[0, 0], [1, 0], [0, 1], [2, 0], [1, 1], [-1, 0]], float)
  lists = np.array([[1, 2, 0], [3, 5, 1]])  # 0: an empty place
  counts = np.array([0, 6, 2, 1, 1, 0])  # 10 train interactions
  got = metrics.beyond_accuracy(lists, vecs, counts)
  assert got["num_lists"] == 2
  assert got["coverage"] == pytest.approx(4 / 5)  # items 1, 2, 3, 5 of 5
  # List 1: cos(1, 2) = 0, distance 1. List 2: (3, 5) -> 2, (3, 1) -> 0,
  # (5, 1) -> 2: mean 4/3.
  assert got["diversity"] == pytest.approx((1 + 4 / 3) / 2)
  p = np.array([1, 7, 3, 2, 2, 1]) / 15  # (count + 1) / (10 + 5)
  bits = -np.log2(p)  # bits[0]: unused (padding)
  assert got["novelty"] == pytest.approx(
      ((bits[1] + bits[2]) / 2 + (bits[3] + bits[5] + bits[1]) / 3) / 2)
  # Head: items 1 (6) and 2 (2) reach 8 = 80% of 10; the tail holds 3, 4, 5.
  np.testing.assert_array_equal(metrics.short_head(counts),
                                [False, True, True, False, False, False])
  assert got["long_tail_share"] == pytest.approx(2 / 5)
  # A catalogue without item 5 (e.g. generated items): 3 of 4.
  catalogue = np.array([False, True, True, True, True, False])
  assert metrics.catalogue_coverage(lists, catalogue=catalogue) == 0.75
  # A one-item list has no pair; an unseen item is finite (smoothed).
  assert np.isnan(metrics.intra_list_diversity(np.array([[1]]), vecs))
  assert metrics.novelty(np.array([[5]]), counts) == pytest.approx(
      np.log2(15))
  assert not metrics.short_head(np.zeros(6)).any()


def test_interaction_counts_are_distinct_users_per_item():
  # U1 clicks 3 and 5 and has 1, 2 (and 3 again) in histories; U2 clicks 3.
  behaviors = Behaviors(
      impression_ids=np.array(["1", "2", "3"], dtype=object),
      user_ids=np.array(["U1", "U1", "U2"], dtype=object),
      users=np.array([1, 1, 2], np.int32),
      history_offsets=np.array([0, 2, 5, 5]),
      history_items=np.array([1, 2, 1, 2, 3], np.int32),
      cand_offsets=np.array([0, 2, 4, 6]),
      cand_items=np.array([3, 4, 5, 4, 1, 3], np.int32),
      cand_labels=np.array([1, 0, 1, 0, 0, 1], np.int8))
  np.testing.assert_array_equal(metrics.interaction_counts(behaviors, 7),
                                [0, 1, 1, 2, 0, 1, 0])


def _tiny_batch(config, dataset):
  """A model in eval mode (no dropout), its item table and one train batch
  with a padded candidate, a padding row and unequal row weights."""
  from flax import nnx
  from genre_jax import train
  from genre_jax.data import batching

  host_items, spec = train.model_inputs(config, dataset)
  parts, state = train.init_model(config, spec, total_steps=20)
  model = nnx.merge(parts.eval_graphdef, state["params"], parts.rest)
  batch = next(batching.TrainBatcher(
      dataset.splits["train"], dataset.items, batch_size=8, history_len=10,
      num_negatives=4, seed=0).epoch(0))
  batch["candidate_mask"][0, -1] = False
  batch["labels"][0, -1] = 0.0
  batch["weights"] = np.array([1, 0.5, 1, 2, 1, 1, 1, 0], np.float32)
  return model, host_items, batch, parts, state


def test_bce_loss_equals_numpy_and_softmax_is_unchanged(data_dir):
  from genre_jax import data as data_lib
  from genre_jax.config import load_preset
  from genre_jax.train import step as step_lib
  from tests.helpers import shrink

  config = shrink(load_preset("nrms"), data_dir)
  dataset = data_lib.load_dataset(config.data)
  model, items, batch, _, _ = _tiny_batch(config, dataset)
  logits = np.asarray(model(batch, items["tokens"], items["masks"])[0],
                      np.float64)
  y, real, w = batch["labels"], batch["candidate_mask"], batch["weights"]
  prob = 1 / (1 + np.exp(-np.where(real, logits, 0)))  # padded: -1e9
  with np.errstate(divide="ignore", invalid="ignore"):
    bce = np.where(real, -(y * np.log(prob) + (1 - y) * np.log(1 - prob)), 0)
  row = bce.sum(1) / real.sum(1)
  expected = np.sum(row * w) / w.sum()
  total, aux = step_lib.recommender_loss(model, batch, items, loss_type="bce")
  assert float(aux["loss"]) == pytest.approx(expected, rel=1e-5)
  assert float(total) == pytest.approx(expected, rel=1e-5)  # no aux loss
  # sklearn's log loss of one full row, unweighted.
  assert row[2] == pytest.approx(log_loss(y[2], prob[2], labels=[0, 1]),
                                 rel=1e-9)
  # The softmax path: the cross-entropy of the click over its candidates.
  top = np.where(real, logits, -np.inf).max(1, keepdims=True)
  log_norm = top + np.log(np.where(real, np.exp(logits - top), 0).sum(
      1, keepdims=True))
  ce = -np.where(real, y * (logits - log_norm), 0).sum(1)
  softmax = step_lib.recommender_loss(model, batch, items)[1]["loss"]
  assert float(softmax) == pytest.approx(np.sum(ce * w) / w.sum(), rel=1e-5)
  with pytest.raises(Exception, match="config.train.loss='hinge'"):
    step_lib.recommender_loss(model, batch, items, loss_type="hinge")


def test_bce_loss_trains(data_dir):
  from genre_jax import data as data_lib
  from genre_jax import train
  from genre_jax.config import load_preset
  from genre_jax.train import step as step_lib
  from tests.helpers import shrink

  config = shrink(load_preset("nrms"), data_dir)
  dataset = data_lib.load_dataset(config.data)
  _, items, batch, parts, state = _tiny_batch(config, dataset)
  mesh = train.make_mesh()
  rep = jax.sharding.NamedSharding(mesh, train.P())
  dat = jax.sharding.NamedSharding(mesh, train.P("data"))
  items, state = jax.device_put(items, rep), jax.device_put(state, rep)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in batch.items()}
  step = train.compile_train_step(
      parts, state, shapes, items, mesh, 0,
      loss_fn=functools.partial(step_lib.recommender_loss, loss_type="bce"))
  losses = []
  for _ in range(8):  # the same batch: its loss must fall
    state, m = step(state, train.to_global(batch, dat), items)
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all(), losses
  assert losses[-1] < losses[0] - 0.05, losses


def test_chosen_metrics_and_bce_through_train_and_evaluate(data_dir, tmp_path,
                                                          monkeypatch):
  from genre_jax import data as data_lib
  from genre_jax import train
  from genre_jax.config import load_preset
  from genre_jax.train import step as step_lib
  from tests.helpers import shrink

  config = shrink(load_preset("nrms"), data_dir, max_steps=3, loss="bce")
  names = ("gauc", "ndcg@3", "hit@2", "recall@5", "logloss", "global_auc",
           "mrr")
  config.eval.metrics = names
  used = []
  loss = step_lib.recommender_loss

  def spy(*args, **kwargs):
    used.append(kwargs.get("loss_type"))
    return loss(*args, **kwargs)

  monkeypatch.setattr(step_lib, "recommender_loss", spy)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"),
                                     dataset=data_lib.load_dataset(
                                         config.data))
  assert used and set(used) == {"bce"}
  for split in ("dev", "test"):
    for users in ("all", "cold"):
      got = summary[split][users]
      assert list(got)[:len(names) + 1] == [*names, "auc"], (split, users)
    assert all(np.isfinite(summary[split]["all"][k]) for k in (*names, "auc"))
  records = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert all(k in records[-1] for k in (*names, "auc"))
