"""Masked-LM pretraining: BERT masking, and the head against transformers."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from genre_jax.config import load_preset
from genre_jax.errors import ConfigError
from genre_jax.lm import mlm
from genre_jax.train import pretrain as pretrain_lib

_TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=32, hidden_act="gelu_new")
_MASK_ID, _SPECIAL = 3, (0, 1, 2)  # [MASK]; [PAD], [CLS], [SEP]


def _texts(rng, batch: int, length: int):
  """[B, L] ids of [CLS] w1 .. wn [SEP] [PAD]..., n from 0 to L - 2."""
  ids = np.zeros((batch, length), np.int64)
  lengths = rng.integers(0, length - 1, batch)
  lengths[:2] = (0, length - 2)  # an empty text and a full one
  lengths[-batch // 4:] = length - 2
  for row, n in enumerate(lengths):
    ids[row, :n + 2] = [1, *rng.integers(4, 100, n), 2]
  mask = ids > 0
  return ids, mask, np.isin(ids, _SPECIAL), lengths


def test_mask_tokens_predicts_bert_counts_of_real_tokens_only():
  rng = np.random.default_rng(0)
  ids, mask, special, lengths = _texts(rng, 4000, 24)
  inputs, positions, targets = mlm.mask_tokens(
      ids, mask, special, rate=0.15, vocab_size=100, mask_id=_MASK_ID,
      rng=np.random.default_rng(1))
  assert positions.shape == targets.shape == (4000, 4)  # ceil(0.15 * 24)
  used = targets != mlm.IGNORE
  expected = np.where(lengths > 0, np.maximum(1, np.rint(0.15 * lengths)), 0)
  np.testing.assert_array_equal(used.sum(1), expected)
  rows = np.arange(len(ids))[:, None].repeat(4, 1)
  # Targets are the original tokens, at distinct non-special positions.
  np.testing.assert_array_equal(targets[used], ids[rows[used],
                                                   positions[used]])
  assert not special[rows[used], positions[used]].any()
  assert mask[rows[used], positions[used]].all()
  for row in np.flatnonzero(used.sum(1) > 1):
    chosen = positions[row][used[row]]
    assert len(set(chosen)) == len(chosen)
  # Nothing else changes; chosen tokens: 80% [MASK], 10% random, 10% kept.
  changed = inputs != ids
  changed[rows[used], positions[used]] = False
  assert not changed.any()
  after = inputs[rows[used], positions[used]]
  before = ids[rows[used], positions[used]]
  n = used.sum()
  assert abs(np.mean(after == _MASK_ID) - 0.8) < 0.02, n
  kept = np.mean(after == before)
  assert abs(kept - 0.1) < 0.02  # (plus the ~1% random draws that hit it)
  # In texts of one length, every word is as likely to be chosen.
  full = lengths == 22
  chosen_at = np.bincount(positions[full][used[full]], minlength=24)
  assert chosen_at[0] == chosen_at[23] == 0
  assert chosen_at[1:23].min() > 0.6 * chosen_at[1:23].max(), chosen_at


def _tiny_bert_mlm(tmp_path):
  """A random tiny BertForMaskedLM saved to tmp_path (eval mode)."""
  torch.manual_seed(0)
  model = transformers.BertForMaskedLM(transformers.BertConfig(**_TINY))
  with torch.no_grad():  # so that a head left at its init would show
    model.cls.predictions.bias.normal_()
    model.cls.predictions.transform.LayerNorm.bias.normal_()
  model.eval().save_pretrained(tmp_path, safe_serialization=True)
  return model


def _config(path):
  config = load_preset("mlm_minilm")
  config.model.lm.path = str(path)
  return config


def test_mlm_logits_match_transformers_at_all_and_masked_positions(tmp_path):
  reference = _tiny_bert_mlm(tmp_path)
  model = mlm.build_mlm(_config(tmp_path), rngs=nnx.Rngs(0))
  model.eval()
  ids, mask, special, _ = _texts(np.random.default_rng(2), 6, 12)
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids),
                         attention_mask=torch.tensor(mask.astype(np.int64))
                         ).logits.numpy()  # [B, L, V]
  full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(full[mask], expected[mask], atol=1e-4, rtol=0)
  _, positions, targets = mlm.mask_tokens(
      ids, mask, special, rate=0.3, vocab_size=100, mask_id=_MASK_ID,
      rng=np.random.default_rng(3))
  gathered = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask),
                              jnp.asarray(positions)))  # [B, K, V]
  rows = np.arange(len(ids))[:, None]
  np.testing.assert_allclose(gathered, full[rows, positions], atol=1e-5)
  # The loss: mean cross-entropy of the reference's logits over used slots.
  used = targets != mlm.IGNORE
  picked = expected[rows, positions][used]  # [N, V]
  log_z = np.log(np.exp(picked - picked.max(1, keepdims=True)).sum(1)) + (
      picked.max(1))
  want = np.mean(log_z - picked[np.arange(len(picked)), targets[used]])
  got = float(mlm.mlm_loss(model, jnp.asarray(ids), jnp.asarray(mask),
                           jnp.asarray(positions), jnp.asarray(targets)))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_encoder_only_checkpoint_gets_a_fresh_head(tmp_path):
  torch.manual_seed(0)
  backbone = transformers.BertModel(transformers.BertConfig(**_TINY))
  backbone.save_pretrained(tmp_path, safe_serialization=True)
  model = mlm.build_mlm(_config(tmp_path), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(
      np.asarray(model.encoder.embeddings.word_embeddings.embedding[...]),
      backbone.embeddings.word_embeddings.weight.detach().numpy())
  assert not np.asarray(model.head.decoder_bias[...]).any()


@pytest.mark.parametrize("rate", [0.0, 1.5])
def test_mask_rate_outside_0_1_is_a_config_error(tmp_path, rate):
  config = _config(tmp_path)
  config.pretrain.mask_rate = rate
  with pytest.raises(ConfigError, match=r"pretrain\.mask_rate=.*: must be "
                     r"a finite number > 0 and <= 1"):
    pretrain_lib.pretrain(config, str(tmp_path / "run"), dataset=object())


def test_pretraining_checkpoint_from_before_the_head_module_is_named(
    tmp_path):
  from genre_jax import checkpoint as ckpt_lib

  head = {"transform": {"kernel": np.zeros((2, 2), np.float32)},
          "decoder_bias": np.zeros((5,), np.float32)}
  encoder = {"word": np.ones((5, 2), np.float32)}
  old = ckpt_lib.Checkpoints(str(tmp_path))
  try:  # the head's parameters beside the encoder, as before 4be8edd
    old.save(old.latest, {"params": {"encoder": encoder, **head}, "opt": {},
                          "step": 0}, {})
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        {"encoder": encoder, "head": head})
    with pytest.raises(ConfigError) as error:
      old.restore({"params": abstract, "opt": {}, "step": None})
  finally:
    old.close()
  message = str(error.value)
  assert "not in the checkpoint (2): head/decoder_bias" in message
  assert "'head' since 4be8edd" in message


def _pretraining_setup(tmp_path, *, bert=None, **pretrain):
  """(config, reference): a config pretraining a tiny BERT (BertConfig
  `bert` overrides; its head bias random, so a fresh head would show) on
  tiny demo titles, and that model as transformers built it."""
  import os

  from genre_jax.lm import hf
  from tests.helpers import shrink

  torch.manual_seed(0)
  reference = transformers.BertForMaskedLM(transformers.BertConfig(
      **{**_TINY, "vocab_size": 30522, "max_position_embeddings": 64,
         **(bert or {})}))
  with torch.no_grad():
    reference.cls.predictions.bias.normal_()
  model_dir = tmp_path / "model"
  reference.save_pretrained(model_dir)
  os.symlink(os.path.join(hf.model_dir(), hf.TOKENIZER_FILE),
             model_dir / hf.TOKENIZER_FILE)
  config = _config(model_dir)
  config.data = shrink(load_preset("nrms"), str(tmp_path / "data")).data
  config.data.fields = ("title",)
  config.model.lm.max_len = 16
  config.pretrain.update(log_every=1, **pretrain)
  return config, reference


def test_pretraining_continues_from_the_checkpoints_head(tmp_path):
  # run.py --mode=pretrain's path: the head the checkpoint was saved with is
  # the head that trains (a few small steps move it by little), not a new one.
  from genre_jax import checkpoint as ckpt_lib

  config, reference = _pretraining_setup(tmp_path, steps=2, batch_size=4,
                                         checkpoint_every=2)
  summary = pretrain_lib.pretrain(config, str(tmp_path / "run"))
  assert len(summary["losses"]) == 2
  assert all(np.isfinite(r["loss"]) for r in summary["losses"])
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / "run"))
  try:
    params, _ = checkpoints.restore_saved(checkpoints.latest)
  finally:
    checkpoints.close()
  saved = np.asarray(params["head"]["decoder_bias"]["value"]
                     if isinstance(params["head"]["decoder_bias"], dict)
                     else params["head"]["decoder_bias"])
  np.testing.assert_allclose(
      saved, reference.cls.predictions.bias.detach().numpy(), atol=1e-3)


def test_accumulated_pretraining_is_one_update_of_the_mean_gradient(
    tmp_path):
  # Two batches of 4 accumulated: the rows of one batch of 8, and one AdamW
  # update of their two gradients' mean (computed here with nnx.grad).
  from genre_jax import checkpoint as ckpt_lib
  from genre_jax import data as data_lib

  config, _ = _pretraining_setup(
      tmp_path, bert={"hidden_dropout_prob": 0.0,
                      "attention_probs_dropout_prob": 0.0},
      steps=2, batch_size=4, accumulate_steps=2, warmup_steps=0,
      checkpoint_every=2, lr=1e-3)
  dataset = data_lib.load_dataset(config.data)
  corpus = pretrain_lib.corpus(config, dataset)
  vocab = 30522
  accumulated = list(pretrain_lib.update_batches(config, *corpus, vocab, 0, 2))
  whole = config.copy_and_resolve_references()
  whole.pretrain.update(batch_size=8, accumulate_steps=1, steps=1)
  (one,) = pretrain_lib.update_batches(whole, *corpus, vocab, 0, 1)
  for name, value in one.items():
    np.testing.assert_array_equal(
        np.concatenate([b[name] for b in accumulated]), value)

  pretrain_lib.pretrain(config, str(tmp_path / "run"), dataset=dataset)
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / "run"))
  try:
    saved, progress = checkpoints.restore_saved(checkpoints.latest)
  finally:
    checkpoints.close()
  assert progress["step"] == 2

  model = mlm.build_mlm(config, rngs=nnx.Rngs(int(config.train.seed)))
  params = nnx.state(model, nnx.Param)

  def loss(m, batch):
    return mlm.mlm_loss(m, *(jnp.asarray(batch[n]) for n in (
        "inputs", "mask", "positions", "targets")))

  grads = [nnx.state(nnx.grad(loss)(model, b), nnx.Param)
           for b in accumulated]
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  tx = pretrain_lib.optimizer(whole.pretrain)
  updates, _ = tx.update(mean, tx.init(params), params)
  want = jax.tree.map(lambda p, u: p + u, params, updates)
  got = jax.tree.leaves(saved)
  assert len(got) == len(jax.tree.leaves(want))
  moved = 0.0
  for w, g, p in zip(jax.tree.leaves(want), got, jax.tree.leaves(params)):
    g = np.asarray(g["value"] if isinstance(g, dict) else g)
    # AdamW's first step is about lr * sign(g): a near-zero gradient's
    # rounding moves it by a fraction of lr (1e-3).
    np.testing.assert_allclose(g, np.asarray(w), atol=1e-5, rtol=0)
    moved = max(moved, float(np.abs(np.asarray(w) - np.asarray(p)).max()))
  assert moved > 1e-4  # the update is not a no-op the check would miss


def test_recommender_accumulation_in_a_pretraining_run_is_a_config_error(
    tmp_path):
  config = _config(tmp_path)
  config.train.accumulate_steps = 4
  with pytest.raises(ConfigError, match=r"config\.train\.accumulate_steps=4:"
                     r".*config\.pretrain\.accumulate_steps"):
    pretrain_lib.pretrain(config, str(tmp_path / "run"), dataset=object())


@pytest.mark.slow
def test_run_py_pretrains_with_accumulation_then_a_recommender_starts_from_it(
    tmp_path):
  # The README's two commands, tiny: run.py --mode=pretrain (two batches per
  # update), the same command again (finished: its recorded summary), then
  # bert_nrms with lm.init = that workdir through train and eval; a
  # recommender workdir as lm.init is one error line.
  import json
  import subprocess
  import sys

  from tests.helpers import ROOT, shrink_flags

  _pretraining_setup(tmp_path)  # the tiny BERT directory and its tokenizer
  model_dir, data_dir = tmp_path / "model", tmp_path / "data"
  common = [f"--config.model.lm.path={model_dir}",
            "--config.model.lm.max_len=16", *shrink_flags(data_dir)]

  def run_py(*args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args],
                          capture_output=True, text=True, cwd=ROOT,
                          timeout=600)

  pretrain = ["--mode=pretrain", "--config=configs/mlm_minilm.py",
              f"--workdir={tmp_path / 'mlm'}", *common,
              "--config.pretrain.steps=4", "--config.pretrain.batch_size=4",
              "--config.pretrain.accumulate_steps=2",
              "--config.pretrain.warmup_steps=0",
              "--config.pretrain.checkpoint_every=2",
              "--config.pretrain.log_every=1"]
  first = run_py(*pretrain)
  assert first.returncode == 0, first.stderr[-3000:]
  summary = json.loads(first.stdout.strip().splitlines()[-1])
  assert summary["steps"] == 4 and np.isfinite(summary["last_loss"])
  again = run_py(*pretrain)
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads(again.stdout.strip().splitlines()[-1]) == summary

  rec = tmp_path / "bert_nrms"
  common.append("--config.model.lm.tune_from=1")  # the tiny BERT has 2
  train = run_py("--config=configs/bert_nrms.py", f"--workdir={rec}", *common,
                 f"--config.model.lm.init={tmp_path / 'mlm'}",
                 f"--config.model.lm.cache_dir={tmp_path / 'cache'}",
                 "--config.train.max_steps=2")
  assert train.returncode == 0, train.stderr[-3000:]
  evaluated = run_py("--mode=eval", f"--workdir={rec}", "--split=test")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert np.isfinite(json.loads(
      evaluated.stdout.strip().splitlines()[-1])["auc"])

  wrong = run_py("--config=configs/bert_nrms.py",
                 f"--workdir={tmp_path / 'wrong'}", *common,
                 f"--config.model.lm.init={rec}")
  assert wrong.returncode == 2, wrong.stderr[-3000:]
  assert "Traceback" not in wrong.stderr
  errors = [l for l in wrong.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "not a masked-LM pretraining workdir" in (
      errors[0]), wrong.stderr[-3000:]
