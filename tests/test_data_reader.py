"""Tests of the MIND reader (genre_jax.data.mind) and item tokenization."""

from __future__ import annotations

import logging as std_logging
import os

import numpy as np
import pytest
import tokenizers

from genre_jax.data import mind
from genre_jax.data import tokenize
from genre_jax.data import types
from genre_jax.errors import ConfigError
from genre_jax.errors import DataFormatError
from tests.helpers import TINY_BEHAVIORS, TINY_NEWS, write_tsv


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.levelno == std_logging.WARNING]


def _rows(b: types.Behaviors, m: int):
  """Row m as (history, candidates, labels) lists."""
  h = b.history_items[b.history_offsets[m]:b.history_offsets[m + 1]]
  c = slice(b.cand_offsets[m], b.cand_offsets[m + 1])
  return h.tolist(), b.cand_items[c].tolist(), b.cand_labels[c].tolist()


# --- news.tsv ---------------------------------------------------------------


def test_read_news_keeps_text_verbatim(tmp_path):
  path = write_tsv(tmp_path / "news.tsv", TINY_NEWS, newline="\r\n")
  items = mind.read_news(path)
  assert items.num_items == 5
  assert items.ids.tolist() == ["", "N1", "N2", "N3", "N4", "N5"]
  assert items.text["title"][3] == 'The "big" serve'  # quotes kept, no csv
  assert items.text["abstract"][5] == "Wet."  # trailing '\r' stripped
  assert items.text["subcategory"][4] == ""
  for field in mind.TEXT_FIELDS:
    assert items.text[field][0] == ""
    assert items.text[field].tolist()[1:] == [
        r[mind.NEWS_COLUMNS.index(field)] for r in TINY_NEWS]
  assert items.index() == {f"N{i}": i for i in range(1, 6)}
  assert not items.synthetic.any()


def test_read_news_unions_files_keeping_the_first_row(tmp_path, caplog):
  first = write_tsv(tmp_path / "a.tsv", TINY_NEWS[:3])
  changed = [TINY_NEWS[2][0], "x", "y", "another title", "", "", "[]", "[]"]
  second = write_tsv(tmp_path / "b.tsv", [TINY_NEWS[1], changed, TINY_NEWS[4]])
  items = mind.read_news([first, second])
  assert items.ids.tolist() == ["", "N1", "N2", "N3", "N5"]
  assert items.text["title"][3] == TINY_NEWS[2][3]
  warnings = _warnings(caplog)
  assert len(warnings) == 1 and "1 item ids" in warnings[0]


def test_read_news_accepts_blank_trailing_lines(tmp_path):
  path = tmp_path / "news.tsv"
  write_tsv(path, TINY_NEWS[:2])
  with open(path, "a", encoding="utf-8") as f:
    f.write("\n\n")
  assert mind.read_news(path).num_items == 2


# --- behaviors.tsv ----------------------------------------------------------


def test_read_behaviors_ragged_rows_and_users(tmp_path):
  items = mind.read_news(write_tsv(tmp_path / "news.tsv", TINY_NEWS))
  path = write_tsv(tmp_path / "b.tsv", TINY_BEHAVIORS["train"])
  user_index = {"U9": 1}
  b, stats = mind.read_behaviors(path, items.index(), user_index)
  assert len(b) == 3 and stats.rows_read == 3 and stats.ids_dropped == 0
  assert b.impression_ids.tolist() == ["1", "2", "3"]
  assert b.user_ids.tolist() == ["U1", "U2", "U1"]
  assert user_index == {"U9": 1, "U1": 2, "U2": 3}
  assert b.users.tolist() == [2, 3, 2] and stats.new_users == 2
  assert _rows(b, 0) == ([1, 2], [3, 4, 5], [1, 0, 0])
  assert _rows(b, 1) == ([], [1, 3], [0, 1])  # empty history and time
  assert _rows(b, 2) == ([1, 2, 3], [5, 4], [1, 0])
  assert b.history_offsets.dtype == np.int64
  assert b.history_items.dtype == np.int32 and b.cand_labels.dtype == np.int8
  assert b.history_lengths().tolist() == [2, 0, 3]
  assert b.num_candidates().tolist() == [3, 2, 2]


