r"""Frozen LM weights in bfloat16 or int8 (model.lm.frozen_dtype) vs float32.

(a) Hidden-state error: the LM of --lm_path (default all-MiniLM-L6-v2) is
loaded three times, all its weights frozen and stored in float32, bfloat16
and int8 (genre_jax/lm/quantize.py: weight-only, per-output-channel scales,
int8 embedding rows), and encodes --num_titles book titles (the first
distinct ones of --data_dir/news.tsv; the built-in list when it has none).
For the embeddings' output and every layer's, the max and mean absolute
difference from float32 over real (non-padding) tokens, and the cosine of the
mean-pooled last hidden states (BERT-NRMS's item vector before projection).

(b) --goodreads_auc: configs/bert_nrms.py:goodreads (all six MiniLM layers
frozen and cached) trained once per --dtypes entry with
model.lm.frozen_dtype set, each in its own workdir under --workdir_root
(a finished one is reused, not retrained); its test AUC, MRR and nDCG.

  python experiments/quantized_frozen.py --data_dir=../shared/data/goodreads
  python experiments/quantized_frozen.py --data_dir=../shared/data/goodreads \
      --goodreads_auc --workdir_root=/tmp/quantized_frozen

Prints a table per part and ends with one line of JSON:
{"titles", "source", "layers": {dtype: [{"layer", "max_abs", "mean_abs"},
...]}, "pooled_cosine": {dtype: {"min", "mean"}}, "frozen_mib": {dtype},
"goodreads": {dtype: {"test": {...}, "workdir", "train_seconds"}}}.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from genre_jax import config as config_lib
from genre_jax import variables
from genre_jax.errors import ConfigError, DataFormatError, exit_on_input_error
from genre_jax.lm import quantize
from genre_jax.logs import json_line, quiet_library_logging
from genre_jax.models import lm_encoder

import common_flags

_DATA_DIR = common_flags.data_dir(
    when_empty="the built-in titles (and no --goodreads_auc)")
_CACHE_DIR = common_flags.cache_dir()
_WORKDIR_ROOT = common_flags.workdir_root(default="")
_SET = common_flags.overrides()
_LM_PATH = flags.DEFINE_string(
    "lm_path", "", "Hugging Face model directory (empty: all-MiniLM-L6-v2).")
_NUM_TITLES = flags.DEFINE_integer("num_titles", 256, "Titles to encode.")
_MAX_LEN = flags.DEFINE_integer("max_len", 32, "LM tokens per title.")
_GOODREADS_AUC = flags.DEFINE_bool(
    "goodreads_auc", False, "Also train bert_nrms:goodreads once per "
    "--dtypes entry (minutes each on a CPU) and report test AUC.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "int8"],
                            "frozen_dtype of each --goodreads_auc run.")

# Used when --data_dir has no news.tsv.
_BUILTIN_TITLES = (
    "Dune", "The Hobbit", "Pride and Prejudice", "The Name of the Wind",
    "A Game of Thrones (A Song of Ice and Fire, #1)", "Gone Girl",
    "The Girl with the Dragon Tattoo (Millennium, #1)", "Beloved",
    "Harry Potter and the Sorcerer's Stone (Harry Potter, #1)",
    "The Hitchhiker's Guide to the Galaxy", "One Hundred Years of Solitude",
    "The Road", "Middlemarch", "Neuromancer", "The Left Hand of Darkness",
    "Crime and Punishment",
)
METRICS = ("auc", "mrr", "ndcg5", "ndcg10")


def read_titles(data_dir: str, count: int) -> tuple[list[str], str]:
  """The first `count` distinct non-empty titles of data_dir/news.tsv, or
  the built-in list; and where they came from."""
  news = pathlib.Path(data_dir) / "news.tsv" if data_dir else None
  if news is None or not news.is_file():
    return list(_BUILTIN_TITLES[:count]), "built-in list"
  titles, seen = [], set()
  with open(news, encoding="utf-8") as f:
    for line in f:
      fields = line.rstrip("\r\n").split("\t")
      if len(fields) > 3 and fields[3].strip() and fields[3] not in seen:
        seen.add(fields[3])
        titles.append(fields[3])
        if len(titles) == count:
          break
  return titles, str(news)


def _lm_config():
  config = config_lib.load_preset("bert_nrms")
  config.model.lm.kind = "auto"
  config.model.lm.path = _LM_PATH.value
  config.model.lm.max_len = _MAX_LEN.value
  return config


def hidden_states(config, frozen_dtype: str, ids: np.ndarray,
                  mask: np.ndarray) -> tuple[list[np.ndarray], float]:
  """The embeddings' and every layer's output [N, L, D] of the LM with all
  its weights frozen in `frozen_dtype`, and the frozen weights' MiB."""
  lm, _ = lm_encoder.load_lm(config, rngs=nnx.Rngs(0))
  lm.eval()
  variables.retype(lm, variables.Frozen)
  quantize.quantize_frozen(lm, frozen_dtype)
  mib = sum(x.nbytes for x in jax.tree.leaves(nnx.state(lm, nnx.Param)))
  graphdef, state = nnx.split(lm)

  @jax.jit
  def run(state, ids, mask):
    model = nnx.merge(graphdef, state)
    hidden = model.embed(ids)
    out = [hidden]
    for i in range(len(model.layers)):
      hidden = model.run_layers(hidden, mask, i, i + 1)
      out.append(hidden)
    out[-1] = model.final_norm(hidden)
    return out

  outs = []
  for start in range(0, len(ids), 64):
    outs.append(run(state, jnp.asarray(ids[start:start + 64]),
                    jnp.asarray(mask[start:start + 64])))
  return ([np.concatenate([np.asarray(o[k], np.float32) for o in outs])
           for k in range(len(outs[0]))], mib / 2**20)


