"""Tests of GENRE reply parsing, generation-file loading and prompt schemes.

The real GPT-3.5 replies of the Goodreads GENRE release are parsed in full
(skipped when ../shared/data is absent); hand-made replies cover the broken
cases a live LLM produces.
"""

import json
import pathlib

import pytest

from genre_jax.errors import ConfigError, DataFormatError
from genre_jax.data import genre_parsing as parsing
from genre_jax.data.genre_parsing import Status
from genre_jax.genre import prompts

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
GENRE = DATA / "goodreads" / "genre"


def _need_release():
  if not GENRE.is_dir():
    pytest.skip(f"GENRE release not found at {GENRE} (../shared/data absent)")


def _parse_all(scheme, generations):
  summary = parsing.ParseSummary(scheme.name)
  values = {k: summary.add(scheme.parse(v)) for k, v in generations.items()}
  print(summary.line())
  return values, summary


def test_real_summarizer_replies_parse():
  _need_release()
  gens = parsing.load_generations(str(GENRE / "summarizer.jsonl"), "item_id")
  assert len(gens) == 16833
  assert gens.lines == 17925 and gens.duplicates == 17925 - 16833
  values, summary = _parse_all(prompts.get_scheme("summarizer", "book"), gens)
  assert summary.total == 16833
  assert summary.counts[Status.OK] / summary.total > 0.999
  assert summary.usable_rate == 1.0
  text = values["B89377"].value
  assert text.startswith("Penny from Heaven is a heartwarming book")
  assert "[description]" not in text


def test_real_summarizer_duplicates_keep_last_reply():
  _need_release()
  path = GENRE / "summarizer.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  by_id = {}
  for row in rows:
    by_id.setdefault(row["item_id"], []).append(row["response"])
  item_id, replies = next((k, v) for k, v in by_id.items()
                          if len(v) > 1 and len(set(v)) > 1)
  gens = parsing.load_generations(str(path), "item_id")
  assert gens[item_id] == replies[-1] != replies[0]


def test_real_profiler_lists_parse():
  _need_release()
  gens = parsing.load_generations(str(GENRE / "profiler.jsonl"), "user_id")
  assert all(isinstance(v, list) for v in gens.values())
  values, summary = _parse_all(prompts.get_scheme("profiler", "book"), gens)
  assert summary.usable_rate > 0.999
  assert values["U0"] == parsing.Parsed(
      ["ballet", "love", "disabilities", "family", "animals"], Status.OK)
  # A reply given as the JSON text of the list parses to the same value.
  scheme = prompts.get_scheme("profiler", "book")
  assert scheme.parse(json.dumps(gens["U1"])).value == values["U1"].value


@pytest.mark.parametrize("name", ["generator_v1.jsonl", "generator_v2.jsonl"])
def test_real_generator_json_parses(name):
  _need_release()
  gens = parsing.load_generations(str(GENRE / name), "user_id")
  values, summary = _parse_all(prompts.get_scheme("generator", "book"), gens)
  assert summary.total == 2096
  assert summary.usable_rate == 1.0
  for user, parsed in values.items():
    expected = json.loads(gens[user])
    assert parsed.value["title"] == " ".join(expected["title"].split())
    assert parsed.value["description"]


@pytest.mark.parametrize("reply, value, status", [
    ("[description] A quiet novel.", "A quiet novel.", Status.OK),
    ('  "[DESCRIPTION]:\n  A quiet   novel. "', "A quiet novel.", Status.OK),
    ("Sure! Here it is:\n[Description] A quiet novel.", "A quiet novel.",
     Status.OK),
    ("[description] \"A quiet novel.\"", "A quiet novel.", Status.OK),
    ("[description] A quiet novel.\n[note] made up", "A quiet novel.",
     Status.OK),
    ("description: A quiet novel.", "A quiet novel.", Status.OK),
    ("A quiet novel.", "A quiet novel.", Status.UNTAGGED),
    ("[title] A quiet novel.", None, Status.WRONG_TAG),
    ("", None, Status.EMPTY),
    ("   \n ", None, Status.EMPTY),
    ("[description]   ", None, Status.EMPTY),
    (None, None, Status.EMPTY),
    (["a list"], None, Status.MALFORMED),
])
def test_parse_tagged(reply, value, status):
  assert parsing.parse_tagged(reply, ("description",)) == parsing.Parsed(
      value, status)


