r"""The GENRE ablation on the Goodreads benchmark (Liu et al., GENRE; ONCE).

Trains every model of --models on every data variant of --variants with every
seed of --seeds, and tabulates mean +- std of AUC, MRR, nDCG@5 and nDCG@10 on
all test users and on cold users (history of 5 or fewer). The generations are
the real GPT-3.5 replies of the release (genre/*.jsonl), served by the
`release` source of config.data.genre:

  original    titles only.
  summarizer  + the content summarizer's description of every book, read
              by every model in place of the title (the description
              restates the title). For NAML this beat reading it as a second
              view beside the title: 0.7277 against 0.7067 test AUC after one
              epoch, seed 0, at 0.4x the training time (the second view is
              --set=data.genre.summary_field=summary
              "--set=data.fields=('title','summary')").
  profiler    + each user's interest profile, encoded as an item and put in
              front of the history.
  generator   + a generated book appended to each cold user's history
              (generator_v1 of the release).
  all         all three together ("chain-free": the profile is not fed to
              the generator; the release has no chained generations).

  # The full grid (45 runs; hours on a CPU, minutes per run on a GPU):
  python experiments/genre_goodreads.py --data_dir=../shared/data/goodreads
  # A reduced grid that finishes on a 2-core CPU in under 20 minutes:
  python experiments/genre_goodreads.py --quick

Each run has its own workdir under --workdir_root and is skipped when it has
already finished, so an interrupted grid is continued by running the same
command again; a workdir whose config.json differs from the run's config
(another version of this script, other overrides) is an error, never reused
as if it were the same run. Every finished run also leaves a record (its
config, less the data and cache folders, and its final metrics, a few KB;
no machine path) in --out_dir/run_metrics/<run>.json,
which stands in for its workdir: a grid is extended on another machine, or
after its workdirs (checkpoints) are deleted, without retraining or losing
the seeds that ran before. --finished_only tabulates what has finished so
far and trains nothing. Writes results.md and results.json to --out_dir,
covering the grid and every other run recorded there with the same --set
(a grid of one new cell adds it to the table rather than replacing it),
and rewrites them after every run it trains, so that a long grid shows its
progress and an interrupted one leaves a table of everything it finished
(the header says "in progress" and the JSON has "grid_complete": false);
a results file that tabulates runs this invocation can neither read back
nor train (other --set overrides, a folder older than run records) is an
error before any training, never overwritten. It prints the table, and
ends with one line of JSON: {"cells": [{model, variant, n_seeds, seeds,
test: {metric: [mean, std]}, test_cold: {...}, per_seed}, ...], "gains":
{model: {variant: {auc, cold_auc, seeds, per_seed_auc, per_seed_cold_auc}}},
"gains_over": {baseline: {...}}, "quick", "overrides", "grid_complete"},
where a gain is the AUC change over `original` (the first of --gains_over)
averaged over the seeds both cells finished (the table's last column), and
"gains_over" holds the same over each further variant of --gains_over. A
one-seed cell's std is null (a spread needs two seeds).

The grid is a sweep.Grid (experiments/sweep.py): the models are its presets,
each variant a named set of config overrides (VARIANT_OVERRIDES), and
sweep.py's functions build each run's config, train it or read it back,
keep its record and compute the means, spreads and paired gains; this
script adds the variants, the record-keeping of its results folders and
its tables. --wandb_mode logs every run trained to Weights & Biases.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Sequence

from absl import app
from absl import flags

from genre_jax.errors import ConfigError, exit_on_input_error
from genre_jax.logs import json_line, quiet_library_logging, strict_json
from genre_jax import workdir as workdir_lib

import common_flags
import sweep

# This script's results folder, beside it.
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                    "genre_goodreads")

_DATA_DIR = common_flags.data_dir()
_MODELS = flags.DEFINE_list("models", ["naml", "nrms", "fastformer"],
                            "Presets to train.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["original", "summarizer", "profiler", "generator", "all"],
    "Data variants.")
_SEEDS = common_flags.seeds(["0", "1", "2"])
_QUICK = flags.DEFINE_bool(
    "quick", False, "Reduced grid for a CPU: nrms, original vs summarizer, "
    "one seed, 1/4 epoch each (overrides --models/--variants/--seeds).")
_WORKDIR_ROOT = common_flags.workdir_root(os.path.join(HERE, "runs"))
_OUT_DIR = common_flags.out_dir(HERE)
_CACHE_DIR = common_flags.cache_dir()
_SET = common_flags.overrides()
_GAINS_OVER = flags.DEFINE_list(
    "gains_over", ["original"], "Variants every other variant is compared "
    "with, paired by seed: the first fills the table's last column and "
    "\"gains\", each further one gets a table of its own (e.g. "
    "original,summarizer: does `all` add anything to summaries?).")
_FINISHED_ONLY = common_flags.finished_only()
_WANDB_MODE = common_flags.wandb_mode()

METRICS = ("auc", "mrr", "ndcg5", "ndcg10")
VARIANTS = ("original", "summarizer", "profiler", "generator", "all")
# Each variant of the release's generations is a named override set.
_SUMMARIZER = ["data.genre.summarizer=release",
               "data.genre.summary_field=title"]
_PROFILER = ["data.genre.profiler=release"]
_GENERATOR = ["data.genre.generator=('release:generator_v1',)"]
VARIANT_OVERRIDES = {
    "original": [], "summarizer": _SUMMARIZER, "profiler": _PROFILER,
    "generator": _GENERATOR, "all": _SUMMARIZER + _PROFILER + _GENERATOR}
# The quick grid: a quarter epoch of Goodreads at batch 128.
_QUICK_STEPS = 200
# What the tables read of each run (sweep metric name -> final_metrics path).
FIGURES = ({k: f"test.all.{k}" for k in METRICS}
           | {f"cold_{k}": f"test.cold.{k}" for k in METRICS})
# What a run record must hold, in the order checked.
_REQUIRED = [f"test.{split}.{key}" for split in ("all", "cold")
             for key in METRICS] + ["train_seconds"]


def summary_in_title(config) -> None:
  """With the summary in the title field, cut the title at the summary's
  length (after the overrides, so that --set=data.max_len.summary=N
  reaches it)."""
  genre = config.data.genre
  if genre.summarizer and genre.summary_field == "title":
    config.data.max_len.title = config.data.max_len.summary


def _settings() -> list[str]:
  """What gives runs workdirs of their own: --quick and the overrides."""
  return (["quick"] if _QUICK.value else []) + list(_SET.value)


def ablation_grid(models: Sequence[str], variants: Sequence[str],
         seeds: Sequence[int]) -> sweep.Grid:
  """The ablation as a sweep grid: models x variants x seeds on Goodreads."""
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f"unknown variant '{unknown[0]}'; choose from "
                         f"{list(VARIANTS)}")
  return sweep.Grid(
      presets=list(models),
      overrides={v: VARIANT_OVERRIDES[v] for v in variants},
      seeds=list(seeds), dataset="goodreads", metrics=list(FIGURES),
      baselines=list(_GAINS_OVER.value),
      common=([f"train.max_steps={_QUICK_STEPS}"] if _QUICK.value else [])
      + list(_SET.value),
      finalize=summary_in_title, digest_of=_settings(),
      title="GENRE ablation on Goodreads")


def variant_config(model: str, variant: str, seed: int):
  """The Goodreads config of `model` with the data variant applied."""
  return sweep.cell_config(ablation_grid([model], [variant], [seed]), model,
                           variant, seed, data_dir=_DATA_DIR.value,
                           cache_dir=_CACHE_DIR.value)


def run_name(model: str, variant: str, seed: int) -> str:
  """The run's workdir name; overrides (and --quick) get their own runs."""
  return sweep.run_name(model, variant, seed, _settings())


