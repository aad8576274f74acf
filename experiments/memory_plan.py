r"""Per-device memory of the LM recommender's train step, without weights.

Compiles the train step (train.compile_train_step's code path) for LLaMA-2-7B
and -13B shapes with ABSTRACT parameters and item inputs: nothing is loaded
or allocated. The LM family's `load` is replaced, inside this script only,
by one that builds a LlamaDecoder of a config.json written to a temp dir,
and the whole recommender is built under `nnx.eval_shape`; the optimizer
state is `jax.eval_shape(tx.init)`. The cached hidden states [N+1, L, D]
(N = --num_items, L = model.lm.max_len), a deduplicated batch of the
config's shapes (U = --unique_items distinct items, default every slot of
the batch, rounded up to the device count) and, with lm.cache_on=host, the
batch's cache rows [U, L, D] are ShapeDtypeStructs.

It runs on --devices fake CPU devices (re-executing itself with XLA_FLAGS=
--xla_force_host_platform_device_count and JAX_PLATFORMS=cpu when needed)
and prints XLA's per-device memory_analysis(): argument, temp, output,
alias, total = argument + temp + output - alias, for a grid of rows (model x
devices x params replicated / FSDP x cache on device / host x frozen weights
float32 / bfloat16 / int8 x accumulation 1 / 4; a subset, see grid_rows).
With accumulation k, a step takes train.batch_size / k rows (the same
update batch: optax.MultiSteps adds k steps' gradients).
XLA's CPU figures are static estimates of the same program a GPU would run;
a GPU's fusion and layout choices shift temp somewhat.

  python experiments/memory_plan.py --config=configs/llama_nrms.py:mind \
      --set=train.batch_size=64 --set=model.lm.lora.rank=8

Ends with one line of JSON {"rows": [{"model", "devices", "fsdp",
"cache_on", "frozen_dtype", "accumulate_steps", "tune_from", "argument",
"temp", "output", "alias", "total", "compile_seconds"}, ...]} (bytes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/llama_nrms.py", "The preset (an LM item encoder).")
import common_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

_SET = common_flags.overrides()
_MODELS = flags.DEFINE_list(
    "models", ["13b", "7b"], "LLaMA-2 shapes: 7b, 13b, or custom (--hidden, "
    "--layers, --heads, --intermediate, --vocab).")
_DEVICES = flags.DEFINE_list(
    "devices", ["1", "8"], "Device counts of the rows (fake CPU devices).")
_GRID = flags.DEFINE_enum(
    "grid", "default", ["default", "headline"],
    "default: the subset in grid_rows; headline: the base row only (on 1 "
    "device replicated, on more FSDP-sharded).")
_TUNE_TOP = flags.DEFINE_integer(
    "tune_top", 2, "Layers tuned (with LoRA adapters when lora.rank > 0): "
    "tune_from = layers - tune_top (13B: 38, 7B: 30).")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 65238,
                                  "Items (MIND-small: 65,238).")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "LM tokens per item (0: the "
                                "config's model.lm.max_len).")
_UNIQUE = flags.DEFINE_integer(
    "unique_items", 0, "Distinct items per batch (0: batch x (history + "
    "candidates), the most there can be).")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "custom: hidden size.")
_LAYERS = flags.DEFINE_integer("layers", 4, "custom: layers.")
_HEADS = flags.DEFINE_integer("heads", 4, "custom: attention heads.")
_INTERMEDIATE = flags.DEFINE_integer("intermediate", 128,
                                     "custom: MLP width.")
_VOCAB = flags.DEFINE_integer("vocab", 1000, "custom: vocabulary.")

LLAMA2 = {  # hidden, layers, heads, intermediate, vocab
    "7b": (4096, 32, 32, 11008, 32000),
    "13b": (5120, 40, 40, 13824, 32000),
}


def ensure_devices(count: int) -> None:
  """Re-executes this script on `count` fake CPU devices unless it has them."""
  flag = f"--xla_force_host_platform_device_count={count}"
  if flag in os.environ.get("XLA_FLAGS", "") and (
      os.environ.get("JAX_PLATFORMS") == "cpu"):
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip())
  os.execve(sys.executable, [sys.executable] + sys.argv, env)


def model_shape(name: str) -> tuple[int, int, int, int, int]:
  if name == "custom":
    return (_HIDDEN.value, _LAYERS.value, _HEADS.value, _INTERMEDIATE.value,
            _VOCAB.value)
  if name not in LLAMA2:
    raise app.UsageError(f"--models: '{name}' is not 7b, 13b or custom")
  return LLAMA2[name]


def write_config_json(folder: str, shape) -> None:
  hidden, layers, heads, intermediate, vocab = shape
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "hidden_size": hidden,
               "num_hidden_layers": layers, "num_attention_heads": heads,
               "num_key_value_heads": heads, "intermediate_size": intermediate,
               "vocab_size": vocab, "max_position_embeddings": 4096,
               "rms_norm_eps": 1e-5, "hidden_act": "silu",
               "tie_word_embeddings": False}, f)


@contextlib.contextmanager
def abstract_llama():
  """The llama family's `load` builds the decoder from config.json only (no
  weights read); under nnx.eval_shape nothing is allocated either."""
  from genre_jax.lm import families, hf, llama  # pylint: disable=g-import-not-at-top
  original = families.FAMILIES["llama"]

  def load(path, *, dtype, param_dtype, rngs):
    cfg = hf.read_llama_config(path)
    return llama.LlamaDecoder(cfg, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs), cfg

  families.FAMILIES["llama"] = dataclasses.replace(original, load=load)
  try:
    yield
  finally:
    families.FAMILIES["llama"] = original


@dataclasses.dataclass(frozen=True)
class Row:
  model: str
  devices: int
  fsdp: bool
  cache_on: str
  frozen_dtype: str
  accumulate_steps: int


def grid_rows(models: Sequence[str], devices: Sequence[int],
              grid: str) -> list[Row]:
  """Per model: on 1 device, the base row (host cache, bf16 frozen weights,
  no accumulation) and one change each (fp32 / int8 frozen, device cache,
  accumulation 4), and int8 with accumulation 4; on n > 1 devices, the base replicated and FSDP-sharded,
  and FSDP with int8 / fp32 frozen weights and with the cache on device."""
  rows = []
  for m in models:
    for n in devices:
      if n == 1:
        rows.append(Row(m, 1, False, "host", "bfloat16", 1))
        if grid == "default":
          rows += [Row(m, 1, False, "host", "float32", 1),
                   Row(m, 1, False, "host", "int8", 1),
                   Row(m, 1, False, "device", "bfloat16", 1),
                   Row(m, 1, False, "host", "bfloat16", 4),
                   Row(m, 1, False, "host", "int8", 4)]
      else:
        if grid == "default":
          rows.append(Row(m, n, False, "host", "bfloat16", 1))
        rows.append(Row(m, n, True, "host", "bfloat16", 1))
        if grid == "default":
          rows += [Row(m, n, True, "host", "int8", 1),
                   Row(m, n, True, "host", "float32", 1),
                   Row(m, n, True, "device", "bfloat16", 1)]
  return rows


def _concrete(x):
  """A real value of an abstract non-parameter leaf (RNG keys, counters)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.split(jax.random.key(0), x.shape) if x.shape else (
        jax.random.key(0))
  return jnp.zeros(x.shape, x.dtype)


