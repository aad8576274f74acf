"""TFDS builders and load_dataset: prepare once, reload from cache, rebuild.

The in-memory Dataset that load_dataset returns is checked against the plain
file reader (genre_jax.data.mind) on the same files, and its tokens against
tokenize_items on the reader's table.
"""

import json
import os
import pathlib
import tempfile
import zipfile

import numpy as np
import pytest

from genre_jax import config as config_lib
from genre_jax import data as data_lib
from genre_jax.data import mind
from genre_jax.data import synthetic
from genre_jax.data import tokenize
from genre_jax.errors import ConfigError, DataFormatError

BEHAVIOR_FIELDS = ("impression_ids", "user_ids", "users", "history_offsets",
                   "history_items", "cand_offsets", "cand_items", "cand_labels")

NEWS = [
    "N1\tnews\tpolitics\tThe \"Big\" Vote\tA long abstract.\t\t[]\t[]",
    "N2\tsports\tsoccer\tGoal scored late\t\t\t[]\t[]",
    "N3\tnews\tworld\tStorm hits the coast\tWinds.\t\t[]\t[]",
    "N4\tfood\trecipes\tBread at home\tFlour water salt.\t\t[]\t[]",
]
TRAIN = [
    "1\tU1\t11/11/2019 9:05:58 AM\tN1 N2\tN3-1 N4-0",
    "2\tU2\t\t\tN1-0 N2-1 N9-0",  # N9 is unknown: dropped with a warning.
    "3\tU1\t\tN1\tN2-1 N3-0",
]
DEV = ["7\tU3\t\tN2 N3\tN4-1 N1-0", "8\tU1\t\tN1 N2 N3\tN4-0 N2-1"]


def data_config(tmp_path, **overrides):
  c = config_lib.base_config().data
  c.data_dir = str(tmp_path / "data_dir")
  c.synthetic.num_users = 60
  c.synthetic.num_items = 200
  c.synthetic.num_topics = 3
  c.fields = ("title", "category")
  c.max_len.title = 12
  c.max_len.category = 3
  for key, value in overrides.items():
    c[key] = value
  return c


def write_lines(path, lines):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def assert_same_dataset(got, ref):
  """Items, users and behaviours of a loaded Dataset equal the reader's."""
  assert list(got.items.ids) == list(ref.items.ids)
  for f in mind.TEXT_FIELDS:
    assert list(got.items.text[f]) == list(ref.items.text[f])
  np.testing.assert_array_equal(got.items.popularity, ref.items.popularity)
  assert not got.items.synthetic.any()
  assert list(got.user_vocab) == list(ref.user_vocab)
  assert list(got.splits) == list(ref.splits)
  for split, behaviors in ref.splits.items():
    for field in BEHAVIOR_FIELDS:
      want, have = getattr(behaviors, field), getattr(got.splits[split], field)
      assert have.dtype == want.dtype, (split, field)
      np.testing.assert_array_equal(have, want, err_msg=f"{split}.{field}")


def assert_tokens_match(got, ref, config):
  """The loaded token table equals tokenize_items on the reader's items."""
  tokenizer = tokenize.load_tokenizer(config.tokenizer)
  lengths = {f: config.max_len[f] for f in config.fields}
  tokenize.tokenize_items(ref.items, tokenizer, config.fields, lengths)
  for f in config.fields:
    assert got.items.tokens[f].shape == (len(ref.items.ids), lengths[f])
    np.testing.assert_array_equal(got.items.tokens[f], ref.items.tokens[f])
    np.testing.assert_array_equal(got.items.masks[f], ref.items.masks[f])
    assert not got.items.masks[f][0].any()  # The padding item.
  assert got.info["vocab_size"] == tokenizer.get_vocab_size()


def tfds_files(dataset):
  """(path, mtime) of every file in the dataset's TFDS folders."""
  out = {}
  for folder in dataset.info["tfds_dirs"].values():
    for name in os.listdir(folder):
      path = os.path.join(folder, name)
      out[path] = os.stat(path).st_mtime_ns
  return out


def forbid_rebuilding(monkeypatch):
  """Makes reading the source or tokenizing fail: only caches may be used."""
  def fail(*args, **kwargs):
    raise AssertionError("rebuilt instead of reading the prepared data")
  monkeypatch.setattr(mind, "read_mind_dir", fail)
  monkeypatch.setattr(synthetic, "write_synthetic", fail)
  monkeypatch.setattr(tokenize, "tokenize_items", fail)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
  """One synthetic dataset, prepared once for the tests below."""
  tmp = tmp_path_factory.mktemp("synthetic")
  config = data_config(tmp)
  return config, data_lib.load_dataset(config)