def record_path(name: str) -> str:
  """Where the record of run `name` (config and final metrics) is kept."""
  return os.path.join(_OUT_DIR.value, "run_metrics", f"{name}.json")


def run_one(model: str, variant: str, seed: int) -> dict | None:
  """Trains (or reads back) one cell's run; its final metrics (None when
  --finished_only and the run has not finished)."""
  name = run_name(model, variant, seed)
  return sweep.run_cell(
      name, variant_config(model, variant, seed),
      os.path.join(_WORKDIR_ROOT.value, name), record_path(name),
      train=not _FINISHED_ONLY.value, wandb_mode=_WANDB_MODE.value,
      required=_REQUIRED, description=f"{model} on {variant} (seed {seed})")


_RECORD_NAME = re.compile(
    r"(?P<model>[\w.]+)-(?P<variant>" + "|".join(VARIANTS) +
    r")-s(?P<seed>\d+)(?:-(?P<digest>[0-9a-f]{8}))?")


def recorded_runs() -> list[tuple[str, str, int]]:
  """(model, variant, seed) of every run recorded in --out_dir/run_metrics
  with this invocation's settings (--quick, --set), so that a grid run into
  an out_dir that already holds others tabulates them all, never drops them."""
  folder = os.path.dirname(record_path("x"))
  if not os.path.isdir(folder):
    return []
  found = []
  for file in sorted(os.listdir(folder)):
    match = _RECORD_NAME.fullmatch(file.removesuffix(".json"))
    if not file.endswith(".json") or match is None:
      continue  # not a record of this script
    run = (match["model"], match["variant"], int(match["seed"]))
    if run_name(*run) == file.removesuffix(".json"):  # same settings
      found.append(run)
  return found


