"""Parity of genre_jax.lm.opt with transformers' OPT: the hidden states of
every layer, greedy KV-cache generation, checkpoint layouts, the local GENRE
provider and an end-to-end recommender run with OPT as the item encoder."""

from __future__ import annotations

import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from genre_jax.errors import DataFormatError
from genre_jax.genre import providers
from genre_jax.genre.providers import local as local_provider
from genre_jax.genre.providers.base import Prompt
from genre_jax.lm import families
from genre_jax.lm import hf
from genre_jax.lm import llama
from genre_jax.lm import opt
from tests.helpers import build_tiny_opt, randomize_weights
from tests.helpers import run_lm_item_encoder

# Pre-LN (125m, 1.3b, ...); post-LN with project_in/out (350m); and the
# switches no released size uses: no biases, LayerNorms without weights, an
# untied LM head, GELU.
_VARIANTS = {
    "pre_ln": {},
    "350m": dict(do_layer_norm_before=False, word_embed_proj_dim=16),
    "bare": dict(enable_bias=False, layer_norm_elementwise_affine=False,
                 tie_word_embeddings=False, activation_function="gelu",
                 num_hidden_layers=3),
}
# Two prompts of different lengths (ids of the 30-word WordLevel vocabulary;
# 1 is <s>, 0 <pad>).
_PROMPTS = ([1, 5, 9, 14, 7, 22, 11, 6], [1, 17, 4, 29])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """Tiny torch models on one thread: next to JAX's threads, torch's own
  pool made some of them 100x slower on a 2-core machine."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(_VARIANTS))
def tiny(request, tmp_path_factory):
  """(model dir, transformers model, our model, our config) of a variant."""
  path = build_tiny_opt(tmp_path_factory.mktemp(request.param),
                        **_VARIANTS[request.param])
  theirs = transformers.OPTForCausalLM.from_pretrained(path).eval()
  ours, cfg = opt.load_opt(path, rngs=nnx.Rngs(0))
  return path, theirs, ours, cfg


def _batch(pad_left: bool) -> tuple[np.ndarray, np.ndarray]:
  length = max(map(len, _PROMPTS))
  ids = np.zeros((len(_PROMPTS), length), np.int32)
  mask = np.zeros((len(_PROMPTS), length), bool)
  for row, tokens in enumerate(_PROMPTS):
    cols = slice(length - len(tokens), None) if pad_left else slice(
        0, len(tokens))
    ids[row, cols] = tokens
    mask[row, cols] = True
  return ids, mask


@pytest.mark.parametrize("pad_left", [False, True], ids=["right", "left"])
def test_every_layer_matches_transformers(tiny, pad_left):
  _, theirs, ours, cfg = tiny
  ids, mask = _batch(pad_left)
  with torch.no_grad():
    ref = theirs(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long),
                 output_hidden_states=True)
  assert len(ref.hidden_states) == cfg.num_layers + 1
  # hidden_states[0] is the input of layer 0, [i] the output of layer i-1,
  # the last one final-normed and projected out (HF OPTModel's output).
  hidden = ours.embed(jnp.asarray(ids), mask)
  mine = [hidden]
  for i in range(cfg.num_layers):
    hidden = ours.run_layers(hidden, mask, i, i + 1)
    mine.append(hidden)
  mine[-1] = ours(jnp.asarray(ids), mask)
  diffs = [float(np.abs(np.asarray(a) - b.numpy())[mask].max())
           for a, b in zip(mine, ref.hidden_states)]
  assert max(diffs) <= 1e-4, diffs
  logits = ours.logits(mine[-1])
  assert float(np.abs(np.asarray(logits) - ref.logits.numpy())[mask].max()
               ) <= 1e-4
  # The encoder path: the same layers in two runs, then final_norm.
  lower = ours.run_layers(ours.embed(jnp.asarray(ids), mask), mask, 0, 1)
  top = ours.final_norm(ours.run_layers(lower, mask, 1, cfg.num_layers))
  np.testing.assert_allclose(np.asarray(ours._project_out(top))[mask],
                             ref.hidden_states[-1].numpy()[mask], atol=1e-4)


def _greedy(model, ids, mask, new_tokens):
  """Greedy tokens [B, new_tokens] with the KV cache, as the local provider
  decodes: prefill the left-padded prompt, then one token per step."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, ids, cache, positions, mask):
    logits, cache = nnx.merge(graphdef, state).step(ids, cache, positions,
                                                    mask)
    return jnp.argmax(logits[:, -1], axis=-1), cache

  positions = np.asarray(llama.positions_from_mask(mask))
  cache = model.init_cache(ids.shape[0], ids.shape[1] + new_tokens)
  token, cache = step(state, jnp.asarray(ids), cache, jnp.asarray(positions),
                      jnp.asarray(mask))
  out, position = [token], positions[:, -1:] + 1
  ones = jnp.ones((ids.shape[0], 1), bool)
  for _ in range(new_tokens - 1):
    token, cache = step(state, token[:, None], cache, jnp.asarray(position),
                        ones)
    out.append(token)
    position = position + 1
  return np.stack([np.asarray(t) for t in out], axis=1)


