"""OPT in Flax NNX: its config.json reader, a decoder that computes exactly what
HF `OPTForCausalLM` does, KV-cache decoding and checkpoint loading.

OPT (Zhang et al. 2022) differs from Llama in what genre_jax must mirror:
learned absolute position embeddings, looked up at `position + 2` (HF
`OPTLearnedPositionalEmbedding`; positions count the real tokens from 0, so a
left-padded prompt gets the positions it would have unpadded); LayerNorm with
biases, before each block (`do_layer_norm_before`, every size but 350m) or
after it (350m); ReLU MLP `fc1` -> `fc2` and biased `q/k/v/out_proj`; a final
LayerNorm (pre-LN sizes only); `project_in`/`project_out` around the layers
when `word_embed_proj_dim` != `hidden_size` (350m); an LM head tied to the
token embeddings.

The encoder interface is that of the other families (lm/families.py):
`embed` then `run_layers(start, stop)` (causal) then `final_norm`, whose
output is `hidden_size` wide (`project_out` belongs to the LM head's side:
`__call__` applies it, as HF `OPTModel` does). `init_cache` and `step` decode
with a fixed-size KV cache exactly as `llama.LlamaDecoder` does, so GENRE's
local provider drives either. Dropout (after attention and after the MLP, on
the attention probabilities) is off until `model.train()`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from genre_jax.errors import DataFormatError
from genre_jax.lm import hf
from genre_jax.lm.attention import same_segment
from genre_jax.lm.llama import KVCache, write_to_cache

MODEL_TYPES = ("opt",)
POSITION_OFFSET = 2  # HF OPTLearnedPositionalEmbedding.offset
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default; OPT configs have none.
# Where the backbone's tensors sit: OPTForCausalLM, OPTModel, OPTDecoder.
PREFIXES = ("model.decoder.", "decoder.", "")
EMBEDDINGS_KEY = "embed_tokens.weight"


@dataclasses.dataclass(frozen=True)
class OptConfig:
  """The fields of an OPT `config.json` that define the decoder."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  ffn_dim: int
  max_position_embeddings: int
  word_embed_proj_dim: int
  do_layer_norm_before: bool
  final_layer_norm: bool  # pre-LN and not `_remove_final_layer_norm`
  activation: str
  dropout: float
  attention_dropout: float
  enable_bias: bool
  layer_norm_elementwise_affine: bool
  tie_word_embeddings: bool
  pad_token_id: int

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def max_length(self) -> int:
    """The longest token sequence the position table covers."""
    return self.max_position_embeddings


def read_opt_config(model_dir: str | pathlib.Path) -> OptConfig:
  """Parses an OPT `config.json` (defaults as in transformers.OPTConfig)."""
  # pylint: disable-next=protected-access
  fields = hf._Fields(pathlib.Path(model_dir) / hf.CONFIG_FILE,
                      hf.read_config_json(model_dir))
  fields.check_type(MODEL_TYPES)
  hidden = fields.int("hidden_size", 768)
  heads = fields.int("num_attention_heads", 12)
  if hidden % heads:
    raise DataFormatError(fields.path, None, "num_attention_heads",
                          f"{heads} does not divide hidden_size {hidden}")
  pre_norm = fields.bool("do_layer_norm_before", True)
  return OptConfig(
      vocab_size=fields.int("vocab_size", 50272),
      hidden_size=hidden,
      num_layers=fields.int("num_hidden_layers", 12),
      num_heads=heads,
      ffn_dim=fields.int("ffn_dim", 3072),
      max_position_embeddings=fields.int("max_position_embeddings", 2048),
      word_embed_proj_dim=fields.int("word_embed_proj_dim", hidden),
      do_layer_norm_before=pre_norm,
      final_layer_norm=pre_norm and not fields.bool(
          "_remove_final_layer_norm", False),
      activation=fields.activation("activation_function", "relu"),
      dropout=fields.float("dropout", 0.1),
      attention_dropout=fields.float("attention_dropout", 0.0),
      enable_bias=fields.bool("enable_bias", True),
      layer_norm_elementwise_affine=fields.bool(
          "layer_norm_elementwise_affine", True),
      tie_word_embeddings=fields.bool("tie_word_embeddings", True),
      pad_token_id=fields.int("pad_token_id", 1, minimum=0),
  )


