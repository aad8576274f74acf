"""A pretrained language model as the item encoder (PLM-NR / ONCE's DIRE).

Item text is the configured fields joined into one sequence (or worded by a
template), tokenized with the LM's own tokenizer, encoded by a model of any
family in lm/families.py, pooled (cls | mean | last) and projected to the
recommender's hidden size, or (ONCE's head, `pooling=attention`) projected
token by token and pooled by additive attention.

Fine-tuning modes: full (`lm.tune_from=0`); frozen lower layers
(`lm.tune_from=N`: embeddings and layers 0..N-1 frozen, run without dropout,
so that they are a fixed function of the text); LoRA adapters
(`lm.lora.rank>0`: the LM's weights frozen, adapters on the tuned layers).
With frozen layers and `lm.cache=True`, the hidden states entering layer N are
computed once for every item, stored on disk (memory-mapped) under a key that
hashes the frozen weights themselves, the LM's config.json, the token ids (so
the text, template, tokenizer and truncation) and N, and the recommender then
runs only layers N..L-1 from them. The frozen weights may be stored in
bfloat16 or int8 (`lm.frozen_dtype`, lm/quantize.py; with LoRA, QLoRA-style
int8 base weights), and the cached hidden states are then computed with them
(the key names the dtype, so float32 keys are as before).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from genre_jax import variables
from genre_jax import workdir as workdir_lib
from genre_jax.data import tokenize as tokenize_lib
from genre_jax.data.types import Dataset, ItemInputSpec
from genre_jax.errors import ConfigError, DataFormatError
from genre_jax.lm import families
from genre_jax.lm import hf
from genre_jax.lm import lora
from genre_jax.lm import mlm
from genre_jax.lm import packing
from genre_jax.lm import quantize
from genre_jax.models.item_encoders import ItemEncoder
from genre_jax.models import layers
from genre_jax.models.layers import compute_dtype
from genre_jax.registry import ITEM_ENCODERS

TEXT_FIELD = "lm_text"  # token ids [N+1, L] of the joined item text
HIDDEN_FIELD = "lm_hidden"  # cached hidden states [N+1, L, D_lm]


# --- Loading the language model ---------------------------------------------


def lm_path(config: ml_collections.ConfigDict) -> str:
  return hf.model_dir(config.model.lm.path)


def lm_family(config: ml_collections.ConfigDict) -> families.Family:
  """The family of model.lm.path: model.lm.kind, or (auto) its model_type."""
  kind = config.model.lm.kind
  if kind == "auto":
    return families.family_of(lm_path(config))
  if kind not in families.FAMILIES:
    raise ConfigError(f"config.model.lm.kind: '{kind}' is not auto or one of "
                      f"{sorted(families.FAMILIES)}")
  return families.get(kind)


def lm_kind(config: ml_collections.ConfigDict) -> str:
  return lm_family(config).name


def load_lm(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
  """The pretrained LM of config.model.lm (weights from disk), and its kind.

  With `lm.init` set, the weights of a masked-LM pretraining run replace the
  directory's (the directory still gives the architecture and tokenizer).
  """
  family = lm_family(config)
  kind = family.name
  lm, _ = family.load(lm_path(config), dtype=compute_dtype(config),
                      param_dtype=jnp.float32, rngs=rngs)
  if config.model.lm.init:
    mlm.load_encoder_weights(config.model.lm.init, lm)
  return lm, kind


def read_lm_config(config: ml_collections.ConfigDict):
  """The architecture config (hf.BertConfig, ...) of model.lm.path."""
  return lm_family(config).read_config(lm_path(config))


def tune_from(config: ml_collections.ConfigDict, num_layers: int) -> int:
  n = int(config.model.lm.tune_from)
  if not 0 <= n <= num_layers:
    raise ConfigError(f"config.model.lm.tune_from={n}: must be in "
                      f"0..{num_layers} (the LM has {num_layers} layers)")
  return n


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid config.model.lm field.

  Checked up front: a bad value otherwise fails deep inside the traced model
  (max_len past the position table), or trains silently wrong (negative
  LoRA scale, dropout 1).
  """
  lc = config.model.lm
  lora_config = lc.lora
  if int(lora_config.rank) != lora_config.rank or int(lora_config.rank) < 0:
    raise ConfigError(f"config.model.lm.lora.rank={lora_config.rank}: must be "
                      "an integer >= 0 (0 = no LoRA)")
  if int(lora_config.rank) > 0 and not float(lora_config.alpha) > 0:
    raise ConfigError(f"config.model.lm.lora.alpha={lora_config.alpha}: "
                      "must be > 0")
  if not 0 <= float(lora_config.dropout) < 1:
    raise ConfigError(f"config.model.lm.lora.dropout={lora_config.dropout}: "
                      "must be in [0, 1)")
  dtype = frozen_dtype(config)
  if dtype != "float32" and not (int(lc.tune_from) > 0 or
                                 int(lora_config.rank) > 0):
    raise ConfigError(f"config.model.lm.frozen_dtype={dtype}: nothing is "
                      "frozen (tune_from=0 and lora.rank=0); freeze layers "
                      "with tune_from > 0 or use LoRA, or keep float32")
  max_len = int(lc.max_len)
  if max_len < 1:
    raise ConfigError(f"config.model.lm.max_len={lc.max_len}: must be >= 1")
  lm_config = read_lm_config(config)
  limit = getattr(lm_config, "max_length", None)  # learnt absolute positions
  if limit is None and not lm_family(config).causal:
    limit = lm_config.max_position_embeddings
  if limit is not None:
    if max_len > limit:
      raise ConfigError(
          f"config.model.lm.max_len={max_len}: must be <= {limit}, the "
          f"max_position_embeddings of {lm_path(config)}")


