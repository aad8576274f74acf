"""Training, fast evaluation and resume for the configurable recommender.

One jit-compiled, data-parallel train step (softmax cross-entropy over the
1+K candidates of each clicked item), AdamW with warm-up, decay and clipping,
Orbax checkpoints with exact resume, early stopping on dev AUC, and a fast
evaluator that encodes every item once per evaluation.

The step is a pure function of (state, batch, item inputs): the model is kept
as an NNX graphdef plus its parameter state (`nnx.split`), merged inside the
compiled function. The state is replicated and the batch is sharded over a
one-axis ("data") mesh of every device, so the same code runs on one CPU, on
several fake CPU devices, on one GPU, or on several hosts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from genre_jax import checkpoint as ckpt_lib
from genre_jax import config as config_lib
from genre_jax import logs
from genre_jax import metrics as metrics_lib
from genre_jax import workdir as workdir_lib
from genre_jax.data import batching
from genre_jax.data import checks
from genre_jax.data.types import Behaviors, Dataset, ItemInputSpec
from genre_jax.errors import ConfigError
from genre_jax.models import recommender

P = jax.sharding.PartitionSpec


# --- Mesh and device placement ----------------------------------------------


def make_mesh() -> jax.sharding.Mesh:
  """A one-axis mesh over every device of every process ("data" parallel)."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def maybe_initialize_distributed() -> None:
  """Joins a multi-process run when launched as one (env set by the launcher).

  `jax.distributed.initialize()` reads the coordinator address, process count
  and index from the cluster environment (SLURM, TPU pods, or the
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables).
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get(
      "SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded on the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def prefetch_to_device(batches: Iterator[dict[str, np.ndarray]], sharding,
                       size: int = 2) -> Iterator[tuple[int, dict]]:
  """Builds host batches and copies them to the devices `size` ahead.

  A background thread runs the numpy batcher and starts each transfer, so
  the accelerator never waits for the host. Yields (number of real samples,
  device batch). Closing the generator (a `break`) stops the thread.
  """
  out: queue.Queue = queue.Queue(maxsize=max(size, 1))
  stop = threading.Event()
  done = object()

  def produce():
    try:
      for batch in batches:
        item = (int(batch["weights"].sum()), to_global(batch, sharding))
        while not stop.is_set():
          try:
            out.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      out.put(done)
    except BaseException as e:  # pylint: disable=broad-except
      out.put(e)  # re-raised in the consumer

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = out.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    while thread.is_alive():  # unblock a producer waiting on a full queue
      try:
        out.get_nowait()
      except queue.Empty:
        thread.join(timeout=0.05)


# --- Model, optimizer, state ------------------------------------------------


def model_inputs(config: ml_collections.ConfigDict, dataset: Dataset):
  """The item table the model reads, and what the model must know about it.

  Returns ({"tokens": {field: [N+1, ...]}, "masks": {field: [N+1, L]}},
  ItemInputSpec). Word-embedding encoders read the tokenized data fields; the
  LM encoder reads its own tokenization of the joined text, or the cached
  hidden states of its frozen layers.
  """
  if config.model.item_encoder == "lm":
    from genre_jax.models import lm_encoder

    return lm_encoder.item_inputs(config, dataset)
  fields = tuple(config.data.fields)
  for f in fields:
    if f not in dataset.items.tokens:
      raise ConfigError(f"config.data.fields: the dataset has no tokenized "
                        f"field '{f}' (have {sorted(dataset.items.tokens)})")
  lengths = tuple(int(dataset.items.tokens[f].shape[1]) for f in fields)
  vocab = int(dataset.info.get("vocab_size", 0))
  if not vocab:
    vocab = int(max(dataset.items.tokens[f].max() for f in fields)) + 1
  spec = ItemInputSpec(vocab_size=vocab, fields=fields, lengths=lengths,
                       num_users=len(dataset.user_vocab))
  return ({"tokens": {f: dataset.items.tokens[f] for f in fields},
           "masks": {f: dataset.items.masks[f] for f in fields}}, spec)


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


def param_labels(config: ml_collections.ConfigDict, params):
  """"rec" | "lm" | "frozen" for every parameter leaf (optax multi_transform):
  the LM item encoder's own split, and a frozen word-embedding table."""
  if config.model.item_encoder == "lm":
    from genre_jax.models import lm_encoder  # pylint: disable=g-import-not-at-top

    labels = lm_encoder.param_labels(config, params)
  else:
    labels = jax.tree.map(lambda _: "rec", params)
  if not config.model.word_embeddings.frozen:
    return labels

  def freeze_word_table(path, label):
    names = [str(getattr(k, "key", getattr(k, "idx", ""))) for k in path]
    return "frozen" if "word_table" in names else label

  return jax.tree_util.tree_map_with_path(freeze_word_table, labels)


