"""Parity of genre_jax.lm.bert with transformers.BertModel; checkpoint IO."""

from __future__ import annotations

import json
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_np
import torch
import transformers

from genre_jax.data import tokenize as tokenize_lib
from genre_jax.errors import DataFormatError
from genre_jax.lm import bert
from genre_jax.lm import hf
from genre_jax.lm import lora

_NEWS = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
         / "goodreads" / "news.tsv")
# Used when the shared Goodreads data is absent.
_FALLBACK_TITLES = (
    "Dune",
    "The Hobbit",
    "Pride and Prejudice",
    "The Hunger Games (The Hunger Games, #1)",
    "Harry Potter and the Sorcerer's Stone (Harry Potter, #1)",
    "One Hundred Years of Solitude",
    "The Curious Incident of the Dog in the Night-Time",
    "Midnight's Children",
)
_TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=32)


def _titles(count: int = 8) -> list[str]:
  """`count` real book titles of spread-out lengths."""
  if not _NEWS.is_file():
    return list(_FALLBACK_TITLES[:count])
  with _NEWS.open(encoding="utf-8") as f:
    titles = sorted({line.split("\t")[3] for _, line in zip(range(400), f)},
                    key=lambda t: (len(t), t))
  picks = np.linspace(0, len(titles) - 1, count).round().astype(int)
  return [titles[i] for i in picks]


@pytest.fixture(scope="module")
def minilm():
  path = hf.model_dir()
  model, cfg = bert.load_bert(path, rngs=nnx.Rngs(0))
  ids, mask = hf.tokenize(tokenize_lib.load_tokenizer(path), _titles())
  return path, model, cfg, ids, mask


def test_matches_transformers_on_real_titles(minilm):
  path, model, _, ids, mask = minilm
  assert mask.sum(1).min() < mask.shape[1]  # The batch has padding.
  theirs = transformers.BertModel.from_pretrained(path).eval()
  with torch.no_grad():
    ref = theirs(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long))
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))  # [B, L, D]
  diff = np.abs(ours - ref.last_hidden_state.numpy())[mask]
  assert diff.max() <= 1e-4, diff.max()


def test_tokenize_matches_transformers_tokenizer(minilm):
  path, _, _, ids, mask = minilm
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  ref = tokenizer(_titles(), padding=True, return_tensors="np")
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"].astype(bool))
  left_ids, left_mask = hf.tokenize(tokenize_lib.load_tokenizer(path), _titles(),
                                    pad_left=True)
  for row in range(len(ids)):
    np.testing.assert_array_equal(left_ids[row][left_mask[row]],
                                  ids[row][mask[row]])


def test_run_layers_composes(minilm):
  _, model, cfg, ids, mask = minilm
  hidden = model.embed(jnp.asarray(ids))  # [B, L, D]
  full = model.run_layers(hidden, mask, 0, cfg.num_layers)
  np.testing.assert_allclose(model(jnp.asarray(ids), mask), full, atol=0)
  for k in range(cfg.num_layers + 1):
    lower = model.run_layers(hidden, mask, 0, k)
    np.testing.assert_allclose(
        model.run_layers(lower, mask, k, cfg.num_layers), full, atol=1e-6)
  with pytest.raises(ValueError, match="start <= stop"):
    model.run_layers(hidden, mask, 3, 2)


def test_lora_starts_as_identity_and_merges_exactly(minilm):
  path, _, cfg, ids, mask = minilm
  model, _ = bert.load_bert(path, rngs=nnx.Rngs(0))
  before = model(jnp.asarray(ids), mask)
  wrapped = lora.apply_lora(model, ("query", "value"), rank=4, alpha=8.0,
                            dropout=0.1, rngs=nnx.Rngs(1))
  assert len(wrapped) == 2 * cfg.num_layers
  adapters = nnx.state(model, lora.LoRAParam)
  assert len(jax.tree.leaves(adapters)) == 4 * cfg.num_layers
  np.testing.assert_array_equal(model(jnp.asarray(ids), mask), before)

  # A trained-looking adapter changes the output; merging keeps the change.
  rng = np.random.default_rng(0)
  for layer in model.layers:
    b = layer.query.lora_b
    b.set_value(jnp.asarray(rng.normal(0, 0.05, b.shape), b.dtype))
  adapted = model(jnp.asarray(ids), mask)
  assert np.abs(np.asarray(adapted - before)).max() > 1e-3
  assert lora.merge_lora(model) == 2 * cfg.num_layers
  assert not jax.tree.leaves(nnx.state(model, lora.LoRAParam))
  np.testing.assert_allclose(model(jnp.asarray(ids), mask), adapted,
                             atol=1e-4)


