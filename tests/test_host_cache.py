"""model.lm.cache_on=host: the frozen-layer cache stays in host memory.

Each training batch carries the cache rows of its distinct items, and
evaluation gathers each chunk's rows on the host; the runs must match
cache_on=device exactly. Uses the real all-MiniLM-L6-v2 weights on the tiny
synthetic dataset.
"""

import jax
import numpy as np
import pytest

from genre_jax import train
from genre_jax.config import load_preset
from genre_jax.data import batching
from genre_jax.errors import ConfigError
from genre_jax.models import lm_encoder
from genre_jax.train import step as step_lib
from tests.helpers import shrink


def _config(data_dir, tmp_path, cache_on):
  config = shrink(load_preset("bert_nrms"), data_dir, max_steps=3,
                  log_every=1)
  config.model.lm.cache_dir = str(tmp_path / "lm_cache")
  config.model.lm.max_len = 16
  config.model.lm.tune_from = 5  # layer 5 runs on the cached layer-5 inputs
  config.model.lm.cache = True
  config.model.lm.cache_dtype = "float32"
  config.model.lm.cache_on = cache_on
  return config


def _run(config, workdir, monkeypatch):
  """(losses by step, summary, shapes of every array put on a device)."""
  placed = []
  device_put = jax.device_put

  def recording_put(x, *args, **kwargs):
    placed.extend(np.shape(leaf) for leaf in jax.tree.leaves(x))
    return device_put(x, *args, **kwargs)

  monkeypatch.setattr(jax, "device_put", recording_put)
  losses = {}
  summary = train.train_and_evaluate(
      config, str(workdir),
      loss_callback=lambda step, loss: losses.__setitem__(step, loss))
  monkeypatch.setattr(jax, "device_put", device_put)
  return losses, summary, placed


@pytest.mark.slow
def test_host_cache_trains_and_evaluates_as_the_device_cache(
    data_dir, tmp_path, monkeypatch):
  device_losses, device_summary, device_placed = _run(
      _config(data_dir, tmp_path, "device"), tmp_path / "device", monkeypatch)
  host_losses, host_summary, host_placed = _run(
      _config(data_dir, tmp_path, "host"), tmp_path / "host", monkeypatch)

  assert sorted(host_losses) == sorted(device_losses) == [1, 2, 3]
  np.testing.assert_allclose([host_losses[s] for s in (1, 2, 3)],
                             [device_losses[s] for s in (1, 2, 3)],
                             rtol=1e-6, atol=1e-6)
  for split in ("dev", "test"):
    assert host_summary[split]["all"]["num_impressions"] > 0
    for name, value in device_summary[split]["all"].items():
      np.testing.assert_allclose(host_summary[split]["all"][name], value,
                                 rtol=1e-6, atol=1e-6, err_msg=name)

  # The cache [N+1, L, D_lm] went to the devices whole only under "device";
  # under "host" no array put on a device is more than an eval chunk of it.
  config = _config(data_dir, tmp_path, "device")
  cache_shape = (config.data.synthetic.num_items + 1, 16, 384)
  assert cache_shape in device_placed
  assert cache_shape not in host_placed
  chunk = 4 * config.eval.batch_size
  assert all(not (len(s) == 3 and s[0] > chunk) for s in host_placed)
  assert (chunk, 16, 384) in host_placed  # evaluation's host-gathered rows


@pytest.mark.slow
def test_host_cache_is_the_tables_host_part_and_batches_carry_its_rows(
    data_dir, tmp_path):
  from genre_jax import data as data_lib

  config = _config(data_dir, tmp_path, "host")
  dataset = data_lib.load_dataset(config.data)
  table, spec = train.model_inputs(config, dataset)
  device, host = step_lib.split_item_table(table)
  assert spec.fields == (lm_encoder.HIDDEN_FIELD,)
  assert device == {"tokens": {}, "masks": {}}
  cache = host["tokens"][lm_encoder.HIDDEN_FIELD]
  assert isinstance(cache, np.memmap)  # read from disk, never copied whole

  batcher = batching.TrainBatcher(
      dataset.splits["train"], dataset.items, batch_size=8, history_len=10,
      num_negatives=4, seed=0, unique_items=128, host_items=host)
  batch = next(batcher.epoch(0))
  tokens, masks = batching.batch_host_rows(batch)
  ids = batch["item_ids"]
  np.testing.assert_array_equal(tokens[lm_encoder.HIDDEN_FIELD], cache[ids])
  np.testing.assert_array_equal(masks[lm_encoder.HIDDEN_FIELD],
                                host["masks"][lm_encoder.HIDDEN_FIELD][ids])
  # The same item table with cache_on=device: no host part.
  config.model.lm.cache_on = "device"
  assert step_lib.split_item_table(train.model_inputs(config, dataset)[0]
                                   )[1] is None


def test_host_cache_without_dedup_items_is_one_config_error(tmp_path):
  config = load_preset("bert_nrms")
  config.model.lm.cache_on = "host"
  config.train.dedup_items = False
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(error.value)
  assert "model.lm.cache_on" in message and "train.dedup_items" in message
  assert not (tmp_path / "run").exists()  # refused before anything was done
  config.model.lm.cache_on = "device"
  train.validate_config(config)  # the default placement needs no dedup
