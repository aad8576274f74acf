"""Frozen LM weights in bfloat16 or int8 (model.lm.frozen_dtype,
genre_jax/lm/quantize.py): the quantizer's error bound, training under
tune_from and LoRA with the quantized weights frozen, the cache key.

Uses the real all-MiniLM-L6-v2 weights with max_len 16 on the tiny
synthetic dataset.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genre_jax import config as config_lib
from genre_jax import data as data_lib
from genre_jax import train
from genre_jax import variables
from genre_jax.config import load_preset
from genre_jax.errors import ConfigError
from genre_jax.lm import lora
from genre_jax.lm import quantize
from genre_jax.models import lm_encoder
from tests.helpers import build_tiny_opt, changed_leaves, first_losses
from tests.helpers import small_lm_config
from tests.helpers import run_lm_item_encoder, shrink


def _config(data_dir, tmp_path, **lm):
  return small_lm_config("bert_nrms", data_dir, tmp_path, **lm)


@pytest.fixture(scope="module")
def dataset(data_dir):
  return data_lib.load_dataset(shrink(load_preset("bert_nrms"), data_dir).data)


def test_int8_weights_are_within_the_per_channel_bound():
  rng = np.random.default_rng(0)
  # Channels of very different ranges, and an all-zero one.
  w = rng.standard_normal((48, 8)).astype(np.float32) * np.geomspace(
      1e-3, 10, 8, dtype=np.float32)
  w[:, 3] = 0.0
  codes, scale = quantize.quantize_int8(w, axis=0)
  assert codes.dtype == jnp.int8 and scale.shape == (8,)
  assert int(jnp.max(jnp.abs(codes.astype(jnp.int32)))) <= 127
  error = np.abs(np.asarray(quantize.dequantize_int8(codes, scale, 0)) - w)
  bound = np.asarray(scale) / 2 * (1 + 1e-6)
  assert (error <= bound[None, :]).all()
  np.testing.assert_array_equal(error[:, 3], 0.0)
  # Each channel's largest weight is exact (the scale is max|w| / 127).
  np.testing.assert_allclose(np.asarray(scale), np.abs(w).max(0) / 127
                             + (np.abs(w).max(0) == 0), rtol=1e-6)

  linear = nnx.Linear(48, 8, rngs=nnx.Rngs(0))
  linear.kernel.set_value(jnp.asarray(w))
  linear.kernel = variables.Frozen(linear.kernel[...])
  q = quantize.QuantizedLinear(linear)
  x = jnp.asarray(rng.standard_normal((5, 48)), jnp.float32)
  np.testing.assert_allclose(np.asarray(q(x)), np.asarray(
      x @ q.dequantized_kernel() + linear.bias[...]), rtol=1e-5, atol=1e-6)


def test_int8_codes_pack_two_to_a_finite_bfloat16_word():
  # Every pair of codes; then three a row (an odd length, padded).
  a, b = np.meshgrid(np.arange(-127, 128), np.arange(-127, 128))
  every = jnp.asarray(np.stack([a.ravel(), b.ravel()], 1), jnp.int8)
  pairs = quantize.pack_int8(every)  # [65025, 1]
  assert pairs.dtype == jnp.bfloat16 and pairs.shape == (255 * 255, 1)
  np.testing.assert_array_equal(quantize.unpack_int8(pairs, 2), every)
  odd = jnp.concatenate([every, every[:, :1]], axis=1)  # [65025, 3]
  assert quantize.pack_int8(odd).shape == (255 * 255, 2)
  np.testing.assert_array_equal(
      quantize.unpack_int8(quantize.pack_int8(odd), 3), odd)
  pairs = pairs[:, 0]
  bits = np.asarray(jax.lax.bitcast_convert_type(pairs, jnp.uint16))
  assert len(set(bits.tolist())) == 255 * 255  # one word per pair
  value = np.asarray(pairs, np.float32)
  # Finite, and +0 or normal (no -0, no subnormal a flush to zero changes).
  assert np.isfinite(value).all()
  tiny = float(jnp.finfo(jnp.bfloat16).tiny)
  assert ((bits == 0) | (np.abs(value) >= tiny)).all()
  # An optimizer's zero update, a float32 copy and a bfloat16 cast (what
  # model.param_dtype=bfloat16 does) keep every code.
  for moved in (pairs + jnp.zeros_like(pairs), pairs.astype(jnp.float32),
                pairs.astype(jnp.float32).astype(jnp.bfloat16)):
    np.testing.assert_array_equal(quantize.unpack_int8(moved[:, None], 2),
                                  quantize.unpack_int8(pairs[:, None], 2))


def _frozen_lm_leaves(params) -> dict[str, np.ndarray]:
  """The LM's parameters labelled "frozen" by the optimizer, by path."""
  labels = train.param_labels(params)
  out = {}
  for (path, leaf), label in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree.leaves(labels)):
    key = jax.tree_util.keystr(path)
    if "'lm'" in key and label == "frozen":
      out[key] = np.asarray(leaf)
  return out


