"""Orbax checkpoints of a run: the latest state (for resume) and the best one.

Layout under a workdir (its other files: workdir.py):
  checkpoints/latest/<step>/  train state + progress (epoch, batch, best, ...)
  checkpoints/best/<step>/    train state + the dev metrics that made it best

Orbax writes each step into a temporary directory and renames it when it is
complete, and only complete steps are listed: a checkpoint cut off half-way
(a killed process) is never restored.
"""

from __future__ import annotations

import os

import jax
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
    # Handlers named up front, so that a fresh manager can read a saved
    # item's metadata before restoring it (see check_fits).
    def manager(name):
      return ocp.CheckpointManager(
          os.path.join(root, name),
          item_handlers={"params": ocp.StandardCheckpointHandler(),
                         "opt": ocp.StandardCheckpointHandler(),
                         "progress": ocp.JsonCheckpointHandler()},
          options=ocp.CheckpointManagerOptions(max_to_keep=1, **options))
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

  @staticmethod
  def restore_params(manager, abstract_params):
    """Parameters of the manager's newest complete step, or None."""
    step = manager.latest_step()
    if step is None:
      return None
    check_fits(manager, step, "params", abstract_params)
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
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
