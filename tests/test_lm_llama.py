"""Parity of genre_jax.lm.llama with transformers' Llama (tiny random)."""

from __future__ import annotations

import json
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from genre_jax.errors import DataFormatError
from genre_jax.lm import hf
from genre_jax.lm import llama
from genre_jax.lm import lora

_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, intermediate_size=128)
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _save_tiny(tmp_path: pathlib.Path, head: bool = True, **overrides):
  """Saves a random tiny Llama to tmp_path; returns the torch model (eval)."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**{**_TINY, **overrides})
  cls = transformers.LlamaForCausalLM if head else transformers.LlamaModel
  model = cls(cfg).eval()
  model.save_pretrained(tmp_path, safe_serialization=True)
  return model


def _padded_batch(left: bool, lengths=(12, 7, 2), width=12, seed=0):
  """Random ids [B, width] and mask [B, width] (one shape for all tests, so
  eager ops compile once)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, _TINY["vocab_size"], (len(lengths), width))
  cols = np.arange(width)[None]
  lengths = np.asarray(lengths)[:, None]
  mask = cols >= width - lengths if left else cols < lengths
  return ids.astype(np.int32), mask


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True},
    {"rope_scaling": _LLAMA3, "rope_theta": 500.0},
], ids=["untied", "tied", "llama3_rope"])
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_forward_matches_transformers(tmp_path, overrides, left):
  theirs = _save_tiny(tmp_path, **overrides)
  ours, cfg = llama.load_llama(tmp_path, rngs=nnx.Rngs(0))
  if "rope_scaling" in overrides:
    assert cfg.rope_scaling is not None
    assert cfg.rope_scaling.rope_type == "llama3"
  ids, mask = _padded_batch(left)
  positions = np.asarray(llama.positions_from_mask(mask))
  with torch.no_grad():
    ref = theirs(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long),
                 position_ids=torch.tensor(positions, dtype=torch.long),
                 output_hidden_states=True)
  hidden = ours(jnp.asarray(ids), jnp.asarray(mask))  # [B, L, D]
  assert np.isfinite(np.asarray(hidden)).all()  # Pad rows too.
  ref_hidden = theirs.model(
      input_ids=torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
      position_ids=torch.tensor(positions, dtype=torch.long),
  ).last_hidden_state.detach().numpy()
  np.testing.assert_allclose(np.asarray(hidden)[mask], ref_hidden[mask],
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(ours.logits(hidden))[mask],
                             ref.logits.numpy()[mask], atol=1e-4, rtol=0)


def test_run_layers_composes(tmp_path):
  _save_tiny(tmp_path)
  model, cfg = llama.load_llama(tmp_path, rngs=nnx.Rngs(0))
  ids, mask = _padded_batch(left=True)
  embedded = model.embed(jnp.asarray(ids))
  full = model.run_layers(embedded, mask, 0, cfg.num_layers)
  for k in range(cfg.num_layers + 1):
    lower = model.run_layers(embedded, mask, 0, k)
    np.testing.assert_allclose(
        model.run_layers(lower, mask, k, cfg.num_layers), full, atol=1e-6)
  np.testing.assert_allclose(model(jnp.asarray(ids), mask), model.norm(full),
                             atol=1e-6)


def _cached_logits(model, prompts, continuations, left: bool):
  """Prefills the padded prompts, then feeds each continuation token by token
  through a jitted step; returns per-row logits for every real token."""
  batch, width = len(prompts), max(len(p) for p in prompts)
  steps = len(continuations[0])
  ids = np.zeros((batch, width), np.int32)
  mask = np.zeros((batch, width), bool)
  for row, prompt in enumerate(prompts):
    cols = slice(width - len(prompt), width) if left else slice(0, len(prompt))
    ids[row, cols] = prompt
    mask[row, cols] = True
  step = nnx.jit(lambda m, i, c, p, k: m.step(i, c, p, k))
  cache = model.init_cache(batch, width + steps, jnp.float32)
  positions = llama.positions_from_mask(mask)
  logits, cache = step(model, jnp.asarray(ids), cache, positions,
                       jnp.asarray(mask))
  rows = [list(np.asarray(logits)[row][mask[row]]) for row in range(batch)]
  last = jnp.asarray([len(p) - 1 for p in prompts])  # [B]
  for t in range(steps):
    last = last + 1
    token = jnp.asarray([[c[t]] for c in continuations], jnp.int32)  # [B, 1]
    logits, cache = step(model, token, cache, last[:, None],
                         jnp.ones((batch, 1), bool))
    for row in range(batch):
      rows[row].append(np.asarray(logits)[row, 0])
  return [np.stack(r) for r in rows]


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_kv_cache_matches_full_forward(tmp_path, left):
  _save_tiny(tmp_path, num_key_value_heads=1)
  model, _ = llama.load_llama(tmp_path, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 128, n) for n in (7, 3, 1)]
  continuations = [rng.integers(0, 128, 4) for _ in prompts]
  cached = _cached_logits(model, prompts, continuations, left)
  # Reference: one uncached forward pass over the whole right-padded batch.
  seqs = [np.concatenate([p, c]) for p, c in zip(prompts, continuations)]
  width = max(len(s) for s in seqs)
  ids = np.zeros((len(seqs), width), np.int32)
  mask = np.arange(width)[None] < np.array([len(s) for s in seqs])[:, None]
  for row, seq in enumerate(seqs):
    ids[row, :len(seq)] = seq
  full = np.asarray(model.logits(model(jnp.asarray(ids), mask)))  # [B, T, V]
  for row, seq in enumerate(seqs):
    assert cached[row].shape == (len(seq), full.shape[-1])
    np.testing.assert_allclose(cached[row], full[row, :len(seq)], atol=1e-4,
                               rtol=0)


