r"""How far apart each preset's click scores start, before any training.

A softmax over 1 + K candidates learns well when the initial scores of one
impression differ by a fraction of a logit; when they differ by several,
the first loss is far above ln(1 + K) and Adam's first steps go to shrinking
the scores instead of ranking them. This script measures, for every preset
at initialisation, on the first training batches of a dataset: the norm of
item and user vectors, the spread of the scores within an impression (std
over its real candidates, averaged over rows), and the loss. With
--compare_scaling every preset whose predictor is a dot product is also
measured with `model.scaled_dot` flipped, which is how the Fastformer preset
came to divide its scores by sqrt(hidden_dim): on Goodreads its unscaled
scores start 7 logits apart and its training collapsed to chance.

  # The built-in synthetic demo data (CPU, a minute):
  python experiments/init_scale.py --presets=nrms,fastformer --compare_scaling
  # Goodreads batches:
  python experiments/init_scale.py --data_dir=../shared/data/goodreads \
      --compare_scaling

Prints a table and ends with one line of JSON: {"dataset", "batches",
"rows": [{preset, scaled_dot, item_norm, user_norm, score_std, score_range,
loss, uniform_loss}]}.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genre_jax import config as config_lib
from genre_jax import data as data_lib
from genre_jax import train
from genre_jax.data import batching
from genre_jax.errors import exit_on_input_error
from genre_jax.logs import json_line, quiet_library_logging

import common_flags

# Word-embedding item encoders.
_PRESETS = common_flags.presets(["nrms", "naml", "fastformer", "lstur",
                                 "miner"])
_DATA_DIR = common_flags.data_dir(
    default="", when_empty="the built-in synthetic demo data")
_CACHE_DIR = common_flags.cache_dir()
_BATCHES = flags.DEFINE_integer("batches", 4, "Training batches measured.")
_COMPARE = flags.DEFINE_bool(
    "compare_scaling", False, "Also measure every dot-predictor preset with "
    "model.scaled_dot flipped.")
_SET = common_flags.overrides()


def preset_config(name: str, scaled_dot: bool | None):
  """The preset's config on the chosen data; scaled_dot None keeps the
  preset's own setting."""
  config = config_lib.load_preset(name, "goodreads" if _DATA_DIR.value
                                  else None)
  if _DATA_DIR.value:
    config.data.path = os.path.abspath(os.path.expanduser(_DATA_DIR.value))
  if _CACHE_DIR.value:
    config.data.data_dir = _CACHE_DIR.value
  config_lib.apply_overrides(config, _SET.value)
  if scaled_dot is not None:
    config.model.scaled_dot = scaled_dot
  return config


def measure(name: str, config, dataset) -> dict:
  """Scale figures of the initial model over the first training batches."""
  host_items, spec = train.model_inputs(config, dataset)
  parts, state = train.init_model(config, spec, total_steps=1)
  items = jax.device_put(host_items)

  @jax.jit  # one compilation per config, instead of one per primitive
  def forward(params, rest, batch, items):
    model = nnx.merge(parts.eval_graphdef, params, rest)
    logits, aux = model(batch, items["tokens"], items["masks"])  # [B, C]
    loss, _ = train.compute_loss(params, rest, parts.eval_graphdef, batch,
                                 items, jax.random.key(0))
    return logits, aux, loss

  batcher = batching.TrainBatcher(
      dataset.splits["train"], dataset.items,
      batch_size=int(config.train.batch_size),
      history_len=int(config.data.history_len),
      num_negatives=int(config.data.num_negatives),
      seed=int(config.train.seed))
  item_norms, user_norms, stds, ranges, losses = [], [], [], [], []
  for batch in itertools.islice(batcher.epoch(0), _BATCHES.value):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    logits, aux, loss = forward(state["params"], parts.rest, batch, items)
    real = np.asarray(batch["weights"]) > 0  # [B]
    mask = np.asarray(batch["candidate_mask"], bool)[real]  # [B', C]
    scores = np.where(mask, np.asarray(logits, np.float64)[real], np.nan)
    stds.append(np.nanstd(scores, axis=1).mean())
    ranges.append((np.nanmax(scores, 1) - np.nanmin(scores, 1)).mean())
    cands = np.asarray(aux["candidates"], np.float64)[real][mask]  # [n, D]
    item_norms.append(np.linalg.norm(cands, axis=-1).mean())
    user = np.asarray(aux["user"], np.float64)[real]  # [B', D] or [B', I, D]
    user_norms.append(np.linalg.norm(user, axis=-1).mean())
    losses.append(float(loss))
  width = int(config.data.num_negatives) + 1
  return {"preset": name,
          "scaled_dot": bool(config.model.get("scaled_dot", False)),
          "item_norm": float(np.mean(item_norms)),
          "user_norm": float(np.mean(user_norms)),
          "score_std": float(np.mean(stds)),
          "score_range": float(np.mean(ranges)),
          "loss": float(np.mean(losses)),
          "uniform_loss": math.log(width)}


def table(rows: list[dict]) -> str:
  """The rows as a fixed-width text table, one line per measured config."""
  lines = [f"{'preset':<12}{'scaled':>7}{'|item|':>9}{'|user|':>9}"
           f"{'score std':>11}{'range':>9}{'loss':>8}{'ln(1+K)':>9}"]
  for r in rows:
    lines.append(f"{r['preset']:<12}{str(r['scaled_dot']):>7}"
                 f"{r['item_norm']:>9.3f}{r['user_norm']:>9.3f}"
                 f"{r['score_std']:>11.4f}{r['score_range']:>9.4f}"
                 f"{r['loss']:>8.3f}{r['uniform_loss']:>9.3f}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _BATCHES.value < 1:  # no batch: every figure the mean of nothing (NaN)
    raise app.UsageError(f"--batches={_BATCHES.value}: must be >= 1")
  quiet_library_logging()
  rows, dataset, dataset_key = [], None, None
  for name in _PRESETS.value:
    base = preset_config(name, None)
    scalings = [None]
    if _COMPARE.value and base.model.predictor == "dot":
      scalings = [False, True]
    for scaled in scalings:
      config = preset_config(name, scaled)
      key = config.data.to_json()
      if key != dataset_key:  # presets share one dataset unless they differ
        dataset, dataset_key = data_lib.load_dataset(config.data), key
      rows.append(measure(name, config, dataset))
  print(f"Initial click scores, first {_BATCHES.value} training batches of "
        f"{_DATA_DIR.value or 'the synthetic demo data'}")
  print(table(rows))
  print(json_line({"dataset": _DATA_DIR.value or "synthetic",
                   "batches": _BATCHES.value, "rows": rows}))


if __name__ == "__main__":
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