def _pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
  weights = mask[..., None].astype(np.float32)
  return (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1.0)


def hidden_state_errors(titles: list[str]) -> dict:
  config = _lm_config()
  texts = np.array([""] + titles, dtype=object)  # row 0: the padding item
  ids, mask = lm_encoder.tokenize_text(config, texts)
  ids, mask = ids[1:], mask[1:]
  reference, fp32_mib = hidden_states(config, "float32", ids, mask)
  real = mask.astype(bool)
  pooled_ref = _pooled(reference[-1], real)
  result = {"layers": {}, "pooled_cosine": {},
            "frozen_mib": {"float32": round(fp32_mib, 2)}}
  for dtype in ("bfloat16", "int8"):
    states, mib = hidden_states(config, dtype, ids, mask)
    result["frozen_mib"][dtype] = round(mib, 2)
    rows = []
    for k, (ours, ref) in enumerate(zip(states, reference)):
      diff = np.abs(ours - ref)[real]  # [tokens, D]
      rows.append({"layer": "embeddings" if k == 0 else f"layer {k - 1}",
                   "max_abs": float(diff.max()),
                   "mean_abs": float(diff.mean()),
                   "ref_mean_abs": float(np.abs(ref[real]).mean())})
    result["layers"][dtype] = rows
    pooled = _pooled(states[-1], real)
    cosine = (pooled * pooled_ref).sum(1) / (
        np.linalg.norm(pooled, axis=1) * np.linalg.norm(pooled_ref, axis=1))
    result["pooled_cosine"][dtype] = {"min": float(cosine.min()),
                                      "mean": float(cosine.mean())}
  return result