def make_optimizer(config: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
  """Clipped AdamW; with an LM item encoder, its own rate and frozen parts.

  The LM's trainable weights get config.model.lm.lr (default train.lr);
  frozen ones (lower LM layers, a frozen word-embedding table) get no update
  and no optimizer state (optax.multi_transform over param_labels).
  """
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
  if config.model.item_encoder != "lm" and not (
      config.model.word_embeddings.frozen):
    return optax.chain(clip, adamw)
  lm_config = config.copy_and_resolve_references()
  lm_config.train.lr = float(config.model.lm.lr or tc.lr)
  lm_adamw = optax.adamw(make_schedule(lm_config, total_steps),
                         weight_decay=tc.weight_decay)

  def clip_trainable(updates, state, params=None):
    # The clip norm covers trainable gradients only: frozen ones (LoRA base
    # weights, a frozen word table) are never applied and must not shrink
    # the rest. Zeroing them changes nothing when nothing is frozen.
    labels = param_labels(config, updates)
    trainable = jax.tree.map(
        lambda g, label: jnp.zeros_like(g) if label == "frozen" else g,
        updates, labels)
    return clip.update(trainable, state, params)

  # The same (empty) state as `clip`: checkpoints keep their structure.
  return optax.chain(
      optax.GradientTransformation(clip.init, clip_trainable),
      optax.multi_transform(
          {"rec": adamw, "lm": lm_adamw, "frozen": optax.set_to_zero()},
          functools.partial(param_labels, config)))


@dataclasses.dataclass
class Parts:
  """The static pieces of a run: how to rebuild the model from its state."""
  train_graphdef: Any
  eval_graphdef: Any
  rest: Any  # non-parameter model state (RNG streams), constant between steps
  tx: optax.GradientTransformation


def init_model(config, spec: ItemInputSpec, total_steps: int):
  """Builds the model and optimizer; returns (Parts, initial train state)."""
  model = recommender.build_model(config, spec, seed=int(config.train.seed))
  model.eval()
  eval_graphdef, _, _ = nnx.split(model, nnx.Param, ...)
  model.train()
  train_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  param_dtype = config.model.get("param_dtype", "float32")
  if param_dtype == "bfloat16":  # "pure bf16": weights and Adam moments
    params = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16)
        if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  elif param_dtype != "float32":
    raise ConfigError(f"config.model.param_dtype: '{param_dtype}' is not "
                      "float32 or bfloat16")
  tx = make_optimizer(config, total_steps)
  state = {"params": params, "opt": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  return Parts(train_graphdef, eval_graphdef, rest, tx), state


def _merge(graphdef, params, rest):
  # copy=True: fresh Variables inside the trace, so reseeding them is legal.
  return nnx.merge(graphdef, params, rest, copy=True)


def compute_loss(params, rest, graphdef, batch, items, dropout_key):
  """Weighted softmax cross-entropy over candidates; padding rows weigh 0."""
  model = _merge(graphdef, params, rest)
  nnx.reseed(model, dropout=dropout_key)
  logits, aux = model(batch, items["tokens"], items["masks"])  # [B, C]
  logits = logits.astype(jnp.float32)
  labels = batch["labels"]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.sum(jnp.where(batch["candidate_mask"], labels * log_probs, 0.0), -1)
  weights = batch["weights"]
  loss = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  total = loss + aux.get("aux_loss", 0.0)
  return total, {"loss": loss}


def train_step(state, batch, items, *, parts: Parts, seed: int):
  """One optimizer step. Pure: (state, batch, items) -> (state, metrics)."""
  dropout_key = jax.random.fold_in(jax.random.key(seed), state["step"])
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  (_, aux), grads = grad_fn(state["params"], parts.rest, parts.train_graphdef,
                            batch, items, dropout_key)
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
                       seed: int):
  """AOT-compiles the step for one batch shape; a different shape is an error.

  Compiling ahead of time (rather than letting jit trace on first call) makes
  "compile once" a guarantee: the compiled executable only accepts the shapes
  it was built for, so an unexpected shape fails loudly instead of silently
  recompiling every step.
  """
  replicated = jax.sharding.NamedSharding(mesh, P())
  data = jax.sharding.NamedSharding(mesh, P("data"))
  step = jax.jit(functools.partial(train_step, parts=parts, seed=seed),
                 in_shardings=(replicated, data, replicated),
                 out_shardings=(replicated, replicated),
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
  return compiled


# --- Fast evaluation --------------------------------------------------------


def padded_candidates(behaviors: Behaviors, width: int):
  """Labels and mask of every impression padded to `width`: ([M, C], [M, C])."""
  counts = behaviors.num_candidates()
  column = np.arange(len(behaviors.cand_items)) - np.repeat(
      behaviors.cand_offsets[:-1], counts)
  row = np.repeat(np.arange(len(behaviors)), counts)
  labels = np.zeros((len(behaviors), width), np.float32)
  masks = np.zeros((len(behaviors), width), bool)
  labels[row, column] = behaviors.cand_labels
  masks[row, column] = True
  return labels, masks


class Evaluator:
  """Encodes every item once, then each impression's user, then scores.

  Item vectors are computed in fixed-size chunks by one compiled function, so
  evaluation costs one item-encoder pass over the catalogue plus a user pass
  per impression, instead of re-encoding every candidate of every impression.
  """

  def __init__(self, config, parts: Parts, items, mesh, num_items: int,
               synthetic: np.ndarray | None = None):
    self.config = config
    # [N+1] bool: LLM-generated items, not counted in a cold user's history.
    self.synthetic = synthetic
    self.parts = parts
    self.items = items
    self.mesh = mesh
    self.num_rows = num_items + 1  # with the padding item
    check_batch_size(config, "eval")
    self.batch_size = int(config.eval.batch_size)
    self.chunk = self.batch_size * 4
    replicated = jax.sharding.NamedSharding(mesh, P())
    data = jax.sharding.NamedSharding(mesh, P("data"))
    self._encode = jax.jit(self._encode_chunk,
                           in_shardings=(replicated, replicated, replicated),
                           out_shardings=replicated)
    self._score = jax.jit(self._score_batch,
                          in_shardings=(replicated, replicated, data),
                          out_shardings=data)

  def _encode_chunk(self, params, items, ids):
    model = _merge(self.parts.eval_graphdef, params, self.parts.rest)
    tokens = {f: jnp.take(t, ids, axis=0) for f, t in items["tokens"].items()}
    masks = {f: jnp.take(m, ids, axis=0) for f, m in items["masks"].items()}
    return model.encode_items(tokens, masks).astype(jnp.float32)  # [n, D]

  @staticmethod
  def _user(model, item_vecs, batch):
    """History vectors (with the profile in front), mask and user repr."""
    profile = batch.get("profile")
    hist, mask = model.with_profile(
        jnp.take(item_vecs, batch["history"], axis=0),  # [B, H, D]
        batch["history_mask"],
        None if profile is None else jnp.take(item_vecs, profile, axis=0),
        profile)
    return hist, mask, model.encode_users(hist, mask, batch["users"])

  def _score_batch(self, params, item_vecs, batch):
    model = _merge(self.parts.eval_graphdef, params, self.parts.rest)
    hist, mask, user = self._user(model, item_vecs, batch)
    cands = jnp.take(item_vecs, batch["candidates"], axis=0)  # [B, C, D]
    return model.score(user, cands, hist, mask).astype(jnp.float32)  # [B, C]

  def _score_items(self, params, item_vecs, batch, ids):
    model = _merge(self.parts.eval_graphdef, params, self.parts.rest)
    hist, mask, user = self._user(model, item_vecs, batch)
    cands = jnp.take(item_vecs, ids, axis=0)  # [n, D]
    cands = jnp.broadcast_to(cands[None], (hist.shape[0],) + cands.shape)
    return model.score(user, cands, hist, mask).astype(jnp.float32)  # [B, n]

  def score_all_items(self, params, item_vecs, batch) -> np.ndarray:
    """Scores of every item for each user row of a host batch: [B, N+1]."""
    if not hasattr(self, "_score_items_jit"):
      self._score_items_jit = jax.jit(self._score_items)
    # Bound the [B, n, D] candidate block the predictor sees at once.
    chunk = max(64, 65536 // self.batch_size)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    out = []
    for start in range(0, self.num_rows, chunk):
      ids = np.arange(start, start + chunk) % self.num_rows
      out.append(np.asarray(self._score_items_jit(
          params, item_vecs, batch, jnp.asarray(ids, jnp.int32))))
    return np.concatenate(out, axis=1)[:, :self.num_rows]

  def item_vectors(self, params) -> jax.Array:
    """[N+1, D] vectors of every item (row 0: the padding item)."""
    num_chunks = math.ceil(self.num_rows / self.chunk)
    vecs = []
    for c in range(num_chunks):
      ids = np.arange(c * self.chunk, (c + 1) * self.chunk) % self.num_rows
      vecs.append(self._encode(params, self.items, jnp.asarray(ids, jnp.int32)))
    return jnp.concatenate(vecs)[:self.num_rows]

  def scores(self, params, behaviors: Behaviors,
             item_vecs: jax.Array | None = None):
    """Scores of every impression: ([M, C] scores, [M, C] labels, [M, C] mask)."""
    if item_vecs is None:
      item_vecs = self.item_vectors(params)
    batcher = batching.EvalBatcher(
        behaviors, batch_size=self.batch_size,
        history_len=int(self.config.data.history_len),
        process_index=jax.process_index(), process_count=jax.process_count())
    data = jax.sharding.NamedSharding(self.mesh, P("data"))
    width = batcher.max_candidates
    all_scores = np.zeros((len(behaviors), width), np.float32)
    for batch in batcher:
      device_batch = to_global(
          {k: batch[k] for k in ("history", "history_mask", "candidates",
                                 "users", "profile") if k in batch}, data)
      scores = self._score(params, item_vecs, device_batch)  # [B, C] global
      scores = np.asarray(multihost_utils.process_allgather(scores, tiled=True))
      rows = np.asarray(multihost_utils.process_allgather(
          batch["impressions"], tiled=True))  # [B] global, -1 = padding
      keep = rows >= 0
      all_scores[rows[keep]] = scores[keep]
    labels, masks = padded_candidates(behaviors, width)
    return all_scores, labels, masks

  def evaluate(self, params, behaviors: Behaviors,
               item_vecs: jax.Array | None = None) -> dict[str, dict]:
    """Metrics on all impressions and on cold users' impressions."""
    scores, labels, masks = self.scores(params, behaviors, item_vecs)
    per = metrics_lib.impression_metrics(scores, labels, masks)
    cold = (behaviors.real_history_lengths(self.synthetic) <=
            int(self.config.data.cold_threshold))
    return {"all": metrics_lib.summarize(per),
            "cold": metrics_lib.summarize(per, select=cold)}


# --- The training loop ------------------------------------------------------


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None)),
      tree)


