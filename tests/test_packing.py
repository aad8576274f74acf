"""Packed tuned layers (model.lm.pack, lm/packing.py) equal padded ones.

Reference: the same layers run on padded rows (each family's own path, which
tests/test_lm_*.py check against transformers), on random lengths, in both
the packed capacities and the padded fallback; the layout against a numpy
next-fit-decreasing packer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import tiny_lms
from genre_jax import data as data_lib
from genre_jax.config import load_preset
from genre_jax.lm import families
from genre_jax.lm import hf
from genre_jax.lm import packing
from genre_jax.models import lm_encoder
from tests.helpers import shrink, small_lm_config


def _numpy_next_fit_decreasing(lengths, row_len):
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  row, offset, place = 0, 0, {}
  for i in order:
    if offset + lengths[i] > row_len:
      row, offset = row + 1, 0
    place[i] = (row, offset)
    offset += lengths[i]
  return place, row + (offset > 0)


def test_layout_places_every_item_whole_and_apart_like_a_numpy_packer():
  rng = np.random.default_rng(0)
  for trial in range(20):
    row_len = int(rng.integers(8, 40))
    lengths = rng.integers(0, row_len + 1, int(rng.integers(1, 60)))
    lengths[rng.random(len(lengths)) < 0.2] = 0
    row, start, used = map(np.asarray, packing.layout(
        jnp.asarray(lengths, jnp.int32), row_len))
    want, want_used = _numpy_next_fit_decreasing(list(lengths), row_len)
    assert int(used) == want_used, trial
    taken = set()
    for i, n in enumerate(lengths):
      if n:
        assert (row[i], start[i]) == want[i]
        assert start[i] + n <= row_len
        slots = {(row[i], start[i] + t) for t in range(n)}
        assert not slots & taken
        taken |= slots


def _lm(family, tmp_path):
  if family == "minilm":
    path = hf.model_dir("")
  elif family == "opt":
    path = tiny_lms.build_tiny_opt(tmp_path / "opt")
  elif family == "mistral":  # sliding window shorter than the texts
    path = tiny_lms.build_tiny_causal_lm(tmp_path / "m", "mistral",
                                         sliding_window=3, randomize=True)
  else:
    path = tiny_lms.build_tiny_causal_lm(tmp_path / family, family,
                                         randomize=True)
  lm, _ = families.family_of(path).load(
      path, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  lm.eval()
  return lm


def _run(lm, hidden, mask, segments):
  return lm.run_layers(hidden, mask, 1, len(lm.layers), segments=segments)


@pytest.mark.parametrize("family", ["minilm", "llama", "qwen3", "mistral",
                                    "opt"])
def test_packed_layers_equal_padded_layers(family, tmp_path):
  lm = _lm(family, tmp_path)
  width = int(lm.config.hidden_size)
  rng = np.random.default_rng(1)
  num_items, length = 24, 12
  lengths = rng.integers(1, 7, num_items)  # short: a packed capacity fits
  lengths[[0, 5]] = [0, length]  # an empty item and a full one
  short = np.arange(length)[None] < lengths[:, None]  # [U, L]
  full = np.ones((num_items, length), bool)
  full[0] = False  # long texts: no capacity fits, the padded fallback runs
  hidden = jnp.asarray(rng.standard_normal((num_items, length, width)),
                       jnp.float32)
  graphdef, state = nnx.split(lm)

  @jax.jit
  def run_packed(state, hidden, mask):  # the model merged inside, as a step
    return packing.run_packed(_run, nnx.merge(graphdef, state), hidden, mask)

  for mask in (short, full):
    used = int(packing.layout(jnp.asarray(mask.sum(1), jnp.int32),
                              packing.row_length(length))[2])
    fits = used <= max(packing.capacities(num_items, length,
                                          packing.row_length(length)))
    assert fits == (mask is short)
    packed = np.asarray(run_packed(state, hidden, mask))
    padded = np.asarray(_run(lm, hidden, jnp.asarray(mask), None))
    np.testing.assert_allclose(packed[mask], padded[mask], atol=2e-5,
                               rtol=1e-5)
    if mask is short:
      assert not packed[~mask].any()  # padding comes back as zeros


@pytest.fixture(scope="module")
def dataset(data_dir):
  return data_lib.load_dataset(shrink(load_preset("once_nrms"), data_dir).data)


@pytest.mark.parametrize("pooling", ["attention", "cls"])
def test_encoder_vectors_and_gradients_equal_packed_and_padded(
    data_dir, tmp_path, dataset, pooling):
  results = []
  for pack in (True, False):
    config = small_lm_config("once_nrms", data_dir, tmp_path, tune_from=4,
                             pack=pack, pooling=pooling)
    inputs, spec = lm_encoder.item_inputs(config, dataset)
    encoder = lm_encoder.LMItemEncoder(config, spec, rngs=nnx.Rngs(0))
    encoder.eval()  # dropout off: the same function either way
    rows = np.arange(1, 41)
    tokens = {k: jnp.asarray(v[rows]) for k, v in inputs["tokens"].items()}
    masks = {k: jnp.asarray(v[rows]) for k, v in inputs["masks"].items()}
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)

    def loss(params):
      vectors = nnx.merge(graphdef, params, rest, copy=True)(
          tokens, masks)  # [N, D]
      return jnp.sum(jnp.tanh(vectors) * jnp.arange(vectors.shape[-1])), (
          vectors)

    (_, vectors), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        params)
    results.append((np.asarray(vectors), jax.tree.map(np.asarray, grads)))
  (packed, packed_grads), (padded, padded_grads) = results
  np.testing.assert_allclose(packed, padded, atol=1e-5)
  leaves = jax.tree_util.tree_leaves_with_path(packed_grads)
  want = dict(jax.tree_util.tree_leaves_with_path(padded_grads))
  moved = 0
  for path, grad in leaves:
    np.testing.assert_allclose(grad, want[path], atol=1e-4, rtol=1e-3,
                               err_msg=jax.tree_util.keystr(path))
    moved += bool(np.abs(grad).max() > 0)
  assert moved > 10  # the tuned layer, head and projection got gradients