def dropped_runs(path: str,
                 covered: dict[tuple[str, str], set[int]]) -> list[str]:
  """The runs ("model/variant seeds ...") that the results file at `path`
  tabulates and a table of `covered` ((model, variant) -> seeds) would drop.
  Raises UsageError when the file cannot be read or tabulates runs made with
  other --set overrides (all of which a table here would drop)."""
  if not os.path.isfile(path):
    return []
  try:
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    old_overrides = list(old.get("overrides", []))
    # (model, variant, seeds tabulated); the oldest tables give only how
    # many seeds, not which.
    old_cells = [(c["model"], c["variant"], [int(s) for s in c.get(
        "seeds", c.get("per_seed", {}))], int(c["n_seeds"]))
                 for c in old["cells"]]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise app.UsageError(
        f"{path}: cannot read the results it holds ({type(e).__name__}: {e});"
        " move it away to write a new table there") from e
  if old_cells and old_overrides != list(_SET.value):
    then = " ".join(old_overrides) or "(none)"
    now = " ".join(_SET.value) or "(none)"
    raise app.UsageError(
        f"{path} tabulates runs made with the overrides {then}, not {now}: "
        "choose another --out_dir, or move it away to replace it")
  dropped = []
  for model, variant, seeds, n_seeds in old_cells:
    have = covered.get((model, variant), set())
    missing = (sorted(set(seeds) - have) if seeds
               else ([] if len(have) >= n_seeds else ["?"]))
    if missing:
      dropped.append(f"{model}/{variant} seeds {','.join(map(str, missing))}")
  return dropped


def check_nothing_dropped(path: str,
                          covered: dict[tuple[str, str], set[int]]) -> None:
  """Raises UsageError when the results file at `path` tabulates runs that a
  table of `covered` would drop: runs with no record or workdir here, or made
  with other --set overrides. Rewriting it must never lose a finished result
  (e.g. a grid older than run records)."""
  dropped = dropped_runs(path, covered)
  if dropped:
    raise app.UsageError(
        f"{path} tabulates runs that this table would drop ({'; '.join(dropped)}"
        f"): they have no record in {os.path.dirname(record_path('x'))} and no "
        f"finished workdir under {_WORKDIR_ROOT.value} for this grid. Add them "
        "to the grid (--models/--variants/--seeds) to retrain them, choose "
        "another --out_dir, or move the file away to replace it")


def summarize(runs: dict[tuple[str, str], dict[int, dict]]) -> list[dict]:
  """One cell per (model, variant): mean and std over its finished seeds."""
  cells = []
  for (model, variant), by_seed in runs.items():
    cell = sweep.summarize_cell(by_seed, FIGURES)
    cells.append({
        "model": model, "variant": variant, "n_seeds": cell["n_seeds"],
        "seeds": cell["seeds"],
        "test": {k: cell["metrics"][k] for k in METRICS},
        "test_cold": {k: cell["metrics"][f"cold_{k}"] for k in METRICS},
        "train_seconds": cell["train_seconds"],
        "per_seed": {seed: {"auc": figures["auc"],
                            "cold_auc": figures["cold_auc"]}
                     for seed, figures in cell["per_seed"].items()},
    })
  return cells


