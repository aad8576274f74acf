"""Reader for the MIND file format (news.tsv + behaviors.tsv).

Both the official MIND release and the GENRE/ONCE Goodreads benchmark use it.
Rows are split on tabs only (no csv quoting: MIND titles contain quotes). A
malformed row raises DataFormatError naming file, line and field; item ids
that a behaviours row mentions but news.tsv lacks are dropped, counted and
reported in one warning per file, never turned into silent padding items.

A test split may come without labels (MIND-large's test: candidates are bare
item ids, `N1 N2`, not `N1-0 N2-1`): its labels read as types.UNLABELLED,
and Behaviors.is_labelled() is False, so no metric is ever computed on it;
run.py --mode=predict writes its leaderboard file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Sequence

from absl import logging
import numpy as np

from genre_jax.data import types
from genre_jax.errors import DataFormatError

NEWS_COLUMNS = ("item_id", "category", "subcategory", "title", "abstract",
                "url", "title_entities", "abstract_entities")
BEHAVIORS_COLUMNS = ("impression_id", "user_id", "time", "history",
                     "impressions")
# The news.tsv columns kept as item text, in ItemTable.text.
TEXT_FIELDS = ("category", "subcategory", "title", "abstract")
SPLITS = ("train", "dev", "test")


@dataclasses.dataclass
class ReadStats:
  """What read_behaviors kept and dropped from one behaviors.tsv.

  Attributes:
    path: the file read.
    rows_read: data rows in the file.
    rows_kept: rows returned (rows_read - rows_dropped).
    rows_dropped: rows dropped because none of their candidates is known.
    rows_affected: rows that lost at least one unknown item id.
    rows_without_click: kept rows whose clicked candidates were all unknown.
    ids_dropped: unknown item ids dropped (history + candidates).
    history_ids_dropped: of which from histories.
    candidate_ids_dropped: of which from candidates.
    distinct_unknown: distinct unknown item ids.
    new_users: users added to the user index by this file.
    labelled: False for a file whose candidates carry no labels.
  """

  path: str
  rows_read: int = 0
  rows_kept: int = 0
  rows_dropped: int = 0
  rows_affected: int = 0
  rows_without_click: int = 0
  ids_dropped: int = 0
  history_ids_dropped: int = 0
  candidate_ids_dropped: int = 0
  distinct_unknown: int = 0
  new_users: int = 0
  labelled: bool = True


def text_lines(path: str) -> Iterator[tuple[int, str]]:
  """(1-based line number, text with its newline) of each line of a UTF-8
  file; lines are decoded one by one, so a bad byte is a DataFormatError
  naming its line. A leading byte-order mark is dropped."""
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        yield line_no, raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise DataFormatError(path, line_no, None,
                              f"not valid UTF-8 ({e.reason})") from None


def _rows(path: str, columns: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
  """Yields (1-based line number, fields) of a tab-separated file.

  Only '\\n' ends a row (titles may hold other line-break characters); a
  trailing '\\r' and a leading byte-order mark are stripped, blank lines
  skipped. Lines are decoded one by one so a bad byte names its line.
  """
  for line_no, line in text_lines(path):
    line = line.rstrip("\n").rstrip("\r")
    if not line:
      continue
    fields = line.split("\t")
    if len(fields) != len(columns):
      raise DataFormatError(
          path, line_no, None,
          f"expected {len(columns)} tab-separated columns "
          f"({', '.join(columns)}), got {len(fields)}")
    yield line_no, fields


def read_news(paths: str | os.PathLike | Sequence[str | os.PathLike]
              ) -> types.ItemTable:
  """Reads one or several news.tsv files into an ItemTable.

  Several files are unioned in order (official MIND ships one per split): an
  id repeated across files keeps its first row. An id repeated within one
  file is an error.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [os.fspath(p) for p in paths]
  ids = [""]
  text = {f: [""] for f in TEXT_FIELDS}
  seen: dict[str, int] = {}  # item id -> row index
  conflicts = 0
  for path in paths:
    first_line: dict[str, int] = {}  # item id -> line in this file
    for line_no, fields in _rows(path, NEWS_COLUMNS):
      item_id = fields[0].strip()
      if not item_id:
        raise DataFormatError(path, line_no, "item_id", "empty item id")
      if item_id in first_line:
        raise DataFormatError(
            path, line_no, "item_id",
            f"duplicate item id '{item_id}' (first on line "
            f"{first_line[item_id]})")
      first_line[item_id] = line_no
      row = fields[1:5]  # category, subcategory, title, abstract
      if item_id in seen:
        old = seen[item_id]
        if [text[f][old] for f in TEXT_FIELDS] != row:
          conflicts += 1
        continue
      seen[item_id] = len(ids)
      ids.append(item_id)
      for f, value in zip(TEXT_FIELDS, row):
        text[f].append(value)
    if not first_line:  # A truncated download or a wrong file, not a dataset.
      raise DataFormatError(path, None, None,
                            "no rows: an empty news file (one item a line: "
                            f"{', '.join(NEWS_COLUMNS)})")
  if conflicts:
    logging.warning(
        "read_news: %d item ids appear in several of %s with different text; "
        "kept the first file's row for each.", conflicts, paths)
  n = len(ids)
  return types.ItemTable(
      ids=np.array(ids, dtype=object),
      text={f: np.array(v, dtype=object) for f, v in text.items()},
      synthetic=np.zeros(n, dtype=bool),
      popularity=np.zeros(n, dtype=np.int64))


