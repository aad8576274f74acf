"""Weight-only quantization of a language model's frozen weights
(`model.lm.frozen_dtype`): bfloat16 storage, or int8 codes with float32
scales that are dequantized inside the matmul.

`quantize_frozen(module, dtype)` converts, in place, every `nnx.Linear` and
`nnx.Embed` whose weight is a `variables.Frozen` (the LM's embeddings and
layers below `lm.tune_from`, or all its base weights under LoRA):

  float32   nothing changes.
  bfloat16  the kernels and embedding tables are stored in bfloat16 (biases
            and norms stay float32); the layers compute in their own dtype.
  int8      a Linear becomes a `QuantizedLinear`: int8 kernel codes with one
            float32 scale per output channel (symmetric, scale = max|w| / 127),
            y = (x @ codes) * scale + bias, which equals x @ (codes * scale)
            channel by channel. An Embed becomes a `QuantizedEmbed`: one scale
            per row (token), the gathered rows times their scales.

The quantized weights stay `variables.Frozen`: parameters (checkpointed)
with no optimizer state and no update. The train step differentiates with
respect to every parameter, and jax.grad refuses integer inputs (float8 ones
pass, but their gradients then break optax's norms: 8-bit floats do not
promote), so the int8 codes are packed two to a bfloat16 word (`pack_int8`:
the 255 x 255 code pairs onto the 65025 bfloat16 bit patterns that are +0 or
a normal number, so every stored word is finite, survives `p + 0` and casts to
float32 and back, and costs one byte per weight); `unpack_int8` reads them
back. Their gradient is zero (a bitcast) and the weights sit behind
stop_gradient, so no gradient of a frozen weight is computed at all.

LoRA (QLoRA-style): `lora.LoRALinear` wraps a `QuantizedLinear` as it wraps
an `nnx.Linear`; quantizing after `lora.apply_lora` converts each adapter's
frozen `base`, and `apply_lora` also adapts an already quantized layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from genre_jax import variables

FROZEN_DTYPES = ("float32", "bfloat16", "int8")
INT8_MAX = 127  # symmetric: codes in -127..127, never -128


def quantize_int8(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 codes of `w` and float32 scales, one scale per slice
  reduced over `axis` (axis 0 of a [in, out] kernel: one per output channel;
  axis 1 of a [V, D] table: one per row). |w - codes * scale| <= scale / 2."""
  w = jnp.asarray(w, jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=axis, keepdims=True)
  scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)  # an all-zero slice: 1
  codes = jnp.clip(jnp.round(w / scale), -INT8_MAX, INT8_MAX)
  return codes.astype(jnp.int8), jnp.squeeze(scale, axis)


def dequantize_int8(codes: jax.Array, scale: jax.Array,
                    axis: int) -> jax.Array:
  """float32 weights of quantize_int8's codes and scales (same `axis`)."""
  return codes.astype(jnp.float32) * jnp.expand_dims(scale, axis)


# Code pairs v = (a + 127) * 255 + (b + 127) in 0..65024 go to the bfloat16
# bit patterns that are +0 (v = 0), positive normal (0x0080..0x7F7F) or
# negative normal (0x8080..0xFF7F): no NaN, infinity, subnormal or -0.
_BASE = 2 * INT8_MAX + 1  # 255 codes; 255 ** 2 = 65025 patterns, all used
_POSITIVE_SHIFT = 0x0080 - 1  # v in 1..32512 -> 0x0080..0x7F7F
_NEGATIVE_SHIFT = 0x8080 - (0x7F7F - _POSITIVE_SHIFT + 1)  # -> 0x8080..0xFF7F


def pack_int8(codes: jax.Array) -> jax.Array:
  """int8 codes [..., n] in -127..127 -> bfloat16 words [..., ceil(n / 2)],
  two codes a word (an odd n is padded with a 0 code)."""
  codes = jnp.asarray(codes).astype(jnp.int32) + INT8_MAX  # 0..254
  if codes.shape[-1] % 2:
    pad = [(0, 0)] * (codes.ndim - 1) + [(0, 1)]
    codes = jnp.pad(codes, pad, constant_values=INT8_MAX)
  v = codes[..., 0::2] * _BASE + codes[..., 1::2]  # 0..65024
  bits = jnp.where(v == 0, 0, jnp.where(
      v <= 0x7F7F - _POSITIVE_SHIFT, v + _POSITIVE_SHIFT, v + _NEGATIVE_SHIFT))
  return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16)


