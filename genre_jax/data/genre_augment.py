"""GENRE augmentation: LLM generations folded into a dataset's tables.

Three switches under config.data.genre, each naming a generations source:
"release" (the dataset's own GENRE side tables, as the Goodreads release
carries), "release:<table>" (e.g. "release:generator_v2"), or a file path
(JSONL or `id<TAB>response`, as `run.py --mode=generate` writes).

  summarizer  Each item's enhanced description becomes the item text field
              `summary_field` ("summary" beside the title, or "title" to
              replace it). Items without a usable reply keep their title.
  profiler    Each user's interest profile becomes a pseudo-item of the item
              table (its text in the title field, flagged synthetic), and
              Behaviors.profiles points every impression of the user at it.
              The recommender encodes it with the item encoder and puts it in
              front of the history, so the user encoder fuses it in.
  generator   Each generated item (title + description) becomes a new
              synthetic item appended, as the newest, to its user's
              histories, where the user is cold (at most
              config.data.cold_threshold real history items). Several
              sources (v1, v2) add one item each.

Synthetic items are never candidates, never sampled as negatives, never
recommended, and do not count towards a user's history length when deciding
who is cold. Unusable replies are counted and logged, never fatal.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import logging
import ml_collections
import numpy as np

from genre_jax.data import genre_parsing as parsing
from genre_jax.data import types
from genre_jax.errors import ConfigError

# Default side tables of the "release" source, by scheme.
_RELEASE_TABLES = {"summarizer": "summarizer", "profiler": "profiler",
                   "generator": "generator_v1"}
PROFILE_PREFIX = "profile:"
GENERATED_PREFIX = "generated:"


def enabled(genre_config: ml_collections.ConfigDict | None) -> bool:
  """Whether any augmentation is switched on."""
  return genre_config is not None and bool(
      genre_config.summarizer or genre_config.profiler or
      tuple(genre_config.generator))


def domain_of(dataset: types.Dataset, genre_config) -> str:
  """The prompt domain whose parsers read the replies: book or news."""
  domain = str(genre_config.get("domain", "auto"))
  if domain == "auto":
    return "book" if "goodreads" in dataset.name else "news"
  if domain not in parsing.DOMAINS:
    raise ConfigError(f"config.data.genre.domain: '{domain}' is not auto, "
                      f"{' or '.join(parsing.DOMAINS)}")
  return domain


def load_responses(dataset: types.Dataset, source: str, scheme: str
                   ) -> tuple[str, dict[str, Any]]:
  """(where, id -> raw reply) of one generations source; last reply wins."""
  key = "item_id" if scheme == "summarizer" else "user_id"
  if source == "release" or source.startswith("release:"):
    table = source.partition(":")[2] or _RELEASE_TABLES[scheme]
    if table not in dataset.side_tables:
      raise ConfigError(
          f"config.data.genre.{scheme}='{source}': the dataset "
          f"'{dataset.name}' carries no GENRE table '{table}' (it has "
          f"{sorted(dataset.side_tables) or 'none'}); give a generations file "
          "instead (run.py --mode=generate writes one)")
    rows = dataset.side_tables[table]
    ids = rows.get(key, rows.get("item_id", rows.get("user_id")))
    return (f"release:{table}",
            {str(i): json.loads(r) for i, r in zip(ids, rows["response_json"])})
  path = os.path.expanduser(source)
  if not os.path.isfile(path):
    raise ConfigError(f"config.data.genre.{scheme}: no generations file at "
                      f"{path}")
  return path, dict(parsing.load_generations(path, key))


def _parse_all(responses: dict[str, Any], scheme: str, domain: str,
               where: str) -> tuple[dict[str, Any], dict[str, int]]:
  """Usable parsed values by id, and the parse statuses counted."""
  parse = parsing.reply_parser(scheme, domain)
  summary = parsing.ParseSummary(f"{scheme} ({where})")
  values = {}
  for subject, reply in responses.items():
    parsed = summary.add(parse(reply))
    if parsed.status.usable:
      values[subject] = parsed.value
  summary.log()
  return values, summary.as_dict()


def _append_items(items: types.ItemTable, ids: Sequence[str],
                  text: dict[str, Sequence[str]]) -> np.ndarray:
  """Appends synthetic items (fields not in `text` are empty); their rows."""
  start = len(items.ids)
  n = len(ids)
  items.ids = np.concatenate([items.ids, np.array(ids, dtype=object)])
  for field in items.text:
    values = text.get(field, [""] * n)
    items.text[field] = np.concatenate(
        [items.text[field], np.array(list(values), dtype=object)])
  old_synthetic = (np.zeros(start, bool) if items.synthetic is None
                   else items.synthetic)
  items.synthetic = np.concatenate([old_synthetic, np.ones(n, bool)])
  old_pop = (np.zeros(start, np.int64) if items.popularity is None
             else items.popularity)
  items.popularity = np.concatenate([old_pop, np.zeros(n, np.int64)])
  return np.arange(start, start + n)


def apply_user_extras(behaviors: types.Behaviors,
                      profile_of: dict[str, int],
                      generated_of: dict[str, list[int]], *,
                      cold_threshold: int,
                      synthetic: np.ndarray | None = None
                      ) -> dict[str, set[str]]:
  """Points rows at their user's profile and appends generated items.

  Used for the dataset's splits and for any behaviors file evaluated later
  (users are matched by id). Generated items join cold rows only: those whose
  real history (synthetic items not counted, before appending) has at most
  cold_threshold items, as GENRE's generator targets cold users; a file
  covering warm users, or made with another threshold, leaves warm rows as
  they are.

  Args:
    behaviors: the rows to extend, in place.
    profile_of: user id -> profile pseudo-item row.
    generated_of: user id -> generated item rows.
    cold_threshold: config.data.cold_threshold.
    synthetic: the item table's synthetic flags, to count real items only.

  Returns:
    {"extended": users of generated_of with a row extended, "skipped": users
    of generated_of with a row left as is for not being cold}.
  """
  if profile_of:
    behaviors.profiles = np.array(
        [profile_of.get(str(u), 0) for u in behaviors.user_ids], np.int32)
  users = {"extended": set(), "skipped": set()}
  if not generated_of:
    return users
  lengths = behaviors.history_lengths()
  cold = behaviors.real_history_lengths(synthetic) <= cold_threshold
  rows, new_lengths = [], np.empty(len(behaviors), np.int64)
  for m, user in enumerate(behaviors.user_ids):
    old = behaviors.history_items[behaviors.history_offsets[m]:
                                  behaviors.history_offsets[m + 1]]
    extra = generated_of.get(str(user), ())
    if extra and not cold[m]:
      users["skipped"].add(str(user))
      extra = ()
    elif extra:
      users["extended"].add(str(user))
    rows.append(np.concatenate([old, np.asarray(extra, np.int32)])
                if extra else old)
    new_lengths[m] = lengths[m] + len(extra)
  behaviors.history_items = (np.concatenate(rows).astype(np.int32) if rows
                             else np.zeros(0, np.int32))
  offsets = np.zeros(len(behaviors) + 1, np.int64)
  np.cumsum(new_lengths, out=offsets[1:])
  behaviors.history_offsets = offsets
  return users


def _cold_report(users: dict[str, set[str]], cold_threshold: int
                 ) -> dict[str, int]:
  """Counts of generator users extended, and skipped as never cold."""
  return {"cold_threshold": cold_threshold,
          "users_extended": len(users["extended"]),
          "users_skipped_not_cold": len(users["skipped"] - users["extended"]),
          "users_partly_skipped": len(users["skipped"] & users["extended"])}


def extend_behaviors(behaviors: types.Behaviors,
                     dataset: types.Dataset) -> None:
  """Applies the dataset's GENRE user extras to a behaviors file read later
  (eval --eval_file, recommend --behaviors_file); no-op without them."""
  users = dataset.info.get("genre_users")
  if users:
    threshold = users["cold_threshold"]
    extended = apply_user_extras(
        behaviors, users["profile_of"], users["generated_of"],
        cold_threshold=threshold, synthetic=dataset.items.synthetic)
    if users["generated_of"]:
      logging.info("GENRE generated items for the behaviors file: %s",
                   json.dumps(_cold_report(extended, threshold)))


def augment(dataset: types.Dataset,
            genre_config: ml_collections.ConfigDict, *,
            cold_threshold: int) -> dict[str, Any]:
  """Applies the configured GENRE augmentations to an untokenized dataset.

  Generated items join only the rows of users with at most cold_threshold
  (config.data.cold_threshold) history items.

  Returns a report (sources, parse statuses, counts), also kept in
  dataset.info["genre"] together with the user maps that apply_user_extras
  needs for behaviors files read later.
  """
  domain = domain_of(dataset, genre_config)
  items = dataset.items
  report: dict[str, Any] = {"domain": domain}
  profile_of: dict[str, int] = {}
  generated_of: dict[str, list[int]] = {}

  if genre_config.summarizer:
    field = str(genre_config.summary_field)
    if field not in ("summary", "title"):
      raise ConfigError(f"config.data.genre.summary_field: '{field}' is not "
                        "summary (a new field) or title (replace the title)")
    where, responses = load_responses(dataset, str(genre_config.summarizer),
                                      "summarizer")
    values, statuses = _parse_all(responses, "summarizer", domain, where)
    titles = items.text["title"]
    summary = np.array([values.get(str(i), titles[k]) if k else ""
                        for k, i in enumerate(items.ids)], dtype=object)
    items.text[field] = summary
    report["summarizer"] = {
        "source": where, "field": field, "statuses": statuses,
        "items_summarized": int(sum(str(i) in values for i in items.ids[1:])),
        "items": items.num_items}

  if "summary" not in items.text:
    items.text["summary"] = items.text["title"].copy()

  if genre_config.profiler:
    where, responses = load_responses(dataset, str(genre_config.profiler),
                                      "profiler")
    values, statuses = _parse_all(responses, "profiler", domain, where)
    users = sorted(values)
    texts = [parsing.format_profile(values[u]).replace("\n", "; ")
             for u in users]
    rows = _append_items(items, [PROFILE_PREFIX + u for u in users],
                         {"title": texts, "summary": texts})
    profile_of = dict(zip(users, rows.tolist()))
    report["profiler"] = {"source": where, "statuses": statuses,
                          "users_profiled": len(users)}

  generator_sources = list(genre_config.generator)
  if generator_sources:
    report["generator"] = []
  for n, source in enumerate(generator_sources):
    where, responses = load_responses(dataset, str(source), "generator")
    values, statuses = _parse_all(responses, "generator", domain, where)
    users = sorted(values)
    titles = [str(values[u].get("title", "")) for u in users]
    bodies = [str(values[u].get("description", values[u].get("abstract", "")))
              for u in users]
    text = {"title": titles, "abstract": bodies, "summary": bodies}
    if "category" in items.text:
      text["category"] = [str(values[u].get("category", "")) for u in users]
    rows = _append_items(
        items, [f"{GENERATED_PREFIX}{n}:{u}" for u in users], text)
    for user, row in zip(users, rows.tolist()):
      generated_of.setdefault(user, []).append(row)
    report["generator"].append({"source": where, "statuses": statuses,
                                "users": len(users)})

  extended = {"extended": set(), "skipped": set()}
  for behaviors in dataset.splits.values():
    split_users = apply_user_extras(
        behaviors, profile_of, generated_of, cold_threshold=cold_threshold,
        synthetic=items.synthetic)
    for key, value in split_users.items():
      extended[key] |= value
  if generator_sources:
    # Users of the files whose rows were all warm got no generated item.
    report["generator_cold"] = _cold_report(extended, cold_threshold)
  report["synthetic_items"] = int(np.sum(items.synthetic))
  dataset.info["genre"] = report
  dataset.info["genre_users"] = {"profile_of": profile_of,
                                 "generated_of": generated_of,
                                 "cold_threshold": cold_threshold}
  logging.info("GENRE augmentation: %s", json.dumps(report))
  return report
