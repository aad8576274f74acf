"""Item identity as an item encoder: a learnt table per item (`id`), and that
table added to any content encoder's vector (`hybrid`, Legommenders' ID-based
variants), which falls back to content alone for items unseen in training so
that cold items still score.

With model.hybrid.spectral_dim = k > 0 an item's identity vector also holds a
learnt linear map of its k spectral co-occurrence dimensions
(data/cooccurrence.py, computed from the train split once and cached under
data.data_dir): collaborative structure a table learns slowly from
next-item clicks.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from genre_jax.data import cooccurrence
from genre_jax.data.types import Dataset, ItemInputSpec
from genre_jax.errors import ConfigError
from genre_jax.models.item_encoders import ItemEncoder
from genre_jax.registry import ITEM_ENCODERS

ROW_FIELD = "item_row"  # [N+1, 1] int32: each item's own row
SEEN_FIELD = "seen_in_train"  # [N+1, 1] bool: in a train history or impression
SPECTRAL_FIELD = "item_spectral"  # [N+1, k] float32: co-occurrence dimensions


def spectral_dim(config: ml_collections.ConfigDict) -> int:
  """model.hybrid.spectral_dim (0 for a config from before the field)."""
  return int(config.model.hybrid.get("spectral_dim", 0))


def spectral_cache_dir(config: ml_collections.ConfigDict) -> str:
  """Where the spectral vectors are kept: beside the prepared data (they
  depend on the train split only, not on the run)."""
  return os.path.join(os.path.expanduser(config.data.data_dir),
                      "cooccurrence_cache")


def identity_inputs(config: ml_collections.ConfigDict,
                    dataset: Dataset) -> dict[str, np.ndarray]:
  """Each item's row and whether training ever shows it ([N+1, 1] each), and
  with spectral_dim k > 0 its spectral co-occurrence vector [N+1, k]."""
  items = dataset.items
  rows = np.arange(items.num_items + 1, dtype=np.int32)[:, None]
  if items.popularity is None:
    raise ConfigError("the id and hybrid item encoders need the train split's "
                      "item counts (dataset.items.popularity), which this "
                      "dataset does not carry")
  seen = (np.asarray(items.popularity) > 0)[:, None]
  seen[0] = False
  inputs = {ROW_FIELD: rows, SEEN_FIELD: seen}
  k = spectral_dim(config)
  if k:
    if "train" not in dataset.splits:
      raise ConfigError(f"config.model.hybrid.spectral_dim={k}: the "
                        "co-occurrence vectors come from the train split, "
                        "which this dataset does not have")
    inputs[SPECTRAL_FIELD] = cooccurrence.cached_spectral_item_vectors(
        dataset.splits["train"], items.num_items, k, spectral_cache_dir(config))
  return inputs


def _random_identity(config, num_items: int, rng: np.random.Generator):
  rows = np.arange(num_items + 1, dtype=np.int32)[:, None]
  seen = rng.random((num_items + 1, 1)) < 0.9
  seen[0] = False
  inputs = {ROW_FIELD: rows, SEEN_FIELD: seen}
  k = spectral_dim(config)
  if k:
    inputs[SPECTRAL_FIELD] = (rng.standard_normal((num_items + 1, k)) *
                              seen).astype(np.float32)
  return inputs


class _Identity(nnx.Module):
  """A [N+1, D] table read at seen items' rows, plus (spectral_dim k > 0) a
  learnt [k, D] map of the items' spectral vectors; zero for unseen items."""

  def __init__(self, num_items: int, dim: int, init, *, spectral: int,
               rngs: nnx.Rngs):
    """`init` initialises the table and the spectral map alike."""
    if num_items < 1:
      raise ConfigError("the id item table needs the number of items "
                        "(ItemInputSpec.num_items); build the inputs with "
                        "the encoder's item_inputs")
    self.table = nnx.Embed(num_items + 1, dim, embedding_init=init, rngs=rngs)
    self.spectral = nnx.data(None)
    if spectral:
      self.spectral = nnx.Linear(spectral, dim, use_bias=False,
                                 kernel_init=init, rngs=rngs)

  def __call__(self, tokens: dict[str, jax.Array]) -> jax.Array:
    rows = tokens[ROW_FIELD][:, 0]  # [N]
    seen = tokens[SEEN_FIELD].astype(jnp.float32)  # [N, 1]
    vectors = self.table(rows)  # [N, D]
    if self.spectral is not None:
      vectors = vectors + self.spectral(
          tokens[SPECTRAL_FIELD].astype(jnp.float32))  # [N, k] -> [N, D]
    return vectors * seen  # [N, D]


@ITEM_ENCODERS.register("id")
class IdItemEncoder(ItemEncoder):
  """An item is its learnt vector; items unseen in training are zero."""

  @classmethod
  def item_inputs(cls, config: ml_collections.ConfigDict, dataset: Dataset):
    tokens = identity_inputs(config, dataset)
    masks = {ROW_FIELD: tokens[SEEN_FIELD].copy()}
    spec = ItemInputSpec(vocab_size=0, fields=(ROW_FIELD,), lengths=(1,),
                         num_users=len(dataset.user_vocab),
                         num_items=dataset.items.num_items)
    return {"tokens": tokens, "masks": masks}, spec

  @classmethod
  def random_inputs(cls, config, num_items, length, vocab, rng):
    del length, vocab
    tokens = _random_identity(config, num_items, rng)
    spec = ItemInputSpec(vocab_size=0, fields=(ROW_FIELD,), lengths=(1,),
                         num_users=100, num_items=num_items)
    return {"tokens": tokens, "masks": {ROW_FIELD: tokens[SEEN_FIELD]}}, spec

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    self.identity = _Identity(spec.num_items, int(config.model.hidden_dim),
                              nnx.initializers.normal(0.1),
                              spectral=spectral_dim(config), rngs=rngs)

  def __call__(self, tokens, masks):
    del masks
    return self.identity(tokens)  # [N, D]


def _content_encoder(config: ml_collections.ConfigDict):
  name = config.model.hybrid.content
  if name in ("hybrid", "id"):
    raise ConfigError(f"config.model.hybrid.content='{name}': choose a "
                      "content item encoder (e.g. self_attention, fastformer, "
                      "cnn, lm)")
  return ITEM_ENCODERS.get(name)


@ITEM_ENCODERS.register("hybrid")
class HybridItemEncoder(ItemEncoder):
  """content(item) + id(item): model.hybrid.content's vector plus a learnt
  per-item vector (starting at zero, so training starts from the content
  model) for items seen in training; content alone for the others."""

  @classmethod
  def item_inputs(cls, config: ml_collections.ConfigDict, dataset: Dataset):
    items, spec = _content_encoder(config).item_inputs(config, dataset)
    items["tokens"].update(identity_inputs(config, dataset))
    return items, dataclasses.replace(spec,
                                      num_items=dataset.items.num_items)

  @classmethod
  def random_inputs(cls, config, num_items, length, vocab, rng):
    items, spec = _content_encoder(config).random_inputs(
        config, num_items, length, vocab, rng)
    items["tokens"].update(_random_identity(config, num_items, rng))
    return items, dataclasses.replace(spec, num_items=num_items)

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    self.content = _content_encoder(config)(config, spec, rngs=rngs)
    self.identity = _Identity(spec.num_items, int(config.model.hidden_dim),
                              nnx.initializers.zeros,
                              spectral=spectral_dim(config), rngs=rngs)

  def __call__(self, tokens, masks):
    content = self.content(tokens, masks)  # [N, D]
    return content + self.identity(tokens).astype(content.dtype)
