r"""The multi-process (jax.distributed) path, checked on one machine's CPU.

Launches 2 processes on localhost (one CPU device each, JAX's gloo CPU
collectives), each joining through train.maybe_initialize_distributed()
(JAX_COORDINATOR_ADDRESS=localhost:PORT, JAX_NUM_PROCESSES=2,
JAX_PROCESS_ID=i: jax.distributed.initialize(coordinator_address=...,
num_processes=2, process_id=i)), and trains one tiny NRMS on the built-in
synthetic data through train.train_and_evaluate into ONE shared workdir:
process 0 prepares the data cache while the other waits, each process reads
its half of every global batch (TrainBatcher's process_index /
process_count), both save Orbax checkpoints every --checkpoint_every steps,
and process 0 alone writes config.json, metrics.json and
final_metrics.json. The runs:

  * 2 processes, --steps steps (skipped with --nouninterrupted);
  * 2 processes interrupted after step --interrupt_at (both stop there),
    then 2 fresh processes resuming from the shared workdir's last
    checkpoint (a multiple of --checkpoint_every) to the end; with
    --damage_newest that checkpoint's parameters are truncated first, and
    the processes must agree to move it to checkpoints/damaged/ (once) and
    resume from the save before it;
  * 1 process, the same config and global batch: the reference. Every
    step's training loss and the final dev/test metrics of the 2-process
    runs must match it.

The config has no dropout: with train.dedup_items (on) each process encodes
its own rows' distinct items, and dropout draws by position in that list, so
2 processes would draw other (equally valid) masks than 1 process.
(--set=train.dedup_items=False --set=model.dropout=0.2: the same losses
too.) The launches share a JAX compilation cache under the logs folder.

  python experiments/multiprocess_check.py       # 20 steps, 4 launches
  python experiments/multiprocess_check.py --steps=4 --interrupt_at=3 \
      --checkpoint_every=3 --nouninterrupted     # tests/test_multiprocess.py

Prints a table (step, loss 1 process, loss 2 processes, diff, loss of the
interrupted and resumed 2 processes, diff) and the final metrics, and ends
with one JSON line {"processes": 2, "steps", "max_loss_diff", "resumed_at",
...}; exits 1 when a loss differs by more than --tolerance (1e-5), a metric
by more than --metric_tolerance, or something listed under "problems" went
wrong (the processes of one run logged different losses, a workdir file is
missing, the resume started elsewhere than the last checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from absl import app
from absl import flags

from genre_jax.errors import exit_on_input_error

import common_flags
import tiny_configs

_STEPS = flags.DEFINE_integer("steps", 20, "Training steps of every run.",
                              lower_bound=2)
_INTERRUPT_AT = flags.DEFINE_integer(
    "interrupt_at", 12, "The interrupted 2-process run stops after this step "
    "(and resumes from its last checkpoint).", lower_bound=1)
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 5, "config.train.checkpoint_every.", lower_bound=1)
_PRESET = flags.DEFINE_string("preset", "nrms", "Preset (configs/) trained.")
_WORKDIR_ROOT = flags.DEFINE_string(
    "workdir_root", "", "Where the runs' workdirs, data cache and logs go; "
    "empty: a temporary folder, deleted at the end.")
_TOLERANCE = flags.DEFINE_float(
    "tolerance", 1e-5, "Largest allowed |loss 1 process - loss 2 processes|.")
_METRIC_TOLERANCE = flags.DEFINE_float(
    "metric_tolerance", 1e-4, "Largest allowed difference of a final dev/test "
    "metric between 1 and 2 processes.")
_UNINTERRUPTED = flags.DEFINE_bool(
    "uninterrupted", True, "Also train the 2 processes without interruption "
    "(--nouninterrupted: the interrupted and resumed run alone is compared "
    "with the 1-process run, one launch less).")
_DAMAGE_NEWEST = flags.DEFINE_bool(
    "damage_newest", False, "Truncate the parameters of the interrupted "
    "run's newest save before resuming: the resume must move it aside once "
    "and start from the save before it (--interrupt_at must then be at "
    "least twice --checkpoint_every).")
_TIMEOUT = flags.DEFINE_integer("timeout", 600,
                                "Seconds each launch may take.")
_SEED = common_flags.seed()
_SET = common_flags.overrides()
# One process of a launch (set by the launcher, not by hand).
_WORKER = flags.DEFINE_bool("worker", False, "Internal: run one process.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Internal: the run's workdir.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Internal: data cache.")
_OUT = flags.DEFINE_string("out", "", "Internal: this process's JSON result.")
_STOP_AT = flags.DEFINE_integer("stop_at", 0, "Internal: stop after this "
                                "step (0: train to the end).")

# The metrics compared between the 1- and 2-process runs' summaries.
_METRICS = ("auc", "mrr", "ndcg5", "ndcg10")


def tiny_config(preset: str, data_dir: str, steps: int, checkpoint_every: int,
                seed: int):
  """A preset shrunk to seconds on a CPU (tiny_configs.shrink), training
  `steps` steps of one epoch and logging every step's loss."""
  from genre_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  config = tiny_configs.shrink(config_lib.load_preset(preset, None),
                               data_dir)
  # With train.dedup_items each process encodes its own rows' distinct items,
  # and dropout draws by position in that list: 2 processes draw other (as
  # good) masks than 1. Without dropout (or without dedup_items) the runs
  # are the same computation.
  config.model.dropout = 0.0
  config.train.batch_size = 16  # global: 8 rows per process of 2
  config.train.max_steps = steps
  config.train.log_every = 1  # every step's loss reaches loss_callback
  config.train.checkpoint_every = checkpoint_every
  config.train.seed = seed
  config_lib.apply_overrides(config, _SET.value)
  return config


