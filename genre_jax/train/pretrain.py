"""Masked-LM pretraining of the BERT item encoder on the item corpus.

The model, masking and loss are lm/mlm.py's; this runs them through the
recommender's step, restore, checkpoint and divergence machinery (loop.py),
one "epoch" of config.pretrain.steps steps with no dev evaluation. Each
optimizer update's rows are drawn and masked by a generator seeded by (seed,
update), so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from genre_jax import checkpoint as ckpt_lib
from genre_jax import logs
from genre_jax import workdir as workdir_lib
from genre_jax.config import CACHE_KEYS
from genre_jax.data import tokenize as tokenize_lib
from genre_jax.errors import ConfigError
from genre_jax.lm import mlm
from genre_jax.models import lm_encoder
from genre_jax.train import loop
from genre_jax.train import mesh as mesh_lib
from genre_jax.train import step as step_lib

# What a resumed pretraining run may change: how long it trains (steps may
# grow), how often it logs and saves, and where data and caches live.
RESUMABLE_KEYS = CACHE_KEYS + ("pretrain.steps", "pretrain.log_every",
                               "pretrain.checkpoint_every")


def accumulate_steps(pc: ml_collections.ConfigDict) -> int:
  """config.pretrain.accumulate_steps: batches per optimizer update (1 also
  for a workdir's config from before the field)."""
  k = pc.get("accumulate_steps", 1)
  if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
    raise ConfigError(f"config.pretrain.accumulate_steps={k!r}: must be an "
                      "integer >= 1")
  return k


def optimizer(pc: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (weight decay 0.01), clipped at norm 1, under linear warm-up and
  cosine decay: BERT's recipe. With accumulate_steps = k > 1 the mean
  gradient of k batches makes one update (optax.MultiSteps), and the
  schedule and warm-up count updates, pretrain.steps // k of them."""
  k = accumulate_steps(pc)
  updates = max(int(pc.steps) // k, 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, float(pc.lr), min(int(pc.warmup_steps), updates - 1), updates)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=0.01))
  if k == 1:
    return tx
  return optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()


def mlm_objective(model, batch, items, *, loss=mlm.mlm_loss):
  """The step's loss function: `loss` (mlm_loss's signature; benchmarks swap
  in variants) of a batch as mask_tokens makes it. `items` is unused."""
  del items
  value = loss(model, batch["inputs"], batch["mask"], batch["positions"],
               batch["targets"])
  return value, {"loss": value}


def special_token_ids(config: ml_collections.ConfigDict
                      ) -> tuple[list[int], int]:
  """([CLS], [SEP], [PAD] ids the tokenizer has, [MASK] id) of model.lm.path.
  """
  path = lm_encoder.lm_path(config)
  tokenizer = tokenize_lib.load_tokenizer(path, field="config.model.lm.path")
  specials = [tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")]
  mask_id = tokenizer.token_to_id("[MASK]")
  if mask_id is None:
    raise ConfigError(f"{path}: the tokenizer has no [MASK] token")
  return [s for s in specials if s is not None], mask_id


def corpus(config: ml_collections.ConfigDict, dataset):
  """Token ids [N, L], mask and special-token mask of every item's text."""
  texts = lm_encoder.item_text(config, dataset)[1:]
  texts = np.concatenate([[""], texts[np.array([bool(t) for t in texts])]])
  ids, mask = lm_encoder.tokenize_text(config, texts)
  specials, mask_id = special_token_ids(config)
  special = np.isin(ids, specials)
  return ids[1:], mask[1:], special[1:], mask_id


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid config.pretrain or
  config.model.lm field, before anything is built or written."""
  loop.validate_config(config)
  mesh_lib.check_batch_size(config, "pretrain")
  k = accumulate_steps(config.pretrain)
  if config.train.get("accumulate_steps", 1) != 1:
    raise ConfigError(
        f"config.train.accumulate_steps={config.train.accumulate_steps}: "
        "that is the recommender's; masked-LM pretraining accumulates "
        "config.pretrain.accumulate_steps batches")
  if int(config.pretrain.steps) % k:
    logging.warning(
        "config.pretrain.accumulate_steps=%d: the last %d of the %d steps "
        "make no update (fewer than %d left)", k,
        int(config.pretrain.steps) % k, int(config.pretrain.steps), k)
  lm_encoder.check_config(config)


def pretrain(config: ml_collections.ConfigDict, workdir: str,
             dataset=None) -> dict:
  """Masked-LM training on the item corpus; resumes from workdir's latest.

  A checkpoint is resumed only under the same config (but RESUMABLE_KEYS); a
  run that already finished `pretrain.steps` returns its recorded summary and
  rewrites nothing.
  """
  check_config(config)
  with loop.hold_workdir(workdir, "masked-LM pretraining"):
    return _pretrain(config, workdir, dataset)


def update_batches(config, ids, mask, special, mask_id, vocab_size, start,
                   steps):
  """Host batches {inputs, mask, positions, targets} of steps start..steps-1.

  The rows of one optimizer update (pretrain.batch_size x accumulate_steps)
  are drawn and masked together by a generator seeded by (seed, update), and
  step s takes its share: accumulating k batches of B sees the rows of one
  batch of k x B, and a resumed run the batches of an uninterrupted one.
  """
  pc = config.pretrain
  size, k = int(pc.batch_size), accumulate_steps(pc)
  drawn, drawn_for = None, None
  for s in range(start, steps):
    update = s // k
    if drawn_for != update:
      rng = np.random.default_rng([int(config.train.seed), update])
      rows = rng.integers(0, len(ids), size * k)
      inputs, positions, targets = mlm.mask_tokens(
          ids[rows], mask[rows], special[rows], rate=float(pc.mask_rate),
          vocab_size=vocab_size, mask_id=mask_id, rng=rng)
      drawn = {"inputs": inputs, "mask": mask[rows], "positions": positions,
               "targets": targets}
      drawn_for = update
    share = slice((s % k) * size, (s % k + 1) * size)
    yield {name: value[share] for name, value in drawn.items()}


def _batches(config, ids, mask, special, mask_id, vocab_size, start, steps,
             sharding):
  """(samples, device batch) of update_batches, each process's rows put on
  its devices."""
  size = int(config.pretrain.batch_size)
  local = size // jax.process_count()
  mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  for batch in update_batches(config, ids, mask, special, mask_id, vocab_size,
                              start, steps):
    yield size, mesh_lib.to_global(
        {name: value[mine] for name, value in batch.items()}, sharding)


def _pretrain(config, workdir, dataset):
  """pretrain once the config is checked and the workdir held."""
  from genre_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  pc = config.pretrain
  steps = int(pc.steps)
  # Checked before config.json is rewritten: it must keep describing the
  # checkpoints beside it.
  if ckpt_lib.has_checkpoint(workdir):
    workdir_lib.check_resumable(workdir, config, RESUMABLE_KEYS)
    finished = _finished_summary(workdir, steps)
    if finished is not None:
      logging.info("MLM pretraining in %s already finished %d steps", workdir,
                   steps)
      return finished
  if dataset is None:
    dataset = data_lib.load_dataset(config.data)
  workdir_lib.save_config(workdir, config)
  ids, mask, special, mask_id = corpus(config, dataset)
  mesh = mesh_lib.make_mesh(config)
  data_sharding = mesh_lib.batch_sharding(mesh)

  model = mlm.build_mlm(config, rngs=nnx.Rngs(int(config.train.seed)))
  vocab_size = model.encoder.config.vocab_size
  parts, state = step_lib.split_model(model, lambda _: optimizer(pc))
  state = jax.device_put(state, mesh_lib.state_sharding(state, mesh))
  checkpoints = ckpt_lib.Checkpoints(workdir)
  state, progress, resumed = loop.restore_or_init(checkpoints, state)
  if resumed:
    if progress.step > steps:
      raise ConfigError(f"config.pretrain.steps={steps}: the checkpoint in "
                        f"{workdir} is already at step {progress.step}; "
                        "steps may only grow")
    logging.info("Resumed MLM pretraining at step %d", progress.step)

  size, length = int(pc.batch_size), ids.shape[1]
  k = mlm.max_predictions(length, float(pc.mask_rate))
  shapes = {"inputs": ((size, length), np.int32),
            "mask": ((size, length), np.bool_),
            "positions": ((size, k), np.int32),
            "targets": ((size, k), np.int32)}
  step_fn = step_lib.compile_train_step(
      parts, state, {n: jax.ShapeDtypeStruct(s, d)
                     for n, (s, d) in shapes.items()}, {}, mesh,
      int(config.train.seed), loss_fn=mlm_objective)
  tick = time.time()
  start = progress.step

  def log_loss(step: int, loss: float, rate: float, bar_shown: bool) -> None:
    workdir_lib.append_metrics(workdir, {"step": step, "mlm_loss": loss})
    if not bar_shown:
      logging.info("pretrain step %d/%d mlm loss %.4f (%.1f steps/s)", step,
                   steps, loss, rate / size)

  session = loop.Session(
      step_fn=step_fn, items={}, checkpoints=checkpoints, mesh=mesh,
      batch_size=size, total_steps=steps, log_every=int(pc.log_every),
      checkpoint_every=int(pc.checkpoint_every), max_steps=0,
      divergence_hint=f"lower config.pretrain.lr (now {pc.lr})",
      log_loss=log_loss, samples_at_start=progress.samples)
  batches = _batches(config, ids, mask, special, mask_id, vocab_size, start,
                     steps, data_sharding)
  state, _ = loop.train_epoch(session, state, progress, batches,
                              steps=steps - start, desc="pretraining")
  if progress.step > start and progress.step % int(pc.checkpoint_every):
    session.save(checkpoints.latest, state, progress)
  checkpoints.close()
  # The whole run's losses, those of earlier (resumed) invocations included.
  summary = {"steps": steps, "losses": _recorded_losses(workdir, steps),
             "seconds": time.time() - tick, "num_texts": int(len(ids))}
  workdir_lib.atomic_write_text(os.path.join(workdir, "final_metrics.json"),
                                logs.strict_json(summary, indent=2))
  return summary


def _recorded_losses(workdir: str, steps: int) -> list[dict]:
  """[{"step", "loss"}] of every MLM loss logged in workdir up to `steps`."""
  return [{"step": int(r["step"]), "loss": float(r["mlm_loss"])}
          for r in workdir_lib.read_metrics(workdir)
          if "mlm_loss" in r and int(r["step"]) <= steps]


def _finished_summary(workdir: str, steps: int) -> dict | None:
  """The recorded summary when workdir's run already trained `steps` steps."""
  path = os.path.join(workdir, "final_metrics.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    try:
      summary = json.load(f)
    except json.JSONDecodeError:
      return None  # unreadable: train (zero steps) and write it again
  if not isinstance(summary, dict) or summary.get("steps") != steps:
    return None
  # A summary rewritten with no losses (by an older rerun) is filled in.
  summary["losses"] = (summary.get("losses")
                       or _recorded_losses(workdir, steps))
  return summary

