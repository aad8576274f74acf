"""Attention building blocks shared by the item and user encoders.

Every block takes a boolean padding mask (True on real positions) and keeps
padding out of its result: padded positions get exactly zero attention weight,
and a sequence with no real position at all (the padding item, an empty
history) pools to a finite zero vector instead of NaN.

Parameters are float32; computation runs in the `dtype` given to each block
(float32 or bfloat16), with softmaxes always carried out in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from genre_jax.errors import ConfigError
from genre_jax.lm.attention import dot_product_attention

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """The compute dtype named by config.model.dtype."""
  name = config.model.dtype
  if name not in _DTYPES:
    raise ConfigError(
        f"config.model.dtype: '{name}' is not one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def num_heads_for(dim: int, num_heads: int, where: str) -> int:
  """Checks that `dim` splits evenly into `num_heads` heads; returns head size."""
  if num_heads < 1 or dim % num_heads:
    raise ConfigError(
        f"config.model.num_heads: {num_heads} heads do not divide the "
        f"{where} size {dim}")
  return dim // num_heads


def masked_softmax(logits: jax.Array, mask: jax.Array,
                   axis: int = -1) -> jax.Array:
  """Softmax over `axis` that gives masked entries exactly zero weight.

  Computed in float32. Where every entry along `axis` is masked the weights are
  all zero (not NaN), so the pooled vector is zero; gradients stay finite.
  """
  mask = jnp.broadcast_to(mask, logits.shape)
  logits = jnp.where(mask, logits.astype(jnp.float32),
                     jnp.finfo(jnp.float32).min)
  logits = logits - jax.lax.stop_gradient(logits.max(axis, keepdims=True))
  weights = jnp.exp(logits) * mask
  total = weights.sum(axis, keepdims=True)
  return weights / jnp.where(total > 0, total, 1.0)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x [..., L, D] over the real positions of mask [..., L]; 0 if none."""
  weights = mask.astype(x.dtype)[..., None]  # [..., L, 1]
  count = jnp.maximum(weights.sum(-2), 1)  # [..., 1]
  return (x * weights).sum(-2) / count


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     mask: jax.Array, implementation: str = "auto"
                     ) -> jax.Array:
  """Scaled dot-product self-attention over a padded sequence.

  Args:
    q, k, v: [B, L, N, Dh] queries, keys and values.
    mask: [B, L] bool, True on real positions.
    implementation: auto | xla | cudnn (see dot_product_attention).

  Returns:
    [B, L, N, Dh]; rows of padded queries (hence all rows of an all-padding
    sequence) are zero.
  """
  # Keys are masked per sequence: [B, 1, 1, Lk], broadcast to [B, N, Lq, Lk].
  key_mask = mask[:, None, None, :]
  out = dot_product_attention(q, k, v, key_mask, implementation)
  # Select, not multiply: a fused kernel may return NaN for a fully masked
  # row (cuDNN), and NaN * 0 is NaN; an empty history must give exact zeros.
  return jnp.where(mask[:, :, None, None], out, jnp.zeros((), out.dtype))


