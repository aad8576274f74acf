"""The optimizer and its learning-rate schedule.

Clipped AdamW with warm-up and decay. Parameters are grouped by their NNX
variable type (genre_jax.variables), never by name: `Frozen` weights get no
update and no optimizer state, `Pretrained` ones and LoRA adapters their own
rate (config.model.lm.lr), the rest train.lr.

Gradient accumulation (config.train.accumulate_steps = k > 1) wraps all of it
in optax.MultiSteps: every train step (one batch) adds its mean gradient to a
running mean kept in the optimizer state, and every k-th step the clip and
AdamW see that mean, once, and the parameters move; the other steps change
no parameter. The schedule counts those updates (warm-up included): the
inner optimizer's step count advances only when it applies one. With k = 1
the optimizer is exactly the unwrapped one (same state, same numbers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from genre_jax import variables
from genre_jax.errors import ConfigError


def make_schedule(config: ml_collections.ConfigDict,
                  total_steps: int) -> optax.Schedule:
  """Linear warm-up to train.lr, then cosine/linear decay or constant."""
  tc = config.train
  warmup = min(int(tc.warmup_steps), max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  if tc.decay == "cosine":
    after = optax.cosine_decay_schedule(tc.lr, decay_steps, alpha=0.0)
  elif tc.decay == "linear":
    after = optax.linear_schedule(tc.lr, 0.0, decay_steps)
  elif tc.decay == "constant":
    after = optax.constant_schedule(tc.lr)
  else:
    raise ConfigError(f"config.train.decay: unknown schedule '{tc.decay}'; "
                      "choose cosine, linear or constant")
  if warmup == 0:
    return after
  # Warm-up starts at lr / warmup rather than 0, so step 0 is not wasted.
  return optax.join_schedules(
      [optax.linear_schedule(tc.lr / warmup, tc.lr, warmup), after], [warmup])


def param_labels(params):
  """"rec" | "lm" | "frozen" for every parameter leaf (optax multi_transform),
  from each variable's type (variables.group_of)."""
  return variables.group_labels(params)


def accumulate_steps(config: ml_collections.ConfigDict) -> int:
  """config.train.accumulate_steps: train steps (batches) per optimizer
  update; 1 (also for a config without the field) = no accumulation."""
  k = config.train.get("accumulate_steps", 1)
  if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
    raise ConfigError(f"config.train.accumulate_steps={k!r}: must be an "
                      "integer >= 1")
  return k


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   params) -> optax.GradientTransformation:
  """Clipped AdamW over `params` (an nnx State, or its abstract shapes).

  With no frozen or pretrained weights: one AdamW. Otherwise pretrained
  weights and adapters get config.model.lm.lr (default train.lr) and frozen
  ones no update and no state (optax.multi_transform over param_labels).

  `total_steps` counts train steps (batches). With accumulate_steps = k > 1
  the schedule runs over total_steps // k updates and everything is wrapped
  in optax.MultiSteps (see the module docstring); a final group of fewer
  than k batches is never applied.
  """
  k = accumulate_steps(config)
  if k == 1:
    return _make_optimizer(config, total_steps, params)
  inner = _make_optimizer(config, max(total_steps // k, 1), params)
  return _skip_frozen(
      optax.MultiSteps(inner, every_k_schedule=k).gradient_transformation(),
      param_labels(params))


def _skip_frozen(tx: optax.GradientTransformation,
                 labels) -> optax.GradientTransformation:
  """`tx` with every frozen leaf replaced by a scalar placeholder: frozen
  weights keep no gradient accumulator (MultiSteps would hold a float32
  copy of each, e.g. of a whole frozen LM), and their update is zero, as
  the inner optimizer makes it."""
  if "frozen" not in set(jax.tree.leaves(labels)):
    return tx

  def drop(tree):
    return jax.tree.map(
        lambda x, label: jnp.zeros((), x.dtype) if label == "frozen" else x,
        tree, labels)

  def init(params):
    return tx.init(drop(params))

  def update(updates, state, params=None):
    new, state = tx.update(drop(updates), state,
                           None if params is None else drop(params))
    return jax.tree.map(
        lambda u, g, label: jnp.zeros_like(g) if label == "frozen" else u,
        new, updates, labels), state

  return optax.GradientTransformation(init, update)


def _make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                    params) -> optax.GradientTransformation:
  """make_optimizer's optimizer of one update per call, its schedule over
  `total_steps` updates."""
  tc = config.train
  if not float(tc.lr) > 0:
    raise ConfigError(f"config.train.lr={tc.lr}: must be > 0")
  if not float(config.model.lm.lr) >= 0:
    raise ConfigError(f"config.model.lm.lr={config.model.lm.lr}: must be > "
                      "0, or 0 to use train.lr")
  clip = (optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip > 0
          else optax.identity())
  adamw = optax.adamw(make_schedule(config, total_steps),
                      weight_decay=tc.weight_decay)
  labels = param_labels(params)
  if set(jax.tree.leaves(labels)) <= {"rec"}:
    return optax.chain(clip, adamw)
  lm_config = config.copy_and_resolve_references()
  lm_config.train.lr = float(config.model.lm.lr or tc.lr)
  lm_adamw = optax.adamw(make_schedule(lm_config, total_steps),
                         weight_decay=tc.weight_decay)

  def clip_trainable(updates, state, params=None):
    # The clip norm covers trainable gradients only: frozen ones (LoRA base
    # weights, a frozen word table) are never applied and must not shrink
    # the rest.
    trainable = jax.tree.map(
        lambda g, label: jnp.zeros_like(g) if label == "frozen" else g,
        updates, labels)
    return clip.update(trainable, state, params)

  # The same (empty) state as `clip`: checkpoints keep their structure.
  return optax.chain(
      optax.GradientTransformation(clip.init, clip_trainable),
      optax.multi_transform(
          {"rec": adamw, "lm": lm_adamw, "frozen": optax.set_to_zero()},
          labels))
