"""Masked-LM pretraining of the BERT encoder on the item corpus.

BERT-style masking (15% of real, non-special tokens: 80% [MASK], 10% a random
token, 10% unchanged) over the text of every item (the configured fields:
titles, abstracts, GENRE-generated text when the dataset carries it). From
scratch (`pretrain.from_scratch`) or continuing from the weights of
`model.lm.path` (its masked-LM head too, when the checkpoint has one). The
head and its tied decoder run only at the masked slots, not at every token.
The step is jit-compiled and data-parallel like the recommender's;
checkpoints are Orbax (`workdir/checkpoints/latest`). A finished run is used
as the recommender's item encoder with `--config.model.lm.init=WORKDIR`.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from genre_jax import checkpoint as ckpt_lib
from genre_jax import logs
from genre_jax import workdir as workdir_lib
from genre_jax.errors import ConfigError
from genre_jax.lm import bert
from genre_jax.lm import hf

P = jax.sharding.PartitionSpec
IGNORE = -1  # target of positions that are not predicted


class MlmHead(nnx.Module):
  """BERT's prediction head: dense, activation, LayerNorm, then the decoder
  tied to the word-embedding table (its bias is the head's own)."""

  def __init__(self, cfg: hf.BertConfig, *, rngs: nnx.Rngs):
    self.activation = cfg.hidden_act
    self.transform = nnx.Linear(cfg.hidden_size, cfg.hidden_size, rngs=rngs)
    self.transform_norm = nnx.LayerNorm(cfg.hidden_size,
                                        epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.decoder_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32))

  def __call__(self, hidden: jax.Array, table: jax.Array) -> jax.Array:
    """Logits [..., V] of hidden states [..., D], with `table` [V, D]."""
    h = hf.ACTIVATIONS[self.activation](self.transform(hidden))
    h = self.transform_norm(h)
    return h @ table.T.astype(h.dtype) + self.decoder_bias[...]


class BertForMaskedLM(nnx.Module):
  """BertEncoder + the MLM head."""

  def __init__(self, encoder: bert.BertEncoder, head: MlmHead):
    self.encoder = encoder
    self.head = head

  def __call__(self, ids: jax.Array, mask: jax.Array,
               positions: jax.Array | None = None) -> jax.Array:
    """Logits [B, L, V] at every position, or [B, K, V] at `positions`.

    `positions` [B, K] are the masked slots a loss reads: gathering them
    before the head runs the [D, V] decoder on K ~ 15% of L tokens, its
    cost (the largest single matmul of a small BERT) cut by the same factor.
    """
    hidden = self.encoder(ids, mask)  # [B, L, D]
    if positions is not None:
      hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    table = self.encoder.embeddings.word_embeddings.embedding[...]  # [V, D]
    return self.head(hidden, table)


# HF names of the head's tensors in BertForMaskedLM / BertForPreTraining
# checkpoints (old ones name LayerNorm parameters gamma/beta).
_HEAD_SOURCES = {
    ("transform", "kernel"): hf.Source(
        ("cls.predictions.transform.dense.weight",), transpose=True),
    ("transform", "bias"): hf.Source(
        ("cls.predictions.transform.dense.bias",)),
    ("transform_norm", "scale"): hf.Source(
        ("cls.predictions.transform.LayerNorm.weight",
         "cls.predictions.transform.LayerNorm.gamma")),
    ("transform_norm", "bias"): hf.Source(
        ("cls.predictions.transform.LayerNorm.bias",
         "cls.predictions.transform.LayerNorm.beta")),
    ("decoder_bias",): hf.Source(
        ("cls.predictions.bias", "cls.predictions.decoder.bias")),
}


def build_mlm(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs
              ) -> BertForMaskedLM:
  """The MLM model: model.lm.path's weights, or fresh ones (from_scratch).

  The head comes from the checkpoint too when it has one (BertForMaskedLM,
  BertForPreTraining): continuing pretraining through a random head would
  first spend steps, and the encoder's pretrained weights, on fitting it.
  Encoder-only checkpoints (sentence-transformers, BertModel) get a fresh
  head.
  """
  from genre_jax.models import lm_encoder

  path = lm_encoder.lm_path(config)
  if hf.model_kind(path) != "bert":
    raise ConfigError(f"masked-LM pretraining needs a BERT-family model; "
                      f"{path} is '{hf.model_kind(path)}'")
  if config.pretrain.from_scratch:
    cfg = hf.read_bert_config(path)
    return BertForMaskedLM(bert.BertEncoder(cfg, rngs=rngs),
                           MlmHead(cfg, rngs=rngs))
  encoder, cfg = bert.load_bert(path, rngs=rngs)
  checkpoint = hf.Checkpoint(path)
  if "cls.predictions.transform.dense.weight" in checkpoint:
    head = hf.build_from_checkpoint(lambda r: MlmHead(cfg, rngs=r),
                                    checkpoint, _HEAD_SOURCES, rngs=rngs)
  else:
    logging.info("%s has no masked-LM head; it starts from random weights",
                 path)
    head = MlmHead(cfg, rngs=rngs)
  return BertForMaskedLM(encoder, head)