def test_synthetic_matches_reader_and_oracle(synthetic_run):
  config, dataset = synthetic_run
  assert dataset.name == "synthetic"
  source = dataset.info["source"]
  assert source.startswith(config.data_dir)
  ref = mind.read_mind_dir(source)
  assert_same_dataset(dataset, ref)
  assert_tokens_match(dataset, ref, config)
  oracle = json.loads(pathlib.Path(source, "oracle.json").read_text())
  assert dataset.info["oracle"] == oracle
  assert set(dataset.splits) == {"train", "dev", "test"}


def test_reload_reads_only_the_cache(synthetic_run, monkeypatch):
  config, first = synthetic_run
  before = tfds_files(first)
  forbid_rebuilding(monkeypatch)
  again = data_lib.load_dataset(config)
  assert tfds_files(again) == before  # Nothing regenerated or added.
  assert_same_dataset(again, first)
  for f in config.fields:
    np.testing.assert_array_equal(again.items.tokens[f], first.items.tokens[f])
  assert again.info["oracle"] == first.info["oracle"]


def test_records_decode_like_the_source(synthetic_run, monkeypatch):
  # Without the .npz caches the arrays come back from the TFDS records.
  config, first = synthetic_run
  for folder in first.info["tfds_dirs"].values():
    for name in os.listdir(folder):
      if name.endswith(".npz") and not name.startswith("tokens"):
        os.remove(os.path.join(folder, name))
  forbid_rebuilding(monkeypatch)
  assert_same_dataset(data_lib.load_dataset(config), first)


def test_new_fields_are_tokenized_and_cached(synthetic_run):
  config, first = synthetic_run
  config = data_config(pathlib.Path(config.data_dir).parent,
                       fields=("abstract",))
  config.max_len.abstract = 5
  dataset = data_lib.load_dataset(config)
  assert set(dataset.items.tokens) == {"abstract"}
  assert dataset.items.tokens["abstract"].shape == (len(first.items.ids), 5)
  assert dataset.info["tfds_dirs"] == first.info["tfds_dirs"]


def test_changed_seed_builds_a_new_dataset(synthetic_run):
  config, first = synthetic_run
  other = data_config(pathlib.Path(config.data_dir).parent)
  other.synthetic.seed = 7
  dataset = data_lib.load_dataset(other)
  assert dataset.info["tfds_dirs"]["items"] != first.info["tfds_dirs"]["items"]
  assert dataset.info["source"] != first.info["source"]
  assert_same_dataset(dataset, mind.read_mind_dir(dataset.info["source"]))


def test_unknown_dataset_name(tmp_path):
  with pytest.raises(ConfigError, match="goodreads_genre"):
    data_lib.load_dataset(data_config(tmp_path, name="movielens"))


def make_mind_release(root, variant="demo"):
  """A tiny official-layout MIND release: one folder per split."""
  # Each split ships its own news.tsv; the reader unions them.
  for split, rows, news in (("train", TRAIN, NEWS[:3]),
                            ("dev", DEV, NEWS[1:])):
    folder = root / f"MIND{variant}_{split}"
    write_lines(folder / "news.tsv", news)
    write_lines(folder / "behaviors.tsv", rows)


def zip_release(root, out, variant="demo"):
  out.mkdir(parents=True)
  for split in ("train", "dev"):
    folder = root / f"MIND{variant}_{split}"
    with zipfile.ZipFile(out / f"MIND{variant}_{split}.zip", "w") as zf:
      for name in ("behaviors.tsv", "news.tsv"):
        zf.write(folder / name, name)


def test_mind_from_folders_and_from_zips(tmp_path, caplog):
  release = tmp_path / "release"
  make_mind_release(release)
  ref = mind.read_mind_dir(release, ("train", "dev"), variant="demo")
  assert len(ref.splits["train"]) == 3  # The unknown N9 is only dropped.
  zips = tmp_path / "zips"
  zip_release(release, zips)
  for name, path in (("folders", release), ("zips", zips)):
    config = data_config(tmp_path / name, name="mind", variant="demo",
                         path=str(path))
    with caplog.at_level("WARNING"):
      dataset = data_lib.load_dataset(config)
    assert dataset.name == "mind"
    assert dataset.info["source"] == str(path)
    assert "N9" not in set(dataset.items.ids)
    assert_same_dataset(dataset, ref)
    assert_tokens_match(dataset, ref, config)
  assert "item ids not in news.tsv were dropped" in caplog.text
  assert not list((tmp_path / "zips" / "data_dir").glob(".mind_staging*"))


def test_mind_missing_manual_dir_says_what_to_download(tmp_path):
  config = data_config(tmp_path, name="mind", variant="small",
                       path=str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError) as e:
    data_lib.load_dataset(config)
  message = str(e.value)
  for part in ("MINDsmall_train.zip", "MINDsmall_dev.zip",
               str(tmp_path / "nowhere"), "https://msnews.github.io/"):
    assert part in message


