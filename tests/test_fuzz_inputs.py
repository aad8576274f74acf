"""Property-based fuzzing of the readers of user input: MIND tsv files, GENRE
generation files and LLM replies, and config override strings.

Whatever the input, each ends in a result or in one of the project's input
errors naming the file or field (what run.py turns into one `error:` line),
never in another exception, which would surface as a traceback. Inputs are
built from fragments that sit on the parsers' edges (tabs, `\\r`, byte-order
marks, `N1-`, unbalanced brackets, huge numbers), not only uniform noise.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import tempfile

from hypothesis import event, example, given, HealthCheck, settings
from hypothesis import strategies as st
import ml_collections
import numpy as np

from genre_jax import config as config_lib
from genre_jax.data import builders
from genre_jax.data import genre_parsing as parsing
from genre_jax.data import mind
from genre_jax.errors import ConfigError, DataFormatError


def _settings(max_examples: int, **kwargs) -> settings:
  """Bounded runs (the whole file takes about 15 s on one core) and no
  deadline, since the first examples pay for imports and cold caches."""
  return settings(max_examples=max_examples, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow,
                                         HealthCheck.data_too_large],
                  **kwargs)


def _encode(lines: list[tuple[str, str]], bom: bool, junk: bytes,
            at: int) -> bytes:
  """File bytes: the rows with their line ends, a lone surrogate written as
  the invalid UTF-8 it becomes, `junk` inserted at byte `at`."""
  data = "".join(row + end for row, end in lines).encode(
      "utf-8", "surrogatepass")
  at %= len(data) + 1
  return (b"\xef\xbb\xbf" if bom else b"") + data[:at] + junk + data[at:]


def _file(row: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
  """Bytes of a file of `row`s with mixed line ends, sometimes with a BOM or
  a few raw (mostly invalid UTF-8) bytes inserted somewhere."""
  ends = st.sampled_from(["\n", "\n", "\n", "\r\n", "\r", ""])
  junk = st.one_of(st.just(b""), st.just(b""), st.just(b""),
                   st.binary(min_size=1, max_size=3))
  return st.builds(_encode, st.lists(st.tuples(row, ends), max_size=5),
                   st.booleans(), junk, st.integers(0, 1 << 16))


def _tsv(columns: list[st.SearchStrategy[str]], fuzzy: st.SearchStrategy[str]
         ) -> st.SearchStrategy[str]:
  """A tab-joined row, mostly of the expected column count."""
  exact = st.tuples(*columns).map(list)
  ragged = st.lists(fuzzy, max_size=len(columns) + 2)
  return st.one_of(exact, exact, exact, ragged).map("\t".join)


# --- MIND news.tsv / behaviors.tsv --------------------------------------------

_KNOWN = {"N1": 1, "N2": 2, "N3": 3}
_IDS = ("N1", "N2", "N3", "N9", "U1", "", " N1 ")
_LABELS = ("-1", "-0", "-1", "-0", "-", "-2", "", "--1", "-01", "-1-0", "1")
_FRAGMENTS = ("", " ", "\t", "\r", "\n", "\r\n", "\ufeff", "\x00", "\x0b",
              "\x1c", "\u2028", "\x85", "\ud800", "\xe9", "N1", "N1-1", "N1-",
              "-1", "N1-2", "N1-0 N2-1", '"', "[]", "\\")
_fragment = st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=6))
_field = st.lists(_fragment, max_size=3).map("".join)
_token = st.builds(str.__add__, st.sampled_from(_IDS), st.sampled_from(_LABELS))
_impressions = st.one_of(st.lists(_token, max_size=4).map(" ".join), _field)
_history = st.lists(st.one_of(st.sampled_from(_IDS), _field),
                    max_size=3).map(" ".join)
_NEWS_ROW = _tsv([st.one_of(st.sampled_from(_IDS), _field)] + [_field] * 7,
                 _field)
_BEHAVIORS_ROW = _tsv(
    [st.one_of(st.sampled_from(["1", "2", "", " "]), _field),
     st.one_of(st.sampled_from(["U1", "U2", "", " "]), _field),
     _field, _history, _impressions], _field)

# Well-formed files (text without tabs or line ends), so that whole folders
# often read and their results get checked, not only refused.
_clean = st.text(st.characters(blacklist_categories=["Cs"],
                               blacklist_characters="\t\n\r"), max_size=6)
_CLEAN_NEWS = st.lists(
    st.tuples(st.sampled_from(sorted(_KNOWN)), _clean, _clean, _clean, _clean),
    min_size=1, max_size=3, unique_by=lambda r: r[0]).map(
        lambda rows: "".join("\t".join([*r, "", "[]", "[]"]) + "\n"
                             for r in rows).encode("utf-8"))
_clean_token = st.builds(str.__add__, st.sampled_from(["N1", "N2", "N3", "N9"]),
                         st.sampled_from(["-0", "-1"]))
_CLEAN_BEHAVIORS = st.lists(
    st.tuples(st.sampled_from(["1", "2", "3"]), st.sampled_from(["U1", "U2"]),
              _clean, st.lists(st.sampled_from(["N1", "N2", "N9"]),
                               max_size=3).map(" ".join),
              st.lists(_clean_token, min_size=1, max_size=4).map(" ".join)),
    min_size=1, max_size=4).map(
        lambda rows: "".join("\t".join(r) + "\r\n" for r in rows).encode(
            "utf-8"))
_NEWS_FILE = st.one_of(_CLEAN_NEWS, _file(_NEWS_ROW))
_BEHAVIORS_FILE = st.one_of(_CLEAN_BEHAVIORS, _file(_BEHAVIORS_ROW))


def _check_names(error: BaseException, paths: list[str]) -> None:
  """The error is an input error whose message names one of `paths`."""
  event(type(error).__name__)
  if isinstance(error, DataFormatError):
    assert error.path in paths, (error.path, paths)
    assert str(error).startswith(error.path + ":"), str(error)
  elif isinstance(error, (ConfigError, FileNotFoundError)):
    assert any(p in str(error) for p in paths), (str(error), paths)
  else:
    raise error


def _check_behaviors(b, num_items: int, candidates_optional: bool) -> None:
  """The ragged arrays agree with each other and hold only real items."""
  rows = len(b.impression_ids)
  assert len(b.user_ids) == len(b.users) == rows
  assert len(b.history_offsets) == len(b.cand_offsets) == rows + 1
  assert b.history_offsets[-1] == len(b.history_items)
  assert b.cand_offsets[-1] == len(b.cand_items) == len(b.cand_labels)
  assert (np.diff(b.history_offsets) >= 0).all()
  counts = np.diff(b.cand_offsets)
  assert (counts >= 0 if candidates_optional else counts >= 1).all()
  for items in (b.history_items, b.cand_items):
    assert ((items >= 1) & (items < num_items)).all()
  assert set(b.cand_labels.tolist()) <= {0, 1}
  assert (b.users >= 1).all()
  assert all(i.strip() == i and i for i in b.impression_ids)


@_settings(400)
@given(_NEWS_FILE)
@example(b"")
@example(b"\xef\xbb\xbfN1\tc\ts\tt\ta\tu\t[]\t[]\r\n")
@example(b"N1\tc\ts\tt\ta\tu\t[]\t[]\nN1\tc\ts\tt\ta\tu\t[]\t[]\n")
@example(b"N1\tc\ts\tt\ta\tu\t[]\n")
@example(b"N1\tc\ts\t\xff\ta\tu\t[]\t[]\n")
def test_read_news_returns_items_or_names_the_file(content):
  """Any news.tsv reads into a consistent item table or is refused naming
  the file (and line)."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "news.tsv")
    pathlib.Path(path).write_bytes(content)
    try:
      items = mind.read_news(path)
    except Exception as e:  # pylint: disable=broad-except
      _check_names(e, [path])
      return
  event("read")
  assert items.ids[0] == "" and len(items.ids) >= 2
  assert len(set(items.ids)) == len(items.ids)
  assert all(i and i == i.strip() for i in items.ids[1:])
  assert all(len(v) == len(items.ids) for v in items.text.values())


