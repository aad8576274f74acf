"""Item encoders: what an item's data says -> one item vector.

Every encoder subclasses ItemEncoder: its `item_inputs` hook takes from the
dataset the arrays it reads (word encoders: the tokenized fields), and its
frozen weights are `variables.Frozen`, so the trainer and the optimizer name
no encoder. Every encoder is called as

  encoder(tokens: dict[field, [N, L_f] int32], masks: dict[field, [N, L_f] bool])
    -> [N, D] with D = config.model.hidden_dim

and is registered in ITEM_ENCODERS under its config name. Token embeddings of
padded positions are zeroed before anything else, so padding token ids never
reach the output. All encoders except `cnn` (NAML, one CNN per field) read the
configured fields concatenated along the token axis, in spec.fields order.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
import numpy as np

from genre_jax import variables
from genre_jax.data import tokenize
from genre_jax.data.types import Dataset, ItemInputSpec
from genre_jax.errors import ConfigError
from genre_jax.lm import families
from genre_jax.lm import hf
from genre_jax.models import layers
from genre_jax.registry import ITEM_ENCODERS


class ItemEncoder(nnx.Module):
  """Base of the registered item encoders: the item table they read.

  `item_inputs` is the one hook between data and encoder: it returns
  ({"tokens": {name: [N+1, ...]}, "masks": {name: [N+1, ...]}}, spec), host
  arrays whose rows the model gathers for a batch's items and hands to
  `__call__` as the same two dicts. The default reads config.data.fields'
  tokenized text; an encoder with other inputs (an LM's own tokenization, a
  cache, an extra array) overrides it. The table may add "host": {"tokens":
  {...}, "masks": {...}}, fields kept in host memory rather than copied to
  every device (a memory-mapped cache of GBs): their rows are gathered on
  the host for each batch's distinct items (train.dedup_items) and each
  evaluation chunk, and reach `__call__` in the same two dicts.
  """

  @classmethod
  def item_inputs(cls, config: ml_collections.ConfigDict, dataset: Dataset):
    fields = tuple(config.data.fields)
    for f in fields:
      if f not in dataset.items.tokens:
        raise ConfigError(f"config.data.fields: the dataset has no tokenized "
                          f"field '{f}' (have {sorted(dataset.items.tokens)})")
    lengths = tuple(int(dataset.items.tokens[f].shape[1]) for f in fields)
    vocab = int(dataset.info.get("vocab_size", 0))
    if not vocab:
      vocab = int(max(dataset.items.tokens[f].max() for f in fields)) + 1
    spec = ItemInputSpec(vocab_size=vocab, fields=fields, lengths=lengths,
                         num_users=len(dataset.user_vocab),
                         num_items=dataset.items.num_items)
    return ({"tokens": {f: dataset.items.tokens[f] for f in fields},
             "masks": {f: dataset.items.masks[f] for f in fields}}, spec)

  @classmethod
  def random_inputs(cls, config: ml_collections.ConfigDict, num_items: int,
                    length: int, vocab: int, rng: np.random.Generator):
    """Random inputs of the item_inputs form for `num_items` items of
    `length` tokens each (benchmarks, memory plans); row 0 is padding."""
    tokens, masks = {}, {}
    for f in tuple(config.data.fields):
      t = rng.integers(1, vocab, (num_items + 1, length), dtype=np.int32)
      t[0] = 0
      m = np.ones_like(t, dtype=bool)
      m[0] = False
      tokens[f], masks[f] = t, m
    spec = ItemInputSpec(vocab_size=vocab, fields=tuple(tokens),
                         lengths=(length,) * len(tokens), num_users=100,
                         num_items=num_items)
    return {"tokens": tokens, "masks": masks}, spec


def field_inputs(tokens: dict[str, jax.Array], masks: dict[str, jax.Array],
                 fields: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
  """Concatenates the fields' tokens [N, sum L_f] and bool masks [N, sum L_f]."""
  missing = [f for f in fields if f not in tokens or f not in masks]
  if missing:
    raise ConfigError(
        f"config.data.fields: the item encoder reads {missing}, but the item "
        f"table only has token fields {sorted(tokens)}")
  ids = jnp.concatenate([tokens[f] for f in fields], axis=1)
  mask = jnp.concatenate([masks[f].astype(bool) for f in fields], axis=1)
  return ids, mask


def _same_vocabulary(lm_dir: str, data_tokenizer: str) -> bool:
  """Whether the LM's tokenizer and config.data.tokenizer map tokens to the
  same ids (the table's rows are the LM's token ids)."""
  return (tokenize.load_tokenizer(lm_dir).get_vocab(with_added_tokens=True) ==
          tokenize.load_tokenizer(data_tokenizer).get_vocab(
              with_added_tokens=True))