def _parse_impressions(path: str, line_no: int, value: str
                       ) -> tuple[list[str], list[bool]]:
  """Splits 'ID-label ID-label ...' into ids and clicked flags."""
  tokens = value.split()
  ids = [t[:-2] for t in tokens]
  suffixes = {t[-2:] for t in tokens}
  if tokens and suffixes <= {"-0", "-1"} and "" not in ids:
    return ids, [t[-1] == "1" for t in tokens]  # fast path: all well formed
  if not tokens:
    raise DataFormatError(path, line_no, "impressions",
                          "no candidates (expected 'ID-label' tokens)")
  for tok in tokens:
    item_id, sep, label = tok.rpartition("-")
    if not sep:
      raise DataFormatError(
          path, line_no, "impressions",
          f"malformed token '{tok}': expected 'ID-label' with label 0 or 1 "
          "(only a test split may be unlabelled, and then no token has a "
          "label)")
    if not item_id:
      raise DataFormatError(path, line_no, "impressions",
                            f"malformed token '{tok}': empty item id")
    if label not in ("0", "1"):
      raise DataFormatError(path, line_no, "impressions",
                            f"token '{tok}': label '{label}' is not 0 or 1")
  raise AssertionError(f"{path}:{line_no}: no bad token in {value!r}")


def _is_labelled_token(token: str) -> bool:
  return len(token) > 2 and token[-2:] in ("-0", "-1")


def _parse_unlabelled(path: str, line_no: int, value: str
                      ) -> tuple[list[str], list[int]]:
  """Splits an unlabelled impressions column ('ID ID ...', MIND-large's
  test) into ids and UNLABELLED labels."""
  ids = value.split()
  if not ids:
    raise DataFormatError(path, line_no, "impressions",
                          "no candidates (expected item ids)")
  labelled = [t for t in ids if _is_labelled_token(t)]
  if labelled:
    raise DataFormatError(
        path, line_no, "impressions",
        f"token '{labelled[0]}' has a label, but the file's first row has "
        "none (an unlabelled test file lists bare item ids): a file is "
        "labelled throughout or not at all")
  return ids, [types.UNLABELLED] * len(ids)


