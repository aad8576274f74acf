"""Exports a trained run's item and user vectors for ANN serving and analysis.

From the best checkpoint: every item's vector (`items.npy` [N, D], row i the
item on line i of `item_ids.txt`) and, for each impression of a split, the
user vector its history gives (`users.npy` [M, D], or [M, P, D] for
multi-interest users; line m of `users.tsv`: impression id, user id). With a
dot-product predictor a candidate's score is `users[m] @ items[i]` (scaled by
1/sqrt(D) under model.scaled_dot), which is what an ANN index serves.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from genre_jax import workdir as workdir_lib
from genre_jax.data import batching
from genre_jax.data.types import Behaviors
from genre_jax.errors import ConfigError
from genre_jax.train import evaluation

ITEMS_FILE, ITEM_IDS_FILE = "items.npy", "item_ids.txt"
USERS_FILE, USER_IDS_FILE = "users.npy", "users.tsv"


def user_vectors(evaluator: evaluation.Evaluator, params, item_vecs,
                 behaviors: Behaviors) -> np.ndarray:
  """[M, D] (or [M, P, D]) user vector of every impression's history."""
  graphdefs = evaluator.parts

  @jax.jit
  def users(params, item_vecs, batch):
    model = evaluation.merge(graphdefs.eval_graphdef, params, graphdefs.rest)
    _, _, user = evaluation.Evaluator._user(model, item_vecs, batch)
    return user.astype(jnp.float32)

  batcher = batching.EvalBatcher(
      behaviors, batch_size=evaluator.batch_size,
      history_len=int(evaluator.config.data.history_len))
  out = None
  for batch in batcher:
    inputs = {k: jnp.asarray(batch[k]) for k in
              ("history", "history_mask", "users", "profile") if k in batch}
    vectors = np.asarray(users(params, item_vecs, inputs))
    if out is None:
      out = np.zeros((len(behaviors),) + vectors.shape[1:], np.float32)
    rows = np.asarray(batch["impressions"])
    keep = rows >= 0
    out[rows[keep]] = vectors[keep]
  return out if out is not None else np.zeros((0, 0), np.float32)


def export(workdir: str, out_dir: str, split: str = "test") -> dict:
  """Writes the item vectors and `split`'s user vectors under out_dir;
  returns a summary (counts, shapes, files)."""
  config, dataset, evaluator, params = evaluation.load_for_inference(workdir)
  if split not in dataset.splits:
    raise ConfigError(f"--split={split}: the dataset has "
                      f"{sorted(dataset.splits)}")
  item_vecs = evaluator.item_vectors(params)  # [N+1, D]
  behaviors = dataset.splits[split]
  users = user_vectors(evaluator, params, item_vecs, behaviors)
  workdir_lib.make_workdir(out_dir, "--out")
  items = np.asarray(item_vecs)[1:]  # the padding row is not an item
  with workdir_lib.atomic_output(os.path.join(out_dir, ITEMS_FILE)) as tmp:
    with open(tmp, "wb") as f:
      np.save(f, items)
  with workdir_lib.atomic_output(os.path.join(out_dir, USERS_FILE)) as tmp:
    with open(tmp, "wb") as f:
      np.save(f, users)
  workdir_lib.atomic_write_text(
      os.path.join(out_dir, ITEM_IDS_FILE),
      "".join(f"{i}\n" for i in dataset.items.ids[1:]))
  workdir_lib.atomic_write_text(
      os.path.join(out_dir, USER_IDS_FILE),
      "".join(f"{imp}\t{user}\n" for imp, user in
              zip(behaviors.impression_ids, behaviors.user_ids)))
  summary = {"out_dir": out_dir, "split": split, "items": list(items.shape),
             "users": list(users.shape),
             "predictor": str(config.model.predictor),
             "scaled_dot": bool(config.model.get("scaled_dot", False))}
  workdir_lib.atomic_write_text(os.path.join(out_dir, "export.json"),
                                json.dumps(summary, indent=2))
  return summary