@_settings(500)
@given(_BEHAVIORS_FILE, st.booleans())
@example(b"1\tU1\t\tN1\tN1-\n", False)
@example(b"1\tU1\t\tN1\t-1\n", False)
@example(b"1\tU1\t\tN1\tN1-2\n", False)
@example(b"1\tU1\t\tN1\t\n", False)
@example(b"1\tU1\t\tN1\t\n", True)
@example(b"1\tU1\t\tN9\tN9-1\n", False)
@example(b"1\t \t\t\tN1-1\n", False)
def test_read_behaviors_returns_rows_or_names_the_file(content, optional):
  """Any behaviors.tsv reads into ragged arrays of known items only, or is
  refused naming the file."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "behaviors.tsv")
    pathlib.Path(path).write_bytes(content)
    try:
      behaviors, stats = mind.read_behaviors(
          path, dict(_KNOWN), {}, candidates_optional=optional)
    except Exception as e:  # pylint: disable=broad-except
      _check_names(e, [path])
      return
  event("read")
  _check_behaviors(behaviors, len(_KNOWN) + 1, optional)
  assert stats.rows_kept == len(behaviors.impression_ids)
  assert stats.rows_kept + stats.rows_dropped == stats.rows_read


def test_read_mind_dir_fuzz_reads_some_folders():
  """Random Goodreads-layout folders (news.tsv, {train,dev,test}/
  behaviors.tsv, a file sometimes missing) read or raise an input error
  naming a file of the folder; enough of them read for the results' checks
  to have run."""
  outcomes = []

  @_settings(300)
  @given(st.one_of(_NEWS_FILE, st.none()),
         st.one_of(_BEHAVIORS_FILE, _BEHAVIORS_FILE, st.none()),
         st.one_of(_BEHAVIORS_FILE, st.none()),
         st.one_of(_BEHAVIORS_FILE, st.none()))
  def check(news, train, dev, test):
    with tempfile.TemporaryDirectory() as root:
      paths = [root]
      for name, content in (("news.tsv", news),
                            ("train/behaviors.tsv", train),
                            ("dev/behaviors.tsv", dev),
                            ("test/behaviors.tsv", test)):
        if content is not None:
          path = pathlib.Path(root, name)
          path.parent.mkdir(exist_ok=True)
          path.write_bytes(content)
          paths.append(str(path))
      try:
        dataset = mind.read_mind_dir(root)
      except Exception as e:  # pylint: disable=broad-except
        _check_names(e, paths)
        outcomes.append(False)
        return
    outcomes.append(True)
    event("read")
    num_items = len(dataset.items.ids)
    assert set(dataset.splits) == {s for s, c in (("train", train),
                                                  ("dev", dev),
                                                  ("test", test))
                                   if c is not None}
    for split in dataset.splits.values():
      _check_behaviors(split, num_items, False)
    train_split = dataset.splits["train"]
    assert dataset.items.popularity.sum() == len(train_split.cand_items)
    assert set(dataset.user_vocab[1:]) >= set(train_split.user_ids)

  check()
  assert sum(outcomes) >= 3, f"{sum(outcomes)} of {len(outcomes)} read"


# --- GENRE generation files and replies ---------------------------------------

_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() |
    st.text(max_size=8),
    lambda kids: (st.lists(kids, max_size=3) |
                  st.dictionaries(st.text(max_size=4), kids, max_size=3)),
    max_leaves=6)
_id_value = st.one_of(st.text(max_size=4), st.integers(), st.none(),
                      _json_value)


def _json_row(key: str, item_id, response, extra: dict, has_response: bool,
              ascii_only: bool) -> str:
  """One JSONL row, its id field and response possibly wrong or missing."""
  row = {key: item_id, **extra}
  if has_response:
    row["response"] = response
  return json.dumps(row, ensure_ascii=ascii_only)


_JSON_ROW = st.builds(
    _json_row, st.sampled_from(["item_id", "user_id", "id"]), _id_value,
    st.one_of(_json_value, st.text(max_size=20)),
    st.dictionaries(st.sampled_from(["status", "item_id", "user_id"]),
                    _json_value, max_size=2),
    st.booleans(), st.booleans())
_GENERATION_LINES = (
    '{"item_id": ' + "1" * 5000 + ', "response": "x"}',
    '{"item_id": "B1", "response": ' + "[" * 3000 + "]" * 3000 + "}",
    '{"item_id": "B1", "response": NaN}',
    '{"item_id": "B1", "response": "\\ud800"}',
    '{"item_id": "B1", "user_id": "U1", "response": "x"}',
    '{"item_id": "", "response": "x"}',
    '{"item_id": 7, "response": [1, {"a": null}]}',
    "[1, 2]", "{", "null", "B1\t[description] x", "\tx", " ", "\ufeff{}",
)
_GENERATION_LINE = st.one_of(
    _JSON_ROW, _JSON_ROW, st.sampled_from(_GENERATION_LINES),
    st.builds("{}\t{}".format, _field, _field), _field)
# A whole JSON document (a list of rows or anything else, maybe indented)
# instead of one row a line.
_JSON_DOCUMENT = st.builds(
    lambda value, indent: json.dumps(value, indent=indent).encode(),
    st.one_of(st.lists(_JSON_ROW.map(json.loads), max_size=3), _json_value),
    st.sampled_from([None, 2]))
_GENERATION_FILE = st.one_of(_file(_GENERATION_LINE), _file(_GENERATION_LINE),
                             _JSON_DOCUMENT)
# Invalid UTF-8, a response nested deeper than the JSON parser recurses,
# an id longer than Python converts to an int.
_HOSTILE_FILES = (
    b"\xff\n",
    ('{"item_id": "B1", "response": ' + "[" * 3000 + "]" * 3000 +
     "}").encode(),
    ('{"item_id": ' + "1" * 5000 + ', "response": "x"}').encode(),
)


@_settings(400)
@given(_GENERATION_FILE, st.sampled_from(["item_id", "user_id"]))
@example(_HOSTILE_FILES[0], "item_id")
@example(_HOSTILE_FILES[1], "item_id")
@example(_HOSTILE_FILES[2], "item_id")
@example(b'{"item_id": "B1", "response": "x"}\nB2\tx\n', "item_id")
@example(b"B1\tx\n{}\n", "user_id")
def test_load_generations_returns_replies_or_names_the_file(content, key):
  """Any file is read as id -> reply or refused naming the file."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "replies.jsonl")
    pathlib.Path(path).write_bytes(content)
    try:
      generations = parsing.load_generations(path, key)
    except Exception as e:  # pylint: disable=broad-except
      _check_names(e, [path])
      return
  event("read")
  assert generations.path == path
  assert len(generations) + generations.duplicates == generations.lines
  for item_id, response in generations.items():
    assert isinstance(item_id, str) and item_id
    assert isinstance(response, (str, list, dict))