def read_behaviors(path: str | os.PathLike, item_index: dict[str, int],
                   user_index: dict[str, int], *,
                   candidates_optional: bool = False,
                   allow_unlabelled: bool = False
                   ) -> tuple[types.Behaviors, ReadStats]:
  """Reads a behaviors.tsv into ragged Behaviors.

  Args:
    path: the behaviors.tsv file.
    item_index: item id -> row of the item table (ItemTable.index()).
    user_index: user id -> user index; grown in place for new users, which
      get max(existing) + 1 onwards (index 0 stays the unknown user).
    candidates_optional: for files that only carry users and histories (e.g.
      recommendation requests): an empty impressions column reads as no
      candidates, and a row none of whose candidates is known is kept (with
      no candidates) instead of dropped, so every row is returned. Malformed
      tokens still raise.
    allow_unlabelled: the file may be unlabelled (a test split: MIND-large's
      test lists bare candidate ids): when the first row's first candidate
      has no -0/-1 label, every candidate of the file reads as
      types.UNLABELLED (and a labelled token is an error). stats.labelled
      says which it was.

  Returns:
    The behaviours and the counts of what was dropped.
  """
  path = os.fspath(path)
  stats = ReadStats(path=path)
  next_user = max(user_index.values(), default=0) + 1
  if min(item_index.values(), default=1) < 1:  # never map an id to padding
    item_index = {k: v for k, v in item_index.items() if v >= 1}
  get = item_index.get
  unknown: set[str] = set()
  impression_ids, user_ids, users = [], [], []
  hist_items, hist_lens = [], []
  cand_items, cand_labels, cand_lens = [], [], []
  unlabelled = None  # decided by the first row with candidates
  for line_no, fields in _rows(path, BEHAVIORS_COLUMNS):
    stats.rows_read += 1
    impression_id, user_id = fields[0].strip(), fields[1].strip()
    if not impression_id:
      raise DataFormatError(path, line_no, "impression_id",
                            "empty impression id")
    if not user_id:
      raise DataFormatError(path, line_no, "user_id", "empty user id")
    if candidates_optional and not fields[4].strip():
      cand_ids, labels = [], []
    else:
      if unlabelled is None:
        first = fields[4].split()[:1]
        unlabelled = (allow_unlabelled and bool(first)
                      and not _is_labelled_token(first[0]))
      if unlabelled:
        cand_ids, labels = _parse_unlabelled(path, line_no, fields[4])
      else:
        cand_ids, labels = _parse_impressions(path, line_no, fields[4])
    hist_ids = fields[3].split()
    hist = [*map(get, hist_ids)]  # None marks an unknown id
    cands = [*map(get, cand_ids)]
    lost_hist = hist.count(None)
    lost_cand = cands.count(None)
    if lost_hist or lost_cand:
      stats.rows_affected += 1
      stats.history_ids_dropped += lost_hist
      stats.candidate_ids_dropped += lost_cand
      unknown.update(i for i, k in zip(hist_ids, hist) if k is None)
      unknown.update(i for i, k in zip(cand_ids, cands) if k is None)
      hist = [k for k in hist if k is not None]
      labels = [lab for k, lab in zip(cands, labels) if k is not None]
      cands = [k for k in cands if k is not None]
      if not cands and not candidates_optional:
        stats.rows_dropped += 1
        continue
      if cands and not unlabelled and True not in labels:
        stats.rows_without_click += 1
    user = user_index.get(user_id)
    if user is None:
      user = user_index[user_id] = next_user
      next_user += 1
      stats.new_users += 1
    impression_ids.append(impression_id)
    user_ids.append(user_id)
    users.append(user)
    hist_items.extend(hist)
    hist_lens.append(len(hist))
    cand_items.extend(cands)
    cand_labels.extend(labels)
    cand_lens.append(len(cands))
  stats.rows_kept = len(impression_ids)
  stats.labelled = not unlabelled
  stats.ids_dropped = stats.history_ids_dropped + stats.candidate_ids_dropped
  stats.distinct_unknown = len(unknown)
  if stats.ids_dropped:
    logging.warning(
        "%s: %d item ids not in news.tsv were dropped (%d distinct; %d from "
        "histories, %d from candidates) from %d of %d rows; %d rows were "
        "dropped because none of their candidates is known; %d kept rows "
        "have no known clicked candidate.",
        path, stats.ids_dropped, stats.distinct_unknown,
        stats.history_ids_dropped, stats.candidate_ids_dropped,
        stats.rows_affected, stats.rows_read, stats.rows_dropped,
        stats.rows_without_click)
  behaviors = types.Behaviors(
      impression_ids=np.array(impression_ids, dtype=object),
      user_ids=np.array(user_ids, dtype=object),
      users=np.array(users, dtype=np.int32),
      history_offsets=_offsets(hist_lens),
      history_items=np.array(hist_items, dtype=np.int32),
      cand_offsets=_offsets(cand_lens),
      cand_items=np.array(cand_items, dtype=np.int32),
      cand_labels=np.array(cand_labels, dtype=np.int8))
  return behaviors, stats


def _offsets(lengths: list[int]) -> np.ndarray:
  """Row lengths -> [M+1] int64 offsets starting at 0."""
  out = np.zeros(len(lengths) + 1, dtype=np.int64)
  np.cumsum(lengths, out=out[1:])
  return out


def _split_dirs(root: str, split: str, variant: str | None) -> list[str]:
  """Folders under root that may hold `split`'s files, in either layout."""
  if variant:
    names = [f"MIND{variant}_{split}"]
  else:
    names = [split] + sorted(
        d for d in _listdir(root)
        if d.startswith("MIND") and d.endswith(f"_{split}"))
  return [os.path.join(root, n) for n in names
          if os.path.isfile(os.path.join(root, n, "behaviors.tsv"))]