def test_first_new_user_gets_index_one(tmp_path):
  items = mind.read_news(write_tsv(tmp_path / "news.tsv", TINY_NEWS))
  user_index = {}
  mind.read_behaviors(write_tsv(tmp_path / "b.tsv", TINY_BEHAVIORS["dev"]),
                      items.index(), user_index)
  assert user_index == {"U3": 1, "U2": 2}


def test_unknown_ids_are_dropped_counted_and_warned_once(tmp_path, caplog):
  items = mind.read_news(write_tsv(tmp_path / "news.tsv", TINY_NEWS))
  rows = [
      ["1", "U1", "", "N1 X1 N2", "N3-1 X2-0 N4-0"],
      ["2", "U1", "", "X1", "X3-1 X4-0"],  # every candidate unknown: dropped
      ["3", "U2", "", "N5", "X5-1 N1-0"],  # clicked one unknown: kept
      ["4", "U2", "", "N5", "N1-1"],
  ]
  path = write_tsv(tmp_path / "b.tsv", rows)
  b, stats = mind.read_behaviors(path, items.index(), {})
  assert b.impression_ids.tolist() == ["1", "3", "4"]
  assert _rows(b, 0) == ([1, 2], [3, 4], [1, 0])
  assert _rows(b, 1) == ([5], [1], [0])
  assert (stats.rows_read, stats.rows_kept, stats.rows_dropped) == (4, 3, 1)
  assert stats.rows_affected == 3 and stats.rows_without_click == 1
  assert stats.history_ids_dropped == 2 and stats.candidate_ids_dropped == 4
  assert stats.ids_dropped == 6 and stats.distinct_unknown == 5
  assert not (b.history_items == 0).any() and not (b.cand_items == 0).any()
  warnings = _warnings(caplog)
  assert len(warnings) == 1
  assert str(path) in warnings[0] and "6 item ids" in warnings[0]
  assert "5 distinct" in warnings[0] and "1 rows were dropped" in warnings[0]


def test_mind_sample_real_rows(mind_sample_dir, caplog):
  items = mind.read_news(mind_sample_dir / "news.tsv")
  assert items.num_items == 2000
  index = items.index()
  b, stats = mind.read_behaviors(mind_sample_dir / "behaviors.tsv", index, {})
  # Independent count of what should be dropped.
  known_hist = known_cand = rows_kept = 0
  unknown = set()
  with open(mind_sample_dir / "behaviors.tsv", encoding="utf-8") as f:
    lines = f.read().splitlines()
  for line in lines:
    _, _, _, hist, imps = line.split("\t")
    cands = [t.split("-")[0] for t in imps.split()]
    unknown |= {i for i in hist.split() + cands if i not in index}
    kept = [i for i in cands if i in index]
    if kept:
      rows_kept += 1
      known_hist += sum(i in index for i in hist.split())
      known_cand += len(kept)
  assert stats.rows_read == len(lines) == 5000
  assert len(b) == stats.rows_kept == rows_kept
  assert stats.rows_dropped == 5000 - rows_kept > 0
  assert len(b.history_items) == known_hist and len(b.cand_items) == known_cand
  assert stats.distinct_unknown == len(unknown)
  assert 1 <= b.cand_items.min() and b.cand_items.max() <= 2000
  warnings = _warnings(caplog)
  assert len(warnings) == 1 and f"{stats.ids_dropped} item ids" in warnings[0]


# --- malformed input: one test per error kind -------------------------------

_GOOD_NEWS = TINY_NEWS[0]
_GOOD_ROW = ["1", "U1", "", "N1", "N1-1"]


