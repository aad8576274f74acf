"""The files of a run directory, each written atomically.

  config.json          the run's full config (written before training; a
                       resume must keep it, see check_resumable)
  metrics.json         every evaluation, appended as training goes
  final_metrics.json   the best checkpoint's dev/test metrics
  checkpoints/         Orbax checkpoints (checkpoint.py)

Kept apart from the checkpoints so that tools which only read or tabulate
finished runs (experiment grids) load no JAX.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import uuid
from typing import Any, Iterator

from absl import logging
import ml_collections

from genre_jax import logs
from genre_jax.errors import ConfigError


_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY = re.compile(
    r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{32}\.tmp$")


def temporary_path(path: str | os.PathLike) -> pathlib.Path:
  """A new name beside `path` to write it under before an atomic rename.

  `.NAME.HOST-PID-RANDOM.tmp`: hidden, never an existing file, and naming
  its writer, so remove_abandoned_temporaries can tell a killed writer's
  leftover from a file another process is still writing.
  """
  path = pathlib.Path(path)
  return path.with_name(
      f".{path.name}.{_HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex}.tmp")


def _running(pid: int) -> bool:
  if os.name == "nt":
    return True  # os.kill(pid, 0) would send Ctrl-C there: never remove
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's process
  return True


def remove_abandoned_temporaries(folder: str | os.PathLike) -> list[str]:
  """Deletes the temporaries (files or folders, from temporary_path) in
  `folder` whose writer, a process of this host, no longer runs: a run
  killed mid-write (e.g. of a large LM cache) leaves its temporary behind.
  Those of live processes, or of other hosts sharing the folder, stay.
  Returns the names removed."""
  removed = []
  try:
    names = os.listdir(folder)
  except FileNotFoundError:
    return removed
  for name in names:
    match = _TEMPORARY.match(name)
    if (not match or match["host"] != _HOST_TAG or
        _running(int(match["pid"]))):
      continue
    target = os.path.join(folder, name)
    if os.path.isdir(target) and not os.path.islink(target):
      shutil.rmtree(target, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(target)
    logging.info("Removed %s, left by a killed process", target)
    removed.append(name)
  return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a new temporary name beside `path` to write the file at; when
  the block ends, renames it onto `path` (atomic: readers see the old file
  or the new one, never part of one), or on any error (Ctrl-C included)
  deletes it. A killed process's temporary goes with the next output in
  the folder (remove_abandoned_temporaries)."""
  path = pathlib.Path(path).expanduser()
  path.parent.mkdir(parents=True, exist_ok=True)
  remove_abandoned_temporaries(path.parent)
  tmp = temporary_path(path)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    # Gone when the interrupt came just after the rename (the file is done).
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes text to `path` (newlines as given) through atomic_output."""
  with atomic_output(path) as tmp:
    # "x": the name is new; the usual permissions (mkstemp's would be
    # owner-only).
    with open(tmp, "x", encoding="utf-8", newline="") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  atomic_write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


# Where the data lives, not what the run is: may differ between machines.
LOCATION_KEYS = ("data.path", "data.data_dir")

# What may change when a run is resumed from its checkpoint: how long it
# trains (to extend it), how often it logs, saves and stops early, where
# caches live and how (not what) it computes. Any other change would make
# the checkpoint another run's.
RESUMABLE_KEYS = ("data.data_dir", "model.lm.cache_dir", "train.epochs",
                  "train.max_steps", "train.patience", "train.log_every",
                  "train.checkpoint_every", "train.prefetch",
                  "train.dedup_items", "eval.batch_size")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{"a.b.c": value} of every leaf of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def config_differences(saved: dict[str, Any],
                       config: ml_collections.ConfigDict,
                       ignore: tuple[str, ...] = ()
                       ) -> list[tuple[str, Any, Any]]:
  """(dotted field, saved value, config's value) of every field, outside
  `ignore`, where the saved config (a config.json) is not `config`.

  A field the saved config lacks (added to genre_jax since) and `config`
  holds at its default is no difference: it describes what the run did.
  """
  from genre_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  # Both through JSON, so tuples compare as lists.
  saved = _flat(json.loads(json.dumps(saved)))
  wanted = _flat(json.loads(config.to_json_best_effort()))
  defaults = _flat(json.loads(config_lib.base_config().to_json_best_effort()))
  return [(k, saved.get(k), wanted.get(k))
          for k in sorted(set(saved) | set(wanted))
          if k not in ignore and saved.get(k) != wanted.get(k)
          and not (k not in saved and k in defaults
                   and wanted.get(k) == defaults[k])]


def check_same_config(path: str, saved: dict[str, Any],
                      config: ml_collections.ConfigDict) -> None:
  """Raises UsageError when `saved` (the config read from `path`) is not
  `config` (but for LOCATION_KEYS): a run of another config is never read as
  this one (experiment grids reusing finished runs)."""
  from absl import app  # pylint: disable=g-import-not-at-top

  differ = config_differences(saved, config, LOCATION_KEYS)
  if differ:
    shown = "; ".join(f"{k}: {old!r} there, {new!r} now"
                      for k, old, new in differ[:5])
    raise app.UsageError(
        f"{path}: this holds a run with another config "
        f"({shown}{'; ...' if len(differ) > 5 else ''}); move it away or "
        "choose another --workdir_root / --out_dir")


def check_resumable(workdir: str, config: ml_collections.ConfigDict,
                    resumable_keys: tuple[str, ...] = RESUMABLE_KEYS) -> None:
  """Raises ConfigError unless `config` may resume the run in `workdir`.

  Call it when the workdir holds a checkpoint, before config.json is
  rewritten: a checkpoint resumed (or reported) under another config, e.g.
  another dataset, would pass off one run's model as another's. Only
  `resumable_keys` may differ (training's by default; pretraining has its
  own).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return  # nothing to compare with (config.json deleted by hand)
  saved = _read_json(path)
  if not isinstance(saved, dict):
    raise ConfigError(f"{path}: not a config (a JSON object)")
  differ = config_differences(saved, config, resumable_keys)
  if differ:
    shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in differ)
    raise ConfigError(
        f"{path}: the checkpoint in this workdir was trained with another "
        f"config; it cannot be resumed with this one (saved -> now: {shown})."
        " Train into a new --workdir, or set these fields back; a resumed "
        f"run may change only {', '.join(resumable_keys)}")


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


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
  saved = _read_json(path)
  return ml_collections.ConfigDict(
      _with_defaults(config_lib.base_config().to_dict(), saved))


def append_metrics(workdir: str, record: dict[str, Any]) -> None:
  """Appends one evaluation record to `workdir/metrics.json` (atomically).

  A record of the same step and split replaces the earlier one: a run
  killed after an evaluation but before its next checkpoint evaluates that
  step again when resumed, and must not list it twice.
  """
  path = os.path.join(workdir, "metrics.json")
  same = (record.get("step"), record.get("split"))
  records = [r for r in read_metrics(workdir)
             if (r.get("step"), r.get("split")) != same]
  records.append(record)
  atomic_write_text(path, logs.strict_json(records, indent=2))


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)