class MultiHeadSelfAttention(nnx.Module):
  """Multi-head self-attention with a fused QKV projection (NRMS, Transformer).

  NRMS (Wu et al. 2019) concatenates the heads without an output projection
  (`output_projection=False`); a Transformer layer mixes them with one.
  """

  def __init__(self, in_dim: int, out_dim: int, num_heads: int, *,
               dtype: jnp.dtype, rngs: nnx.Rngs,
               output_projection: bool = True, implementation: str = "auto"):
    self.num_heads = num_heads
    self.implementation = implementation
    self.head_dim = num_heads_for(out_dim, num_heads, "attention output")
    self.qkv = nnx.Linear(in_dim, 3 * out_dim, dtype=dtype, rngs=rngs)
    self.out = nnx.data(None)
    if output_projection:
      self.out = nnx.Linear(out_dim, out_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B, L, Din], mask [B, L] -> [B, L, Dout], zero on padded positions."""
    b, l, _ = x.shape
    qkv = self.qkv(x).reshape(b, l, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, N, Dh]
    heads = masked_attention(q, k, v, mask,
                             self.implementation)  # [B, L, N, Dh]
    out = heads.reshape(b, l, self.num_heads * self.head_dim)  # [B, L, D]
    if self.out is not None:
      out = self.out(out)
    return out * mask[..., None].astype(out.dtype)


class AdditiveAttention(nnx.Module):
  """Additive attention pooling (NRMS/NAML): weights softmax(tanh(W x + b) . q)."""

  def __init__(self, in_dim: int, attention_dim: int, *, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.proj = nnx.Linear(in_dim, attention_dim, dtype=dtype, rngs=rngs)
    self.query = nnx.Linear(attention_dim, 1, use_bias=False, dtype=dtype,
                            rngs=rngs)

  def weights(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [..., L, D], mask [..., L] -> float32 weights [..., L]."""
    scores = self.query(jnp.tanh(self.proj(x)))[..., 0]  # [..., L]
    return masked_softmax(scores, mask)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [..., L, D], mask [..., L] -> pooled [..., D]; zero if all masked."""
    w = self.weights(x, mask).astype(x.dtype)  # [..., L]
    return jnp.einsum("...l,...ld->...d", w, x)


class FastformerAttention(nnx.Module):
  """Fastformer additive attention (Wu et al. 2021), linear in sequence length.

  Per head, a global query is pooled from the queries by additive attention, is
  multiplied element-wise into every key, and the products are pooled again
  into a global key that multiplies every value. As in the paper's released
  code, values share the query projection.
  """

  def __init__(self, dim: int, num_heads: int, *, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.head_dim = num_heads_for(dim, num_heads, "Fastformer")
    self.query = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.key = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.query_score = nnx.Linear(dim, num_heads, dtype=dtype, rngs=rngs)
    self.key_score = nnx.Linear(dim, num_heads, dtype=dtype, rngs=rngs)
    self.transform = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)

  def _pool(self, x: jax.Array, scores: jax.Array,
            mask: jax.Array) -> jax.Array:
    """Per-head additive pooling: x [B, L, D], scores [B, L, N] -> [B, 1, D]."""
    b, l, d = x.shape
    scale = self.head_dim ** -0.5
    w = masked_softmax(scores * scale, mask[..., None], axis=1)  # [B, L, N]
    heads = x.reshape(b, l, self.num_heads, self.head_dim)  # [B, L, N, Dh]
    pooled = jnp.einsum("bln,blnh->bnh", w.astype(x.dtype), heads)
    return pooled.reshape(b, 1, d)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B, L, D], mask [B, L] -> [B, L, D], zero on padded positions."""
    q = self.query(x)  # [B, L, D]
    k = self.key(x)  # [B, L, D]
    global_q = self._pool(q, self.query_score(q), mask)  # [B, 1, D]
    p = k * global_q  # [B, L, D]
    global_k = self._pool(p, self.key_score(p), mask)  # [B, 1, D]
    out = self.transform(global_k * q) + q  # [B, L, D]
    return out * mask[..., None].astype(out.dtype)


class FastformerBlock(nnx.Module):
  """A post-LN Fastformer layer: attention and a GELU MLP, each add & norm."""

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float,
               *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.attention = FastformerAttention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.attention_out = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-12, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, mlp_dim, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, dim, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-12, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B, L, D], mask [B, L] -> [B, L, D]."""
    h = self.dropout(self.attention_out(self.attention(x, mask)))
    x = self.norm1(x + h)
    h = self.mlp_out(jax.nn.gelu(self.mlp_in(x)))
    return self.norm2(x + self.dropout(h))


class TransformerLayer(nnx.Module):
  """A pre-LN Transformer encoder layer (self-attention and a GELU MLP)."""

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float,
               *, dtype: jnp.dtype, rngs: nnx.Rngs,
               attention: str = "auto"):
    self.norm1 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.attention = MultiHeadSelfAttention(dim, dim, num_heads, dtype=dtype,
                                            rngs=rngs,
                                            implementation=attention)
    self.norm2 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, mlp_dim, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B, L, D], mask [B, L] -> [B, L, D]."""
    x = x + self.dropout(self.attention(self.norm1(x), mask))
    h = self.mlp_out(self.dropout(jax.nn.gelu(self.mlp_in(self.norm2(x)))))
    return x + self.dropout(h)


class PolyAttention(nnx.Module):
  """MINER poly attention (Li et al. 2022): P learned codes pool the history.

  Code j attends with weights softmax_i(c_j . tanh(W h_i)) over the real
  positions, giving P interest vectors per user.
  """

  def __init__(self, in_dim: int, code_dim: int, num_codes: int, *,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    self.proj = nnx.Linear(in_dim, code_dim, use_bias=False, dtype=dtype,
                           rngs=rngs)
    init = nnx.initializers.xavier_uniform()
    self.codes = nnx.Param(init(rngs.params(), (num_codes, code_dim)))
    self.dtype = dtype

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B, L, D], mask [B, L] -> interests [B, P, D]; zeros if all masked."""
    keys = jnp.tanh(self.proj(x))  # [B, L, K]
    codes = self.codes[...].astype(self.dtype)  # [P, K]
    scores = jnp.einsum("blk,pk->bpl", keys, codes)  # [B, P, L]
    w = masked_softmax(scores, mask[:, None, :]).astype(x.dtype)  # [B, P, L]
    return jnp.einsum("bpl,bld->bpd", w, x)


def disagreement(interests: jax.Array) -> jax.Array:
  """MINER's disagreement regulariser: mean pairwise cosine of the interests.

  Args:
    interests: [B, P, D] interest vectors of each user.

  Returns:
    A float32 scalar; adding it to the loss pushes the P interests apart. Zero
    vectors (empty histories) contribute zero.
  """
  x = interests.astype(jnp.float32)
  norm = jnp.sqrt(jnp.maximum((x * x).sum(-1, keepdims=True), 1e-12))
  unit = x / norm  # [B, P, D]
  return jnp.einsum("bpd,bqd->bpq", unit, unit).mean()