def measure(row: Row, base_config, lm_dir: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from genre_jax.data import batching  # pylint: disable=g-import-not-at-top
  from genre_jax.data.types import ItemInputSpec  # pylint: disable=g-import-not-at-top
  from genre_jax.models import lm_encoder, recommender  # pylint: disable=g-import-not-at-top
  from genre_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from genre_jax.train import optim, step  # pylint: disable=g-import-not-at-top

  config = base_config.copy_and_resolve_references()
  layers = model_shape(row.model)[1]
  hidden = model_shape(row.model)[0]
  config.model.lm.path = lm_dir
  config.model.lm.kind = "llama"
  config.model.lm.cache = True
  config.model.lm.tune_from = max(layers - _TUNE_TOP.value, 1)
  config.model.lm.cache_on = row.cache_on
  config.model.lm.frozen_dtype = row.frozen_dtype
  config.train.accumulate_steps = row.accumulate_steps
  config.train.dedup_items = True
  if _MAX_LEN.value:
    config.model.lm.max_len = _MAX_LEN.value
  length = int(config.model.lm.max_len)
  fsdp = row.devices if row.fsdp else 1
  config.mesh.fsdp, config.mesh.data = fsdp, row.devices // fsdp
  mesh = jax.sharding.Mesh(
      np.array(jax.devices()[:row.devices]).reshape(row.devices // fsdp,
                                                      fsdp), mesh_lib.AXES)

  field = lm_encoder.HIDDEN_FIELD
  cache_dtype = jnp.bfloat16 if config.model.lm.cache_dtype == "bfloat16" \
      else jnp.float32
  spec = ItemInputSpec(vocab_size=0, fields=(field,), lengths=(length,),
                       num_users=1000)
  with abstract_llama():
    model = nnx.eval_shape(lambda: recommender.build_model(config, spec,
                                                           seed=0))
  model.eval()
  eval_graphdef, _, _ = nnx.split(model, nnx.Param, ...)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optim.make_optimizer(config, 10_000, params)
  state = {"params": params, "opt": jax.eval_shape(tx.init, params),
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  parts = step.Parts(graphdef, eval_graphdef,
                     jax.tree.map(_concrete, rest), tx)

  # Accumulation keeps the update's batch: each step takes batch / k rows.
  b = max(int(config.train.batch_size) // row.accumulate_steps, 1)
  h, c = int(config.data.history_len), int(config.data.num_negatives) + 1
  unique = _UNIQUE.value or b * (h + c)
  unique = -(-unique // row.devices) * row.devices
  sds = jax.ShapeDtypeStruct
  batch = {"history": sds((b, h), jnp.int32),
           "history_mask": sds((b, h), jnp.bool_),
           "candidates": sds((b, c), jnp.int32),
           "candidate_mask": sds((b, c), jnp.bool_),
           "labels": sds((b, c), jnp.float32),
           "users": sds((b,), jnp.int32),
           "weights": sds((b,), jnp.float32),
           "item_ids": sds((unique,), jnp.int32),
           "history_pos": sds((b, h), jnp.int32),
           "candidate_pos": sds((b, c), jnp.int32)}
  replicated = jax.sharding.NamedSharding(mesh, mesh_lib.P())
  table = {"tokens": {field: sds((_NUM_ITEMS.value + 1, length, hidden),
                                 cache_dtype, sharding=replicated)},
           "masks": {field: sds((_NUM_ITEMS.value + 1, length), jnp.bool_,
                                sharding=replicated)}}
  if row.cache_on == "host":
    batch[f"{batching.HOST_ROWS}tokens/{field}"] = sds(
        (unique, length, hidden), cache_dtype)
    batch[f"{batching.HOST_ROWS}masks/{field}"] = sds((unique, length),
                                                      jnp.bool_)
    table = {"tokens": {}, "masks": {}}
  tick = time.perf_counter()
  compiled = step.compile_train_step(parts, state, batch, table, mesh, seed=0)
  seconds = time.perf_counter() - tick
  memory = compiled.memory_analysis()
  argument = int(memory.argument_size_in_bytes)
  temp = int(memory.temp_size_in_bytes)
  output = int(memory.output_size_in_bytes)
  alias = int(memory.alias_size_in_bytes)
  return {**dataclasses.asdict(row),
          "tune_from": int(config.model.lm.tune_from),
          "lora_rank": int(config.model.lm.lora.rank), "batch": b,
          "unique_items": unique, "max_len": length,
          "num_items": _NUM_ITEMS.value,
          "argument": argument, "temp": temp, "output": output,
          "alias": alias, "total": argument + temp + output - alias,
          "compile_seconds": round(seconds, 1)}


def format_table(rows: list[dict]) -> str:
  gib = lambda x: f"{x / 2**30:.2f}"
  lines = ["| model | devices | params | cache | frozen | accum x batch "
           "| tune_from | argument GiB | temp GiB | output GiB | alias GiB | total GiB |",
           "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['devices']} | "
        f"{'FSDP' if r['fsdp'] else 'replicated'} | {r['cache_on']} | "
        f"{r['frozen_dtype']} | {r['accumulate_steps']} x {r['batch']} | "
        f"{r['tune_from']} | "
        f"{gib(r['argument'])} | {gib(r['temp'])} | {gib(r['output'])} | "
        f"{gib(r['alias'])} | {gib(r['total'])} |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  from genre_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from genre_jax.logs import json_line  # pylint: disable=g-import-not-at-top
  devices = [int(d) for d in _DEVICES.value]
  if not devices or min(devices) < 1:
    raise app.UsageError("--devices: positive integers")
  ensure_devices(max(devices))
  config = _CONFIG.value
  config_lib.apply_overrides(config, _SET.value)
  rows = []
  start = time.perf_counter()
  for row in grid_rows(_MODELS.value, devices, _GRID.value):
    with tempfile.TemporaryDirectory() as lm_dir:
      write_config_json(lm_dir, model_shape(row.model))
      result = measure(row, config, lm_dir)
    logging.info("%s: total %.2f GiB (%.1f s)", row, result["total"] / 2**30,
                 result["compile_seconds"])
    rows.append(result)
  print(format_table(rows))
  print(f"({len(rows)} rows in {time.perf_counter() - start:.0f} s; per "
        "device, XLA memory_analysis, total = argument + temp + output - "
        "alias)")
  print(json_line({"rows": rows}))


if __name__ == "__main__":
  app.run(main, flags_parser=common_flags.parse)
