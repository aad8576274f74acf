"""The flags the experiment scripts share, each defined here once.

A script calls the definitions it uses (`_DATA_DIR = common_flags.data_dir()`)
and reads `.value` as from any absl flag holder; only a default, never the
meaning, differs between scripts. Python puts a script's own folder on
sys.path, so `import common_flags` works for any `python experiments/x.py`.

  --data_dir       the source dataset folder (MIND format, Goodreads layout:
                   news.tsv, train/ dev/ test/ behaviors.tsv, genre/*.jsonl).
  --cache_dir      where prepared (TFDS) datasets are cached:
                   config.data.data_dir.
  --presets        presets (files in configs/), comma-separated.
  --set            config overrides (repeatable).
  --workdir_root   one run workdir per run is created under it.
  --seed           the seed of the script's randomness.
  --seeds          the training seeds of a grid, one run each.
  --out_dir        where a grid's results and run records go.
  --finished_only  tabulate a grid's finished runs, train nothing.
  --wandb_mode     Weights & Biases logging of each run trained.
  --splits         the dataset splits to score.
  --cold_threshold users with at most this many history items are cold.
"""

from __future__ import annotations

import sys

from absl import flags

# The GENRE/ONCE Goodreads release, beside the repository (run from its root).
GOODREADS = "../shared/data/goodreads"

# Flags some scripts had under other names, for the error naming the new one.
RENAMED = {"data_cache": "cache_dir", "data_path": "data_dir",
           "preset": "presets"}


def parse(argv: list[str]) -> list[str]:
  """absl's flag parsing, for `app.run(..., flags_parser=common_flags.parse)`:
  an unknown, renamed or malformed flag ends with one line `error: ...` and
  exit status 2, as every other bad input does, not absl's two-line FATAL."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    old = getattr(e, "flagname", None)
    message = (f"--{old} is now --{RENAMED[old]} (one meaning in every "
               "script: experiments/common_flags.py)" if old in RENAMED
               else f"{e} (--helpshort lists the flags)")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def data_dir(default: str = GOODREADS,
             when_empty: str = "") -> flags.FlagHolder[str]:
  """--data_dir: the source dataset folder; `when_empty` says what a script
  reads instead when it is given empty (e.g. the synthetic demo data)."""
  return flags.DEFINE_string(
      "data_dir", default, "The source dataset folder (MIND format, "
      "Goodreads layout: news.tsv, train/dev/test/behaviors.tsv, "
      "genre/*.jsonl)" + (f"; empty: {when_empty}." if when_empty else "."))


def cache_dir(default: str = "",
              when_empty: str = "the preset's own") -> flags.FlagHolder[str]:
  """--cache_dir: where prepared (TFDS) datasets are cached, written to
  config.data.data_dir; empty keeps `when_empty`."""
  return flags.DEFINE_string(
      "cache_dir", default, "Where prepared (TFDS) datasets are cached "
      f"(config.data.data_dir); empty: {when_empty}.")


def presets(default: list[str]) -> flags.FlagHolder[list[str]]:
  """--presets: preset names (files in configs/), one run or row each."""
  return flags.DEFINE_list(
      "presets", default, "Presets (files in configs/), comma-separated.")


def overrides() -> flags.FlagHolder[list[str]]:
  """--set: config overrides applied to every config the script builds."""
  return flags.DEFINE_multi_string(
      "set", [], "Config overrides, repeatable, e.g. --set=train.epochs=2 "
      "(values parsed as Python literals); applied to every config the "
      "script builds, after its own settings.")


def workdir_root(default: str | None = None) -> flags.FlagHolder[str]:
  """--workdir_root: the folder under which each run gets its workdir;
  required when there is no default."""
  holder = flags.DEFINE_string(
      "workdir_root", default, "One workdir per run is created under it.")
  if default is None:
    flags.mark_flag_as_required("workdir_root")
  return holder


def seed(default: int = 0) -> flags.FlagHolder[int]:
  """--seed: the seed of everything random the script does."""
  return flags.DEFINE_integer(
      "seed", default, "The seed of the script's randomness "
      "(config.train.seed where a model is trained).")


def seeds(default: list[str]) -> flags.FlagHolder[list[str]]:
  """--seeds: the training seeds of a grid (config.train.seed), one run
  each; the script checks they are non-negative integers."""
  return flags.DEFINE_list("seeds", default, "Training seeds.")


def out_dir(default: str, when_empty: str = "") -> flags.FlagHolder[str]:
  """--out_dir: where a grid's results.md, results.json and run records
  (run_metrics/) go; `when_empty` says where they go when it is empty."""
  return flags.DEFINE_string(
      "out_dir", default, "Where results.md, results.json and the run records "
      "(run_metrics/) go" + (f"; empty: {when_empty}." if when_empty else "."))


def finished_only() -> flags.FlagHolder[bool]:
  """--finished_only: tabulate a grid's finished runs, train nothing."""
  return flags.DEFINE_bool(
      "finished_only", False, "Train nothing: tabulate the grid's finished "
      "runs (a cell shows how many seeds it has; empty cells are left out).")


def wandb_mode() -> flags.FlagHolder[str]:
  """--wandb_mode: Weights & Biases logging of each run a script trains
  (train_and_evaluate's wandb_mode)."""
  return flags.DEFINE_enum(
      "wandb_mode", "disabled", ["disabled", "offline", "online"],
      "Weights & Biases logging of each run trained (disabled: no network, "
      "no files).")


def splits(default: list[str]) -> flags.FlagHolder[list[str]]:
  """--splits: the dataset splits a script scores."""
  return flags.DEFINE_list("splits", default, "Splits to score.")


def cold_threshold(default: int = 5) -> flags.FlagHolder[int]:
  """--cold_threshold: who counts as a cold user in the metrics."""
  return flags.DEFINE_integer(
      "cold_threshold", default,
      "Users with at most this many history items are cold.")