def print_errors(result: dict) -> None:
  header = (f"{'hidden state':<12}{'|ref| mean':>11}"
            f"{'bf16 max':>10}{'bf16 mean':>11}{'int8 max':>10}"
            f"{'int8 mean':>11}")
  print(header)
  print("-" * len(header))
  for bf, i8 in zip(result["layers"]["bfloat16"], result["layers"]["int8"]):
    print(f"{bf['layer']:<12}{bf['ref_mean_abs']:>11.4f}"
          f"{bf['max_abs']:>10.4f}{bf['mean_abs']:>11.5f}"
          f"{i8['max_abs']:>10.4f}{i8['mean_abs']:>11.5f}")
  cos = result["pooled_cosine"]
  print(f"mean-pooled last layer, cosine to float32: bf16 min "
        f"{cos['bfloat16']['min']:.6f} mean {cos['bfloat16']['mean']:.6f}; "
        f"int8 min {cos['int8']['min']:.6f} mean {cos['int8']['mean']:.6f}")
  mib = result["frozen_mib"]
  print("frozen weights: " + ", ".join(f"{k} {v:.1f} MiB"
                                       for k, v in mib.items()))


def goodreads_runs(data_dir: str) -> dict:
  from genre_jax import train  # pylint: disable=g-import-not-at-top
  results = {}
  for dtype in _DTYPES.value:
    config = config_lib.load_preset("bert_nrms", "goodreads")
    config.data.path = data_dir
    if _CACHE_DIR.value:
      config.data.data_dir = _CACHE_DIR.value
    config.model.lm.path = _LM_PATH.value
    config.model.lm.frozen_dtype = dtype
    config_lib.apply_overrides(config, _SET.value)
    workdir = os.path.join(_WORKDIR_ROOT.value, f"bert_nrms-{dtype}")
    logging.info("Training bert_nrms:goodreads, frozen_dtype=%s, in %s",
                 dtype, workdir)
    start = time.time()
    try:
      summary = train.train_and_evaluate(config, workdir)
    except (ConfigError, DataFormatError, FileNotFoundError) as e:
      raise app.UsageError(f"frozen_dtype={dtype}: {e}") from e
    results[dtype] = {
        "workdir": workdir,
        "test": {k: summary["test"]["all"][k] for k in METRICS},
        "dev_auc": summary["dev"]["all"]["auc"],
        "train_seconds": round(summary["train_seconds"], 1),
        "wall_seconds": round(time.time() - start, 1),
        "steps": summary["steps"],
    }
  return results


def print_goodreads(results: dict) -> None:
  header = (f"{'frozen_dtype':<14}" + "".join(f"{k:>8}" for k in METRICS)
            + f"{'dev AUC':>9}{'train s':>9}")
  print(header)
  print("-" * len(header))
  for dtype, r in results.items():
    print(f"{dtype:<14}" + "".join(f"{r['test'][k]:>8.4f}" for k in METRICS)
          + f"{r['dev_auc']:>9.4f}{r['train_seconds']:>9.0f}")


def main(argv: Sequence[str]) -> None:
  del argv
  quiet_library_logging()
  if _NUM_TITLES.value < 1:
    raise app.UsageError(f"--num_titles={_NUM_TITLES.value}: must be >= 1")
  bad = [d for d in _DTYPES.value if d not in quantize.FROZEN_DTYPES]
  if bad:
    raise app.UsageError(f"--dtypes: {bad} not in {quantize.FROZEN_DTYPES}")
  if _GOODREADS_AUC.value and not (_WORKDIR_ROOT.value and _DATA_DIR.value):
    raise app.UsageError("--goodreads_auc needs --workdir_root and "
                         "--data_dir")
  titles, source = read_titles(_DATA_DIR.value, _NUM_TITLES.value)
  out = {"titles": len(titles), "source": source}
  out.update(hidden_state_errors(titles))
  print(f"Hidden states vs float32 frozen weights: {len(titles)} titles "
        f"from {source}, max_len {_MAX_LEN.value}, real tokens only")
  print_errors(out)
  if _GOODREADS_AUC.value:
    data_dir = os.path.abspath(os.path.expanduser(_DATA_DIR.value))
    out["goodreads"] = goodreads_runs(data_dir)
    print(f"\nbert_nrms:goodreads test split ({_DATA_DIR.value})")
    print_goodreads(out["goodreads"])
  print(json_line(out))


if __name__ == "__main__":
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