class TrainingDivergedError(ConfigError, FloatingPointError):
  """The loss or the parameters became NaN or infinite (usually a learning
  rate too high): the run stops rather than save or report such a model."""


@jax.jit
def _track_divergence(first_bad, finite, step, loss):
  """(step, loss) of the first non-finite step so far; step -1: none yet.

  Runs on the device after every step, so finding a diverged run needs no
  host sync beyond the ones the loop already makes.
  """
  step_bad, loss_bad = first_bad
  new = (step_bad < 0) & ~finite
  return (jnp.where(new, step, step_bad),
          jnp.where(new, loss.astype(jnp.float32), loss_bad))


def _check_not_diverged(first_bad, config) -> None:
  """Raises TrainingDivergedError if a step so far was not finite."""
  step, loss = (x.item() for x in jax.device_get(first_bad))
  if step < 0:
    return
  what = (f"loss is {loss}" if not math.isfinite(loss) else
          f"the parameters are not finite after the update (loss {loss:.4g})")
  raise TrainingDivergedError(
      f"training diverged: {what} at step {step}; lower config.train.lr "
      f"(now {config.train.lr}), raise config.train.warmup_steps (now "
      f"{config.train.warmup_steps}) or check the data, and train again "
      "in a new --workdir. No checkpoint or metrics of the diverged model "
      "were saved.")