def test_parse_tagged_prefers_earlier_tags_and_trims():
  reply = "[title] Old\n[newtitle] New headline here"
  assert parsing.parse_tagged(reply, ("newtitle", "title")).value == (
      "New headline here")
  parsed = parsing.parse_tagged("[description] " + "word " * 50,
                                ("description",), max_len=23)
  assert parsed.status is Status.TRIMMED
  assert parsed.value == "word word word word"


@pytest.mark.parametrize("reply, status", [
    ('{"title": "Dune", "description": "Sand and', Status.TRUNCATED),
    ('```json\n{"title": "Dune", "desc', Status.TRUNCATED),
    ('{"title": "Dune"}', Status.INCOMPLETE),
    ('{"title": "Dune", "description": ""}', Status.INCOMPLETE),
    ("no json here at all", Status.MALFORMED),
    ("{not: json, at all}", Status.MALFORMED),
    ("", Status.EMPTY),
    (42, Status.MALFORMED),
])
def test_parse_json_object_broken(reply, status):
  parsed = parsing.parse_json_object(reply, ("title", "description"))
  assert parsed == parsing.Parsed(None, status)


def test_parse_json_object_finds_first_complete_object():
  fenced = ('Here you go:\n```json\n{"title": "Dune",\n "description": '
            '"A desert {planet}."}\n```\nand {"title": "Other"}')
  parsed = parsing.parse_json_object(fenced, ("title", "description"))
  assert parsed == parsing.Parsed(
      {"title": "Dune", "description": "A desert {planet}."}, Status.OK)
  inline = 'Answer: {"title": "A", "description": "B"} {"title": "C"}'
  assert parsing.parse_json_object(inline, ("title",)).value["title"] == "A"
  listed = '{"title": "A", "description": ["x", "y"]}'
  assert parsing.parse_json_object(listed).value["description"] == "x, y"


@pytest.mark.parametrize("reply, value", [
    ('["space opera", "found family"]', ["space opera", "found family"]),
    ("['space opera', 'found family']", ["space opera", "found family"]),
    ("```json\n[\"space opera\", \"found family\"]\n```",
     ["space opera", "found family"]),
    ("1. space opera\n2. found family", ["space opera", "found family"]),
    ("- space opera\n* found family\n", ["space opera", "found family"]),
    ("Interests: space opera, found family.", ["space opera", "found family"]),
    ("space opera\nfound family", ["space opera", "found family"]),
    (["space opera", " found  family "], ["space opera", "found family"]),
])
def test_parse_list_formats(reply, value):
  assert parsing.parse_list(reply) == parsing.Parsed(value, Status.OK)


def test_parse_list_broken_and_trimmed():
  assert parsing.parse_list('["a", "b"').status is Status.TRUNCATED
  assert parsing.parse_list("").status is Status.EMPTY
  assert parsing.parse_list("[]").status is Status.EMPTY
  assert parsing.parse_list([{"a": 1}]).status is Status.MALFORMED
  parsed = parsing.parse_list('["a", "b", "c"]', max_items=2)
  assert parsed == parsing.Parsed(["a", "b"], Status.TRIMMED)


# An apostrophe in bracketed prose opens a "string" that never closes.
@pytest.mark.parametrize("reply, value", [
    ('Based on [the reader\'s history]: ["space opera", "found family"]',
     ["space opera", "found family"]),
    ("Based on [the reader's history]:\n['space opera', 'found family']",
     ["space opera", "found family"]),
])
def test_unclosed_prose_bracket_does_not_hide_a_later_list(reply, value):
  assert parsing.parse_list(reply) == parsing.Parsed(value, Status.OK)


def test_unclosed_prose_brace_does_not_hide_a_later_object():
  reply = ('I\'d pick {the reader\'s next read}:\n'
           '{"title": "Dune", "description": "A desert planet."}')
  assert parsing.parse_json_object(reply, ("title", "description")) == (
      parsing.Parsed({"title": "Dune", "description": "A desert planet."},
                     Status.OK))


@pytest.mark.parametrize("reply", [
    'Based on [the reader\'s history]: ["space opera", "found',
    '[["space opera", "found family"], ["cosy',  # Nested parts: not answers.
])
def test_truncated_list_after_prose_is_still_truncated(reply):
  assert parsing.parse_list(reply) == parsing.Parsed(None, Status.TRUNCATED)