@pytest.mark.parametrize("bad_row, field, words", [
    (_GOOD_NEWS[:7], None, "expected 8 tab-separated columns"),
    (_GOOD_NEWS + ["extra"], None, "got 9"),
    ([" "] + _GOOD_NEWS[1:], "item_id", "empty item id"),
    (TINY_NEWS[1], "item_id", "duplicate item id 'N2' (first on line 2)"),
])
def test_malformed_news(tmp_path, bad_row, field, words):
  path = write_tsv(tmp_path / "news.tsv", [_GOOD_NEWS, TINY_NEWS[1], bad_row])
  with pytest.raises(DataFormatError) as e:
    mind.read_news(path)
  assert (e.value.path, e.value.line, e.value.field) == (path, 3, field)
  assert str(e.value).startswith(f"{path}:3:")
  if field:
    assert f"field '{field}'" in str(e.value)
  assert words in str(e.value)


@pytest.mark.parametrize("bad_row, field, words", [
    (["1", "U1", "N1", "N1-1"], None, "expected 5 tab-separated columns"),
    (["", "U1", "", "N1", "N1-1"], "impression_id", "empty impression id"),
    (["2", "", "", "N1", "N1-1"], "user_id", "empty user id"),
    (["2", "U1", "", "N1", "N1-1 N2"], "impressions", "malformed token 'N2'"),
    (["2", "U1", "", "N1", "N1-1 -0"], "impressions", "empty item id"),
    (["2", "U1", "", "N1", "N1-1 N2-2"], "impressions", "label '2'"),
    (["2", "U1", "", "N1", "N1-yes"], "impressions", "is not 0 or 1"),
    (["2", "U1", "", "N1", " "], "impressions", "no candidates"),
])
def test_malformed_behaviors(tmp_path, bad_row, field, words):
  items = mind.read_news(write_tsv(tmp_path / "news.tsv", TINY_NEWS))
  path = write_tsv(tmp_path / "behaviors.tsv", [_GOOD_ROW, _GOOD_ROW, bad_row])
  with pytest.raises(DataFormatError) as e:
    mind.read_behaviors(path, items.index(), {})
  assert (e.value.path, e.value.line, e.value.field) == (path, 3, field)
  assert str(e.value).startswith(f"{path}:3:")
  if field:
    assert f"field '{field}'" in str(e.value)
  assert words in str(e.value)


def test_invalid_utf8_names_the_line(tmp_path):
  path = tmp_path / "news.tsv"
  write_tsv(path, TINY_NEWS[:2])
  with open(path, "ab") as f:
    f.write(b"N9\tx\ty\t\xff\xfe\t\t\t[]\t[]\n")
  with pytest.raises(DataFormatError, match=r"news.tsv:3: not valid UTF-8"):
    mind.read_news(path)


# --- whole folders ----------------------------------------------------------


def test_read_mind_dir_goodreads_layout(tmp_path, make_tiny_mind):
  ds = mind.read_mind_dir(make_tiny_mind(tmp_path))
  assert list(ds.splits) == ["train", "dev", "test"]
  assert ds.user_vocab.tolist() == ["", "U1", "U2", "U3"]
  assert ds.splits["dev"].users.tolist() == [3, 2]
  train = ds.splits["train"]
  expected = np.zeros(6, np.int64)
  for row in TINY_BEHAVIORS["train"]:
    for token in row[4].split():
      expected[int(token.split("-")[0][1:])] += 1
  np.testing.assert_array_equal(ds.items.popularity, expected)
  assert ds.items.popularity.sum() == len(train.cand_items)
  assert ds.items.synthetic.shape == (6,) and not ds.items.synthetic.any()


def test_read_mind_dir_official_layout_without_test(tmp_path, make_tiny_mind):
  root = make_tiny_mind(tmp_path, layout="official", splits=("train", "dev"))
  ds = mind.read_mind_dir(root)
  assert list(ds.splits) == ["train", "dev"]  # MIND-small has no test split
  assert ds.items.num_items == 5  # the union of both news.tsv files
  assert sorted(ds.items.ids.tolist()) == ["", "N1", "N2", "N3", "N4", "N5"]
  assert [len(b) for b in ds.splits.values()] == [3, 2]