def restore_params_from(workdir: str, target_params, *, which: str = "best"):
  """Parameters of another run's best (or latest) checkpoint, shaped as target."""
  checkpoints = ckpt_lib.Checkpoints(workdir)
  try:
    manager = checkpoints.best if which == "best" else checkpoints.latest
    params = checkpoints.restore_params(manager, _abstract(target_params))
  except ckpt_lib.CheckpointDamagedError as e:
    raise ckpt_lib.CheckpointDamagedError(
        f"{e}. To rebuild it, train the same config again into a new "
        f"workdir (training is deterministic: the same {which} checkpoint), "
        f"e.g. python run.py --mode=train --config=<the preset and "
        f"--config.* flags of this run; every field is in "
        f"{os.path.join(workdir, 'config.json')}> --workdir=NEW") from None
  finally:
    checkpoints.close()
  if params is None:
    raise ConfigError(f"{workdir}: no {which} checkpoint to load parameters "
                      "from (was it trained with run.py --mode=train?)")
  return params


def dedup_capacity(batcher: batching.TrainBatcher, total_steps: int) -> int:
  """The fixed number of distinct items encoded per step (deduplication).

  The exact maximum over every batch the run will see (batches are
  deterministic in seed and epoch), rounded up so that it splits evenly
  over the devices: no batch ever overflows it, so the step compiles once.
  """
  epochs = -(-total_steps // max(batcher.steps_per_epoch(), 1))
  most = batcher.max_unique_items(range(epochs))
  multiple = math.lcm(64, jax.local_device_count())
  return -(-most // multiple) * multiple


def check_batch_size(config: ml_collections.ConfigDict, section: str) -> None:
  """Fails with the config field's name unless config.<section>.batch_size
  is a positive multiple of the device count (each device takes a slice)."""
  size, devices = config[section].batch_size, jax.device_count()
  if not isinstance(size, int) or size < 1 or size % devices:
    raise ConfigError(f"config.{section}.batch_size={size!r} must be a "
                      f"positive multiple of the number of devices ({devices})")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """config_lib.validate with every model part and dataset registered, so
  their names are checked too."""
  from genre_jax import data  # pylint: disable=g-import-not-at-top,unused-import
  from genre_jax.models import lm_encoder  # pylint: disable=g-import-not-at-top,unused-import

  config_lib.validate(config)


def hold_workdir(workdir: str, what: str) -> contextlib.AbstractContextManager:
  """The workdir's one-writer lock (workdir.exclusive), taken by process 0
  only: the processes of one multi-host run write the same workdir."""
  if jax.process_index() == 0:
    return workdir_lib.exclusive(workdir, what)
  workdir_lib.make_workdir(workdir)
  return contextlib.nullcontext()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dataset: Dataset | None = None,
                       init_from: str = "",
                       step_callback: Callable[[int], None] | None = None,
                       wandb_mode: str = "disabled") -> dict[str, Any]:
  """Trains with early stopping on dev AUC, resuming from `workdir` if it can.

  Resume order: this workdir's latest checkpoint (the newest intact save);
  else `init_from`'s best parameters (fresh optimizer); else a fresh
  initialisation. Every config field is checked before anything is done, and
  the workdir is held by this run alone (a second one fails at once).

  Args:
    config: the full run config.
    workdir: where checkpoints, config.json and metrics.json live.
    dataset: an already loaded dataset (default: load config.data).
    init_from: another run's workdir whose best weights start this run.
    step_callback: called with the step number after every step (tests use it
      to simulate a crash).
    wandb_mode: disabled | offline | online.

  Returns:
    {"dev": ..., "test": ...} metrics of the best checkpoint, plus timings.
  """
  if wandb_mode not in ("disabled", "offline", "online"):
    raise ConfigError(f"--wandb_mode={wandb_mode}: choose disabled, offline "
                      "or online")
  # Checked before the dataset is prepared, which can take minutes.
  validate_config(config)
  check_batch_size(config, "train")
  check_batch_size(config, "eval")
  with hold_workdir(workdir, "training"):
    return _train_and_evaluate(config, workdir, dataset=dataset,
                               init_from=init_from,
                               step_callback=step_callback,
                               wandb_mode=wandb_mode)


def _train_and_evaluate(config, workdir, *, dataset, init_from,
                        step_callback, wandb_mode):
  """train_and_evaluate once the config is valid and the workdir held."""
  from genre_jax import data as data_lib  # heavy import, only when needed

  # A checkpoint resumed under another config (another dataset, model or
  # optimizer) would pass one run off as another: checked before the data
  # is prepared, and before config.json is rewritten. So is the run's
  # evaluation log, which it extends.
  if ckpt_lib.has_checkpoint(workdir):
    workdir_lib.check_resumable(workdir, config)
  workdir_lib.read_metrics(workdir)
  if dataset is None:
    dataset = data_lib.load_dataset(config.data)
  # A dataset that cannot train or select a model is refused before a
  # minute is spent on it.
  checks.check_trainable(dataset, str(config.eval.dev_split))
  tc = config.train
  mesh = make_mesh()

  # --- Data ---
  batcher = batching.TrainBatcher(
      dataset.splits["train"], dataset.items, batch_size=int(tc.batch_size),
      history_len=int(config.data.history_len),
      num_negatives=int(config.data.num_negatives), seed=int(tc.seed),
      process_index=jax.process_index(), process_count=jax.process_count())
  steps_per_epoch = batcher.steps_per_epoch()
  total_steps = steps_per_epoch * int(tc.epochs)
  if tc.max_steps:
    total_steps = min(total_steps, int(tc.max_steps))
  if tc.dedup_items:
    batcher.unique_items = dedup_capacity(batcher, total_steps)
  host_items, spec = model_inputs(config, dataset)
  replicated = jax.sharding.NamedSharding(mesh, P())
  data_sharding = jax.sharding.NamedSharding(mesh, P("data"))
  items = jax.device_put(host_items, replicated)

  # --- Model, optimizer, resume ---
  parts, state = init_model(config, spec, total_steps)
  state = jax.device_put(state, replicated)
  checkpoints = ckpt_lib.Checkpoints(workdir)
  progress = {"epoch": 0, "batch": 0, "step": 0, "best_auc": -1.0,
              "best_step": -1, "bad_epochs": 0, "done": False}
  restored = checkpoints.restore(_abstract(state))
  if restored is not None:
    state, progress = restored
    # A finished run goes on when its limits were raised (check_resumable
    # lets epochs, max_steps and patience change); else it stays done.
    progress["done"] = (
        int(progress["epoch"]) >= int(tc.epochs) or
        int(progress["bad_epochs"]) >= int(tc.patience) or
        bool(tc.max_steps and int(progress["step"]) >= int(tc.max_steps)))
    logging.info("Resumed %s at step %d (epoch %d, batch %d).", workdir,
                 progress["step"], progress["epoch"], progress["batch"])
  elif init_from:
    params = restore_params_from(init_from, state["params"])
    state = jax.device_put({"params": params, "opt": parts.tx.init(params),
                            "step": state["step"]}, replicated)
    logging.info("Initialised parameters from the best checkpoint of %s.",
                 init_from)
  # Written once the resume is known to fit: config.json always describes
  # the checkpoints beside it.
  workdir_lib.save_config(workdir, config)

  # Global batch shapes: each process holds batch_size / process_count rows.
  local = next(batcher.epoch(0))
  global_shapes = {k: jax.ShapeDtypeStruct(
      (v.shape[0] * jax.process_count(),) + v.shape[1:], v.dtype)
                   for k, v in local.items()}
  step_fn = compile_train_step(parts, state, global_shapes, items, mesh,
                               int(tc.seed))
  evaluator = Evaluator(config, parts, items, mesh, dataset.items.num_items,
                        synthetic=dataset.items.synthetic)

  # --- Train loop ---
  run = _init_wandb(wandb_mode, config, workdir)
  best = {"auc": progress["best_auc"], "step": progress["best_step"]}
  bad_epochs = int(progress["bad_epochs"])
  step, epoch = int(progress["step"]), int(progress["epoch"])
  skip, done = int(progress["batch"]), bool(progress["done"])
  # Totals over every session of this run (a resumed run keeps counting).
  samples_before = int(progress.get("samples", 0))
  seconds_before = float(progress.get("train_seconds", 0.0))
  samples_done, train_seconds, start_time = 0, 0.0, time.time()

  def progress_record(batch, finished):
    return {"epoch": epoch, "batch": batch, "step": step,
            "best_auc": best["auc"], "best_step": best["step"],
            "bad_epochs": bad_epochs, "done": finished,
            "samples": samples_before + samples_done,
            "train_seconds": seconds_before + train_seconds +
                             (time.time() - tick if in_epoch else 0.0)}

  tick, in_epoch = time.time(), False
  # (step, loss) of the first non-finite step, on the device; -1: none.
  first_bad = jax.device_put((jnp.int32(-1), jnp.float32(0.0)), replicated)
  while not done:
    tick, in_epoch = time.time(), True
    hit_step_limit = False
    # Batches before `skip` were trained on before a resume.
    batches = prefetch_to_device(batcher.epoch(epoch, start=skip),
                                 data_sharding, int(tc.prefetch))
    # On a terminal, one bar an epoch (samples/s, ETA) replaces the log
    # lines below; elsewhere they are the progress display.
    epoch_steps = skip + min(steps_per_epoch - skip, total_steps - step)
    bar = logs.progress_bar(epoch_steps * int(tc.batch_size),
                            initial=skip * int(tc.batch_size),
                            desc=f"epoch {epoch + 1}/{int(tc.epochs)}")
    for batch_index, (num_real, batch) in enumerate(batches, start=skip):
      if tc.max_steps and step >= tc.max_steps:
        hit_step_limit = True
        break
      state, step_metrics = step_fn(state, batch, items)
      step += 1
      first_bad = _track_divergence(first_bad, step_metrics["finite"],
                                    np.int32(step), step_metrics["loss"])
      skip = batch_index + 1
      samples_done += num_real
      if bar is not None:
        bar.update(int(tc.batch_size))
      if step % int(tc.log_every) == 0 or step == 1:
        # The loop's host syncs: here, and before every save or evaluation.
        _check_not_diverged(first_bad, config)
        loss = float(step_metrics["loss"])
        rate = samples_done / max(time.time() - start_time, 1e-9)
        eta = (total_steps - step) * int(tc.batch_size) / max(rate, 1e-9)
        if bar is not None:
          bar.set_postfix_str(f"step {step}/{total_steps} loss {loss:.4f}")
        else:
          logging.info("epoch %d step %d/%d loss %.4f  %.0f samples/s  ETA "
                       "%s", epoch, step, total_steps, loss, rate,
                       _format_seconds(eta))
        if run is not None:
          run.log({"train/loss": loss, "train/samples_per_s": rate}, step=step)
      if tc.checkpoint_every and step % int(tc.checkpoint_every) == 0:
        _check_not_diverged(first_bad, config)
        checkpoints.save(checkpoints.latest, state,
                         progress_record(skip, False))
      if step_callback is not None:
        step_callback(step)
    batches.close()  # stops the prefetch thread after a break
    if bar is not None:
      bar.close()
    train_seconds += time.time() - tick
    in_epoch = False

    # --- Evaluate on dev, keep the best, early stopping ---
    _check_not_diverged(first_bad, config)
    result = evaluator.evaluate(state["params"],
                                dataset.splits[config.eval.dev_split])
    record = {"step": step, "epoch": epoch, "split": config.eval.dev_split,
              **result["all"], "cold": result["cold"]}
    if record["num_impressions"] and not all(
        math.isfinite(record[k]) for k in metrics_lib.METRIC_KEYS):
      # Only non-finite scores make a scored impression's metrics NaN.
      raise TrainingDivergedError(
          f"training diverged: the model scores {config.eval.dev_split} "
          f"candidates as NaN or infinite at step {step} (dev AUC "
          f"{record['auc']}); lower config.train.lr (now {tc.lr}) or check "
          "the data, and train again in a new --workdir. Nothing of this "
          "model was saved.")
    workdir_lib.append_metrics(workdir, record)
    logging.info("eval %s epoch %d step %d: auc %.4f mrr %.4f ndcg5 %.4f "
                 "ndcg10 %.4f (cold users: auc %.4f)", record["split"], epoch,
                 step, record["auc"], record["mrr"], record["ndcg5"],
                 record["ndcg10"], record["cold"]["auc"])
    if run is not None:
      run.log({f"dev/{k}": record[k] for k in metrics_lib.METRIC_KEYS},
              step=step)
    improved = math.isfinite(record["auc"]) and record["auc"] > best["auc"]
    if improved:
      best, bad_epochs = {"auc": record["auc"], "step": step}, 0
    else:
      bad_epochs += 1
    if not hit_step_limit:
      epoch, skip = epoch + 1, 0
    done = (hit_step_limit or epoch >= int(tc.epochs) or
            bad_epochs >= int(tc.patience) or
            bool(tc.max_steps and step >= tc.max_steps))
    if bad_epochs >= int(tc.patience):
      logging.info("Early stopping: dev AUC has not improved for %d "
                   "evaluations (best %.4f at step %d).", bad_epochs,
                   best["auc"], best["step"])
    # best/ holds the progress of the latest save made beside it, so that a
    # run whose latest saves are all damaged resumes from best/ exactly.
    if improved:
      checkpoints.save(checkpoints.best, state, progress_record(skip, done))
    checkpoints.save(checkpoints.latest, state,
                     progress_record(skip, done))

  # --- Final evaluation of the best checkpoint ---
  checkpoints.close()
  params = (restore_params_from(workdir, state["params"])
            if best["step"] >= 0 else state["params"])
  item_vecs = evaluator.item_vectors(params)
  total_seconds = seconds_before + train_seconds
  summary = {"best_step": best["step"], "steps": step,
             "train_seconds": total_seconds,
             "samples_per_s": (samples_before + samples_done) /
                              max(total_seconds, 1e-9)}
  for split in ("dev", "test"):
    if split in dataset.splits:
      summary[split] = evaluator.evaluate(params, dataset.splits[split],
                                          item_vecs)
  if "oracle" in dataset.info:
    summary["oracle"] = dataset.info["oracle"]
  # Strict JSON on disk (an undefined cold-user figure is null); the
  # summary returned keeps its NaN.
  workdir_lib.atomic_write_text(os.path.join(workdir, "final_metrics.json"),
                                logs.strict_json(summary, indent=2))
  if run is not None:
    if "test" in summary:
      run.summary.update({f"test/{k}": summary["test"]["all"][k]
                          for k in metrics_lib.METRIC_KEYS})
    run.finish()
  return summary


def _init_wandb(mode: str, config, workdir: str):
  """A wandb run, or None when disabled (the default: no network, no files)."""
  if mode == "disabled":
    return None
  import wandb  # local import: wandb is slow to import and usually off

  return wandb.init(mode=mode, dir=workdir, config=config.to_dict(),
                    name=os.path.basename(os.path.abspath(workdir)))


# --- Loading a trained run for eval / recommend ------------------------------


def load_for_inference(workdir: str, *, dataset: Dataset | None = None):
  """(config, dataset, evaluator, best params) of a trained workdir."""
  from genre_jax import data as data_lib

  config = workdir_lib.load_config(workdir)
  if dataset is None:
    dataset = data_lib.load_dataset(config.data)
  mesh = make_mesh()
  host_items, spec = model_inputs(config, dataset)
  parts, state = init_model(config, spec, total_steps=1)
  replicated = jax.sharding.NamedSharding(mesh, P())
  items = jax.device_put(host_items, replicated)
  params = restore_params_from(workdir, jax.device_put(state["params"],
                                                       replicated))
  evaluator = Evaluator(config, parts, items, mesh, dataset.items.num_items,
                        synthetic=dataset.items.synthetic)
  return config, dataset, evaluator, params
