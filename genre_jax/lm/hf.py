"""Reading Hugging Face model directories without torch.

A model directory holds `config.json`, the weights as `model.safetensors` (or
shards listed in `model.safetensors.index.json`) and `tokenizer.json`. This
module parses the config into a small frozen dataclass per model family, reads
tensors lazily from the safetensors files and copies them into an NNX model
built with `nnx.eval_shape`, so a checkpoint is never initialised twice.

It reads the safetensors format itself (a JSON header, then raw tensor bytes)
because the `safetensors` package's numpy backend cannot return bfloat16, the
dtype most LLM checkpoints are stored in, so genre_jax does not depend on it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import struct
from typing import Any, Callable, Iterable, Mapping, Sequence

from flax import nnx
import jax
import ml_dtypes
import numpy as np
import tokenizers

from genre_jax.data import tokenize as tokenize_lib
from genre_jax.errors import DataFormatError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

# safetensors dtype names -> numpy dtypes (bf16 and fp8 through ml_dtypes).
_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
# A header larger than this is a corrupt file, not a real checkpoint.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def model_dir(path: str | pathlib.Path = "") -> str:
  """`path`, or the default model's folder (all-MiniLM-L6-v2) when empty."""
  return str(path) if str(path) else tokenize_lib.default_model_dir()


