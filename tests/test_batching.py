"""Tests for the numpy train/eval batchers."""

import dataclasses

import numpy as np
import pytest

from genre_jax.data import batching
from genre_jax.data import mind
from genre_jax.data import synthetic
from genre_jax.data import types

K = 4
H = 6


def _behaviors(rows, users=None):
  """Behaviors from [(history, [(item, label), ...]), ...]."""
  def offsets(lists):
    return np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(
        np.int64)
  hists = [r[0] for r in rows]
  cands = [r[1] for r in rows]
  m = len(rows)
  return types.Behaviors(
      impression_ids=np.array([str(i + 1) for i in range(m)], object),
      user_ids=np.array([f"U{i}" for i in range(m)], object),
      users=(np.arange(1, m + 1, dtype=np.int32) if users is None
             else np.asarray(users, np.int32)),
      history_offsets=offsets(hists),
      history_items=np.array([i for h in hists for i in h], np.int32),
      cand_offsets=offsets(cands),
      cand_items=np.array([i for c in cands for i, _ in c], np.int32),
      cand_labels=np.array([l for c in cands for _, l in c], np.int8))


def _items(n, synthetic_items=(), popularity=None):
  syn = np.zeros(n + 1, bool)
  syn[list(synthetic_items)] = True
  return types.ItemTable(
      ids=np.array([""] + [f"N{i}" for i in range(1, n + 1)], object),
      text={"title": np.array([""] * (n + 1), object)},
      synthetic=syn,
      popularity=(np.ones(n + 1, np.int64) if popularity is None
                  else np.asarray(popularity, np.int64)))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  """Synthetic train split with one user per impression (row = user - 1)."""
  root = tmp_path_factory.mktemp("synth")
  synthetic.write_synthetic(str(root), num_users=120, num_items=200,
                            num_topics=5, seed=0)
  ds = mind.read_mind_dir(str(root))
  train = ds.splits["train"]
  train = dataclasses.replace(
      train, users=np.arange(1, len(train) + 1, dtype=np.int32))
  # Mark a few items synthetic: they must never be sampled.
  ds.items.synthetic[1:6] = True
  return ds, train


def _reference_history(hist, pos, length):
  kept = [i for i in hist if i != pos][-length:]
  return kept + [0] * (length - len(kept))


def _check_train_batch(batch, beh, items, k, h):
  b = len(batch["weights"])
  assert batch["history"].shape == (b, h)
  assert batch["candidates"].shape == (b, 1 + k)
  assert batch["history"].dtype == np.int32
  assert batch["candidates"].dtype == np.int32
  assert batch["labels"].dtype == np.float32
  for row in np.nonzero(batch["weights"] == 1.0)[0]:
    m = batch["users"][row] - 1
    hist = list(beh.history_items[beh.history_offsets[m]:
                                  beh.history_offsets[m + 1]])
    lo, hi = beh.cand_offsets[m], beh.cand_offsets[m + 1]
    clicked = set(beh.cand_items[lo:hi][beh.cand_labels[lo:hi] == 1])
    cands = batch["candidates"][row]
    pos = cands[0]
    assert pos in clicked
    assert list(batch["history"][row]) == _reference_history(hist, pos, h)
    assert pos not in batch["history"][row]
    np.testing.assert_array_equal(batch["history_mask"][row],
                                  batch["history"][row] != 0)
    negs = cands[1:]
    assert len(set(cands)) == 1 + k
    assert not set(negs) & clicked
    assert not set(negs) & set(hist)
    assert not items.synthetic[negs].any()
    assert (negs != 0).all()
    assert batch["candidate_mask"][row].all()
    np.testing.assert_array_equal(batch["labels"][row],
                                  np.eye(1, 1 + k)[0].astype(np.float32))


def test_train_batches_obey_the_sampling_rules(synth):
  ds, train = synth
  tb = batching.TrainBatcher(train, ds.items, batch_size=64, history_len=H,
                             num_negatives=K, seed=0)
  seen = []
  for batch in tb.epoch(0):
    _check_train_batch(batch, train, ds.items, K, H)
    real = batch["weights"] == 1
    seen += list(zip(batch["users"][real], batch["candidates"][real, 0]))
  # Every click of the split is one sample, exactly once.
  rows = np.repeat(np.arange(len(train)), train.num_candidates())
  clicks = list(zip(rows[train.cand_labels == 1] + 1,
                    train.cand_items[train.cand_labels == 1]))
  assert sorted(seen) == sorted(clicks)
  assert tb.num_samples == len(clicks)