def test_read_mind_dir_plain_split_folders(tmp_path, make_tiny_mind):
  root = make_tiny_mind(tmp_path / "src", layout="official")
  for split in ("train", "dev", "test"):
    os.rename(os.path.join(root, f"MINDsmall_{split}"),
              os.path.join(root, split))
  ds = mind.read_mind_dir(root)
  assert [len(b) for b in ds.splits.values()] == [3, 2, 1]
  assert ds.items.num_items == 5


def test_read_mind_dir_picks_the_variant(tmp_path, make_tiny_mind):
  make_tiny_mind(tmp_path, layout="official", variant="small")
  make_tiny_mind(tmp_path, layout="official", variant="demo",
                 splits=("train",))
  with pytest.raises(FileNotFoundError, match="several folders"):
    mind.read_mind_dir(tmp_path)
  assert list(mind.read_mind_dir(tmp_path, variant="demo").splits) == ["train"]


def test_read_mind_dir_missing_train_is_an_error(tmp_path, make_tiny_mind):
  root = make_tiny_mind(tmp_path, splits=("dev", "test"))
  with pytest.raises(FileNotFoundError, match="no train behaviors.tsv"):
    mind.read_mind_dir(root)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    mind.read_mind_dir(tmp_path / "nowhere")


@pytest.mark.slow
def test_goodreads_release(goodreads_dir):
  ds = mind.read_mind_dir(goodreads_dir)
  assert ds.items.num_items == 16833
  assert {s: len(b) for s, b in ds.splits.items()} == {
      "train": 101001, "dev": 19967, "test": 20365}
  for split, negatives in (("train", 9), ("dev", 19), ("test", 19)):
    b = ds.splits[split]
    assert (b.num_candidates() == 1 + negatives).all()
    starts = b.cand_offsets[:-1]
    assert (np.add.reduceat(b.cand_labels.astype(np.int64), starts) == 1).all()
  assert ds.items.popularity.sum() == 101001 * 10
  assert ds.user_vocab[0] == ""
  assert len(set(ds.user_vocab)) == len(ds.user_vocab)
  assert ds.info["read_stats"]["train"]["ids_dropped"] == 0


# --- tokenization -----------------------------------------------------------

_TEXTS = ["Golf is back", "", "Ünïcödé tokens: naïve café — 東京",
          "a very long title " * 10, 'The "big" serve']


@pytest.fixture(scope="module")
def tokenizer():
  return tokenize.load_tokenizer()


def _table(texts=_TEXTS) -> types.ItemTable:
  n = len(texts)
  return types.ItemTable(
      ids=np.array([""] + [f"N{i}" for i in range(1, n + 1)], dtype=object),
      text={"title": np.array([""] + list(texts), dtype=object),
            "category": np.array([""] + ["news"] * n, dtype=object)})


def test_tokenize_matches_the_tokenizers_own_encode(tokenizer):
  items = _table()
  tokenize.tokenize_items(items, tokenizer, ["title", "category"],
                          {"title": 6, "category": 3})
  ids, mask = items.tokens["title"], items.masks["title"]
  assert ids.shape == mask.shape == (6, 6) and ids.dtype == np.int32
  assert mask.dtype == bool and items.tokens["category"].shape == (6, 3)
  assert not mask[0].any() and (ids[0] == 0).all()  # padding row
  for row, text in enumerate(_TEXTS, start=1):
    want = tokenizer.encode(text, add_special_tokens=False).ids
    want = [i for i in want if i != 0][:6]  # the caller's tokenizer pads
    assert ids[row][mask[row]].tolist() == want
    assert mask[row].sum() == len(want) and (ids[row][~mask[row]] == 0).all()
  assert mask[4].all()  # the long title is truncated to 6
  assert not mask[2].any()  # an empty title is all padding