def pretrained_word_table(config: ml_collections.ConfigDict,
                          vocab_size: int) -> np.ndarray | None:
  """The [vocab_size, width] float32 table config.model.word_embeddings.init
  names, or None for a randomly initialised one.

  "lm" takes the token embeddings of config.model.lm.path (default MiniLM),
  whose tokenizer must be config.data.tokenizer's; a .npy path takes a matrix
  whose row i is token id i of config.data.tokenizer (e.g. GloVe vectors
  arranged by that vocabulary). Extra rows beyond the vocabulary (a padded
  LM table) are dropped.
  """
  field = "config.model.word_embeddings.init"
  source = config.model.get("word_embeddings", {}).get("init", "")
  if not source:
    return None
  if source == "lm":
    path = hf.model_dir(config.model.lm.path)
    if not _same_vocabulary(path, str(config.data.tokenizer)):
      raise ConfigError(
          f"{field}='lm' takes the token embeddings of {path}, but "
          f"config.data.tokenizer ('{config.data.tokenizer}') has another "
          "vocabulary, so its token ids are not the table's rows: set "
          f"--config.data.tokenizer={os.path.join(path, hf.TOKENIZER_FILE)}")
    kind = config.model.lm.kind
    family = (families.family_of(path) if kind == "auto"
              else families.get(kind))
    anchor = family.embeddings_key
    checkpoint = hf.Checkpoint(path)
    key = hf.find_prefix(checkpoint, anchor, family.prefixes) + anchor
    table, origin = checkpoint.get(key), f"{checkpoint.file_of(key)} ({key})"
  elif source.endswith(".npy"):
    try:
      table = np.load(os.path.expanduser(source), mmap_mode="r",
                      allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ConfigError(f"{field}: cannot read {source} as a .npy matrix: {e}"
                        ) from None
    origin = source
  else:
    raise ConfigError(f"{field}: '{source}' is not 'lm' (the language "
                      "model's token embeddings) or a .npy file")
  if table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
    raise ConfigError(f"{field}: {origin} holds a {table.dtype} array of shape "
                      f"{table.shape}, not a float matrix [vocab, width]")
  if table.shape[0] < vocab_size:
    raise ConfigError(
        f"{field}: {origin} has {table.shape[0]} rows but the tokenizer of "
        f"config.data.tokenizer has {vocab_size} tokens; row i must be the "
        "vector of token id i")
  return np.asarray(table[:vocab_size], np.float32)


def random_table_std(config: ml_collections.ConfigDict) -> float:
  """config.model.word_embeddings.init_std, checked: >= 0, and 0 when a
  pretrained table (init) fills the table instead."""
  field = "config.model.word_embeddings.init_std"
  words = config.model.get("word_embeddings", {})
  std = words.get("init_std", 0.0)
  try:
    std = float(std)
  except (TypeError, ValueError):
    raise ConfigError(f"{field}={std!r}: not a number") from None
  if not std >= 0:
    raise ConfigError(f"{field}={std}: must be >= 0 (0 = Flax's default "
                      "1/sqrt(embed_dim))")
  if std and words.get("init", ""):
    raise ConfigError(
        f"{field}={std} sets the start of a randomly initialised table, but "
        f"config.model.word_embeddings.init='{words.init}' fills it with a "
        "pretrained one: set one of them")
  return std


class WordEmbedding(nnx.Module):
  """The word embeddings shared by all fields, [vocab, embed_dim]; zero on
  padded tokens.

  Learnt from scratch by default, from N(0, init_std^2) when
  word_embeddings.init_std is set. config.model.word_embeddings.init fills the
  table from a pretrained one instead, followed by a trained Linear to
  embed_dim when its width differs (Legommenders' `auto` transformation);
  word_embeddings.frozen keeps the table (not the Linear) fixed in training
  (its weights are variables.Frozen).
  """

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, dtype: jnp.dtype, rngs: nnx.Rngs):
    dim = config.model.embed_dim
    table = pretrained_word_table(config, spec.vocab_size)
    width = dim if table is None else table.shape[1]
    std = random_table_std(config)
    init = ({} if std == 0 else
            dict(embedding_init=nnx.initializers.normal(stddev=std)))
    self.word_table = nnx.Embed(spec.vocab_size, width, dtype=dtype,
                                rngs=rngs, **init)
    if table is not None:
      self.word_table.embedding[...] = jnp.asarray(table)
    if config.model.word_embeddings.frozen:
      variables.retype(self.word_table, variables.Frozen)
    self.proj = _hidden_projection(width, dim, dtype, rngs)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids [N, L] int32, mask [N, L] bool -> [N, L, E]."""
    x = self.word_table(ids)  # [N, L, width]
    if self.proj is not None:
      x = self.proj(x)  # [N, L, E]
    return x * mask[..., None].astype(x.dtype)


class PositionEmbedding(nnx.Module):
  """Learned absolute positions for sequences of up to `max_len` tokens."""

  def __init__(self, max_len: int, dim: int, *, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.table = nnx.Param(init(rngs.params(), (max_len, dim)))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """Adds positions to x [N, L, D]."""
    length, max_len = x.shape[1], self.table.shape[0]
    if length > max_len:
      raise ConfigError(
          f"config.data.max_len: items have {length} tokens but the encoder "
          f"was built for at most {max_len} (sum of spec.lengths)")
    return x + self.table[:length].astype(self.dtype)


def _hidden_projection(in_dim: int, out_dim: int, dtype: jnp.dtype,
                       rngs: nnx.Rngs) -> nnx.Linear | None:
  """A Linear in_dim -> out_dim, or None when the sizes already agree."""
  if in_dim == out_dim:
    return None
  return nnx.Linear(in_dim, out_dim, dtype=dtype, rngs=rngs)


class PositionedEmbedding(nnx.Module):
  """Word embeddings, projected to the hidden size if it differs, plus
  learned positions: the input of the from-scratch sequence encoders."""

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, dtype: jnp.dtype, rngs: nnx.Rngs):
    m = config.model
    self.words = WordEmbedding(config, spec, dtype=dtype, rngs=rngs)
    self.proj = _hidden_projection(m.embed_dim, m.hidden_dim, dtype, rngs)
    self.positions = PositionEmbedding(sum(spec.lengths), m.hidden_dim,
                                       dtype=dtype, rngs=rngs)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids [N, L] int32, mask [N, L] bool -> [N, L, D]."""
    x = self.words(ids, mask)  # [N, L, E]
    if self.proj is not None:
      x = self.proj(x)  # [N, L, D]
    return self.positions(x)


