"""The training loop, in phases over a small Progress record.

restore_or_init -> (train_epoch -> evaluate on dev -> end_epoch)* -> summarize.
Every phase is a function of the Progress, the train state and a Session (the
compiled step and what one invocation holds). A run resumes exactly from its
latest checkpoint, keeps its best one by dev AUC and stops early; masked-LM
pretraining (train/pretrain.py) runs the same restore, train_epoch, checkpoint
and divergence machinery without the dev evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from genre_jax import checkpoint as ckpt_lib
from genre_jax import config as config_lib
from genre_jax import logs
from genre_jax import metrics as metrics_lib
from genre_jax import workdir as workdir_lib
from genre_jax.data import batching
from genre_jax.data import checks
from genre_jax.data import splits as splits_lib
from genre_jax.data.types import Dataset
from genre_jax.errors import ConfigError
from genre_jax.train import mesh as mesh_lib
from genre_jax.train import optim
from genre_jax.train import step as step_lib
from genre_jax.train.evaluation import Evaluator, restore_params_from
from genre_jax.train.mesh import P


@dataclasses.dataclass
class Progress:
  """Where a run stands; saved as JSON beside every checkpoint."""
  epoch: int = 0
  batch: int = 0  # batches of `epoch` already trained
  step: int = 0
  best_auc: float = -1.0
  best_step: int = -1
  bad_epochs: int = 0
  done: bool = False
  samples: int = 0  # over every session of the run (resumes included)
  train_seconds: float = 0.0

  @classmethod
  def from_record(cls, record: dict) -> "Progress":
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return cls(**{k: type(fields[k].default)(v) for k, v in record.items()
                  if k in fields})

  def record(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Session:
  """What the phases of one invocation share."""
  step_fn: Callable  # compiled (state, batch, items) -> (state, metrics)
  items: Any  # the device item table the step reads
  checkpoints: ckpt_lib.Checkpoints
  mesh: jax.sharding.Mesh
  batch_size: int
  total_steps: int  # for the ETA
  log_every: int
  checkpoint_every: int  # 0: only where the caller saves
  max_steps: int  # 0: no limit
  divergence_hint: str  # which settings to change when a step diverges
  # (step, loss, samples/s, whether a progress bar shows them) -> None
  log_loss: Callable[[int, float, float, bool], None]
  step_callback: Callable[[int], None] | None = None
  first_bad: Any = None  # device (step, loss) of the first non-finite step
  epoch_started: float | None = None  # None between epochs
  session_started: float = dataclasses.field(default_factory=time.time)
  samples_at_start: int = 0

  def __post_init__(self):
    self.first_bad = jax.device_put(
        (jnp.int32(-1), jnp.float32(0.0)),
        jax.sharding.NamedSharding(self.mesh, P()))

  def check_not_diverged(self) -> None:
    step_lib.check_not_diverged(self.first_bad, self.divergence_hint)

  def save(self, manager, state, progress: Progress) -> None:
    """Saves state and progress (its train_seconds up to now)."""
    self.check_not_diverged()
    record = progress.record()
    if self.epoch_started is not None:  # mid-epoch: count its time so far
      record["train_seconds"] += time.time() - self.epoch_started
    self.checkpoints.save(manager, state, record)


# --- Phases -------------------------------------------------------------------


def restore_or_init(checkpoints: ckpt_lib.Checkpoints, state, *,
                    init_from: Callable[[Any], Any] | None = None
                    ) -> tuple[Any, Progress, bool]:
  """(state, progress, resumed): the newest intact checkpoint of the run, or
  `state` with the parameters init_from(params) gives (another run's), or
  `state` as initialised."""
  restored = checkpoints.restore(mesh_lib.abstract(state))
  if restored is not None:
    return restored[0], Progress.from_record(restored[1]), True
  if init_from is not None:
    state = init_from(state)
  return state, Progress(), False


def train_epoch(session: Session, state, progress: Progress,
                batches: Iterator[tuple[int, dict]], *, steps: int,
                desc: str) -> tuple[Any, bool]:
  """Steps through `batches` ((real samples, device batch) pairs) from
  progress.batch on, logging and saving `latest` every so often.

  `steps` is the epoch's batch count (for the progress bar). Returns the
  state and whether the step limit (session.max_steps) cut the epoch short.
  """
  session.epoch_started = time.time()
  bar = logs.progress_bar(steps * session.batch_size,
                          initial=progress.batch * session.batch_size,
                          desc=desc)
  first_step = progress.step + 1
  hit_step_limit = False
  try:
    for num_real, batch in batches:
      if session.max_steps and progress.step >= session.max_steps:
        hit_step_limit = True
        break
      state, metrics = session.step_fn(state, batch, session.items)
      progress.step += 1
      progress.batch += 1
      progress.samples += num_real
      session.first_bad = step_lib.track_divergence(
          session.first_bad, metrics["finite"], np.int32(progress.step),
          metrics["loss"])
      if bar is not None:
        bar.update(session.batch_size)
      step = progress.step
      if step % session.log_every == 0 or step == first_step:
        # The loop's host syncs: here, and before every save or evaluation.
        session.check_not_diverged()
        loss = float(metrics["loss"])
        rate = (progress.samples - session.samples_at_start) / max(
            time.time() - session.session_started, 1e-9)
        if bar is not None:
          bar.set_postfix_str(f"step {step}/{session.total_steps} "
                              f"loss {loss:.4f}")
        session.log_loss(step, loss, rate, bar is not None)
      if session.checkpoint_every and step % session.checkpoint_every == 0:
        session.save(session.checkpoints.latest, state, progress)
      if session.step_callback is not None:
        session.step_callback(step)
  finally:
    close = getattr(batches, "close", None)
    if close is not None:
      close()  # stops a prefetch thread after a break
    if bar is not None:
      bar.close()
    progress.train_seconds += time.time() - session.epoch_started
    session.epoch_started = None
  return state, hit_step_limit


def evaluate_dev(evaluator: Evaluator, params, dataset: Dataset,
                 config: ml_collections.ConfigDict,
                 progress: Progress) -> dict:
  """The dev metrics record of the current parameters (appended to the
  run's metrics.json by the caller); a model scoring NaN stops the run."""
  split = splits_lib.selection_split(config)
  result = evaluator.evaluate(params, dataset.splits[split])
  record = {"step": progress.step, "epoch": progress.epoch, "split": split,
            **result["all"], "cold": result["cold"]}
  names = metric_names(config)
  if record["num_impressions"] and not all(
      math.isfinite(record[k]) for k in names):
    # Only non-finite scores make a scored impression's metrics NaN.
    raise step_lib.TrainingDivergedError(
        f"training diverged: the model scores {split} candidates as NaN or "
        f"infinite at step {progress.step} (dev AUC {record['auc']}); lower "
        f"config.train.lr (now {config.train.lr}) or check the data, and "
        "train again in a new --workdir. Nothing of this model was saved.")
  logging.info("eval %s epoch %d step %d: %s (cold users: auc %.4f)", split,
               progress.epoch, progress.step,
               " ".join(f"{k} {record[k]:.4f}" for k in names),
               record["cold"]["auc"])
  return record


def metric_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The metrics every evaluation records: config.eval.metrics, and auc."""
  return metrics_lib.evaluated_metrics(
      config.eval.get("metrics", metrics_lib.METRIC_KEYS))


def end_epoch(session: Session, state, progress: Progress, record: dict,
              hit_step_limit: bool, tc: ml_collections.ConfigDict) -> None:
  """Keeps the best checkpoint by dev AUC, counts epochs without progress
  (early stopping) and saves `latest`; updates progress in place."""
  improved = math.isfinite(record["auc"]) and record["auc"] > progress.best_auc
  if improved:
    progress.best_auc, progress.best_step = record["auc"], progress.step
    progress.bad_epochs = 0
  else:
    progress.bad_epochs += 1
  if not hit_step_limit:
    progress.epoch, progress.batch = progress.epoch + 1, 0
  progress.done = is_done(progress, tc) or hit_step_limit
  if progress.bad_epochs >= int(tc.patience):
    logging.info("Early stopping: dev AUC has not improved for %d "
                 "evaluations (best %.4f at step %d).", progress.bad_epochs,
                 progress.best_auc, progress.best_step)
  # best/ holds the progress of the latest save made beside it, so that a
  # run whose latest saves are all damaged resumes from best/ exactly.
  if improved:
    session.save(session.checkpoints.best, state, progress)
  session.save(session.checkpoints.latest, state, progress)


def is_done(progress: Progress, tc: ml_collections.ConfigDict) -> bool:
  """Whether a run has reached its epochs, patience or step limit (a
  finished run goes on when they were raised)."""
  return (progress.epoch >= int(tc.epochs) or
          progress.bad_epochs >= int(tc.patience) or
          bool(tc.max_steps and progress.step >= int(tc.max_steps)))


def summarize(evaluator: Evaluator, state, progress: Progress,
              dataset: Dataset, workdir: str, accumulate_steps: int = 1,
              selected: str = "dev") -> dict:
  """Valid, dev and test metrics (the labelled ones there are) of the best
  checkpoint (the last state when no evaluation improved), with timings;
  written to final_metrics.json. `selected`: the split it was chosen on.

  "steps" counts train steps (batches), "updates" optimizer updates: steps
  // accumulate_steps (config.train.accumulate_steps), the same without
  accumulation.
  """
  params = (restore_params_from(workdir, state["params"])
            if progress.best_step >= 0 else state["params"])
  item_vecs = evaluator.item_vectors(params)
  summary = {"best_step": progress.best_step, "steps": progress.step,
             "updates": progress.step // accumulate_steps,
             "train_seconds": progress.train_seconds,
             "samples_per_s": progress.samples /
                              max(progress.train_seconds, 1e-9)}
  # Labelled splits only (MIND-large's test has no labels: --mode=predict).
  # "selected_on" names the split that chose the checkpoint, "held_out"
  # the one it was not chosen on (test, else dev), or None with a note.
  for split in (splits_lib.VALID, "dev", "test"):
    if split in dataset.splits and dataset.splits[split].is_labelled():
      summary[split] = evaluator.evaluate(params, dataset.splits[split],
                                          item_vecs)
  summary["selected_on"] = selected
  summary["held_out"] = splits_lib.held_out_split(dataset, selected)
  if summary["held_out"] is None:
    summary["note"] = (
        f"no held-out metrics: the model was selected on {selected} and the "
        "dataset has no other labelled split (MIND has no labelled test; "
        "its dev figures are not a test). Set config.data.validation to "
        "dev_half or train_users:<share> for a test disjoint from selection")
  if "oracle" in dataset.info:
    summary["oracle"] = dataset.info["oracle"]
  # Strict JSON on disk (an undefined cold-user figure is null); the
  # summary returned keeps its NaN. Process 0 writes the shared workdir's
  # files (every process saves the checkpoints: Orbax needs them all).
  if jax.process_index() == 0:
    workdir_lib.atomic_write_text(
        os.path.join(workdir, "final_metrics.json"),
        logs.strict_json(summary, indent=2))
  return summary


# --- The recommender's run ----------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
  """config_lib.validate with every model part and dataset registered, so
  their names are checked too."""
  from genre_jax import data  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  config_lib.validate(config)


def hold_workdir(workdir: str, what: str) -> contextlib.AbstractContextManager:
  """The workdir's one-writer lock (workdir.exclusive), taken by process 0
  only: the processes of one multi-host run write the same workdir."""
  if jax.process_index() == 0:
    return workdir_lib.exclusive(workdir, what)
  workdir_lib.make_workdir(workdir)
  return contextlib.nullcontext()


def dedup_capacity(batcher: batching.TrainBatcher, total_steps: int) -> int:
  """The fixed number of distinct items encoded per step (deduplication).

  The exact maximum over every batch the run will see (batches are
  deterministic in seed and epoch), rounded up so that it splits evenly
  over the devices: no batch ever overflows it, so the step compiles once.
  """
  epochs = -(-total_steps // max(batcher.steps_per_epoch(), 1))
  most = batcher.max_unique_items(range(epochs))
  if jax.process_count() > 1:  # one global shape: every process's largest
    most = int(np.max(multihost_utils.process_allgather(np.int32(most))))
  multiple = math.lcm(64, jax.local_device_count())
  return -(-most // multiple) * multiple


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dataset: Dataset | None = None,
                       init_from: str = "",
                       step_callback: Callable[[int], None] | None = None,
                       wandb_mode: str = "disabled",
                       loss_callback: Callable[[int, float], None] | None = None
                       ) -> dict[str, Any]:
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
    loss_callback: called with (step, training loss) whenever the loss is
      logged: every config.train.log_every steps and a session's first step
      (train.log_every=1: every step; experiments/multiprocess_check.py).

  Returns:
    {"dev": ..., "test": ...} metrics of the best checkpoint, plus timings.
  """
  if wandb_mode not in ("disabled", "offline", "online"):
    raise ConfigError(f"--wandb_mode={wandb_mode}: choose disabled, offline "
                      "or online")
  # Checked before the dataset is prepared, which can take minutes.
  validate_config(config)
  mesh_lib.check_batch_size(config, "train")
  mesh_lib.check_batch_size(config, "eval")
  with hold_workdir(workdir, "training"):
    return _train_and_evaluate(config, workdir, dataset=dataset,
                               init_from=init_from,
                               step_callback=step_callback,
                               wandb_mode=wandb_mode,
                               loss_callback=loss_callback)


def _train_and_evaluate(config, workdir, *, dataset, init_from,
                        step_callback, wandb_mode, loss_callback=None):
  """train_and_evaluate once the config is valid and the workdir held."""
  from genre_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  # A checkpoint resumed under another config (another dataset, model or
  # optimizer) would pass one run off as another: checked before the data
  # is prepared, and before config.json is rewritten. So is the run's
  # evaluation log, which it extends.
  if ckpt_lib.has_checkpoint(workdir):
    workdir_lib.check_resumable(workdir, config)
  workdir_lib.read_metrics(workdir)
  if dataset is None:
    # Prepared (a cache on the shared disk) by process 0, then read by all.
    dataset = mesh_lib.process_0_first(
        lambda: data_lib.load_dataset(config.data), "load_dataset")
  # A dataset passed in gets config.data.validation's splits too (once).
  dataset = splits_lib.apply_validation(dataset, config.data)
  selected = splits_lib.selection_split(config)
  # A dataset that cannot train or select a model is refused before a
  # minute is spent on it.
  checks.check_trainable(dataset, selected)
  tc = config.train
  mesh = mesh_lib.make_mesh(config)
  replicated = jax.sharding.NamedSharding(mesh, P())
  data_sharding = mesh_lib.batch_sharding(mesh)

  batcher = batching.TrainBatcher(
      dataset.splits["train"], dataset.items, batch_size=int(tc.batch_size),
      history_len=int(config.data.history_len),
      num_negatives=int(config.data.num_negatives), seed=int(tc.seed),
      process_index=jax.process_index(), process_count=jax.process_count())
  steps_per_epoch = batcher.steps_per_epoch()
  total_steps = steps_per_epoch * int(tc.epochs)
  if tc.max_steps:
    total_steps = min(total_steps, int(tc.max_steps))
  # Steps, max_steps, log_every and checkpoint_every count batches; with
  # accumulation, k of them make one update, across epoch ends too.
  accumulate = optim.accumulate_steps(config)
  if total_steps % accumulate:
    logging.warning(
        "config.train.accumulate_steps=%d: the last %d of the run's %d "
        "batches make no update (fewer than %d left)", accumulate,
        total_steps % accumulate, total_steps, accumulate)
  if tc.dedup_items:
    batcher.unique_items = dedup_capacity(batcher, total_steps)
  host_items, spec = step_lib.model_inputs(config, dataset)
  # Host-resident item fields stay in host memory: each batch carries the
  # rows of its distinct items (sharded over "data" like item_ids, so each
  # device gets the rows of the items it encodes), evaluation each chunk's.
  device_items, host_fields = step_lib.split_item_table(host_items)
  if host_fields is not None:
    if not tc.dedup_items:
      raise ConfigError(
          f"config.train.dedup_items=False: the item encoder keeps fields "
          f"{sorted(host_fields['tokens'])} in host memory, whose rows reach "
          "the devices with each batch's distinct items; set "
          "train.dedup_items=True or keep them on the devices")
    batcher.host_items = host_fields
  items = jax.device_put(device_items, replicated)

  parts, state = step_lib.init_model(config, spec, total_steps)
  state = jax.device_put(state, mesh_lib.state_sharding(state, mesh))
  checkpoints = ckpt_lib.Checkpoints(workdir)

  def from_other_run(state):
    params = restore_params_from(init_from, state["params"])
    logging.info("Initialised parameters from the best checkpoint of %s.",
                 init_from)
    fresh = {"params": params, "opt": parts.tx.init(params),
             "step": state["step"]}
    return jax.device_put(fresh, mesh_lib.state_sharding(fresh, mesh))

  state, progress, resumed = restore_or_init(
      checkpoints, state, init_from=from_other_run if init_from else None)
  if resumed:
    progress.done = is_done(progress, tc)
    logging.info("Resumed %s at step %d (epoch %d, batch %d).", workdir,
                 progress.step, progress.epoch, progress.batch)
  # Written once the resume is known to fit: config.json always describes
  # the checkpoints beside it.
  if jax.process_index() == 0:
    workdir_lib.save_config(workdir, config)

  # Global batch shapes: each process holds batch_size / process_count rows.
  local = next(batcher.epoch(0))
  global_shapes = {k: jax.ShapeDtypeStruct(
      (v.shape[0] * jax.process_count(),) + v.shape[1:], v.dtype)
                   for k, v in local.items()}
  step_fn = step_lib.compile_train_step(
      parts, state, global_shapes, items, mesh, int(tc.seed),
      loss_fn=functools.partial(step_lib.recommender_loss,
                                loss_type=str(tc.get("loss", "softmax"))))
  evaluator = Evaluator(config, parts, items, mesh, dataset.items.num_items,
                        synthetic=dataset.items.synthetic,
                        popularity=dataset.items.popularity,
                        host_items=host_fields)
  run = _init_wandb(wandb_mode, config, workdir)
  session = Session(
      step_fn=step_fn, items=items, checkpoints=checkpoints, mesh=mesh,
      batch_size=int(tc.batch_size), total_steps=total_steps,
      log_every=int(tc.log_every),
      checkpoint_every=int(tc.checkpoint_every), max_steps=int(tc.max_steps),
      divergence_hint=(f"lower config.train.lr (now {tc.lr}), raise "
                       f"config.train.warmup_steps (now {tc.warmup_steps})"),
      log_loss=_loss_logger(run, progress, total_steps, int(tc.batch_size),
                            accumulate, loss_callback),
      step_callback=step_callback, samples_at_start=progress.samples)

  while not progress.done:
    # On a terminal, one bar an epoch (samples/s, ETA) replaces the log
    # lines; elsewhere they are the progress display.
    epoch_steps = progress.batch + min(steps_per_epoch - progress.batch,
                                       total_steps - progress.step)
    batches = mesh_lib.prefetch_to_device(
        batcher.epoch(progress.epoch, start=progress.batch), data_sharding,
        int(tc.prefetch))
    state, hit_step_limit = train_epoch(
        session, state, progress, batches, steps=epoch_steps,
        desc=f"epoch {progress.epoch + 1}/{int(tc.epochs)}")
    session.check_not_diverged()
    record = evaluate_dev(evaluator, state["params"], dataset, config,
                          progress)
    if jax.process_index() == 0:
      workdir_lib.append_metrics(workdir, record)
    if run is not None:
      run.log({f"dev/{k}": record[k] for k in metric_names(config)},
              step=progress.step)
    end_epoch(session, state, progress, record, hit_step_limit, tc)

  checkpoints.close()
  summary = summarize(evaluator, state, progress, dataset, workdir,
                      accumulate, selected=selected)
  if run is not None:
    if "test" in summary:
      run.summary.update({f"test/{k}": summary["test"]["all"][k]
                          for k in metric_names(config)})
    run.finish()
  return summary


def _loss_logger(run, progress: Progress, total_steps: int, batch_size: int,
                 accumulate_steps: int = 1, loss_callback=None):
  """The recommender's training-loss log: a line (unless a progress bar
  shows it) and wandb. Steps count batches; with gradient accumulation the
  line also says how many updates they made ("update 3/12")."""

  def log(step: int, loss: float, rate: float, bar_shown: bool) -> None:
    if loss_callback is not None:
      loss_callback(step, loss)
    updates = ""
    if accumulate_steps > 1:
      updates = (f" update {step // accumulate_steps}/"
                 f"{total_steps // accumulate_steps}")
    if not bar_shown:
      eta = (total_steps - step) * batch_size / max(rate, 1e-9)
      logging.info("epoch %d step %d/%d%s loss %.4f  %.0f samples/s  ETA %s",
                   progress.epoch, step, total_steps, updates, loss, rate,
                   _format_seconds(eta))
    if run is not None:
      record = {"train/loss": loss, "train/samples_per_s": rate}
      if accumulate_steps > 1:
        record["train/updates"] = step // accumulate_steps
      run.log(record, step=step)

  return log


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _init_wandb(mode: str, config, workdir: str):
  """A wandb run, or None when disabled (the default: no network, no files)."""
  if mode == "disabled":
    return None
  import wandb  # pylint: disable=g-import-not-at-top  # slow, usually off

  return wandb.init(mode=mode, dir=workdir, config=config.to_dict(),
                    name=os.path.basename(os.path.abspath(workdir)))