class _Interrupted(Exception):
  """Raised by the step callback to stop a run mid-way, as a kill would."""


def worker() -> None:
  """One process of a launch: joins the run, trains, writes its result."""
  import jax  # pylint: disable=g-import-not-at-top

  # CPU collectives across processes (before the backend starts).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # The launches compile the same steps: each compiles them once.
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.path.dirname(_OUT.value), "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  from genre_jax import train  # pylint: disable=g-import-not-at-top
  from genre_jax.logs import quiet_library_logging, strict_json  # pylint: disable=g-import-not-at-top

  quiet_library_logging()
  train.maybe_initialize_distributed()  # reads JAX_COORDINATOR_ADDRESS, ...
  expected = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
  if jax.process_count() != expected or jax.local_device_count() != 1:
    raise RuntimeError(f"{jax.process_count()} processes, "
                       f"{jax.local_device_count()} local devices: expected "
                       f"{expected} and 1")
  config = tiny_config(_PRESET.value, _DATA_DIR.value, _STEPS.value,
                       _CHECKPOINT_EVERY.value, _SEED.value)
  losses = {}

  def stop(step: int) -> None:
    if step == _STOP_AT.value:
      raise _Interrupted()

  summary = None
  try:
    summary = train.train_and_evaluate(
        config, _WORKDIR.value, step_callback=stop,
        loss_callback=lambda step, loss: losses.__setitem__(step, loss))
  except _Interrupted:
    pass
  result = {"process_index": jax.process_index(),
            "process_count": jax.process_count(), "losses": losses,
            "summary": summary}
  with open(_OUT.value, "w", encoding="utf-8") as f:
    f.write(strict_json(result))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(name: str, root: str, workdir: str, processes: int,
          stop_at: int = 0) -> tuple[str, list]:
  """Starts `processes` worker processes (together, one run); `finish`
  waits for them."""
  logs_dir = os.path.join(root, "logs")
  os.makedirs(logs_dir, exist_ok=True)
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  # One CPU device per process.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
              "JAX_PROCESS_ID"):
    env.pop(key, None)
  if processes > 1:
    env["JAX_COORDINATOR_ADDRESS"] = f"localhost:{_free_port()}"
    env["JAX_NUM_PROCESSES"] = str(processes)
  script = os.path.abspath(__file__)
  running = []
  for i in range(processes):
    out = os.path.join(logs_dir, f"{name}-p{i}.json")
    log = os.path.join(logs_dir, f"{name}-p{i}.log")
    argv = [sys.executable, script, "--worker", f"--workdir={workdir}",
            f"--data_dir={os.path.join(root, 'data')}", f"--out={out}",
            f"--stop_at={stop_at}", f"--steps={_STEPS.value}",
            f"--checkpoint_every={_CHECKPOINT_EVERY.value}",
            f"--preset={_PRESET.value}", f"--seed={_SEED.value}"
           ] + [f"--set={s}" for s in _SET.value]
    if processes > 1:
      env["JAX_PROCESS_ID"] = str(i)
    with open(log, "w", encoding="utf-8") as f:
      proc = subprocess.Popen(argv, env=dict(env), stdout=f,
                              stderr=subprocess.STDOUT)
    running.append((proc, out, log))
  return name, running


