"""TFDS builders for MIND, the GENRE/ONCE Goodreads release and synthetic data.

Each dataset is a TFDS builder (array_record files, rows in file order) with
one BuilderConfig per table: `<prefix>_items`, `<prefix>_behaviors` (splits
train/dev/test) and, for Goodreads, `<prefix>_genre` (one split per GENRE
generation file). Rows hold the validated file content as strings (item ids,
not indices), so a prepared table reads back on its own (open the builder by
config name), but load_dataset needs the source files: see the prefix below.

`load_dataset` prepares the tables once under config data.data_dir, converts
them to the in-memory Dataset (item indices, ragged behaviours) and tokenizes
the item text; both conversions are cached as .npz files next to the TFDS
files, keyed by what they depend on, and written atomically.

The builder prefix is a short hash of what the data depends on: the source
files' names (relative to config data.path), sizes and mtimes (MIND: the
variant's zips or unpacked TSVs; Goodreads: news and behaviours for those
tables, the generation files for the genre table), or the synthetic sizes,
seed and generator code. A changed source therefore gets a new config and is
rebuilt; the same files moved elsewhere (mtimes kept) are not. As the prefix
is computed from the source files, load_dataset fails without them, naming
the prepared versions under data_dir: it cannot tell which one they were.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import glob
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from genre_jax import registry
from genre_jax import workdir as workdir_lib
from genre_jax.data import genre_augment
from genre_jax.data import mind
from genre_jax.data import synthetic
from genre_jax.data import tokenize
from genre_jax.data import types
from genre_jax.errors import ConfigError, DataFormatError

# Bump when the .npz cache layout or the record -> array conversion changes.
_CACHE_FORMAT = 1
# Records decoded per data-source call.
_READ_CHUNK = 8192
_MIND_URL = "https://msnews.github.io/"
# Every variant needs train and dev (labelled). MINDlarge_test ships without
# click labels: when its zip or folder is there, it is read as an unlabelled
# test split (no metrics; run.py --mode=predict writes its leaderboard file).
_MIND_SPLITS = ("train", "dev")
_MIND_OPTIONAL_SPLITS = ("test",)
_MIND_VARIANTS = ("demo", "small", "large")


@dataclasses.dataclass(eq=False)
class TableConfig(tfds.core.BuilderConfig):
  """A builder config for one table of a dataset.

  Attributes:
    table: "items", "behaviors" or "genre".
  """

  table: str = "items"


@dataclasses.dataclass
class Source:
  """Where a dataset comes from, read lazily (only when a table is prepared).

  Attributes:
    prefix: the builder-config name prefix (a hash of the source).
    path: the source folder, reported in Dataset.info["source"].
    tables: the tables this dataset has.
    read: reads the source into an untokenized Dataset.
    side_files: GENRE generation files, table name -> path.
    side_prefix: the genre table's prefix (a hash of the side files alone),
      so adding or changing a generations file rebuilds that table only.
  """

  prefix: str
  path: str
  tables: tuple[str, ...]
  read: Callable[[], types.Dataset]
  side_files: dict[str, str] = dataclasses.field(default_factory=dict)
  side_prefix: str = ""

  def config_name(self, table: str) -> str:
    """The builder-config name of a table: `<prefix>_<table>`."""
    if table == "genre" and self.side_prefix:
      return f"{self.side_prefix}_{table}"
    return f"{self.prefix}_{table}"

  @functools.cached_property
  def dataset(self) -> types.Dataset:
    return self.read()

  @functools.cached_property
  def generations(self) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Side table name -> (id field, [(id, response JSON)] in file order)."""
    return {name: _read_generations(path)
            for name, path in self.side_files.items()}

  def is_read(self, what: str) -> bool:
    """Whether `dataset` or `generations` was read in this process."""
    return what in self.__dict__


TABLES = ("items", "behaviors", "genre")


