"""The files of a run directory, each written atomically.

  config.json          the run's full config (written before training)
  metrics.json         every evaluation, appended as training goes
  final_metrics.json   the best checkpoint's dev/test metrics
  checkpoints/         Orbax checkpoints (checkpoint.py)

Kept apart from the checkpoints so that tools which only read or tabulate
finished runs (experiment grids) load no JAX.
"""

from __future__ import annotations

import json
import os
import pathlib
import uuid
from typing import Any

import ml_collections

from genre_jax.errors import ConfigError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes text to `path` (newlines as given) through a temporary file in
  the same folder and an atomic rename: readers see the old file or the new
  one, never part of one, and a failed write leaves no temporary behind."""
  path = pathlib.Path(path).expanduser()
  path.parent.mkdir(parents=True, exist_ok=True)
  # A new name per call ("x": never an existing file), created with the
  # usual permissions (mkstemp's would be owner-only).
  tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
  f = open(tmp, "x", encoding="utf-8", newline="")
  try:
    with f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.remove(tmp)
    raise


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