@ITEM_ENCODERS.register("cnn")
class CNNItemEncoder(ItemEncoder):
  """NAML (Wu et al. 2019): a word CNN + additive attention per field, then
  additive attention across the fields.
  """

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    m = config.model
    dtype = layers.compute_dtype(config)
    filters = m.cnn.num_filters
    self.fields = tuple(spec.fields)
    self.embed = WordEmbedding(config, spec, dtype=dtype, rngs=rngs)
    self.convs = nnx.List([
        nnx.Conv(m.embed_dim, filters, m.cnn.kernel_size, padding="SAME",
                 dtype=dtype, rngs=rngs) for _ in self.fields])
    self.word_pools = nnx.List([
        layers.AdditiveAttention(filters, m.attention_dim, dtype=dtype,
                                 rngs=rngs) for _ in self.fields])
    self.field_pool = layers.AdditiveAttention(filters, m.attention_dim,
                                               dtype=dtype, rngs=rngs)
    self.proj = _hidden_projection(filters, m.hidden_dim, dtype, rngs)
    self.dropout = nnx.Dropout(m.dropout, rngs=rngs)

  def __call__(self, tokens: dict[str, jax.Array],
               masks: dict[str, jax.Array]) -> jax.Array:
    field_vecs, field_masks = [], []
    for i, field in enumerate(self.fields):
      ids, mask = field_inputs(tokens, masks, (field,))  # [N, L]
      x = self.dropout(self.embed(ids, mask))  # [N, L, E]
      # Zero padded outputs so they stay zero for the next CNN window too.
      h = jax.nn.relu(self.convs[i](x)) * mask[..., None].astype(x.dtype)
      field_vecs.append(self.word_pools[i](self.dropout(h), mask))  # [N, F]
      field_masks.append(mask.any(-1))  # [N]
    vecs = jnp.stack(field_vecs, axis=1)  # [N, num_fields, F]
    out = self.field_pool(vecs, jnp.stack(field_masks, axis=1))  # [N, F]
    return out if self.proj is None else self.proj(out)