def test_mind_bad_variant(tmp_path):
  with pytest.raises(ConfigError, match="variant"):
    data_lib.load_dataset(data_config(tmp_path, name="mind", variant="xl"))


def test_mind_rebuilds_for_other_or_changed_files(tmp_path, monkeypatch):
  # One data_dir, two releases: each is prepared from its own files.
  first, other = tmp_path / "a", tmp_path / "b"
  make_mind_release(first)
  make_mind_release(other)
  with (other / "MINDdemo_dev" / "news.tsv").open("a", encoding="utf-8") as f:
    f.write("N7\tfood\tbaking\tOther cake\t\t\t[]\t[]\n")
  zip_release(other, tmp_path / "b_zips")

  def load(path):
    config = data_config(tmp_path, name="mind", variant="demo",
                         path=str(path))
    return data_lib.load_dataset(config)

  def reference(path):
    return mind.read_mind_dir(path, ("train", "dev"), variant="demo")

  a = load(first)
  b = load(tmp_path / "b_zips")
  assert b.info["source"] == str(tmp_path / "b_zips")
  assert b.info["tfds_dirs"] != a.info["tfds_dirs"]
  assert "N7" in set(b.items.ids)
  assert_same_dataset(b, reference(other))
  ref_a = reference(first)
  with monkeypatch.context() as m:  # The same files again: no rebuild.
    forbid_rebuilding(m)
    assert_same_dataset(load(first), ref_a)
    assert tfds_files(load(tmp_path / "b_zips")) == tfds_files(b)
  with (first / "MINDdemo_train" / "behaviors.tsv").open(
      "a", encoding="utf-8") as f:
    f.write("4\tU9\t\tN1\tN3-1 N2-0\n")
  changed = load(first)
  assert changed.info["tfds_dirs"] != a.info["tfds_dirs"]
  assert "U9" in set(changed.user_vocab)
  assert_same_dataset(changed, reference(first))


def make_goodreads(root):
  """A tiny Goodreads-layout release with two GENRE files."""
  write_lines(root / "news.tsv", NEWS)
  write_lines(root / "train" / "behaviors.tsv", TRAIN)
  write_lines(root / "dev" / "behaviors.tsv", DEV)
  write_lines(root / "test" / "behaviors.tsv", DEV[::-1])
  write_lines(root / "genre" / "summarizer.jsonl", [
      json.dumps({"item_id": "N1", "response": "[description] Votes."}),
      json.dumps({"item_id": "N2", "response": "[description] A goal."}),
      json.dumps({"item_id": "N1", "response": "[description] Again."}),
  ])
  write_lines(root / "genre" / "profiler.jsonl", [
      json.dumps({"user_id": "U1", "response": ["politics", "soccer"]}),
      json.dumps({"user_id": "U2", "response": {"topics": ["food"]}}),
  ])


def test_goodreads_side_tables_and_rebuild_on_change(tmp_path, monkeypatch):
  root = tmp_path / "goodreads"
  make_goodreads(root)
  config = data_config(tmp_path, name="goodreads_genre", path=str(root))
  dataset = data_lib.load_dataset(config)
  assert_same_dataset(dataset, mind.read_mind_dir(root))
  assert sorted(dataset.side_tables) == ["profiler", "summarizer"]
  summaries = dataset.side_tables["summarizer"]
  assert list(summaries["item_id"]) == ["N1", "N2", "N1"]  # Duplicates kept.
  for name, key in (("summarizer", "item_id"), ("profiler", "user_id")):
    lines = (root / "genre" / f"{name}.jsonl").read_text().splitlines()
    table = dataset.side_tables[name]
    assert [json.loads(r) for r in table["response_json"]] == [
        json.loads(line)["response"] for line in lines]
    assert list(table[key]) == [json.loads(line)[key] for line in lines]

  with (root / "news.tsv").open("a", encoding="utf-8") as f:
    f.write("N5\tfood\tbaking\tNew cake\t\t\t[]\t[]\n")
  changed = data_lib.load_dataset(config)
  assert changed.info["tfds_dirs"] != dataset.info["tfds_dirs"]
  assert changed.items.ids[-1] == "N5"
  forbid_rebuilding(monkeypatch)
  assert_same_dataset(data_lib.load_dataset(config), changed)
  # A new generations file (e.g. from run.py --mode=generate) rebuilds the
  # genre table only: news and behaviours are neither read nor tokenized
  # again (forbid_rebuilding holds).
  write_lines(root / "genre" / "generator.jsonl", [
      json.dumps({"user_id": "U1", "response": {"title": "A new book"}})])
  more = data_lib.load_dataset(config)
  dirs, before = more.info["tfds_dirs"], changed.info["tfds_dirs"]
  assert {t: dirs[t] for t in ("items", "behaviors")} == {
      t: before[t] for t in ("items", "behaviors")}
  assert dirs["genre"] != before["genre"]
  assert sorted(more.side_tables) == ["generator", "profiler", "summarizer"]
  assert list(more.side_tables["generator"]["user_id"]) == ["U1"]
  assert_same_dataset(more, changed)


