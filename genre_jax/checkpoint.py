"""Orbax checkpoints of a run: the latest state (for resume) and the best one.

Layout under a workdir:
  config.json              the run's full config (written before training)
  checkpoints/latest/<step>/  train state + progress (epoch, batch, best, ...)
  checkpoints/best/<step>/    train state + the dev metrics that made it best
  metrics.json             every evaluation, appended as training goes

Orbax writes each step into a temporary directory and renames it when it is
complete, and only complete steps are listed: a checkpoint cut off half-way
(a killed process) is never restored. Files of ours are written to a
temporary name and renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from genre_jax.errors import ConfigError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes text to `path` through a temporary file and an atomic rename."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  atomic_write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


def _with_defaults(defaults: dict[str, Any], saved: dict[str, Any]
                   ) -> dict[str, Any]:
  """saved, with the fields it lacks (added to genre_jax since) filled in."""
  out = dict(defaults)
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key] = _with_defaults(out[key], value)
    else:
      out[key] = value
  return out


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Restores the config a run was trained with (from `workdir/config.json`).

  Fields added to the base config after the run was trained take their
  defaults, so older workdirs stay usable by eval and recommend.
  """
  from genre_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"{path}: no config.json; is '{workdir}' a genre_jax "
                      "workdir (created by run.py --mode=train)?")
  with open(path) as f:
    try:
      saved = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
  return ml_collections.ConfigDict(
      _with_defaults(config_lib.base_config().to_dict(), saved))


def append_metrics(workdir: str, record: dict[str, Any]) -> None:
  """Appends one evaluation record to `workdir/metrics.json` (atomically)."""
  path = os.path.join(workdir, "metrics.json")
  records = read_metrics(workdir)
  records.append(record)
  atomic_write_text(path, json.dumps(records, indent=2))


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


class Checkpoints:
  """The latest and the best checkpoint of one workdir.

  Each checkpoint holds three items: `params` (the model parameters), `opt`
  (optimizer state and step) and `progress` (JSON: epoch, batch, best so far).
  Keeping params apart lets eval, recommend and --init_from restore only them.
  """

  def __init__(self, workdir: str):
    root = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = dict(create=True, enable_async_checkpointing=False,
                   cleanup_tmp_directories=True)
    names = ("params", "opt", "progress")
    self.latest = ocp.CheckpointManager(
        os.path.join(root, "latest"), item_names=names,
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **options))
    self.best = ocp.CheckpointManager(
        os.path.join(root, "best"), item_names=names,
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **options))

  @staticmethod
  def save(manager, state, progress: dict) -> None:
    """Saves {"params", "opt", "step"} state and a JSON progress record.

    Orbax keys are save numbers, not train steps: the same step may be saved
    twice (mid-epoch, then at the epoch's end with new progress), and the
    newer save must replace the older one without deleting it first (a crash
    in between would leave no checkpoint). Orbax drops the old save only
    after the new one is complete.
    """
    latest = manager.latest_step()
    key = 0 if latest is None else latest + 1
    manager.save(key, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt=ocp.args.StandardSave({"opt": state["opt"], "step": state["step"]}),
        progress=ocp.args.JsonSave(progress)))
    manager.wait_until_finished()

  @staticmethod
  def restore(manager, abstract_state):
    """(state, progress) of the manager's newest complete step, or None."""
    step = manager.latest_step()
    if step is None:
      return None
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state["params"]),
        opt=ocp.args.StandardRestore({"opt": abstract_state["opt"],
                                      "step": abstract_state["step"]}),
        progress=ocp.args.JsonRestore()))
    state = {"params": restored["params"], **restored["opt"]}
    return state, restored["progress"]

  @staticmethod
  def restore_params(manager, abstract_params):
    """Parameters of the manager's newest complete step, or None."""
    step = manager.latest_step()
    if step is None:
      return None
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params)))
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(
          f"{manager.directory}: the saved parameters do not fit this model "
          f"(was it trained with a different config.model?): {e}") from e
    return restored["params"]

  @staticmethod
  def restore_saved(manager):
    """(params, progress) of the newest complete save, as saved; or None.

    Needs no model: parameters come back as numpy/jax arrays shaped as they
    were written (for inspection and tests).
    """
    key = manager.latest_step()
    if key is None:
      return None
    restored = manager.restore(key, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(),
        progress=ocp.args.JsonRestore()))
    return restored["params"], restored["progress"]

  def close(self) -> None:
    self.latest.close()
    self.best.close()
