"""The model's train state and the one compiled train step.

A model is kept as an NNX graphdef plus its parameter state (`nnx.split`) and
merged inside the compiled function, so a step is a pure function of (state,
batch, items) -> (state, metrics). The recommender and masked-LM pretraining
share it; they differ only in the loss function.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from genre_jax.data.types import Dataset, ItemInputSpec
from genre_jax.errors import ConfigError
from genre_jax.models import recommender
from genre_jax.registry import ITEM_ENCODERS
from genre_jax.train import mesh as mesh_lib
from genre_jax.train import optim
from genre_jax.train.mesh import P

# (model, batch, items) -> (loss to minimise, {"loss": reported loss, ...}).
LossFn = Callable[[nnx.Module, dict, dict], tuple[jax.Array, dict]]


def model_inputs(config: ml_collections.ConfigDict, dataset: Dataset):
  """The item table the model reads and its ItemInputSpec, from the item
  encoder's own `item_inputs` hook: ({"tokens": {...}, "masks": {...}},
  spec), host arrays of N+1 rows (row 0: the padding item)."""
  encoder = ITEM_ENCODERS.get(config.model.item_encoder)
  return encoder.item_inputs(config, dataset)


def split_item_table(table: dict) -> tuple[dict, dict | None]:
  """(device table, host table or None) of an item_inputs table.

  An item encoder may keep fields in host memory (a memory-mapped cache of
  GBs) under the table's optional "host" key, {"tokens": {field: [N+1,
  ...]}, "masks": {...}}. The device table {"tokens", "masks"} goes on the
  devices; the host fields' rows are gathered on the host, for each batch's
  item_ids (batching.host_rows) and each evaluation chunk. None: no host
  fields.
  """
  device = {"tokens": table["tokens"], "masks": table["masks"]}
  host = table.get("host") or {}
  host = {"tokens": dict(host.get("tokens", {})),
          "masks": dict(host.get("masks", {}))}
  return device, (host if host["tokens"] or host["masks"] else None)


@dataclasses.dataclass
class Parts:
  """The static pieces of a run: how to rebuild the model from its state."""
  train_graphdef: Any
  eval_graphdef: Any
  rest: Any  # non-parameter model state (RNG streams), constant between steps
  tx: optax.GradientTransformation


def split_model(model: nnx.Module, make_tx: Callable[[Any], Any],
                param_dtype: str = "float32"):
  """(Parts, initial state {"params", "opt", "step"}) of a built model;
  make_tx(params) builds the optimizer for its parameters."""
  model.eval()
  eval_graphdef, _, _ = nnx.split(model, nnx.Param, ...)
  model.train()
  train_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if param_dtype == "bfloat16":  # "pure bf16": weights and Adam moments
    params = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16)
        if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  elif param_dtype != "float32":
    raise ConfigError(f"config.model.param_dtype: '{param_dtype}' is not "
                      "float32 or bfloat16")
  tx = make_tx(params)
  state = {"params": params, "opt": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  return Parts(train_graphdef, eval_graphdef, rest, tx), state


def init_model(config, spec: ItemInputSpec, total_steps: int):
  """Builds the recommender and its optimizer: (Parts, initial state)."""
  model = recommender.build_model(config, spec, seed=int(config.train.seed))
  return split_model(
      model, functools.partial(optim.make_optimizer, config, total_steps),
      config.model.get("param_dtype", "float32"))


def merge(graphdef, params, rest):
  # copy=True: fresh Variables inside the trace, so reseeding them is legal.
  return nnx.merge(graphdef, params, rest, copy=True)


def recommender_loss(model, batch, items, loss_type: str = "softmax"):
  """Weighted cross-entropy over candidates; padding rows weigh 0.

  loss_type (config.train.loss): "softmax", the cross-entropy of the labels
  against a softmax over each row's candidates; or "bce", the binary
  cross-entropy of sigmoid(logit) against the label of every real
  candidate, averaged over a row's real candidates (padded ones masked).
  Either way a row's loss is weighted by batch["weights"].
  """
  logits, aux = model(batch, items["tokens"], items["masks"])  # [B, C]
  logits = logits.astype(jnp.float32)
  labels = batch["labels"]
  if loss_type == "softmax":
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.sum(jnp.where(batch["candidate_mask"], labels * log_probs, 0.0),
                  -1)
  elif loss_type == "bce":
    real = batch["candidate_mask"].astype(bool)
    # -[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))] = softplus(x) - y x.
    bce = jnp.where(real, jax.nn.softplus(logits) - labels * logits, 0.0)
    ce = jnp.sum(bce, -1) / jnp.maximum(jnp.sum(real, -1), 1)
  else:
    raise ConfigError(f"config.train.loss='{loss_type}': must be softmax "
                      "or bce")
  weights = batch["weights"]
  loss = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  total = loss + aux.get("aux_loss", 0.0)
  return total, {"loss": loss}


def compute_loss(params, rest, graphdef, batch, items, dropout_key,
                 loss_fn: LossFn = recommender_loss):
  """loss_fn of the model merged from (graphdef, params, rest), its dropout
  keyed by dropout_key."""
  model = merge(graphdef, params, rest)
  nnx.reseed(model, dropout=dropout_key)
  return loss_fn(model, batch, items)


def train_step(state, batch, items, *, parts: Parts, seed: int,
               loss_fn: LossFn = recommender_loss):
  """One optimizer step. Pure: (state, batch, items) -> (state, metrics)."""
  dropout_key = jax.random.fold_in(jax.random.key(seed), state["step"])
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  (_, aux), grads = grad_fn(state["params"], parts.rest, parts.train_graphdef,
                            batch, items, dropout_key, loss_fn)
  updates, opt = parts.tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = {"params": params, "opt": opt, "step": state["step"] + 1}
  # False once the step diverged: a non-finite loss, or parameters that the
  # update made non-finite (the loss is computed before the update).
  finite = jnp.isfinite(aux["loss"])
  for leaf in jax.tree.leaves(params):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      finite &= jnp.isfinite(leaf).all()
  return new_state, {"loss": aux["loss"],
                     "grad_norm": optax.tree.norm(grads), "finite": finite}


def compile_train_step(parts: Parts, state, batch_shapes, items, mesh,
                       seed: int, loss_fn: LossFn = recommender_loss):
  """AOT-compiles the step for one batch shape; a different shape is an error.

  Compiling ahead of time makes "compile once" a guarantee: an unexpected
  shape fails loudly instead of silently recompiling every step.
  """
  replicated = jax.sharding.NamedSharding(mesh, P())
  data = mesh_lib.batch_sharding(mesh)
  # The state keeps its layout (replicated, or FSDP-sharded) across steps.
  state_sharding = mesh_lib.state_sharding(state, mesh)
  step = jax.jit(functools.partial(train_step, parts=parts, seed=seed,
                                   loss_fn=loss_fn),
                 in_shardings=(state_sharding, data, replicated),
                 out_shardings=(state_sharding, replicated),
                 donate_argnums=(0,))
  batch_abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data)
                    for k, v in batch_shapes.items()}
  compiled = step.lower(state, batch_abstract, items).compile()
  memory = compiled.memory_analysis()
  if memory is not None:
    logging.info("Compiled train step: temp %.1f MiB, arguments %.1f MiB, "
                 "outputs %.1f MiB", memory.temp_size_in_bytes / 2**20,
                 memory.argument_size_in_bytes / 2**20,
                 memory.output_size_in_bytes / 2**20)
    _warn_if_over_device_memory(memory, mesh)
  return compiled


def _warn_if_over_device_memory(memory, mesh) -> None:
  """One warning when the step's per-device total (argument + temp + output
  - alias) exceeds the device's memory ("bytes_limit" of memory_stats();
  CPU devices have none: no check)."""
  device = mesh.devices.flat[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  limit = (stats or {}).get("bytes_limit")
  if not limit:
    return
  total = (memory.argument_size_in_bytes + memory.temp_size_in_bytes +
           memory.output_size_in_bytes - memory.alias_size_in_bytes)
  if total > limit:
    logging.warning(
        "The compiled train step needs %.2f GiB per device (arguments + temp "
        "+ outputs - aliased), more than the %.2f GiB of %s: expect an "
        "out-of-memory error (try config.mesh.fsdp, model.lm.cache_on=host, "
        "model.lm.frozen_dtype or a smaller train.batch_size; "
        "experiments/memory_plan.py)", total / 2**30, limit / 2**30,
        device.device_kind)


# --- Divergence -------------------------------------------------------------


class TrainingDivergedError(ConfigError, FloatingPointError):
  """The loss or the parameters became NaN or infinite (usually a learning
  rate too high): the run stops rather than save or report such a model."""


@jax.jit
def track_divergence(first_bad, finite, step, loss):
  """(step, loss) of the first non-finite step so far; step -1: none yet.

  Runs on the device after every step, so finding a diverged run needs no
  host sync beyond the ones the loop already makes.
  """
  step_bad, loss_bad = first_bad
  new = (step_bad < 0) & ~finite
  return (jnp.where(new, step, step_bad),
          jnp.where(new, loss.astype(jnp.float32), loss_bad))


def check_not_diverged(first_bad, hint: str) -> None:
  """Raises TrainingDivergedError if a step so far was not finite; `hint`
  says which settings to change."""
  step, loss = (x.item() for x in jax.device_get(first_bad))
  if step < 0:
    return
  what = (f"loss is {loss}" if not math.isfinite(loss) else
          f"the parameters are not finite after the update (loss {loss:.4g})")
  raise TrainingDivergedError(
      f"training diverged: {what} at step {step}; {hint} or check the data, "
      "and train again in a new --workdir. No checkpoint or metrics of the "
      "diverged model were saved.")