def test_cache_overflow_is_an_error(tmp_path):
  _save_tiny(tmp_path)
  model, _ = llama.load_llama(tmp_path, rngs=nnx.Rngs(0))
  cache = model.init_cache(1, 4)
  ids = jnp.zeros((1, 5), jnp.int32)
  with pytest.raises(ValueError, match="cache overflow"):
    model.step(ids, cache, jnp.arange(5)[None])


def test_lora_starts_as_identity_and_trains_only_adapters(tmp_path):
  _save_tiny(tmp_path)
  model, _ = llama.load_llama(tmp_path, rngs=nnx.Rngs(0))
  ids, mask = _padded_batch(left=False)
  before = model(jnp.asarray(ids), mask)
  kernel = np.asarray(model.layers[0].self_attn.q_proj.kernel[...])
  wrapped = lora.apply_lora(
      model, ("q_proj", "v_proj", "gate_proj"), rank=4, alpha=8.0,
      rngs=nnx.Rngs(1))
  assert len(wrapped) == 6
  assert len(jax.tree.leaves(nnx.state(model, lora.LoRAParam))) == 12
  np.testing.assert_array_equal(model(jnp.asarray(ids), mask), before)

  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=lora.LoRAParam)
  x = model.embed(jnp.asarray(ids))  # [B, L, D]

  def loss_fn(m):  # One adapted projection keeps the eager backward cheap.
    return jnp.mean(m.layers[0].self_attn.q_proj(x) ** 2)

  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, lora.LoRAParam))(model)
  optimizer.update(model, grads)
  layer = model.layers[0].self_attn.q_proj
  np.testing.assert_array_equal(layer.base.kernel[...], kernel)
  assert np.abs(np.asarray(layer.lora_b[...])).max() > 0


def test_loads_bare_llama_model_keys(tmp_path):
  theirs = _save_tiny(tmp_path, head=False, tie_word_embeddings=True)
  assert not any(k.startswith("model.")
                 for k in hf.Checkpoint(tmp_path).keys())
  ours, _ = llama.load_llama(tmp_path, rngs=nnx.Rngs(0))
  ids, mask = _padded_batch(left=False)
  with torch.no_grad():
    ref = theirs(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long))
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids), mask))[mask],
                             ref.last_hidden_state.numpy()[mask], atol=1e-4)


def test_untied_model_without_lm_head_names_the_key(tmp_path):
  _save_tiny(tmp_path, head=False, tie_word_embeddings=False)
  with pytest.raises(DataFormatError,
                     match=r"model\.safetensors: missing 'lm_head\.weight'"):
    llama.load_llama(tmp_path, rngs=nnx.Rngs(0))


def test_unsupported_rope_scaling_is_a_config_error(tmp_path):
  _save_tiny(tmp_path)
  config_path = tmp_path / "config.json"
  config = json.loads(config_path.read_text())
  config.pop("rope_parameters", None)
  config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
  config_path.write_text(json.dumps(config))
  with pytest.raises(DataFormatError, match="config.json.*unsupported RoPE"):
    llama.load_llama(tmp_path, rngs=nnx.Rngs(0))


def test_config_with_fewer_layers_than_the_checkpoint_is_refused(tmp_path):
  _save_tiny(tmp_path)
  config_path = tmp_path / "config.json"
  config = json.loads(config_path.read_text())
  config["num_hidden_layers"] = 1
  config_path.write_text(json.dumps(config))
  with pytest.raises(DataFormatError, match=(
      r"model\.safetensors: tensor 'model\.layers\.1\..*' is of layer 1")):
    llama.load_llama(tmp_path, rngs=nnx.Rngs(0))
