r"""Did the released GENRE generations see the held-out books?

The personalized generator was asked, for each cold user, for one new book
given their reading history. If its prompt held the user's whole sequence,
the test positive included, the LLM can copy that book's title, and
appending the generated book to the history then hands the model the
answer. This script counts, per generator file, how often the generated
title equals (case and spacing ignored) the title of the user's book at
each position from the end of their sequence: position 1 is the test
positive, 2 the book before it (the dev positive under leave-last-out),
and so on. Copying from a prompt favours the latest books; a fair
prediction could not pick out the test positive among unrelated books.
"chance" compares each title with the test positive of another user (a
fixed random pairing), the rate at which a title matches a book by luck.

  python experiments/genre_release_leak.py --data_dir=../shared/data/goodreads

Prints a table (matches / users with a book at that position, and the rate)
and ends with one line of JSON: {file: {"users": n, "positions": {k:
{"matches", "users", "rate"}}, "chance": {...}}}.
"""

from __future__ import annotations

import glob
import os
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from genre_jax.data import genre_parsing as parsing
from genre_jax.data import mind
from genre_jax.errors import exit_on_input_error
from genre_jax.logs import json_line
from genre_jax.genre import prompts

import common_flags

# Its genre/generator*.jsonl are the generations counted.
_DATA_DIR = common_flags.data_dir()
_SPLIT = flags.DEFINE_string(
    "split", "test", "The split whose rows give each user's sequence: its "
    "history, then its clicked item.")
_POSITIONS = flags.DEFINE_integer(
    "positions", 5, "Positions from the end of the sequence to report.")
_SEED = common_flags.seed()  # the chance pairing's


def _norm(title: str) -> str:
  return " ".join(title.lower().split())


def user_sequences(data_dir: str,
                   split: str) -> dict[str, list[str]] | None:
  """User id -> titles of their split row's history, then its clicked item
  (the last such row of a user wins); None when data_dir has no such split."""
  dataset = mind.read_mind_dir(data_dir, sorted({"train", split}))
  if split not in dataset.splits:
    return None
  rows = dataset.splits[split]
  titles = [_norm(str(t or "")) for t in dataset.items.text["title"]]
  clicked = rows.cand_labels == 1
  cand_rows = np.repeat(np.arange(len(rows)), rows.num_candidates())
  click_of = dict(zip(cand_rows[clicked].tolist(),
                      rows.cand_items[clicked].tolist()))
  sequences = {}
  for row, user in enumerate(rows.user_ids):
    if row not in click_of:
      continue
    history = rows.history_items[
        rows.history_offsets[row]:rows.history_offsets[row + 1]]
    sequences[str(user)] = [titles[i] for i in history.tolist()] + [
        titles[click_of[row]]]
  return sequences


def generated_titles(path: str) -> dict[str, str]:
  """User id -> the generated title, for every reply our parser accepts."""
  scheme = prompts.get_scheme("generator", "book")
  titles = {}
  for user, reply in parsing.load_generations(path, "user_id").items():
    parsed = scheme.parse(reply)
    if parsed.status.usable and str(parsed.value.get("title", "")).strip():
      titles[user] = _norm(str(parsed.value["title"]))
  return titles


def _rate(matches: int, users: int) -> dict[str, float | None]:
  """Matches among users; rate None (null in the JSON line) with no user."""
  return {"matches": matches, "users": users,
          "rate": matches / users if users else None}


def copy_rates(titles: dict[str, str], sequences: dict[str, list[str]],
               positions: int, seed: int) -> dict:
  """Match counts of generated titles by position from the sequence end."""
  users = sorted(u for u in titles if u in sequences)
  by_position = {}
  for k in range(1, positions + 1):
    at = [u for u in users if len(sequences[u]) >= k]
    by_position[str(k)] = _rate(
        sum(titles[u] == sequences[u][-k] for u in at), len(at))
  # Chance: each title against the test positive of another user.
  others = np.random.default_rng(seed).permutation(len(users))
  pairs = [(u, users[j]) for u, j in zip(users, others.tolist())
           if users[j] != u]
  chance = _rate(sum(titles[u] == sequences[v][-1] for u, v in pairs),
                 len(pairs))
  return {"users": len(users), "positions": by_position, "chance": chance}


def table(results: dict[str, dict]) -> str:
  positions = sorted({int(k) for r in results.values()
                      for k in r["positions"]})
  names = {1: "test click", 2: "2nd last", 3: "3rd last"}
  header = ["file", "users"] + [names.get(k, f"{k}th last")
                                for k in positions] + ["chance"]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for name, r in results.items():
    cells = [r["positions"][str(k)] for k in positions] + [r["chance"]]
    lines.append("| " + " | ".join(
        [name, str(r["users"])] +
        [f"{c['matches']}/{c['users']} ("
         + ("-" if c["rate"] is None else f"{100 * c['rate']:.2f}%") + ")"
         for c in cells]) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  data_dir = os.path.abspath(os.path.expanduser(_DATA_DIR.value))
  files = sorted(glob.glob(os.path.join(data_dir, "genre", "generator*.jsonl")))
  if not files:
    raise app.UsageError(f"--data_dir={data_dir}: no genre/generator*.jsonl")
  if _POSITIONS.value < 1:
    raise app.UsageError(f"--positions={_POSITIONS.value}: must be >= 1")
  try:
    sequences = user_sequences(data_dir, _SPLIT.value)
  except FileNotFoundError as e:
    raise app.UsageError(f"--data_dir={data_dir}: {e}") from e
  if sequences is None:
    raise app.UsageError(f"--split={_SPLIT.value}: {data_dir} has no such "
                         "split")
  results = {os.path.basename(path): copy_rates(
      generated_titles(path), sequences, _POSITIONS.value, _SEED.value)
             for path in files}
  print(f"Generated titles equal to the title of the user's k-th last book "
        f"({_SPLIT.value} rows: history, then the clicked book), "
        f"{_DATA_DIR.value}")  # as given: a results folder keeps this table
  print(table(results))
  print(json_line(results))


if __name__ == "__main__":
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
