"""A new item encoder needs nothing but its own file: the contract.

The encoder below is defined here alone. It reads an extra per-item array
that its `item_inputs` hook adds to the item table, and owns a frozen
sub-module (its weights typed variables.Frozen). It is trained through the
public entry point; no module of genre_jax names it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genre_jax import data as data_lib
from genre_jax import train
from genre_jax import variables
from genre_jax.config import load_preset
from genre_jax.models.item_encoders import ItemEncoder
from genre_jax.registry import ITEM_ENCODERS
from tests.helpers import shrink

PRIOR = "test_prior"  # the extra input: a fixed feature vector per item
PRIOR_WIDTH = 3


def _prior(num_rows: int) -> np.ndarray:
  """[N+1, PRIOR_WIDTH] float32, a function of the item row only."""
  rows = np.arange(num_rows, dtype=np.float32)[:, None]
  return np.sin(rows * np.arange(1, PRIOR_WIDTH + 1, dtype=np.float32))


class BagWithFrozenPrior(ItemEncoder):
  """Mean of trained word vectors + a frozen projection of the prior."""

  @classmethod
  def item_inputs(cls, config, dataset):
    items, spec = super().item_inputs(config, dataset)
    num_rows = len(dataset.items.ids)
    items["tokens"][PRIOR] = _prior(num_rows)
    return items, spec

  def __init__(self, config, spec, *, rngs: nnx.Rngs):
    dim = int(config.model.hidden_dim)
    self.fields = tuple(spec.fields)
    self.words = nnx.Embed(spec.vocab_size, dim, rngs=rngs)
    self.prior = nnx.Linear(PRIOR_WIDTH, dim, rngs=rngs)
    variables.retype(self.prior, variables.Frozen)

  def __call__(self, tokens, masks):
    ids = jnp.concatenate([tokens[f] for f in self.fields], axis=1)  # [N, L]
    mask = jnp.concatenate([masks[f] for f in self.fields], axis=1)
    weights = mask.astype(jnp.float32)[..., None]  # [N, L, 1]
    bag = (self.words(ids) * weights).sum(1) / jnp.maximum(
        weights.sum(1), 1.0)  # [N, D]
    return bag + self.prior(tokens[PRIOR].astype(jnp.float32))  # [N, D]


@pytest.fixture(scope="module")
def registered():
  name = "test_bag_with_frozen_prior"
  if name not in ITEM_ENCODERS.names():
    ITEM_ENCODERS.register(name)(BagWithFrozenPrior)
  return name


def _leaves(params, module: str) -> dict[str, np.ndarray]:
  encoder = params["item_encoder"][module]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_leaves_with_path(encoder)}


def test_new_encoder_trains_and_its_frozen_part_stays(registered, data_dir,
                                                      tmp_path):
  config = shrink(load_preset("nrms"), data_dir, max_steps=4)
  config.model.item_encoder = registered
  dataset = data_lib.load_dataset(config.data)
  host_items, spec = train.model_inputs(config, dataset)
  np.testing.assert_array_equal(host_items["tokens"][PRIOR],
                                _prior(len(dataset.items.ids)))
  _, initial = train.init_model(config, spec, total_steps=4)

  summary = train.train_and_evaluate(config, str(tmp_path / "run"),
                                     dataset=dataset)
  assert summary["steps"] == 4
  assert np.isfinite(summary["test"]["all"]["auc"])
  trained = train.restore_params_from(str(tmp_path / "run"),
                                      initial["params"], which="latest")
  for key, before in _leaves(initial["params"], "prior").items():
    np.testing.assert_array_equal(_leaves(trained, "prior")[key], before,
                                  err_msg=f"frozen prior{key} moved")
  moved = [k for k, v in _leaves(initial["params"], "words").items()
           if not np.array_equal(_leaves(trained, "words")[k], v)]
  assert moved, "the trainable word vectors did not train"


def test_the_extra_input_reaches_the_encoder(registered, data_dir):
  """Vectors depend on the hook's extra array (so it is gathered per item)."""
  config = shrink(load_preset("nrms"), data_dir, max_steps=1)
  config.model.item_encoder = registered
  dataset = data_lib.load_dataset(config.data)
  host_items, spec = train.model_inputs(config, dataset)
  parts, state = train.init_model(config, spec, total_steps=1)
  model = nnx.merge(parts.eval_graphdef, state["params"], parts.rest)
  ids = jnp.arange(1, 6)
  take = lambda table: {k: jnp.take(jnp.asarray(v), ids, axis=0)
                        for k, v in table.items()}
  tokens, masks = take(host_items["tokens"]), take(host_items["masks"])
  vectors = model.encode_items(tokens, masks)  # [5, D]
  tokens[PRIOR] = tokens[PRIOR] + 1.0
  assert not np.allclose(np.asarray(model.encode_items(tokens, masks)),
                         np.asarray(vectors))
