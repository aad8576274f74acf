"""Top-K recommendation over the whole item table for users of a trained run.

A user is represented by their most recent history: for ids given on the
command line, the latest impression of that user in the dataset (test, then
dev, then train); for a behaviors file, each user's last row in that file.

Never recommended: the padding item, LLM-generated (synthetic) items, and
every item the user is known to have interacted with, i.e. the history
items and clicked candidates of all of that user's rows, over all splits of
the dataset and the rows of the behaviors file (so a leave-last-out test
positive is not recommended back).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import logging
import numpy as np

from genre_jax import metrics as metrics_lib
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


def _file_histories(behaviors: Behaviors, path: str):
  """(found [(user_id, user_index, history, profile)], unserved user ids).

  A user is served from their last row in the file. One whose history lists
  item ids but none known to the item table cannot be scored: unserved. An
  empty history column is served (flagged empty_history in the output).
  Rows align with the file's because every row is kept
  (candidates_optional).
  """
  from genre_jax.data import mind

  # pylint: disable-next=protected-access
  rows = mind._rows(path, mind.BEHAVIORS_COLUMNS)
  listed = [bool(fields[3].split()) for _, fields in rows]  # [M]
  assert len(listed) == len(behaviors), (len(listed), len(behaviors))
  found, unserved = [], []
  for row in _latest_rows(behaviors).values():
    user = _row(behaviors, row)
    if listed[row] and not len(user[2]):
      unserved.append(user[0])
    else:
      found.append(user)
  return found, unserved


def _interactions(splits: Sequence[Behaviors], user_ids: set[str]
                  ) -> dict[str, np.ndarray]:
  """User id -> items in any of its rows' histories or clicked candidates."""
  seen: dict[str, list[np.ndarray]] = {u: [] for u in user_ids}
  for behaviors in splits:
    for row, user_id in enumerate(behaviors.user_ids):
      if user_id in seen:
        h0, h1 = behaviors.history_offsets[row:row + 2]
        c0, c1 = behaviors.cand_offsets[row:row + 2]
        clicked = behaviors.cand_labels[c0:c1] == 1
        seen[user_id] += [behaviors.history_items[h0:h1],
                          behaviors.cand_items[c0:c1][clicked]]
  return {u: np.unique(np.concatenate(v)) if v else np.zeros(0, np.int32)
          for u, v in seen.items()}


def _top_k(row: np.ndarray, top_k: int) -> np.ndarray:
  """Indices of the top_k finite entries of row [N+1]: score desc, index asc.

  Ties (e.g. every item for a user with an empty history) are broken by item
  row so the output is deterministic. Fewer when fewer are finite.
  """
  k = min(top_k, int(np.isfinite(row).sum()))
  if k == 0:
    return np.zeros(0, np.int64)
  kth = -np.partition(-row, k - 1)[k - 1]  # k-th largest score
  above = np.flatnonzero(row > kth)
  tied = np.flatnonzero(row == kth)[:k - len(above)]
  top = np.concatenate([above, tied])
  return top[np.lexsort((top, -row[top]))]


