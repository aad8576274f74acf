"""The language-model families genre_jax loads, by Hugging Face `model_type`.

A family is a Flax module with the encoder interface the recommender and the
generator use: `embed(ids)` [B, L] -> [B, L, D], `run_layers(hidden, mask,
start, stop)`, `layers`, `config.hidden_size`, `embedding_modules()` (what
runs below layer 0, frozen with the lower layers) and `final_norm(hidden)`.
Causal families also decode (KV cache) for GENRE's local provider.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

from genre_jax.errors import DataFormatError
from genre_jax.lm import bert
from genre_jax.lm import hf
from genre_jax.lm import llama
from genre_jax.lm import opt


@dataclasses.dataclass(frozen=True)
class Family:
  """How to read and build one family of checkpoints."""
  name: str
  model_types: tuple[str, ...]  # config.json model_type values it reads
  read_config: Callable[[Any], Any]  # model dir -> its architecture config
  load: Callable[..., tuple[Any, Any]]  # (dir, dtype=, param_dtype=, rngs=)
  causal: bool  # a decoder (left-to-right attention, can generate)
  # HF name of the token-embedding table, without the checkpoint's prefix.
  embeddings_key: str
  # Prefixes head models put before the backbone's tensor names.
  prefixes: tuple[str, ...] = ("",)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  FAMILIES[family.name] = family
  return family


register(Family("bert", hf.BERT_MODEL_TYPES, hf.read_bert_config,
                bert.load_bert, causal=False,
                embeddings_key="embeddings.word_embeddings.weight",
                prefixes=("", "bert.", "roberta.")))
register(Family("llama", hf.LLAMA_MODEL_TYPES, hf.read_llama_config,
                llama.load_llama, causal=True,
                embeddings_key="embed_tokens.weight", prefixes=("", "model.")))
register(Family("opt", opt.MODEL_TYPES, opt.read_opt_config, opt.load_opt,
                causal=True, embeddings_key=opt.EMBEDDINGS_KEY,
                prefixes=opt.PREFIXES))


def supported_model_types() -> list[str]:
  return sorted(t for f in FAMILIES.values() for t in f.model_types)


def family_of(model_dir: str | pathlib.Path) -> Family:
  """The family of a model directory, from its config.json's model_type; an
  unsupported one is an error naming the supported types."""
  model_type = hf.read_config_json(model_dir).get("model_type")
  for family in FAMILIES.values():
    if model_type in family.model_types:
      return family
  raise DataFormatError(
      pathlib.Path(model_dir) / hf.CONFIG_FILE, None, "model_type",
      f"unsupported model type {model_type!r}; supported: "
      f"{', '.join(supported_model_types())}")


def get(name: str) -> Family:
  """The family registered as `name` (bert | llama | ...)."""
  return FAMILIES[name]