def test_building_leaves_nothing_in_the_temp_folder(tmp_path, monkeypatch):
  # TFDS's lookup of an unprepared dataset in its bucket left an empty
  # tmp*tfds folder in /tmp per table built (thousands after a few suites).
  scratch = tmp_path / "tmp"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  root = tmp_path / "goodreads"
  make_goodreads(root)
  dataset = data_lib.load_dataset(
      data_config(tmp_path, name="goodreads_genre", path=str(root)))
  assert sorted(dataset.info["tfds_dirs"]) == ["behaviors", "genre", "items"]
  assert list(scratch.iterdir()) == []


def test_goodreads_bad_genre_line_names_file_line_field(tmp_path):
  root = tmp_path / "goodreads"
  make_goodreads(root)
  path = root / "genre" / "profiler.jsonl"
  with path.open("a", encoding="utf-8") as f:
    f.write(json.dumps({"user_id": "U3"}) + "\n")
  config = data_config(tmp_path, name="goodreads_genre", path=str(root))
  with pytest.raises(DataFormatError) as e:
    data_lib.load_dataset(config)
  assert (e.value.path, e.value.line, e.value.field) == (str(path), 3,
                                                          "response")


def test_goodreads_moved_source_names_it_and_the_prepared_data(
    tmp_path, monkeypatch):
  root = tmp_path / "goodreads"
  make_goodreads(root)
  config = data_config(tmp_path, name="goodreads_genre", path=str(root))
  first = data_lib.load_dataset(config)
  moved = tmp_path / "moved"
  os.rename(root, moved)  # Keeps names, sizes and mtimes.
  with pytest.raises(FileNotFoundError) as e:
    data_lib.load_dataset(config)
  message = str(e.value)
  prefix = pathlib.Path(first.info["tfds_dirs"]["items"]).parent.name[:-6]
  for part in (f"{root} does not exist",
               os.path.join(config.data_dir, "genre_jax_goodreads"),
               f"{prefix} (from {root})", "config.data.path"):
    assert part in message
  # Pointed at the moved folder, the prepared data is used as it is.
  forbid_rebuilding(monkeypatch)
  config.path = str(moved)
  again = data_lib.load_dataset(config)
  assert again.info["tfds_dirs"] == first.info["tfds_dirs"]
  assert tfds_files(again) == tfds_files(first)
  assert again.info["source"] == str(moved)
  assert_same_dataset(again, first)


def test_goodreads_needs_a_path(tmp_path):
  with pytest.raises(ConfigError, match="data.path"):
    data_lib.load_dataset(data_config(tmp_path, name="goodreads_genre"))


@pytest.mark.slow
def test_goodreads_release(tmp_path, goodreads_dir, goodreads_cache):
  # goodreads_dir (tests/conftest.py) skips when ../shared/data is absent;
  # the release is prepared once per session, in goodreads_cache.
  root = goodreads_dir
  config = data_config(tmp_path, name="goodreads_genre", path=str(root),
                       fields=("title",), data_dir=str(goodreads_cache))
  dataset = data_lib.load_dataset(config)
  assert dataset.items.num_items == 16833
  assert {s: len(b) for s, b in dataset.splits.items()} == {
      "train": 101001, "dev": 19967, "test": 20365}
  train = dataset.splits["train"]
  assert (train.num_candidates() == 10).all()
  np.testing.assert_array_equal(
      np.add.reduceat(train.cand_labels, train.cand_offsets[:-1]), 1)
  assert dataset.user_vocab[0] == "" and len(set(dataset.user_vocab)) == len(
      dataset.user_vocab)
  assert len(dataset.side_tables["summarizer"]["item_id"]) == 17925
  for name in ("profiler", "generator_v1", "generator_v2"):
    with open(root / "genre" / f"{name}.jsonl", encoding="utf-8") as f:
      lines = [json.loads(line) for line in f if line.strip()]
    table = dataset.side_tables[name]
    assert list(table["user_id"]) == [line["user_id"] for line in lines]
    assert json.loads(table["response_json"][0]) == lines[0]["response"]
  title = dataset.items.tokens["title"]
  assert title.shape == (16834, config.max_len.title)
  assert not title[0].any() and dataset.items.masks["title"][1:].any(1).all()
