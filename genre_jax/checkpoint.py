"""Orbax checkpoints of a run: the latest state (for resume) and the best one.

Layout under a workdir (its other files: workdir.py):
  checkpoints/latest/<save>/  train state + progress (epoch, batch, best, ...);
                              the two newest saves are kept
  checkpoints/best/<save>/    train state + progress as of the best dev AUC
  checkpoints/damaged/        saves that failed to read, moved out of the way

Orbax writes each step into a temporary directory and renames it when it is
complete, and only complete steps are listed: a checkpoint cut off half-way
(a killed process) is never restored. A complete save damaged later (a
truncated or deleted file, a disk error) is reported in one line and moved to
checkpoints/damaged/, and the previous intact save is used instead.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import os
import shutil
import sys
import tempfile
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from genre_jax.errors import ConfigError


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'a/b/c': shape} of every array (or array metadata) leaf of a pytree."""
  def name(key):  # DictKey, SequenceKey or GetAttrKey
    return str(getattr(key, "key",
                       getattr(key, "idx", getattr(key, "name", key))))

  return {"/".join(map(name, path)): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_fits(manager, step: int, item: str, abstract_tree) -> None:
  """Raises ConfigError naming every parameter the saved `item` lacks, has
  extra or holds in another shape than `abstract_tree` (the model's).

  Orbax reports only the first missing key and restores an array of another
  shape as saved, leaving the error to surface later, deep inside JAX.
  """
  saved = _leaf_shapes(manager.item_metadata(step)[item].tree)
  wanted = _leaf_shapes(abstract_tree)
  missing = sorted(set(wanted) - set(saved))
  extra = sorted(set(saved) - set(wanted))
  reshaped = sorted(k for k in set(saved) & set(wanted)
                    if saved[k] != wanted[k])
  if not (missing or extra or reshaped):
    return

  def listing(title, keys, show):
    shown = ", ".join(f"{k} {show(k)}" for k in keys[:8])
    more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
    return f"\n  {title} ({len(keys)}): {shown}{more}"

  text = (f"{manager.directory}/{step}/{item}: the saved checkpoint does not "
          "fit this model")
  if missing:
    text += listing("not in the checkpoint", missing, lambda k: list(wanted[k]))
  if extra:
    text += listing("in the checkpoint only", extra, lambda k: list(saved[k]))
  if reshaped:
    text += listing("shape differs (saved -> model)", reshaped,
                    lambda k: f"{list(saved[k])} -> {list(wanted[k])}")
  if any("word_table" in k.split("/") for k in missing) and any(
      "table" in k.split("/") for k in extra):
    text += ("\n  (genre_jax names the word embedding 'word_table' since "
             "0944cdf; this checkpoint was written before: retrain it)")
  if any(k.split("/")[0] == "head" for k in missing) and any(
      k.split("/")[0] == "transform" for k in extra):
    text += ("\n  (genre_jax keeps the masked-LM head under 'head' since "
             "4be8edd; this pretraining checkpoint was written before: "
             "rerun the pretraining)")
  raise ConfigError(text + "\nWas it trained with another config.model, "
                    "config.data or version of genre_jax?")


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds a complete latest or best checkpoint.

  Reads the folder names only (Orbax names a complete save by its number),
  so it opens no checkpoint manager and creates nothing.
  """
  for name in ("latest", "best"):
    folder = os.path.join(workdir, "checkpoints", name)
    if os.path.isdir(folder) and any(entry.isdigit()
                                     for entry in os.listdir(folder)):
      return True
  return False


def _is_straggler(error: BaseException | None, traceback) -> bool:
  """Whether an error reported outside any caller comes from a failed
  checkpoint operation: a closed event loop, or raised in Orbax's code."""
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return True
  while traceback is not None:
    if f"{os.sep}orbax{os.sep}" in traceback.tb_frame.f_code.co_filename:
      return True
    traceback = traceback.tb_next
  return False


def _silence_closed_loop_callbacks() -> None:
  """After a failed read or write, TensorStore's threads still complete the
  failed operation's futures, whose callbacks find Orbax's event loop closed
  and print a traceback each ("Event loop is closed"), and its abandoned
  coroutines and tasks report their errors when collected; none says
  anything the one-line report does not. Those alone are dropped, from then
  on, whichever way Python reports them (excepthook, unraisablehook,
  threading, asyncio's log)."""
  if getattr(sys.unraisablehook, "drops_closed_loop", False):
    return
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
  thread_hook = threading.excepthook

  def on_exception(kind, value, traceback):
    if not _is_straggler(value, traceback):
      excepthook(kind, value, traceback)

  def on_unraisable(unraisable):
    if not _is_straggler(unraisable.exc_value, unraisable.exc_traceback):
      unraisablehook(unraisable)

  def on_thread_exception(args):
    if not _is_straggler(args.exc_value, args.exc_traceback):
      thread_hook(args)

  on_unraisable.drops_closed_loop = True
  sys.excepthook, sys.unraisablehook = on_exception, on_unraisable
  threading.excepthook = on_thread_exception
  # The failed operation's other tasks are abandoned; when collected,
  # asyncio logs each one's error with its traceback.
  pylogging.getLogger("asyncio").addFilter(_drop_abandoned_task_errors)


def _drop_abandoned_task_errors(record: pylogging.LogRecord) -> bool:
  return "exception was never retrieved" not in str(record.msg)


@contextlib.contextmanager
def _library_noise_held():
  """Holds what is written to the process's stderr during the block and
  writes it out after, unless the block fails.

  A save that fails (a full disk) makes Orbax's and TensorStore's threads
  print pages of tracebacks on their own, before the error reaches the
  caller, which reports it in one line.
  """
  try:
    held = tempfile.TemporaryFile()
  except OSError:  # nowhere to hold it (the disk is full): let it through
    yield
    return
  with held:
    sys.stderr.flush()
    real = os.dup(2)
    os.dup2(held.fileno(), 2)
    failed = False
    try:
      yield
    except BaseException:
      failed = True
      _silence_closed_loop_callbacks()
      raise
    finally:
      sys.stderr.flush()
      os.dup2(real, 2)
      os.close(real)
      if not failed:
        held.seek(0)
        text = held.read()
        if text:
          sys.stderr.buffer.write(text)
          sys.stderr.flush()


class CheckpointDamagedError(ConfigError):
  """No save of a checkpoint folder could be read (each one damaged)."""


def _reason(error: BaseException) -> str:
  """The first line of an error's message, shortened: Orbax and TensorStore
  errors span pages."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  text = lines[0] if lines else type(error).__name__
  return text if len(text) <= 200 else text[:197] + "..."


def _on_every_process(ok: bool) -> bool:
  """Whether `ok` holds on every process of the run (a collective: each
  process must call it, in the same order)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def move_aside(manager, step: int) -> str:
  """Moves a damaged save of `manager` to checkpoints/damaged/ (kept for
  inspection, never listed again); returns where it went.

  Each process of a multi-process run calls it; process 0 alone moves the
  folder, between two barriers, so that the processes name the same target
  and none lists the save again before it is gone.
  """
  folder = os.path.join(os.fspath(manager.directory), str(step))
  damaged = os.path.join(os.path.dirname(os.fspath(manager.directory)),
                         "damaged")
  name = f"{os.path.basename(os.fspath(manager.directory))}-{step}"
  target, n = os.path.join(damaged, name), 1
  while os.path.exists(target):
    n += 1
    target = os.path.join(damaged, f"{name}.{n}")
  several = jax.process_count() > 1
  if several:
    multihost_utils.sync_global_devices(f"damaged save {folder}: named")
  if jax.process_index() == 0:
    os.makedirs(damaged, exist_ok=True)
    shutil.move(folder, target)
  if several:
    multihost_utils.sync_global_devices(f"damaged save {folder}: moved")
  manager.reload()
  return target


def newest_intact(managers, read):
  """`read(manager, step)` of the newest save that reads, trying each
  manager's saves newest first, then the next manager's; or None when there
  is no save at all.

  A save that fails to read (any error but a ConfigError, which says the
  save is intact but of another model) is reported in one warning line and
  moved to checkpoints/damaged/. Raises CheckpointDamagedError when saves
  exist but none reads. In a multi-process run a save counts as read only
  when every process read it, so all resume from the same one.
  """
  failures = []
  for manager in managers:
    for step in sorted(manager.all_steps(), reverse=True):
      error, result = None, None
      try:
        with _library_noise_held():
          result = read(manager, step)
      except ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        error = e
      if _on_every_process(error is None):
        return result
      where = os.path.join(os.fspath(manager.directory), str(step))
      reason = ("read here, but not by another process of this run"
                if error is None else _reason(error))
      failures.append(f"{where} ({reason})")
      target = move_aside(manager, step)
      logging.warning("Checkpoint %s is damaged and cannot be read (%s); "
                      "moved it to %s and trying the previous one.", where,
                      reason, target)
  if failures:
    raise CheckpointDamagedError(
        f"no checkpoint of this run can be read: {'; '.join(failures)} (now "
        "under checkpoints/damaged/); train again from the start: the same "
        "command in a new --workdir")
  return None


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
    # Two latest saves: when the newest is damaged, the one before resumes.
    keep = {"latest": 2, "best": 1}
    # Handlers named up front, so that a fresh manager can read a saved
    # item's metadata before restoring it (see check_fits).
    def manager(name):
      return ocp.CheckpointManager(
          os.path.join(root, name),
          item_handlers={"params": ocp.StandardCheckpointHandler(),
                         "opt": ocp.StandardCheckpointHandler(),
                         "progress": ocp.JsonCheckpointHandler()},
          options=ocp.CheckpointManagerOptions(max_to_keep=keep[name],
                                               **options))
    self.latest = manager("latest")
    self.best = manager("best")

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
    with _library_noise_held():
      manager.save(key, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state["params"]),
          opt=ocp.args.StandardSave({"opt": state["opt"],
                                     "step": state["step"]}),
          progress=ocp.args.JsonSave(progress)))
      manager.wait_until_finished()

  @staticmethod
  def _read_state(manager, step, abstract_state):
    check_fits(manager, step, "params", abstract_state["params"])
    check_fits(manager, step, "opt", {"opt": abstract_state["opt"],
                                      "step": abstract_state["step"]})
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state["params"]),
        opt=ocp.args.StandardRestore({"opt": abstract_state["opt"],
                                      "step": abstract_state["step"]}),
        progress=ocp.args.JsonRestore()))
    state = {"params": restored["params"], **restored["opt"]}
    return state, restored["progress"]

  def restore(self, abstract_state):
    """(state, progress) of the newest intact latest save, else of the best
    one (whose progress is the run's right after that evaluation); None for
    a run with no save. Damaged saves are moved aside (newest_intact)."""
    return newest_intact(
        (self.latest, self.best),
        lambda manager, step: self._read_state(manager, step, abstract_state))

  @staticmethod
  def restore_params(manager, abstract_params):
    """Parameters of the manager's newest complete step, or None.

    Raises CheckpointDamagedError, naming the save and why, when it cannot be
    read; nothing is moved (eval and recommend only read a workdir).
    """
    step = manager.latest_step()
    if step is None:
      return None
    try:
      with _library_noise_held():
        check_fits(manager, step, "params", abstract_params)
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointDamagedError(
          f"{os.fspath(manager.directory)}/{step}: the checkpoint is damaged "
          f"and cannot be read ({_reason(e)})") from None
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
    for manager in (self.latest, self.best):
      # Orbax 0.12 starts a background clean-up of half-written saves when a
      # manager opens, and close() does not wait for it: a program that
      # exits right after (an error, a quick eval) gets a traceback from
      # that thread at interpreter shutdown. Wait for it here.
      cleanup = getattr(manager, "_cleanup_tmp_directory_future", None)
      if cleanup is not None:
        cleanup.result()
      manager.close()