def _cut_at_eos(rows, eos):
  return [row[:row.index(eos) + 1] if eos in row else row for row in rows]


def test_greedy_generation_matches_transformers(tiny):
  _, theirs, ours, _ = tiny
  ids, mask = _batch(pad_left=True)
  new_tokens = 10
  with torch.no_grad():
    ref = theirs.generate(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
        max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=2)
  want = _cut_at_eos(ref[:, ids.shape[1]:].tolist(), 2)
  got = _cut_at_eos(_greedy(ours, ids, mask, new_tokens).tolist(), 2)
  assert got == want
  assert any(len(row) > 3 for row in want)  # Not all ended at once.


def test_loads_opt_model_and_sharded_checkpoints(tmp_path):
  torch.manual_seed(0)
  config = transformers.OPTConfig(
      vocab_size=64, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, ffn_dim=48, max_position_embeddings=32)
  backbone = transformers.OPTModel(config).eval()  # tensors under decoder.
  randomize_weights(backbone)
  backbone.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / hf.WEIGHTS_INDEX_FILE).is_file()
  assert all(k.startswith("decoder.") for k in hf.Checkpoint(tmp_path).keys())
  assert families.family_of(tmp_path).name == "opt"
  ours, _ = families.get("opt").load(tmp_path, dtype=jnp.float32,
                                     param_dtype=jnp.float32,
                                     rngs=nnx.Rngs(0))
  ids = np.array([[2, 17, 33, 5, 1, 1], [2, 9, 41, 60, 61, 3]], np.int32)
  mask = ids != 1
  with torch.no_grad():
    ref = backbone(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long))
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids), mask))[mask],
                             ref.last_hidden_state.numpy()[mask], atol=1e-4)


def test_config_errors_are_named(tmp_path):
  path = build_tiny_opt(tmp_path / "opt")
  config_path = path / hf.CONFIG_FILE
  config = json.loads(config_path.read_text())
  config_path.write_text(json.dumps({**config, "num_attention_heads": 5}))
  with pytest.raises(DataFormatError, match=(
      r"config\.json: field 'num_attention_heads'.*5 does not divide")):
    opt.load_opt(path, rngs=nnx.Rngs(0))
  config_path.write_text(json.dumps({**config, "num_hidden_layers": 1}))
  with pytest.raises(DataFormatError, match=r"is of layer 1"):
    opt.load_opt(path, rngs=nnx.Rngs(0))
  config_path.write_text(json.dumps(config))
  model, _ = opt.load_opt(path, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_position_embeddings 128"):
    model.init_cache(1, 129)


def test_local_provider_generates_with_opt(tmp_path):
  path = build_tiny_opt(tmp_path / "opt")
  prompts = [Prompt("a", "you recommend books", "books liked : dune"),
             Prompt("b", "reply with json", "books liked : emma , the hobbit")]
  provider = providers.get_provider("local", model_dir=str(path),
                                    batch_size=2, max_new_tokens=6)
  replies = provider.generate(prompts)
  # transformers' greedy replies to the same rendered, left-padded prompts.
  tokenizer = tokenizers.Tokenizer.from_file(str(path / hf.TOKENIZER_FILE))
  encodings = [tokenizer.encode(local_provider.render_plain(p.system,
                                                            p.user)).ids
               for p in prompts]
  length = max(map(len, encodings))
  ids = np.zeros((len(prompts), length), np.int64)
  mask = np.zeros((len(prompts), length), np.int64)
  for row, tokens in enumerate(encodings):
    ids[row, length - len(tokens):] = tokens
    mask[row, length - len(tokens):] = 1
  theirs = transformers.OPTForCausalLM.from_pretrained(path).eval()
  with torch.no_grad():
    out = theirs.generate(input_ids=torch.tensor(ids),
                          attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=6, eos_token_id=2, pad_token_id=0)
  want = [tokenizer.decode(row[:row.index(2)] if 2 in row else row,
                           skip_special_tokens=True).strip()
          for row in out[:, length:].tolist()]
  assert replies == want


@pytest.mark.slow
def test_opt_item_encoder_trains_evaluates_and_recommends(data_dir, tmp_path):
  model_dir = build_tiny_opt(tmp_path / "opt", minilm_tokenizer=True)
  # The Llama preset (last-token pooling, LoRA on q_proj/v_proj) on OPT.
  run_lm_item_encoder(tmp_path, data_dir, "configs/llama_nrms.py", model_dir,
                      "--config.model.lm.kind=opt",
                      "--config.model.lm.lora.rank=2")