def recommend(workdir: str, out_path: str, *, user_ids: Sequence[str] = (),
              behaviors_file: str = "", top_k: int = 10) -> dict:
  """Writes JSONL {"user_id", "items": [{"item_id", "score"}, ...]} per user.

  Items are ordered by score, ties by item row. A line also holds
  "fewer_than_k": true when fewer than top_k items could be recommended, and
  "empty_history": true when the user had no history item (all items score
  the same, so the order is by item row only); each key is present only
  when true. A behaviors file is read as requests: only user id and history
  matter, the impressions column may be empty (its clicked candidates, if
  any, are blocked).

  Returns a summary: number of users written, the unknown user ids (not in
  the dataset), the unserved user ids (file users whose history ids are all
  unknown items), each also logged, never a crash, and the number of lines
  flagged fewer_than_k / empty_history, and "beyond_accuracy": the lists'
  catalogue coverage, intra-list diversity, novelty and long-tail share
  (see beyond_accuracy below; also logged). With no user left to score it
  fails and leaves out_path as it was.
  """
  from genre_jax.data import mind  # reader for --behaviors_file
  from genre_jax.data import genre_augment as augment

  if top_k < 1:
    raise ConfigError(f"top_k must be >= 1, got {top_k}")
  if behaviors_file and not os.path.isfile(behaviors_file):
    raise ConfigError(f"behaviors file {behaviors_file}: no such file")
  config, dataset, evaluator, params = train_lib.load_for_inference(workdir)
  if behaviors_file:
    user_index = {u: i for i, u in enumerate(dataset.user_vocab) if i > 0}
    behaviors, _ = mind.read_behaviors(behaviors_file, dataset.items.index(),
                                       dict(user_index),
                                       candidates_optional=True)
    # Users unseen in training are scored from their history (inductive), with
    # the unknown-user index for any user-id embedding.
    behaviors.users[behaviors.users >= len(dataset.user_vocab)] = 0
    augment.extend_behaviors(behaviors, dataset)
    users, unserved = _file_histories(behaviors, behaviors_file)
    unknown = []
  else:
    users, unknown = _user_histories(dataset, user_ids)
    unserved = []
  for user_id in unserved:
    logging.warning("recommend: user '%s' in %s: none of its history item ids "
                    "is in the item table; not served.", user_id,
                    behaviors_file)
  for user_id in unknown:
    logging.error("recommend: unknown user id '%s': it has no impression in "
                  "the dataset's train/dev/test splits; skipped. Pass a "
                  "--behaviors_file with its history to score a new user.",
                  user_id)
  if not users:  # Nothing to write: keep whatever out_path holds.
    raise ConfigError(
        f"no user to recommend for: behaviors file {behaviors_file} has no "
        f"{'rows' if not unserved else 'user with a known history item'}"
        if behaviors_file else "no user to recommend for: none of "
        f"the user ids {list(user_ids)} has a history in the dataset")

  blocked = _interactions(
      [*dataset.splits.values()] + ([behaviors] if behaviors_file else []),
      {u[0] for u in users})
  history_len = int(config.data.history_len)
  item_vecs = evaluator.item_vectors(params)  # [N+1, D]
  never = np.zeros(len(dataset.items.ids), bool)
  never[0] = True
  if dataset.items.synthetic is not None:
    never |= dataset.items.synthetic
  lines = []
  # The lists' item rows (0 = an empty place), for beyond_accuracy.
  lists = np.zeros((len(users), min(top_k, len(never))), np.int64)
  fewer_than_k = empty_history = 0
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
      row = np.where(never, -np.inf, scores[i])  # [N+1]
      row[hist] = -np.inf
      row[blocked[user_id]] = -np.inf
      top = _top_k(row, top_k)
      lists[start + i, :len(top)] = top
      line = {"user_id": user_id,
              "items": [{"item_id": str(dataset.items.ids[j]),
                         "score": float(row[j])} for j in top]}
      if len(top) < top_k:
        line["fewer_than_k"] = True
        fewer_than_k += 1
      if not history[i].any():
        line["empty_history"] = True
        empty_history += 1
      lines.append(json.dumps(line))
  workdir_lib.atomic_write_text(out_path, "".join(l + "\n" for l in lines))
  logging.info("Wrote top-%d recommendations for %d users to %s", top_k,
               len(lines), out_path)
  if fewer_than_k or empty_history:
    logging.warning("recommend: %d users got fewer than %d items; %d had an "
                    "empty history (items in item-row order).", fewer_than_k,
                    top_k, empty_history)
  figures = beyond_accuracy(dataset, lists, np.asarray(item_vecs), ~never)
  logging.info("recommend: catalogue coverage %.4f, intra-list diversity "
               "%.4f, novelty %.2f bits, long-tail share %.4f (%d lists)",
               figures["coverage"], figures["diversity"], figures["novelty"],
               figures["long_tail_share"], figures["num_lists"])
  return {"num_users": len(lines), "unknown_users": unknown,
          "unserved_users": unserved, "num_fewer_than_k": fewer_than_k,
          "num_empty_history": empty_history,
          "out_path": os.path.abspath(out_path),
          "beyond_accuracy": figures}


def beyond_accuracy(dataset, lists: np.ndarray, item_vecs: np.ndarray,
                    catalogue: np.ndarray) -> dict:
  """metrics.beyond_accuracy of the [U, K] lists (item rows, 0 = none):
  coverage of the recommendable `catalogue` ([N+1] bool), diversity by the
  model's item vectors, and novelty and long-tail share by the train
  interactions (metrics.interaction_counts: distinct train users with the
  item in a history or a click; items.popularity without a train split).
  """
  if "train" in dataset.splits:
    counts = metrics_lib.interaction_counts(dataset.splits["train"],
                                            len(dataset.items.ids))
  else:
    counts = np.asarray(dataset.items.popularity if dataset.items.popularity
                        is not None else np.zeros(len(dataset.items.ids)))
  return metrics_lib.beyond_accuracy(lists, item_vecs, counts,
                                     catalogue=catalogue)