def test_deeply_nested_reply_is_malformed_not_a_crash(tmp_path):
  deep = "[" * 5000 + "]" * 5000
  reply = '{"title": "a", "description": "b", "x": ' + deep + "}"
  assert parsing.parse_json_object(reply, ("title",)) == parsing.Parsed(
      None, Status.MALFORMED)
  assert parsing.parse_list(deep) == parsing.Parsed(None, Status.MALFORMED)
  path = tmp_path / "deep.jsonl"
  path.write_text('{"user_id": "U1", "response": ' + deep + "}\n")
  with pytest.raises(DataFormatError, match="nested too deeply") as error:
    parsing.load_generations(str(path), "user_id")
  assert error.value.line == 1


def test_a_reply_full_of_brackets_is_searched_a_bounded_number_of_times(
    monkeypatch):
  # Each opener tried scans to its value's end: trying all of them made a
  # long reply of nested brackets quadratic.
  scans = []
  real = parsing._scan_balanced
  monkeypatch.setattr(parsing, "_scan_balanced",
                      lambda text, start: scans.append(start) or real(text,
                                                                      start))
  deep = "[" * 2000 + "]" * 2000
  assert parsing.parse_list(deep) == parsing.Parsed(None, Status.MALFORMED)
  assert 0 < len(scans) <= 2 * parsing._MAX_TRIES


@pytest.mark.parametrize("reply", [
    '{"likes": "space opera, found family"}',
    'Here you go: {"tastes": "space opera"}',
    '```json\n{"likes": "space opera"}\n```',
])
def test_parse_list_rejects_an_object(reply):
  assert parsing.parse_list(reply) == parsing.Parsed(None, Status.MALFORMED)


@pytest.mark.parametrize("reply", [
    "Sorry, I can't help with that.",
    "I'm sorry, but I cannot determine this user's interests.",
    "I cannot provide a profile without more information",
    "As an AI language model, I don\u2019t have personal preferences.",
    '"I apologize, but I am unable to do that."',
])
def test_refusals_are_refused(reply):
  assert parsing.parse_list(reply) == parsing.Parsed(None, Status.REFUSED)
  assert parsing.parse_tagged(reply, ("description",)) == parsing.Parsed(
      None, Status.REFUSED)
  assert not Status.REFUSED.usable


@pytest.mark.parametrize("reply, value", [
    # Several lines or sentences, or a list: an answer, however it opens.
    ("- sorry-state detectives\n- space opera",
     ["sorry-state detectives", "space opera"]),
    ('Sorry for the wait! ["space opera"]', ["space opera"]),
    ("Sorrow, space opera", ["Sorrow", "space opera"]),
    ("I can't get enough of space opera. Found family too",
     ["I can't get enough of space opera. Found family too"]),
])
def test_answers_opening_like_refusals_are_kept(reply, value):
  assert parsing.parse_list(reply) == parsing.Parsed(value, Status.OK)
  assert parsing.parse_tagged("[description] Sorry, no.",
                              ("description",)).status is Status.OK


def test_parse_profile_news():
  reply = '{"topics": ["sports", "politics"], "regions": "Texas, Ohio"}'
  parsed = parsing.parse_profile(reply, ("topics", "regions"))
  assert parsed == parsing.Parsed(
      {"topics": ["sports", "politics"], "regions": ["Texas", "Ohio"]},
      Status.OK)
  assert parsing.parse_profile('{"topics": ["x"]}',
                               ("topics", "regions")).status is (
                                   Status.INCOMPLETE)


def test_parse_summary_counts_and_line():
  summary = parsing.ParseSummary("demo")
  for reply in ["[description] a", "[description] b", "", "[title] x"]:
    summary.add(parsing.parse_tagged(reply, ("description",)))
  assert summary.as_dict() == {"ok": 2, "empty": 1, "wrong_tag": 1}
  assert summary.usable_rate == 0.5
  assert summary.log() == (
      "demo: 4 replies, 50.00% usable (ok 2, empty 1, wrong_tag 1)")