def max_predictions(length: int, rate: float) -> int:
  """Masked slots per row of `length` tokens: ceil(rate * length), >= 1."""
  return max(1, math.ceil(rate * length))


def mask_tokens(ids: np.ndarray, mask: np.ndarray, special: np.ndarray,
                *, rate: float, vocab_size: int, mask_id: int,
                rng: np.random.Generator):
  """BERT masking of [B, L] ids -> (inputs [B, L], positions [B, K],
  targets [B, K]), K = max_predictions(L, rate).

  As BERT's own data pipeline does, each row predicts exactly
  max(1, round(rate * n)) of its n candidate tokens (real tokens that
  `special` [B, L] does not mark as [CLS]/[SEP]-like), drawn uniformly; of
  those, 80% become [MASK], 10% a random token, 10% stay. A fixed count per
  row keeps the loss's shape static; slots a row does not fill have target
  IGNORE (and position 0).
  """
  batch, length = ids.shape
  k = max_predictions(length, rate)
  candidates = mask & ~special
  count = candidates.sum(1)
  wanted = np.where(count > 0, np.maximum(1, np.rint(rate * count)), 0)
  # Uniform draws; non-candidates sort last. [B, K] positions, slot j used
  # when j < wanted.
  keys = np.where(candidates, rng.random(ids.shape), np.inf)
  order = np.argsort(keys, axis=1, kind="stable")[:, :k]
  used = np.arange(k)[None, :] < wanted[:, None]
  positions = np.where(used, order, 0).astype(np.int32)
  rows = np.arange(batch)[:, None]
  targets = np.where(used, ids[rows, positions], IGNORE).astype(np.int32)
  roll = rng.random(positions.shape)
  inputs = ids.copy()
  to_mask = used & (roll < 0.8)
  inputs[rows.repeat(k, 1)[to_mask], positions[to_mask]] = mask_id
  swap = used & (roll >= 0.8) & (roll < 0.9)
  inputs[rows.repeat(k, 1)[swap], positions[swap]] = rng.integers(
      0, vocab_size, int(swap.sum()))
  return inputs.astype(np.int32), positions, targets


def mlm_loss(model: BertForMaskedLM, inputs, mask, positions, targets):
  """Mean cross-entropy over the masked slots (targets != IGNORE)."""
  logits = model(inputs, mask, positions).astype(jnp.float32)  # [B, K, V]
  weights = (targets != IGNORE).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.maximum(targets, 0))
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def optimizer(pc: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (weight decay 0.01), clipped at norm 1, under linear warm-up and
  cosine decay over config.pretrain.steps: BERT's recipe."""
  steps = int(pc.steps)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, float(pc.lr), min(int(pc.warmup_steps), steps - 1), steps)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=0.01))


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, *,
                    seed: int, loss=mlm_loss):
  """The pure MLM step (state, batch) -> (state, loss), for jax.jit.

  state: {"params", "opt", "step"}; batch: {"inputs", "mask", "positions",
  "targets"} as mask_tokens makes them. Dropout is keyed by (seed, step).
  `loss` has mlm_loss's signature (benchmarks swap in variants).
  """

  def step_fn(state, batch):
    key = jax.random.fold_in(jax.random.key(seed), state["step"])

    def loss_fn(p):
      m = nnx.merge(graphdef, p, rest, copy=True)
      nnx.reseed(m, dropout=key)
      return loss(m, batch["inputs"], batch["mask"], batch["positions"],
                  batch["targets"])

    value, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return ({"params": optax.apply_updates(state["params"], updates),
             "opt": opt, "step": state["step"] + 1}, value)

  return step_fn