def test_apply_lora_rejects_unknown_targets(minilm):
  path, *_ = minilm
  model, _ = bert.load_bert(path, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no Linear layer named"):
    lora.apply_lora(model, ("q_proj",), rank=2, alpha=2.0, rngs=nnx.Rngs(0))


def _tiny_bert(tmp_path: pathlib.Path, **config_edits):
  """Saves a random tiny BertModel (unprefixed keys); returns it (eval).

  config_edits then overwrite fields of the saved config.json only, so that
  it no longer matches the weights.
  """
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(**_TINY)).eval()
  model.save_pretrained(tmp_path, safe_serialization=True)
  if config_edits:
    config_path = tmp_path / hf.CONFIG_FILE
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, **config_edits}))
  return model


def test_loads_prefixed_sharded_bf16_checkpoint(tmp_path):
  torch.manual_seed(0)
  head = transformers.BertForMaskedLM(transformers.BertConfig(**_TINY))
  head.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / hf.WEIGHTS_INDEX_FILE).is_file()
  assert all(k.startswith(("bert.", "cls.")) for k in
             hf.Checkpoint(tmp_path).keys())
  ours, _ = bert.load_bert(tmp_path, rngs=nnx.Rngs(0))
  reference = head.bert.float().eval()  # The same bf16 values, in float32.
  ids = np.array([[2, 17, 33, 5, 0, 0], [2, 9, 41, 88, 61, 3]], np.int32)
  mask = ids > 0
  with torch.no_grad():
    ref = reference(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long))
  np.testing.assert_allclose(
      np.asarray(ours(jnp.asarray(ids), mask))[mask],
      ref.last_hidden_state.numpy()[mask], atol=1e-4, rtol=0)


def test_missing_tensor_names_file_and_key(tmp_path):
  _tiny_bert(tmp_path)
  weights = tmp_path / hf.WEIGHTS_FILE
  tensors = safetensors_np.load_file(weights)
  del tensors["encoder.layer.1.attention.self.query.weight"]
  safetensors_np.save_file(tensors, weights)
  with pytest.raises(DataFormatError, match=(
      r"model\.safetensors: missing "
      r"'encoder\.layer\.1\.attention\.self\.query\.weight'")):
    bert.load_bert(tmp_path, rngs=nnx.Rngs(0))


def test_shape_mismatch_names_key_and_shapes(tmp_path):
  _tiny_bert(tmp_path, intermediate_size=48)
  with pytest.raises(DataFormatError, match=(
      r"model\.safetensors: tensor 'encoder\.layer\.0\.intermediate\.dense\."
      r"(weight|bias)' has shape \[64(, 32)?\], expected \[48(, 32)?\]")):
    bert.load_bert(tmp_path, rngs=nnx.Rngs(0))


def test_bad_config_field_is_named(tmp_path):
  _tiny_bert(tmp_path, num_attention_heads="twelve")
  with pytest.raises(DataFormatError,
                     match=r"config\.json: field 'num_attention_heads'"):
    bert.load_bert(tmp_path, rngs=nnx.Rngs(0))


def test_unsupported_activation_is_named(tmp_path):
  _tiny_bert(tmp_path, hidden_act="mish")
  with pytest.raises(DataFormatError, match=(
      r"config\.json: field 'hidden_act'.*unsupported activation 'mish'")):
    bert.load_bert(tmp_path, rngs=nnx.Rngs(0))


def test_safetensors_header_that_is_not_an_object_is_named(tmp_path):
  import struct

  _tiny_bert(tmp_path)
  header = b"[1, 2]"
  (tmp_path / hf.WEIGHTS_FILE).write_bytes(
      struct.pack("<Q", len(header)) + header)
  with pytest.raises(DataFormatError,
                     match=r"model\.safetensors: invalid header: not a JSON"):
    bert.load_bert(tmp_path, rngs=nnx.Rngs(0))


def test_config_with_fewer_layers_than_the_checkpoint_is_refused(tmp_path):
  _tiny_bert(tmp_path, num_hidden_layers=1)
  with pytest.raises(DataFormatError, match=(
      r"model\.safetensors: tensor 'encoder\.layer\.1\..*' is of layer 1, "
      r"but .*config\.json has num_hidden_layers=1")):
    bert.load_bert(tmp_path, rngs=nnx.Rngs(0))