def frozen_dtype(config: ml_collections.ConfigDict) -> str:
  """config.model.lm.frozen_dtype: float32 | bfloat16 | int8."""
  dtype = config.model.lm.get("frozen_dtype", "float32")
  if dtype not in quantize.FROZEN_DTYPES:
    raise ConfigError(f"config.model.lm.frozen_dtype: '{dtype}' is not "
                      f"{', '.join(quantize.FROZEN_DTYPES)}")
  return dtype


def uses_cache(config: ml_collections.ConfigDict) -> bool:
  return bool(config.model.lm.cache) and int(config.model.lm.tune_from) > 0


def _freeze_dropout(module: nnx.Module) -> None:
  """Frozen parts run without dropout: a fixed function of the text."""
  for _, m in nnx.iter_modules(module):
    if isinstance(m, nnx.Dropout):
      m.rate = 0.0


def _frozen_parts(lm, n: int):
  return [*lm.embedding_modules(), *list(lm.layers)[:n]]


def _check_lora_targets(lm, targets: tuple[str, ...]) -> None:
  """Every lora.targets name must be a Linear layer of the LM's layers."""
  valid = sorted({name for layer in lm.layers
                  for _, module in nnx.iter_modules(layer)
                  for name, child in vars(module).items()
                  if isinstance(child, nnx.Linear)})
  unknown = [t for t in targets if t not in valid]
  if unknown or not targets:
    raise ConfigError(f"config.model.lm.lora.targets: {unknown or '()'} "
                      f"name no Linear layer of the LM; choose from {valid}")


# --- The encoder ------------------------------------------------------------


def pool(hidden: jax.Array, mask: jax.Array, how: str) -> jax.Array:
  """[N, L, D] hidden states, [N, L] mask -> [N, D] by cls | mean | last."""
  mask = mask.astype(bool)
  if how == "cls":
    return hidden[:, 0]
  if how == "mean":
    weights = mask.astype(hidden.dtype)[..., None]  # [N, L, 1]
    total = jnp.sum(hidden * weights, axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  if how == "last":
    last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)  # [N], right padding
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  raise ConfigError(f"config.model.lm.pooling: '{how}' is not cls, mean or "
                    "last")