def gains(cells: list[dict], baseline: str = "original"
          ) -> dict[str, dict[str, dict]]:
  """Test AUC change of every variant over `baseline`, per model, paired by
  seed: the mean over the seeds both cells finished (listed as "seeds"),
  with the per-seed changes."""
  base = {c["model"]: c for c in cells if c["variant"] == baseline}
  out: dict[str, dict[str, dict]] = {}
  for c in cells:
    if c["variant"] == baseline or c["model"] not in base:
      continue
    gain = sweep.paired_gains(c["per_seed"], base[c["model"]]["per_seed"],
                              ("auc", "cold_auc"))
    if gain is not None:
      out.setdefault(c["model"], {})[c["variant"]] = gain
  return out


def gains_table(baseline: str, gains_by_model: dict[str, dict[str, dict]]
                ) -> str:
  """The paired changes over a further baseline, per seed in brackets."""
  def fmt(values):
    return ", ".join(f"{v:+.4f}" for v in values)

  lines = [f"Test AUC change over `{baseline}`, paired by seed:", "",
           "| model | variant | seeds | AUC change | per seed | cold AUC change "
           "| per seed |", "|---|---|---|---|---|---|---|"]
  for model, by_variant in gains_by_model.items():
    for variant, g in by_variant.items():
      lines.append(
          f"| {model} | {variant} | {','.join(map(str, g['seeds']))} | "
          f"{g['auc']:+.4f} | {fmt(g['per_seed_auc'])} | "
          f"{g['cold_auc']:+.4f} | {fmt(g['per_seed_cold_auc'])} |")
  return "\n".join(lines) + "\n"


def markdown(cells: list[dict], gains_by_model: dict[str, dict[str, dict]],
             header: str) -> str:
  """The results table; a one-seed cell shows its value with no spread."""
  def fmt(pair):
    return f"{pair[0]:.4f}" + ("" if pair[1] is None else f" ± {pair[1]:.4f}")

  def gain(c):
    g = gains_by_model.get(c["model"], {}).get(c["variant"])
    if g is None:
      return ""
    return (f"{g['auc']:+.4f} (cold {g['cold_auc']:+.4f}; seeds "
            f"{','.join(map(str, g['seeds']))})")

  lines = [header, "",
           "| model | variant | seeds | AUC | MRR | nDCG@5 | nDCG@10 | cold AUC "
           "| cold MRR | cold nDCG@5 | cold nDCG@10 | train s | AUC gain |",
           "|---|---|---:|---|---|---|---|---|---|---|---|---:|---|"]
  for c in cells:
    lines.append(
        f"| {c['model']} | {c['variant']} | {c['n_seeds']} | " +
        " | ".join(fmt(c["test"][k]) for k in METRICS) + " | " +
        " | ".join(fmt(c["test_cold"][k]) for k in METRICS) +
        f" | {c['train_seconds']:.0f} | {gain(c)} |")
  return "\n".join(lines) + "\n"


def tabulate(results: dict[tuple[str, str, int], dict | None],
             models: list[str], grid: list[tuple[str, str, int]],
             header: str) -> tuple[str, dict]:
  """The markdown table and the JSON result of every finished run in
  `results`; "grid_complete" says whether every run of `grid` is among them."""
  model_order = {m: i for i, m in enumerate(dict.fromkeys(
      models + sorted(m for m, _, _ in results)))}
  runs: dict[tuple[str, str], dict[int, dict]] = {}
  for (model, variant, seed), result in sorted(
      results.items(), key=lambda item: (model_order[item[0][0]],
                                         VARIANTS.index(item[0][1]),
                                         item[0][2])):
    if result is not None:
      runs.setdefault((model, variant), {})[seed] = result
  cells = summarize(runs)
  baselines = list(_GAINS_OVER.value)
  result = {"cells": cells, "gains": gains(cells, baselines[0]),
            "gains_over": {b: gains(cells, b) for b in baselines[1:]},
            "quick": _QUICK.value, "overrides": list(_SET.value),
            "grid_complete": all(results.get(run) is not None for run in grid)}
  table = markdown(cells, result["gains"], header)
  for baseline, by_model in result["gains_over"].items():
    table += "\n" + gains_table(baseline, by_model)
  return table, result