# --- config.json --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a BERT `config.json` that define the encoder."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  hidden_act: str
  hidden_dropout: float
  attention_dropout: float
  pad_token_id: int
  # RoBERTa: position ids count the non-padding token ids from
  # pad_token_id + 1 (HF `create_position_ids_from_input_ids`); BERT: 0, 1, ...
  roberta_positions: bool = False

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def max_length(self) -> int:
    """The longest token sequence the position table covers."""
    if self.roberta_positions:
      return self.max_position_embeddings - self.pad_token_id - 1
    return self.max_position_embeddings


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 ("llama3") or linear rotary-frequency scaling."""

  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The fields of a Llama-architecture `config.json` that define the
  decoder: Llama 1/2/3, Mistral, Qwen2/2.5 and Qwen3 differ only in the
  fields from `model_type` on."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  max_position_embeddings: int
  rms_norm_eps: float
  rope_theta: float
  rope_scaling: RopeScaling | None
  tie_word_embeddings: bool
  attention_bias: bool  # On q/k/v_proj, and on o_proj unless o_proj_bias.
  mlp_bias: bool
  hidden_act: str
  model_type: str = "llama"
  # Bias on o_proj; None: as attention_bias (Qwen2: q/k/v only, so False).
  o_proj_bias: bool | None = None
  # Qwen3: an RMSNorm over head_dim on each query and key head before RoPE.
  qk_norm: bool = False
  # Per layer, the most recent positions a token attends to (itself
  # included; Mistral's and Qwen's `sliding_window`), or None for all of
  # them. Empty: every layer attends to every earlier position.
  sliding_windows: tuple[int | None, ...] = ()

  @property
  def out_bias(self) -> bool:
    """Whether o_proj has a bias."""
    return self.attention_bias if self.o_proj_bias is None else (
        self.o_proj_bias)

  def sliding_window(self, layer: int) -> int | None:
    """The attention window of layer `layer` (None: unbounded)."""
    return self.sliding_windows[layer] if self.sliding_windows else None


# model_type values each config reader accepts (lm/families.py maps them).
BERT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
# BERT-family types with RoBERTa's position ids (see BertConfig).
ROBERTA_MODEL_TYPES = ("roberta", "xlm-roberta")
LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Defaults of transformers' LlamaConfig, MistralConfig, Qwen2Config and
# Qwen3Config where they differ (used for fields config.json leaves out).
_LLAMA_DEFAULTS = {
    "llama": dict(vocab_size=32000, intermediate_size=11008,
                  max_position_embeddings=2048, num_key_value_heads=None),
    "mistral": dict(vocab_size=32000, intermediate_size=14336,
                    max_position_embeddings=4096 * 32, num_key_value_heads=8),
    "qwen2": dict(vocab_size=151936, intermediate_size=22016,
                  max_position_embeddings=32768, num_key_value_heads=32),
    "qwen3": dict(vocab_size=151936, intermediate_size=22016,
                  max_position_embeddings=32768, num_key_value_heads=32,
                  head_dim=128),
}
# `hidden_act` names of Hugging Face configs -> the JAX function each means.
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def read_config_json(model_dir: str | pathlib.Path) -> dict[str, Any]:
  """The parsed `config.json` of a model directory."""
  path = pathlib.Path(model_dir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no {CONFIG_FILE} in model directory")
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataFormatError(path, e.lineno, None, f"invalid JSON: {e.msg}") from e
  if not isinstance(config, dict):
    raise DataFormatError(path, None, None, "expected a JSON object")
  return config


class _Fields:
  """Typed access to config.json fields; errors name the file and field."""

  def __init__(self, path: pathlib.Path, config: Mapping[str, Any]):
    self.path = path
    self.config = config

  def _get(self, name: str, default: Any, kinds: tuple[type, ...],
           what: str) -> Any:
    value = self.config.get(name)
    if value is None:  # Absent or JSON null: the transformers default.
      value = default
    # JSON true/false are Python bools, which are also ints: keep them apart.
    if not isinstance(value, kinds) or (
        isinstance(value, bool) and bool not in kinds):
      raise DataFormatError(self.path, None, name,
                            f"expected {what}, got {value!r}")
    return value

  def int(self, name: str, default: int | None = None, minimum: int = 1) -> int:
    value = self._get(name, default, (int,), "an integer")
    if value < minimum:
      raise DataFormatError(self.path, None, name,
                            f"expected an integer >= {minimum}, got {value}")
    return value

  def float(self, name: str, default: float | None = None) -> float:
    value = self._get(name, default, (int, float), "a number")
    if not math.isfinite(value) or value < 0:
      raise DataFormatError(self.path, None, name,
                            f"expected a finite number >= 0, got {value}")
    return float(value)

  def bool(self, name: str, default: bool | None = None) -> bool:
    return self._get(name, default, (bool,), "true or false")

  def activation(self, name: str, default: str) -> str:
    value = self._get(name, default, (str,), "an activation name")
    if value not in ACTIVATIONS:
      raise DataFormatError(self.path, None, name,
                            f"unsupported activation {value!r}; supported: "
                            f"{tuple(ACTIVATIONS)}")
    return value

  def check_type(self, allowed: Sequence[str]) -> None:
    model_type = self.config.get("model_type")
    if model_type not in allowed:
      raise DataFormatError(self.path, None, "model_type",
                            f"expected one of {tuple(allowed)}, got "
                            f"{model_type!r}")


def read_bert_config(model_dir: str | pathlib.Path) -> BertConfig:
  """Parses a BERT or RoBERTa `config.json` (defaults as in transformers'
  BertConfig, RobertaConfig and XLMRobertaConfig)."""
  fields = _Fields(pathlib.Path(model_dir) / CONFIG_FILE,
                   read_config_json(model_dir))
  fields.check_type(BERT_MODEL_TYPES)
  model_type = fields.config.get("model_type")
  roberta = model_type in ROBERTA_MODEL_TYPES
  if fields.bool("is_decoder", False):
    raise DataFormatError(fields.path, None, "is_decoder",
                          "a causal (decoder) BERT is not supported; only "
                          "bidirectional encoders are")
  position_type = fields.config.get("position_embedding_type", "absolute")
  if position_type not in ("absolute", None):
    raise DataFormatError(fields.path, None, "position_embedding_type",
                          "only 'absolute' is supported, got "
                          f"{position_type!r}")
  cfg = BertConfig(
      vocab_size=fields.int("vocab_size",
                            50265 if model_type == "roberta" else 30522),
      hidden_size=fields.int("hidden_size", 768),
      num_layers=fields.int("num_hidden_layers", 12),
      num_heads=fields.int("num_attention_heads", 12),
      intermediate_size=fields.int("intermediate_size", 3072),
      max_position_embeddings=fields.int("max_position_embeddings", 512),
      type_vocab_size=fields.int("type_vocab_size", 2),
      layer_norm_eps=fields.float("layer_norm_eps", 1e-12),
      hidden_act=fields.activation("hidden_act", "gelu"),
      hidden_dropout=fields.float("hidden_dropout_prob", 0.1),
      attention_dropout=fields.float("attention_probs_dropout_prob", 0.1),
      pad_token_id=fields.int("pad_token_id", 1 if roberta else 0,
                              minimum=0),
      roberta_positions=roberta,
  )
  if roberta and cfg.max_length < 1:
    raise DataFormatError(fields.path, None, "max_position_embeddings",
                          f"{cfg.max_position_embeddings} leaves no position "
                          f"after the padding id {cfg.pad_token_id}")
  if cfg.hidden_size % cfg.num_heads:
    raise DataFormatError(fields.path, None, "num_attention_heads",
                          f"{cfg.num_heads} does not divide hidden_size "
                          f"{cfg.hidden_size}")
  return cfg


def _rope_settings(fields: _Fields) -> tuple[float, RopeScaling | None]:
  """rope_theta and scaling from old (`rope_theta` + `rope_scaling`) or new
  (transformers 5 `rope_parameters`) config layouts."""
  field = "rope_parameters" if "rope_parameters" in fields.config else (
      "rope_scaling")
  params = fields.config.get(field) or {}
  if not isinstance(params, dict):
    raise DataFormatError(fields.path, None, field,
                          f"expected a JSON object, got {params!r}")
  theta = params.get("rope_theta", fields.config.get("rope_theta", 10000.0))
  if isinstance(theta, bool) or not isinstance(theta, (int, float)) or (
      theta <= 0):
    raise DataFormatError(fields.path, None, "rope_theta",
                          f"expected a positive number, got {theta!r}")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    return float(theta), None
  scale_fields = _Fields(fields.path, params)
  if rope_type == "linear":
    return float(theta), RopeScaling("linear", scale_fields.float("factor"))
  if rope_type == "llama3":
    original = scale_fields.int(
        "original_max_position_embeddings",
        fields.int("max_position_embeddings", 2048))
    scaling = RopeScaling(
        "llama3",
        factor=scale_fields.float("factor"),
        low_freq_factor=scale_fields.float("low_freq_factor"),
        high_freq_factor=scale_fields.float("high_freq_factor"),
        original_max_position_embeddings=original)
    if scaling.high_freq_factor <= scaling.low_freq_factor:
      raise DataFormatError(fields.path, None, f"{field}.high_freq_factor",
                            "must exceed low_freq_factor")
    return float(theta), scaling
  raise DataFormatError(
      fields.path, None, f"{field}.rope_type",
      f"unsupported RoPE scaling {rope_type!r}; supported: default, linear, "
      "llama3")


def _sliding_windows(fields: _Fields, model_type: str,
                     num_layers: int) -> tuple[int | None, ...]:
  """Each layer's attention window, as transformers builds its masks: every
  layer of a Mistral with a `sliding_window`; for Qwen2/3 only with
  `use_sliding_window`, on the layers `layer_types` marks
  "sliding_attention" (by default those from `max_window_layers` on)."""
  if model_type == "llama":
    return ()
  if model_type != "mistral" and not fields.bool("use_sliding_window", False):
    return ()
  if "sliding_window" in fields.config and (
      fields.config["sliding_window"] is None):
    return ()
  window = fields.int("sliding_window", 4096)
  if model_type == "mistral":
    return (window,) * num_layers
  layer_types = fields.config.get("layer_types")
  if layer_types is None:
    first = fields.int("max_window_layers", 28, minimum=0)
    return tuple(window if i >= first else None for i in range(num_layers))
  kinds = ("full_attention", "sliding_attention")
  if not isinstance(layer_types, list) or len(layer_types) != num_layers or (
      any(t not in kinds for t in layer_types)):
    raise DataFormatError(fields.path, None, "layer_types",
                          f"expected a list of {num_layers} entries, each one "
                          f"of {kinds}, got {layer_types!r}")
  return tuple(window if t == "sliding_attention" else None
               for t in layer_types)


def read_llama_config(model_dir: str | pathlib.Path) -> LlamaConfig:
  """Parses a Llama, Mistral, Qwen2 or Qwen3 `config.json` (defaults as in
  transformers' LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)."""
  fields = _Fields(pathlib.Path(model_dir) / CONFIG_FILE,
                   read_config_json(model_dir))
  fields.check_type(LLAMA_MODEL_TYPES)
  model_type = fields.config["model_type"]
  defaults = _LLAMA_DEFAULTS[model_type]
  hidden = fields.int("hidden_size", 4096)
  heads = fields.int("num_attention_heads", 32)
  kv_heads = fields.int("num_key_value_heads",
                        defaults["num_key_value_heads"] or heads)
  if "num_key_value_heads" in fields.config and (
      fields.config["num_key_value_heads"] is None):
    kv_heads = heads  # An explicit null means one key/value head per query.
  if heads % kv_heads:
    raise DataFormatError(fields.path, None, "num_key_value_heads",
                          f"{kv_heads} does not divide num_attention_heads "
                          f"{heads}")
  head_dim = fields.int("head_dim", defaults.get("head_dim", hidden // heads))
  if head_dim % 2:
    raise DataFormatError(fields.path, None, "head_dim",
                          f"rotary embeddings need an even head_dim, got "
                          f"{head_dim}")
  theta, scaling = _rope_settings(fields)
  num_layers = fields.int("num_hidden_layers", 32)
  # Which projections have a bias: a Llama says so in its config; Mistral
  # has none, Qwen2 always q/k/v (not o_proj), Qwen3 as attention_bias.
  if model_type in ("mistral", "qwen2"):
    attention_bias = model_type == "qwen2"
  else:
    attention_bias = fields.bool("attention_bias", False)
  return LlamaConfig(
      vocab_size=fields.int("vocab_size", defaults["vocab_size"]),
      hidden_size=hidden,
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      intermediate_size=fields.int("intermediate_size",
                                   defaults["intermediate_size"]),
      max_position_embeddings=fields.int("max_position_embeddings",
                                         defaults["max_position_embeddings"]),
      rms_norm_eps=fields.float("rms_norm_eps", 1e-6),
      rope_theta=theta,
      rope_scaling=scaling,
      tie_word_embeddings=fields.bool("tie_word_embeddings", False),
      attention_bias=attention_bias,
      mlp_bias=(fields.bool("mlp_bias", False) if model_type == "llama"
                else False),
      hidden_act=fields.activation("hidden_act", "silu"),
      model_type=model_type,
      o_proj_bias=False if model_type == "qwen2" else None,
      qk_norm=model_type == "qwen3",
      sliding_windows=_sliding_windows(fields, model_type, num_layers),
  )


# --- safetensors --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # Absolute byte offset in the file.
  stop: int


def _read_header(path: pathlib.Path) -> dict[str, _TensorInfo]:
  """Tensor name -> location, from a safetensors file's JSON header."""
  size = path.stat().st_size
  with path.open("rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise DataFormatError(path, None, None, "truncated safetensors file")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(size - 8, _MAX_HEADER_BYTES):
      raise DataFormatError(path, None, None,
                            f"header length {header_len} exceeds the file")
    raw = f.read(header_len)
  try:
    header = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataFormatError(path, None, None, f"invalid header: {e}") from e
  if not isinstance(header, dict):
    raise DataFormatError(path, None, None,
                          "invalid header: not a JSON object")
  data_start = 8 + header_len
  tensors = {}
  for key, entry in header.items():
    if key == "__metadata__":
      continue
    try:
      dtype = _DTYPES[entry["dtype"]]
      shape = tuple(int(d) for d in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise DataFormatError(
          path, None, None, f"tensor '{key}': bad header entry {entry!r}"
      ) from e
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes or begin < 0 or data_start + end > size:
      raise DataFormatError(
          path, None, None,
          f"tensor '{key}': data_offsets {[begin, end]} do not hold a "
          f"{entry['dtype']} tensor of shape {list(shape)}")
    tensors[key] = _TensorInfo(dtype, shape, data_start + begin,
                               data_start + end)
  return tensors


def _inside(root: str, name: str) -> bool:
  """Whether the relative file name `name` stays under the folder `root` by
  its spelling (`..` that comes back is fine, `/x` or `../x` is not; a name
  with a NUL byte names no file). Symlinks the folder itself holds are
  followed: the Hugging Face cache links each shard into a blobs/ folder."""
  if "\x00" in name or os.path.isabs(name):
    return False
  target = os.path.normpath(os.path.join(root, name))
  return os.path.commonpath([root, target]) == root


class Checkpoint:
  """Lazy, read-only access to the tensors of a model directory's weights.

  Reads `model.safetensors`, or every shard named by
  `model.safetensors.index.json`. Tensors are memory-mapped and copied out one
  at a time, so loading needs about one model's worth of memory.
  """

  def __init__(self, model_dir: str | pathlib.Path):
    model_dir = pathlib.Path(model_dir)
    single = model_dir / WEIGHTS_FILE
    index = model_dir / WEIGHTS_INDEX_FILE
    self._files: dict[str, pathlib.Path] = {}  # key -> file.
    self._infos: dict[str, _TensorInfo] = {}
    if single.is_file():
      self.path = single
      shards = {single: None}
    elif index.is_file():
      self.path = index
      shards = self._read_index(index)
    else:
      raise FileNotFoundError(
          f"{model_dir}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} (only "
          "safetensors checkpoints are supported)")
    for shard, expected in shards.items():
      infos = _read_header(shard)
      for key in expected or ():
        if key not in infos:
          raise DataFormatError(shard, None, None,
                                f"missing '{key}' (listed in {index.name})")
      for key, info in infos.items():
        self._files[key] = shard
        self._infos[key] = info
    self._maps: dict[pathlib.Path, np.memmap] = {}

  @staticmethod
  def _read_index(index: pathlib.Path) -> dict[pathlib.Path, list[str]]:
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except json.JSONDecodeError as e:
      raise DataFormatError(index, e.lineno, None,
                            f"invalid JSON: {e.msg}") from e
    except (KeyError, TypeError) as e:
      raise DataFormatError(index, None, "weight_map", "missing") from e
    if not isinstance(weight_map, dict):
      raise DataFormatError(index, None, "weight_map",
                            "expected an object of tensor name -> file")
    shards: dict[pathlib.Path, list[str]] = {}
    root = os.path.normpath(os.path.abspath(index.parent))
    for key, name in weight_map.items():
      shard = index.parent / str(name)
      if not _inside(root, str(name)):
        raise DataFormatError(index, None, "weight_map",
                              f"'{key}' names shard {name!r}; a shard must "
                              "be a file inside the model directory")
      if not shard.is_file():
        raise DataFormatError(index, None, "weight_map",
                              f"'{key}' names shard {name!r}, which does not "
                              "exist")
      shards.setdefault(shard, []).append(key)
    return shards

  def __contains__(self, key: str) -> bool:
    return key in self._infos

  def keys(self) -> list[str]:
    return sorted(self._infos)

  def file_of(self, key: str) -> pathlib.Path:
    """The file holding `key` (the index file for an unknown key)."""
    return self._files.get(key, self.path)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._info(key).shape

  def dtype(self, key: str) -> np.dtype:
    return self._info(key).dtype

  def get(self, key: str) -> np.ndarray:
    """A copy of tensor `key` in its stored dtype (bf16 as ml_dtypes)."""
    info = self._info(key)
    path = self._files[key]
    if path not in self._maps:
      self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
    raw = self._maps[path][info.start:info.stop]
    return np.array(raw.view(info.dtype).reshape(info.shape))

  def _info(self, key: str) -> _TensorInfo:
    if key not in self._infos:
      raise DataFormatError(self.path, None, None, f"missing '{key}'")
    return self._infos[key]


# --- Filling an NNX model -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one model parameter comes from in a checkpoint.

  Attributes:
    keys: checkpoint names to try, in order (e.g. `LayerNorm.weight` and the
      older `LayerNorm.gamma`); errors name the first.
    transpose: True for torch Linear weights ([out, in]) going to an NNX
      kernel ([in, out]).
  """

  keys: tuple[str, ...]
  transpose: bool = False


def find_prefix(checkpoint: Checkpoint, anchor: str,
                prefixes: Sequence[str]) -> str:
  """The first prefix p with `p + anchor` in the checkpoint.

  Hugging Face saves the same backbone with or without a head-model prefix
  (`bert.`, `model.`); the anchor is a tensor every layout has.
  """
  for prefix in prefixes:
    if prefix + anchor in checkpoint:
      return prefix
  tried = ", ".join(f"'{p}{anchor}'" for p in prefixes)
  raise DataFormatError(checkpoint.path, None, None,
                        f"missing '{anchor}' (tried {tried})")


def _path_str(path: Iterable[Any]) -> str:
  return ".".join(str(p) for p in path)


def _fill(model: nnx.Module, checkpoint: Checkpoint,
          sources: Mapping[tuple[Any, ...], Source]) -> None:
  """Sets every nnx.Param of `model` from the checkpoint, checking shapes."""
  for path, variable in nnx.iter_graph(model):
    if not isinstance(variable, nnx.Param):
      continue
    path = tuple(path)
    if path not in sources:
      raise ValueError(f"parameter '{_path_str(path)}' has no checkpoint "
                       "source")
    source = sources[path]
    key = next((k for k in source.keys if k in checkpoint), source.keys[0])
    if key not in checkpoint:
      raise DataFormatError(checkpoint.file_of(key), None, None,
                            f"missing '{key}'")
    stored = checkpoint.shape(key)
    expected = tuple(variable.shape)
    if source.transpose:
      expected = expected[::-1]
    if stored != expected:
      raise DataFormatError(
          checkpoint.file_of(key), None, None,
          f"tensor '{key}' has shape {list(stored)}, expected "
          f"{list(expected)} (for parameter '{_path_str(path)}')")
    floating = lambda d: jax.numpy.issubdtype(d, jax.numpy.floating)
    if floating(variable.dtype) and not floating(checkpoint.dtype(key)):
      raise DataFormatError(
          checkpoint.file_of(key), None, None,
          f"tensor '{key}' is {checkpoint.dtype(key)}, expected a float "
          f"tensor (for parameter '{_path_str(path)}')")
    array = checkpoint.get(key)
    if source.transpose:
      array = array.T
    variable.set_value(jax.numpy.asarray(array, dtype=variable.dtype))


def check_layer_count(checkpoint: Checkpoint, layer_prefix: str,
                      num_layers: int, config_path: str | pathlib.Path
                      ) -> None:
  """Raises DataFormatError when the checkpoint holds more layers than the
  config.json says: loading the first few would silently drop the rest."""
  for key in checkpoint.keys():
    if not key.startswith(layer_prefix):
      continue
    index = key[len(layer_prefix):].split(".", 1)[0]
    if index.isdigit() and int(index) >= num_layers:
      raise DataFormatError(
          checkpoint.file_of(key), None, None,
          f"tensor '{key}' is of layer {index}, but {config_path} has "
          f"num_hidden_layers={num_layers}")


def build_from_checkpoint(
    make_model: Callable[[nnx.Rngs], nnx.Module], checkpoint: Checkpoint,
    sources: Mapping[tuple[Any, ...], Source], *, rngs: nnx.Rngs,
) -> nnx.Module:
  """Builds `make_model(rngs)` with its parameters read from `checkpoint`.

  The model is first built abstractly (`nnx.eval_shape`), so no random
  initialisation runs; its dropout streams are then seeded from `rngs`.
  `sources` maps each parameter's graph path to its checkpoint tensor.
  """
  model = nnx.eval_shape(lambda: make_model(nnx.Rngs(0)))
  _fill(model, checkpoint, sources)
  nnx.reseed(model, default=rngs.dropout())
  for path, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.Variable) and isinstance(
        variable.get_value(), jax.ShapeDtypeStruct):
      raise ValueError(f"'{_path_str(path)}' was not set from the checkpoint")
  return model


# --- tokenizer.json -----------------------------------------------------------


def tokenize(tokenizer: tokenizers.Tokenizer, texts: Sequence[str], *,
             max_len: int = 128, pad_id: int = 0,
             pad_left: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes `texts` (special tokens added) into a padded batch.

  Sequences are truncated to `max_len` tokens by the tokenizer's own rule (so
  BERT keeps its final [SEP]) and padded to the longest, on the right by
  default, on the left for batched generation.

  Returns:
    ids: [B, L] int32 token ids, `pad_id` on padding.
    mask: [B, L] bool, True on real tokens.
  """
  if not texts:
    raise ValueError("tokenize needs at least one text")
  tokenizer.no_padding()  # padded below, to the longest text
  tokenizer.enable_truncation(max_length=max_len)
  encodings = tokenizer.encode_batch(list(texts))
  length = max(len(e.ids) for e in encodings)
  ids = np.full((len(texts), length), pad_id, np.int32)
  mask = np.zeros((len(texts), length), bool)
  for row, encoding in enumerate(encodings):
    n = len(encoding.ids)
    cols = slice(length - n, length) if pad_left else slice(0, n)
    ids[row, cols] = encoding.ids
    mask[row, cols] = True
  return ids, mask