@ITEM_ENCODERS.register("lm")
class LMItemEncoder(ItemEncoder):
  """Pretrained LM -> pooled item vector -> projection to hidden_dim.

  The LM's weights are variables.Pretrained (tuned at model.lm.lr); its
  embeddings and layers below tune_from, or all of them under LoRA, are
  variables.Frozen, stored in model.lm.frozen_dtype (float32, bfloat16 or
  int8: lm/quantize.py); the projection trains at train.lr.
  """

  @classmethod
  def item_inputs(cls, config: ml_collections.ConfigDict, dataset: Dataset):
    return item_inputs(config, dataset)

  @classmethod
  def random_inputs(cls, config: ml_collections.ConfigDict, num_items: int,
                    length: int, vocab: int, rng: np.random.Generator):
    """Random token ids of the LM's vocabulary, or random cached hidden
    states when the frozen layers are cached; `vocab` is not used."""
    del vocab
    lm_config = read_lm_config(config)
    if uses_cache(config):
      field = HIDDEN_FIELD
      table = rng.standard_normal(
          (num_items + 1, length, lm_config.hidden_size),
          dtype=np.float32).astype(_CACHE_DTYPES[config.model.lm.cache_dtype])
    else:
      field = TEXT_FIELD
      table = rng.integers(1, lm_config.vocab_size, (num_items + 1, length),
                           dtype=np.int32)
    mask = np.ones((num_items + 1, length), bool)
    mask[0] = False
    spec = ItemInputSpec(vocab_size=0, fields=(field,), lengths=(length,),
                         num_users=100)
    return {"tokens": {field: table}, "masks": {field: mask}}, spec

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    lc = config.model.lm
    check_config(config)
    self.lm, self.kind = load_lm(config, rngs=rngs)
    num_layers = len(self.lm.layers)
    self.tune_from = tune_from(config, num_layers)
    self.num_layers = num_layers
    self.cached = tuple(spec.fields) == (HIDDEN_FIELD,)
    if tuple(spec.fields) not in ((TEXT_FIELD,), (HIDDEN_FIELD,)):
      raise ConfigError(
          f"item_encoder=lm reads '{TEXT_FIELD}' or '{HIDDEN_FIELD}' inputs, "
          f"got fields {spec.fields}; build them with "
          "genre_jax.models.lm_encoder.item_inputs")
    variables.retype(self.lm, variables.Pretrained)
    for part in _frozen_parts(self.lm, self.tune_from) if self.tune_from else ():
      _freeze_dropout(part)
      variables.retype(part, variables.Frozen)
    if int(lc.lora.rank) > 0:
      variables.retype(self.lm, variables.Frozen)  # adapters only
      _check_lora_targets(self.lm, tuple(lc.lora.targets))
      for layer in list(self.lm.layers)[self.tune_from:]:
        lora.apply_lora(layer, tuple(lc.lora.targets), rank=int(lc.lora.rank),
                        alpha=float(lc.lora.alpha),
                        dropout=float(lc.lora.dropout), rngs=rngs)
    # After LoRA: an adapter's frozen base is quantized too (QLoRA).
    quantize.quantize_frozen(self.lm, frozen_dtype(config))
    self.pooling = lc.pooling
    self.pack = bool(lc.get("pack", True))
    self.dtype = compute_dtype(config)
    width = int(self.lm.config.hidden_size)
    self.projection = nnx.Linear(width, int(config.model.hidden_dim),
                                 dtype=self.dtype, param_dtype=jnp.float32,
                                 rngs=rngs)
    # ONCE's item head: every token projected, then additive attention.
    self.attention = (layers.AdditiveAttention(
        int(config.model.hidden_dim), int(config.model.attention_dim),
        dtype=self.dtype, rngs=rngs) if self.pooling == "attention" else None)

  def lower(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Hidden states entering layer tune_from (what the cache stores)."""
    hidden = self.lm.embed(ids)  # [N, L, D]
    return self.lm.run_layers(hidden, mask, 0, self.tune_from)

  def tuned_layers(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Layers tune_from.. on [N, L, D_lm]: on packed rows (lm.pack, the
    default: the same outputs at real tokens without computing padding),
    or padded."""
    start, stop = self.tune_from, self.num_layers

    def run(lm, h, m, segments):
      return lm.run_layers(h, m, start, stop, segments=segments)

    if not self.pack or start == stop:
      return run(self.lm, hidden, mask, None)
    return packing.run_packed(run, self.lm, hidden, mask)

  def __call__(self, tokens: dict[str, jax.Array],
               masks: dict[str, jax.Array]) -> jax.Array:
    if self.cached:
      mask = masks[HIDDEN_FIELD].astype(bool)  # [N, L]
      hidden = tokens[HIDDEN_FIELD].astype(self.dtype)  # [N, L, D_lm]
    else:
      mask = masks[TEXT_FIELD].astype(bool)
      hidden = self.lower(tokens[TEXT_FIELD], mask)
      if self.tune_from > 0:
        hidden = jax.lax.stop_gradient(hidden)
    hidden = self.tuned_layers(hidden, mask)
    hidden = self.lm.final_norm(hidden)  # [N, L, D_lm]
    if self.attention is not None:
      per_token = self.projection(hidden.astype(self.dtype))  # [N, L, D]
      return self.attention(per_token, mask)  # [N, hidden_dim]
    pooled = pool(hidden, mask, self.pooling)  # [N, D_lm]
    return self.projection(pooled.astype(self.dtype))  # [N, hidden_dim]


# --- Item inputs and the cache ----------------------------------------------


def item_text(config: ml_collections.ConfigDict, dataset: Dataset) -> np.ndarray:
  """[N+1] strings: each item's fields joined, or worded by lm.template."""
  items = dataset.items
  fields = tuple(config.data.fields)
  for f in fields:
    if f not in items.text:
      raise ConfigError(f"config.data.fields: no item field '{f}' (have "
                        f"{sorted(items.text)})")
  template = config.model.lm.template
  if template:
    named = set(re.findall(r"{(\w+)}", template))
    missing = named - set(items.text)
    if missing:
      raise ConfigError(f"config.model.lm.template names unknown fields "
                        f"{sorted(missing)} (have {sorted(items.text)})")
  out = np.empty(len(items.ids), dtype=object)
  for i in range(len(items.ids)):
    if i == 0:
      out[i] = ""
    elif template:
      out[i] = template.format_map({f: items.text[f][i] for f in items.text})
    else:
      out[i] = ". ".join(t for t in (items.text[f][i] for f in fields) if t)
  return out


def tokenize_text(config: ml_collections.ConfigDict,
                  texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Token ids [N+1, L] and mask with the LM's tokenizer and special tokens.

  Row 0 (the padding item) is all padding. Long texts are truncated keeping
  the closing special token, so BERT still sees [CLS] ... [SEP].
  """
  tokenizer = tokenize_lib.load_tokenizer(lm_path(config),
                                         field="config.model.lm.path")
  tokenizer.no_padding()
  tokenizer.no_truncation()
  max_len = int(config.model.lm.max_len)
  ids = np.zeros((len(texts), max_len), np.int32)
  mask = np.zeros((len(texts), max_len), bool)
  encodings = tokenizer.encode_batch([str(t) for t in texts[1:]],
                                     add_special_tokens=True)
  for row, enc in enumerate(encodings, start=1):
    tokens = enc.ids
    if len(tokens) > max_len:
      specials = enc.special_tokens_mask
      tail = tokens[-1:] if specials and specials[-1] else []
      tokens = tokens[:max_len - len(tail)] + tail
    ids[row, :len(tokens)] = tokens
    mask[row, :len(tokens)] = True
  _check_vocab(config, ids)
  return ids, mask


def _check_vocab(config: ml_collections.ConfigDict, ids: np.ndarray) -> None:
  """Token ids past the model's vocab_size would embed as NaN: refused."""
  path = lm_path(config)
  vocab_size = int(read_lm_config(config).vocab_size)
  top = int(ids.max()) if ids.size else 0
  if top >= vocab_size:
    raise DataFormatError(
        os.path.join(path, hf.TOKENIZER_FILE), None, None,
        f"the tokenizer gives token id {top}, but the model's "
        f"{os.path.join(path, hf.CONFIG_FILE)} has vocab_size {vocab_size}; "
        "the tokenizer does not belong to this model")


def _weights_digest(arrays) -> str:
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(arrays):
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((a.shape, a.dtype)).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def cache_key(config, kind: str, frozen_state, ids: np.ndarray,
              mask: np.ndarray, n: int, lm_config=None) -> str:
  """Hash of everything the cached hidden states depend on.

  `lm_config` is the LM's architecture config (a dataclass read from its
  config.json): activation, norm epsilon, heads and rope settings change the
  hidden states as much as the weights do. A frozen_dtype other than
  float32 is part of the key (float32 keys are those of before the field).
  """
  arch = dataclasses.asdict(lm_config) if lm_config is not None else None
  fields = {"kind": kind, "layer": n, "dtype": config.model.lm.cache_dtype,
            "compute": config.model.dtype, "arch": arch}
  if frozen_dtype(config) != "float32":
    fields["frozen_dtype"] = frozen_dtype(config)
  h = hashlib.sha256()
  h.update(json.dumps(fields, sort_keys=True, default=str).encode())
  h.update(_weights_digest(frozen_state).encode())
  h.update(ids.tobytes())
  h.update(mask.tobytes())
  return h.hexdigest()[:24]


_CACHE_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}


def _load_cache(path: str, dtype: str) -> np.ndarray:
  return np.load(path, mmap_mode="r").view(_CACHE_DTYPES[dtype])


def build_cache(config: ml_collections.ConfigDict, ids: np.ndarray,
                mask: np.ndarray, cache_dir: str) -> np.ndarray:
  """Hidden states entering layer tune_from for every item, memory-mapped.

  Reused when the key (frozen weights, architecture, token ids, layer,
  dtypes) matches a finished cache file; written to a temporary name and
  renamed, so an interrupted build is never mistaken for a finished one.
  """
  lc = config.model.lm
  if lc.cache_dtype not in _CACHE_DTYPES:
    raise ConfigError(f"config.model.lm.cache_dtype: '{lc.cache_dtype}' is "
                      "not float32 or bfloat16")
  lm, kind = load_lm(config, rngs=nnx.Rngs(0))
  n = tune_from(config, len(lm.layers))
  lm.eval()
  if frozen_dtype(config) != "float32":  # as the encoder stores them
    for part in _frozen_parts(lm, n):
      variables.retype(part, variables.Frozen)
    quantize.quantize_frozen(lm, frozen_dtype(config))
  frozen = [nnx.state(part, nnx.Param) for part in _frozen_parts(lm, n)]
  key = cache_key(config, kind, frozen, ids, mask, n, lm.config)
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, f"{kind}_layer{n}_{key}.npy")
  if os.path.exists(path):
    logging.info("LM cache hit: %s", path)
    return _load_cache(path, lc.cache_dtype)
  width = int(lm.config.hidden_size)
  graphdef, state = nnx.split(lm)

  @jax.jit
  def lower(state, ids, mask):
    model = nnx.merge(graphdef, state)
    return model.run_layers(model.embed(ids), mask, 0, n)

  chunk = 256
  logging.info("Building the LM cache (%d items, layers 0..%d) at %s",
               len(ids), n - 1, path)
  # Interrupted, it leaves no partial cache (of GBs, for a large LM).
  with workdir_lib.atomic_output(path) as tmp:
    # .npy has no bfloat16: store its bits as uint16 and view them on load.
    out = np.lib.format.open_memmap(
        tmp, mode="w+", shape=ids.shape + (width,),
        dtype=np.float32 if lc.cache_dtype == "float32" else np.uint16)
    for start in range(0, len(ids), chunk):
      stop = min(start + chunk, len(ids))
      rows = np.arange(start, start + chunk) % len(ids)  # fixed shape
      hidden = lower(state, jnp.asarray(ids[rows]), jnp.asarray(mask[rows]))
      hidden = np.asarray(hidden.astype(_CACHE_DTYPES[lc.cache_dtype]))
      out[start:stop] = hidden[:stop - start].view(out.dtype)
    out.flush()
    del out
  return _load_cache(path, lc.cache_dtype)