def covered_runs(results: dict[tuple[str, str, int], dict | None]
                 ) -> dict[tuple[str, str], set[int]]:
  """(model, variant) -> the seeds of the finished runs in `results`."""
  covered: dict[tuple[str, str], set[int]] = {}
  for (model, variant, seed), result in results.items():
    if result is not None:
      covered.setdefault((model, variant), set()).add(seed)
  return covered


def main(argv: Sequence[str]) -> None:
  del argv
  quiet_library_logging()
  if _QUICK.value:
    models, variants, seeds = ["nrms"], ["original", "summarizer"], [0]
  else:
    models = list(_MODELS.value)
    variants = list(_VARIANTS.value)
    if not all(s.isdigit() for s in _SEEDS.value):
      raise app.UsageError(f"--seeds={','.join(_SEEDS.value)}: give "
                           "non-negative integers, e.g. --seeds=0,1,2")
    seeds = [int(s) for s in _SEEDS.value]
  # Runs recorded in --out_dir by earlier grids join the table (read back,
  # never trained), so results.md/json always cover every finished run there.
  recorded = recorded_runs()
  tabulated = list(dict.fromkeys(variants + [v for _, v, _ in recorded]))
  unknown = [b for b in _GAINS_OVER.value if b not in tabulated]
  if unknown or not _GAINS_OVER.value:
    raise app.UsageError(f"--gains_over={','.join(_GAINS_OVER.value)}: "
                         f"compare with variants of this grid ({tabulated})")
  ablation_grid(models, variants, seeds)  # an unknown variant: now
  start = time.time()
  grid = [(m, v, s) for m in models for v in variants for s in seeds]
  name = "results_quick" if _QUICK.value else "results"
  results_path = os.path.join(_OUT_DIR.value, f"{name}.json")
  planned: dict[tuple[str, str], set[int]] = {}
  for model, variant, seed in grid + recorded:
    planned.setdefault((model, variant), set()).add(seed)
  check_nothing_dropped(results_path, planned)  # before hours of training
  results: dict[tuple[str, str, int], dict | None] = {}
  for run in recorded:  # read back first: a stale record fails before training
    try:
      results[run] = run_one(*run)
    except ConfigError as e:  # e.g. the record of a preset since removed
      raise app.UsageError(f"{record_path(run_name(*run))}: {e}") from e

  def header(finished: bool) -> str:
    extra = sum(run not in grid and result is not None
                for run, result in results.items())
    done = sum(results.get(run) is not None for run in grid)
    return (f"GENRE ablation on Goodreads ({'quick grid' if _QUICK.value else 'grid'}"
            f": {len(models)} models x {len(variants)} variants x "
            f"{len(seeds)} seeds"
            + (f", with {extra} more finished runs recorded in --out_dir"
               if extra else "")
            + ("; finished runs only" if _FINISHED_ONLY.value else "")
            + ("" if finished else
               f"; in progress: {done} of {len(grid)} grid runs finished")
            + "; test split, mean ± std over seeds, no spread for one seed; "
            f"AUC gain over {_GAINS_OVER.value[0]}, paired by seed; "
            f"wall {time.time() - start:.0f}s"
            + (f"; overrides: {' '.join(_SET.value)}" if _SET.value else "")
            + ")")

  def write(table: str, result: dict) -> None:
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    workdir_lib.atomic_write_text(
        os.path.join(_OUT_DIR.value, f"{name}.md"), table)
    workdir_lib.atomic_write_text(results_path, strict_json(result, indent=2))

  for index, run in enumerate(grid):
    if run in results:
      continue
    already = os.path.isfile(record_path(run_name(*run)))
    results[run] = run_one(*run)
    if (results[run] is None or already or index == len(grid) - 1
        or dropped_runs(results_path, covered_runs(results))):
      continue  # nothing new to show, or the final table comes next
    # A long grid shows what has finished after every trained run, so an
    # interrupted grid leaves a table of everything it finished.
    write(*tabulate(results, models, grid, header(finished=False)))
  if not any(result is not None for result in results.values()):
    raise app.UsageError(
        f"no finished run under {_WORKDIR_ROOT.value} or recorded in "
        f"{os.path.dirname(record_path('x'))} for this grid (--finished_only "
        "trains nothing)")
  check_nothing_dropped(results_path, covered_runs(results))
  table, result = tabulate(results, models, grid, header(finished=True))
  write(table, result)
  print(table)
  print(json_line(result))


if __name__ == "__main__":
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
