"""Low-rank adapters (LoRA, Hu et al. 2021) for the Linear layers of a backbone.

`apply_lora` swaps named `nnx.Linear` projections for `LoRALinear`, which keeps
the pretrained kernel and adds `dropout(x) @ A @ B * alpha / r`. B starts at
zero, so a freshly adapted model computes exactly what the base model did.
Adapter weights are `LoRAParam`s (flax's `nnx.LoRAParam`, a subclass of
`nnx.Param`), so an optimizer trains only them with
`nnx.Optimizer(model, tx, wrt=LoRAParam)`.

The base may be an int8 `quantize.QuantizedLinear` (QLoRA-style: frozen int8
weights, float adapters): `apply_lora` adapts one as it does an
`nnx.Linear`, and `quantize.quantize_frozen` run after `apply_lora` converts
each adapter's frozen `base`.
"""

from __future__ import annotations

import math
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from genre_jax.lm import quantize

LoRAParam = nnx.LoRAParam
# The layers LoRA adapts: a float Linear, or an int8 one (QLoRA).
ADAPTABLE = (nnx.Linear, quantize.QuantizedLinear)


class LoRALinear(nnx.Module):
  """A pretrained `nnx.Linear` (or int8 `quantize.QuantizedLinear`) plus a
  trainable low-rank update."""

  def __init__(self, base: nnx.Linear | quantize.QuantizedLinear, *,
               rank: int, alpha: float, dropout: float = 0.0,
               deterministic: bool = True, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    self.base = base
    self.rank = rank
    self.scale = alpha / rank
    # A like PEFT (kaiming-uniform, a=sqrt(5): U(+-1/sqrt(in))); B zero.
    bound = 1.0 / math.sqrt(base.in_features)
    self.lora_a = LoRAParam(jax.random.uniform(
        rngs.params(), (base.in_features, rank), param_dtype, -bound, bound))
    self.lora_b = LoRAParam(jnp.zeros((rank, base.out_features), param_dtype))
    self.dropout = nnx.Dropout(dropout, deterministic=deterministic, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base(x)  # [..., out]
    dtype = y.dtype
    h = self.dropout(x).astype(dtype) @ self.lora_a[...].astype(dtype)
    update = h @ self.lora_b[...].astype(dtype)  # [..., out]
    return y + update * jnp.asarray(self.scale, dtype)

  def merged(self) -> nnx.Linear:
    """The base layer with `A @ B * scale` folded into its kernel; an int8
    base becomes a float32 `nnx.Linear` (its dequantized kernel plus the
    update: re-quantizing would round the update away)."""
    base = self.base
    delta = (self.lora_a[...] @ self.lora_b[...]) * self.scale  # [in, out]
    if isinstance(base, quantize.QuantizedLinear):
      return _dequantized(base, base.dequantized_kernel() + delta)
    kernel = base.kernel[...].astype(jnp.float32) + delta
    base.kernel.set_value(kernel.astype(base.kernel.dtype))
    return base


def _dequantized(base: quantize.QuantizedLinear,
                 kernel: jax.Array) -> nnx.Linear:
  """A float32 nnx.Linear computing x @ kernel + base's bias, its weights
  of the variable type of base's."""
  linear = nnx.Linear(base.in_features, base.out_features,
                      use_bias=base.use_bias, dtype=base.dtype,
                      param_dtype=jnp.float32, precision=base.precision,
                      rngs=nnx.Rngs(0))
  kind = type(base.codes)
  linear.kernel = kind(kernel.astype(jnp.float32))
  if base.bias is not None:
    linear.bias = kind(base.bias[...].astype(jnp.float32))
  return linear


def _is_training(model: nnx.Module) -> bool:
  """Whether `model` has dropout switched on (model.train() was called)."""
  return any(
      isinstance(m, nnx.Dropout) and m.deterministic is False
      for _, m in nnx.iter_modules(model))


def apply_lora(model: nnx.Module, targets: Sequence[str] = ("query", "value"),
               *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               rngs: nnx.Rngs) -> list[str]:
  """Wraps every `nnx.Linear` (or int8 `quantize.QuantizedLinear`) attribute
  named in `targets` with LoRA, in place.

  Names are attribute names anywhere in the model: "query"/"value" for BERT,
  "q_proj"/"v_proj" etc. for Llama. New dropout follows the model's current
  train/eval mode.

  Returns:
    The dotted paths of the wrapped layers.

  Raises:
    ValueError: when no target names a Linear layer of the model.
  """
  targets = tuple(targets)
  deterministic = not _is_training(model)
  wrapped = []
  linear_names = set()
  for path, module in list(nnx.iter_modules(model)):
    for name, child in list(vars(module).items()):
      if not isinstance(child, ADAPTABLE):
        continue
      linear_names.add(name)
      if name in targets:
        setattr(module, name, LoRALinear(
            child, rank=rank, alpha=alpha, dropout=dropout,
            deterministic=deterministic, rngs=rngs))
        wrapped.append(".".join(str(p) for p in (*path, name)))
  if not wrapped:
    raise ValueError(f"no Linear layer named {list(targets)} to adapt; the "
                     f"model's Linear layers are {sorted(linear_names)}")
  return wrapped


def merge_lora(model: nnx.Module) -> int:
  """Folds every LoRALinear back into a plain Linear, in place.

  The merged model computes the same function without the adapter's extra
  matmuls (for inference or for caching frozen layer outputs).

  Returns:
    The number of layers merged.
  """
  count = 0
  for _, module in list(nnx.iter_modules(model)):
    for name, child in list(vars(module).items()):
      if isinstance(child, LoRALinear):
        setattr(module, name, child.merged())
        count += 1
  return count
