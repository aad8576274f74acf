"""User encoders: the vectors of a user's history items -> a user representation.

Every encoder is called as

  encoder(hist: [B, H, D], hist_mask: [B, H] bool, users: [B] int32)
    -> [B, D], or [B, P, D] (P interest vectors) for the multi-interest `poly`

and is registered in USER_ENCODERS under its config name. Padded history
positions never influence the result, and an empty history gives a finite one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from genre_jax.data.types import ItemInputSpec
from genre_jax.models import layers
from genre_jax.registry import USER_ENCODERS


@USER_ENCODERS.register("additive")
class AdditiveUserEncoder(nnx.Module):
  """Additive attention pooling of the history items."""

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    del spec  # Needs no item or user facts.
    m = config.model
    self.pool = layers.AdditiveAttention(
        m.hidden_dim, m.attention_dim, dtype=layers.compute_dtype(config),
        rngs=rngs)

  def __call__(self, hist: jax.Array, hist_mask: jax.Array,
               users: jax.Array) -> jax.Array:
    del users
    return self.pool(hist, hist_mask)  # [B, D]


@USER_ENCODERS.register("self_attention")
class SelfAttentionUserEncoder(nnx.Module):
  """NRMS user encoder: multi-head self-attention over the history, then
  additive attention pooling.
  """

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    del spec
    m = config.model
    dtype = layers.compute_dtype(config)
    self.attention = layers.MultiHeadSelfAttention(
        m.hidden_dim, m.hidden_dim, m.num_heads, dtype=dtype, rngs=rngs,
        output_projection=False, implementation=m.attention)
    self.pool = layers.AdditiveAttention(m.hidden_dim, m.attention_dim,
                                         dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(m.dropout, rngs=rngs)

  def __call__(self, hist: jax.Array, hist_mask: jax.Array,
               users: jax.Array) -> jax.Array:
    del users
    h = self.dropout(self.attention(hist, hist_mask))  # [B, H, D]
    return self.pool(h, hist_mask)  # [B, D]


@USER_ENCODERS.register("gru")
class GRUUserEncoder(nnx.Module):
  """LSTUR (An et al. 2019): a GRU over the history, oldest first.

  With config.model.gru.use_user_id (LSTUR-ini) a learned long-term user
  embedding initialises the GRU state; the unknown user (index 0) starts from
  zeros, and in training whole user vectors are dropped with the model's
  dropout rate, as LSTUR's random masking does. Padded steps leave the state
  unchanged, so the result is the state after the last real item.
  """

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    m = config.model
    self.dtype = layers.compute_dtype(config)
    self.cell = nnx.GRUCell(m.hidden_dim, m.hidden_dim, dtype=self.dtype,
                            rngs=rngs)
    self.user_embed = nnx.data(None)
    self.user_dropout = nnx.data(None)
    if m.gru.use_user_id:
      num_users = m.gru.num_users or spec.num_users
      self.user_embed = nnx.Embed(num_users, m.hidden_dim, dtype=self.dtype,
                                  rngs=rngs)
      self.user_dropout = nnx.Dropout(m.dropout, broadcast_dims=(1,),
                                      rngs=rngs)

  def initial_state(self, users: jax.Array, dim: int) -> jax.Array:
    """users [B] -> the GRU's initial state [B, D]."""
    if self.user_embed is None:
      return jnp.zeros((users.shape[0], dim), self.dtype)
    known = (users > 0)[:, None].astype(self.dtype)  # [B, 1]
    return self.user_dropout(self.user_embed(users) * known)  # [B, D]

  def __call__(self, hist: jax.Array, hist_mask: jax.Array,
               users: jax.Array) -> jax.Array:
    state = self.initial_state(users, hist.shape[-1])  # [B, D]

    def step(h, inputs):
      x, real = inputs  # [B, D], [B]
      new_h, _ = self.cell(h, x)
      return jnp.where(real[:, None], new_h.astype(h.dtype), h), None

    steps = (hist.astype(self.dtype).swapaxes(0, 1),  # [H, B, D]
             hist_mask.astype(bool).swapaxes(0, 1))  # [H, B]
    state, _ = jax.lax.scan(step, state, steps)
    return state  # [B, D]


@USER_ENCODERS.register("fastformer")
class FastformerUserEncoder(nnx.Module):
  """Fastformer layers over the history, then additive attention pooling."""

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    del spec
    m = config.model
    dtype = layers.compute_dtype(config)
    mlp_dim = m.fastformer.get("mlp_dim", m.transformer.mlp_dim)
    self.blocks = nnx.List([
        layers.FastformerBlock(m.hidden_dim, m.num_heads, mlp_dim, m.dropout,
                               dtype=dtype, rngs=rngs)
        for _ in range(m.fastformer.num_layers)])
    self.pool = layers.AdditiveAttention(m.hidden_dim, m.attention_dim,
                                         dtype=dtype, rngs=rngs)

  def __call__(self, hist: jax.Array, hist_mask: jax.Array,
               users: jax.Array) -> jax.Array:
    del users
    x = hist  # [B, H, D]
    for block in self.blocks:
      x = block(x, hist_mask)
    return self.pool(x, hist_mask)  # [B, D]


@USER_ENCODERS.register("poly")
class PolyUserEncoder(nnx.Module):
  """MINER (Li et al. 2022): P context codes attend over the history, giving
  P interest vectors [B, P, D] (P = config.model.poly.num_interests).
  """

  # Tells predictors to expect [B, P, D] users (see predictors.py).
  multi_interest = True

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    del spec
    m = config.model
    self.attention = layers.PolyAttention(
        m.hidden_dim, m.poly.code_dim, m.poly.num_interests,
        dtype=layers.compute_dtype(config), rngs=rngs)

  def __call__(self, hist: jax.Array, hist_mask: jax.Array,
               users: jax.Array) -> jax.Array:
    del users
    return self.attention(hist, hist_mask)  # [B, P, D]


@USER_ENCODERS.register("pooling")
class PoolingUserEncoder(nnx.Module):
  """Masked mean of the history item vectors (no parameters)."""

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    del config, spec, rngs

  def __call__(self, hist: jax.Array, hist_mask: jax.Array,
               users: jax.Array) -> jax.Array:
    del users
    return layers.masked_mean(hist, hist_mask)  # [B, D]
