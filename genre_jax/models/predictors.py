"""Click predictors: a user representation and candidate vectors -> logits.

Every predictor is called as

  predictor(user: [B, D] or [B, P, D], cands: [B, C, D], hist: [B, H, D],
            hist_mask: [B, H] bool) -> [B, C] float32 logits

and is registered in PREDICTORS under its config name. Only `dot` uses the P
interests of a multi-interest user (MINER); the others mean-pool them into one
vector, so every user encoder fits every predictor.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from genre_jax.models import layers
from genre_jax.registry import PREDICTORS
from genre_jax.registry import USER_ENCODERS


def single_vector(user: jax.Array) -> jax.Array:
  """A [B, D] user vector; P interests [B, P, D] are mean-pooled."""
  return user.mean(axis=1) if user.ndim == 3 else user


def returns_interests(config: ml_collections.ConfigDict) -> bool:
  """Whether the configured user encoder gives P interest vectors [B, P, D]."""
  encoder = USER_ENCODERS.get(config.model.user_encoder)
  return bool(getattr(encoder, "multi_interest", False))


class MLP(nnx.Module):
  """ReLU hidden layers then a linear output layer of size `out_dim`."""

  def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, *,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    sizes = (in_dim, *hidden)
    self.hidden = nnx.List([
        nnx.Linear(a, b, dtype=dtype, rngs=rngs)
        for a, b in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(sizes[-1], out_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for linear in self.hidden:
      x = jax.nn.relu(linear(x))
    return self.out(x)


@PREDICTORS.register("dot")
class DotPredictor(nnx.Module):
  """Inner product of user and candidate vectors.

  For P interests (MINER's target-aware aggregation) each interest scores the
  candidate by an inner product, and the P scores are mixed with weights
  softmax_p(c . gelu(W u_p)), so the candidate picks its relevant interests.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d = config.model.hidden_dim
    self.scale = d ** -0.5 if config.model.get("scaled_dot", False) else 1.0
    self.target_proj = nnx.data(None)
    if returns_interests(config):
      self.target_proj = nnx.Linear(d, d, dtype=layers.compute_dtype(config),
                                    rngs=rngs)

  def __call__(self, user: jax.Array, cands: jax.Array, hist: jax.Array,
               hist_mask: jax.Array) -> jax.Array:
    del hist, hist_mask
    if self.target_proj is None or user.ndim == 2:
      user = single_vector(user)  # [B, D]
      scores = jnp.einsum("bd,bcd->bc", user, cands).astype(jnp.float32)
      return scores * self.scale  # [B, C]
    scores = jnp.einsum("bpd,bcd->bcp", user, cands) * self.scale  # [B, C, P]
    keys = jax.nn.gelu(self.target_proj(user))  # [B, P, D]
    logits = jnp.einsum("bpd,bcd->bcp", keys, cands)  # [B, C, P]
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return (weights * scores.astype(jnp.float32)).sum(-1)  # [B, C]


@PREDICTORS.register("mlp")
class MLPPredictor(nnx.Module):
  """An MLP over [u, c, u * c] (config.model.mlp.hidden layers)."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    self.mlp = MLP(3 * m.hidden_dim, tuple(m.mlp.hidden), 1,
                   dtype=layers.compute_dtype(config), rngs=rngs)

  def __call__(self, user: jax.Array, cands: jax.Array, hist: jax.Array,
               hist_mask: jax.Array) -> jax.Array:
    del hist, hist_mask
    u = jnp.broadcast_to(single_vector(user)[:, None, :], cands.shape)
    x = jnp.concatenate([u, cands, u * cands], axis=-1)  # [B, C, 3D]
    return self.mlp(x)[..., 0].astype(jnp.float32)  # [B, C]


class CrossLayer(nnx.Module):
  """One DCN cross layer (Wang et al. 2017): x0 * (x_l . w) + b + x_l."""

  def __init__(self, dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.weight = nnx.Linear(dim, 1, use_bias=False, dtype=dtype, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.dtype = dtype

  def __call__(self, x0: jax.Array, x: jax.Array) -> jax.Array:
    """x0, x [..., F] -> [..., F]."""
    return x0 * self.weight(x) + self.bias[...].astype(self.dtype) + x


@PREDICTORS.register("dcn")
class DCNPredictor(nnx.Module):
  """Deep & Cross Network over [u, c]: config.model.dcn.num_cross cross layers
  beside a deep MLP (config.model.dcn.hidden), then a linear output layer.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    dtype = layers.compute_dtype(config)
    width = 2 * m.hidden_dim
    hidden = tuple(m.dcn.hidden)
    self.cross = nnx.List([CrossLayer(width, dtype=dtype, rngs=rngs)
                           for _ in range(m.dcn.num_cross)])
    self.deep = nnx.List([
        nnx.Linear(a, b, dtype=dtype, rngs=rngs)
        for a, b in zip((width, *hidden)[:-1], hidden)])
    deep_out = hidden[-1] if hidden else 0
    self.out = nnx.Linear(width + deep_out, 1, dtype=dtype, rngs=rngs)

  def __call__(self, user: jax.Array, cands: jax.Array, hist: jax.Array,
               hist_mask: jax.Array) -> jax.Array:
    del hist, hist_mask
    u = jnp.broadcast_to(single_vector(user)[:, None, :], cands.shape)
    x0 = jnp.concatenate([u, cands], axis=-1)  # [B, C, 2D]
    crossed = x0
    for layer in self.cross:
      crossed = layer(x0, crossed)  # [B, C, 2D]
    deep = x0
    for linear in self.deep:
      deep = jax.nn.relu(linear(deep))  # [B, C, hidden[-1]]
    parts = [crossed, deep] if self.deep else [crossed]
    return self.out(jnp.concatenate(parts, -1))[..., 0].astype(jnp.float32)


@PREDICTORS.register("din")
class DINPredictor(nnx.Module):
  """DIN target attention (Zhou et al. 2018).

  An activation unit (an MLP over [h, c, h - c, h * c]) weighs every real
  history item for the candidate; as in DIN the weights are not normalised, so
  their sum carries the strength of the interest. The weighted history sum is
  a candidate-specific user vector v_c, and an MLP over [u, v_c, c, v_c * c]
  gives the logit (u is the user encoder's vector).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    dtype = layers.compute_dtype(config)
    d = m.hidden_dim
    self.activation_unit = MLP(4 * d, (m.attention_dim,), 1, dtype=dtype,
                               rngs=rngs)
    self.score = MLP(4 * d, tuple(m.mlp.hidden), 1, dtype=dtype, rngs=rngs)

  def __call__(self, user: jax.Array, cands: jax.Array, hist: jax.Array,
               hist_mask: jax.Array) -> jax.Array:
    b, c, d = cands.shape
    h = hist.shape[1]
    hh = jnp.broadcast_to(hist[:, None], (b, c, h, d))  # [B, C, H, D]
    cc = jnp.broadcast_to(cands[:, :, None], (b, c, h, d))  # [B, C, H, D]
    pair = jnp.concatenate([hh, cc, hh - cc, hh * cc], -1)  # [B, C, H, 4D]
    w = self.activation_unit(pair)[..., 0]  # [B, C, H]
    w = w * hist_mask[:, None, :].astype(w.dtype)
    interest = jnp.einsum("bch,bhd->bcd", w, hist)  # [B, C, D]
    u = jnp.broadcast_to(single_vector(user)[:, None, :], cands.shape)
    x = jnp.concatenate([u, interest, cands, interest * cands], -1)
    return self.score(x)[..., 0].astype(jnp.float32)  # [B, C]