def _features(table: str) -> tfds.features.FeaturesDict:
  """The row layout of a table: the file content as strings, ids not indices."""
  text = tfds.features.Text
  if table == "items":
    return tfds.features.FeaturesDict(dict(
        item_id=text(), **{f: text() for f in mind.TEXT_FIELDS},
        popularity=tfds.features.Scalar(np.int64)))
  if table == "behaviors":
    ids = functools.partial(tfds.features.Tensor, shape=(None,),
                            dtype=np.object_)
    return tfds.features.FeaturesDict(dict(
        impression_id=text(), user_id=text(), history=ids(), candidates=ids(),
        labels=tfds.features.Tensor(shape=(None,), dtype=np.int8)))
  return tfds.features.FeaturesDict(dict(id=text(), response_json=text()))


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo of a table made from local files only.

  TFDS looks for an unprepared dataset's info in its public bucket, and that
  lookup leaves an empty /tmp/tmp*tfds folder behind on every build; our
  tables are never in the bucket, so there is nothing to look up.
  """

  def initialize_from_bucket(self) -> None:
    """Keeps the info the builder declared (see the class docstring)."""


class _TableBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes one table of a MIND-format dataset, in source order.

  Subclasses name the dataset and say how to find its source (`source`).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Items, behaviours and GENRE side tables."}

  def __init__(self, *, source: Source | None = None, **kwargs):
    self._source = source
    super().__init__(**kwargs)

  @classmethod
  @abc.abstractmethod
  def source(cls, data_config: ml_collections.ConfigDict,
             data_dir: str) -> Source:
    """Where this dataset's files are, from config.data (nothing read yet)."""

  @classmethod
  def get_builder_config(cls, name: str, version=None) -> TableConfig | None:
    """A predefined config, else one made from a `<prefix>_<table>` name.

    Prefixes that hash the source cannot be listed in BUILDER_CONFIGS; this
    lets TFDS open any of them by name (also without a source, to read).
    """
    if config := super().get_builder_config(name, version):
      return config
    prefix, _, table = name.rpartition("_")
    if not prefix or table not in TABLES:
      return None
    return TableConfig(name=name, table=table,
                       description=f"{table} of {cls.name} source {prefix}")

  def _info(self) -> tfds.core.DatasetInfo:
    table = self.builder_config.table
    return _LocalDatasetInfo(
        builder=self,
        description=self.__doc__,
        features=_features(table),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    """Reads the source once; items -> "items", behaviours -> their splits."""
    del dl_manager  # Sources are local: no downloads.
    if self._source is None:
      raise ValueError(f"{self.name}/{self.builder_config.name} is not "
                       "prepared and no source was given; use load_dataset")
    table = self.builder_config.table
    if table == "genre":
      tables = self._source.generations
      self.info.metadata["id_fields"] = {n: t[0] for n, t in tables.items()}
      return {name: self._generate_examples(_genre_rows(rows))
              for name, (_, rows) in tables.items()}
    dataset = self._source.dataset
    if table == "items":
      self.info.metadata["source"] = self._source.path
      if "oracle" in dataset.info:
        self.info.metadata["oracle"] = dataset.info["oracle"]
      return {"items": self._generate_examples(_item_rows(dataset.items))}
    self.info.metadata["read_stats"] = dataset.info.get("read_stats", {})
    return {split: self._generate_examples(
        _behavior_rows(behaviors, dataset.items.ids))
            for split, behaviors in dataset.splits.items()}

  def _generate_examples(self, rows: Iterator[tuple[int, dict]]):
    """Yields (key, row) in source order (the key is the row number)."""
    yield from rows

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and
  # "... downloaded and prepared" to stdout; these tables are local files,
  # prepared, never downloaded: say that, in the log.
  def _log_download_bytes(self) -> None:
    logging.info("Preparing %s/%s (once) in %s", self.name,
                 self.builder_config.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("Prepared %s/%s", self.name, self.builder_config.name)


def _item_rows(items: types.ItemTable) -> Iterator[tuple[int, dict]]:
  for i in range(1, len(items.ids)):
    row = {f: items.text[f][i] for f in mind.TEXT_FIELDS}
    yield i, dict(item_id=items.ids[i], popularity=int(items.popularity[i]),
                  **row)


def _behavior_rows(b: types.Behaviors,
                   ids: np.ndarray) -> Iterator[tuple[int, dict]]:
  for m in range(len(b)):
    h0, h1 = b.history_offsets[m], b.history_offsets[m + 1]
    c0, c1 = b.cand_offsets[m], b.cand_offsets[m + 1]
    yield m, dict(impression_id=b.impression_ids[m], user_id=b.user_ids[m],
                  history=ids[b.history_items[h0:h1]],
                  candidates=ids[b.cand_items[c0:c1]],
                  labels=b.cand_labels[c0:c1])


def _genre_rows(rows: list[tuple[str, str]]) -> Iterator[tuple[int, dict]]:
  for k, (key, response) in enumerate(rows):
    yield k, dict(id=key, response_json=response)


def _read_generations(path: str) -> tuple[str, list[tuple[str, str]]]:
  """Reads a GENRE JSONL file: its id field and (id, response JSON) per line.

  Lines keep file order, duplicates included. `response_json` is the JSON
  text of the line's "response" value (json.loads gives it back exactly);
  parsing the LLM reply inside it is genre_jax.genre's job.
  """
  id_field, rows = "", []
  for line_no, line in mind.text_lines(path):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataFormatError(path, line_no, None,
                            f"not a JSON object: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # too deep, too many digits
      raise DataFormatError(path, line_no, None,
                            f"not a usable JSON object: {e}") from None
    if not isinstance(obj, dict):
      raise DataFormatError(path, line_no, None, "not a JSON object")
    keys = [k for k in ("item_id", "user_id") if k in obj]
    if len(keys) != 1:
      raise DataFormatError(path, line_no, "item_id",
                            "expected exactly one of 'item_id', 'user_id'")
    key = keys[0]
    if id_field and key != id_field:
      raise DataFormatError(path, line_no, key,
                            f"earlier lines use '{id_field}'")
    id_field = key
    if not isinstance(obj[key], str) or not obj[key]:
      raise DataFormatError(path, line_no, key, "must be a non-empty string")
    if "response" not in obj:
      raise DataFormatError(path, line_no, "response", "missing")
    try:
      response = json.dumps(obj["response"], ensure_ascii=False)
    except (ValueError, RecursionError) as e:
      raise DataFormatError(path, line_no, "response",
                            f"not usable: {e}") from None
    rows.append((obj[key], response))
  return id_field or "item_id", rows


def _short_hash(*parts: Any) -> str:
  text = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def _files_hash(root: str, paths: Sequence[str]) -> str:
  """Hash of the files' names (relative to root), sizes and mtimes."""
  facts = []
  for path in paths:
    st = os.stat(path)
    facts.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
  return _short_hash(facts)


@registry.DATASETS.register("mind")
class GenreJaxMind(_TableBuilder):
  """The official MIND release (demo, small or large), from its zips.

  There is no download: config data.path is the manual_dir holding
  MIND<variant>_train.zip and MIND<variant>_dev.zip, or the folders they
  unpack to (each with news.tsv and behaviors.tsv), and MINDlarge_test.zip
  (or its folder) when it is there: an unlabelled test split. The prefix is
  `<variant>_<hash of those files>`.
  """

  name = "genre_jax_mind"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Download MIND<variant>_train.zip and MIND<variant>_dev.zip (variant "
      f"demo, small or large) from {_MIND_URL} into the manual_dir "
      "(config data.path); unpacked folders of the same names work too.")

  @classmethod
  def source(cls, data_config: ml_collections.ConfigDict,
             data_dir: str) -> Source:
    variant = str(data_config.variant)
    if variant not in _MIND_VARIANTS:
      raise ConfigError(f"config.data.variant='{variant}': choose one of "
                        f"{list(_MIND_VARIANTS)}")
    manual_dir = os.path.abspath(os.path.expanduser(
        str(data_config.path) or os.path.join(data_dir, "downloads", "manual")))
    found = _find_mind_release(manual_dir, variant)
    # Every file the reader may open: the zips, or the unpacked TSVs (and a
    # news.tsv beside the folders, which mind.read_mind_dir also reads).
    files = [os.path.join(manual_dir, "news.tsv")]
    for kind, path in found.values():
      files += [path] if kind == "zip" else [
          os.path.join(path, "news.tsv"), os.path.join(path, "behaviors.tsv")]
    files = [f for f in files if os.path.isfile(f)]
    return Source(
        prefix=f"{variant}_{_files_hash(manual_dir, files)}", path=manual_dir,
        tables=("items", "behaviors"),
        read=functools.partial(_read_mind_release, manual_dir, variant,
                               data_dir, found))


def _find_mind_release(manual_dir: str, variant: str
                       ) -> dict[str, tuple[str, str]]:
  """Split -> ("dir", folder) or ("zip", path) of MIND<variant>_<split>;
  the optional splits (test) only when they are there."""
  found, missing = {}, []
  for split in _MIND_SPLITS + _MIND_OPTIONAL_SPLITS:
    stem = os.path.join(manual_dir, f"MIND{variant}_{split}")
    if os.path.isfile(os.path.join(stem, "behaviors.tsv")):
      found[split] = ("dir", stem)
    elif os.path.isfile(stem + ".zip"):
      found[split] = ("zip", stem + ".zip")
    elif split in _MIND_SPLITS:
      missing.append(split)
  if missing:
    names = [f"MIND{variant}_{s}.zip" for s in _MIND_SPLITS]
    raise FileNotFoundError(
        f"MIND {variant}: missing the {', '.join(missing)} split(s) in "
        f"{manual_dir} (config data.path). Expected the official files "
        f"{' and '.join(names)} there, or the folders they unpack to "
        f"({', '.join(n[:-4] + '/' for n in names)} each with news.tsv and "
        f"behaviors.tsv). Download them from {_MIND_URL} (this code never "
        "downloads).")
  return found


def _read_mind_release(manual_dir: str, variant: str, data_dir: str,
                       found: dict[str, tuple[str, str]]) -> types.Dataset:
  """Reads MIND<variant>_{train,dev} (and _test when found) from zips or
  unpacked folders."""
  splits = tuple(found)
  if all(kind == "dir" for kind, _ in found.values()):
    dataset = mind.read_mind_dir(manual_dir, splits, variant=variant)
  else:
    os.makedirs(data_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir,
                                     prefix=".mind_staging") as staging:
      for split, (kind, path) in found.items():
        target = os.path.join(staging, f"MIND{variant}_{split}")
        if kind == "dir":
          os.symlink(path, target)
        else:
          _extract_tsvs(path, target)
      dataset = mind.read_mind_dir(staging, splits, variant=variant)
  dataset.info["source"] = manual_dir
  return dataset


def _extract_tsvs(zip_path: str, out_dir: str) -> None:
  """Extracts news.tsv and behaviors.tsv (wherever they sit) from a zip."""
  os.makedirs(out_dir)
  try:
    with zipfile.ZipFile(zip_path) as zf:
      for wanted in ("news.tsv", "behaviors.tsv"):
        members = [m for m in zf.namelist()
                   if os.path.basename(m) == wanted]
        if len(members) != 1:
          raise FileNotFoundError(
              f"{zip_path}: expected one {wanted} inside, found "
              f"{len(members)} ({members}); is this an official MIND zip?")
        with zf.open(members[0]) as src, open(
            os.path.join(out_dir, wanted), "wb") as dst:
          shutil.copyfileobj(src, dst, length=1 << 20)
  except zipfile.BadZipFile as e:
    raise FileNotFoundError(f"{zip_path}: not a readable zip ({e}); "
                            f"download it again from {_MIND_URL}") from None


@registry.DATASETS.register("goodreads_genre")
class GenreJaxGoodreads(_TableBuilder):
  """The GENRE/ONCE Goodreads benchmark in MIND format, with GENRE outputs.

  config data.path holds news.tsv, {train,dev,test}/behaviors.tsv and
  genre/*.jsonl (GPT-3.5 replies, kept raw as side tables).
  """

  name = "genre_jax_goodreads"

  @classmethod
  def source(cls, data_config: ml_collections.ConfigDict,
             data_dir: str) -> Source:
    del data_dir  # The release is read in place.
    if not str(data_config.path):
      raise ConfigError(
          "config.data.path is empty: set it to the Goodreads release folder "
          "(news.tsv, train/, dev/, test/, genre/)")
    root = os.path.abspath(os.path.expanduser(str(data_config.path)))
    news, behaviors = mind.mind_files(root)
    side = {os.path.splitext(os.path.basename(p))[0]: p
            for p in sorted(glob.glob(os.path.join(root, "genre", "*.jsonl")))}
    files = news + [behaviors[s] for s in sorted(behaviors)]
    tables = ("items", "behaviors") + (("genre",) if side else ())
    return Source(prefix="g" + _files_hash(root, files), path=root,
                  tables=tables, read=functools.partial(mind.read_mind_dir,
                                                        root),
                  side_files=side,
                  side_prefix="g" + _files_hash(root, list(side.values())))


@registry.DATASETS.register("synthetic")
class GenreJaxSynthetic(_TableBuilder):
  """The planted-preference demo dataset of genre_jax.data.synthetic.

  Its MIND files are generated under DATA_DIR/sources/ from config
  data.synthetic (sizes and seed); the oracle AUCs go into the metadata.
  """

  name = "genre_jax_synthetic"

  @classmethod
  def source(cls, data_config: ml_collections.ConfigDict,
             data_dir: str) -> Source:
    s = data_config.synthetic
    sizes = dict(num_users=int(s.num_users), num_items=int(s.num_items),
                 num_topics=int(s.num_topics), seed=int(s.seed))
    # synthetic.generate's limits, checked here to name the config field
    # (its ValueError came out of run.py as a traceback).
    for field, least in (("num_users", 1), ("num_items", 200),
                         ("num_topics", 2)):
      if sizes[field] < least:
        raise ConfigError(f"config.data.synthetic.{field}={sizes[field]}: "
                          f"the synthetic data needs at least {least}")
    with open(synthetic.__file__, "rb") as f:
      code = hashlib.sha256(f.read()).hexdigest()
    prefix = "s" + _short_hash(sizes, code)
    folder = os.path.join(data_dir, "sources", f"synthetic_{prefix}")
    return Source(prefix=prefix, path=folder, tables=("items", "behaviors"),
                  read=functools.partial(_read_synthetic, folder, sizes))


def _read_synthetic(folder: str, sizes: dict[str, int]) -> types.Dataset:
  """Generates the synthetic MIND files once (atomically), then reads them."""
  if not os.path.isfile(os.path.join(folder, "oracle.json")):
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    workdir_lib.remove_abandoned_temporaries(os.path.dirname(folder))
    tmp = workdir_lib.temporary_path(folder)
    os.mkdir(tmp)
    try:
      synthetic.write_synthetic(tmp, **sizes)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    try:
      os.replace(tmp, folder)
    except OSError:  # Another process got there first: same content.
      shutil.rmtree(tmp, ignore_errors=True)
  with open(os.path.join(folder, "oracle.json"), encoding="utf-8") as f:
    oracle = json.load(f)
  dataset = mind.read_mind_dir(folder)
  dataset.info["oracle"] = oracle
  return dataset


# --- Reading prepared tables back -------------------------------------------


def _pack(prefix: str, values: Sequence[bytes]) -> dict[str, np.ndarray]:
  """Byte strings -> one uint8 buffer plus [n+1] offsets (no pickling)."""
  lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
  offsets = np.zeros(len(values) + 1, dtype=np.int64)
  np.cumsum(lengths, out=offsets[1:])
  return {f"{prefix}.utf8": np.frombuffer(b"".join(values), dtype=np.uint8),
          f"{prefix}.offsets": offsets}


def _unpack(arrays: dict[str, np.ndarray], prefix: str) -> np.ndarray:
  """Inverse of _pack: an object array of str."""
  data = arrays[f"{prefix}.utf8"].tobytes()
  offsets = arrays[f"{prefix}.offsets"].tolist()
  out = np.empty(len(offsets) - 1, dtype=object)
  out[:] = [data[a:b].decode("utf-8") for a, b in zip(offsets, offsets[1:])]
  return out


def _records(data_source) -> Iterator[dict]:
  """All records of a TFDS data source, in order."""
  n = len(data_source)
  for start in range(0, n, _READ_CHUNK):
    yield from data_source.__getitems__(
        list(range(start, min(n, start + _READ_CHUNK))))


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes the cache atomically (a temporary, then a rename)."""
  with workdir_lib.atomic_output(path) as tmp, open(tmp, "xb") as f:
    np.savez(f, **arrays)


def _cached(path: str, compute: Callable[[], dict[str, np.ndarray]]
            ) -> dict[str, np.ndarray]:
  """Loads arrays from an .npz cache, or computes and writes them."""
  if os.path.isfile(path):
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      logging.warning("Unreadable cache %s (%s); rebuilding it.", path, e)
  arrays = compute()
  _save_npz(path, arrays)
  return arrays


def _cache_path(builder: tfds.core.DatasetBuilder, kind: str,
                *deps: Any) -> str:
  """A cache file in the builder's folder, keyed by the data it derives from."""
  key = _short_hash(_CACHE_FORMAT, kind, *deps)
  return os.path.join(os.fspath(builder.data_dir), f"{kind}-{key}.npz")


def _info_key(builder: tfds.core.DatasetBuilder) -> str:
  return builder.info.as_json


def _items_to_arrays(ids: Sequence[str], text: dict[str, Sequence[str]],
                     popularity: np.ndarray) -> dict[str, np.ndarray]:
  arrays = _pack("ids", [i.encode("utf-8") for i in ids])
  for f in mind.TEXT_FIELDS:
    arrays.update(_pack(f"text/{f}", [t.encode("utf-8") for t in text[f]]))
  arrays["popularity"] = np.asarray(popularity, dtype=np.int64)  # [N+1]
  return arrays


def _items_from_records(builder) -> dict[str, np.ndarray]:
  records = list(_records(builder.as_data_source()["items"]))
  text = {f: [""] + [r[f].decode("utf-8") for r in records]
          for f in mind.TEXT_FIELDS}
  return _items_to_arrays(
      [""] + [r["item_id"].decode("utf-8") for r in records], text,
      [0] + [int(r["popularity"]) for r in records])


def _load_items(builder, source: Source) -> types.ItemTable:
  """The item table, from the cache, the source just read, or the records."""
  if source.is_read("dataset"):
    items = source.dataset.items
    compute = functools.partial(_items_to_arrays, items.ids, items.text,
                                items.popularity)
  else:
    compute = functools.partial(_items_from_records, builder)
  arrays = _cached(_cache_path(builder, "items", _info_key(builder)), compute)
  ids = _unpack(arrays, "ids")
  return types.ItemTable(
      ids=ids,
      text={f: _unpack(arrays, f"text/{f}") for f in mind.TEXT_FIELDS},
      synthetic=np.zeros(len(ids), dtype=bool),
      popularity=arrays["popularity"])


def _offsets(lengths: Sequence[int]) -> np.ndarray:
  out = np.zeros(len(lengths) + 1, dtype=np.int64)  # [M+1]
  np.cumsum(lengths, out=out[1:])
  return out


# Behaviors fields stored as they are (the id strings are packed).
_BEHAVIOR_ARRAYS = ("users", "history_offsets", "history_items",
                    "cand_offsets", "cand_items", "cand_labels")


def _behaviors_to_arrays(user_vocab: np.ndarray,
                         splits: dict[str, types.Behaviors]
                         ) -> dict[str, np.ndarray]:
  arrays = _pack("user_vocab", [u.encode("utf-8") for u in user_vocab])
  arrays["splits"] = np.array(list(splits))
  for split, b in splits.items():
    arrays.update(_pack(f"{split}/impression_ids",
                        [i.encode("utf-8") for i in b.impression_ids]))
    arrays.update(_pack(f"{split}/user_ids",
                        [u.encode("utf-8") for u in b.user_ids]))
    for name in _BEHAVIOR_ARRAYS:
      arrays[f"{split}/{name}"] = getattr(b, name)
  return arrays


def _behaviors_from_records(builder, ids: np.ndarray) -> dict[str, np.ndarray]:
  """Decodes the behaviour records of every split into index arrays.

  Users are numbered by first appearance, train then dev then test, as
  mind.read_mind_dir numbers them.
  """
  item_index = {item_id.encode("utf-8"): i
                for i, item_id in enumerate(ids) if i > 0}
  user_index: dict[str, int] = {}
  sources = builder.as_data_source()

  def lookup(rows: list[np.ndarray]) -> np.ndarray:
    flat = np.concatenate(rows) if rows else np.zeros(0, dtype=object)
    try:
      return np.fromiter((item_index[v] for v in flat), dtype=np.int32,
                         count=len(flat))
    except KeyError as e:
      raise ValueError(
          f"{builder.data_dir}: item id {e.args[0]!r} is not in the item "
          "table; the prepared tables disagree: delete the dataset's folder "
          "under data_dir to rebuild it") from None

  splits = {}
  for split in (s for s in mind.SPLITS if s in sources):
    records = list(_records(sources[split]))
    user_ids = np.array([r["user_id"].decode("utf-8") for r in records],
                        dtype=object)
    users = np.fromiter(
        (user_index.setdefault(u, len(user_index) + 1) for u in user_ids),
        dtype=np.int32, count=len(user_ids))
    history = [r["history"] for r in records]
    candidates = [r["candidates"] for r in records]
    labels = [r["labels"] for r in records]
    splits[split] = types.Behaviors(
        impression_ids=np.array(
            [r["impression_id"].decode("utf-8") for r in records],
            dtype=object),
        user_ids=user_ids,
        users=users,
        history_offsets=_offsets([len(h) for h in history]),
        history_items=lookup(history),
        cand_offsets=_offsets([len(c) for c in candidates]),
        cand_items=lookup(candidates),
        cand_labels=(np.concatenate(labels).astype(np.int8) if labels
                     else np.zeros(0, dtype=np.int8)))
  user_vocab = np.array([""] + list(user_index), dtype=object)
  return _behaviors_to_arrays(user_vocab, splits)


def _load_behaviors(builder, items_builder, ids: np.ndarray, source: Source
                    ) -> tuple[np.ndarray, dict[str, types.Behaviors]]:
  """User vocabulary and splits, from the cache, the source or the records."""
  if source.is_read("dataset"):
    compute = functools.partial(_behaviors_to_arrays,
                                source.dataset.user_vocab,
                                source.dataset.splits)
  else:
    compute = functools.partial(_behaviors_from_records, builder, ids)
  path = _cache_path(builder, "behaviors", _info_key(builder),
                     _info_key(items_builder))
  arrays = _cached(path, compute)
  splits = {}
  for split in arrays["splits"].tolist():
    splits[split] = types.Behaviors(
        impression_ids=_unpack(arrays, f"{split}/impression_ids"),
        user_ids=_unpack(arrays, f"{split}/user_ids"),
        **{name: arrays[f"{split}/{name}"] for name in _BEHAVIOR_ARRAYS})
  return _unpack(arrays, "user_vocab"), splits


def _generations_to_arrays(generations: dict[str, list[tuple[str, str]]]
                           ) -> dict[str, np.ndarray]:
  arrays = {}
  for name, rows in generations.items():
    arrays.update(_pack(f"{name}/id", [k.encode("utf-8") for k, _ in rows]))
    arrays.update(_pack(f"{name}/response_json",
                        [r.encode("utf-8") for _, r in rows]))
  return arrays


def _generations_from_records(builder) -> dict[str, np.ndarray]:
  return _generations_to_arrays({
      name: [(r["id"].decode("utf-8"), r["response_json"].decode("utf-8"))
             for r in _records(data_source)]
      for name, data_source in builder.as_data_source().items()})


def _load_side_tables(builder, source: Source
                      ) -> dict[str, dict[str, np.ndarray]]:
  """GENRE tables: name -> {id field: [K] ids, "response_json": [K] str}."""
  if source.is_read("generations"):
    compute = functools.partial(
        _generations_to_arrays,
        {name: rows for name, (_, rows) in source.generations.items()})
  else:
    compute = functools.partial(_generations_from_records, builder)
  arrays = _cached(_cache_path(builder, "genre", _info_key(builder)), compute)
  id_fields = builder.info.metadata["id_fields"]
  return {name: {id_field: _unpack(arrays, f"{name}/id"),
                 "response_json": _unpack(arrays, f"{name}/response_json")}
          for name, id_field in sorted(id_fields.items())}


def _tokenize(items: types.ItemTable, items_builder,
              data_config: ml_collections.ConfigDict) -> int:
  """Fills items.tokens/masks (cached); returns the tokenizer vocab size."""
  fields = tuple(str(f) for f in data_config.fields)
  # tokenize_items names any field missing here.
  lengths = {f: int(data_config.max_len[f]) for f in fields
             if f in data_config.max_len}
  tokenizer = tokenize.load_tokenizer(str(data_config.tokenizer))
  path = _cache_path(items_builder, "tokens",
                     tokenize.tokenizer_fingerprint(tokenizer),
                     tokenize.table_fingerprint(items), fields, lengths)

  def compute() -> dict[str, np.ndarray]:
    tokenize.tokenize_items(items, tokenizer, fields, lengths)
    return {**{f"tokens/{f}": items.tokens[f] for f in fields},
            **{f"masks/{f}": items.masks[f] for f in fields}}

  arrays = _cached(path, compute)
  items.tokens = {f: arrays[f"tokens/{f}"] for f in fields}  # [N+1, L_f]
  items.masks = {f: arrays[f"masks/{f}"] for f in fields}  # [N+1, L_f]
  return tokenizer.get_vocab_size()


def _missing_source_error(error: FileNotFoundError, builder_cls,
                          data_dir: str) -> FileNotFoundError:
  """error, plus the versions already prepared in data_dir, if any."""
  folder = os.path.join(data_dir, builder_cls.name)
  pattern = os.path.join(folder, "*_items", str(builder_cls.VERSION),
                         "metadata.json")
  prepared = []
  for path in sorted(glob.glob(pattern)):
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f).get("source", "?")
    name = os.path.basename(os.path.dirname(os.path.dirname(path)))
    prepared.append(f"{name[:-len('_items')]} (from {recorded})")
  if not prepared:
    return error
  return FileNotFoundError(
      f"{str(error).rstrip('.')}. Prepared in {folder}: "
      f"{', '.join(prepared)}; load_dataset needs the source files to tell "
      "which version is theirs (it hashes their names, sizes and mtimes): "
      "restore them, or set config.data.path to where they are now")


def load_dataset(data_config: ml_collections.ConfigDict) -> types.Dataset:
  """Prepares (once) and loads the dataset that data_config names.

  Args:
    data_config: config.data (name, data_dir, path, variant, synthetic,
      tokenizer, fields, max_len).

  Returns:
    The Dataset with tokenized items; info holds "source", "vocab_size",
    "read_stats", "tfds_dirs" and, for synthetic data, "oracle".
  """
  name = str(data_config.name)
  builder_cls = registry.DATASETS.get(name)
  data_dir = os.path.abspath(os.path.expanduser(str(data_config.data_dir)))
  os.makedirs(data_dir, exist_ok=True)
  try:
    source = builder_cls.source(data_config, data_dir)
  except FileNotFoundError as e:
    raise _missing_source_error(e, builder_cls, data_dir) from None
  tfds.disable_progress_bar()  # one bar per record file floods the logs
  builders = {}
  for table in source.tables:
    builder = builder_cls(data_dir=data_dir, source=source,
                          config=source.config_name(table),
                          file_format="array_record")
    builder.download_and_prepare()
    builders[table] = builder
  # Right after preparing, the source is still in memory: convert from it
  # rather than decode every record back.
  items = _load_items(builders["items"], source)
  user_vocab, splits = _load_behaviors(builders["behaviors"],
                                       builders["items"], items.ids, source)
  side_tables = (_load_side_tables(builders["genre"], source)
                 if "genre" in builders else {})
  metadata = builders["items"].info.metadata
  # source.path, not the recorded one: the same files may have moved.
  info = {"source": source.path,
          "read_stats": dict(builders["behaviors"].info.metadata.get(
              "read_stats", {})),
          "tfds_dirs": {t: os.fspath(b.data_dir) for t, b in builders.items()}}
  if "oracle" in metadata:
    info["oracle"] = dict(metadata["oracle"])
  dataset = types.Dataset(name=name, items=items, user_vocab=user_vocab,
                          splits=splits, side_tables=side_tables, info=info)
  genre_config = data_config.get("genre")
  if genre_augment.enabled(genre_config):
    genre_augment.augment(dataset, genre_config,
                          cold_threshold=int(data_config.cold_threshold))
  info["vocab_size"] = _tokenize(items, builders["items"], data_config)
  return dataset
