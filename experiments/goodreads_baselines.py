r"""Trains presets on the GENRE/ONCE Goodreads benchmark and tabulates them.

Each preset is trained with its `:goodreads` settings (see the preset's
docstring for which are data-specific) in its own workdir under
--workdir_root, so every run can be inspected or re-evaluated later with
`python run.py --mode=eval --workdir=DIR/<preset>`. A preset whose workdir
already holds a finished run is resumed (nothing is retrained).

  python experiments/goodreads_baselines.py \
      --data_dir=../shared/data/goodreads --presets=nrms,naml \
      --workdir_root=/tmp/goodreads_baselines

--permute_titles trains on a copy of the release in which every book carries
the title of another (one fixed random permutation, --seed): the titles then
say nothing about the books, only which book is which, so what a model still
learns is item identity (collaborative signal), not content.

Reference (the issue's plain PyTorch runs): TF-IDF 0.571, mean-pooled MiniLM
0.640, NRMS 0.754 (5 epochs), NAML 0.764 (8 epochs) test AUC.

Prints a table (test AUC, MRR, nDCG@5, nDCG@10 on all and on cold users,
any further test metrics --set=eval.metrics=... names, wall time,
samples/s; a finished workdir is re-evaluated with those metrics, not
retrained) and ends with one line of JSON:
{preset: {"workdir", "test", "test_cold", "test_unseen_items" (impressions
whose clicked item never appears in training), "dev", "train_seconds",
"wall_seconds", "samples_per_s", "steps"}}.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from genre_jax import config as config_lib
from genre_jax import train
from genre_jax import workdir as workdir_lib
from genre_jax.errors import (
    ConfigError, DataFormatError, exit_on_input_error)
from genre_jax.logs import json_line, quiet_library_logging

import common_flags

_DATA_DIR = common_flags.data_dir()
_PRESETS = common_flags.presets(["nrms", "naml"])
_WORKDIR_ROOT = common_flags.workdir_root()
_CACHE_DIR = common_flags.cache_dir()
_SEED = common_flags.seed()
_SET = common_flags.overrides()
_PERMUTE_TITLES = flags.DEFINE_bool(
    "permute_titles", False, "Train on a copy of the data whose titles are "
    "permuted among the items (written once under --workdir_root).")

METRICS = ("auc", "mrr", "ndcg5", "ndcg10")


# news.tsv columns: id, category, subcategory, title, ...
_TITLE_COLUMN = 3


def permuted_titles_copy(source: str, target: str, seed: int) -> str:
  """A MIND-format folder at `target` whose news.tsv gives every item the
  title of another (a seeded permutation); the split folders are links to
  `source`'s. Written once (atomically): a later call finds it and leaves it,
  so the prepared dataset and finished runs stay valid; a copy made from
  another `source` (its split links lead elsewhere) is an error, never
  trained on in this one's name. Returns target."""
  news = os.path.join(target, "news.tsv")
  if os.path.isfile(news):
    for split in ("train", "dev", "test"):
      link, own = os.path.join(target, split), os.path.join(source, split)
      if os.path.isdir(own) and (not os.path.lexists(link) or
                                 os.path.realpath(link) !=
                                 os.path.realpath(own)):
        raise app.UsageError(
            f"{target} holds titles permuted from another dataset (its "
            f"'{split}' is not {own}); use another --workdir_root")
    return target
  with open(os.path.join(source, "news.tsv"), encoding="utf-8",
            newline="") as f:
    rows = [line.rstrip("\r\n").split("\t") for line in f if line.strip()]
  short = [n for n, row in enumerate(rows, 1) if len(row) <= _TITLE_COLUMN]
  if short:
    raise app.UsageError(f"{source}/news.tsv:{short[0]}: field 'title': "
                         "missing (the row has too few columns)")
  order = np.random.default_rng(seed).permutation(len(rows))
  titles = [rows[k][_TITLE_COLUMN] for k in order]
  for row, title in zip(rows, titles):
    row[_TITLE_COLUMN] = title
  os.makedirs(target, exist_ok=True)
  for split in ("train", "dev", "test"):
    link = os.path.join(target, split)
    if os.path.isdir(os.path.join(source, split)) and not os.path.lexists(link):
      os.symlink(os.path.join(source, split), link)
  workdir_lib.atomic_write_text(
      news, "".join("\t".join(r) + "\n" for r in rows))
  return target