@ITEM_ENCODERS.register("self_attention")
class SelfAttentionItemEncoder(ItemEncoder):
  """NRMS (Wu et al. 2019): word embeddings -> multi-head self-attention ->
  additive attention pooling, with dropout after embedding and attention.
  """

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    m = config.model
    dtype = layers.compute_dtype(config)
    self.fields = tuple(spec.fields)
    self.embed = WordEmbedding(config, spec, dtype=dtype, rngs=rngs)
    self.attention = layers.MultiHeadSelfAttention(
        m.embed_dim, m.hidden_dim, m.num_heads, dtype=dtype, rngs=rngs,
        output_projection=False, implementation=m.attention)
    self.pool = layers.AdditiveAttention(m.hidden_dim, m.attention_dim,
                                         dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(m.dropout, rngs=rngs)

  def __call__(self, tokens: dict[str, jax.Array],
               masks: dict[str, jax.Array]) -> jax.Array:
    ids, mask = field_inputs(tokens, masks, self.fields)  # [N, L]
    x = self.dropout(self.embed(ids, mask))  # [N, L, E]
    h = self.dropout(self.attention(x, mask))  # [N, L, D]
    return self.pool(h, mask)  # [N, D]


@ITEM_ENCODERS.register("fastformer")
class FastformerItemEncoder(ItemEncoder):
  """Fastformer news encoder: embeddings + positions -> Fastformer layers ->
  additive attention pooling.
  """

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    m = config.model
    dtype = layers.compute_dtype(config)
    mlp_dim = m.fastformer.get("mlp_dim", m.transformer.mlp_dim)
    self.fields = tuple(spec.fields)
    self.embed = PositionedEmbedding(config, spec, dtype=dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(m.hidden_dim, epsilon=1e-12, dtype=dtype,
                              rngs=rngs)
    self.blocks = nnx.List([
        layers.FastformerBlock(m.hidden_dim, m.num_heads, mlp_dim, m.dropout,
                               dtype=dtype, rngs=rngs)
        for _ in range(m.fastformer.num_layers)])
    self.pool = layers.AdditiveAttention(m.hidden_dim, m.attention_dim,
                                         dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(m.dropout, rngs=rngs)

  def __call__(self, tokens: dict[str, jax.Array],
               masks: dict[str, jax.Array]) -> jax.Array:
    ids, mask = field_inputs(tokens, masks, self.fields)  # [N, L]
    x = self.dropout(self.norm(self.embed(ids, mask)))  # [N, L, D]
    for block in self.blocks:
      x = block(x, mask)
    return self.pool(x, mask)  # [N, D]


@ITEM_ENCODERS.register("pooling")
class PoolingItemEncoder(ItemEncoder):
  """Masked mean of the word embeddings followed by a linear layer."""

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    m = config.model
    dtype = layers.compute_dtype(config)
    self.fields = tuple(spec.fields)
    self.embed = WordEmbedding(config, spec, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(m.embed_dim, m.hidden_dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(m.dropout, rngs=rngs)

  def __call__(self, tokens: dict[str, jax.Array],
               masks: dict[str, jax.Array]) -> jax.Array:
    ids, mask = field_inputs(tokens, masks, self.fields)  # [N, L]
    x = self.dropout(self.embed(ids, mask))  # [N, L, E]
    return self.proj(layers.masked_mean(x, mask))  # [N, D]


@ITEM_ENCODERS.register("transformer")
class TransformerItemEncoder(ItemEncoder):
  """A small Transformer trained from scratch: embeddings + learned positions
  -> pre-LN encoder layers -> final norm -> masked mean or first-token pooling
  (config.model.transformer.pooling: "mean" | "first").
  """

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    m = config.model
    dtype = layers.compute_dtype(config)
    self.pooling = m.transformer.get("pooling", "mean")
    if self.pooling not in ("mean", "first"):
      raise ConfigError(
          f"config.model.transformer.pooling: '{self.pooling}' is not one of "
          "['first', 'mean']")
    self.fields = tuple(spec.fields)
    self.embed = PositionedEmbedding(config, spec, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([
        layers.TransformerLayer(m.hidden_dim, m.num_heads,
                                m.transformer.mlp_dim, m.dropout, dtype=dtype,
                                rngs=rngs, attention=m.attention)
        for _ in range(m.transformer.num_layers)])
    self.norm = nnx.LayerNorm(m.hidden_dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(m.dropout, rngs=rngs)

  def __call__(self, tokens: dict[str, jax.Array],
               masks: dict[str, jax.Array]) -> jax.Array:
    ids, mask = field_inputs(tokens, masks, self.fields)  # [N, L]
    x = self.dropout(self.embed(ids, mask))  # [N, L, D]
    for block in self.blocks:
      x = block(x, mask)
    x = self.norm(x)  # [N, L, D]
    if self.pooling == "first":
      return x[:, 0] * mask[:, :1].astype(x.dtype)  # [N, D]
    return layers.masked_mean(x, mask)  # [N, D]
