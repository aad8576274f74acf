"""Honest splits: how the split that selects the model is made.

config.data.validation (seed: config.data.split_seed):

  "dev" (the default): the dataset's splits as they are; the model is
      selected on config.eval.dev_split ("dev", or "test" if asked).
  "train_users:<share>": that share of the train split's users, drawn with
      the seed, is held out of training: their train impressions become the
      "valid" split and leave "train" (Legommenders' protocol). dev and test
      stay as they are; items.popularity (train candidate counts) loses the
      held-out impressions' candidates.
  "dev_half": a seeded half of the dev impressions becomes "valid", the
      other half "test" (ONCE's protocol for MIND, which has no labelled
      test); "dev" itself is gone. A labelled test split the dataset had is
      dropped (with a warning): the protocol's test is the other dev half.
      MIND-large's unlabelled test is kept for the leaderboard under "test",
      so dev_half refuses it (ConfigError): use train_users there.

With train_users or dev_half the model is selected on "valid" (VALID), and
the test reported is disjoint from it: other impressions of the same file
(dev_half), or another file (train_users). `apply_validation` is a pure
function of the loaded Dataset (the prepared TFDS tables are untouched, and
so is the Dataset passed in); it records what it did in
dataset.info["validation"], including `sources` (each split's origin split
in the prepared data: impression ids are unique within one file only), and
applying it again with the same settings returns the dataset as it is.
"""

from __future__ import annotations

import dataclasses

from absl import logging
import ml_collections
import numpy as np

from genre_jax import config as config_lib
from genre_jax.data import types
from genre_jax.errors import ConfigError

VALID = "valid"
# Mixed into the seed so that the modes draw independently.
_STREAMS = {"train_users": 1, "dev_half": 2}


def validation_of(data_config) -> tuple[str, float, int]:
  """(kind, share, seed) of config.data; ConfigError naming a bad value."""
  value = data_config.get("validation", "dev")
  parsed = config_lib.parse_validation(value)
  if parsed is None:
    raise ConfigError(
        f"config.data.validation={value!r}: must be "
        f"{config_lib.CONFIG_RULES['data.validation'].describe()}")
  seed = data_config.get("split_seed", 0)
  if not config_lib.CONFIG_RULES["data.split_seed"].check(seed):
    raise ConfigError(f"config.data.split_seed={seed!r}: must be an integer "
                      ">= 0")
  return parsed[0], parsed[1], int(seed)


def selection_split(config: ml_collections.ConfigDict) -> str:
  """The split the model is selected on: VALID when data.validation makes
  one, else config.eval.dev_split."""
  kind, _, _ = validation_of(config.data)
  return str(config.eval.dev_split) if kind == "dev" else VALID


def held_out_split(dataset: types.Dataset, selected: str) -> str | None:
  """The labelled split whose metrics are the honest held-out figure: test
  (when labelled and not the selection split), else dev (on MIND, whose
  only labelled evaluation split is dev, when the model was selected on
  valid), else None: nothing the model was not selected on."""
  for split in ("test", "dev"):
    behaviors = dataset.splits.get(split)
    if (split != selected and behaviors is not None and len(behaviors)
        and behaviors.is_labelled()):
      return split
  return None


def take_rows(behaviors: types.Behaviors, rows: np.ndarray
              ) -> types.Behaviors:
  """The impressions `rows` (indices, in the order given) of `behaviors`.

  Generic over the Behaviors fields: `<p>_offsets` re-cuts the ragged
  fields named `<p>_*`; every other array field is one entry a row.
  """
  rows = np.asarray(rows, dtype=np.int64)
  names = [f.name for f in dataclasses.fields(behaviors)]
  out = {}
  for name in names:
    if not name.endswith("_offsets"):
      continue
    prefix = name[:-len("offsets")]
    offsets = getattr(behaviors, name)
    lengths = np.diff(offsets)[rows]
    new = np.zeros(len(rows) + 1, dtype=offsets.dtype)
    np.cumsum(lengths, out=new[1:])
    flat = (np.repeat(offsets[:-1][rows] - new[:-1], lengths)
            + np.arange(new[-1], dtype=np.int64))
    out[name] = new
    for other in names:
      if other.startswith(prefix) and other != name:
        out[other] = getattr(behaviors, other)[flat]
  for name in names:
    if name in out:
      continue
    value = getattr(behaviors, name)
    if value is None:
      out[name] = None
    elif isinstance(value, np.ndarray) and len(value) == len(behaviors):
      out[name] = value[rows]
    else:
      raise TypeError(f"Behaviors.{name}: neither ragged nor one entry per "
                      "row; take_rows does not know how to subset it")
  return types.Behaviors(**out)


def _draw(keys: np.ndarray, count: int, seed: int, stream: int) -> np.ndarray:
  """`count` of the distinct sorted `keys`, drawn with (seed, stream)."""
  rng = np.random.default_rng([seed, stream])
  return keys[rng.permutation(len(keys))[:count]]