def _layer_norm(cfg: OptConfig, dtype, param_dtype, rngs) -> nnx.LayerNorm:
  affine = cfg.layer_norm_elementwise_affine
  return nnx.LayerNorm(cfg.hidden_size, epsilon=LAYER_NORM_EPS,
                       use_bias=affine, use_scale=affine,
                       use_fast_variance=False, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position ids [B, L] of real tokens, 0, 1, ... (HF OPT's
  `cumsum(mask) * mask - 1`; padding gets -1, the padding row of the table)."""
  mask = jnp.asarray(mask).astype(jnp.int32)
  return jnp.cumsum(mask, axis=-1) * mask - 1


class OptAttention(nnx.Module):
  """Multi-head self-attention with biased projections."""

  def __init__(self, cfg: OptConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    linear = functools.partial(
        nnx.Linear, cfg.hidden_size, cfg.hidden_size,
        use_bias=cfg.enable_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.q_proj = linear()
    self.k_proj = linear()
    self.v_proj = linear()
    self.out_proj = linear()
    self.attention_dropout = nnx.Dropout(cfg.attention_dropout,
                                         deterministic=True, rngs=rngs)

  def __call__(
      self, x: jax.Array, mask: jax.Array,
      cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attends x [B, T, D] to itself, or to the cache with x written in.

    Args:
      x: [B, T, D] inputs.
      mask: [B, 1, T, S] bool, True where query t may attend to key s.
      cache: (keys [B, S, N, H], values [B, S, N, H], index []) to write the
        new keys/values into at slots index..index+T-1, or None (S = T).

    Returns:
      The output [B, T, D] and the updated (keys, values), or None.
    """
    batch, length, _ = x.shape
    heads = (batch, length, self.num_heads, self.head_dim)
    # HF scales the query before the product (not the logits after it).
    q = (self.q_proj(x) * jnp.asarray(self.head_dim ** -0.5, x.dtype)
         ).reshape(heads)
    k = self.k_proj(x).reshape(heads)
    v = self.v_proj(x).reshape(heads)
    k, v, updated = write_to_cache(k, v, cache)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if self.attention_dropout.deterministic or not self.attention_dropout.rate:
      y = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0)
    else:  # Dropout on the attention probabilities needs them explicitly.
      logits = jnp.einsum("bqnh,bknh->bnqk", q, k)
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
      probs = self.attention_dropout(jax.nn.softmax(logits, axis=-1))
      y = jnp.einsum("bnqk,bknh->bqnh", probs, v)
    return self.out_proj(y.reshape(batch, length, -1)), updated


