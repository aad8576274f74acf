r"""Any grid of presets x named override sets x seeds, trained and tabulated.

  python experiments/sweep.py --dataset=goodreads \
      --data_dir=../shared/data/goodreads --workdir_root=/tmp/sweep \
      --presets=nrms,naml --seeds=0,1,2 --baseline=plain \
      --grid='summary=data.genre.summarizer=release,data.genre.summary_field=title;plain='
  python experiments/sweep.py --spec=my_grid.py --workdir_root=/tmp/sweep

The grid. A cell is a preset with one named set of config overrides, named
"<preset>/<set>" (nrms/summary); each cell runs once per seed. The grid is
given by flags, by a grid-spec module, or both:

  --presets      presets (configs/*.py), a row of cells each.
  --grid         the override sets, `name=key=value,key=value;name2=...`
                 (`plain=`: the preset as it is). Commas and semicolons
                 inside brackets or quotes do not split, so
                 data.fields=('title','summary') is one override. Without
                 --grid (or a spec's sets) each preset runs as it is, in one
                 set named `base`.
  --seeds        config.train.seed of each run.
  --dataset      the presets' dataset settings (configs/X.py:ARG): empty for
                 the synthetic demo data, goodreads or mind; --data_dir and
                 --cache_dir say where the data and its prepared cache lie.
  --metrics      what the table shows, each a dotted path into a run's
                 final_metrics.json (test.all.auc, dev.cold.mrr,
                 train_seconds) or a short name: X is test.all.X, cold_X is
                 test.cold.X, dev_X is dev.all.X.
  --baseline     the cells every cell is compared with, paired by seed: an
                 override set's name (each preset's cells against that
                 preset's cell of the set) or a cell's name, preset/set
                 (every cell against that one). Several, comma-separated:
                 each gets a table of changes; the first also fills the main
                 table's last column (the first metric's change).
  --set          overrides applied to every run after its set's; runs with
                 --set get their own workdirs (see Runs).
  --spec=FILE    a Python file defining GRID: a dict (or a sweep.Grid) with
                 the keys presets, overrides (an ordered dict: set name ->
                 list of "key=value"), seeds, and optionally dataset,
                 metrics, baselines, common (overrides applied to every run
                 after its set's, as --set), finalize (a function called
                 with every run's config after all overrides), digest_of
                 (what the run names' digest covers; default: common),
                 title (the table's heading). Flags given on the command
                 line replace the spec's value; --set adds to its `common`.
                 E.g.:

                   GRID = {"presets": ["nrms", "naml"],
                           "overrides": {"plain": [], "summary": [
                               "data.genre.summarizer=release",
                               "data.genre.summary_field=title"]},
                           "seeds": [0, 1, 2], "dataset": "goodreads",
                           "metrics": ["auc", "cold_auc"],
                           "baselines": ["plain"]}

                 experiments/genre_goodreads.py is such a grid (a sweep.Grid
                 of models x data variants x seeds) with its own tables.

Runs. Each run has its workdir, --workdir_root/<preset>-<set>-s<seed>, with
-<digest> of the --set overrides (a spec's `common`) appended when there are
some. A workdir whose config.json is of another config (another definition
of the set, dataset or --set) is an error naming the differing field, never
reused as this run; a finished one (final_metrics.json) is read back, not
retrained; an interrupted one resumes from its last checkpoint. Each
finished run leaves a record, --out_dir/run_metrics/<run>.json: {"run",
"config", "final_metrics"}, with no machine path in it: the data and cache
folders (data.path, data.data_dir) are left out and any other absolute path
is written relative to the repository, or as <elsewhere>/<file name> outside
it. A record stands in for its workdir: with the workdirs deleted (or on
another machine) the same command tabulates the runs without training them;
--finished_only trains nothing.

The table. For each cell, the mean ± sample sd over its finished seeds of
each metric (one seed: no spread, null in the JSON; an undefined figure,
null in final_metrics.json, e.g. a split without cold users, is left out).
A change over a baseline is paired by seed: the mean, over the seeds both
cells finished, of the per-seed differences of the values rounded to 5
decimals (the JSON's per_seed figures). results.md and results.json go to
--out_dir (default: --workdir_root), rewritten after every run trained
(marked in progress until the grid has finished). Prints the table and ends
with one line of JSON: {"cells": [{cell, preset, set, n_seeds, seeds,
metrics: {name: [mean, sd]}, train_seconds, per_seed: {seed: {name:
value}}}, ...], "gains": {baseline: {cell: {over, metric: mean change...,
seeds, per_seed_<metric>: [...]}}}, "metrics": {name: path}, "sets": {name:
[override, ...]}, "presets", "seeds", "dataset", "common", "grid_complete"}.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import time
import types
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections

from genre_jax import config as config_lib
from genre_jax.errors import ConfigError, DataFormatError, exit_on_input_error
from genre_jax.logs import json_line, quiet_library_logging, strict_json
from genre_jax import workdir as workdir_lib

import common_flags

# The repository, above experiments/: records write paths inside it
# relative to it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_METRICS = ("auc", "mrr", "ndcg5", "ndcg10", "cold_auc")
# final_metrics.json's figures outside the dev and test splits.
_TOP_LEVEL = ("best_step", "steps", "updates", "train_seconds",
              "samples_per_s")
_NAME = re.compile(r"[\w.]+")


@dataclasses.dataclass
class Grid:
  """A grid: every preset with every override set, once per seed."""
  presets: list[str]
  # Set name -> "key=value" overrides, in the table's order.
  overrides: dict[str, list[str]] = dataclasses.field(
      default_factory=lambda: {"base": []})
  seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
  # The presets' dataset argument: "" (synthetic demo), goodreads, mind.
  dataset: str = ""
  metrics: list[str] = dataclasses.field(
      default_factory=lambda: list(DEFAULT_METRICS))
  baselines: list[str] = dataclasses.field(default_factory=list)
  # Overrides applied to every run after its set's (--set).
  common: list[str] = dataclasses.field(default_factory=list)
  # Called with every run's config after all overrides.
  finalize: Callable[[ml_collections.ConfigDict], None] | None = None
  # What the run names' digest covers (None: `common`).
  digest_of: list[str] | None = None
  title: str = "Sweep"

  def cells(self) -> list[tuple[str, str]]:
    return [(p, s) for p in self.presets for s in self.overrides]

  def runs(self) -> list[tuple[str, str, int]]:
    return [(p, s, seed) for p, s in self.cells() for seed in self.seeds]

  def run_name(self, preset: str, set_name: str, seed: int) -> str:
    return run_name(preset, set_name, seed,
                    self.common if self.digest_of is None else self.digest_of)


def cell_name(preset: str, set_name: str) -> str:
  return f"{preset}/{set_name}"


def run_name(preset: str, set_name: str, seed: int,
             settings: Sequence[str] = ()) -> str:
  """A run's workdir (and record) name: <preset>-<set>-s<seed>, and the
  digest of `settings` (e.g. --set overrides) when there are some, so that
  runs made with other settings get workdirs of their own."""
  name = f"{preset}-{set_name}-s{seed}"
  if settings:
    digest = hashlib.sha256("\n".join(settings).encode()).hexdigest()[:8]
    name += f"-{digest}"
  return name


# --- The grid: flags and spec modules ----------------------------------------

def split_top_level(text: str, separator: str) -> list[str]:
  """`text` split at `separator` outside brackets and quotes, each part
  stripped, empty parts dropped."""
  parts, current, depth, quote = [], [], 0, ""
  for char in text:
    if quote:
      quote = "" if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth = max(depth - 1, 0)
    elif char == separator and depth == 0:
      parts.append("".join(current))
      current = []
      continue
    current.append(char)
  parts.append("".join(current))
  return [p.strip() for p in parts if p.strip()]


def parse_grid(text: str) -> dict[str, list[str]]:
  """--grid's `name=key=value,key=value;name2=` as {name: overrides}."""
  sets: dict[str, list[str]] = {}
  for item in split_top_level(text, ";"):
    name, sep, overrides = item.partition("=")
    name = name.strip()
    if not sep or not _NAME.fullmatch(name):
      raise app.UsageError(
          f"--grid: '{item}': expected name=key=value,... (a name of "
          "letters, digits, _ and ., e.g. plain= or "
          "long=train.epochs=5,train.lr=0.001)")
    if name in sets:
      raise app.UsageError(f"--grid: the set '{name}' is given twice")
    sets[name] = split_top_level(overrides, ",")
  if not sets:
    raise app.UsageError(f"--grid='{text}': no override set")
  return sets


