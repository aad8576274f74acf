"""A Llama decoder in Flax NNX that computes exactly what HF `LlamaModel` does.

Pre-norm decoder layers (RMSNorm, rotary attention with grouped key/value
heads, SwiGLU MLP), a final RMSNorm and a tied or separate LM head. The
same module, driven by config fields, is also HF's Mistral (a sliding
attention window), Qwen2/2.5 (q/k/v biases) and Qwen3 (RMSNorm of each
query and key head before RoPE, `q_norm`/`k_norm`). The
forward pass is split as `embed` then `run_layers(start, stop)` for layer
caching, and `step` runs the model against a fixed-size KV cache for prefill
and token-by-token generation under `jit`.

Padding: sequences may be padded on either side. Positions default to
`positions_from_mask(mask)` (0, 1, ... over real tokens), so a left-padded
prompt gets the positions it would have unpadded. With the cache, every row
writes the same cache slots, and padded slots are masked out of attention, so
left- and right-padded prompts both work; left padding is the usual choice for
batched generation because every row's next-token logits are then in the last
column. A sliding window counts slots (columns), as transformers' masks count
cache positions: it is the number of most recent tokens only while a row's
real tokens are contiguous, as they are with one-sided padding.

Projections are `nnx.Linear` layers named `q_proj`, `k_proj`, `v_proj`,
`o_proj`, `gate_proj`, `up_proj` and `down_proj`, the names that
`lora.apply_lora` targets. There is no dropout: Llama checkpoints are trained
without it (LoRA adapters bring their own).
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import Any

from flax import nnx
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from genre_jax.lm import hf
from genre_jax.lm.attention import same_segment
from genre_jax.lm.hf import LlamaConfig


def positions_in_segments(mask: jax.Array, segments: jax.Array) -> jax.Array:
  """[B, L] positions of packed rows: each real token's count of real tokens
  before it in its own (contiguous) segment."""
  count = jnp.cumsum(jnp.asarray(mask).astype(jnp.int32), axis=-1)  # [B, L]
  segments = jnp.asarray(segments)
  starts = jnp.concatenate(
      [jnp.ones_like(segments[:, :1], bool),
       segments[:, 1:] != segments[:, :-1]], axis=-1)  # first slot of each
  before = jnp.where(starts, count - jnp.asarray(mask).astype(jnp.int32), 0)
  return jnp.maximum(count - 1 - jax.lax.cummax(before, axis=1), 0)


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position ids [B, L] int32 counting real tokens: 0, 1, ... (pads get the
  position of the previous real token, or 0 before the first)."""
  mask = jnp.asarray(mask).astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def rope_inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
  """Inverse rotary frequencies [head_dim / 2] float32, with the config's
  linear or Llama-3 scaling applied as in transformers' rope utils."""
  dim = cfg.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
  inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(
      np.float32)
  scaling = cfg.rope_scaling
  if scaling is None:
    return inv_freq
  if scaling.rope_type == "linear":
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
  # "llama3": keep high frequencies, divide low ones by `factor`, and blend
  # the band in between.
  old_len = scaling.original_max_position_embeddings
  low_wavelen = old_len / scaling.low_freq_factor
  high_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _rotary(inv_freq: np.ndarray, positions: jax.Array,
            dtype) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, L, 1, head_dim] for position ids [B, L]."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """HF's rotate_half convention: the two halves of head_dim form the pairs."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32, as HF `LlamaRMSNorm`."""

  def __init__(self, size: int, eps: float, *, param_dtype):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((size,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * h.astype(x.dtype)


def write_to_cache(k: jax.Array, v: jax.Array, cache):
  """(keys, values, updated) for attention: with a layer's cache (keys
  [B, S, K, H], values [B, S, K, H], index []) the new k, v [B, T, K, H]
  written at slots index..index+T-1, the whole cache attended to and
  returned as updated; without one, k and v themselves and None."""
  if cache is None:
    return k, v, None
  keys, values, index = cache
  start = (0, index, 0, 0)
  k = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), start)
  v = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), start)
  return k, v, (k, v)


