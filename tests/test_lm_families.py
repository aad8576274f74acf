"""Parity of the causal LM families (lm/families.py "llama": Llama 1/2/3,
Mistral, Qwen2/2.5, Qwen3) with transformers, on tiny random models.

Every layer's hidden states (run layer by layer) and the final-normed output
match transformers' `output_hidden_states` to 1e-4 with right and left
padding; greedy decoding with our KV cache (the local GENRE provider's path)
gives transformers' `generate(do_sample=False)` tokens for a left-padded
batch of two prompts of different lengths.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from genre_jax.errors import DataFormatError
from genre_jax.genre.providers import local as local_provider
from genre_jax.lm import families
from genre_jax.lm import hf
from genre_jax.lm import llama
from tests.helpers import build_tiny_causal_lm

ROOT = pathlib.Path(__file__).resolve().parents[1]
_VOCAB = 128
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# name -> (model_type, config overrides). Windows are shorter than the test
# sequences, so the sliding masks matter.
_CASES = {
    "llama": ("llama", {}),
    "llama_bias_tied": ("llama", {"attention_bias": True, "mlp_bias": True,
                                  "tie_word_embeddings": True}),
    "llama3": ("llama", {"rope_scaling": _LLAMA3, "rope_theta": 500.0}),
    "mistral": ("mistral", {"sliding_window": 5}),
    "qwen2": ("qwen2", {}),
    "qwen2_sliding": ("qwen2", {"use_sliding_window": True,
                                "sliding_window": 4, "max_window_layers": 1}),
    "qwen2_sharded": ("qwen2", {"max_shard_size": "20KB"}),
    "qwen3": ("qwen3", {"num_key_value_heads": 1}),
    "qwen3_bias": ("qwen3", {"attention_bias": True,
                             "tie_word_embeddings": True}),
}
_GENERATE = ("llama", "llama3", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """name -> model dir, written once per module."""
  made = {}

  def get(name):
    if name not in made:
      model_type, overrides = _CASES[name]
      made[name] = build_tiny_causal_lm(
          tmp_path_factory.mktemp(name), model_type, vocab_size=_VOCAB,
          **overrides)
    return made[name]

  return get


def _theirs(model_dir):
  return transformers.AutoModelForCausalLM.from_pretrained(
      model_dir, dtype=torch.float32).eval()


def _padded_batch(left: bool, lengths=(12, 7, 2), width=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, _VOCAB, (len(lengths), width)).astype(np.int32)
  cols = np.arange(width)[None]
  lengths = np.asarray(lengths)[:, None]
  mask = cols >= width - lengths if left else cols < lengths
  return np.where(mask, ids, 0).astype(np.int32), mask


@pytest.mark.parametrize("name", list(_CASES))
def test_config_reader(tiny, name):
  model_type, overrides = _CASES[name]
  cfg = hf.read_llama_config(tiny(name))
  assert families.family_of(tiny(name)).name == "llama"
  assert cfg.model_type == model_type
  assert cfg.qk_norm == (model_type == "qwen3")
  q_bias = model_type == "qwen2" or overrides.get("attention_bias", False)
  assert cfg.attention_bias == q_bias
  assert cfg.out_bias == (q_bias and model_type != "qwen2")
  expected_windows = {"mistral": (5, 5), "qwen2_sliding": (None, 4)}
  assert tuple(cfg.sliding_window(i) for i in range(cfg.num_layers)) == (
      expected_windows.get(name, (None, None)))
  if name == "llama3":
    assert cfg.rope_scaling.rope_type == "llama3"
  if "max_shard_size" in overrides:
    assert (tiny(name) / hf.WEIGHTS_INDEX_FILE).is_file()
    assert not (tiny(name) / hf.WEIGHTS_FILE).exists()


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
@pytest.mark.parametrize("name", list(_CASES))
def test_every_layer_matches_transformers(tiny, name, left):
  theirs = _theirs(tiny(name))
  ours, cfg = llama.load_llama(tiny(name), rngs=nnx.Rngs(0))
  ids, mask = _padded_batch(left)
  positions = np.asarray(llama.positions_from_mask(mask))
  with torch.no_grad():
    ref = theirs(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long),
                 position_ids=torch.tensor(positions, dtype=torch.long),
                 output_hidden_states=True)
  # transformers: the embeddings, each layer's output but the last, then
  # the final-normed output.
  expected = [h.numpy() for h in ref.hidden_states]
  assert len(expected) == cfg.num_layers + 1
  hidden = ours.embed(jnp.asarray(ids))
  got = [hidden]
  for i in range(cfg.num_layers):
    hidden = ours.run_layers(hidden, mask, i, i + 1)
    got.append(hidden)
  got[-1] = ours.final_norm(hidden)
  diffs = [float(np.abs(np.asarray(g)[mask] - e[mask]).max())
           for g, e in zip(got, expected)]
  assert max(diffs) <= 1e-4, diffs
  full = ours(jnp.asarray(ids), mask)
  np.testing.assert_allclose(np.asarray(full)[mask], expected[-1][mask],
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(ours.logits(full))[mask],
                             ref.logits.numpy()[mask], atol=1e-4, rtol=0)


def _until_eos(tokens, eos_ids):
  tokens = [int(t) for t in tokens]
  for i, token in enumerate(tokens):
    if token in eos_ids:
      return tokens[:i + 1]
  return tokens


@pytest.mark.parametrize("name", _GENERATE)
def test_greedy_generation_matches_transformers(tiny, name):
  model_dir = tiny(name)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, _VOCAB, n).tolist() for n in (9, 4)]
  new_tokens = 8
  provider = local_provider.LocalProvider(
      str(model_dir), batch_size=2, max_new_tokens=new_tokens)
  ours = provider.generate_tokens(prompts)
  # transformers: the same prompts left-padded to the longest.
  width = max(map(len, prompts))
  ids = torch.zeros((2, width), dtype=torch.long)
  mask = torch.zeros((2, width), dtype=torch.long)
  for row, prompt in enumerate(prompts):
    ids[row, width - len(prompt):] = torch.tensor(prompt)
    mask[row, width - len(prompt):] = 1
  with torch.no_grad():
    out = _theirs(model_dir).generate(
        input_ids=ids, attention_mask=mask, do_sample=False,
        max_new_tokens=new_tokens, pad_token_id=0)
  eos = provider.eos_ids
  assert eos
  for row in range(2):
    theirs = _until_eos(out[row, width:].tolist(), eos)
    assert _until_eos(ours[row], eos) == theirs, (row, ours[row], theirs)


def test_sliding_layers_from_max_window_layers(tiny, tmp_path):
  """Qwen2 configs written before `layer_types` existed: layers from
  max_window_layers on slide; use_sliding_window false turns it off."""
  source = tiny("qwen2_sliding")
  config = json.loads((source / "config.json").read_text())
  config.pop("layer_types")
  (tmp_path / "config.json").write_text(json.dumps(config))
  assert hf.read_llama_config(tmp_path).sliding_windows == (None, 4)
  config["use_sliding_window"] = False
  (tmp_path / "config.json").write_text(json.dumps(config))
  assert hf.read_llama_config(tmp_path).sliding_windows == ()
  config["use_sliding_window"] = True
  config["layer_types"] = ["full_attention", "chunked_attention"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(DataFormatError, match="config.json.*layer_types"):
    hf.read_llama_config(tmp_path)


def test_mistral_without_sliding_window_attends_everywhere(tmp_path):
  config = {"model_type": "mistral", "hidden_size": 64,
            "num_attention_heads": 16, "num_hidden_layers": 2,
            "sliding_window": None}
  (tmp_path / "config.json").write_text(json.dumps(config))
  cfg = hf.read_llama_config(tmp_path)
  assert cfg.sliding_windows == ()
  assert cfg.num_kv_heads == 8  # transformers' MistralConfig default.
  del config["sliding_window"]  # transformers' default: 4096.
  (tmp_path / "config.json").write_text(json.dumps(config))
  assert hf.read_llama_config(tmp_path).sliding_windows == (4096, 4096)


def test_unsupported_model_type_is_one_error_line(tmp_path, make_tiny_mind):
  root = make_tiny_mind(tmp_path / "tiny")
  gpt2 = tmp_path / "gpt2"
  transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                          bos_token_id=0, eos_token_id=0).save_pretrained(gpt2)
  result = subprocess.run(
      [sys.executable, str(ROOT / "run.py"), "--mode=train",
       "--config=configs/nrms.py", "--config.data.name=goodreads_genre",
       f"--config.data.path={root}", f"--config.data.data_dir={tmp_path}/d",
       "--config.data.num_negatives=1", "--config.data.history_len=4",
       "--config.model.item_encoder=lm", f"--config.model.lm.path={gpt2}",
       f"--workdir={tmp_path}/w"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert "unsupported model type 'gpt2'" in errors[0]
  for model_type in families.supported_model_types():
    assert model_type in errors[0]
  assert {"llama", "mistral", "qwen2", "qwen3"} <= set(
      families.supported_model_types())
  assert "Traceback" not in result.stderr


def test_chat_templates_are_found_and_rendered_as_transformers_does(
    tmp_path):
  role_tags = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}>"
               "{{ m.content }}|{% endfor %}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": {"content": "<s>"},
      "chat_template": [{"name": "tool_use", "template": "tools"},
                        {"name": "default", "template": role_tags}]}))
  render = local_provider.chat_renderer(tmp_path)
  assert render("S", "U") == "<s><system>S|<user>U|"
  # chat_template.jinja (transformers' newer layout) comes first; a template
  # refusing system messages gets the system text in the user message.
  (tmp_path / "chat_template.jinja").write_text(
      "{% for m in messages %}{% if m.role == 'system' %}"
      "{{ raise_exception('no system role') }}{% endif %}[{{ m.content }}]"
      "{% endfor %}{% if add_generation_prompt %}>{% endif %}")
  assert local_provider.chat_renderer(tmp_path)("S", "U") == "[S\n\nU]>"
  # Loop controls, an unescaped tojson and strftime_now, as transformers.
  (tmp_path / "chat_template.jinja").write_text(
      "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
      "{{ m | tojson }}{% endfor %}{{ strftime_now('%Y') | length }}")
  assert local_provider.chat_renderer(tmp_path)("S<&>", "U") == (
      '{"role": "system", "content": "S<&>"}4')