def finish(launched: tuple[str, list]) -> list[dict]:
  """The results of a started run's processes, process 0's first; raises
  RuntimeError with a log tail if one fails."""
  name, running = launched
  deadline = time.time() + _TIMEOUT.value
  failed = None
  try:
    # A process that fails ends the run: the others would wait for it.
    while failed is None:
      codes = [proc.poll() for proc, _, _ in running]
      bad = [i for i, code in enumerate(codes) if code not in (None, 0)]
      if bad:
        failed = (codes[bad[0]], running[bad[0]][2])
      elif all(code == 0 for code in codes):
        break
      elif time.time() > deadline:
        failed = (f"timed out after {_TIMEOUT.value} s", running[0][2])
      else:
        time.sleep(0.2)
  finally:
    for proc, _, _ in running:  # only the processes started here
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  if failed is not None:
    with open(failed[1], encoding="utf-8") as f:
      tail = "".join(f.readlines()[-40:])
    raise RuntimeError(f"{name}: a process failed ({failed[0]}); the end of "
                       f"{failed[1]}:\n{tail}")
  results = []
  for _, out, _ in running:
    with open(out, encoding="utf-8") as f:
      result = json.load(f)
    result["losses"] = {int(k): v for k, v in result["losses"].items()}
    results.append(result)
  return sorted(results, key=lambda r: r["process_index"])


def launch(name: str, root: str, workdir: str, processes: int,
           stop_at: int = 0) -> list[dict]:
  return finish(start(name, root, workdir, processes, stop_at))


def _metric_values(summary: dict) -> dict[str, float]:
  return {f"{split}.{k}": summary[split]["all"][k] for split in ("dev", "test")
          if split in summary for k in _METRICS}


def _check_workdir(workdir: str) -> list[str]:
  """What is wrong with a finished 2-process run's shared workdir."""
  problems = []
  for name in ("config.json", "metrics.json", "final_metrics.json"):
    if not os.path.isfile(os.path.join(workdir, name)):
      problems.append(f"{name} missing")
  saves = os.path.join(workdir, "checkpoints", "latest")
  if not (os.path.isdir(saves) and any(e.isdigit() for e in os.listdir(saves))):
    problems.append("no checkpoint saved")
  leftovers = [n for n in os.listdir(workdir) if n.endswith(".tmp")]
  if leftovers:
    problems.append(f"temporaries left: {leftovers}")
  return problems