def test_padding_rows_and_drop_remainder(synth):
  ds, train = synth
  tb = batching.TrainBatcher(train, ds.items, batch_size=64, history_len=H,
                             num_negatives=K, seed=0)
  batches = list(tb.epoch(0))
  assert len(batches) == tb.steps_per_epoch() == -(-tb.num_samples // 64)
  last = batches[-1]
  num_pad = 64 * len(batches) - tb.num_samples
  assert num_pad > 0
  pad = last["weights"] == 0
  assert pad.sum() == num_pad and pad[-num_pad:].all()
  assert not last["candidate_mask"][pad].any()
  assert not last["history_mask"][pad].any()
  assert all((b["weights"] == 1).all() for b in batches[:-1])
  dropped = batching.TrainBatcher(train, ds.items, batch_size=64,
                                  history_len=H, num_negatives=K, seed=0,
                                  drop_remainder=True)
  kept = list(dropped.epoch(0))
  assert len(kept) == tb.num_samples // 64
  assert all((b["weights"] == 1).all() for b in kept)


def test_deterministic_per_seed_and_epoch(synth):
  ds, train = synth
  def run(seed, epoch):
    tb = batching.TrainBatcher(train, ds.items, batch_size=32, history_len=H,
                               num_negatives=K, seed=seed)
    return list(tb.epoch(epoch))
  a, b, c = run(0, 0), run(0, 0), run(0, 1)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  # Another epoch: another order, and other negatives for the same click.
  assert not np.array_equal(a[0]["users"], c[0]["users"])
  negs = lambda batches: {
      (u, p): tuple(sorted(n)) for batch in batches
      for u, p, n in zip(batch["users"], batch["candidates"][:, 0],
                         batch["candidates"][:, 1:])}
  na, nc = negs(a), negs(c)
  assert sum(na[key] != nc[key] for key in na) > len(na) // 2


def test_process_slices_partition_the_global_batch(synth):
  ds, train = synth
  kw = dict(batch_size=48, history_len=H, num_negatives=K, seed=5)
  whole = list(batching.TrainBatcher(train, ds.items, **kw).epoch(2))
  parts = [list(batching.TrainBatcher(train, ds.items, process_index=i,
                                      process_count=3, **kw).epoch(2))
           for i in range(3)]
  assert all(len(p) == len(whole) for p in parts)
  for step, batch in enumerate(whole):
    for key in batch:
      joined = np.concatenate([p[step][key] for p in parts])
      np.testing.assert_array_equal(joined, batch[key])
  assert parts[0][0]["weights"].shape == (16,)


def test_top_up_when_an_impression_has_few_negatives():
  items = _items(12, synthetic_items=[11],
                 popularity=[0] + [1] * 9 + [500, 0, 0])
  beh = _behaviors([
      ([3, 5, 2], [(2, 1), (4, 0), (6, 0), (7, 0), (8, 0), (11, 0)]),
      ([1], [(9, 1), (10, 1), (3, 0)]),
      ([], [(4, 1)]),
      ([10, 2, 7], [(5, 1), (7, 0)]),  # A candidate already in history.
  ])
  tb = batching.TrainBatcher(beh, items, batch_size=8, history_len=H,
                             num_negatives=K, seed=0)
  assert tb.num_samples == 5
  counts = np.zeros(13, int)
  for epoch in range(20):
    (batch,) = tb.epoch(epoch)
    _check_train_batch(batch, beh, items, K, H)
    for row in np.nonzero(batch["weights"])[0]:
      m = batch["users"][row] - 1
      negs = set(batch["candidates"][row, 1:])
      if m == 0:  # 4 usable negatives (11 is synthetic): exactly those.
        assert negs == {4, 6, 7, 8}
      if m == 1:  # The impression's own negative always comes first.
        assert 3 in negs
      if m == 2:  # No impression negatives: all four come from the pool.
        counts[list(negs)] += 1
  # Top-up follows popularity: item 10 is far more popular than the rest.
  assert counts[10] >= 19
  assert counts[10] > 2 * counts[[1, 2, 3, 5, 6, 7, 8, 9, 12]].max()
  assert counts[[4, 11, 0]].sum() == 0


def test_too_small_pool_raises():
  items = _items(3)
  beh = _behaviors([([1], [(2, 1)])])
  tb = batching.TrainBatcher(beh, items, batch_size=2, history_len=H,
                             num_negatives=2, seed=0)
  with pytest.raises(ValueError, match="num_negatives"):
    list(tb.epoch(0))


def test_bad_batch_size_for_processes_raises(synth):
  ds, train = synth
  with pytest.raises(ValueError, match="batch_size"):
    batching.TrainBatcher(train, ds.items, batch_size=10, history_len=H,
                          num_negatives=K, seed=0, process_count=3)


def test_last_items_matches_a_python_reference():
  rng = np.random.default_rng(0)
  hists = [list(rng.integers(1, 30, size=n)) for n in [0, 1, 5, 9, 20, 3]]
  beh = _behaviors([(h, [(1, 1)]) for h in hists])
  rows = np.array([5, 4, 3, 2, 1, 0, 4])
  exclude = np.array([h[-1] if h else 7 for h in hists])[rows]
  got, mask = batching.last_items(beh.history_offsets, beh.history_items,
                                  rows, 8, exclude=exclude)
  for r, m in enumerate(rows):
    assert list(got[r]) == _reference_history(hists[m], exclude[r], 8)
    assert mask[r].sum() == min(len([i for i in hists[m]
                                     if i != exclude[r]]), 8)


def test_eval_batcher_covers_every_impression(synth):
  ds, _ = synth
  dev = ds.splits["dev"]
  for count in (1, 2):
    parts = [batching.EvalBatcher(dev, batch_size=16, history_len=H,
                                  process_index=i, process_count=count)
             for i in range(count)]
    c = parts[0].max_candidates
    assert c % 8 == 0 and c >= dev.num_candidates().max()
    assert c - dev.num_candidates().max() < 8
    seen = []
    for batches in zip(*parts):
      for batch in batches:
        assert batch["candidates"].shape == (16 // count, c)
        assert batch["impressions"].dtype == np.int64
        for row, m in enumerate(batch["impressions"]):
          if m < 0:
            assert batch["weights"][row] == 0
            assert not batch["candidate_mask"][row].any()
            continue
          seen.append(m)
          lo, hi = dev.cand_offsets[m], dev.cand_offsets[m + 1]
          n = hi - lo
          np.testing.assert_array_equal(batch["candidates"][row, :n],
                                        dev.cand_items[lo:hi])
          np.testing.assert_array_equal(batch["labels"][row, :n],
                                        dev.cand_labels[lo:hi])
          assert batch["candidate_mask"][row].sum() == n
          assert (batch["candidates"][row, n:] == 0).all()
          hist = list(dev.history_items[dev.history_offsets[m]:
                                        dev.history_offsets[m + 1]])
          assert list(batch["history"][row]) == _reference_history(
              hist, None, H)
          assert batch["users"][row] == dev.users[m]
          assert batch["weights"][row] == 1
    assert seen == list(range(len(dev)))  # File order, each exactly once.


def test_dedup_layout_reconstructs_every_slot(synth):
  ds, train = synth
  plain = batching.TrainBatcher(train, ds.items, batch_size=16,
                                history_len=H, num_negatives=K, seed=3)
  capacity = plain.max_unique_items(range(2))
  dedup = batching.TrainBatcher(train, ds.items, batch_size=16,
                                history_len=H, num_negatives=K, seed=3,
                                unique_items=capacity)
  for epoch in range(2):
    for a, b in zip(plain.epoch(epoch), dedup.epoch(epoch)):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
      assert b["item_ids"].shape == (capacity,)
      np.testing.assert_array_equal(b["item_ids"][b["history_pos"]],
                                    a["history"])
      np.testing.assert_array_equal(b["item_ids"][b["candidate_pos"]],
                                    a["candidates"])
      used = np.unique(np.concatenate([a["history"].ravel(),
                                       a["candidates"].ravel()]))
      assert len(set(b["item_ids"][:len(used)])) == len(used)
  # One capacity too small is a clear error, not a silent overflow.
  small = batching.TrainBatcher(train, ds.items, batch_size=16,
                                history_len=H, num_negatives=K, seed=3,
                                unique_items=4)
  with pytest.raises(Exception, match="distinct items"):
    next(small.epoch(0))


def test_dedup_positions_of_a_second_process_point_into_its_block(synth):
  ds, train = synth
  kwargs = dict(batch_size=16, history_len=H, num_negatives=K, seed=1,
                process_count=2, unique_items=128)
  first = next(batching.TrainBatcher(train, ds.items, process_index=0,
                                     **kwargs).epoch(0))
  second = next(batching.TrainBatcher(train, ds.items, process_index=1,
                                      **kwargs).epoch(0))
  # The global item_ids is the two local blocks, one after the other.
  global_ids = np.concatenate([first["item_ids"], second["item_ids"]])
  for local in (first, second):
    np.testing.assert_array_equal(global_ids[local["history_pos"]],
                                  local["history"])
    np.testing.assert_array_equal(global_ids[local["candidate_pos"]],
                                  local["candidates"])
  assert second["history_pos"].min() >= 128


def test_profiles_ride_along_in_train_and_eval_batches(synth):
  ds, train = synth
  profiles = np.arange(len(train), dtype=np.int32) % 7  # 0 = no profile
  with_profiles = dataclasses.replace(train, profiles=profiles)
  batcher = batching.TrainBatcher(with_profiles, ds.items, batch_size=8,
                                  history_len=H, num_negatives=K, seed=0,
                                  unique_items=256)
  batch = next(batcher.epoch(0))
  rows = batch["users"] - 1  # one user per impression in this fixture
  real = batch["weights"] > 0
  np.testing.assert_array_equal(batch["profile"][real], profiles[rows[real]])
  np.testing.assert_array_equal(batch["item_ids"][batch["profile_pos"]],
                                batch["profile"])
  evaluation = next(iter(batching.EvalBatcher(with_profiles, batch_size=8,
                                              history_len=H)))
  np.testing.assert_array_equal(evaluation["profile"], profiles[:8])