def test_tokenize_leaves_the_callers_tokenizer_alone(tokenizer):
  before = (tokenizer.padding, tokenizer.truncation)
  tokenize.tokenize_items(_table(), tokenizer, ["title"], {"title": 4},
                          add_special_tokens=True)
  assert (tokenizer.padding, tokenizer.truncation) == before


def test_tokenize_with_special_tokens_matches_transformers():
  import transformers  # pylint: disable=g-import-not-at-top
  model_dir = os.path.dirname(tokenize.default_tokenizer_path())
  hf = transformers.AutoTokenizer.from_pretrained(model_dir)
  items = _table()
  tokenize.tokenize_items(items, tokenize.load_tokenizer(model_dir), ["title"],
                          {"title": 7}, add_special_tokens=True)
  want = hf(list(_TEXTS), max_length=7, truncation=True, padding="max_length",
            return_tensors="np")
  np.testing.assert_array_equal(items.tokens["title"][1:], want["input_ids"])
  np.testing.assert_array_equal(items.masks["title"][1:],
                                want["attention_mask"].astype(bool))
  assert items.tokens["title"][4, -1] == hf.sep_token_id  # kept on truncation
  assert not items.masks["title"][0].any()


def test_tokenize_config_errors(tokenizer):
  with pytest.raises(ConfigError, match=r"unknown item field 'summary'.*"
                     r"\['category', 'title'\]"):
    tokenize.tokenize_items(_table(), tokenizer, ["summary"], {"summary": 5})
  with pytest.raises(ConfigError, match="no length for field 'title'"):
    tokenize.tokenize_items(_table(), tokenizer, ["title"], {"abstract": 5})
  with pytest.raises(ConfigError, match="leaves no room"):
    tokenize.tokenize_items(_table(), tokenizer, ["title"], {"title": 2},
                            add_special_tokens=True)


def _word_level(vocab: dict[str, int]) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(
      tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return tok


def test_pad_id_comes_from_the_tokenizer():
  tok = _word_level({"[UNK]": 0, "golf": 1, "[PAD]": 7})
  items = _table(["golf golf golf", "golf"])
  tokenize.tokenize_items(items, tok, ["title"], {"title": 4})
  assert items.tokens["title"].tolist() == [
      [7, 7, 7, 7], [1, 1, 1, 7], [1, 7, 7, 7]]


def test_load_tokenizer_paths(tmp_path, tokenizer):
  path = tokenize.default_tokenizer_path()
  assert os.path.basename(path) == "tokenizer.json"
  from_dir = tokenize.load_tokenizer(os.path.dirname(path))
  assert from_dir.get_vocab_size() == tokenizer.get_vocab_size() == 30522
  with pytest.raises(ConfigError, match=str(tmp_path / "missing")):
    tokenize.load_tokenizer(str(tmp_path / "missing"))
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json", encoding="utf-8")
  with pytest.raises(ConfigError, match="cannot read .*tokenizer.json"):
    tokenize.load_tokenizer(str(tmp_path))


def test_fingerprints(tokenizer):
  again = tokenize.load_tokenizer()
  again.no_padding()
  assert (tokenize.tokenizer_fingerprint(again)
          == tokenize.tokenizer_fingerprint(tokenizer))
  other = _word_level({"[UNK]": 0, "golf": 1})
  assert (tokenize.tokenizer_fingerprint(other)
          != tokenize.tokenizer_fingerprint(tokenizer))
  items = _table()
  fp = tokenize.table_fingerprint(items)
  assert fp == tokenize.table_fingerprint(_table())
  items.text["category"][2] = "sports"
  assert tokenize.table_fingerprint(items) != fp
  moved = _table()
  moved.ids[1], moved.ids[2] = moved.ids[2], moved.ids[1]
  assert tokenize.table_fingerprint(moved) != fp
