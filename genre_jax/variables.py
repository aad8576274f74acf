"""NNX variable types that tell the optimizer how to treat a weight.

A module marks its weights by type, never by name: plain `nnx.Param`s train at
`train.lr`; `Pretrained` weights (a loaded language model) and LoRA adapters
(`nnx.LoRAParam`) at `model.lm.lr`; `Frozen` weights get no update and no
optimizer state. All are `nnx.Param` subclasses, so `nnx.split(model,
nnx.Param, ...)` keeps them with the parameters (and in checkpoints).
"""

from __future__ import annotations

from flax import nnx

LoRAParam = nnx.LoRAParam


class Pretrained(nnx.Param):
  """A loaded pretrained weight that is fine-tuned at model.lm.lr."""


class Frozen(nnx.Param):
  """A weight that training never changes (frozen layers, a fixed table)."""


# Optimizer group of each variable type: the first type that matches wins.
GROUPS = ((Frozen, "frozen"), (Pretrained, "lm"), (LoRAParam, "lm"),
          (nnx.Param, "rec"))


def group_of(variable_type: type) -> str:
  """"frozen" | "lm" | "rec": the optimizer group of a variable type."""
  for kind, group in GROUPS:
    if issubclass(variable_type, kind):
      return group
  return "rec"


def retype(module: nnx.Module, new_type: type[nnx.Param]) -> None:
  """Turns every parameter inside `module` (recursively) into `new_type`, in
  place, values and metadata kept; LoRA adapters are left as they are."""
  for _, sub in nnx.iter_modules(module):
    for name, child in list(vars(sub).items()):
      if (isinstance(child, nnx.Param) and not isinstance(child, LoRAParam)
          and type(child) is not new_type):
        setattr(sub, name, new_type(child.get_value(), **child.get_metadata()))


def group_labels(params):
  """The optimizer group of every leaf of an nnx parameter State: a tree of
  the same structure with "frozen" | "lm" | "rec" in place of the arrays."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.tree.map(
      lambda v: jax.tree.map(lambda _: group_of(type(v)), v), params,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