def parse_seeds(values: Sequence[str]) -> list[int]:
  if not values or not all(str(s).strip().isdigit() for s in values):
    raise app.UsageError(f"--seeds={','.join(map(str, values))}: give "
                         "non-negative integers, e.g. --seeds=0,1,2")
  return [int(s) for s in values]


def load_spec(path: str) -> Grid:
  """The GRID of the Python file at `path`, checked."""
  if not os.path.isfile(path):
    raise app.UsageError(f"--spec={path}: no such file")
  # A spec may `import sweep` (for sweep.Grid): this module, not a copy.
  sys.modules.setdefault("sweep", sys.modules[__name__])
  spec = importlib.util.spec_from_file_location("sweep_spec", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise app.UsageError(f"--spec={path}: {type(e).__name__}: {e}") from e
  if not hasattr(module, "GRID"):
    raise app.UsageError(f"--spec={path}: defines no GRID")
  return grid_from(module.GRID, f"--spec={path}: GRID")


def grid_from(value: Any, where: str = "GRID") -> Grid:
  """A Grid from a dict of its fields (or a Grid of another copy of this
  module), checked: unknown keys and wrong types are errors naming them."""
  names = [f.name for f in dataclasses.fields(Grid)]
  if isinstance(value, Mapping):
    fields = dict(value)
  elif dataclasses.is_dataclass(value):
    fields = {n: getattr(value, n) for n in names if hasattr(value, n)}
  else:
    raise app.UsageError(f"{where}: expected a dict, not "
                         f"{type(value).__name__}")
  unknown = sorted(set(fields) - set(names))
  if unknown:
    raise app.UsageError(f"{where}: unknown keys {unknown}; known: {names}")
  if "presets" not in fields:
    raise app.UsageError(f"{where}: no presets")
  grid = Grid(**fields)
  check_grid(grid, where)
  return grid


def check_grid(grid: Grid, where: str = "the grid") -> None:
  """Raises UsageError where the grid cannot run as asked."""
  def strings(value, what):
    if (isinstance(value, str) or not isinstance(value, Sequence)
        or not all(isinstance(v, str) for v in value)):
      raise app.UsageError(f"{where}: {what} must be a list of strings")

  strings(grid.presets, "presets")
  if not grid.presets:
    raise app.UsageError(f"{where}: no presets (--presets or a spec's)")
  bad = [p for p in grid.presets if not _NAME.fullmatch(p)]
  if bad or len(set(grid.presets)) < len(grid.presets):
    raise app.UsageError(f"{where}: presets {list(grid.presets)}: names of "
                         "letters, digits, _ and ., each once")
  if not isinstance(grid.overrides, Mapping) or not grid.overrides:
    raise app.UsageError(f"{where}: overrides must be a dict, set name -> "
                         "list of key=value")
  for name, overrides in grid.overrides.items():
    if not isinstance(name, str) or not _NAME.fullmatch(name):
      raise app.UsageError(f"{where}: override set name {name!r}: letters, "
                           "digits, _ and . only")
    strings(overrides, f"overrides['{name}']")
  if (not isinstance(grid.seeds, Sequence) or not grid.seeds or not all(
      isinstance(s, int) and not isinstance(s, bool) and s >= 0
      for s in grid.seeds)) or len(set(grid.seeds)) < len(grid.seeds):
    raise app.UsageError(f"{where}: seeds must be distinct non-negative "
                         "integers")
  if not isinstance(grid.dataset, str):
    raise app.UsageError(f"{where}: dataset must be a string")
  strings(grid.metrics, "metrics")
  if not grid.metrics:
    raise app.UsageError(f"{where}: no metrics")
  for name in grid.metrics:
    metric_path(name)
  strings(grid.baselines, "baselines")
  strings(grid.common, "common")
  for baseline in grid.baselines:
    if baseline not in grid.overrides and baseline not in [
        cell_name(*c) for c in grid.cells()]:
      raise app.UsageError(
          f"--baseline={baseline}: not an override set ({list(grid.overrides)}"
          ") or a cell (preset/set) of this grid")
  if grid.finalize is not None and not callable(grid.finalize):
    raise app.UsageError(f"{where}: finalize must be a function")


def metric_path(name: str) -> str:
  """The dotted path into final_metrics.json that a metric name reads."""
  if "." in name:
    path = name
  elif name in _TOP_LEVEL:
    path = name
  elif name.startswith("cold_"):
    path = f"test.cold.{name[len('cold_'):]}"
  elif name.startswith("dev_"):
    path = f"dev.all.{name[len('dev_'):]}"
  else:
    path = f"test.all.{name}"
  parts = path.split(".")
  if not (path in _TOP_LEVEL or (
      len(parts) == 3 and parts[0] in ("dev", "test")
      and parts[1] in ("all", "cold") and re.fullmatch(r"\w+", parts[2]))):
    raise app.UsageError(
        f"--metrics: '{name}' reads {path}, not a figure of "
        f"final_metrics.json: give dev|test.all|cold.<metric>, one of "
        f"{list(_TOP_LEVEL)}, or X, cold_X, dev_X")
  return path


# --- One run -----------------------------------------------------------------

def cell_config(grid: Grid, preset: str, set_name: str, seed: int,
                data_dir: str = "", cache_dir: str = ""
                ) -> ml_collections.ConfigDict:
  """The config of one run: the preset with the grid's dataset settings,
  where the data (data_dir) and its cache (cache_dir) lie when given, the
  seed, the set's overrides, the grid's common ones, then finalize."""
  config = config_lib.load_preset(preset, grid.dataset)
  if data_dir:
    config.data.path = os.path.abspath(os.path.expanduser(data_dir))
  if cache_dir:
    config.data.data_dir = cache_dir
  config.train.seed = seed
  config_lib.apply_overrides(config, grid.overrides[set_name])
  config_lib.apply_overrides(config, grid.common)
  if grid.finalize is not None:
    grid.finalize(config)
  return config


def _portable(value: Any) -> Any:
  """`value` with every absolute path relative to the repository (inside
  it) or <elsewhere>/<file name> (outside it)."""
  if isinstance(value, dict):
    return {k: _portable(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_portable(v) for v in value]
  if isinstance(value, str) and value.startswith(("/", "~")):
    path = os.path.abspath(os.path.expanduser(value))
    if path == ROOT or path.startswith(ROOT + os.sep):
      return os.path.relpath(path, ROOT)
    return f"<elsewhere>/{os.path.basename(path.rstrip(os.sep))}"
  return value


def record_config(config: ml_collections.ConfigDict) -> dict:
  """The run's config as its record keeps it: without where its data and
  prepared cache lay (workdir.LOCATION_KEYS), which is not what the run was
  (never compared), and with any other absolute path made portable
  (_portable): no machine's folders in a results folder."""
  saved = json.loads(config.to_json_best_effort())
  for key in workdir_lib.LOCATION_KEYS:
    *parents, leaf = key.split(".")
    node = saved
    for part in parents:
      node = node.get(part, {})
    node.pop(leaf, None)
  return _portable(saved)


def write_record(path: str, name: str, config: ml_collections.ConfigDict,
                 final: dict) -> None:
  """The run's record (config and final metrics) at `path`."""
  workdir_lib.atomic_write_text(path, strict_json(
      {"run": name, "config": record_config(config), "final_metrics": final},
      indent=2))


_MISSING = object()


def figure(final: Mapping, path: str) -> Any:
  """The value at the dotted `path` of final metrics (_MISSING if none)."""
  value: Any = final
  for part in path.split("."):
    value = value.get(part, _MISSING) if isinstance(value, Mapping) else (
        _MISSING)
  return value


def number(value: Any) -> float | None:
  """A figure as a float; None for an undefined one (null, NaN)."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return None
  return float(value)


def check_figures(where: str, final: Any, required: Sequence[str],
                  nullable: bool = False) -> None:
  """Raises UsageError unless every `required` figure of `final` is a
  number (or null, when `nullable`)."""
  for path in required:
    value = figure(final, path)
    if value is None and nullable:
      continue
    if not isinstance(value, (int, float)) or isinstance(value, bool):
      raise app.UsageError(f"{where}: final_metrics.{path} is missing or "
                           "not a number")


def read_record(path: str, config: ml_collections.ConfigDict,
                required: Sequence[str] = (), nullable: bool = False) -> dict:
  """The final metrics the run record at `path` holds, once its config is
  `config` and it has every `required` figure."""
  with open(path, encoding="utf-8") as f:
    try:
      record = json.load(f)
    except json.JSONDecodeError as e:
      raise app.UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg})"
                           ) from e
  missing = [k for k in ("config", "final_metrics")
             if not isinstance(record, dict) or not isinstance(record.get(k),
                                                               dict)]
  if missing:
    raise app.UsageError(f"{path}: not a run record (no {' or '.join(missing)}"
                         " object)")
  final = record["final_metrics"]
  check_figures(path, final, required, nullable)
  workdir_lib.check_same_config(
      path, record["config"], ml_collections.ConfigDict(record_config(config)))
  return final


def workdir_config(workdir: str) -> dict:
  """The config.json of a workdir, as a dict."""
  try:
    return json.loads(workdir_lib.load_config(workdir).to_json_best_effort())
  except ConfigError as e:  # unreadable config.json: say where, no traceback
    raise app.UsageError(str(e)) from e


def run_cell(name: str, config: ml_collections.ConfigDict, workdir: str,
             record: str, *, train: bool = True,
             wandb_mode: str = "disabled", required: Sequence[str] = (),
             nullable: bool = False, description: str = "") -> dict | None:
  """One run's final metrics: read back from its finished workdir (writing
  its record at `record` if it has none or another), else from its record,
  else trained (resuming the workdir's checkpoint if it has one) unless not
  `train` (then None). A workdir or record of another config is an error."""
  config_path = os.path.join(workdir, "config.json")
  if os.path.isfile(config_path):
    workdir_lib.check_same_config(config_path, workdir_config(workdir),
                                  config)
  final = os.path.join(workdir, "final_metrics.json")
  if os.path.isfile(final):
    with open(final, encoding="utf-8") as f:
      logging.info("Reusing the finished run %s", workdir)
      try:
        result = json.load(f)
      except json.JSONDecodeError as e:
        raise app.UsageError(f"{final}:{e.lineno}: not valid JSON ({e.msg})"
                             ) from e
    # Recorded once: re-tabulating leaves an up-to-date record untouched.
    if not os.path.isfile(record) or read_record(
        record, config, required, nullable) != result:
      write_record(record, name, config, result)
    return result
  if os.path.isfile(record):
    logging.info("Reusing the record of a finished run %s", record)
    return read_record(record, config, required, nullable)
  if not train:
    return None
  logging.info("Training %s in %s", description or name, workdir)
  # Imported here: tabulating finished runs needs no JAX.
  # pylint: disable-next=g-import-not-at-top
  from genre_jax import train as train_lib
  try:
    result = train_lib.train_and_evaluate(config, workdir,
                                          wandb_mode=wandb_mode)
  except (ConfigError, DataFormatError, FileNotFoundError) as e:
    raise app.UsageError(f"{name}: {e}") from e  # bad input: no traceback
  write_record(record, name, config, result)
  return result


# --- Tables ------------------------------------------------------------------

def mean_sd(values: Sequence[float]) -> list[float | None]:
  """[mean, sample sd], rounded to 5 decimals; the sd is None for one value
  (no spread measured), both for none."""
  if not values:
    return [None, None]
  mean = statistics.fmean(values)
  std = round(statistics.stdev(values), 5) if len(values) > 1 else None
  return [round(mean, 5), std]


def _round(value: float | None) -> float | None:
  return None if value is None else round(value, 5)


def summarize_cell(by_seed: Mapping[int, dict], metrics: Mapping[str, str]
                   ) -> dict:
  """A cell's runs (seed -> final metrics) summarized: its seeds, the mean
  and sd of each metric (name -> path) over them, the mean training time,
  and each seed's figures rounded to 5 decimals."""
  seeds = sorted(by_seed)
  values = {name: [number(figure(by_seed[s], path)) for s in seeds]
            for name, path in metrics.items()}
  return {
      "n_seeds": len(seeds), "seeds": seeds,
      "metrics": {name: mean_sd([v for v in vs if v is not None])
                  for name, vs in values.items()},
      "train_seconds": round(statistics.fmean(
          by_seed[s]["train_seconds"] for s in seeds), 1),
      "per_seed": {str(s): {name: _round(values[name][k]) for name in metrics}
                   for k, s in enumerate(seeds)},
  }


def paired_gains(cell: Mapping[str, Mapping[str, float | None]],
                 base: Mapping[str, Mapping[str, float | None]],
                 keys: Sequence[str]) -> dict | None:
  """The change of `cell` over `base` (each seed -> {key: figure}), paired
  by seed: for each key the mean over the seeds both have of the per-seed
  differences, then "seeds" and each key's per-seed differences
  ("per_seed_<key>"); None when they share no seed. A difference with an
  undefined figure is None, left out of the mean."""
  seeds = [s for s in cell if s in base]
  if not seeds:
    return None
  change = {key: [None if cell[s][key] is None or base[s][key] is None
                  else cell[s][key] - base[s][key] for s in seeds]
            for key in keys}
  means = {}
  for key, values in change.items():
    defined = [v for v in values if v is not None]
    means[key] = round(statistics.fmean(defined), 5) if defined else None
  return means | {"seeds": [int(s) for s in seeds]} | {
      f"per_seed_{key}": [_round(v) for v in values]
      for key, values in change.items()}


def baseline_of(baseline: str, preset: str, set_name: str
                ) -> tuple[str, str] | None:
  """The cell (preset, set) that the cell (preset, set_name) is compared
  with under `baseline` (a set name or a cell name); None for itself."""
  if "/" in baseline:
    base = tuple(baseline.split("/", 1))
  else:
    base = (preset, baseline)
  return None if base == (preset, set_name) else base


def gains_over(cells: Sequence[dict], baseline: str, metrics: Sequence[str]
               ) -> dict[str, dict]:
  """cell name -> its change over `baseline` (paired_gains, with "over",
  the baseline cell), for every cell with a baseline cell and shared seeds."""
  by_name = {c["cell"]: c for c in cells}
  out = {}
  for c in cells:
    base = baseline_of(baseline, c["preset"], c["set"])
    if base is None or cell_name(*base) not in by_name:
      continue
    gain = paired_gains(c["per_seed"], by_name[cell_name(*base)]["per_seed"],
                        metrics)
    if gain is not None:
      out[c["cell"]] = {"over": cell_name(*base)} | gain
  return out


def _pair(pair: Sequence[float | None]) -> str:
  if pair[0] is None:
    return "n/a"
  return f"{pair[0]:.4f}" + ("" if pair[1] is None else f" ± {pair[1]:.4f}")


def _signed(value: float | None) -> str:
  return "n/a" if value is None else f"{value:+.4f}"


def markdown(grid: Grid, result: dict, header: str) -> str:
  """The results table, a table of changes per baseline, and the sets."""
  metrics = list(result["metrics"])
  first = grid.baselines[0] if grid.baselines else None
  lines = [header, "",
           "| cell | seeds | " + " | ".join(metrics) + " | train s |"
           + (f" {metrics[0]} change over {first} |" if first else ""),
           "|---|---:|" + "---|" * len(metrics) + "---:|"
           + ("---|" if first else "")]
  for c in result["cells"]:
    row = (f"| {c['cell']} | {c['n_seeds']} | "
           + " | ".join(_pair(c["metrics"][m]) for m in metrics)
           + f" | {c['train_seconds']:.0f} |")
    if first:
      g = result["gains"][first].get(c["cell"])
      row += ("" if g is None else
              f" {_signed(g[metrics[0]])} (seeds "
              f"{','.join(map(str, g['seeds']))})") + " |"
    lines.append(row)
  for baseline, by_cell in result["gains"].items():
    lines += ["", f"Change over `{baseline}`, paired by seed (the mean of the "
              "per-seed differences; each seed's in brackets):", "",
              "| cell | over | seeds | " + " | ".join(metrics) + " |",
              "|---|---|---|" + "---|" * len(metrics)]
    for name, g in by_cell.items():
      lines.append(
          f"| {name} | {g['over']} | {','.join(map(str, g['seeds']))} | "
          + " | ".join(f"{_signed(g[m])} ("
                       + ", ".join(map(_signed, g[f"per_seed_{m}"])) + ")"
                       for m in metrics) + " |")
  lines += ["", "Override sets: " + "; ".join(
      f"`{name}`: " + (" ".join(ov) if ov else "(none)")
      for name, ov in result["sets"].items())]
  return "\n".join(lines) + "\n"


def tabulate(grid: Grid, results: Mapping[tuple[str, str, int], dict | None],
             header: str) -> tuple[str, dict]:
  """The markdown table and the JSON result of the finished runs among
  `results` ((preset, set, seed) -> final metrics or None)."""
  metrics = {name: metric_path(name) for name in grid.metrics}
  cells = []
  for preset, set_name in grid.cells():
    by_seed = {seed: results[(preset, set_name, seed)] for seed in grid.seeds
               if results.get((preset, set_name, seed)) is not None}
    if by_seed:
      cells.append({"cell": cell_name(preset, set_name), "preset": preset,
                    "set": set_name} | summarize_cell(by_seed, metrics))
  result = {
      "cells": cells,
      "gains": {b: gains_over(cells, b, list(metrics))
                for b in grid.baselines},
      "metrics": metrics,
      "sets": {name: list(ov) for name, ov in grid.overrides.items()},
      "presets": list(grid.presets), "seeds": list(grid.seeds),
      "dataset": grid.dataset or "synthetic", "common": list(grid.common),
      "grid_complete": all(results.get(run) is not None
                           for run in grid.runs()),
  }
  return markdown(grid, result, header), result


def run_grid(grid: Grid, *, workdir_root: str, out_dir: str,
             data_dir: str = "", cache_dir: str = "", train: bool = True,
             wandb_mode: str = "disabled",
             after_new_run: Callable[[dict], None] | None = None
             ) -> dict[tuple[str, str, int], dict | None]:
  """Every run of the grid, trained or read back (run_cell): (preset, set,
  seed) -> final metrics, None for a run not finished (train=False). Every
  config is built first, so a bad preset or override fails before any
  training; `after_new_run(results so far)` follows each run newly recorded
  (but the last), e.g. to show the grid's progress."""
  configs = {}
  for preset, set_name, seed in grid.runs():
    try:
      configs[preset, set_name, seed] = cell_config(
          grid, preset, set_name, seed, data_dir, cache_dir)
    except ConfigError as e:
      raise app.UsageError(f"{cell_name(preset, set_name)}: {e}") from e
  runs = grid.runs()
  required = [metric_path(m) for m in grid.metrics] + ["train_seconds"]

  def record_of(run):
    return os.path.join(out_dir, "run_metrics", f"{grid.run_name(*run)}.json")

  # A workdir or record of another config stops the grid before anything
  # is trained.
  for run in runs:
    workdir = os.path.join(workdir_root, grid.run_name(*run))
    if os.path.isfile(os.path.join(workdir, "config.json")):
      workdir_lib.check_same_config(os.path.join(workdir, "config.json"),
                                    workdir_config(workdir), configs[run])
    if os.path.isfile(record_of(run)):
      read_record(record_of(run), configs[run], required, nullable=True)
  results: dict[tuple[str, str, int], dict | None] = {}
  for index, run in enumerate(runs):
    name = grid.run_name(*run)
    record = record_of(run)
    recorded = os.path.isfile(record)
    results[run] = run_cell(
        name, configs[run], os.path.join(workdir_root, name), record,
        train=train, wandb_mode=wandb_mode, required=required, nullable=True)
    if results[run] is not None:
      check_figures(f"{name} (final metrics)", results[run], required,
                    nullable=True)
      if not recorded and index < len(runs) - 1 and after_new_run:
        after_new_run(results)
  return results


# --- The script --------------------------------------------------------------

_F = types.SimpleNamespace()


def define_flags() -> None:
  """sweep.py's flags; defined only when it runs as a script, so that
  another script (genre_goodreads.py) imports its functions without them."""
  _F.spec = flags.DEFINE_string(
      "spec", "", "A Python grid-spec file defining GRID (see the module "
      "docstring); flags given replace its values, --set adds to them.")
  _F.presets = common_flags.presets([])
  _F.grid = flags.DEFINE_string(
      "grid", "", "Named override sets, name=key=value,key=value;name2=... "
      "(name2=: the preset as it is).")
  _F.seeds = common_flags.seeds(["0"])
  _F.dataset = flags.DEFINE_string(
      "dataset", "", "The presets' dataset settings (configs/X.py:ARG): "
      "empty for the synthetic demo data, goodreads or mind.")
  _F.metrics = flags.DEFINE_list(
      "metrics", list(DEFAULT_METRICS), "Figures tabulated: dotted paths "
      "into final_metrics.json or X (test.all.X), cold_X (test.cold.X), "
      "dev_X (dev.all.X).")
  _F.baseline = flags.DEFINE_list(
      "baseline", [], "Cells compared with, paired by seed: an override "
      "set's name (per preset) or a cell, preset/set; the first fills the "
      "table's last column.")
  _F.data_dir = common_flags.data_dir(
      "", "the dataset's own (config.data.path; none for the synthetic data)")
  _F.cache_dir = common_flags.cache_dir()
  _F.set = common_flags.overrides()
  _F.workdir_root = common_flags.workdir_root()
  _F.out_dir = common_flags.out_dir("", "--workdir_root")
  _F.finished_only = common_flags.finished_only()
  _F.wandb_mode = common_flags.wandb_mode()


def grid_from_flags() -> Grid:
  """The spec's grid (if --spec) with the flags given replacing its values."""
  grid = load_spec(_F.spec.value) if _F.spec.value else None

  def given(holder) -> bool:
    return bool(flags.FLAGS[holder.name].present)

  fields: dict[str, Any] = {} if grid is None else {
      f.name: getattr(grid, f.name) for f in dataclasses.fields(Grid)}
  if grid is None or given(_F.presets):
    fields["presets"] = list(_F.presets.value)
  if grid is None or given(_F.grid):
    fields["overrides"] = (parse_grid(_F.grid.value) if _F.grid.value
                           else {"base": []})
  if grid is None or given(_F.seeds):
    fields["seeds"] = parse_seeds(_F.seeds.value)
  if grid is None or given(_F.dataset):
    fields["dataset"] = _F.dataset.value
  if grid is None or given(_F.metrics):
    fields["metrics"] = list(_F.metrics.value)
  if grid is None or given(_F.baseline):
    fields["baselines"] = list(_F.baseline.value)
  fields["common"] = list(fields.get("common", [])) + list(_F.set.value)
  grid = Grid(**fields)
  check_grid(grid, f"--spec={_F.spec.value}" if _F.spec.value else "flags")
  return grid


def main(argv: Sequence[str]) -> None:
  del argv
  quiet_library_logging()
  grid = grid_from_flags()
  out_dir = _F.out_dir.value or _F.workdir_root.value
  start = time.time()

  def header(results, finished: bool) -> str:
    runs = grid.runs()
    done = sum(results.get(run) is not None for run in runs)
    return (f"{grid.title} ({len(grid.presets)} presets x "
            f"{len(grid.overrides)} override sets x {len(grid.seeds)} seeds"
            f"; dataset {grid.dataset or 'synthetic'}"
            + ("; finished runs only" if _F.finished_only.value else "")
            + ("" if finished else
               f"; in progress: {done} of {len(runs)} runs finished")
            + "; mean ± sample sd over seeds, no spread for one seed"
            + (f"; changes over {', '.join(grid.baselines)} paired by seed"
               if grid.baselines else "")
            + f"; wall {time.time() - start:.0f}s"
            + (f"; overrides: {' '.join(grid.common)}" if grid.common else "")
            + ")")

  def write(table: str, result: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    workdir_lib.atomic_write_text(os.path.join(out_dir, "results.md"), table)
    workdir_lib.atomic_write_text(os.path.join(out_dir, "results.json"),
                                  strict_json(result, indent=2))

  results = run_grid(
      grid, workdir_root=_F.workdir_root.value, out_dir=out_dir,
      data_dir=_F.data_dir.value, cache_dir=_F.cache_dir.value,
      train=not _F.finished_only.value, wandb_mode=_F.wandb_mode.value,
      after_new_run=lambda r: write(*tabulate(grid, r, header(r, False))))
  if not any(r is not None for r in results.values()):
    raise app.UsageError(
        f"no finished run under {_F.workdir_root.value} or recorded in "
        f"{os.path.join(out_dir, 'run_metrics')} for this grid "
        "(--finished_only trains nothing)")
  table, result = tabulate(grid, results, header(results, True))
  write(table, result)
  print(table)
  print(json_line(result))


if __name__ == "__main__":
  define_flags()
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
