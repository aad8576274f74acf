"""ONCE's item head (model.lm.pooling=attention) on the real MiniLM.

Checked against an independent reference (transformers' hidden states, the
head in numpy), and trained with frozen cached layers and with LoRA.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from genre_jax import data as data_lib
from genre_jax import train
from genre_jax.config import load_preset
from genre_jax.models import lm_encoder
from tests.helpers import changed_leaves, first_losses, shrink
from tests.helpers import small_lm_config


def _config(data_dir, tmp_path, **lm):
  return small_lm_config("once_nrms", data_dir, tmp_path, **lm)


@pytest.fixture(scope="module")
def dataset(data_dir):
  return data_lib.load_dataset(shrink(load_preset("once_nrms"), data_dir).data)


def test_head_matches_transformers_hidden_states_and_a_numpy_head(
    data_dir, tmp_path, dataset):
  config = _config(data_dir, tmp_path, tune_from=5, cache=False)
  inputs, spec = lm_encoder.item_inputs(config, dataset)
  encoder = lm_encoder.LMItemEncoder(config, spec, rngs=nnx.Rngs(0))
  encoder.eval()
  rows = np.arange(1, 9)
  ids = inputs["tokens"][lm_encoder.TEXT_FIELD][rows]  # [8, L]
  mask = inputs["masks"][lm_encoder.TEXT_FIELD][rows]
  ours = np.asarray(encoder({lm_encoder.TEXT_FIELD: ids},
                            {lm_encoder.TEXT_FIELD: mask}))  # [8, D]

  model = transformers.BertModel.from_pretrained(
      lm_encoder.lm_path(config)).eval()
  with torch.no_grad():
    hidden = model(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)
                   ).last_hidden_state.numpy().astype(np.float64)  # [8, L, H]
  w = lambda module, name: np.asarray(getattr(module, name)[...], np.float64)
  tokens = hidden @ w(encoder.projection, "kernel") + w(
      encoder.projection, "bias")  # [8, L, D]
  attention = encoder.attention
  scores = np.tanh(tokens @ w(attention.proj, "kernel") + w(
      attention.proj, "bias")) @ w(attention.query, "kernel")  # [8, L, 1]
  scores = np.where(mask, scores[..., 0], -np.inf)
  weights = np.exp(scores - scores.max(1, keepdims=True))
  weights /= weights.sum(1, keepdims=True)
  want = np.einsum("nl,nld->nd", weights, tokens)
  np.testing.assert_allclose(ours, want, atol=1e-4)


@pytest.mark.slow
def test_head_trains_on_the_unchanged_cache_with_the_top_layer_tuned(
    data_dir, tmp_path, dataset):
  mean = _config(data_dir, tmp_path, tune_from=5, pooling="mean")
  attention = _config(data_dir, tmp_path, tune_from=5)
  mean_inputs, _ = lm_encoder.item_inputs(mean, dataset)
  attention_inputs, _ = lm_encoder.item_inputs(attention, dataset)
  # The cache holds layer inputs, not head outputs: one file serves both.
  assert os.listdir(tmp_path / "lm_cache") and len(
      [f for f in os.listdir(tmp_path / "lm_cache")
       if f.endswith(".npy")]) == 1
  np.testing.assert_array_equal(
      mean_inputs["tokens"][lm_encoder.HIDDEN_FIELD],
      attention_inputs["tokens"][lm_encoder.HIDDEN_FIELD])

  losses, before, after = first_losses(attention, dataset, steps=2)
  assert all(np.isfinite(losses))
  lm = changed_leaves(before, after, "'lm'")
  assert any(v for k, v in lm.items() if "'layers'][5]" in k)
  assert not any(v for k, v in lm.items() if "'layers'][5]" not in k)
  head = changed_leaves(before, after, "'attention'")
  assert head and any(head.values())


@pytest.mark.slow
def test_head_with_lora_trains_adapters_and_head_only(data_dir, tmp_path,
                                                      dataset):
  config = _config(data_dir, tmp_path, tune_from=4)
  config.model.lm.lora.rank = 4
  _, before, after = first_losses(config, dataset, steps=2)
  lm = changed_leaves(before, after, "'lm'")
  assert any(v for k, v in lm.items() if "lora_" in k)
  assert not any(v for k, v in lm.items() if "lora_" not in k)
  assert any(changed_leaves(before, after, "'attention'").values())
  assert any(changed_leaves(before, after, "'projection'").values())


@pytest.mark.slow
def test_once_preset_trains_end_to_end(data_dir, tmp_path):
  config = _config(data_dir, tmp_path, tune_from=5)
  config.train.max_steps = 3
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["steps"] == 3
  assert np.isfinite(summary["test"]["all"]["auc"])