def _record(kind: str, share: float, seed: int) -> dict:
  return {"validation": kind if kind != "train_users" else
          f"train_users:{share:g}", "split_seed": seed}


def apply_validation(dataset: types.Dataset,
                     data_config: ml_collections.ConfigDict
                     ) -> types.Dataset:
  """The dataset with the splits config.data.validation asks for (see the
  module docstring); `dataset` itself is not changed."""
  kind, share, seed = validation_of(data_config)
  record = _record(kind, share, seed)
  done = dataset.info.get("validation")
  if done is not None:
    if {k: done[k] for k in record} != record:
      raise ConfigError(
          f"config.data.validation={record['validation']!r} (split_seed "
          f"{seed}): this dataset was already split with "
          f"{done['validation']!r} (split_seed {done['split_seed']}); load "
          "it again to split it otherwise")
    return dataset
  if kind == "dev":
    return dataset
  if VALID in dataset.splits:
    raise ConfigError(
        f"config.data.validation={record['validation']!r} makes a "
        f"'{VALID}' split, but {dataset.name} already has one")
  sources = {split: split for split in dataset.splits}
  splits = dict(dataset.splits)
  items = dataset.items
  info = {**dataset.info, "validation": record}
  if kind == "train_users":
    train = dataset.splits["train"]
    users = np.unique(np.asarray(train.user_ids, dtype=str))
    if len(users) < 2:
      raise ConfigError(
          f"config.data.validation={record['validation']!r}: the train split "
          f"has {len(users)} user(s); holding some out needs at least 2")
    count = min(max(int(round(share * len(users))), 1), len(users) - 1)
    held = _draw(users, count, seed, _STREAMS[kind])
    out = np.isin(np.asarray(train.user_ids, dtype=str), held)
    valid = take_rows(train, np.flatnonzero(out))
    splits["train"] = take_rows(train, np.flatnonzero(~out))
    # Train candidate counts: the held-out impressions' go.
    if items.popularity is not None:
      popularity = items.popularity - np.bincount(
          valid.cand_items, minlength=len(items.popularity)).astype(
              items.popularity.dtype)
      items = dataclasses.replace(items, popularity=popularity)
    sources[VALID] = "train"
    record.update(held_out_users=int(count), train_users=int(len(users)))
    logging.info("data.validation=%s: %d of %d train users (%d impressions) "
                 "held out of training as the '%s' split.",
                 record["validation"], count, len(users), len(valid), VALID)
    order = ["train", VALID] + [s for s in dataset.splits if s != "train"]
    splits[VALID] = valid
  else:  # dev_half
    if "dev" not in dataset.splits:
      raise ConfigError(
          "config.data.validation='dev_half' halves the dev split, and "
          f"{dataset.name} has none (its splits: {sorted(dataset.splits)})")
    test = dataset.splits.get("test")
    if test is not None and not test.is_labelled():
      raise ConfigError(
          "config.data.validation='dev_half' makes the other dev half the "
          f"'test' split, but {dataset.name}'s test split is the unlabelled "
          "leaderboard test (MIND-large), kept for run.py --mode=predict: "
          "use data.validation='train_users:<share>' (or 'dev') with it")
    if test is not None:
      logging.warning(
          "data.validation=dev_half: the dataset's own test split (%d "
          "impressions) is dropped; the test reported is the dev half that "
          "is not the '%s' split.", len(test), VALID)
      record["dropped"] = ["test"]
    dev = dataset.splits["dev"]
    ids = np.asarray(dev.impression_ids, dtype=str)
    distinct = np.unique(ids)
    if len(distinct) < 2:
      raise ConfigError(
          "config.data.validation='dev_half': the dev split has "
          f"{len(distinct)} distinct impression(s); halving needs 2")
    chosen = np.isin(ids, _draw(distinct, len(distinct) // 2, seed,
                                _STREAMS[kind]))
    splits[VALID] = take_rows(dev, np.flatnonzero(chosen))
    splits["test"] = take_rows(dev, np.flatnonzero(~chosen))
    del splits["dev"], sources["dev"]
    sources[VALID] = sources["test"] = "dev"
    logging.info("data.validation=dev_half: %d dev impressions make the '%s' "
                 "split, the other %d the test split.", len(splits[VALID]),
                 VALID, len(splits["test"]))
    order = ["train", VALID, "test"] + [
        s for s in dataset.splits if s not in ("train", "dev", "test")]
  record["sources"] = {s: sources[s] for s in order}
  stats = dataset.info.get("read_stats")
  if isinstance(stats, dict):  # each split's file is its source's
    info["read_stats"] = {s: stats[sources[s]] for s in order
                          if sources[s] in stats}
  return dataclasses.replace(dataset, items=items,
                             splits={s: splits[s] for s in order}, info=info)
