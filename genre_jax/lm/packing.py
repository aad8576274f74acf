"""Sequence packing: several short item texts share one row of the tuned layers.

Item texts are short and padded to one length (Goodreads titles: 6 word
pieces on average, padded to 20), so most of the tuned layers' compute is
spent on padding. Packing lays the real tokens of the items end to end in
rows of `row_len` slots (longest items first, each item whole in one row:
next-fit decreasing), runs the layers with attention kept inside each item
(`segments`) and rotary positions counted from each item's start, then puts
every token back at its padded place. The result equals the padded run up
to float rounding; padded slots come back as zeros.

Shapes must be static under jit, while how many rows a batch needs depends
on its items. `run_packed` therefore compiles a few row capacities (fractions
of the padded token count) and the padded run, and `nnx.switch` runs the
smallest that holds the batch: never a dropped token, whatever the data.
Each branch is rematerialised (`nnx.remat`): differentiating a switch
otherwise makes every branch emit, and zero-fill, the activations of all of
them (on the once_nrms Goodreads encoder that cost more than packing
saved); recomputing the taken branch's forward pass is cheaper.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Row capacities compiled, as fractions of the padded tokens [U * L].
CAPACITY_FRACTIONS = (0.3, 0.45, 0.6, 0.8)
MIN_ROW_LEN = 64

# run(lm, hidden [R, P, D], mask [R, P], segments [R, P]) -> [R, P, D].
RunLayers = Callable[[nnx.Module, jax.Array, jax.Array, jax.Array | None],
                     jax.Array]


def row_length(length: int) -> int:
  """Slots per packed row for texts padded to `length`: room for several."""
  return max(MIN_ROW_LEN, 2 * length)


def capacities(num_items: int, length: int, row_len: int) -> list[int]:
  """The row counts compiled for num_items texts of `length` slots."""
  tokens = num_items * length
  return sorted({max(1, math.ceil(tokens * f / row_len))
                 for f in CAPACITY_FRACTIONS})


def layout(lengths: jax.Array, row_len: int
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Next-fit decreasing: (row [U], start [U], rows used) of each item.

  Items are placed longest first; an item goes at the end of the current
  row if it fits there, else at the start of a new row. lengths [U] int,
  each <= row_len; empty items take no room (row and start are those of the
  next item's place, and no token is written there).
  """
  order = jnp.argsort(-lengths, stable=True)  # [U], longest first

  def place(carry, length):
    row, offset = carry
    new_row = offset + length > row_len
    row = row + new_row.astype(row.dtype)
    offset = jnp.where(new_row, 0, offset)
    return (row, offset + length), (row, offset)

  zero = jnp.zeros((), jnp.int32)
  (last_row, last_offset), (rows, starts) = jax.lax.scan(
      place, (zero, zero), lengths[order].astype(jnp.int32))
  used = last_row + (last_offset > 0).astype(jnp.int32)
  row = jnp.zeros_like(rows).at[order].set(rows)
  start = jnp.zeros_like(starts).at[order].set(starts)
  return row, start, used


def _packed(run: RunLayers, lm: nnx.Module, hidden: jax.Array,
            mask: jax.Array, row: jax.Array, start: jax.Array, *,
            rows: int, row_len: int) -> jax.Array:
  """run on `rows` packed rows of row_len slots; back to [U, L, D]."""
  num_items, length, width = hidden.shape
  total = rows * row_len
  offset = jnp.cumsum(mask, axis=-1) - 1  # [U, L], slot within the item
  dest = row[:, None] * row_len + start[:, None] + offset  # [U, L]
  dest = jnp.where(mask, dest, total).reshape(-1)  # padding -> a spare slot
  tokens = num_items * length
  # Each packed slot's source token; empty slots read the zero row `tokens`.
  source = jnp.full((total + 1,), tokens, jnp.int32).at[dest].set(
      jnp.arange(tokens, dtype=jnp.int32))[:total]  # [R * P]
  segment = jnp.zeros((total + 1,), jnp.int32).at[dest].set(
      jnp.repeat(jnp.arange(1, num_items + 1, dtype=jnp.int32), length)
  )[:total].reshape(rows, row_len)  # [R, P], 0 = empty
  flat = jnp.concatenate([hidden.reshape(tokens, width),
                          jnp.zeros((1, width), hidden.dtype)])
  packed = flat[source].reshape(rows, row_len, width)  # [R, P, D]
  out = run(lm, packed, segment > 0, segment)  # [R, P, D]
  out = jnp.concatenate([out.reshape(total, out.shape[-1]),
                         jnp.zeros((1, out.shape[-1]), out.dtype)])
  return out[dest].reshape(num_items, length, -1)  # [U, L, D]


def run_packed(run: RunLayers, lm: nnx.Module, hidden: jax.Array,
               mask: jax.Array) -> jax.Array:
  """run(lm, hidden, mask, segments) on packed rows: [U, L, D] -> [U, L, D].

  hidden [U, L, D] are the inputs of the layers to run, mask [U, L] their
  real tokens (any pattern: each item's real tokens are packed in order).
  Real tokens' outputs equal `run(lm, hidden, mask, None)`'s up to float
  rounding; padded ones are zeros. The smallest compiled capacity holding
  the batch runs, or the padded layout when none does.
  """
  mask = mask.astype(bool)
  num_items, length, _ = hidden.shape
  row_len = row_length(length)
  lengths = jnp.sum(mask, axis=-1, dtype=jnp.int32)  # [U]
  row, start, used = layout(lengths, row_len)
  sizes = capacities(num_items, length, row_len)

  def packed_branch(rows):
    def branch(lm, h, m, r, s):
      return _packed(run, lm, h, m, r, s, rows=rows, row_len=row_len)
    return branch

  branches = [packed_branch(rows) for rows in sizes]
  branches.append(lambda lm, h, m, r, s: run(lm, h, m, None))
  branches = [nnx.remat(branch) for branch in branches]
  index = sum((used > rows).astype(jnp.int32) for rows in sizes)
  return nnx.switch(index, branches, lm, hidden, mask, row, start)
