"""Vectorised numpy batching of behaviours into fixed-shape host batches.

TrainBatcher yields one sample per click (the clicked item plus K sampled
negatives, NRMS-style); EvalBatcher yields one row per impression with all
of its candidates. Every batch has the same shapes (the last one is padded
with weight-0 rows) so a jitted step compiles once. Work per batch is a few
gathers and scatters over [B, H] and [B, C] arrays: no per-row Python.

Multi-host: with P processes every process walks the same global order and
takes its contiguous slice of B/P rows of each global batch. Random draws
are made per global batch with global shapes, so a row's negatives do not
depend on P.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from genre_jax.data import types
from genre_jax.errors import ConfigError

# Pool draws per row and attempt when topping up negatives by popularity.
_TOP_UP_DRAWS = 16
_MAX_TOP_UP_ATTEMPTS = 64

# Reserved batch-key prefix of host-resident item fields' rows (an item
# table's "host" part, step.split_item_table): HOST_ROWS + "tokens/" + field
# and HOST_ROWS + "masks/" + field hold the rows [U, ...] of item_ids.
HOST_ROWS = "host_rows/"


def host_rows(host_table: dict, ids: np.ndarray) -> dict[str, np.ndarray]:
  """Rows `ids` [U] of every host-resident field, as flat batch keys.

  host_table: {"tokens": {field: [N+1, ...]}, "masks": {...}} host arrays
  (a memory-mapped cache is read only at these rows).
  """
  return {f"{HOST_ROWS}{kind}/{field}": np.asarray(table[ids])
          for kind in ("tokens", "masks")
          for field, table in host_table.get(kind, {}).items()}


def batch_host_rows(batch: dict) -> tuple[dict, dict]:
  """(tokens, masks) by field of the host rows a batch carries (host_rows'
  keys; numpy or device arrays), empty without host fields."""
  out = {"tokens": {}, "masks": {}}
  for key, value in batch.items():
    if key.startswith(HOST_ROWS):
      kind, field = key[len(HOST_ROWS):].split("/", 1)
      out[kind][field] = value
  return out["tokens"], out["masks"]


def _check_sizes(batch_size: int, history_len: int, process_index: int,
                 process_count: int) -> None:
  if batch_size < 1:
    raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
  if history_len < 1:
    raise ConfigError(f"data.history_len must be >= 1, got {history_len}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ConfigError(
        f"process_index {process_index} must lie in [0, {process_count})")
  if batch_size % process_count:
    raise ConfigError(
        f"batch_size {batch_size} is not divisible by the process count "
        f"{process_count}")


def _pair_keys(rows: np.ndarray, items: np.ndarray,
               num_items: int) -> np.ndarray:
  """Encodes (row, item) pairs as one int64 key for sorted-set membership."""
  return rows.astype(np.int64) * (num_items + 1) + items.astype(np.int64)


def _isin_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
  """Elementwise membership of keys (any shape) in a sorted unique array."""
  if sorted_keys.size == 0:
    return np.zeros(keys.shape, bool)
  pos = np.searchsorted(sorted_keys, keys)
  pos = np.minimum(pos, sorted_keys.size - 1)
  return sorted_keys[pos] == keys


def _ragged_rows(offsets: np.ndarray) -> np.ndarray:
  """Row index of every element of a ragged flat array."""
  return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def last_items(offsets: np.ndarray, flat: np.ndarray, rows: np.ndarray,
               length: int, exclude: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """The most recent `length` items of each ragged row, left-aligned.

  Args:
    offsets: [M+1] ragged offsets into flat.
    flat: flat item array, oldest first within a row.
    rows: [B] rows to take.
    length: H, items kept per row.
    exclude: optional [B] item to drop from each row (e.g. the positive).

  Returns:
    items int32 [B, H] (oldest first among those kept, 0-padded at the end)
    and mask bool [B, H].
  """
  start = offsets[rows]  # [B]
  n = offsets[rows + 1] - start  # [B]
  window = length + (exclude is not None)
  while True:
    take = np.minimum(n, window)
    j = np.arange(window)
    valid = j[None, :] < take[:, None]  # [B, W]
    idx = np.where(valid, (start + n - take)[:, None] + j[None, :], 0)
    items = flat[idx] if flat.size else np.zeros(idx.shape, np.int32)
    if exclude is None:
      break
    valid &= items != exclude[:, None]
    # A row holding the excluded item more than once needs a wider window.
    short = (valid.sum(1) < length) & (n > take)
    if not short.any():
      break
    window *= 2
  count = valid.sum(1)
  drop = np.maximum(count - length, 0)  # [B] oldest valid items to drop
  rank = np.cumsum(valid, axis=1) - 1 - drop[:, None]  # [B, W]
  keep = valid & (rank >= 0)
  out = np.zeros((len(rows), length), np.int32)
  out[np.nonzero(keep)[0], rank[keep]] = items[keep]
  mask = np.arange(length)[None, :] < (count - drop)[:, None]  # [B, H]
  return out, mask


class TrainBatcher:
  """Training batches: one row per click, the click plus K negatives.

  Negatives come from the impression's non-clicked candidates (without
  replacement, fresh every epoch); impressions with fewer than K are topped
  up from the whole item pool in proportion to popularity + 1, never with
  the user's history, the impression's clicks, synthetic items, item 0, or
  an item already in the row.
  """

  def __init__(self, behaviors: types.Behaviors, items: types.ItemTable, *,
               batch_size: int, history_len: int, num_negatives: int,
               seed: int, process_index: int = 0, process_count: int = 1,
               drop_remainder: bool = False, unique_items: int = 0,
               host_items: dict | None = None):
    """Args as the attributes; unique_items > 0 adds the deduplicated layout.

    With unique_items = U, every batch also carries item_ids [U] (this
    process's distinct items, 0-padded) and history_pos [B, H] /
    candidate_pos [B, 1+K], positions into the global item_ids (the
    concatenation over processes), so the model encodes each distinct item
    once per batch. U is a fixed capacity (one compiled shape); see
    max_unique_items for the smallest that fits. host_items (the item
    table's host-resident fields) adds their rows of item_ids to each
    deduplicated batch (host_rows).
    """
    _check_sizes(batch_size, history_len, process_index, process_count)
    if unique_items < 0:
      raise ConfigError(f"unique_items must be >= 0, got {unique_items}")
    self.unique_items = unique_items
    self.host_items = host_items
    if num_negatives < 0:
      raise ConfigError(
          f"data.num_negatives must be >= 0, got {num_negatives}")
    self._b = behaviors
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.history_len = history_len
    self.num_negatives = num_negatives
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.drop_remainder = drop_remainder
    num_items = len(items.ids) - 1
    self._num_items = num_items

    # Samples: one per clicked candidate.
    cand_rows = _ragged_rows(behaviors.cand_offsets)  # [sum_c]
    clicked = behaviors.cand_labels == 1
    self._sample_rows = cand_rows[clicked].astype(np.int64)  # [S]
    self._sample_items = behaviors.cand_items[clicked].astype(np.int32)
    self.num_samples = int(self._sample_rows.size)

    # Sorted (impression, item) sets: the impression's history and clicks.
    hist_rows = _ragged_rows(behaviors.history_offsets)
    self._hist_keys = np.unique(
        _pair_keys(hist_rows, behaviors.history_items, num_items))
    self._click_keys = np.unique(
        _pair_keys(self._sample_rows, self._sample_items, num_items))

    synthetic = (np.zeros(num_items + 1, bool) if items.synthetic is None
                 else np.asarray(items.synthetic, bool))
    self._eligible = ~synthetic
    self._eligible[types.PAD_ITEM] = False

    # Per-impression negatives, cleaned and deduplicated, grouped by row.
    neg_rows = cand_rows[~clicked]
    neg_items = behaviors.cand_items[~clicked]
    keys = _pair_keys(neg_rows, neg_items, num_items)
    ok = (self._eligible[neg_items] & ~_isin_sorted(keys, self._hist_keys)
          & ~_isin_sorted(keys, self._click_keys))
    keys = np.unique(keys[ok])
    self._neg_items = (keys % (num_items + 1)).astype(np.int32)
    counts = np.bincount(keys // (num_items + 1), minlength=len(behaviors))
    self._neg_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(
        np.int64)
    self._neg_width = max(int(counts.max(initial=0)), num_negatives)

    # Popularity + 1 over eligible items, as a CDF for inverse sampling.
    pop = (np.zeros(num_items + 1) if items.popularity is None
           else np.asarray(items.popularity, np.float64))
    weights = np.where(self._eligible, pop + 1.0, 0.0)
    if num_negatives and not weights.sum():
      raise ConfigError("no eligible (non-synthetic) items to sample from")
    self._cdf = np.cumsum(weights) / max(weights.sum(), 1.0)

  def steps_per_epoch(self) -> int:
    """Global batches per epoch (the same on every process)."""
    if self.drop_remainder:
      return self.num_samples // self.batch_size
    return -(-self.num_samples // self.batch_size)

  def epoch(self, epoch: int,
            start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches of one epoch, deterministic in (seed, epoch).

    `start` skips the first batches without building them (a resumed run);
    the batches after it are the same as in a full pass.
    """
    order = np.random.default_rng([self.seed, epoch]).permutation(
        self.num_samples)
    lo = self.process_index * self.local_batch_size
    for step in range(start, self.steps_per_epoch()):
      rows = order[step * self.batch_size:(step + 1) * self.batch_size]
      yield self._batch(rows, epoch, step, lo)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.epoch(0)

  def max_unique_items(self, epochs: Iterable[int]) -> int:
    """The most distinct items (padding item included) any local batch of
    these epochs holds: the smallest unique_items capacity that fits them.
    """
    saved, self.unique_items = self.unique_items, 0
    try:
      most = 0
      for epoch in epochs:
        for batch in self.epoch(epoch):
          ids = np.concatenate([batch["history"].ravel(),
                                batch["candidates"].ravel(),
                                batch.get("profile", np.zeros(0, np.int32)),
                                [0]])
          most = max(most, len(np.unique(ids)))
      return most
    finally:
      self.unique_items = saved

  def _batch(self, global_rows: np.ndarray, epoch: int, step: int,
             lo: int) -> dict[str, np.ndarray]:
    b, k = self.local_batch_size, self.num_negatives
    real = np.arange(lo, lo + b) < len(global_rows)  # [B]
    samples = np.zeros(b, np.int64)
    samples[real] = global_rows[lo:lo + b]
    imp = self._sample_rows[samples]  # [B]
    pos = self._sample_items[samples]  # [B]

    history, history_mask = last_items(
        self._b.history_offsets, self._b.history_items, imp,
        self.history_len, exclude=pos)

    negs, have = self._impression_negatives(imp, epoch, step, lo)
    if k and (have < k).any():
      self._top_up(negs, have, imp, pos, epoch, step, lo)

    candidates = np.concatenate([pos[:, None], negs], axis=1)  # [B, 1+K]
    labels = np.zeros((b, 1 + k), np.float32)
    labels[:, 0] = 1.0
    candidate_mask = np.ones((b, 1 + k), bool)
    pad = ~real
    history[pad] = 0
    history_mask[pad] = False
    candidates[pad] = 0
    candidate_mask[pad] = False
    labels[pad] = 0.0
    users = self._b.users[imp].astype(np.int32)
    users[pad] = 0
    batch = {
        "history": history,
        "history_mask": history_mask,
        "candidates": candidates.astype(np.int32),
        "candidate_mask": candidate_mask,
        "labels": labels,
        "users": users,
        "weights": real.astype(np.float32),
    }
    if self._b.profiles is not None:
      batch["profile"] = np.where(real, self._b.profiles[imp], 0).astype(
          np.int32)  # [B]
    if self.unique_items:
      batch.update(self._deduplicate(history, batch["candidates"],
                                     batch.get("profile")))
      if self.host_items:
        batch.update(host_rows(self.host_items, batch["item_ids"]))
    return batch

  def _deduplicate(self, history: np.ndarray, candidates: np.ndarray,
                   profile: np.ndarray | None) -> dict[str, np.ndarray]:
    """item_ids [U] and positions of every history/candidate/profile slot."""
    u = self.unique_items
    parts = [history.ravel(), candidates.ravel()]
    if profile is not None:
      parts.append(profile)
    slots = np.concatenate(parts)
    ids, inverse = np.unique(slots, return_inverse=True)
    if len(ids) > u:
      raise ConfigError(
          f"a batch holds {len(ids)} distinct items but the deduplication "
          f"capacity is {u}; raise it (or use max_unique_items)")
    item_ids = np.zeros(u, np.int32)
    item_ids[:len(ids)] = ids
    # Positions index the global item_ids: process p's block starts at p * U.
    pos = (inverse + self.process_index * u).astype(np.int32)
    split, end = history.size, history.size + candidates.size
    out = {"item_ids": item_ids,
           "history_pos": pos[:split].reshape(history.shape),  # [B, H]
           "candidate_pos": pos[split:end].reshape(candidates.shape)}  # [B, C]
    if profile is not None:
      out["profile_pos"] = pos[end:]  # [B]
    return out

  def _impression_negatives(self, imp: np.ndarray, epoch: int, step: int,
                            lo: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to K of each row's impression negatives, uniformly without replacement.

    Returns negatives int32 [B, K] (the first `have` columns filled) and
    have [B].
    """
    b, k, w = self.local_batch_size, self.num_negatives, self._neg_width
    rng = np.random.default_rng([self.seed, epoch, step, 0])
    keys = rng.random((self.batch_size, w))[lo:lo + b]  # [B, W]
    start = self._neg_offsets[imp]
    count = self._neg_offsets[imp + 1] - start  # [B]
    col = np.arange(w)
    keys[col[None, :] >= count[:, None]] = np.inf  # Missing slots sort last.
    picked = np.argsort(keys, axis=1, kind="stable")[:, :k]  # [B, K]
    have = np.minimum(count, k)
    valid = np.arange(k)[None, :] < have[:, None]
    idx = np.where(valid, start[:, None] + picked, 0)
    negs = (np.where(valid, self._neg_items[idx], 0) if self._neg_items.size
            else np.zeros((b, k), np.int32)).astype(np.int32)
    return negs, have

  def _top_up(self, negs: np.ndarray, have: np.ndarray, imp: np.ndarray,
              pos: np.ndarray, epoch: int, step: int, lo: int) -> None:
    """Fills columns have..K-1 of negs in place from the popularity pool."""
    b, k = self.local_batch_size, self.num_negatives
    t = _TOP_UP_DRAWS
    for attempt in range(1, _MAX_TOP_UP_ATTEMPTS + 1):
      sub = np.nonzero(have < k)[0]  # [R] rows still short
      if not sub.size:
        return
      rng = np.random.default_rng([self.seed, epoch, step, attempt])
      u = rng.random((self.batch_size, t))[lo:lo + b][sub]  # [R, T]
      draws = np.searchsorted(self._cdf, u, side="right").astype(np.int32)
      draws = np.minimum(draws, self._num_items)
      keys = _pair_keys(imp[sub, None], draws, self._num_items)  # [R, T]
      row_negs = negs[sub]  # [R, K]
      ok = (self._eligible[draws] & (draws != pos[sub, None])
            & ~(draws[:, :, None] == row_negs[:, None, :]).any(-1))
      # Keep only the first occurrence of a repeated draw.
      same = draws[:, :, None] == draws[:, None, :]  # [R, T, T]
      ok &= ~np.tril(same, -1).any(-1)
      ok[ok] &= (~_isin_sorted(keys[ok], self._hist_keys)
                 & ~_isin_sorted(keys[ok], self._click_keys))
      rank = np.cumsum(ok, axis=1) - 1  # [R, T]
      use = ok & (rank < (k - have[sub])[:, None])
      r, c = np.nonzero(use)
      negs[sub[r], have[sub[r]] + rank[r, c]] = draws[r, c]
      have[sub] += use.sum(1)
    raise ConfigError(
        f"cannot find {k} distinct eligible negatives for some samples: the "
        "item pool is too small for data.num_negatives")


class EvalBatcher:
  """Evaluation batches: one row per impression, all its candidates.

  The candidate width is the split's maximum rounded up to a multiple of 8,
  so one compiled shape serves the whole split.
  """

  def __init__(self, behaviors: types.Behaviors, *, batch_size: int,
               history_len: int, process_index: int = 0,
               process_count: int = 1):
    _check_sizes(batch_size, history_len, process_index, process_count)
    self._b = behaviors
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.history_len = history_len
    self.process_index = process_index
    self.process_count = process_count
    widest = int(behaviors.num_candidates().max(initial=1))
    self.max_candidates = -(-widest // 8) * 8

  def __len__(self) -> int:
    """Global batches over the split."""
    return -(-len(self._b) // self.batch_size)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    b, c = self.local_batch_size, self.max_candidates
    lo = self.process_index * b
    num_rows = len(self._b)
    for step in range(len(self)):
      global_rows = np.arange(step * self.batch_size + lo,
                              step * self.batch_size + lo + b)  # [B]
      real = global_rows < num_rows
      rows = np.where(real, global_rows, 0)
      history, history_mask = last_items(
          self._b.history_offsets, self._b.history_items, rows,
          self.history_len)
      start = self._b.cand_offsets[rows]
      count = self._b.cand_offsets[rows + 1] - start  # [B]
      candidate_mask = (np.arange(c)[None, :] < count[:, None]) & real[:, None]
      idx = np.where(candidate_mask, start[:, None] + np.arange(c), 0)
      candidates = np.where(candidate_mask, self._b.cand_items[idx], 0)
      labels = np.where(candidate_mask, self._b.cand_labels[idx], 0)
      history[~real] = 0
      history_mask[~real] = False
      batch = {
          "history": history,
          "history_mask": history_mask,
          "candidates": candidates.astype(np.int32),  # [B, C]
          "candidate_mask": candidate_mask,
          "labels": labels.astype(np.float32),
          "users": np.where(real, self._b.users[rows], 0).astype(np.int32),
          "weights": real.astype(np.float32),
          "impressions": np.where(real, global_rows, -1).astype(np.int64),
      }
      if self._b.profiles is not None:
        batch["profile"] = np.where(real, self._b.profiles[rows], 0).astype(
            np.int32)  # [B]
      yield batch