def extra_metrics(results: dict[str, dict]) -> list[str]:
  """Test metrics beyond METRICS (--set=eval.metrics=...), in order."""
  names = []
  for r in results.values():
    for key in r["test"]:
      if key not in METRICS and not key.startswith("num_") and (
          key not in names):
        names.append(key)
  return names


def table(results: dict[str, dict]) -> str:
  extra = extra_metrics(results)
  header = (f"{'preset':<12}{'AUC':>7}{'MRR':>7}{'nDCG5':>7}{'nDCG10':>7}"
            + "".join(f"{k:>{max(8, len(k) + 1)}}" for k in extra) +
            f"{'coldAUC':>8}{'coldMRR':>8}{'coldN5':>7}{'coldN10':>8}"
            f"{'newAUC':>8}{'newMRR':>8}"
            f"{'train s':>9}{'wall s':>8}{'smp/s':>7}")
  lines = [header, "-" * len(header)]
  for name, r in results.items():
    t, c = r["test"], r["test_cold"]
    # Impressions whose clicked item is unseen in training (cold items).
    u = r.get("test_unseen_items") or {"auc": float("nan"),
                                       "mrr": float("nan")}
    lines.append(
        f"{name:<12}" + "".join(f"{t[k]:>7.4f}" for k in METRICS) +
        "".join(f"{t.get(k, float('nan')):>{max(8, len(k) + 1)}.4f}"
                for k in extra) +
        f"{c['auc']:>8.4f}{c['mrr']:>8.4f}{c['ndcg5']:>7.4f}"
        f"{c['ndcg10']:>8.4f}{u['auc']:>8.4f}{u['mrr']:>8.4f}"
        f"{r['train_seconds']:>9.0f}"
        f"{r['wall_seconds']:>8.0f}{r['samples_per_s']:>7.0f}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  quiet_library_logging()
  data_dir = os.path.abspath(os.path.expanduser(_DATA_DIR.value))
  if not os.path.isfile(os.path.join(data_dir, "news.tsv")):
    raise app.UsageError(f"--data_dir={data_dir} holds no news.tsv")
  # Paths are printed as given (the table is what a results folder keeps).
  shown_data = _DATA_DIR.value
  if _PERMUTE_TITLES.value:
    copy_name = f"permuted_titles_data_s{_SEED.value}"
    data_dir = permuted_titles_copy(
        data_dir, os.path.join(os.path.abspath(_WORKDIR_ROOT.value),
                               copy_name), _SEED.value)
    shown_data = os.path.join(_WORKDIR_ROOT.value, copy_name)
  results = {}
  for name in _PRESETS.value:
    config = config_lib.load_preset(name, "goodreads")
    config.data.path = data_dir
    if _CACHE_DIR.value:
      config.data.data_dir = _CACHE_DIR.value
    config.train.seed = _SEED.value
    config_lib.apply_overrides(config, _SET.value)
    workdir = os.path.join(_WORKDIR_ROOT.value, name)
    logging.info("Training %s in %s", name, workdir)
    start = time.time()
    try:
      summary = train.train_and_evaluate(config, workdir)
    except (ConfigError, DataFormatError, FileNotFoundError) as e:
      raise app.UsageError(f"{name}: {e}") from e  # bad input: no traceback
    results[name] = {
        "workdir": workdir,  # as given: no machine's folders in a table
        "test": summary["test"]["all"],
        "test_cold": summary["test"]["cold"],
        "test_unseen_items": summary["test"].get("unseen_items"),
        "dev": summary["dev"]["all"],
        "train_seconds": round(summary["train_seconds"], 1),
        "wall_seconds": round(time.time() - start, 1),
        "samples_per_s": round(summary["samples_per_s"], 1),
        "steps": summary["steps"],
    }
  print(f"Goodreads test split ({shown_data}"
        + (", titles permuted among the books" if _PERMUTE_TITLES.value
           else "") + ")")
  print(table(results))
  print(json_line(results))


if __name__ == "__main__":
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