def test_load_generations_jsonl_and_tsv(tmp_path):
  jsonl = tmp_path / "g.jsonl"
  jsonl.write_text('{"user_id": "U1", "response": ["a"]}\n\n'
                   '{"user_id": "U2", "response": {"title": "T"}}\n'
                   '{"user_id": "U1", "response": "second", "status": "ok"}\n')
  gens = parsing.load_generations(str(jsonl), "user_id")
  assert dict(gens) == {"U1": "second", "U2": {"title": "T"}}
  assert (gens.lines, gens.duplicates) == (3, 1)
  tsv = tmp_path / "g.tsv"
  tsv.write_text("N1\t[newtitle] A\tB\nN2\t\nN1\t[newtitle] C\n")
  gens = parsing.load_generations(str(tsv), "item_id")
  assert dict(gens) == {"N1": "[newtitle] C", "N2": ""}
  assert gens.duplicates == 1


@pytest.mark.parametrize("text, line, field", [
    ('{"user_id": "U1", "response": "a"}\n{"user_id": "U2", "resp', 2, None),
    ('{"user_id": "U1", "response": "a"}\n{"item_id": "B", "response": "x"}',
     2, "user_id"),
    ('{"user_id": "U1"}', 1, "response"),
    ('{"user_id": "U1", "response": 3}', 1, "response"),
    ('{"user_id": "U1", "response": "a"}\n["U2", "b"]', 2, None),
])
def test_load_generations_malformed_jsonl(tmp_path, text, line, field):
  path = tmp_path / "bad.jsonl"
  path.write_text(text)
  with pytest.raises(DataFormatError) as error:
    parsing.load_generations(str(path), "user_id")
  assert (error.value.path, error.value.line, error.value.field) == (
      str(path), line, field)


@pytest.mark.parametrize("name, text", [
    ("g.jsonl", '{"item_id": "N1", "response": "[description] x"}\n'),
    ("g.tsv", "N1\t[description] x\n"),
])
def test_load_generations_skips_a_byte_order_mark(tmp_path, name, text):
  path = tmp_path / name
  path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
  gens = parsing.load_generations(str(path), "item_id")
  assert dict(gens) == {"N1": "[description] x"}


@pytest.mark.parametrize("name, first, second", [
    ("g.jsonl", '{"item_id": "N1", "response": "a"}',
     '{"item_id": "N2", "response": "caf\u00e9"}'),
    ("g.tsv", "N1\ta", "N2\tcaf\u00e9"),
])
def test_load_generations_names_the_first_line_not_utf8(tmp_path, name,
                                                          first, second):
  path = tmp_path / name
  path.write_bytes((first + "\n\n" + second + "\n").encode("latin-1"))
  with pytest.raises(DataFormatError, match="not UTF-8") as error:
    parsing.load_generations(str(path), "item_id")
  assert (error.value.path, error.value.line, error.value.field) == (
      str(path), 3, None)
  assert "byte 0xe9" in str(error.value)


def test_load_generations_malformed_tsv(tmp_path):
  path = tmp_path / "bad.tsv"
  path.write_text("N1\tok\nno tab on this line\n")
  with pytest.raises(DataFormatError, match=r"bad.tsv:2: field 'response'"):
    parsing.load_generations(str(path), "item_id")


def test_schemes_build_bounded_prompts_and_keys():
  history = [{"title": f"Book {i}", "category": "c"} for i in range(30)]
  scheme = prompts.get_scheme("profiler", "book", max_history=5)
  text = scheme.build(history)
  assert "Book 29" in text and "Book 25" in text and "Book 24" not in text
  assert scheme.key("U7") == "profiler:book:U7"
  news = prompts.get_scheme("summarizer", "news")
  item = {"title": "T", "abstract": "A", "category": "sports",
          "subcategory": "golf"}
  assert news.build(item) == ("[title] T\n[abstract] A\n[category] sports\n"
                              "[subcategory] golf")
  assert news.parse("[newtitle] Better T").value == "Better T"
  chain = prompts.steps("chain", "news")
  assert [s.name for s in chain] == ["profiler", "chain"]
  profile = {"topics": ["golf"], "regions": ["Ohio"]}
  assert "topics: golf\nregions: Ohio" in chain[1].build(history[:2], profile)
  with pytest.raises(ConfigError, match="unknown GENRE scheme"):
    prompts.get_scheme("summary", "news")
  with pytest.raises(ConfigError, match="unknown GENRE domain"):
    prompts.get_scheme("profiler", "movies")
