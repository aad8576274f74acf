r"""Zero-training content scorers on titles and on GENRE summaries: how much
more do the summarizer's descriptions say about what a user reads?

Each book becomes a fixed vector computed from its text alone, and a
candidate is scored by its inner product with the mean of the user's
history vectors. Nothing is trained, so no model can learn which book is
which (the item identities a trained title encoder exploits on Goodreads,
where most titles are unique): the gain from titles to summaries here is
the gain in what the text itself says.

  tfidf   TF-IDF over the MiniLM word pieces the models read, idf =
          ln(N / df) + 1 over the books, rows L2-normalised (scikit-learn's
          TfidfVectorizer with smooth_idf=False);
  minilm  all-MiniLM-L6-v2's last hidden state over [CLS] text [SEP],
          mean-pooled over the real tokens and L2-normalised (the
          sentence-transformers recipe for this model), weights frozen.

Texts: `title` (news.tsv) and `summary` (the release's GPT-3.5 content
summarizer replies, parsed as the `summarizer` data variant parses them),
each cut at the length the presets read (16 and 32 word pieces).

  python experiments/goodreads_content_similarity.py \
      --data_dir=../shared/data/goodreads

Prints a table (AUC, MRR, nDCG@5, nDCG@10 for all and cold users, per
scorer, text and split) and ends with one line of JSON:
{scorer: {text: {split: {"all": {...}, "cold": {...}}}}}.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import sparse

from genre_jax import config as config_lib
from genre_jax import data as data_lib
from genre_jax import metrics
from genre_jax.data import types
from genre_jax.errors import (
    ConfigError, DataFormatError, exit_on_input_error)
from genre_jax.lm import bert
from genre_jax.logs import json_line
from genre_jax.models import lm_encoder

import common_flags

SCORERS = ("tfidf", "minilm")
TEXTS = ("title", "summary")

# Its genre/summarizer.jsonl gives the summaries.
_DATA_DIR = common_flags.data_dir()
_CACHE_DIR = common_flags.cache_dir()
_SPLITS = common_flags.splits(["dev", "test"])
_SCORERS = flags.DEFINE_list("scorers", list(SCORERS), "Scorers to run.")
_TEXTS = flags.DEFINE_list("texts", list(TEXTS), "Item texts to score with.")
_COLD = common_flags.cold_threshold()
_SUMMARY_LEN = flags.DEFINE_integer(
    "summary_len", 0, "Word pieces of a summary kept; 0: the presets' (32).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Books per MiniLM batch.")


def load(data_dir: str) -> tuple[types.Dataset, ml_collections.ConfigDict]:
  """The dataset with a `title` and a `summary` field, tokenized as the
  presets tokenize them (config.data.max_len word pieces), and its config."""
  config = config_lib.load_preset("nrms", "goodreads")
  config.data.path = data_dir
  if _CACHE_DIR.value:
    config.data.data_dir = _CACHE_DIR.value
  config.data.fields = TEXTS
  config.data.genre.summarizer = "release"
  config.data.genre.summary_field = "summary"
  if _SUMMARY_LEN.value:
    config.data.max_len.summary = _SUMMARY_LEN.value
  return data_lib.load_dataset(config.data), config


def tfidf_vectors(tokens: np.ndarray, mask: np.ndarray,
                  vocab_size: int) -> sparse.csr_matrix:
  """[N+1, V] L2-normalised TF-IDF rows of token ids [N+1, L]; row 0 (the
  padding item) is empty and does not count as a document."""
  keep = mask.copy()
  keep[0] = False
  rows = np.nonzero(keep)[0]
  counts = sparse.csr_matrix(
      (np.ones(len(rows)), (rows, tokens[keep])),
      shape=(len(tokens), vocab_size))  # duplicates summed: term counts
  num_docs = len(tokens) - 1
  df = np.bincount(counts.indices, minlength=vocab_size)
  idf = np.log(num_docs / np.maximum(df, 1)) + 1.0
  weighted = counts @ sparse.diags(idf)
  norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(1))).ravel()
  return sparse.csr_matrix(sparse.diags(1.0 / np.maximum(norms, 1e-12))
                           @ weighted)


def minilm_vectors(config: ml_collections.ConfigDict, texts: np.ndarray,
                   max_len: int, batch_size: int) -> np.ndarray:
  """[N+1, D] L2-normalised mean-pooled MiniLM embeddings of the texts cut
  at max_len word pieces (plus [CLS] and [SEP]); row 0 is zero."""
  config = config.copy_and_resolve_references()
  config.model.lm.max_len = max_len + 2
  tokens, mask = lm_encoder.tokenize_text(config, texts)  # [N+1, L]
  encoder, _ = bert.load_bert(lm_encoder.lm_path(config), rngs=nnx.Rngs(0))

  @jax.jit
  def embed(ids, real):  # [B, L], [B, L] -> [B, D]
    hidden = encoder(ids, real)  # [B, L, D]
    weights = real[..., None].astype(hidden.dtype)
    mean = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return mean / jnp.maximum(
        jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)

  out = np.zeros((len(tokens), encoder.config.hidden_size), np.float32)
  for start in range(1, len(tokens), batch_size):
    ids = tokens[start:start + batch_size]
    real = mask[start:start + batch_size]
    pad = batch_size - len(ids)  # one compiled shape for every batch
    ids = np.pad(ids, ((0, pad), (0, 0)))
    real = np.pad(real, ((0, pad), (0, 0)))
    out[start:start + batch_size] = np.asarray(embed(ids, real))[
        :batch_size - pad]
  return out


def history_means(split: types.Behaviors, num_rows: int) -> sparse.csr_matrix:
  """[M, N+1] rows averaging each impression's history items."""
  lengths = split.history_lengths()
  rows = np.repeat(np.arange(len(split)), lengths)
  weights = 1.0 / np.maximum(lengths[rows], 1)
  return sparse.csr_matrix((weights, (rows, split.history_items)),
                           shape=(len(split), num_rows))


