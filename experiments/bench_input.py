"""Throughput of the host input pipeline (MIND reading and TrainBatcher).

Reads a MIND-format folder with read_mind_dir (no tokenization) and times
full epochs of TrainBatcher after one warm-up batch.

Usage:
  python experiments/bench_input.py --data_dir=../shared/data/goodreads

Prints a table, then one line of JSON (the last line of output).
"""

import time
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from genre_jax.data import batching
from genre_jax.data import mind
from genre_jax.errors import exit_on_input_error
from genre_jax.logs import json_line

import common_flags

_DATA_DIR = common_flags.data_dir()
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_HISTORY_LEN = flags.DEFINE_integer("history_len", 50, "History items kept.")
_NUM_NEGATIVES = flags.DEFINE_integer("num_negatives", 4, "Negatives K.")
_EPOCHS = flags.DEFINE_integer("epochs", 1, "Epochs to time.")


def main(argv: Sequence[str]) -> None:
  del argv
  t0 = time.perf_counter()
  ds = mind.read_mind_dir(_DATA_DIR.value)
  read_seconds = time.perf_counter() - t0
  sizes = {s: len(ds.splits[s]) for s in ("train", "dev", "test")
           if s in ds.splits}

  t0 = time.perf_counter()
  batcher = batching.TrainBatcher(
      ds.splits["train"], ds.items, batch_size=_BATCH_SIZE.value,
      history_len=_HISTORY_LEN.value, num_negatives=_NUM_NEGATIVES.value,
      seed=0)
  init_seconds = time.perf_counter() - t0

  next(iter(batcher.epoch(0)))  # Warm-up batch.
  samples = batches = 0
  t0 = time.perf_counter()
  for epoch in range(_EPOCHS.value):
    for batch in batcher.epoch(epoch):
      samples += int(np.sum(batch["weights"]))
      batches += 1
  seconds = time.perf_counter() - t0

  result = {
      "data_dir": _DATA_DIR.value,
      "num_items": ds.items.num_items,
      "num_users": len(ds.user_vocab) - 1,
      "num_train": sizes.get("train", 0),
      "num_dev": sizes.get("dev", 0),
      "num_test": sizes.get("test", 0),
      "num_train_samples": batcher.num_samples,
      "read_seconds": round(read_seconds, 3),
      "batcher_init_seconds": round(init_seconds, 3),
      "epochs": _EPOCHS.value,
      "batch_size": _BATCH_SIZE.value,
      "history_len": _HISTORY_LEN.value,
      "num_negatives": _NUM_NEGATIVES.value,
      "iterate_seconds": round(seconds, 3),
      "samples_per_s": round(samples / seconds, 1),
      "batches_per_s": round(batches / seconds, 2),
  }
  width = max(len(k) for k in result)
  print("Input pipeline benchmark")
  print("-" * (width + 30))
  for key, value in result.items():
    print(f"{key:<{width}}  {value}")
  print("-" * (width + 30))
  print(json_line(result))


if __name__ == "__main__":
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