def unpack_int8(words: jax.Array, n: int) -> jax.Array:
  """pack_int8's inverse: the int8 codes [..., n]. Words cast to another
  float dtype (model.param_dtype, a float32 copy) are cast back first:
  every word is a bfloat16 number, exact in them."""
  if words.dtype != jnp.bfloat16:
    words = words.astype(jnp.bfloat16)
  bits = jax.lax.bitcast_convert_type(words, jnp.uint16).astype(jnp.int32)
  v = jnp.where(bits == 0, 0, jnp.where(
      bits < 0x8000, bits - _POSITIVE_SHIFT, bits - _NEGATIVE_SHIFT))
  pairs = jnp.stack([v // _BASE, v % _BASE], axis=-1) - INT8_MAX
  codes = pairs.reshape(*words.shape[:-1], -1)[..., :n]
  return codes.astype(jnp.int8)


class QuantizedLinear(nnx.Module):
  """A frozen `nnx.Linear` with int8 weights: per-output-channel float32
  scales, dequantized in the matmul."""

  def __init__(self, linear: nnx.Linear):
    codes, scale = quantize_int8(linear.kernel[...], axis=0)
    self.in_features = linear.in_features
    self.out_features = linear.out_features
    self.use_bias = linear.use_bias
    self.dtype = linear.dtype
    self.precision = linear.precision
    self.codes = variables.Frozen(pack_int8(codes))  # [in, out / 2] words
    self.scale = variables.Frozen(scale)  # [out] float32
    self.bias = (None if linear.bias is None else
                 variables.Frozen(jnp.asarray(linear.bias[...], jnp.float32)))

  def int8_kernel(self) -> jax.Array:
    """The int8 codes [in, out]."""
    return unpack_int8(self.codes[...], self.out_features)

  def dequantized_kernel(self) -> jax.Array:
    """The float32 kernel [in, out] that the layer computes with."""
    return dequantize_int8(self.int8_kernel(), self.scale[...], axis=0)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or jnp.result_type(x.dtype, jnp.float32)
    codes = jax.lax.stop_gradient(self.int8_kernel())
    scale = jax.lax.stop_gradient(self.scale[...]).astype(jnp.float32)
    # |codes| <= 127: exact in any float dtype, bfloat16 included.
    y = jax.lax.dot_general(
        x.astype(dtype), codes.astype(dtype),
        (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision,
        preferred_element_type=jnp.float32)  # [..., out]
    y = y * scale  # per output channel: exactly x @ (codes * scale)
    if self.bias is not None:
      y = y + jax.lax.stop_gradient(self.bias[...]).astype(jnp.float32)
    return y.astype(dtype)


class QuantizedEmbed(nnx.Module):
  """A frozen `nnx.Embed` with int8 rows, one float32 scale per row."""

  def __init__(self, embed: nnx.Embed):
    codes, scale = quantize_int8(embed.embedding[...], axis=1)
    self.num_embeddings = embed.num_embeddings
    self.features = embed.features
    self.dtype = embed.dtype
    self.codes = variables.Frozen(pack_int8(codes))  # [V, D / 2] words
    self.scale = variables.Frozen(scale)  # [V] float32

  def dequantized_table(self) -> jax.Array:
    """The float32 table [V, D] that the layer looks rows up in."""
    return dequantize_int8(self.int8_table(), self.scale[...], axis=1)

  def int8_table(self) -> jax.Array:
    """The int8 codes [V, D]."""
    return unpack_int8(self.codes[...], self.features)

  def __call__(self, ids: jax.Array) -> jax.Array:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError("Input type must be an integer or unsigned integer.")
    words = jax.lax.stop_gradient(self.codes[...])
    scale = jax.lax.stop_gradient(self.scale[...]).astype(jnp.float32)
    rows = unpack_int8(jnp.take(words, ids, axis=0), self.features)
    rows = rows.astype(jnp.float32)  # [..., D]
    out = rows * jnp.take(scale, ids, axis=0)[..., None]
    return out.astype(self.dtype or jnp.float32)

  def attend(self, query: jax.Array) -> jax.Array:
    """query [..., D] times the table, transposed: [..., V] (tied heads)."""
    dtype = self.dtype or jnp.float32
    codes = jax.lax.stop_gradient(self.int8_table())
    scale = jax.lax.stop_gradient(self.scale[...]).astype(jnp.float32)
    y = jax.lax.dot_general(query.astype(dtype), codes.astype(dtype),
                            (((query.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return (y * scale).astype(dtype)


def _is_frozen(variable) -> bool:
  return isinstance(variable, variables.Frozen)


def _to_bfloat16(variable: nnx.Variable) -> nnx.Variable:
  return type(variable)(jnp.asarray(variable[...], jnp.bfloat16),
                        **variable.get_metadata())


def quantize_frozen(module: nnx.Module, frozen_dtype: str) -> int:
  """Stores every frozen Linear kernel and Embed table inside `module` in
  `frozen_dtype` (see the module docstring), in place; weights that are
  not variables.Frozen are left as they are.

  Returns:
    The number of layers (Linear and Embed) converted.

  Raises:
    ValueError: frozen_dtype is not one of FROZEN_DTYPES.
  """
  if frozen_dtype not in FROZEN_DTYPES:
    raise ValueError(f"frozen_dtype '{frozen_dtype}' is not one of "
                     f"{', '.join(FROZEN_DTYPES)}")
  if frozen_dtype == "float32":
    return 0
  count = 0
  for _, sub in list(nnx.iter_modules(module)):
    for name, child in list(vars(sub).items()):
      if isinstance(child, nnx.Linear) and _is_frozen(child.kernel):
        if frozen_dtype == "int8":
          setattr(sub, name, QuantizedLinear(child))
        else:
          child.kernel = _to_bfloat16(child.kernel)
        count += 1
      elif isinstance(child, nnx.Embed) and _is_frozen(child.embedding):
        if frozen_dtype == "int8":
          setattr(sub, name, QuantizedEmbed(child))
        else:
          child.embedding = _to_bfloat16(child.embedding)
        count += 1
  return count