def scores(split: types.Behaviors, vectors) -> np.ndarray:
  """[sum_c] <mean history vector, candidate vector> per candidate."""
  users = history_means(split, vectors.shape[0]) @ vectors  # [M, D]
  rows = np.repeat(np.arange(len(split)), split.num_candidates())
  if sparse.issparse(vectors):
    users = sparse.csr_matrix(users)
    return np.asarray(users[rows].multiply(
        vectors[split.cand_items]).sum(1)).ravel()
  return np.einsum("cd,cd->c", users[rows], vectors[split.cand_items])


def table(results: dict, lengths: dict[str, int]) -> str:
  return metrics.format_table(
      [("scorer", 8), ("text", 14), ("split", 7)],
      [((scorer, f"{text} ({lengths[text]})", split), r)
       for scorer, by_text in results.items()
       for text, by_split in by_text.items()
       for split, r in by_split.items()])


def main(argv: Sequence[str]) -> None:
  del argv
  for name, chosen, known in (("scorers", _SCORERS.value, SCORERS),
                              ("texts", _TEXTS.value, TEXTS)):
    if not chosen or set(chosen) - set(known):
      raise app.UsageError(f"--{name}={','.join(chosen)}: choose from "
                           f"{','.join(known)}")
  if _BATCH.value < 1:
    raise app.UsageError(f"--batch_size={_BATCH.value}: must be >= 1")
  data_dir = os.path.abspath(os.path.expanduser(_DATA_DIR.value))
  try:
    dataset, config = load(data_dir)
  except (ConfigError, DataFormatError, FileNotFoundError) as e:
    raise app.UsageError(f"--data_dir={data_dir}: {e}") from e
  missing = [s for s in _SPLITS.value if s not in dataset.splits]
  if missing:
    raise app.UsageError(f"--data_dir={data_dir} has no split {missing}")
  lengths = {t: int(config.data.max_len[t]) for t in TEXTS}
  items = dataset.items
  results: dict = {}
  seconds = {}
  for scorer in _SCORERS.value:
    results[scorer] = {}
    start = time.time()
    for text in _TEXTS.value:
      if scorer == "tfidf":
        vectors = tfidf_vectors(items.tokens[text], items.masks[text],
                                int(dataset.info["vocab_size"]))
      else:
        vectors = minilm_vectors(config, items.text[text], lengths[text],
                                 _BATCH.value)
      results[scorer][text] = {
          split: metrics.behaviors_metrics(
              dataset.splits[split], scores(dataset.splits[split], vectors),
              _COLD.value)
          for split in _SPLITS.value}
    seconds[scorer] = time.time() - start
  summary = dataset.info.get("genre", {}).get("summarizer", {})
  # The folder as given: a results folder keeps this table.
  print(f"Zero-training content scorers on {_DATA_DIR.value}: "
        f"{items.num_items} "
        f"books, {summary.get('items_summarized', 0)} with a summary; "
        + ", ".join(f"{s} {t:.0f} s" for s, t in seconds.items()))
  print(table(results, lengths))
  print(json_line(results))


if __name__ == "__main__":
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
