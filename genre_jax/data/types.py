"""The in-memory data contract shared by readers, batchers, models and trainers.

Item index 0 is always the padding item; real items are 1..N. Behaviours are
stored ragged (flat arrays plus offsets) so that batching is vectorised numpy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

PAD_ITEM = 0
UNKNOWN_USER = 0
# The label of a candidate of an unlabelled split (MIND-large's test).
UNLABELLED = -1


@dataclasses.dataclass
class ItemTable:
  """All items of a dataset, raw and tokenized.

  Attributes:
    ids: [N+1] item id strings; ids[0] is "" (the padding item).
    text: field name -> [N+1] object array of raw strings ("" for padding).
    tokens: field name -> [N+1, L_field] int32 token ids (0 = pad token).
    masks: field name -> [N+1, L_field] bool, True on real tokens.
    synthetic: [N+1] bool, True for LLM-generated items (never candidates).
    popularity: [N+1] int64 click+impression counts in the train split.
  """

  ids: np.ndarray
  text: dict[str, np.ndarray]
  tokens: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  masks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  synthetic: np.ndarray | None = None
  popularity: np.ndarray | None = None

  @property
  def num_items(self) -> int:
    """Number of real items (the padding item not counted)."""
    return len(self.ids) - 1

  def index(self) -> dict[str, int]:
    """Item id -> row index."""
    return {item_id: i for i, item_id in enumerate(self.ids) if i > 0}


@dataclasses.dataclass
class Behaviors:
  """Impressions of one split, ragged.

  Row m's history is history_items[history_offsets[m]:history_offsets[m+1]]
  (oldest first); its candidates and labels likewise with cand_offsets.

  Attributes:
    impression_ids: [M] object array of the file's impression ids.
    user_ids: [M] object array of user id strings.
    users: [M] int32 user index into the dataset's user vocabulary (0 unknown).
    history_offsets: [M+1] int64.
    history_items: [sum_h] int32 item indices (never 0).
    cand_offsets: [M+1] int64.
    cand_items: [sum_c] int32 item indices (never 0).
    cand_labels: [sum_c] int8, 1 clicked, 0 not; UNLABELLED (-1) throughout
      in a split read without labels (is_labelled() is False).
    profiles: optional [M] int32 item index of the row user's GENRE profile
      (a synthetic pseudo-item of the item table; 0 = no profile).
  """

  impression_ids: np.ndarray
  user_ids: np.ndarray
  users: np.ndarray
  history_offsets: np.ndarray
  history_items: np.ndarray
  cand_offsets: np.ndarray
  cand_items: np.ndarray
  cand_labels: np.ndarray
  profiles: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.impression_ids)

  def history_lengths(self) -> np.ndarray:
    return np.diff(self.history_offsets)

  def num_candidates(self) -> np.ndarray:
    return np.diff(self.cand_offsets)

  def is_labelled(self) -> bool:
    """False for a split read without labels (MIND-large's test), whose
    candidates can be ranked (run.py --mode=predict) but never scored."""
    return not bool(np.any(self.cand_labels < 0))

  def real_history_lengths(self, synthetic: np.ndarray | None) -> np.ndarray:
    """[M] history lengths not counting synthetic (LLM-generated) items.

    This is what makes a user "cold": generated items appended to a cold
    user's history must not make them warm.
    """
    if synthetic is None or not np.any(synthetic):
      return self.history_lengths()
    real = ~np.asarray(synthetic, bool)[self.history_items]
    rows = np.repeat(np.arange(len(self)), self.history_lengths())
    return np.bincount(rows[real], minlength=len(self)).astype(np.int64)


@dataclasses.dataclass
class Dataset:
  """A prepared dataset: items, users and behaviour splits.

  Attributes:
    name: registry name of the dataset ("synthetic", "mind", ...).
    items: the item table.
    user_vocab: [U+1] user id strings; index 0 is the unknown user.
    splits: split name ("train", "dev", "test") -> Behaviors.
    side_tables: extra tables (e.g. GENRE generations) by name.
    info: free-form facts (e.g. the synthetic oracle's AUC per split).
  """

  name: str
  items: ItemTable
  user_vocab: np.ndarray
  splits: dict[str, Behaviors]
  side_tables: dict[str, Any] = dataclasses.field(default_factory=dict)
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ItemInputSpec:
  """What a model needs to know about the item inputs to build its layers.

  Attributes:
    vocab_size: tokenizer vocabulary size (word-embedding rows).
    fields: item text fields, in the order the item encoder reads them.
    lengths: tokens per field, aligned with `fields`.
    num_users: size of the user vocabulary including index 0 (unknown).
    num_items: items in the table, row 0 (padding) not counted.
  """

  vocab_size: int
  fields: tuple[str, ...]
  lengths: tuple[int, ...]
  num_users: int
  num_items: int = 0