def damage_newest_save(workdir: str) -> str:
  """Truncates every parameter file of the newest latest save of `workdir`,
  as a failing disk might; returns the save's folder."""
  saves = os.path.join(workdir, "checkpoints", "latest")
  newest = os.path.join(saves, max((e for e in os.listdir(saves)
                                    if e.isdigit()), key=int))
  params = os.path.join(newest, "params")
  data = [os.path.join(folder, name) for folder, _, names in os.walk(params)
          if os.path.basename(folder) == "d" for name in names]
  if not data:
    raise RuntimeError(f"{params}: no parameter files to damage")
  for path in data:
    os.truncate(path, os.path.getsize(path) // 2)
  return newest


def _check_damaged(workdir: str, logs_dir: str, name: str) -> list[str]:
  """What is wrong with how the resumed processes handled a damaged save:
  it must be moved aside exactly once, and every process must say so."""
  problems = []
  damaged = os.path.join(workdir, "checkpoints", "damaged")
  moved = sorted(os.listdir(damaged)) if os.path.isdir(damaged) else []
  if len(moved) != 1:
    problems.append(f"{len(moved)} saves under checkpoints/damaged/ "
                    f"({moved}), not 1")
  for log in sorted(os.listdir(logs_dir)):
    if log.startswith(f"{name}-p") and log.endswith(".log"):
      with open(os.path.join(logs_dir, log), encoding="utf-8") as f:
        if "is damaged" not in f.read():
          problems.append(f"{log}: no line saying the save is damaged")
  return problems


def check(root: str) -> dict:
  """The runs and their comparison (the JSON line's fields)."""
  steps = _STEPS.value
  started = time.time()
  runs = {}  # name -> results of its processes
  # 2 processes first: they prepare the dataset (process 0, the other one
  # waiting) into the empty data cache.
  if _UNINTERRUPTED.value:
    runs["two"] = launch("two", root, os.path.join(root, "two"), 2)
  resumed_dir = os.path.join(root, "resumed")
  runs["interrupted"] = launch("interrupted", root, resumed_dir, 2,
                               stop_at=_INTERRUPT_AT.value)
  if _DAMAGE_NEWEST.value:
    damage_newest_save(resumed_dir)
  # Side by side (the data is prepared, the workdirs differ).
  resumed = start("resumed", root, resumed_dir, 2)
  one = start("one", root, os.path.join(root, "one"), 1)
  try:
    runs["resumed"] = finish(resumed)
  finally:
    runs["one"] = finish(one)
  seconds = time.time() - started

  problems = []
  for name, results in runs.items():
    if len(results) > 1 and any(r["losses"] != results[0]["losses"]
                                for r in results):
      problems.append(f"{name}: the processes logged different losses")
  if "two" in runs:
    problems += [f"two: {p}"
                 for p in _check_workdir(os.path.join(root, "two"))]
  problems += [f"resumed: {p}" for p in _check_workdir(resumed_dir)]
  if _DAMAGE_NEWEST.value:
    problems += [f"resumed: {p}" for p in _check_damaged(
        resumed_dir, os.path.join(root, "logs"), "resumed")]

  ref = runs["one"][0]["losses"]
  mp = runs["two"][0]["losses"] if "two" in runs else {}
  resumed_losses = dict(runs["interrupted"][0]["losses"])
  resumed_at = min(runs["resumed"][0]["losses"], default=steps + 1) - 1
  # The steps replayed after the resume: the resumed run's losses.
  resumed_losses.update(runs["resumed"][0]["losses"])
  expected_resume = (_INTERRUPT_AT.value // _CHECKPOINT_EVERY.value *
                     _CHECKPOINT_EVERY.value)
  if _DAMAGE_NEWEST.value:  # the save before the damaged one
    expected_resume -= _CHECKPOINT_EVERY.value
  if resumed_at != expected_resume:
    problems.append(f"resumed at step {resumed_at}, not at the checkpoint of "
                    f"step {expected_resume}")
  rows, diffs, resumed_diffs = [], [], []
  for step in range(1, steps + 1):
    a, b, c = ref.get(step), mp.get(step), resumed_losses.get(step)
    if a is None or c is None or ("two" in runs and b is None):
      problems.append(f"step {step}: no loss logged")
      continue
    if b is not None:
      diffs.append(abs(a - b))
    resumed_diffs.append(abs(a - c))
    rows.append((step, a, b, c))

  def cell(value, width, spec):
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"

  print(f"{'step':>4}  {'loss 1 process':>15}  {'loss 2 processes':>17}  "
        f"{'diff':>9}  {'2, resumed':>12}  {'diff':>9}")
  for step, a, b, c in rows:
    mark = "  <- resumed here" if step == resumed_at + 1 else ""
    print(f"{step:>4}  {a:>15.8f}  {cell(b, 17, '.8f')}  "
          f"{cell(None if b is None else abs(a - b), 9, '.2e')}  "
          f"{c:>12.8f}  {abs(a - c):>9.2e}{mark}")

  metrics = {name: _metric_values(runs[name][0]["summary"])
             for name in ("one", "two", "resumed") if name in runs}
  print(f"\n{'final metric':<14}{'1 process':>12}"
        + "".join(f"{'2, ' + n if n == 'resumed' else '2 processes':>14}"
                  for n in metrics if n != "one"))
  for k, v in metrics["one"].items():
    print(f"{k:<14}{v:>12.6f}"
          + "".join(f"{metrics[n][k]:>14.6f}" for n in metrics if n != "one"))
  metric_diff = max((abs(v - metrics[n][k]) for n in metrics if n != "one"
                     for k, v in metrics["one"].items() if math.isfinite(v)),
                    default=math.nan)
  for p in problems:
    print(f"problem: {p}")
  return {"processes": 2, "steps": steps,
          "max_loss_diff": max(diffs + resumed_diffs, default=math.nan),
          "max_loss_diff_uninterrupted": max(diffs, default=None),
          "max_loss_diff_resumed": max(resumed_diffs, default=math.nan),
          "interrupted_at": _INTERRUPT_AT.value, "resumed_at": resumed_at,
          "checkpoint_every": _CHECKPOINT_EVERY.value,
          "damaged_newest": _DAMAGE_NEWEST.value,
          "max_metric_diff": metric_diff,
          "dev_auc": {n: m.get("dev.auc") for n, m in metrics.items()},
          "test_auc": {n: m.get("test.auc") for n, m in metrics.items()},
          "problems": problems, "seconds": round(seconds, 1)}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKER.value:
    worker()
    return
  if not _INTERRUPT_AT.value < _STEPS.value:
    raise app.UsageError(f"--interrupt_at={_INTERRUPT_AT.value}: must be "
                         f"below --steps={_STEPS.value}")
  if _INTERRUPT_AT.value < _CHECKPOINT_EVERY.value:
    raise app.UsageError(
        f"--interrupt_at={_INTERRUPT_AT.value}: must be at least "
        f"--checkpoint_every={_CHECKPOINT_EVERY.value} (a checkpoint to "
        "resume from)")
  if (_DAMAGE_NEWEST.value and
      _INTERRUPT_AT.value < 2 * _CHECKPOINT_EVERY.value):
    raise app.UsageError(
        f"--damage_newest: --interrupt_at={_INTERRUPT_AT.value} must be at "
        f"least twice --checkpoint_every={_CHECKPOINT_EVERY.value} (a save "
        "before the damaged one)")
  from genre_jax.logs import json_line  # pylint: disable=g-import-not-at-top

  # A bad --preset or --set fails here, in one line, before any launch.
  tiny_config(_PRESET.value, "unused", _STEPS.value, _CHECKPOINT_EVERY.value,
              _SEED.value)
  root = _WORKDIR_ROOT.value or tempfile.mkdtemp(prefix="multiprocess_check_")
  try:
    result = check(os.path.abspath(root))
  finally:
    if not _WORKDIR_ROOT.value:
      shutil.rmtree(root, ignore_errors=True)
  print(json_line(result))
  bad = (not result["max_loss_diff"] <= _TOLERANCE.value or
         not result["max_metric_diff"] <= _METRIC_TOLERANCE.value or
         result["problems"])
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
