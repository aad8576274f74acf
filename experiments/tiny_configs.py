"""Presets shrunk to seconds on a CPU: the shape tests and the local
experiment checks (multiprocess_check.py) train on."""

from __future__ import annotations


def shrink(config, data_dir, **train_overrides):
  """A tiny version of a preset, so a run takes seconds on a CPU."""
  config.data.data_dir = str(data_dir)
  config.data.synthetic.num_users = 150
  config.data.synthetic.num_items = 200
  config.data.synthetic.num_topics = 4
  config.data.history_len = 10
  for field in config.data.max_len:
    config.data.max_len[field] = min(config.data.max_len[field], 8)
  config.model.embed_dim = 16
  config.model.hidden_dim = 16
  config.model.num_heads = 2
  config.model.attention_dim = 8
  config.model.cnn.num_filters = 16
  config.model.transformer.mlp_dim = 32
  config.model.poly.num_interests = 4
  config.model.poly.code_dim = 8
  config.model.mlp.hidden = (16,)
  config.model.dcn.hidden = (16,)
  config.train.batch_size = 16
  config.train.epochs = 1
  config.train.log_every = 1000
  config.train.warmup_steps = 2
  config.eval.batch_size = 32
  for key, value in train_overrides.items():
    config.train[key] = value
  return config