class LlamaAttention(nnx.Module):
  """Rotary self-attention with `num_kv_heads` shared key/value heads."""

  def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.num_kv_heads = cfg.num_kv_heads
    self.head_dim = cfg.head_dim
    linear = functools.partial(
        nnx.Linear, use_bias=cfg.attention_bias, dtype=dtype,
        param_dtype=param_dtype, kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs)
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, (
        cfg.num_kv_heads * cfg.head_dim)
    self.q_proj = linear(d, q)
    self.k_proj = linear(d, kv)
    self.v_proj = linear(d, kv)
    self.o_proj = linear(q, d, use_bias=cfg.out_bias)
    # Qwen3: each query and key head RMS-normed over head_dim before RoPE.
    if cfg.qk_norm:
      self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps,
                            param_dtype=param_dtype)
      self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps,
                            param_dtype=param_dtype)
    else:
      self.q_norm = self.k_norm = None

  def __call__(
      self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
      cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attends x [B, T, D] to itself, or to the cache with x written in.

    Args:
      x: [B, T, D] inputs.
      cos, sin: [B, T, 1, head_dim] rotary tables for the positions of x.
      mask: [B, 1, T, S] bool, True where query t may attend to key s.
      cache: (keys [B, S, K, H], values [B, S, K, H], index []) to write the
        new keys/values into at slots index..index+T-1, or None (S = T).

    Returns:
      The output [B, T, D] and the updated (keys, values), or None.
    """
    batch, length, _ = x.shape
    q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
    k, v, updated = write_to_cache(k, v, cache)
    # Grouped-query attention: jax broadcasts each K/V head over N/K queries.
    y = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), mask=mask)  # [B, T, N, H]
    return self.o_proj(y.reshape(batch, length, -1)), updated


class LlamaMLP(nnx.Module):
  """SwiGLU: down(act(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.activation = cfg.hidden_act
    linear = functools.partial(
        nnx.Linear, use_bias=cfg.mlp_bias, dtype=dtype,
        param_dtype=param_dtype, kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs)
    self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size)
    self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size)
    self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = hf.ACTIVATIONS[self.activation](self.gate_proj(x))  # [B, T, I]
    return self.down_proj(gate * self.up_proj(x))


class LlamaLayer(nnx.Module):
  """Pre-norm attention and MLP blocks with residuals, as HF
  `LlamaDecoderLayer`."""

  def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                   param_dtype=param_dtype)
    self.self_attn = LlamaAttention(cfg, dtype=dtype, param_dtype=param_dtype,
                                    rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                            param_dtype=param_dtype)
    self.mlp = LlamaMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, cos, sin, mask, cache=None):
    y, updated = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
    x = x + y
    return x + self.mlp(self.post_attention_layernorm(x)), updated