@_settings(300, report_multiple_bugs=False)
@given(_GENERATION_FILE)
@example(_HOSTILE_FILES[0])
@example(_HOSTILE_FILES[1])
@example(_HOSTILE_FILES[2])
def test_builders_read_generations_returns_rows_or_names_the_file(content):
  """The builders' own reader of GENRE files keeps the same promise."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "replies.jsonl")
    pathlib.Path(path).write_bytes(content)
    try:
      id_field, rows = builders._read_generations(path)  # pylint: disable=protected-access
    except DataFormatError as e:
      _check_names(e, [path])
      return
  assert id_field in ("item_id", "user_id")
  for item_id, response_json in rows:
    assert isinstance(item_id, str) and item_id
    json.loads(response_json)


_REPLY_FRAGMENTS = (
    "[description]", "[New Title]:", "newtitle:", "**Title**:", "[title]",
    "[other tag]", "```json\n", "```", "{", "}", "[", "]", "(1)", '"', "'",
    "\u201c", "\u201d", "\\", ":", ",", ";", "\n", "\r\n", "- ", "1. ", "* ",
    "Topics: ", "Sorry, I can't help with that.", "As an AI", "   ", "\x00",
    '{"topics": ["a", "b"], "regions": "x, y"}', '{"topics": [1, null]}',
    "{[1]: 2}", "{'a': {1, 2}}", "{{}: 1}", '{"a": 1e999}', "[1j, b'x']",
    "NaN", "[" * 70, "1" * 4400, "-" * 40, "\ud800",
)
_reply_text = st.lists(st.one_of(st.sampled_from(_REPLY_FRAGMENTS),
                                 st.text(max_size=10)),
                       max_size=8).map("".join)
_PROFILE_FIELDS = ("topics", "regions")
_profile_text = st.builds(
    "{}{}{}".format, _reply_text,
    st.dictionaries(st.sampled_from(_PROFILE_FIELDS + ("title",)),
                    st.one_of(st.lists(_reply_text, max_size=3), _reply_text,
                              _json_value), max_size=3).map(json.dumps),
    _reply_text)
_reply = st.one_of(st.none(), _reply_text, _reply_text, _json_value,
                   _profile_text,
                   st.lists(st.one_of(_reply_text, st.integers(),
                                      st.floats(), st.none()), max_size=4),
                   st.dictionaries(st.sampled_from(["topics", "regions",
                                                    "title", "x"]),
                                   st.one_of(_reply_text, _json_value),
                                   max_size=3))
_names = st.one_of(
    st.lists(st.sampled_from(_PROFILE_FIELDS), max_size=2, unique=True),
    st.lists(st.sampled_from(["description", "newtitle", "title"]),
             min_size=1, max_size=2),
    st.lists(st.one_of(
        st.sampled_from(["description", "newtitle", "title", "New Title",
                         "topics", "regions"]), st.text(max_size=5)),
             max_size=3))
_limit = st.integers(-2, 40)


def _parsed(call, *args, **kwargs) -> parsing.Parsed | None:
  """`call`'s Parsed, checked to keep the module's contract (a value exactly
  when the status is usable); None when it raised an input error."""
  try:
    parsed = call(*args, **kwargs)
  except (DataFormatError, ConfigError):
    return None
  assert isinstance(parsed, parsing.Parsed)
  assert isinstance(parsed.status, parsing.Status)
  event(f"{call.__name__}: {parsed.status.value}")
  assert (parsed.value is not None) == parsed.status.usable, parsed
  return parsed


@_settings(1000)
@given(_reply, _names, _limit, st.integers(0, 5))
@example("{[1]: 2}", ["title"], 0, 0)
@example("topics: [{'a': {1, 2}}, {[1]: 2}]", ["topics"], 0, 0)
@example("[description] a", ["description"], 0, 0)
def test_reply_parsers_return_a_status(reply, names, max_len, max_items):
  """Every reply parser returns a status for any reply (a generation run
  counts broken replies instead of stopping), with a value of the promised
  type exactly when the status is usable."""
  parsed = _parsed(parsing.parse_tagged, reply, names, max_len=max_len)
  if parsed and parsed.value is not None:
    assert isinstance(parsed.value, str)
  parsed = _parsed(parsing.parse_json_object, reply, names, max_len=max_len)
  if parsed and parsed.value is not None:
    assert isinstance(parsed.value, dict)
    assert all(isinstance(parsed.value.get(n), str) for n in names)
  parsed = _parsed(parsing.parse_list, reply, max_items=max_items,
                   max_len=max_len)
  if parsed and parsed.value is not None:
    assert isinstance(parsed.value, list) and parsed.value
    assert all(isinstance(p, str) for p in parsed.value)
    assert max_items <= 0 or len(parsed.value) <= max_items
  parsed = _parsed(parsing.parse_profile, reply, names, max_items=max_items,
                   max_len=max_len)
  if parsed and parsed.value is not None:
    assert set(parsed.value) == set(names)


# --- Config overrides ---------------------------------------------------------

_BASE = config_lib.load_preset("nrms")


def _fields(node: ml_collections.ConfigDict, prefix: str = ""
            ) -> dict[str, object]:
  """Every field of a config by dotted name, inner nodes included."""
  fields = {}
  for key, value in node.items():
    fields[prefix + key] = value
    if isinstance(value, ml_collections.ConfigDict):
      fields.update(_fields(value, f"{prefix}{key}."))
  return fields


_FIELDS = _fields(_BASE)
_NAMES = sorted(_FIELDS)


def _typo(name: str, at: int, how: str) -> str:
  """`name` with one slip a person makes typing it."""
  at %= len(name)
  return {"drop": name[:at] + name[at + 1:],
          "double": name[:at] + name[at] + name[at:],
          "swap": name[:at] + name[at + 1:at + 2] + name[at] + name[at + 2:],
          "case": name[:at] + name[at].swapcase() + name[at + 1:],
          "dash": name.replace("_", "-"),
          "deeper": name + ".x",
          "dots": name.replace(".", "..", 1),
          "space": f" {name} "}[how]


_key = st.one_of(
    st.sampled_from(_NAMES), st.sampled_from(_NAMES),
    st.builds(_typo, st.sampled_from(_NAMES), st.integers(0, 99),
              st.sampled_from(["drop", "double", "swap", "case", "dash",
                               "deeper", "dots", "space"])),
    st.text(max_size=8))
_VALUES = (
    "nan", "inf", "-inf", "1e999", "-1e999", "float('nan')", "True", "False",
    "None", "()", "(1,)", "(1, 'a')", "[]", "[1, 2]", "[[1]]", "{}",
    "{'a': 1}", "{'title': 'x'}", "{[1]: 2}", "{{}: 1}", "{1, 2}", "b'x'",
    "1j", "'quoted'", '"x"', "", " ", "=", "==1", "\x00", "-" * 3000 + "1",
    "(" * 300 + ")" * 300, "[" * 100 + "]" * 100, "1" * 5000, "1" + "0" * 400,
    "-1", "0", "-0", "0x10", "1_000", "...", "lambda: 0", "__import__('os')",
    "title", "('title', 'abstract')", "gru", "bfloat16",
)
_literal = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() |
    st.text(max_size=5),
    lambda kids: (st.lists(kids, max_size=3) |
                  st.lists(kids, max_size=3).map(tuple) |
                  st.dictionaries(st.text(max_size=3), kids, max_size=2)),
    max_leaves=4).map(repr)
_value = st.one_of(st.sampled_from(_VALUES), st.sampled_from(_VALUES),
                   st.integers().map(str), st.floats().map(repr), _literal,
                   st.text(max_size=10))


def _value_like(old) -> st.SearchStrategy[str]:
  """Override values of the kind a field holds, edges included (nan, huge
  and negative numbers, empty or mixed tuples), or anything else."""
  if isinstance(old, bool):
    like = st.sampled_from(["True", "False", "0", "1", "'yes'"])
  elif isinstance(old, int):
    like = st.one_of(st.integers(-3, 3).map(str), st.integers().map(str),
                     st.sampled_from(["1" + "0" * 400, "2.5", "True"]))
  elif isinstance(old, float):
    like = st.one_of(st.floats().map(repr), st.integers(-3, 3).map(str),
                     st.sampled_from(["nan", "inf", "-inf", "1e999", "0"]))
  elif isinstance(old, str):
    like = st.one_of(st.just(old), st.text(max_size=8),
                     st.sampled_from(["title", "gru", "bfloat16", "''"]))
  elif isinstance(old, tuple):
    kinds = {bool: st.booleans(), int: st.integers(-2, 300),
             float: st.floats(), str: st.one_of(st.sampled_from(old or ("",)),
                                                st.text(max_size=5))}
    items = kinds.get(type(old[0]) if old else None, _json_value)
    like = st.lists(items, max_size=4).map(lambda xs: repr(tuple(xs)))
  else:
    like = _value
  return st.one_of(like, like, like, _value)


_LEAVES = {name: value for name, value in _FIELDS.items()
           if not isinstance(value, ml_collections.ConfigDict)}
_typed_override = st.sampled_from(sorted(_LEAVES)).flatmap(
    lambda name: _value_like(_LEAVES[name]).map(f"{name}={{}}".format))
_override = st.one_of(_typed_override, _typed_override,
                      st.builds("{}={}".format, _key, _value), _key)


def test_the_base_config_is_valid():
  """The fuzzed overrides start from a config that passes validation."""
  config_lib.validate(copy.deepcopy(_BASE))


@_settings(1000)
@given(_override)
@example("data.history_len.foo=1")
@example("model.mlp.hidden.0=3")
@example("data.path.x=1")
@example("train.lr=1" + "0" * 400)
@example("train.lr={[1]: 2}")
@example("train.lr=" + "-" * 3000 + "1")
@example("model={'a': 1}")
@example("data=None")
def test_override_applies_or_is_a_config_error(item):
  """An override string, then validation, ends in success or a ConfigError;
  apply_overrides' error quotes the override."""
  config = copy.deepcopy(_BASE)
  try:
    config_lib.apply_overrides(config, [item])
  except ConfigError as e:
    event("apply_overrides: ConfigError")
    assert item in str(e), str(e)
    return
  try:
    config_lib.validate(config)
  except ConfigError as e:
    event("validate: ConfigError")
    assert str(e).strip()
    return
  event("applied and valid")
