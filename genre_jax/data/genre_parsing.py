"""Parsing of GENRE LLM replies (and each scheme's parser), and loading of
released GENRE generation files.

Every parser returns a `Parsed(value, status)`: `value` is None unless the
reply was usable, and `status` says what happened, so a run can report how
many replies were clean, trimmed or broken instead of failing on the first
odd one. Nothing is repaired silently: a JSON object cut off mid-way is
'truncated', not completed by guesswork.
"""

from __future__ import annotations

import ast
import codecs
import collections
import dataclasses
import enum
import functools
import json
import re
from typing import Any, Callable, Sequence

from absl import logging

from genre_jax.errors import ConfigError, DataFormatError

SCHEMES = ("summarizer", "profiler", "generator", "chain")
DOMAINS = ("news", "book")

Reply = str | list | dict | None
Profile = list[str] | dict[str, list[str]] | None


class Status(str, enum.Enum):
  """What a parser made of one reply."""
  OK = "ok"                # Clean reply in the expected format.
  TRIMMED = "trimmed"      # Usable, but cut to the length limit.
  UNTAGGED = "untagged"    # Usable plain text, the expected [tag] missing.
  EMPTY = "empty"          # Nothing there (also: a missing replay key).
  WRONG_TAG = "wrong_tag"  # Tagged, but with another tag than asked for.
  INCOMPLETE = "incomplete"  # Valid JSON lacking a required field.
  TRUNCATED = "truncated"  # A JSON object or list cut off before its end.
  REFUSED = "refused"      # A one-sentence refusal ("Sorry, I can't ...").
  MALFORMED = "malformed"  # Anything else that cannot be read.

  @property
  def usable(self) -> bool:
    return self in (Status.OK, Status.TRIMMED, Status.UNTAGGED)


@dataclasses.dataclass(frozen=True)
class Parsed:
  """A parsed reply: the value (None unless usable) and the status."""
  value: Any
  status: Status


