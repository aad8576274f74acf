r"""Masked-LM pretraining step: logits at the masked slots vs at every token.

Times the compiled MLM train step of `configs/mlm_minilm.py` (MiniLM-L6,
forward, backward, AdamW) twice on the same masked batches:
- `masked slots` (what `run.py --mode=pretrain` runs): the head and the
  [D, V] tied decoder see only the K = ceil(0.15 L) gathered slots a row
  predicts, logits [B, K, V];
- `all positions`: the textbook form, logits [B, L, V] at every token, the
  loss then reading the masked ones.
Both start from the same weights and dropout keys and must give the same
losses (the positions not read cannot change the loss). Reports the median step time,
XLA's FLOP count and its memory estimate for each.

  python experiments/bench_mlm.py                   # the preset's shape
  python experiments/bench_mlm.py --batch_size=128 --max_len=128
  python experiments/bench_mlm.py --set=model.lm.path=HF_BERT_DIR

Inputs are random token ids over the model's vocabulary, every text
--max_len tokens long ([CLS] ... [SEP]). Ends with one line of JSON.
"""

from __future__ import annotations

import functools
import statistics
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from genre_jax import config as config_lib
from genre_jax.errors import exit_on_input_error
from genre_jax.lm import mlm
from genre_jax.logs import json_line
from genre_jax.models import lm_encoder
from genre_jax.train import pretrain as pretrain_lib
from genre_jax.train import step as step_lib

import common_flags

_BATCH = flags.DEFINE_integer("batch_size", 0,
                              "Texts per step (0: the preset's).")
_MAX_LEN = flags.DEFINE_integer("max_len", 0,
                                "Tokens per text (0: the preset's).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant.")
_SET = common_flags.overrides()


def all_positions_loss(model, inputs, mask, positions, targets):
  """mlm_loss's value from logits at every position [B, L, V]."""
  logits = model(inputs, mask).astype(jnp.float32)  # [B, L, V]
  rows = jnp.arange(inputs.shape[0])[:, None]
  used = targets != mlm.IGNORE
  # Targets scattered back to [B, L]; unread positions weigh 0.
  dense = jnp.full(inputs.shape, mlm.IGNORE, jnp.int32).at[
      rows, positions].max(jnp.where(used, targets, mlm.IGNORE))
  weights = (dense != mlm.IGNORE).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.maximum(dense, 0))
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _batches(config, vocab_size: int, count: int) -> list[dict]:
  """Masked batches of random texts: [CLS] w1 .. w(L-2) [SEP]."""
  rng = np.random.default_rng(0)
  size, length = int(config.pretrain.batch_size), int(config.model.lm.max_len)
  specials, mask_id = pretrain_lib.special_token_ids(config)
  cls_id, sep_id = specials[:2]
  words = np.setdiff1d(np.arange(vocab_size), [*specials, mask_id])
  out = []
  for _ in range(count):
    ids = rng.choice(words, (size, length))
    ids[:, 0], ids[:, -1] = cls_id, sep_id
    mask = np.ones_like(ids, bool)
    special = np.zeros_like(mask)
    special[:, [0, -1]] = True
    inputs, positions, targets = mlm.mask_tokens(
        ids, mask, special, rate=float(config.pretrain.mask_rate),
        vocab_size=vocab_size, mask_id=mask_id, rng=rng)
    out.append({"inputs": inputs, "mask": mask, "positions": positions,
                "targets": targets})
  return out


def _run(config, batches, loss) -> dict:
  model = mlm.build_mlm(config, rngs=nnx.Rngs(0))
  parts, state = step_lib.split_model(
      model, lambda _: pretrain_lib.optimizer(config.pretrain))
  # Pretraining's own step, with `loss` in place of mlm_loss.
  step_fn = functools.partial(
      step_lib.train_step, items={}, parts=parts, seed=0,
      loss_fn=functools.partial(pretrain_lib.mlm_objective, loss=loss))
  tick = time.perf_counter()
  compiled = jax.jit(step_fn, donate_argnums=(0,)).lower(
      state, batches[0]).compile()
  compile_seconds = time.perf_counter() - tick
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  losses, times = [], []
  for i, batch in enumerate(batches):
    tick = time.perf_counter()
    state, metrics = compiled(state, batch)
    losses.append(float(metrics["loss"]))  # synchronises the step
    if i:  # the first call is warm-up
      times.append(time.perf_counter() - tick)
  return {"step_seconds": statistics.median(times),
          "compile_seconds": compile_seconds,
          "flops": float((cost or {}).get("flops", float("nan"))),
          "temp_bytes": (memory.temp_size_in_bytes if memory is not None
                         else None),
          "losses": losses}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = config_lib.load_preset("mlm_minilm")
  if _BATCH.value:
    config.pretrain.batch_size = _BATCH.value
  if _MAX_LEN.value:
    config.model.lm.max_len = _MAX_LEN.value
  config_lib.apply_overrides(config, _SET.value)
  pretrain_lib.check_config(config)  # a bad shape or rate fails before compiling
  vocab_size = nnx.eval_shape(
      lambda: mlm.build_mlm(config, rngs=nnx.Rngs(0))).encoder.config.vocab_size
  batches = _batches(config, vocab_size, _STEPS.value + 1)
  rows = {"all positions": _run(config, batches, all_positions_loss),
          "masked slots": _run(config, batches, mlm.mlm_loss)}
  full, gathered = rows["all positions"], rows["masked slots"]
  speedup = full["step_seconds"] / gathered["step_seconds"]
  max_loss_diff = float(np.max(np.abs(np.subtract(full["losses"],
                                                  gathered["losses"]))))
  size, length = int(config.pretrain.batch_size), int(config.model.lm.max_len)
  k = batches[0]["positions"].shape[1]
  print(f"MLM pretraining step, {lm_encoder.lm_path(config)}"
        f", batch {size}, {length} tokens, {k} masked slots per text, "
        f"vocab {vocab_size}, {jax.devices()[0].device_kind}")
  print(f"{'logits at':<15}{'step ms':>10}{'texts/s':>10}{'GFLOP':>10}"
        f"{'temp MiB':>10}{'compile s':>11}{'loss[0]':>10}{'loss[-1]':>10}")
  for name, r in rows.items():
    temp = ("n/a" if r["temp_bytes"] is None
            else f"{r['temp_bytes'] / 2**20:.0f}")
    print(f"{name:<15}{1e3 * r['step_seconds']:>10.1f}"
          f"{size / r['step_seconds']:>10.1f}{r['flops'] / 1e9:>10.1f}"
          f"{temp:>10}{r['compile_seconds']:>11.1f}"
          f"{r['losses'][0]:>10.4f}{r['losses'][-1]:>10.4f}")
  print(f"speed-up {speedup:.2f}x; max |loss difference| over "
        f"{len(full['losses'])} steps {max_loss_diff:.2e}")
  print(json_line({
      "device": jax.devices()[0].device_kind, "batch_size": size,
      "max_len": length, "masked_slots": int(k), "vocab_size": vocab_size,
      "speedup": round(speedup, 3), "max_loss_diff": max_loss_diff,
      "rows": [{"logits_at": name,
                "step_ms": round(1e3 * r["step_seconds"], 2),
                "texts_per_s": round(size / r["step_seconds"], 2),
                "gflops": round(r["flops"] / 1e9, 3),
                "temp_bytes": r["temp_bytes"],
                "compile_seconds": round(r["compile_seconds"], 2)}
               for name, r in rows.items()]}))


if __name__ == "__main__":
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