def test_integer_tensor_for_a_float_parameter_is_refused(tmp_path):
  _tiny_bert(tmp_path)
  weights = tmp_path / hf.WEIGHTS_FILE
  tensors = safetensors_np.load_file(weights)
  key = "encoder.layer.0.intermediate.dense.weight"
  tensors[key] = (tensors[key] * 1000).astype(np.int64)
  safetensors_np.save_file(tensors, weights)
  with pytest.raises(DataFormatError, match=(
      rf"model\.safetensors: tensor '{key}' is int64, expected a float")):
    bert.load_bert(tmp_path, rngs=nnx.Rngs(0))


# --- RoBERTa (the BERT family's other position ids) ---------------------------

_TINY_ROBERTA = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3,
                     num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=20, type_vocab_size=1,
                     pad_token_id=1, layer_norm_eps=1e-5)


def _tiny_roberta(tmp_path: pathlib.Path, model_type: str):
  """A random tiny RoBERTa (every weight redrawn), saved as a masked-LM head
  model (tensors under `roberta.`) for "roberta" and as a bare
  XLMRobertaModel for "xlm-roberta"; returns the backbone (eval)."""
  from tests.helpers import randomize_weights
  torch.manual_seed(0)
  if model_type == "roberta":
    model = transformers.RobertaForMaskedLM(
        transformers.RobertaConfig(**_TINY_ROBERTA))
    backbone = model.roberta
  else:
    model = backbone = transformers.XLMRobertaModel(
        transformers.XLMRobertaConfig(**_TINY_ROBERTA))
  randomize_weights(model)
  model.save_pretrained(tmp_path, safe_serialization=True)
  return backbone.eval()


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta"])
def test_roberta_every_layer_matches_transformers(tmp_path, model_type):
  from genre_jax.lm import families
  theirs = _tiny_roberta(tmp_path, model_type)
  family = families.family_of(tmp_path)
  assert family.name == "bert"
  ours, cfg = family.load(tmp_path, dtype=jnp.float32,
                          param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert cfg.roberta_positions and cfg.max_length == 20 - 1 - 1
  # Right and left padding with the padding id (1): RoBERTa's positions
  # count the real tokens either way.
  ids = np.array([[0, 17, 33, 5, 2, 1, 1, 1], [0, 9, 41, 88, 61, 3, 70, 2],
                  [1, 1, 1, 0, 44, 12, 6, 2]], np.int32)
  mask = ids != 1
  with torch.no_grad():
    ref = theirs(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long),
                 output_hidden_states=True)
  hidden = ours.embed(jnp.asarray(ids))
  diffs = [float(np.abs(np.asarray(hidden) - ref.hidden_states[0].numpy()
                        )[mask].max())]
  for i in range(cfg.num_layers):
    hidden = ours.run_layers(hidden, mask, i, i + 1)
    diffs.append(float(np.abs(np.asarray(hidden) -
                              ref.hidden_states[i + 1].numpy())[mask].max()))
  assert max(diffs) <= 1e-4, diffs
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids), mask))[mask],
                             ref.last_hidden_state.numpy()[mask], atol=1e-4)
  with pytest.raises(ValueError, match="exceeds the 18 positions"):
    ours.embed(jnp.ones((1, 19), jnp.int32))


def test_causal_roberta_config_is_refused(tmp_path):
  _tiny_roberta(tmp_path, "roberta")
  config_path = tmp_path / hf.CONFIG_FILE
  config = json.loads(config_path.read_text())
  config_path.write_text(json.dumps({**config, "is_decoder": True}))
  with pytest.raises(DataFormatError,
                     match=r"config\.json: field 'is_decoder'"):
    bert.load_bert(tmp_path, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_roberta_item_encoder_trains_evaluates_and_recommends(data_dir,
                                                              tmp_path):
  import os

  from tests.helpers import run_lm_item_encoder

  model_dir = tmp_path / "roberta"
  torch.manual_seed(0)
  # MiniLM's tokenizer.json (ids < 30522) with a tiny random RoBERTa.
  transformers.RobertaModel(transformers.RobertaConfig(
      **{**_TINY_ROBERTA, "vocab_size": 30522})).save_pretrained(model_dir)
  os.symlink(os.path.join(hf.model_dir(), hf.TOKENIZER_FILE),
             model_dir / hf.TOKENIZER_FILE)
  run_lm_item_encoder(tmp_path, data_dir, "configs/bert_nrms.py", model_dir)
