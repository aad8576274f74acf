"""Owns scaled dot-product attention on XLA or cuDNN's fused kernel, shared by
the language models (lm/) and the recommender's encoders (models/)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from genre_jax.errors import ConfigError

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          key_mask: jax.Array,
                          implementation: str = "auto") -> jax.Array:
  """jax.nn.dot_product_attention, on cuDNN's fused kernel where it can run.

  JAX's own default is XLA's unfused attention. "auto" asks for cuDNN on a
  GPU with 16-bit inputs and falls back to XLA when cuDNN rejects the shapes
  (head size not a multiple of 8, odd lengths with a mask, ...); "cudnn"
  insists (and fails loudly), "xla" never tries.

  Args:
    q, k, v: [B, L, N, Dh].
    key_mask: bool, broadcastable to [B, N, Lq, Lk]; True = attend.
    implementation: auto | xla | cudnn.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ConfigError(f"config.model.attention: '{implementation}' is not one "
                      f"of {list(ATTENTION_IMPLEMENTATIONS)}")
  if implementation == "auto":
    wants_cudnn = (jax.default_backend() == "gpu" and
                   q.dtype in (jnp.bfloat16, jnp.float16))
    if wants_cudnn:
      try:
        return jax.nn.dot_product_attention(q, k, v, mask=key_mask,
                                            implementation="cudnn")
      except (NotImplementedError, ValueError, RuntimeError):
        pass  # shapes cuDNN does not take: XLA below
    implementation = "xla"
  return jax.nn.dot_product_attention(q, k, v, mask=key_mask,
                                      implementation=implementation)


def same_segment(segments: jax.Array) -> jax.Array:
  """[B, L] segment ids (0: empty slot) -> [B, 1, L, L] bool: query and key
  belong to the same packed sequence (lm/packing.py)."""
  segments = jnp.asarray(segments)
  same = segments[:, :, None] == segments[:, None, :]  # [B, L, L]
  return (same & (segments[:, None, :] > 0))[:, None]
