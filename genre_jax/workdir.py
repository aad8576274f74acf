"""The files of a run directory, each written atomically.

  config.json          the run's full config (written before training; a
                       resume must keep it, see check_resumable)
  .lock                held by the one process writing the run (exclusive)
  metrics.json         every evaluation, appended as training goes
  final_metrics.json   the best checkpoint's dev/test metrics
  checkpoints/         Orbax checkpoints (checkpoint.py)

Kept apart from the checkpoints so that tools which only read or tabulate
finished runs (experiment grids) load no JAX.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
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

from genre_jax import config as config_lib
from genre_jax import logs
from genre_jax.errors import ConfigError

try:
  import fcntl  # POSIX advisory locks
except ImportError:  # Windows: runs are not locked
  fcntl = None


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
RESUMABLE_KEYS = config_lib.CACHE_KEYS + (
    "train.epochs", "train.max_steps", "train.patience", "train.log_every",
    "train.checkpoint_every", "train.prefetch", "train.dedup_items",
    "model.lm.pack", "eval.batch_size", "eval.metrics", "mesh.data",
    "mesh.fsdp")


def config_differences(saved: dict[str, Any],
                       config: ml_collections.ConfigDict,
                       ignore: tuple[str, ...] = ()
                       ) -> list[tuple[str, Any, Any]]:
  """(dotted field, saved value, config's value) of every field, outside
  `ignore`, where the saved config (a config.json) is not `config`.

  A field the saved config lacks (added to genre_jax since) and `config`
  holds at its default is no difference: it describes what the run did.
  """
  # Both through JSON, so tuples compare as lists.
  saved = config_lib.leaves(json.loads(json.dumps(saved)))
  wanted = config_lib.leaves(json.loads(config.to_json_best_effort()))
  defaults = config_lib.leaves(
      json.loads(config_lib.base_config().to_json_best_effort()))
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
  """The run's evaluation log (metrics.json), [] before the first one.

  A damaged log is a ConfigError naming the file and line: it is the run's
  only record of its dev evaluations, so it is never overwritten silently.
  """
  path = os.path.join(workdir, "metrics.json")
  if not os.path.exists(path):
    return []
  remedy = ("restore it from a backup, or move it away to start a new log "
            "(the checkpoints are not affected)")
  try:
    with open(path, encoding="utf-8") as f:
      records = json.load(f)
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path}: not UTF-8 text ({e.reason}); {remedy}") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); "
                      f"{remedy}") from None
  if not (isinstance(records, list) and
          all(isinstance(r, dict) for r in records)):
    raise ConfigError(f"{path}: not a list of evaluation records; {remedy}")
  return records


LOCK_FILE = ".lock"


def make_workdir(workdir: str, flag: str = "--workdir") -> str:
  """Creates `workdir` (and its parents); a path that cannot be a writable
  folder (a file, a folder under a file, no permission, a read-only disk) is
  a ConfigError naming it, before any work is done."""
  path = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(path, exist_ok=True)
  except FileExistsError:
    raise ConfigError(f"{flag}={workdir}: {path} is a file, not a folder; "
                      "choose another --workdir") from None
  except NotADirectoryError:
    raise ConfigError(f"{flag}={workdir}: a parent of {path} is a file; "
                      "choose another --workdir") from None
  except OSError as e:
    raise ConfigError(f"{flag}={workdir}: cannot create {path} "
                      f"({e.strerror}); choose another --workdir") from None
  if not os.path.isdir(path):
    raise ConfigError(f"{flag}={workdir}: {path} is not a folder")
  if not os.access(path, os.W_OK | os.X_OK):
    raise ConfigError(f"{flag}={workdir}: {path} is not writable; choose "
                      "another --workdir or fix its permissions")
  return path


@contextlib.contextmanager
def exclusive(workdir: str, what: str) -> Iterator[None]:
  """Holds `workdir`'s lock for the block: one writer per run directory.

  Two processes training (or generating) into one workdir would interleave
  checkpoints and metrics; the second to come fails at once with a
  ConfigError naming the holder (pid, host, what it runs, since when). The
  lock is an advisory `flock`, released by the kernel when its holder exits,
  so a killed run's lock is simply taken over by the next one. `what` is
  recorded for the message (e.g. "run.py --mode=train").
  """
  path = make_workdir(workdir)
  lock_path = os.path.join(path, LOCK_FILE)
  try:
    handle = open(lock_path, "a+", encoding="utf-8")
  except OSError as e:
    raise ConfigError(f"--workdir={workdir}: cannot write its lock file "
                      f"{lock_path} ({e.strerror}); choose another "
                      "--workdir or fix its permissions") from None
  try:
    if fcntl is not None:
      try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          raise
        handle.seek(0)
        holder = _holder_text(handle.read())
        raise ConfigError(
            f"--workdir={workdir} is in use by another run ({holder}); wait "
            "for it to end or choose another --workdir") from None
      handle.seek(0)
      previous = handle.read()
      if previous.strip():
        logging.info("Took the lock of %s, last held by %s (ended).",
                     workdir, _holder_text(previous))
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "what": what,
        "since": datetime.datetime.now().astimezone().isoformat(
            timespec="seconds")}) + "\n")
    handle.flush()
    yield
  finally:
    handle.close()  # releases the flock


def _holder_text(recorded: str) -> str:
  try:
    holder = json.loads(recorded)
    return (f"pid {holder['pid']} on {holder['host']}, {holder['what']}, "
            f"since {holder['since']}")
  except (ValueError, KeyError, TypeError):
    return "a process that left no details"