@struct.dataclass
class KVCache:
  """Keys and values of every layer for up to `max_len` tokens per row.

  All rows share the write slot `index`; `mask` marks the slots that hold real
  (non-padding) tokens, so padded slots are never attended to.
  """

  keys: tuple[jax.Array, ...]  # Per layer [B, S, K, H].
  values: tuple[jax.Array, ...]  # Per layer [B, S, K, H].
  mask: jax.Array  # [B, S] bool.
  index: jax.Array  # [] int32: the next slot to write.

  @classmethod
  def empty(cls, batch: int, max_len: int, num_layers: int, num_heads: int,
            head_dim: int, dtype) -> "KVCache":
    """No token cached yet: `num_layers` zero key and value arrays."""
    shape = (batch, max_len, num_heads, head_dim)
    return cls(
        keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
        values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
        mask=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.mask.shape[1]

  def check_room(self, length: int) -> None:
    """Raises ValueError when `length` more tokens would overflow the cache
    (checked when the index is concrete; under jit it is the caller's duty,
    since an overflowing write would be clamped)."""
    try:
      index = int(self.index)
    except (jax.errors.ConcretizationTypeError,
            jax.errors.TracerIntegerConversionError):  # Traced under jit.
      return
    if index + length > self.max_len:
      raise ValueError(f"cache overflow: {index} tokens cached + {length} new "
                       f"> max_len {self.max_len}")

  def slots_for(self, input_ids: jax.Array, mask: jax.Array | None
               ) -> tuple[jax.Array, jax.Array]:
    """Where a decoder step's T new tokens go: (the cache's mask with theirs
    written at slots index..index+T-1 [B, S], those slots [T]).

    `mask` [B, T] is True on real tokens (None: all real); raises ValueError
    when they would overflow the cache (see check_room).
    """
    batch, length = input_ids.shape
    if mask is None:
      mask = jnp.ones((batch, length), bool)
    self.check_room(length)
    cache_mask = jax.lax.dynamic_update_slice(
        self.mask, jnp.asarray(mask).astype(bool), (0, self.index))  # [B, S]
    return cache_mask, self.index + jnp.arange(length)

  def advanced(self, keys, values, cache_mask: jax.Array,
               length: int) -> "KVCache":
    """The cache after a step of `length` new tokens: every layer's updated
    keys and values, the mask from `slots_for`, the write slot past them."""
    return KVCache(keys=tuple(keys), values=tuple(values), mask=cache_mask,
                   index=self.index + length)


class LlamaDecoder(nnx.Module):
  """HF `LlamaForCausalLM`: token ids -> final-normed hidden -> logits."""

  def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, param_dtype=None,
               rngs: nnx.Rngs):
    param_dtype = dtype if param_dtype is None else param_dtype
    self.config = cfg
    self.dtype = dtype
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.layers = nnx.List([
        LlamaLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                        param_dtype=param_dtype)
    self.lm_head = None if cfg.tie_word_embeddings else nnx.Linear(
        cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype,
        param_dtype=param_dtype, kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs)

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  def _rotary(self, positions: jax.Array, dtype) -> tuple[jax.Array,
                                                          jax.Array]:
    return _rotary(rope_inverse_frequencies(self.config), positions, dtype)

  def _masks(self, query_slots: jax.Array, key_slots: jax.Array,
             key_mask: jax.Array, layers: range) -> dict[int | None,
                                                        jax.Array]:
    """Attention masks [B, 1, T, S] of `layers`, by attention window.

    Query t (at slot query_slots[t]) may attend to key s when s is a real
    token (key_mask [B, S]) at a slot no later than its own and, in a layer
    with a window w, later than query slot - w (transformers' sliding mask).
    """
    causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
    masks = {}
    for i in layers:
      window = self.config.sliding_window(i)
      if window not in masks:
        allowed = causal if window is None else causal & (
            key_slots[None, :] > query_slots[:, None] - window)
        masks[window] = allowed[None, None] & key_mask[:, None, None, :]
    return masks

  def embedding_modules(self) -> list[nnx.Module]:
    """What runs below layer 0 (frozen with the lower layers)."""
    return [self.embed_tokens]

  def final_norm(self, hidden: jax.Array) -> jax.Array:
    """The decoder's last hidden state is RMS-normed."""
    return self.norm(hidden)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token ids [B, L] -> embeddings [B, L, D]."""
    return self.embed_tokens(input_ids)

  def run_layers(self, hidden: jax.Array, mask: jax.Array, start: int,
                 stop: int, positions: jax.Array | None = None,
                 segments: jax.Array | None = None) -> jax.Array:
    """Runs layers start..stop-1 (causally) on hidden [B, L, D].

    mask [B, L] marks real tokens; positions [B, L] default to
    `positions_from_mask(mask)`, or with segments [B, L] (packed rows,
    lm/packing.py) to each real token's count from its sequence's start;
    segments also keep attention inside each sequence. The output is not
    final-normed.
    """
    if not 0 <= start <= stop <= self.num_layers:
      raise ValueError(f"need 0 <= start <= stop <= {self.num_layers}, got "
                       f"start={start}, stop={stop}")
    mask = jnp.asarray(mask).astype(bool)
    if positions is None:
      positions = (positions_from_mask(mask) if segments is None else
                   positions_in_segments(mask, segments))
    slots = jnp.arange(hidden.shape[1])  # [L]
    masks = self._masks(slots, slots, mask, range(start, stop))
    if segments is not None:
      masks = {w: m & same_segment(segments) for w, m in masks.items()}
    cos, sin = self._rotary(positions, hidden.dtype)
    for i in range(start, stop):
      hidden, _ = self.layers[i](hidden, cos, sin,
                                 masks[self.config.sliding_window(i)])
    return hidden

  def __call__(self, input_ids: jax.Array, mask: jax.Array,
               positions: jax.Array | None = None) -> jax.Array:
    """Final-normed hidden states [B, L, D] (HF `LlamaModel` output)."""
    hidden = self.run_layers(self.embed(input_ids), mask, 0, self.num_layers,
                             positions)
    return self.norm(hidden)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden [B, L, D] -> next-token logits [B, L, V]."""
    if self.lm_head is None:
      return self.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens."""
    cfg = self.config
    return KVCache.empty(batch, max_len, cfg.num_layers, cfg.num_kv_heads,
                         cfg.head_dim, self.dtype if dtype is None else dtype)

  def step(self, input_ids: jax.Array, cache: KVCache, positions: jax.Array,
           mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Runs T new tokens per row against the cache and appends them to it.

    Prefill passes the whole (padded) prompt, generation one token at a time.
    The tokens go to cache slots index..index+T-1 for every row; a new token
    attends to the real tokens in earlier slots and to itself.

    Args:
      input_ids: [B, T] token ids.
      cache: from `init_cache` or a previous step; needs index + T <= max_len
        (checked when the index is concrete; under jit it is the caller's
        duty, since an overflowing write would be clamped).
      positions: [B, T] position ids, e.g. `positions_from_mask(prompt_mask)`
        for the prompt, then one more than each row's last position.
      mask: [B, T] bool, True on real tokens (default: all real).

    Returns:
      Logits [B, T, V] and the updated cache.
    """
    cache_mask, query_slots = cache.slots_for(input_ids, mask)  # [B, S], [T]
    masks = self._masks(query_slots, jnp.arange(cache.max_len), cache_mask,
                        range(self.num_layers))  # Each [B, 1, T, S].
    hidden = self.embed(input_ids)  # [B, T, D]
    cos, sin = self._rotary(positions, hidden.dtype)
    keys, values = [], []
    for i, layer in enumerate(self.layers):
      hidden, (k, v) = layer(hidden, cos, sin,
                             masks[self.config.sliding_window(i)],
                             (cache.keys[i], cache.values[i], cache.index))
      keys.append(k)
      values.append(v)
    new_cache = cache.advanced(keys, values, cache_mask, input_ids.shape[1])
    return self.logits(self.norm(hidden)), new_cache


def _hf_sources(cfg: LlamaConfig, prefix: str) -> dict[tuple[Any, ...],
                                                       hf.Source]:
  """Our parameter paths -> HF LlamaForCausalLM tensor names."""
  sources = {
      ("embed_tokens", "embedding"): hf.Source(
          (f"{prefix}embed_tokens.weight",)),
      ("norm", "weight"): hf.Source((f"{prefix}norm.weight",)),
  }
  if not cfg.tie_word_embeddings:
    sources[("lm_head", "kernel")] = hf.Source(("lm_head.weight",),
                                               transpose=True)
  linears = {  # block -> (projection, has a bias) pairs.
      "self_attn": [(name, cfg.attention_bias)
                    for name in ("q_proj", "k_proj", "v_proj")] + [
                        ("o_proj", cfg.out_bias)],
      "mlp": [(name, cfg.mlp_bias)
              for name in ("gate_proj", "up_proj", "down_proj")],
  }
  norms = ["input_layernorm", "post_attention_layernorm"]
  if cfg.qk_norm:
    norms += ["self_attn.q_norm", "self_attn.k_norm"]
  for i in range(cfg.num_layers):
    layer = f"{prefix}layers.{i}."
    for norm in norms:
      sources[("layers", i, *norm.split("."), "weight")] = hf.Source(
          (f"{layer}{norm}.weight",))
    for block, projections in linears.items():
      for name, bias in projections:
        sources[("layers", i, block, name, "kernel")] = hf.Source(
            (f"{layer}{block}.{name}.weight",), transpose=True)
        if bias:
          sources[("layers", i, block, name, "bias")] = hf.Source(
              (f"{layer}{block}.{name}.bias",))
  return sources


def load_llama(path: str | pathlib.Path, *, dtype=jnp.float32,
               param_dtype=None, rngs: nnx.Rngs) -> tuple[LlamaDecoder,
                                                          LlamaConfig]:
  """Loads a Llama, Mistral, Qwen2 or Qwen3 model directory (config.json +
  safetensors, single or sharded).

  Accepts `*ForCausalLM` checkpoints (backbone under `model.`) and bare
  `*Model` ones; an untied config needs `lm_head.weight`.

  Args:
    path: the Hugging Face model directory.
    dtype: compute dtype.
    param_dtype: parameter dtype (default: `dtype`).
    rngs: seeds any random streams the model holds.

  Returns:
    The decoder and its config.
  """
  cfg = hf.read_llama_config(path)
  checkpoint = hf.Checkpoint(path)
  prefix = hf.find_prefix(checkpoint, "embed_tokens.weight", ("model.", ""))
  hf.check_layer_count(checkpoint, f"{prefix}layers.", cfg.num_layers,
                       pathlib.Path(path) / hf.CONFIG_FILE)
  model = hf.build_from_checkpoint(
      lambda r: LlamaDecoder(cfg, dtype=dtype, param_dtype=param_dtype,
                             rngs=r),
      checkpoint, _hf_sources(cfg, prefix), rngs=rngs)
  return model, cfg
