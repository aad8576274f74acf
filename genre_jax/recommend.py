"""Top-K recommendation over the whole item table for users of a trained run.

A user is represented by their most recent history: for ids given on the
command line, the latest impression of that user in the dataset (test, then
dev, then train); for a behaviors file, each user's last row in that file.
Items in the user's history, the padding item and LLM-generated (synthetic)
items are never recommended.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from genre_jax import train as train_lib
from genre_jax import workdir as workdir_lib
from genre_jax.data.types import Behaviors
from genre_jax.errors import ConfigError


def _latest_rows(behaviors: Behaviors) -> dict[str, int]:
  """User id -> index of that user's last row in the split."""
  return {user: row for row, user in enumerate(behaviors.user_ids)}


def _row(behaviors: Behaviors, row: int):
  """(user_id, user index, history items, profile item) of one row."""
  hist = behaviors.history_items[behaviors.history_offsets[row]:
                                 behaviors.history_offsets[row + 1]]
  profile = 0 if behaviors.profiles is None else int(behaviors.profiles[row])
  return (str(behaviors.user_ids[row]), int(behaviors.users[row]), hist,
          profile)


def _user_histories(dataset, user_ids: Sequence[str]):
  """(found [(user_id, user_index, history, profile)], unknown ids)."""
  found, unknown = [], []
  by_split = [(name, dataset.splits[name], _latest_rows(dataset.splits[name]))
              for name in ("test", "dev", "train") if name in dataset.splits]
  for user_id in user_ids:
    for _, behaviors, rows in by_split:
      if user_id in rows:
        found.append(_row(behaviors, rows[user_id]))
        break
    else:
      unknown.append(user_id)
  return found, unknown


def _file_histories(behaviors: Behaviors):
  return [_row(behaviors, row) for row in _latest_rows(behaviors).values()]


def recommend(workdir: str, out_path: str, *, user_ids: Sequence[str] = (),
              behaviors_file: str = "", top_k: int = 10) -> dict:
  """Writes JSONL {"user_id", "items": [{"item_id", "score"}, ...]} per user.

  Returns a summary: number of users written and the unknown user ids (each
  reported with a clear message, never a crash). With no user left to score
  it fails and leaves out_path as it was.
  """
  from genre_jax.data import mind  # reader for --behaviors_file
  from genre_jax.genre import augment

  if top_k < 1:
    raise ConfigError(f"top_k must be >= 1, got {top_k}")
  if behaviors_file and not os.path.isfile(behaviors_file):
    raise ConfigError(f"behaviors file {behaviors_file}: no such file")
  config, dataset, evaluator, params = train_lib.load_for_inference(workdir)
  if behaviors_file:
    user_index = {u: i for i, u in enumerate(dataset.user_vocab) if i > 0}
    behaviors, _ = mind.read_behaviors(behaviors_file, dataset.items.index(),
                                       dict(user_index))
    # Users unseen in training are scored from their history (inductive), with
    # the unknown-user index for any user-id embedding.
    behaviors.users[behaviors.users >= len(dataset.user_vocab)] = 0
    augment.extend_behaviors(behaviors, dataset)
    users, unknown = _file_histories(behaviors), []
  else:
    users, unknown = _user_histories(dataset, user_ids)
  for user_id in unknown:
    logging.error("recommend: unknown user id '%s': it has no impression in "
                  "the dataset's train/dev/test splits; skipped. Pass a "
                  "--behaviors_file with its history to score a new user.",
                  user_id)
  if not users:  # Nothing to write: keep whatever out_path holds.
    raise ConfigError(
        f"no user to recommend for: behaviors file {behaviors_file} has no "
        f"rows" if behaviors_file else "no user to recommend for: none of "
        f"the user ids {list(user_ids)} has a history in the dataset")

  history_len = int(config.data.history_len)
  item_vecs = evaluator.item_vectors(params)  # [N+1, D]
  never = np.zeros(len(dataset.items.ids), bool)
  never[0] = True
  if dataset.items.synthetic is not None:
    never |= dataset.items.synthetic
  lines = []
  batch_size = evaluator.batch_size
  for start in range(0, len(users), batch_size):
    chunk = users[start:start + batch_size]
    history = np.zeros((batch_size, history_len), np.int32)
    profile = np.zeros(batch_size, np.int32)
    for i, (_, _, hist, prof) in enumerate(chunk):
      kept = hist[-history_len:]
      history[i, :len(kept)] = kept
      profile[i] = prof
    batch = {"history": history, "history_mask": history > 0,
             "users": np.array([u for _, u, _, _ in chunk] +
                               [0] * (batch_size - len(chunk)), np.int32)}
    if dataset.info.get("genre_users", {}).get("profile_of"):
      batch["profile"] = profile
    scores = evaluator.score_all_items(params, item_vecs, batch)  # [B, N+1]
    for i, (user_id, _, hist, _) in enumerate(chunk):
      row = np.where(never, -np.inf, scores[i])
      row[hist] = -np.inf
      k = min(top_k, int(np.isfinite(row).sum()))
      top = np.argpartition(-row, k - 1)[:k] if k > 0 else np.array([], int)
      top = top[np.argsort(-row[top], kind="stable")]
      lines.append(json.dumps({
          "user_id": user_id,
          "items": [{"item_id": str(dataset.items.ids[j]),
                     "score": float(row[j])} for j in top]}))
  workdir_lib.atomic_write_text(out_path, "".join(l + "\n" for l in lines))
  logging.info("Wrote top-%d recommendations for %d users to %s", top_k,
               len(lines), out_path)
  return {"num_users": len(lines), "unknown_users": unknown,
          "out_path": os.path.abspath(out_path)}
