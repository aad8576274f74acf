"""GENRE prompt schemes: what the LLM is asked, and how its reply is read.

Four schemes after Liu et al. (GENRE), each for news (MIND fields: title,
abstract, category, subcategory) and books (Goodreads: title, description):

  summarizer  item -> one enhanced, neutral and complete title/description.
  profiler    user history -> interest topics (news: and regions).
  generator   cold user history -> one new item they would like, as JSON.
  chain       profiler first, then generator conditioned on that profile.

A scheme holds the system prompt, a builder for the user prompt and the reply
parser (genre_jax.data.genre_parsing.reply_parser); `steps(name, domain)`
lists the prompts a scheme runs, in order.
Histories are cut to the most recent `max_history` items to bound prompts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

from genre_jax.data import genre_parsing as parsing

Item = Mapping[str, Any]

# Longest title shown in a history line, in characters.
_MAX_TITLE_CHARS = 200
# Longest item text shown to the summarizer, per field, in characters.
_MAX_FIELD_CHARS = 1500

_SUMMARIZER_SYSTEM = {
    "news": (
        "You rewrite news headlines. You receive one news article as tagged "
        "fields:\n[title] ...\n[abstract] ...\n[category] ...\n"
        "[subcategory] ...\nFields may be empty. Write one new headline for "
        "the article that is clear, complete, objective and neutral: it may "
        "draw on the abstract and category to say what the story is about, "
        "but must not add facts or opinions. Reply with exactly one line in "
        "the form\n[newtitle] <the new headline>\nand nothing else."),
    "book": (
        "You describe books. You receive one book as tagged fields:\n"
        "[title] ...\n[description] ...\nThe description may be missing. "
        "Write a short, neutral and informative description of the book (one "
        "or two sentences) from what you know of it and its title, without "
        "praise or spoilers. Reply with exactly one line in the form\n"
        "[description] <the description>\nand nothing else."),
}

_PROFILER_SYSTEM = {
    "news": (
        "You describe the interests of news readers. You receive the "
        "headlines a user read, oldest first. Name the topics the user "
        "follows and the regions (countries, states or cities) their news is "
        "about, each as a few words. Reply with a JSON object only, in the "
        "form\n{\"topics\": [\"...\", ...], \"regions\": [\"...\", ...]}\n"
        "with at most {max_items} entries per list (an empty list if none)."),
    "book": (
        "You describe the tastes of readers. You receive the titles of books "
        "a user liked, oldest first. Name what the user enjoys (genres, "
        "themes, moods, settings), each as a few words. Reply with a JSON "
        "list of at most {max_items} short phrases only, for example\n"
        "[\"space opera\", \"found family\"]"),
}

_GENERATOR_SYSTEM = {
    "news": (
        "You write news a reader will want to read. You receive the "
        "headlines a user read, oldest first{profile_note}. Invent one new, "
        "plausible news article this user would click, different from the "
        "ones listed. Reply with a JSON object only, in the form\n"
        "{{\"title\": \"...\", \"abstract\": \"...\", \"category\": \"...\"}}\n"
        "with a one-sentence abstract and a one-word category."),
    "book": (
        "You recommend books. You receive the titles of books a user liked, "
        "oldest first{profile_note}. Name one book, existing or imagined, "
        "that this user would like and that is not in the list. Reply with a "
        "JSON object only, in the form\n"
        "{{\"title\": \"...\", \"description\": \"...\"}}\n"
        "with a description of one or two sentences."),
}

_PROFILE_NOTE = ", and a profile of their interests"


@dataclasses.dataclass(frozen=True)
class Scheme:
  """One prompt step: its system prompt, user-prompt builder and parser.

  Attributes:
    name: scheme name; also the first part of every prompt key.
    domain: "news" or "book".
    target: "item" (one prompt per item) or "user" (one per user).
    system: the system prompt.
    build: builds the user prompt: build(item) for item schemes,
      build(history, profile) for user schemes (history oldest first).
    parse: reads a reply into parsing.Parsed.
    requires: the scheme whose parsed value this one takes as `profile`
      ("profiler" for chain), or None.
  """

  name: str
  domain: str
  target: str
  system: str
  build: Callable[..., str]
  parse: Callable[[parsing.Reply], parsing.Parsed]
  requires: str | None = None

  def key(self, subject_id: str) -> str:
    """The stable prompt key, e.g. "summarizer:book:B123"."""
    return f"{self.name}:{self.domain}:{subject_id}"


def _clip(text: Any, limit: int) -> str:
  text = " ".join(str(text or "").split())
  return text if len(text) <= limit else text[:limit].rstrip() + "..."


def _description(item: Item) -> str:
  return item.get("description") or item.get("abstract") or ""


def _summarizer_prompt(domain: str, item: Item) -> str:
  if domain == "news":
    names = ("title", "abstract", "category", "subcategory")
    fields = [(n, item.get(n, "")) for n in names]
  else:
    fields = [("title", item.get("title", "")),
              ("description", _description(item))]
  return "\n".join(f"[{n}] {_clip(v, _MAX_FIELD_CHARS)}" for n, v in fields)


def _history_lines(domain: str, history: Sequence[Item],
                   max_history: int) -> list[str]:
  """Numbered lines of the most recent `max_history` items, oldest first."""
  recent = list(history)[-max_history:] if max_history > 0 else list(history)
  lines = []
  for i, item in enumerate(recent, 1):
    title = _clip(item.get("title", ""), _MAX_TITLE_CHARS)
    category = item.get("category", "") if domain == "news" else ""
    lines.append(f"{i}. {title}" + (f" ({category})" if category else ""))
  return lines


def _user_prompt(domain: str, max_history: int, with_profile: bool,
                 history: Sequence[Item],
                 profile: parsing.Profile = None) -> str:
  heading = "Headlines read" if domain == "news" else "Books liked"
  parts = []
  if with_profile:
    parts.append("Profile:\n" + parsing.format_profile(profile))
  lines = _history_lines(domain, history, max_history)
  parts.append(f"{heading}:\n" + ("\n".join(lines) if lines else "(none)"))
  return "\n\n".join(parts)


def get_scheme(name: str, domain: str, *, max_history: int = 20,
               max_items: int = 10, max_chars: int = 1000) -> Scheme:
  """The prompt scheme `name` ("summarizer" | "profiler" | "generator" |
  "chain") for `domain` ("news" | "book").

  Args:
    name: scheme name; "chain" gives its second step (generation with a
      profile); its first step is the profiler (see `steps`).
    domain: "news" (MIND fields) or "book" (Goodreads fields).
    max_history: most recent history items put in user prompts.
    max_items: most phrases kept per profile list.
    max_chars: longest kept text value (titles: a third of it).

  Raises:
    ConfigError: for an unknown name or domain.
  """
  parse = parsing.reply_parser(name, domain, max_items=max_items,
                               max_chars=max_chars)  # Checks both names.
  if name == "summarizer":
    return Scheme(name, domain, "item", _SUMMARIZER_SYSTEM[domain],
                  functools.partial(_summarizer_prompt, domain), parse)
  if name == "profiler":
    system = _PROFILER_SYSTEM[domain].replace("{max_items}", str(max_items))
    return Scheme(name, domain, "user", system,
                  functools.partial(_user_prompt, domain, max_history, False),
                  parse)
  chain = name == "chain"
  system = _GENERATOR_SYSTEM[domain].format(
      profile_note=_PROFILE_NOTE if chain else "")
  return Scheme(name, domain, "user", system,
                functools.partial(_user_prompt, domain, max_history, chain),
                parse, requires="profiler" if chain else None)


def steps(name: str, domain: str, **kwargs) -> list[Scheme]:
  """The schemes `name` runs, in order: [profiler, chain] for "chain"."""
  scheme = get_scheme(name, domain, **kwargs)
  if scheme.requires:
    return [get_scheme(scheme.requires, domain, **kwargs), scheme]
  return [scheme]