_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\n?(.*?)(?:```|\Z)",
                       re.DOTALL)
_ANY_TAG_RE = re.compile(r"\[\s*([A-Za-z][A-Za-z _-]{0,30}?)\s*\]\s*:?")
_LEADING_TAG_RE = re.compile(r"^[\s*]*\[\s*[A-Za-z][A-Za-z _-]{0,30}\s*\]")
_BARE_TAG_RE = re.compile(r"^[\s*]*([A-Za-z][A-Za-z _-]{0,30}?)\s*\**:")
_NEXT_TAG_RE = re.compile(r"\n\s*\[\s*[A-Za-z][A-Za-z _-]{0,30}\s*\]")
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019"}
_BULLET_RE = re.compile(r"^\s*(?:[-*\u2022+]|\d{1,3}[.)]|\(\d{1,3}\))\s+")
_LABEL_RE = re.compile(r"^[A-Za-z][A-Za-z ]{0,30}:\s+")
# Openings of an LLM refusal; matched on a lower-cased one-sentence reply.
_REFUSAL_RE = re.compile(
    r"^(?:i'm sorry|i am sorry|sorry|i apologi[sz]e|i can't|i cannot|"
    r"i can not|i'm unable|i am unable|i'm not able|i am not able|as an ai)"
    r"\b")
# A sentence end followed by more text: the reply has several sentences.
_NEXT_SENTENCE_RE = re.compile(r"[.!?][\"')\]]*\s+\S")
_REFUSAL_MAX_LEN = 300


def _strip_quotes(text: str) -> str:
  """Removes one pair of quotes wrapping the whole text (and nothing else)."""
  text = text.strip()
  if len(text) >= 2 and text[0] in _QUOTES and text[-1] == _QUOTES[text[0]]:
    inner = text[1:-1]
    if text[0] not in inner and _QUOTES[text[0]] not in inner:
      return inner.strip()
  return text


def _trim(text: str, max_len: int) -> tuple[str, bool]:
  """Cuts `text` to at most `max_len` characters, at a word end if possible."""
  if max_len <= 0 or len(text) <= max_len:
    return text, False
  cut = text[:max_len]
  space = cut.rfind(" ")
  if space >= max_len // 2:
    cut = cut[:space]
  return cut.rstrip(" ,;:-"), True


def _unfence(text: str) -> str:
  """The content of the first ``` code fence, or the text itself."""
  match = _FENCE_RE.search(text)
  return match.group(2) if match else text


def _norm_tag(tag: str) -> str:
  return re.sub(r"[\s_-]+", "", tag.lower())


def _is_refusal(text: str) -> bool:
  """Whether plain text is a one-sentence refusal such as "Sorry, I can't
  help with that."; conservative, so that a real answer is never dropped."""
  text = _strip_quotes(text.strip(" *\r\n\t"))
  if (not text or "\n" in text or len(text) > _REFUSAL_MAX_LEN
      or _NEXT_SENTENCE_RE.search(text)):
    return False
  return bool(_REFUSAL_RE.match(text.lower().replace("\u2019", "'")))


def parse_tagged(reply: Reply, tags: Sequence[str], *,
                 max_len: int = 0) -> Parsed:
  """Reads a `[tag] text` reply, e.g. `[description] A novel about ...`.

  Tags match case-insensitively with optional spaces, `_`/`-` and a colon
  (`[New Title]:`, or `newtitle:` at the very start), anywhere in the reply
  (an LLM may chat before it); earlier names in `tags` win. The text runs to
  the next tag on a new line. A reply without any tag is kept as UNTAGGED
  plain text, unless it is a one-sentence refusal ("Sorry, I can't help with
  that.": REFUSED, not a description); one that opens with another tag is
  WRONG_TAG.

  Args:
    reply: the raw reply.
    tags: accepted tag names in order of preference, e.g. ("newtitle",
      "title").
    max_len: longest value kept in characters (0 = no limit).

  Returns:
    Parsed with the text (quotes around the whole text removed).
  """
  if reply is None or (isinstance(reply, str) and not reply.strip()):
    return Parsed(None, Status.EMPTY)
  if not isinstance(reply, str):
    return Parsed(None, Status.MALFORMED)
  text = _strip_quotes(_unfence(reply))
  found = {}
  for m in _ANY_TAG_RE.finditer(text):
    found.setdefault(_norm_tag(m.group(1)), m)
  match = next((found[t] for t in map(_norm_tag, tags) if t in found), None)
  bare = _BARE_TAG_RE.match(text)
  if match is not None:
    status, value = Status.OK, text[match.end():]
  elif bare and _norm_tag(bare.group(1)) in map(_norm_tag, tags):
    status, value = Status.OK, text[bare.end():]
  elif _LEADING_TAG_RE.match(text):
    return Parsed(None, Status.WRONG_TAG)
  elif _is_refusal(text):
    return Parsed(None, Status.REFUSED)
  else:
    status, value = Status.UNTAGGED, text
  following = _NEXT_TAG_RE.search(value)
  if following:
    value = value[:following.start()]
  value = _strip_quotes(" ".join(value.split()).lstrip("*: "))
  if not value:
    return Parsed(None, Status.EMPTY)
  value, trimmed = _trim(value, max_len)
  if trimmed and status is Status.OK:
    status = Status.TRIMMED
  return Parsed(value, status)


def _scan_balanced(text: str, start: int) -> tuple[int | None, list[int]]:
  """End index (exclusive) of the bracketed value opening at text[start].

  String-aware (JSON or Python quotes): brackets inside strings do not count.
  A mismatched closer ends the span early (it will not load: malformed).

  Returns:
    (end, nested): end is None when the text ends before the value closes
    (truncated); nested lists the positions of the brackets opened inside
    the value outside strings (its parts, never a value of their own when
    the value is cut off).
  """
  closing = {"{": "}", "[": "]"}
  stack = []
  nested = []
  in_string = None
  escaped = False
  for i in range(start, len(text)):
    ch = text[i]
    if in_string:
      if escaped:
        escaped = False
      elif ch == "\\":
        escaped = True
      elif ch == in_string:
        in_string = None
    elif ch in "\"'":
      in_string = ch
    elif ch in closing:
      if stack:
        nested.append(i)
      stack.append(closing[ch])
    elif ch in "}]":
      if stack.pop() != ch or not stack:
        return i + 1, nested
  return None, nested


def _load_literal(span: str) -> Any:
  """Parses a JSON (or Python-literal) value; raises ValueError if neither.

  A value nested too deeply for the parser, or a Python dict or set with an
  unhashable key (`{[1]: 2}`), is malformed too, not a crash.
  """
  try:
    return json.loads(span, strict=False)
  except json.JSONDecodeError:
    pass
  except RecursionError:
    raise ValueError("nested too deeply") from None
  try:
    return ast.literal_eval(span)
  except (ValueError, TypeError, SyntaxError, MemoryError,
          RecursionError) as e:
    raise ValueError(str(e)) from e


# Most openers one search tries: each try scans to the value's end, so an
# unbounded search of a long reply full of brackets would be quadratic.
_MAX_TRIES = 64


def _first_value(text: str, opener: str, kind: type) -> Parsed:
  """Finds the first complete value of `kind` opening with `opener`.

  An opener that never closes may be prose (`[the reader's history]`: the
  apostrophe opens a string), so the search goes on after it, skipping only
  the brackets nested in it; TRUNCATED only when no later value parses.
  At most _MAX_TRIES openers are tried.
  """
  truncated = False
  malformed = False
  skip: set[int] = set()
  tries = 0
  pos = text.find(opener)
  while pos >= 0 and tries < _MAX_TRIES:
    if pos in skip:
      pos = text.find(opener, pos + 1)
      continue
    tries += 1
    end, nested = _scan_balanced(text, pos)
    if end is None:
      truncated = True
      skip.update(nested)
      pos = text.find(opener, pos + 1)
      continue
    try:
      value = _load_literal(text[pos:end])
    except ValueError:
      value = None
    if isinstance(value, kind):
      return Parsed(value, Status.OK)
    malformed = True
    pos = text.find(opener, pos + 1)
  if truncated:
    return Parsed(None, Status.TRUNCATED)
  return Parsed(None, Status.MALFORMED if malformed or text.strip()
                else Status.EMPTY)


def _find_object(reply: str | dict) -> Parsed:
  """The first complete JSON object of a reply, fences searched first."""
  if isinstance(reply, dict):
    return Parsed(reply, Status.OK)
  parsed = Parsed(None, Status.MALFORMED)
  for text in [m.group(2) for m in _FENCE_RE.finditer(reply)] + [reply]:
    parsed = _first_value(text, "{", dict)
    if parsed.status is Status.OK:
      break
  return parsed


def parse_json_object(reply: Reply, required: Sequence[str] = (), *,
                      max_len: int = 0) -> Parsed:
  """Reads the first complete JSON object in a reply.

  The object may sit in free text or a ```json fence (fences are searched
  first). Required fields must be present as non-empty strings (or lists of
  strings, joined by ", "); string values are whitespace-normalised and cut
  to `max_len`.

  Returns:
    Parsed with the dict; TRUNCATED when the object never closes, INCOMPLETE
    when a required field is missing or empty, MALFORMED otherwise.
  """
  if reply is None or (isinstance(reply, str) and not reply.strip()):
    return Parsed(None, Status.EMPTY)
  if not isinstance(reply, (str, dict)):
    return Parsed(None, Status.MALFORMED)
  parsed = _find_object(reply)
  if parsed.value is None:
    return parsed
  out = {}
  trimmed = False
  for name, value in parsed.value.items():
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
      value = ", ".join(value)
    if isinstance(value, str):
      value, cut = _trim(" ".join(value.split()), max_len)
      trimmed |= cut
    out[str(name)] = value
  for name in required:
    if not isinstance(out.get(name), str) or not out[name]:
      return Parsed(None, Status.INCOMPLETE)
  return Parsed(out, Status.TRIMMED if trimmed else Status.OK)


def _clean_item(item: str) -> str:
  item = _BULLET_RE.sub("", item)
  return _strip_quotes(" ".join(item.split()).strip(" .;,"))


def parse_list(reply: Reply, *, max_items: int = 0,
               max_len: int = 0) -> Parsed:
  """Reads a list of short phrases.

  Accepts a JSON or Python-style list (anywhere in the text or a fence), a
  list object itself, numbered or bulleted lines, one phrase per line, or a
  comma/semicolon-separated line (an optional `Label:` prefix dropped).
  A reply holding a JSON object but no list is MALFORMED (another format,
  not phrases), and a one-sentence refusal is REFUSED.

  Args:
    reply: the raw reply.
    max_items: most phrases kept (0 = all); more is TRIMMED.
    max_len: longest phrase in characters (0 = no limit).

  Returns:
    Parsed with a list of non-empty strings.
  """
  if reply is None or (isinstance(reply, (str, list)) and not reply):
    return Parsed(None, Status.EMPTY)
  if isinstance(reply, list):
    items = reply
    status = Status.OK
  elif isinstance(reply, str):
    text = _unfence(reply).strip()
    if not text:
      return Parsed(None, Status.EMPTY)
    parsed = _first_value(text, "[", list)
    if parsed.status is Status.OK:
      items, status = parsed.value, Status.OK
    elif parsed.status is Status.TRUNCATED:
      return parsed
    elif text.count("[") > _MAX_TRIES:  # Brackets everywhere, none a list.
      return Parsed(None, Status.MALFORMED)
    elif _first_value(text, "{", dict).status is Status.OK:
      return Parsed(None, Status.MALFORMED)
    elif _is_refusal(text):
      return Parsed(None, Status.REFUSED)
    else:
      items, status = _split_phrases(text), Status.OK
  else:
    return Parsed(None, Status.MALFORMED)
  if not all(isinstance(i, (str, int, float)) for i in items):
    return Parsed(None, Status.MALFORMED)
  phrases = [p for p in (_clean_item(str(i)) for i in items) if p]
  if not phrases:
    return Parsed(None, Status.EMPTY)
  trimmed = False
  if max_items and len(phrases) > max_items:
    phrases, trimmed = phrases[:max_items], True
  cut = [_trim(p, max_len) for p in phrases]
  trimmed |= any(c for _, c in cut)
  return Parsed([p for p, _ in cut], Status.TRIMMED if trimmed else status)


def _split_phrases(text: str) -> list[str]:
  """Splits plain text into phrases: bullets, then lines, then commas."""
  lines = [l for l in text.splitlines() if l.strip()]
  bulleted = [l for l in lines if _BULLET_RE.match(l)]
  if bulleted:
    return bulleted
  if len(lines) > 1:
    return lines
  line = _LABEL_RE.sub("", lines[0]) if lines else ""
  return re.split(r"[;,]", line)


def parse_profile(reply: Reply, fields: Sequence[str], *, max_items: int = 0,
                  max_len: int = 0) -> Parsed:
  """Reads a JSON object whose `fields` each hold a list of phrases.

  Used by the news profiler ({"topics": [...], "regions": [...]}). A field
  given as one string is split like a comma-separated list.
  """
  if reply is None or (isinstance(reply, str) and not reply.strip()):
    return Parsed(None, Status.EMPTY)
  if not isinstance(reply, (str, dict)):
    return Parsed(None, Status.MALFORMED)
  obj = _find_object(reply)
  if obj.value is None:
    return obj
  out = {}
  status = Status.OK
  for name in fields:
    if name not in obj.value:
      return Parsed(None, Status.INCOMPLETE)
    raw = obj.value[name]
    if isinstance(raw, str):
      raw = _split_phrases(raw) if raw.strip() else []
    if not isinstance(raw, list):
      return Parsed(None, Status.MALFORMED)
    field = parse_list(raw, max_items=max_items, max_len=max_len)
    if field.status is Status.MALFORMED:
      return field
    if field.status is Status.TRIMMED:
      status = Status.TRIMMED
    out[name] = field.value or []
  if not any(out.values()):
    return Parsed(None, Status.EMPTY)
  return Parsed(out, status)


def reply_parser(name: str, domain: str, *, max_items: int = 10,
                 max_chars: int = 1000) -> Callable[[Reply], Parsed]:
  """The parser of scheme `name`'s replies ("summarizer" | "profiler" |
  "generator" | "chain", the last two alike) in `domain` ("news" | "book").

  Args:
    name: scheme name.
    domain: "news" (MIND fields) or "book" (Goodreads fields).
    max_items: most phrases kept per profile list.
    max_chars: longest kept text value (news titles: a third of it).

  Raises:
    ConfigError: for an unknown name or domain.
  """
  if name not in SCHEMES:
    raise ConfigError(f"unknown GENRE scheme '{name}'; choose one of "
                      f"{list(SCHEMES)}")
  if domain not in DOMAINS:
    raise ConfigError(f"unknown GENRE domain '{domain}'; choose one of "
                      f"{list(DOMAINS)}")
  if name == "summarizer":
    tags = ("newtitle", "title") if domain == "news" else ("description",)
    limit = max_chars // 3 if domain == "news" else max_chars
    return functools.partial(parse_tagged, tags=tags, max_len=limit)
  if name == "profiler":
    if domain == "news":
      return functools.partial(parse_profile, fields=("topics", "regions"),
                               max_items=max_items, max_len=80)
    return functools.partial(parse_list, max_items=max_items, max_len=80)
  required = (("title", "abstract", "category") if domain == "news"
              else ("title", "description"))
  return functools.partial(parse_json_object, required=required,
                           max_len=max_chars)


def format_profile(profile: Profile) -> str:
  """A profile (phrase list, or news dict of lists) as prompt text."""
  if not profile:
    return "(none)"
  if isinstance(profile, dict):
    return "\n".join(f"{name}: {', '.join(values) or '(none)'}"
                     for name, values in profile.items())
  return ", ".join(profile)


class ParseSummary:
  """Counts parse statuses over a run and logs them in one line."""

  def __init__(self, name: str = "replies"):
    self.name = name
    self.counts: collections.Counter[Status] = collections.Counter()

  def add(self, parsed: Parsed) -> Parsed:
    self.counts[parsed.status] += 1
    return parsed

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  @property
  def usable_rate(self) -> float:
    """Fraction of replies with a usable value (ok, trimmed, untagged)."""
    usable = sum(n for s, n in self.counts.items() if s.usable)
    return usable / self.total if self.total else 0.0

  def as_dict(self) -> dict[str, int]:
    return {s.value: self.counts[s] for s in Status if self.counts[s]}

  def line(self) -> str:
    parts = ", ".join(f"{k} {v}" for k, v in self.as_dict().items())
    return (f"{self.name}: {self.total} replies, "
            f"{100 * self.usable_rate:.2f}% usable ({parts or 'none'})")

  def log(self) -> str:
    text = self.line()
    logging.info("%s", text)
    return text


class Generations(dict):
  """Id -> raw response of one generation file, with load facts.

  Attributes:
    path: the file read.
    lines: non-blank lines read.
    duplicates: lines whose id was seen before (the last reply wins).
  """

  def __init__(self, path: str, responses: dict, lines: int, duplicates: int):
    super().__init__(responses)
    self.path = path
    self.lines = lines
    self.duplicates = duplicates


def _looks_jsonl(path: str) -> bool:
  with open(path, encoding="utf-8-sig") as f:
    for line in f:
      if line.strip():
        return line.lstrip().startswith("{")
  return path.endswith((".jsonl", ".json"))


def load_generations(path: str, key: str) -> Generations:
  """Loads a released generation file as id -> raw response.

  Two layouts: JSONL rows {key: id, "response": str | list | object} (the
  Goodreads GENRE release; extra fields such as "status" are ignored) and
  `id<TAB>response` lines (the MIND release of ONCE/GENRE). The layout is
  detected from the first non-blank line. Duplicate ids keep the last reply.
  The file must be UTF-8 (a leading byte-order mark is skipped).

  Args:
    path: the file.
    key: the id field of JSONL rows, "item_id" or "user_id".

  Raises:
    DataFormatError: naming file, line and field of a malformed row, or the
      first line that is not UTF-8.
  """
  path = str(path)
  try:
    return _load_generations(path, key)
  except UnicodeDecodeError:
    raise _not_utf8_error(path) from None


def _not_utf8_error(path: str) -> DataFormatError:
  """The error naming the first line of `path` that is not valid UTF-8."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
      try:
        raw.decode("utf-8")
      except UnicodeDecodeError as e:
        return DataFormatError(
            path, lineno, None,
            f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of "
            "the line); save the file as UTF-8")
  return DataFormatError(path, None, None, "not UTF-8")


def _load_generations(path: str, key: str) -> Generations:
  """load_generations, which see; raises UnicodeDecodeError on bad bytes."""
  responses: dict[str, Any] = {}
  lines = duplicates = 0
  jsonl = _looks_jsonl(path)
  with open(path, encoding="utf-8-sig") as f:
    for lineno, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      lines += 1
      if jsonl:
        item_id, response = _jsonl_row(path, lineno, line, key)
      else:
        item_id, sep, response = line.partition("\t")
        if not sep:
          raise DataFormatError(path, lineno, "response",
                                "expected 'id<TAB>response', found no tab")
        item_id = item_id.strip()
        if not item_id:
          raise DataFormatError(path, lineno, "id", "empty id")
      if item_id in responses:
        duplicates += 1
      responses[item_id] = response
  if duplicates:
    logging.info("%s: %d duplicate ids, the last reply kept", path,
                 duplicates)
  return Generations(path, responses, lines, duplicates)


def _jsonl_row(path: str, lineno: int, line: str, key: str) -> tuple[str, Any]:
  """Id and response of one JSONL row, or a DataFormatError."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataFormatError(path, lineno, None,
                          f"not valid JSON ({e.msg} at column {e.colno})"
                          ) from None
  except RecursionError:
    raise DataFormatError(path, lineno, None,
                          "not valid JSON (nested too deeply)") from None
  except ValueError as e:  # An integer longer than Python will convert.
    raise DataFormatError(path, lineno, None,
                          f"not valid JSON ({str(e).split(';')[0]})"
                          ) from None
  if not isinstance(row, dict):
    raise DataFormatError(path, lineno, None, "a row must be a JSON object")
  item_id = row.get(key)
  if not isinstance(item_id, (str, int)) or str(item_id) == "":
    raise DataFormatError(path, lineno, key,
                          f"missing or empty id (row has {sorted(row)})")
  if "response" not in row:
    raise DataFormatError(path, lineno, "response", "missing")
  response = row["response"]
  if not isinstance(response, (str, list, dict)):
    raise DataFormatError(path, lineno, "response",
                          f"must be a string, list or object, got "
                          f"{type(response).__name__}")
  return str(item_id), response