def special_token_ids(config: ml_collections.ConfigDict
                      ) -> tuple[list[int], int]:
  """([CLS], [SEP], [PAD] ids the tokenizer has, [MASK] id) of model.lm.path.
  """
  from genre_jax.models import lm_encoder

  tokenizer = hf.load_tokenizer(lm_encoder.lm_path(config))
  specials = [tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")]
  mask_id = tokenizer.token_to_id("[MASK]")
  if mask_id is None:
    raise ConfigError(f"{lm_encoder.lm_path(config)}: the tokenizer has no "
                      "[MASK] token")
  return [s for s in specials if s is not None], mask_id


def corpus(config: ml_collections.ConfigDict, dataset):
  """Token ids [N, L], mask and special-token mask of every item's text."""
  from genre_jax.models import lm_encoder

  texts = lm_encoder.item_text(config, dataset)[1:]
  texts = np.concatenate([[""], texts[np.array([bool(t) for t in texts])]])
  ids, mask = lm_encoder.tokenize_text(config, texts)
  specials, mask_id = special_token_ids(config)
  special = np.isin(ids, specials)
  return ids[1:], mask[1:], special[1:], mask_id


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid config.pretrain or
  config.model.lm field, before anything is built or written."""
  from genre_jax import train as train_lib
  from genre_jax.models import lm_encoder

  train_lib.validate_config(config)
  train_lib.check_batch_size(config, "pretrain")
  lm_encoder.check_config(config)


def pretrain(config: ml_collections.ConfigDict, workdir: str,
             dataset=None) -> dict:
  """Masked-LM training on the item corpus; resumes from workdir's latest.

  A checkpoint is resumed only under the same config (but RESUMABLE_KEYS); a
  run that already finished `pretrain.steps` returns its recorded summary and
  rewrites nothing.
  """
  from genre_jax import train as train_lib

  check_config(config)
  with train_lib.hold_workdir(workdir, "masked-LM pretraining"):
    return _pretrain(config, workdir, dataset)


def _pretrain(config, workdir, dataset):
  """pretrain once the config is checked and the workdir held."""
  from genre_jax import data as data_lib
  from genre_jax import train as train_lib

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
  mesh = train_lib.make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, P())
  data_sharding = jax.sharding.NamedSharding(mesh, P("data"))

  model = build_mlm(config, rngs=nnx.Rngs(int(config.train.seed)))
  model.train()
  vocab_size = model.encoder.config.vocab_size
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optimizer(pc)
  state = jax.device_put({"params": params, "opt": tx.init(params),
                          "step": jnp.zeros((), jnp.int32)}, replicated)

  step_fn = make_train_step(graphdef, rest, tx, seed=int(config.train.seed))
  step = jax.jit(step_fn, in_shardings=(replicated, data_sharding),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))
  checkpoints = ckpt_lib.Checkpoints(workdir)
  restored = checkpoints.restore(_abstract(state))
  start = 0
  if restored is not None:
    state = jax.device_put(restored[0], replicated)
    start = int(restored[1]["step"])
    if start > steps:
      raise ConfigError(f"config.pretrain.steps={steps}: the checkpoint in "
                        f"{workdir} is already at step {start}; steps may "
                        "only grow")
    logging.info("Resumed MLM pretraining at step %d", start)

  local = pc.batch_size // jax.process_count()
  tick = time.time()
  for s in range(start, steps):
    rng = np.random.default_rng([int(config.train.seed), s])
    rows = rng.integers(0, len(ids), pc.batch_size)
    rows = rows[jax.process_index() * local:(jax.process_index() + 1) * local]
    inputs, positions, targets = mask_tokens(
        ids[rows], mask[rows], special[rows], rate=float(pc.mask_rate),
        vocab_size=vocab_size, mask_id=mask_id, rng=rng)
    batch = train_lib.to_global(
        {"inputs": inputs, "mask": mask[rows], "positions": positions,
         "targets": targets},
        data_sharding)
    state, loss = step(state, batch)
    if (s + 1) % int(pc.log_every) == 0 or s == start:
      value = float(loss)
      if not math.isfinite(value):
        raise FloatingPointError(f"MLM loss is {value} at step {s + 1}")
      workdir_lib.append_metrics(workdir, {"step": s + 1, "mlm_loss": value})
      logging.info("pretrain step %d/%d mlm loss %.4f (%.1f steps/s)", s + 1,
                   steps, value, (s + 1 - start) / (time.time() - tick))
    if (s + 1) % int(pc.checkpoint_every) == 0 or s + 1 == steps:
      checkpoints.save(checkpoints.latest, state, {"step": s + 1})
  checkpoints.close()
  # The whole run's losses, those of earlier (resumed) invocations included.
  summary = {"steps": steps, "losses": _recorded_losses(workdir, steps),
             "seconds": time.time() - tick, "num_texts": int(len(ids))}
  workdir_lib.atomic_write_text(os.path.join(workdir, "final_metrics.json"),
                                logs.strict_json(summary, indent=2))
  return summary


# What a resumed pretraining run may change: how long it trains (steps may
# grow), how often it logs and saves, and where data and caches live.
RESUMABLE_KEYS = ("data.data_dir", "model.lm.cache_dir", "pretrain.steps",
                  "pretrain.log_every", "pretrain.checkpoint_every")


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


def load_encoder_weights(workdir: str, encoder: bert.BertEncoder) -> None:
  """Replaces `encoder`'s weights by those of a pretraining run, in place."""
  config = workdir_lib.load_config(workdir)
  if "pretrain" not in config:
    raise ConfigError(f"{workdir}: not a masked-LM pretraining workdir "
                      "(run.py --mode=pretrain); cannot use it as lm.init")
  abstract = nnx.eval_shape(lambda: build_mlm(config, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  checkpoints = ckpt_lib.Checkpoints(workdir)
  try:
    restored = checkpoints.restore_params(
        checkpoints.latest, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  finally:
    checkpoints.close()
  if restored is None:
    raise ConfigError(f"{workdir}: no pretraining checkpoint found")
  ours = nnx.state(encoder, nnx.Param)
  theirs = restored["encoder"]
  mismatch = [
      jax.tree_util.keystr(p) for (p, a), b in zip(
          jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs))
      if a.shape != b.shape]
  if mismatch or (jax.tree.structure(ours) != jax.tree.structure(theirs)):
    raise ConfigError(f"{workdir}: the pretrained encoder does not match "
                      f"model.lm.path's architecture ({mismatch[:3]})")
  nnx.update(encoder, theirs)
