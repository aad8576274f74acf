"""A BERT encoder in Flax NNX that computes exactly what HF `BertModel` does
(and `RobertaModel` / `XLMRobertaModel`: the same network, with position ids
that count the non-padding tokens from `pad_token_id + 1`).

The forward pass is split as `embed` then `run_layers(start, stop)`, so lower
layers can be run once and their outputs cached while upper layers train.
Every attention/MLP projection is an `nnx.Linear` named `query`, `key`,
`value`, `attention_output`, `intermediate` or `output`, the names that
`lora.apply_lora` targets. Dropout is off until `model.train()`.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from genre_jax.lm import hf
from genre_jax.lm.attention import dot_product_attention, same_segment
from genre_jax.lm.hf import BertConfig


def _layer_norm(cfg: BertConfig, dtype, param_dtype, rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps,
                       use_fast_variance=False, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


def position_ids(cfg: BertConfig, input_ids: jax.Array) -> jax.Array:
  """Position ids of token ids [B, L]: [1, L] 0, 1, ... for BERT; [B, L] for
  RoBERTa, pad_token_id + 1, + 2, ... over the non-padding ids and
  pad_token_id on padding (HF `create_position_ids_from_input_ids`)."""
  if not cfg.roberta_positions:
    return jnp.arange(input_ids.shape[1])[None]
  real = (input_ids != cfg.pad_token_id).astype(jnp.int32)
  return jnp.cumsum(real, axis=1) * real + cfg.pad_token_id


class BertEmbeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""

  def __init__(self, cfg: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.config = cfg
    init = nnx.initializers.normal(0.02)
    embed = functools.partial(nnx.Embed, features=cfg.hidden_size, dtype=dtype,
                              param_dtype=param_dtype, embedding_init=init,
                              rngs=rngs)
    self.word_embeddings = embed(cfg.vocab_size)
    self.position_embeddings = embed(cfg.max_position_embeddings)
    self.token_type_embeddings = embed(cfg.type_vocab_size)
    self.layer_norm = _layer_norm(cfg, dtype, param_dtype, rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout, deterministic=True,
                               rngs=rngs)

  def __call__(self, input_ids: jax.Array,
               token_type_ids: jax.Array) -> jax.Array:
    positions = position_ids(self.config, input_ids)  # [B or 1, L]
    x = (self.word_embeddings(input_ids)
         + self.position_embeddings(positions)
         + self.token_type_embeddings(token_type_ids))  # [B, L, D]
    return self.dropout(self.layer_norm(x))


class BertLayer(nnx.Module):
  """Post-LN self-attention and MLP blocks, as HF `BertLayer`."""

  def __init__(self, cfg: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.activation = cfg.hidden_act
    d, i = cfg.hidden_size, cfg.intermediate_size
    linear = functools.partial(
        nnx.Linear, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
    dropout = functools.partial(nnx.Dropout, deterministic=True, rngs=rngs)
    self.query = linear(d, d)
    self.key = linear(d, d)
    self.value = linear(d, d)
    self.attention_dropout = dropout(cfg.attention_dropout)
    self.attention_output = linear(d, d)
    self.attention_output_dropout = dropout(cfg.hidden_dropout)
    self.attention_norm = _layer_norm(cfg, dtype, param_dtype, rngs)
    self.intermediate = linear(d, i)
    self.output = linear(i, d)
    self.output_dropout = dropout(cfg.hidden_dropout)
    self.output_norm = _layer_norm(cfg, dtype, param_dtype, rngs)

  def _attention(self, x: jax.Array, keep: jax.Array) -> jax.Array:
    """keep [B, 1, 1 or L, L]: True where a query may attend to a key."""
    batch, length, width = x.shape
    heads = (batch, length, self.num_heads, width // self.num_heads)
    q = self.query(x).reshape(heads)  # [B, L, N, H]
    k = self.key(x).reshape(heads)
    v = self.value(x).reshape(heads)
    if self.attention_dropout.deterministic or not self.attention_dropout.rate:
      y = dot_product_attention(q, k, v, keep)  # [B, L, N, H]
    else:  # Dropout on the attention probabilities needs them explicitly.
      logits = jnp.einsum("bqnh,bknh->bnqk", q, k) / jnp.sqrt(
          jnp.asarray(heads[-1], q.dtype))
      logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
      probs = self.attention_dropout(jax.nn.softmax(logits, axis=-1))
      y = jnp.einsum("bnqk,bknh->bqnh", probs, v)
    return self.attention_output(y.reshape(batch, length, width))

  def __call__(self, x: jax.Array, keep: jax.Array) -> jax.Array:
    """x [B, L, D]; keep [B, 1, 1 or L, L] (see _attention)."""
    x = self.attention_norm(
        x + self.attention_output_dropout(self._attention(x, keep)))
    h = hf.ACTIVATIONS[self.activation](self.intermediate(x))  # [B, L, I]
    return self.output_norm(x + self.output_dropout(self.output(h)))


class BertEncoder(nnx.Module):
  """HF `BertModel` (or `RobertaModel`) without the pooler: token ids -> last
  hidden state."""

  def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, param_dtype=None,
               rngs: nnx.Rngs):
    param_dtype = dtype if param_dtype is None else param_dtype
    self.config = cfg
    self.embeddings = BertEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype,
                                     rngs=rngs)
    self.layers = nnx.List([
        BertLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(cfg.num_layers)])

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  def embedding_modules(self) -> list[nnx.Module]:
    """What runs below layer 0 (frozen with the lower layers)."""
    return [self.embeddings]

  def final_norm(self, hidden: jax.Array) -> jax.Array:
    """BERT's layers end post-norm: the last hidden state is final."""
    return hidden

  def embed(self, input_ids: jax.Array,
            token_type_ids: jax.Array | None = None) -> jax.Array:
    """Embeds [B, L] token ids (segment 0 by default) to [B, L, D]."""
    length = input_ids.shape[1]
    if length > self.config.max_length:
      raise ValueError(f"sequence length {length} exceeds the "
                       f"{self.config.max_length} positions of "
                       f"max_position_embeddings "
                       f"{self.config.max_position_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    return self.embeddings(input_ids, token_type_ids)

  def run_layers(self, hidden: jax.Array, mask: jax.Array, start: int,
                 stop: int, segments: jax.Array | None = None) -> jax.Array:
    """Runs layers start..stop-1 on hidden [B, L, D]; mask [B, L] marks real
    tokens. `start` and `stop` are Python ints (static under jit).
    segments [B, L] (packed rows, lm/packing.py) keep attention inside each
    sequence; positions were added by `embed`, before packing."""
    if not 0 <= start <= stop <= self.num_layers:
      raise ValueError(f"need 0 <= start <= stop <= {self.num_layers}, got "
                       f"start={start}, stop={stop}")
    keep = mask.astype(bool)[:, None, None, :]  # [B, 1, 1, L]: real keys
    if segments is not None:
      keep = keep & same_segment(segments)  # [B, 1, L, L]
    for layer in self.layers[start:stop]:
      hidden = layer(hidden, keep)
    return hidden

  def __call__(self, input_ids: jax.Array, mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    """Last hidden state [B, L, D] of token ids [B, L] with mask [B, L]."""
    return self.run_layers(self.embed(input_ids, token_type_ids), mask, 0,
                           self.num_layers)


def _hf_sources(cfg: BertConfig, prefix: str) -> dict[tuple[Any, ...],
                                                      hf.Source]:
  """Our parameter paths -> HF BertModel tensor names (with `prefix`)."""

  def norm(ours: tuple[Any, ...], theirs: str) -> dict[tuple[Any, ...],
                                                       hf.Source]:
    # Old checkpoints name LayerNorm parameters gamma/beta.
    return {
        (*ours, "scale"): hf.Source(
            (f"{prefix}{theirs}.weight", f"{prefix}{theirs}.gamma")),
        (*ours, "bias"): hf.Source(
            (f"{prefix}{theirs}.bias", f"{prefix}{theirs}.beta")),
    }

  sources = {
      ("embeddings", name, "embedding"): hf.Source(
          (f"{prefix}embeddings.{name}.weight",))
      for name in ("word_embeddings", "position_embeddings",
                   "token_type_embeddings")}
  sources.update(norm(("embeddings", "layer_norm"), "embeddings.LayerNorm"))
  linears = {
      "query": "attention.self.query",
      "key": "attention.self.key",
      "value": "attention.self.value",
      "attention_output": "attention.output.dense",
      "intermediate": "intermediate.dense",
      "output": "output.dense",
  }
  for i in range(cfg.num_layers):
    layer = f"{prefix}encoder.layer.{i}."
    for ours, theirs in linears.items():
      sources[("layers", i, ours, "kernel")] = hf.Source(
          (f"{layer}{theirs}.weight",), transpose=True)
      sources[("layers", i, ours, "bias")] = hf.Source(
          (f"{layer}{theirs}.bias",))
    sources.update(norm(("layers", i, "attention_norm"),
                        f"encoder.layer.{i}.attention.output.LayerNorm"))
    sources.update(norm(("layers", i, "output_norm"),
                        f"encoder.layer.{i}.output.LayerNorm"))
  return sources


def load_bert(path: str | pathlib.Path, *, dtype=jnp.float32,
              param_dtype=None, rngs: nnx.Rngs) -> tuple[BertEncoder,
                                                         BertConfig]:
  """Loads a BERT model directory (config.json + safetensors).

  Accepts `BertModel` / `RobertaModel` checkpoints and head models that
  prefix the backbone with `bert.` or `roberta.`; pooler and head weights are
  ignored.

  Args:
    path: the Hugging Face model directory.
    dtype: compute dtype.
    param_dtype: parameter dtype (default: `dtype`).
    rngs: seeds the dropout streams.

  Returns:
    The encoder (in eval mode) and its config.
  """
  cfg = hf.read_bert_config(path)
  checkpoint = hf.Checkpoint(path)
  prefix = hf.find_prefix(checkpoint, "embeddings.word_embeddings.weight",
                          ("", "bert.", "roberta."))
  hf.check_layer_count(checkpoint, f"{prefix}encoder.layer.", cfg.num_layers,
                       pathlib.Path(path) / hf.CONFIG_FILE)
  model = hf.build_from_checkpoint(
      lambda r: BertEncoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
      checkpoint, _hf_sources(cfg, prefix), rngs=rngs)
  return model, cfg