class OptLayer(nnx.Module):
  """Attention and MLP blocks with residuals, LayerNorm before each block or
  after it, as HF `OPTDecoderLayer`."""

  def __init__(self, cfg: OptConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.pre_norm = cfg.do_layer_norm_before
    self.activation = cfg.activation
    self.self_attn = OptAttention(cfg, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
    self.self_attn_layer_norm = _layer_norm(cfg, dtype, param_dtype, rngs)
    linear = functools.partial(
        nnx.Linear, use_bias=cfg.enable_bias, dtype=dtype,
        param_dtype=param_dtype, kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs)
    self.fc1 = linear(cfg.hidden_size, cfg.ffn_dim)
    self.fc2 = linear(cfg.ffn_dim, cfg.hidden_size)
    self.final_layer_norm = _layer_norm(cfg, dtype, param_dtype, rngs)
    self.attention_output_dropout = nnx.Dropout(cfg.dropout,
                                                deterministic=True, rngs=rngs)
    self.output_dropout = nnx.Dropout(cfg.dropout, deterministic=True,
                                      rngs=rngs)

  def __call__(self, x, mask, cache=None):
    h = self.self_attn_layer_norm(x) if self.pre_norm else x
    h, updated = self.self_attn(h, mask, cache)
    x = x + self.attention_output_dropout(h)
    if not self.pre_norm:
      x = self.self_attn_layer_norm(x)
    h = self.final_layer_norm(x) if self.pre_norm else x
    h = self.fc2(hf.ACTIVATIONS[self.activation](self.fc1(h)))  # [B, T, D]
    x = x + self.output_dropout(h)
    if not self.pre_norm:
      x = self.final_layer_norm(x)
    return x, updated


class OptDecoder(nnx.Module):
  """HF `OPTForCausalLM`: token ids -> hidden states -> logits."""

  def __init__(self, cfg: OptConfig, *, dtype=jnp.float32, param_dtype=None,
               rngs: nnx.Rngs):
    param_dtype = dtype if param_dtype is None else param_dtype
    self.config = cfg
    self.dtype = dtype
    embed = functools.partial(nnx.Embed, dtype=dtype, param_dtype=param_dtype,
                              embedding_init=nnx.initializers.normal(0.02),
                              rngs=rngs)
    linear = functools.partial(
        nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
    width, proj = cfg.hidden_size, cfg.word_embed_proj_dim
    self.embed_tokens = embed(cfg.vocab_size, proj)
    self.embed_positions = embed(
        cfg.max_position_embeddings + POSITION_OFFSET, width)
    self.project_in = linear(proj, width) if proj != width else None
    self.project_out = linear(width, proj) if proj != width else None
    self.layers = nnx.List([
        OptLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(cfg.num_layers)])
    self.final_layer_norm = (_layer_norm(cfg, dtype, param_dtype, rngs)
                             if cfg.final_layer_norm else None)
    self.lm_head = None if cfg.tie_word_embeddings else linear(
        proj, cfg.vocab_size)

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  def embedding_modules(self) -> list[nnx.Module]:
    """What runs below layer 0 (frozen with the lower layers)."""
    return [m for m in (self.embed_tokens, self.embed_positions,
                        self.project_in) if m is not None]

  def final_norm(self, hidden: jax.Array) -> jax.Array:
    """The final LayerNorm of pre-LN OPTs (350m has none), [B, L, D]."""
    if self.final_layer_norm is None:
      return hidden
    return self.final_layer_norm(hidden)

  def embed(self, input_ids: jax.Array, mask: jax.Array | None = None,
            positions: jax.Array | None = None) -> jax.Array:
    """Token ids [B, L] -> token + position embeddings [B, L, D].

    Positions [B, L] default to the real tokens' count from 0 by `mask`
    [B, L] (`positions_from_mask`, as HF), or to 0, 1, ... without one,
    which gives every real token of a right-padded batch its HF position.
    """
    length = input_ids.shape[1]
    if positions is None:
      if length > self.config.max_position_embeddings:
        raise ValueError(f"sequence length {length} exceeds OPT's "
                         "max_position_embeddings "
                         f"{self.config.max_position_embeddings}")
      positions = (positions_from_mask(mask) if mask is not None
                   else jnp.arange(length)[None])
    hidden = self.embed_tokens(input_ids)  # [B, L, P]
    if self.project_in is not None:
      hidden = self.project_in(hidden)  # [B, L, D]
    return hidden + self.embed_positions(positions + POSITION_OFFSET)

  def run_layers(self, hidden: jax.Array, mask: jax.Array, start: int,
                 stop: int, segments: jax.Array | None = None) -> jax.Array:
    """Runs layers start..stop-1 (causally) on hidden [B, L, D]; mask [B, L]
    marks real tokens. The output is not final-normed. `start` and `stop`
    are Python ints (static under jit). segments [B, L] (packed rows,
    lm/packing.py) keep attention inside each sequence; positions were
    added by `embed`, before packing."""
    if not 0 <= start <= stop <= self.num_layers:
      raise ValueError(f"need 0 <= start <= stop <= {self.num_layers}, got "
                       f"start={start}, stop={stop}")
    mask = jnp.asarray(mask).astype(bool)
    length = hidden.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))  # [L, L]
    attend = causal[None, None] & mask[:, None, None, :]  # [B, 1, L, L]
    if segments is not None:
      attend = attend & same_segment(segments)
    for layer in self.layers[start:stop]:
      hidden, _ = layer(hidden, attend)
    return hidden

  def __call__(self, input_ids: jax.Array, mask: jax.Array,
               positions: jax.Array | None = None) -> jax.Array:
    """HF `OPTModel`'s last hidden state [B, L, word_embed_proj_dim]: final
    LayerNorm, then `project_out` where there is one."""
    hidden = self.run_layers(self.embed(input_ids, mask, positions), mask, 0,
                             self.num_layers)
    return self._project_out(self.final_norm(hidden))

  def _project_out(self, hidden: jax.Array) -> jax.Array:
    return hidden if self.project_out is None else self.project_out(hidden)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """`__call__`'s hidden [B, L, P] -> next-token logits [B, L, V]."""
    if self.lm_head is None:
      return self.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (at most
    max_position_embeddings: the positions of later tokens have no row)."""
    cfg = self.config
    if max_len > cfg.max_position_embeddings:
      raise ValueError(f"a cache of {max_len} tokens exceeds OPT's "
                       f"max_position_embeddings {cfg.max_position_embeddings}")
    return KVCache.empty(batch, max_len, cfg.num_layers, cfg.num_heads,
                         cfg.head_dim, self.dtype if dtype is None else dtype)

  def step(self, input_ids: jax.Array, cache: KVCache, positions: jax.Array,
           mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Runs T new tokens per row against the cache and appends them to it.

    As `llama.LlamaDecoder.step`: prefill passes the whole (padded) prompt,
    generation one token at a time; the tokens go to cache slots
    index..index+T-1 of every row and attend to the real tokens in earlier
    slots and to themselves.

    Args:
      input_ids: [B, T] token ids.
      cache: from `init_cache` or a previous step; needs index + T <= max_len
        (checked when the index is concrete).
      positions: [B, T] position ids, 0 at each row's first real token (e.g.
        `llama.positions_from_mask(prompt_mask)`), then one more than each
        row's last position.
      mask: [B, T] bool, True on real tokens (default: all real).

    Returns:
      Logits [B, T, V] and the updated cache.
    """
    cache_mask, query_slots = cache.slots_for(input_ids, mask)  # [B, S], [T]
    slots = jnp.arange(cache.max_len)  # [S]
    causal = slots[None, :] <= query_slots[:, None]  # [T, S]
    attend = causal[None, None] & cache_mask[:, None, None, :]  # [B, 1, T, S]
    hidden = self.embed(input_ids, positions=positions)  # [B, T, D]
    keys, values = [], []
    for i, layer in enumerate(self.layers):
      hidden, (k, v) = layer(hidden, attend,
                             (cache.keys[i], cache.values[i], cache.index))
      keys.append(k)
      values.append(v)
    new_cache = cache.advanced(keys, values, cache_mask, input_ids.shape[1])
    return self.logits(self._project_out(self.final_norm(hidden))), new_cache


def _hf_sources(cfg: OptConfig, prefix: str) -> dict[tuple[Any, ...],
                                                     hf.Source]:
  """Our parameter paths -> HF OPTForCausalLM tensor names (`prefix` is the
  decoder's, e.g. `model.decoder.`)."""
  sources = {
      ("embed_tokens", "embedding"): hf.Source(
          (f"{prefix}embed_tokens.weight",)),
      ("embed_positions", "embedding"): hf.Source(
          (f"{prefix}embed_positions.weight",)),
  }
  for name in ("project_in", "project_out"):
    sources[(name, "kernel")] = hf.Source((f"{prefix}{name}.weight",),
                                          transpose=True)
  if not cfg.tie_word_embeddings:
    sources[("lm_head", "kernel")] = hf.Source(("lm_head.weight",),
                                               transpose=True)

  def norm(ours: tuple[Any, ...], theirs: str):
    sources[(*ours, "scale")] = hf.Source((f"{theirs}.weight",))
    sources[(*ours, "bias")] = hf.Source((f"{theirs}.bias",))

  norm(("final_layer_norm",), f"{prefix}final_layer_norm")
  for i in range(cfg.num_layers):
    layer = f"{prefix}layers.{i}."
    for ours, theirs in (
        (("self_attn", "q_proj"), "self_attn.q_proj"),
        (("self_attn", "k_proj"), "self_attn.k_proj"),
        (("self_attn", "v_proj"), "self_attn.v_proj"),
        (("self_attn", "out_proj"), "self_attn.out_proj"),
        (("fc1",), "fc1"), (("fc2",), "fc2")):
      sources[("layers", i, *ours, "kernel")] = hf.Source(
          (f"{layer}{theirs}.weight",), transpose=True)
      sources[("layers", i, *ours, "bias")] = hf.Source(
          (f"{layer}{theirs}.bias",))
    norm(("layers", i, "self_attn_layer_norm"),
         f"{layer}self_attn_layer_norm")
    norm(("layers", i, "final_layer_norm"), f"{layer}final_layer_norm")
  return sources


def load_opt(path: str | pathlib.Path, *, dtype=jnp.float32,
             param_dtype=None, rngs: nnx.Rngs) -> tuple[OptDecoder, OptConfig]:
  """Loads an OPT model directory (config.json + safetensors).

  Accepts `OPTForCausalLM` checkpoints (decoder under `model.decoder.`),
  `OPTModel` (`decoder.`) and bare `OPTDecoder` ones; an untied config needs
  `lm_head.weight`.

  Args:
    path: the Hugging Face model directory.
    dtype: compute dtype.
    param_dtype: parameter dtype (default: `dtype`).
    rngs: seeds the dropout streams.

  Returns:
    The decoder (in eval mode) and its config.
  """
  cfg = read_opt_config(path)
  checkpoint = hf.Checkpoint(path)
  prefix = hf.find_prefix(checkpoint, EMBEDDINGS_KEY, PREFIXES)
  hf.check_layer_count(checkpoint, f"{prefix}layers.", cfg.num_layers,
                       pathlib.Path(path) / hf.CONFIG_FILE)
  model = hf.build_from_checkpoint(
      lambda r: OptDecoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
      checkpoint, _hf_sources(cfg, prefix), rngs=rngs)
  return model, cfg
