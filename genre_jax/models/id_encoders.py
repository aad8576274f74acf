"""Item identity as an item encoder: a learnt table per item (`id`), and that
table added to any content encoder's vector (`hybrid`, Legommenders' ID-based
variants), which falls back to content alone for items unseen in training so
that cold items still score.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from genre_jax.data.types import Dataset, ItemInputSpec
from genre_jax.errors import ConfigError
from genre_jax.models.item_encoders import ItemEncoder
from genre_jax.registry import ITEM_ENCODERS

ROW_FIELD = "item_row"  # [N+1, 1] int32: each item's own row
SEEN_FIELD = "seen_in_train"  # [N+1, 1] bool: in a train history or impression


def identity_inputs(dataset: Dataset) -> dict[str, np.ndarray]:
  """Each item's row and whether training ever shows it ([N+1, 1] each)."""
  items = dataset.items
  rows = np.arange(items.num_items + 1, dtype=np.int32)[:, None]
  if items.popularity is None:
    raise ConfigError("the id and hybrid item encoders need the train split's "
                      "item counts (dataset.items.popularity), which this "
                      "dataset does not carry")
  seen = (np.asarray(items.popularity) > 0)[:, None]
  seen[0] = False
  return {ROW_FIELD: rows, SEEN_FIELD: seen}


def _random_identity(num_items: int, rng: np.random.Generator):
  rows = np.arange(num_items + 1, dtype=np.int32)[:, None]
  seen = rng.random((num_items + 1, 1)) < 0.9
  seen[0] = False
  return {ROW_FIELD: rows, SEEN_FIELD: seen}


class _Identity(nnx.Module):
  """A [N+1, D] table read at seen items' rows; zero for unseen items."""

  def __init__(self, num_items: int, dim: int, init, *, rngs: nnx.Rngs):
    if num_items < 1:
      raise ConfigError("the id item table needs the number of items "
                        "(ItemInputSpec.num_items); build the inputs with "
                        "the encoder's item_inputs")
    self.table = nnx.Embed(num_items + 1, dim, embedding_init=init, rngs=rngs)

  def __call__(self, tokens: dict[str, jax.Array]) -> jax.Array:
    rows = tokens[ROW_FIELD][:, 0]  # [N]
    seen = tokens[SEEN_FIELD].astype(jnp.float32)  # [N, 1]
    return self.table(rows) * seen  # [N, D]


@ITEM_ENCODERS.register("id")
class IdItemEncoder(ItemEncoder):
  """An item is its learnt vector; items unseen in training are zero."""

  @classmethod
  def item_inputs(cls, config: ml_collections.ConfigDict, dataset: Dataset):
    tokens = identity_inputs(dataset)
    masks = {ROW_FIELD: tokens[SEEN_FIELD].copy()}
    spec = ItemInputSpec(vocab_size=0, fields=(ROW_FIELD,), lengths=(1,),
                         num_users=len(dataset.user_vocab),
                         num_items=dataset.items.num_items)
    return {"tokens": tokens, "masks": masks}, spec

  @classmethod
  def random_inputs(cls, config, num_items, length, vocab, rng):
    del length, vocab
    tokens = _random_identity(num_items, rng)
    spec = ItemInputSpec(vocab_size=0, fields=(ROW_FIELD,), lengths=(1,),
                         num_users=100, num_items=num_items)
    return {"tokens": tokens, "masks": {ROW_FIELD: tokens[SEEN_FIELD]}}, spec

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    self.identity = _Identity(spec.num_items, int(config.model.hidden_dim),
                              nnx.initializers.normal(0.1), rngs=rngs)

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
    items["tokens"].update(identity_inputs(dataset))
    return items, dataclasses.replace(spec,
                                      num_items=dataset.items.num_items)

  @classmethod
  def random_inputs(cls, config, num_items, length, vocab, rng):
    items, spec = _content_encoder(config).random_inputs(
        config, num_items, length, vocab, rng)
    items["tokens"].update(_random_identity(num_items, rng))
    return items, dataclasses.replace(spec, num_items=num_items)

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    self.content = _content_encoder(config)(config, spec, rngs=rngs)
    self.identity = _Identity(spec.num_items, int(config.model.hidden_dim),
                              nnx.initializers.zeros, rngs=rngs)

  def __call__(self, tokens, masks):
    content = self.content(tokens, masks)  # [N, D]
    return content + self.identity(tokens).astype(content.dtype)