def _opt_state_sizes(config, dataset) -> tuple[int, dict]:
  """(optimizer state size in numbers, initial params) of a config."""
  _, spec = train.model_inputs(config, dataset)
  _, state = train.init_model(config, spec, total_steps=20)
  size = sum(x.size for x in jax.tree.leaves(state["opt"]))
  return size, state["params"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tune_from", "lora"])
def test_int8_frozen_lm_trains_with_its_quantized_weights_fixed(
    data_dir, tmp_path, dataset, mode):
  lm = dict(tune_from=4, cache=False, frozen_dtype="int8")
  if mode == "lora":
    lm.update(tune_from=5)
  config = _config(data_dir, tmp_path, **lm)
  if mode == "lora":
    config.model.lm.lora.rank = 4
  losses, before, after = first_losses(config, dataset, steps=2)
  assert np.isfinite(losses).all()
  frozen = _frozen_lm_leaves(before)
  # The frozen layers' weights are int8 codes (packed two to a bfloat16
  # word) and float32 scales; under LoRA every base weight is.
  quantized_layers = range(6) if mode == "lora" else range(4)
  for i in quantized_layers:
    assert f"['layers'][{i}]['query']" + (
        "['base']" if mode == "lora" and i >= 5 else "") + "['codes']" in (
            " ".join(frozen))
  assert any("['word_embeddings']['codes']" in k for k in frozen)
  assert all(v.dtype == (jnp.bfloat16 if "['codes']" in k else np.float32)
             for k, v in frozen.items())
  after_frozen = _frozen_lm_leaves(after)
  for key, value in frozen.items():
    np.testing.assert_array_equal(after_frozen[key], value, err_msg=key)
  changed = changed_leaves(before, after, "'lm'")
  tuned = {k: v for k, v in changed.items() if k not in frozen}
  assert tuned and any(tuned.values())
  if mode == "lora":
    assert all("lora_" in k for k in tuned)
  else:
    assert all("'layers'][4]" in k or "'layers'][5]" in k for k in tuned)
  # No optimizer state for a frozen weight: the same state size as float32
  # storage (where frozen weights have none either).
  size, params = _opt_state_sizes(config, dataset)
  config.model.lm.frozen_dtype = "float32"
  size_fp32, params_fp32 = _opt_state_sizes(config, dataset)
  assert size == size_fp32
  frozen_fp32 = _frozen_lm_leaves(params_fp32)
  assert sum(v.nbytes for v in _frozen_lm_leaves(params).values()) < 0.3 * sum(
      v.nbytes for v in frozen_fp32.values())


@pytest.mark.slow
def test_bfloat16_frozen_layers_train_and_stay_put(data_dir, tmp_path,
                                                   dataset):
  config = _config(data_dir, tmp_path, tune_from=5, cache=False,
                   frozen_dtype="bfloat16")
  losses, before, after = first_losses(config, dataset, steps=2)
  assert np.isfinite(losses).all()
  frozen = _frozen_lm_leaves(before)
  kernels = {k: v for k, v in frozen.items()
             if "['kernel']" in k or "['embedding']" in k}
  assert kernels and all(v.dtype == jnp.bfloat16 for v in kernels.values())
  after_frozen = _frozen_lm_leaves(after)
  for key, value in frozen.items():
    np.testing.assert_array_equal(after_frozen[key], value, err_msg=key)


def test_lora_wraps_a_quantized_linear_either_way():
  x = jnp.ones((2, 6))

  class Block(nnx.Module):

    def __init__(self):
      self.query = nnx.Linear(6, 4, rngs=nnx.Rngs(1))
      self.query.kernel = variables.Frozen(self.query.kernel[...])

  # Quantize after LoRA (what the encoder does), or adapt a quantized layer.
  after, before = Block(), Block()
  lora.apply_lora(after, ("query",), rank=2, rngs=nnx.Rngs(2))
  assert quantize.quantize_frozen(after, "int8") == 1
  assert quantize.quantize_frozen(before, "int8") == 1
  lora.apply_lora(before, ("query",), rank=2, rngs=nnx.Rngs(2))
  for block in (after, before):
    assert isinstance(block.query, lora.LoRALinear)
    assert isinstance(block.query.base, quantize.QuantizedLinear)
    block.query.lora_b[...] = jnp.ones((2, 4))
    y = block.query(x)
    merged = block.query.merged()
    assert isinstance(merged, nnx.Linear)
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(y),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_frozen_dtype_enters_the_cache_key_only_when_not_float32(
    data_dir, tmp_path, dataset):
  config = _config(data_dir, tmp_path, tune_from=2)
  ids = np.ones((3, 4), np.int32)
  mask = np.ones((3, 4), bool)
  frozen = {"w": np.arange(6, dtype=np.float32)}
  keys = {}
  for dtype in ("float32", "bfloat16", "int8"):
    config.model.lm.frozen_dtype = dtype
    keys[dtype] = lm_encoder.cache_key(config, "bert", frozen, ids, mask, 2)
  del config.model.lm["frozen_dtype"]  # a config from before the field
  assert keys["float32"] == lm_encoder.cache_key(config, "bert", frozen, ids,
                                                 mask, 2)
  assert len(set(keys.values())) == 3
  # The cached hidden states are those of the quantized layers: another
  # file, close to the float32 one.
  config.model.lm.frozen_dtype = "float32"
  plain, _ = lm_encoder.item_inputs(config, dataset)
  config.model.lm.frozen_dtype = "int8"
  quantized, spec = lm_encoder.item_inputs(config, dataset)
  assert len(list((tmp_path / "lm_cache").iterdir())) == 2
  field = lm_encoder.HIDDEN_FIELD
  a, b = (np.asarray(t["tokens"][field][1:], np.float32)
          for t in (plain, quantized))
  assert not np.array_equal(a, b)
  # (experiments/quantized_frozen.py: ~3% on Goodreads titles)
  assert np.abs(a - b).mean() < 0.1 * np.abs(a).mean()
  # The cached run and the uncached one (quantized layers run every step)
  # agree.
  rows = np.arange(1, 21)
  take = lambda t: {k: jnp.asarray(v[rows]) for k, v in t.items()}
  model = lm_encoder.LMItemEncoder(config, spec, rngs=nnx.Rngs(0))
  model.eval()
  cached = model(take(quantized["tokens"]), take(quantized["masks"]))
  config.model.lm.cache = False
  inputs, spec = lm_encoder.item_inputs(config, dataset)
  model = lm_encoder.LMItemEncoder(config, spec, rngs=nnx.Rngs(0))
  model.eval()
  uncached = model(take(inputs["tokens"]), take(inputs["masks"]))
  np.testing.assert_allclose(np.asarray(cached), np.asarray(uncached),
                             atol=2e-5)


def test_a_bad_frozen_dtype_is_one_config_error(data_dir, tmp_path):
  config = _config(data_dir, tmp_path, tune_from=2, frozen_dtype="int4")
  with pytest.raises(ConfigError, match=r"config\.model\.lm\.frozen_dtype"):
    config_lib.validate(config)
  with pytest.raises(ConfigError, match=r"config\.model\.lm\.frozen_dtype"):
    lm_encoder.check_config(config)
  # Nothing frozen to store: refused, not silently ignored.
  config = _config(data_dir, tmp_path, tune_from=0, frozen_dtype="int8")
  config_lib.validate(config)
  with pytest.raises(ConfigError, match=r"config\.model\.lm\.frozen_dtype"
                     r"=int8: nothing is frozen"):
    lm_encoder.check_config(config)


@pytest.mark.slow
def test_int8_lora_item_encoder_trains_evaluates_and_recommends(data_dir,
                                                               tmp_path):
  # QLoRA end to end on another family (a tiny random OPT): run.py trains
  # (layer 0 cached from its int8 weights), checkpoints, evaluates and
  # recommends from the checkpoint with the same int8 weights.
  model_dir = build_tiny_opt(tmp_path / "opt", minilm_tokenizer=True)
  run_lm_item_encoder(tmp_path, data_dir, "configs/llama_nrms.py", model_dir,
                      "--config.model.lm.kind=opt",
                      "--config.model.lm.lora.rank=2",
                      "--config.model.lm.frozen_dtype=int8")
