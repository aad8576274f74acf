r"""Train-step throughput of a MiniLM item encoder with cached frozen layers.

BERT-NRMS with all-MiniLM-L6-v2 and only its top layer tuned
(`lm.tune_from=5`), timed twice on the same batches: uncached (every step
runs the embeddings and the five frozen layers, without gradients) and
cached (the hidden states entering layer 5 were computed once for every
item; each step runs only the top layer). Building the cache is timed too.
Both runs start from the same weights, and their first losses are printed
side by side (they must agree: the cache is exact).

  python experiments/bench_lm_cache.py            # synthetic demo data
  python experiments/bench_lm_cache.py --data_dir=../shared/data/goodreads

Prints a table and ends with one line of JSON holding
`cached_samples_per_s`, `uncached_samples_per_s` and `speedup`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from genre_jax import config as config_lib
from genre_jax import data as data_lib
from genre_jax import train
from genre_jax.data import batching
from genre_jax.errors import exit_on_input_error
from genre_jax.logs import json_line

import common_flags

_DATA_DIR = common_flags.data_dir(
    default="", when_empty="the synthetic demo dataset")
_CACHE_DIR = common_flags.cache_dir(
    when_empty="a new temporary folder (the LM layer cache goes there too)")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Samples per step.")
_HISTORY = flags.DEFINE_integer("history_len", 10, "History items kept.")
_MAX_LEN = flags.DEFINE_integer("max_len", 32, "LM tokens per item.")
_TUNE_FROM = flags.DEFINE_integer("tune_from", 5, "First tuned layer.")
_STEPS = flags.DEFINE_integer("steps", 12, "Timed steps per run.")
_CACHE_DTYPE = flags.DEFINE_enum("cache_dtype", "float32",
                                 ["float32", "bfloat16"], "Cache storage.")
_SET = common_flags.overrides()


def _config(cache_dir: str, cache: bool):
  config = config_lib.load_preset(
      "bert_nrms", "goodreads" if _DATA_DIR.value else None)
  if _DATA_DIR.value:
    config.data.path = _DATA_DIR.value
  config.data.data_dir = cache_dir
  config.data.history_len = _HISTORY.value
  config.model.lm.max_len = _MAX_LEN.value
  config.model.lm.tune_from = _TUNE_FROM.value
  config.model.lm.cache = cache
  config.model.lm.cache_dtype = _CACHE_DTYPE.value
  config.model.lm.cache_dir = os.path.join(cache_dir, "lm_cache_bench")
  config.train.batch_size = _BATCH.value
  config.model.dropout = 0.0  # identical losses in both runs
  config_lib.apply_overrides(config, _SET.value)
  return config


def _run(config, dataset, batches) -> dict:
  """Builds the inputs (the cache, if on), compiles, times the steps."""
  tick = time.perf_counter()
  host_items, spec = train.model_inputs(config, dataset)
  inputs_seconds = time.perf_counter() - tick
  mesh = train.make_mesh()
  rep = jax.sharding.NamedSharding(mesh, train.P())
  dat = jax.sharding.NamedSharding(mesh, train.P("data"))
  items = jax.device_put(host_items, rep)
  parts, state = train.init_model(config, spec, total_steps=1000)
  state = jax.device_put(state, rep)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in batches[0].items()}
  step = train.compile_train_step(parts, state, shapes, items, mesh, seed=0)
  device_batches = [train.to_global(b, dat) for b in batches]
  losses = []
  state, metrics = step(state, device_batches[0], items)  # warm-up
  losses.append(float(metrics["loss"]))
  times = []
  for b in device_batches[1:]:
    tick = time.perf_counter()
    state, metrics = step(state, b, items)
    losses.append(float(metrics["loss"]))  # synchronises the step
    times.append(time.perf_counter() - tick)
  seconds = statistics.median(times)
  return {"inputs_seconds": inputs_seconds, "step_seconds": seconds,
          "samples_per_s": int(config.train.batch_size) / seconds,
          "losses": losses}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cache_dir = _CACHE_DIR.value or tempfile.mkdtemp(prefix="bench_lm_cache_")
  config = _config(cache_dir, cache=True)
  # The shapes as the config holds them, after --set (which may change them).
  batch_size, history_len = (int(config.train.batch_size),
                             int(config.data.history_len))
  tune_from, max_len = (int(config.model.lm.tune_from),
                        int(config.model.lm.max_len))
  dataset = data_lib.load_dataset(config.data)
  batcher = batching.TrainBatcher(
      dataset.splits["train"], dataset.items, batch_size=batch_size,
      history_len=history_len, num_negatives=config.data.num_negatives,
      seed=0)
  batcher.unique_items = train.dedup_capacity(batcher, _STEPS.value + 1)
  batches = [b for _, b in zip(range(_STEPS.value + 1), batcher.epoch(0))]
  shutil.rmtree(config.model.lm.cache_dir, ignore_errors=True)
  cached = _run(config, dataset, batches)  # builds the cache
  uncached = _run(_config(cache_dir, cache=False), dataset, batches)
  speedup = cached["samples_per_s"] / uncached["samples_per_s"]
  max_loss_diff = float(np.max(np.abs(np.subtract(cached["losses"],
                                                  uncached["losses"]))))
  print(f"MiniLM-L6 BERT-NRMS, layers 0..{tune_from - 1} frozen, "
        f"batch {batch_size}, history {history_len}, "
        f"{max_len} tokens/item, {jax.devices()[0].device_kind}")
  print(f"{'run':<10}{'step ms':>10}{'samples/s':>11}{'inputs s':>10}"
        f"{'loss[0]':>10}{'loss[-1]':>10}")
  for name, r in (("uncached", uncached), ("cached", cached)):
    print(f"{name:<10}{1e3 * r['step_seconds']:>10.1f}"
          f"{r['samples_per_s']:>11.1f}{r['inputs_seconds']:>10.1f}"
          f"{r['losses'][0]:>10.4f}{r['losses'][-1]:>10.4f}")
  print(f"speed-up {speedup:.2f}x; max |loss difference| over "
        f"{len(cached['losses'])} steps {max_loss_diff:.2e}; cache build "
        f"{cached['inputs_seconds']:.1f}s for {dataset.items.num_items} items")
  print(json_line({
      "cached_samples_per_s": round(cached["samples_per_s"], 2),
      "uncached_samples_per_s": round(uncached["samples_per_s"], 2),
      "speedup": round(speedup, 3),
      "cache_build_seconds": round(cached["inputs_seconds"], 2),
      "max_loss_diff": max_loss_diff,
      "batch_size": batch_size, "history_len": history_len,
      "max_len": max_len, "tune_from": tune_from,
      "num_items": dataset.items.num_items,
      "device": jax.devices()[0].device_kind}))


if __name__ == "__main__":
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