def default_cache_dir(config: ml_collections.ConfigDict) -> str:
  return config.model.lm.cache_dir or os.path.join(
      os.path.expanduser(config.data.data_dir), "lm_cache")


def item_inputs(config: ml_collections.ConfigDict, dataset: Dataset):
  """({"tokens": {field: ...}, "masks": {...}}, ItemInputSpec) for the LM.

  The field is TEXT_FIELD (token ids) or, with cached frozen layers,
  HIDDEN_FIELD (the cached hidden states [N+1, L, D_lm]); with
  lm.cache_on=host the cache is the table's "host" part (kept in host
  memory, its rows sent with each batch) instead of a device field.
  """
  check_config(config)
  ids, mask = tokenize_text(config, item_text(config, dataset))
  if uses_cache(config):
    hidden = build_cache(config, ids, mask, default_cache_dir(config))
    field, table = HIDDEN_FIELD, hidden
  else:
    field, table = TEXT_FIELD, ids
  spec = ItemInputSpec(vocab_size=0, fields=(field,), lengths=(ids.shape[1],),
                       num_users=len(dataset.user_vocab))
  inputs = {"tokens": {field: table}, "masks": {field: mask}}
  if field == HIDDEN_FIELD and config.model.lm.get("cache_on") == "host":
    inputs = {"tokens": {}, "masks": {}, "host": inputs}
  return inputs, spec