def _listdir(root: str) -> list[str]:
  return os.listdir(root) if os.path.isdir(root) else []


def mind_files(root: str | os.PathLike, splits: Sequence[str] = SPLITS, *,
               variant: str | None = None
               ) -> tuple[list[str], dict[str, str]]:
  """Finds the news.tsv files and each split's behaviors.tsv under root.

  Two layouts are recognised: root/news.tsv + root/<split>/behaviors.tsv (the
  Goodreads release), and one folder per split each with its own news.tsv and
  behaviors.tsv, named <split> or MIND<variant>_<split> (the official MIND
  release unpacked). A missing split is skipped unless it is "train".

  Args:
    root: the dataset folder.
    splits: the splits wanted.
    variant: when set ("demo", "small", "large"), only MIND<variant>_<split>
      folders are considered, so one folder may hold several releases.

  Returns:
    The news.tsv paths (to union, in order) and split name -> behaviors.tsv.
  """
  root = os.path.expanduser(os.fspath(root))
  expected = (f"expected {root}/news.tsv with {root}/<split>/behaviors.tsv, or "
              f"{root}/<split>/ or {root}/MIND<variant>_<split>/ folders each "
              "holding news.tsv and behaviors.tsv")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"MIND data folder {root} does not exist; "
                            f"{expected}")
  news = []
  if os.path.isfile(os.path.join(root, "news.tsv")):
    news.append(os.path.join(root, "news.tsv"))
  behaviors = {}
  for split in splits:
    dirs = _split_dirs(root, split, variant)
    if len(dirs) > 1:
      raise FileNotFoundError(
          f"{root}: several folders hold the {split} split ({dirs}); pass "
          "variant= or point the path at one release")
    if not dirs:
      if split == "train":
        raise FileNotFoundError(f"{root}: no train behaviors.tsv; {expected}")
      continue
    behaviors[split] = os.path.join(dirs[0], "behaviors.tsv")
    split_news = os.path.join(dirs[0], "news.tsv")
    if os.path.isfile(split_news):
      news.append(split_news)
  if not news:
    raise FileNotFoundError(f"{root}: no news.tsv found; {expected}")
  return news, behaviors


def read_mind_dir(root: str | os.PathLike, splits: Sequence[str] = SPLITS, *,
                  variant: str | None = None) -> types.Dataset:
  """Reads a MIND-format dataset folder into an untokenized Dataset.

  See mind_files for the layouts. Users are indexed in file order, train
  first. items.popularity counts each item's appearances among the train
  impressions' candidates (every one was shown; the clicked ones too). The
  test split alone may be unlabelled (see read_behaviors).
  """
  news, behaviors_paths = mind_files(root, splits, variant=variant)
  items = read_news(news)
  item_index = items.index()
  user_index: dict[str, int] = {}
  order = sorted(behaviors_paths, key=lambda s: s != "train")  # stable
  splits_out, stats = {}, {}
  for split in order:
    path = behaviors_paths[split]
    splits_out[split], stats[split] = read_behaviors(
        path, item_index, user_index, allow_unlabelled=split == "test")
    if not stats[split].rows_read:
      raise DataFormatError(path, None, None,
                            f"no rows: the {split} split's behaviors file is "
                            "empty (one impression a line: "
                            f"{', '.join(BEHAVIORS_COLUMNS)})")
    if not stats[split].rows_kept:
      raise DataFormatError(path, None, None,
                            f"none of the {split} split's "
                            f"{stats[split].rows_read} rows has a candidate "
                            f"item of {', '.join(news)}")
  train = splits_out["train"]
  items.popularity = np.bincount(
      train.cand_items, minlength=len(items.ids)).astype(np.int64)
  items.synthetic = np.zeros(len(items.ids), dtype=bool)
  user_vocab = np.empty(len(user_index) + 1, dtype=object)
  user_vocab[0] = ""
  for user_id, i in user_index.items():
    user_vocab[i] = user_id
  return types.Dataset(
      name="mind",
      items=items,
      user_vocab=user_vocab,
      splits={s: splits_out[s] for s in splits if s in splits_out},
      info={"source": os.fspath(root), "news_files": news,
            "read_stats": {s: dataclasses.asdict(v) for s, v in stats.items()}})
