"""Spectral co-occurrence vectors of the train split, against numpy's eigh."""

from __future__ import annotations

import numpy as np
import pytest

from genre_jax.data import cooccurrence
from genre_jax.data.types import Behaviors


def _behaviors(rng, num_users: int, num_items: int, rows: int) -> Behaviors:
  """Random impressions: a history of 0-5 items, 1 click among 4."""
  hist, cands, labels, users = [], [], [], []
  for _ in range(rows):
    user = int(rng.integers(1, num_users + 1))
    # Users prefer items near their own number: structured co-occurrence.
    centre = user * num_items // num_users
    near = np.clip(centre + rng.integers(-6, 7, 9), 1, num_items)
    hist.append(near[:rng.integers(0, 6)])
    cands.append(near[5:9])
    labels.append([1, 0, 0, 0])
    users.append(user)
  offsets = lambda parts: np.r_[0, np.cumsum([len(p) for p in parts])]
  m = len(users)
  return Behaviors(
      impression_ids=np.arange(m).astype(object),
      user_ids=np.array([f"U{u}" for u in users], object),
      users=np.array(users, np.int32),
      history_offsets=offsets(hist).astype(np.int64),
      history_items=np.concatenate(hist).astype(np.int32),
      cand_offsets=offsets(cands).astype(np.int64),
      cand_items=np.concatenate(cands).astype(np.int32),
      cand_labels=np.concatenate(labels).astype(np.int8))


def _reference(train: Behaviors, num_items: int, dim: int) -> np.ndarray:
  """[N+1, N+1] Gram matrix of the top-`dim` eigenpairs (eigenvalues
  clipped at 0) of n(a, b) / sqrt(n(a) n(b)), a != b, from sets of users."""
  owners = [set() for _ in range(num_items + 1)]
  for m in range(len(train)):
    h = train.history_items[train.history_offsets[m]:
                            train.history_offsets[m + 1]]
    c = train.cand_items[train.cand_offsets[m]:train.cand_offsets[m + 1]]
    l = train.cand_labels[train.cand_offsets[m]:train.cand_offsets[m + 1]]
    for item in list(h) + list(c[l == 1]):
      owners[item].add(int(train.users[m]))
  size = num_items + 1
  matrix = np.zeros((size, size))
  for a in range(size):
    for b in range(size):
      if a != b and owners[a] and owners[b]:
        matrix[a, b] = len(owners[a] & owners[b]) / np.sqrt(
            len(owners[a]) * len(owners[b]))
  values, vectors = np.linalg.eigh(matrix)
  top = np.argsort(-values)[:dim]
  vecs = vectors[:, top] * np.sqrt(np.maximum(values[top], 0.0))
  return vecs @ vecs.T


@pytest.mark.parametrize("num_users, num_items, dim", [
    (30, 40, 6),     # rank 30 <= 2 dim + 64: the dense SVD
    (300, 120, 8),   # rank 120 > 2 dim + 64: ARPACK (scipy svds)
])
def test_spectral_vectors_span_the_top_of_the_normalised_counts(
    num_users, num_items, dim):
  rng = np.random.default_rng(0)
  train = _behaviors(rng, num_users, num_items, 4 * num_users)
  vectors = cooccurrence.spectral_item_vectors(train, num_items, dim)
  assert vectors.shape == (num_items + 1, dim)
  assert vectors.dtype == np.float32
  # Inner products are what the eigenvectors define (their signs and, for
  # equal eigenvalues, their basis are not).
  np.testing.assert_allclose(vectors @ vectors.T,
                             _reference(train, num_items, dim), atol=2e-5)
  assert not vectors[0].any()  # padding
  seen = np.zeros(num_items + 1, bool)
  seen[train.history_items] = True
  seen[train.cand_items[train.cand_labels == 1]] = True
  assert not vectors[~seen].any()
  # Deterministic, signs included.
  np.testing.assert_array_equal(
      vectors, cooccurrence.spectral_item_vectors(train, num_items, dim))


def test_more_dimensions_than_the_rank_are_zero_padded():
  train = _behaviors(np.random.default_rng(1), 5, 30, 20)
  vectors = cooccurrence.spectral_item_vectors(train, 30, 16)
  assert vectors.shape == (31, 16)
  assert not vectors[:, 5:].any()  # 5 users: rank 5
  np.testing.assert_allclose(vectors @ vectors.T, _reference(train, 30, 5),
                             atol=2e-5)


def test_cached_vectors_are_computed_once_per_train_split_and_dim(
    tmp_path, monkeypatch):
  rng = np.random.default_rng(2)
  train = _behaviors(rng, 30, 40, 120)
  other = _behaviors(rng, 30, 40, 120)
  first = cooccurrence.cached_spectral_item_vectors(train, 40, 6, tmp_path)
  np.testing.assert_array_equal(
      first, cooccurrence.spectral_item_vectors(train, 40, 6))
  assert [p.name.startswith("spectral6_") for p in tmp_path.iterdir()] == [
      True]

  def not_again(*args):
    raise AssertionError(f"computed again: {args[1:]}")

  real = cooccurrence.spectral_item_vectors
  monkeypatch.setattr(cooccurrence, "spectral_item_vectors", not_again)
  np.testing.assert_array_equal(
      cooccurrence.cached_spectral_item_vectors(train, 40, 6, tmp_path), first)
  # Another split or another dim is another file.
  monkeypatch.setattr(cooccurrence, "spectral_item_vectors", real)
  np.testing.assert_array_equal(
      cooccurrence.cached_spectral_item_vectors(other, 40, 6, tmp_path),
      real(other, 40, 6))
  assert cooccurrence.cached_spectral_item_vectors(
      train, 40, 4, tmp_path).shape == (41, 4)
  assert len(list(tmp_path.iterdir())) == 3


def test_a_damaged_cache_file_is_computed_again(tmp_path):
  train = _behaviors(np.random.default_rng(3), 30, 40, 120)
  want = cooccurrence.cached_spectral_item_vectors(train, 40, 6, tmp_path)
  (path,) = tmp_path.iterdir()
  path.write_bytes(path.read_bytes()[:100])  # truncated by a failing disk
  np.testing.assert_array_equal(
      cooccurrence.cached_spectral_item_vectors(train, 40, 6, tmp_path), want)
  np.testing.assert_array_equal(np.load(path), want)  # rewritten whole


def test_a_cache_folder_that_cannot_be_written_only_costs_time(tmp_path):
  train = _behaviors(np.random.default_rng(4), 30, 40, 120)
  blocked = tmp_path / "file"
  blocked.write_text("")  # a file where the cache folder should be
  np.testing.assert_array_equal(
      cooccurrence.cached_spectral_item_vectors(train, 40, 6, blocked / "c"),
      cooccurrence.spectral_item_vectors(train, 40, 6))
