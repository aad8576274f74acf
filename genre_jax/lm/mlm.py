"""The masked-LM model (BERT + its tied head), BERT masking and the MLM loss.

BERT-style masking (15% of real, non-special tokens: 80% [MASK], 10% a random
token, 10% unchanged) over the text of every item (the configured fields:
titles, abstracts, GENRE-generated text when the dataset carries it). From
scratch (`pretrain.from_scratch`) or continuing from the weights of
`model.lm.path` (its masked-LM head too, when the checkpoint has one). The
head and its tied decoder run only at the masked slots, not at every token.
Trained by train/pretrain.py with the recommender's step and loop; a
finished run is the recommender's item encoder with
`--config.model.lm.init=WORKDIR`.
"""

from __future__ import annotations

import math

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from genre_jax import checkpoint as ckpt_lib
from genre_jax import workdir as workdir_lib
from genre_jax.errors import ConfigError
from genre_jax.lm import bert
from genre_jax.lm import families
from genre_jax.lm import hf

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
  path = hf.model_dir(config.model.lm.path)
  family = families.family_of(path).name
  if family != "bert":
    raise ConfigError(f"masked-LM pretraining needs a BERT-family model; "
                      f"{path} is '{family}'")
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
