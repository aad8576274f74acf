"""config.validate: every field of every preset checked, before any work."""

import pathlib

import pytest

from genre_jax import config as config_lib
from genre_jax import train  # registers every model part and dataset
from genre_jax.errors import ConfigError
from genre_jax.genre import generate

PRESETS = sorted(p.stem for p in (pathlib.Path(config_lib.PRESET_DIR)
                                  ).glob("*.py"))


@pytest.mark.parametrize("dataset", [None, "goodreads", "mind"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_valid_and_every_field_has_a_rule(preset, dataset):
  config = config_lib.load_preset(preset, dataset)
  train.validate_config(config)  # would name a field without a rule
  leaves = config_lib.leaves(config.to_dict())
  assert all(config_lib._rule_for(config_lib.CONFIG_RULES, key)  # pylint: disable=protected-access
             for key in leaves)


def test_generation_settings_are_valid_and_checked():
  settings = generate.generate_config()
  config_lib.validate(settings, rules=config_lib.GENERATE_RULES,
                      name="--generate")
  settings.openai.timeout = 0.0
  with pytest.raises(ConfigError, match=r"--generate\.openai\.timeout=0\.0: "
                     "must be a finite number > 0"):
    config_lib.validate(settings, rules=config_lib.GENERATE_RULES,
                        name="--generate")


def test_a_field_without_a_rule_is_refused():
  config = config_lib.load_preset("nrms")
  config.unlock()
  config.train.new_knob = 3
  with pytest.raises(ConfigError, match=r"config\.train\.new_knob: genre_jax "
                     "has no such setting"):
    config_lib.validate(config)


@pytest.mark.parametrize("field, good, bad, allowed", [
    ("data.num_negatives", 1, 0, "an integer >= 1"),
    ("data.cold_threshold", -1, -2, "an integer >= -1"),
    ("model.dropout", 0.0, 1.0, "a finite number >= 0 and < 1"),
    ("model.lm.lora.alpha", 1e-3, 0.0, "a finite number > 0"),
    ("train.lr", 1e-9, float("inf"), "a finite number > 0"),
    ("train.batch_size", 1, True, "an integer >= 1"),  # a bool is no count
    ("train.decay", "linear", "step", "one of cosine, linear, constant"),
    ("train.dedup_items", False, 0, "True or False"),
    ("pretrain.mask_rate", 1.0, 0.0, "a finite number > 0 and <= 1"),
    ("data.fields", ("title", "summary"), ("title", "title"),
     "a non-empty tuple of distinct values"),
    ("model.mlp.hidden", (8,), (), "a non-empty tuple"),
    ("model.user_encoder", "gru", "gruu", "one of additive, fastformer, gru"),
])
def test_each_bound_is_where_the_rule_says(field, good, bad, allowed):
  config = config_lib.load_preset("mlm_minilm" if field.startswith(
      "pretrain") else "nrms")
  section, name = field.rsplit(".", 1)
  node = config
  for part in section.split("."):
    node = node[part]
  with node.ignore_type():
    node[name] = good
    train.validate_config(config)
    node[name] = bad
    with pytest.raises(ConfigError) as error:
      train.validate_config(config)
  assert f"config.{field}={bad!r}: must be {allowed}" in str(error.value)


def test_fields_need_their_lengths():
  config = config_lib.load_preset("nrms")
  config.unlock()
  del config.data.max_len["summary"]
  config.data.fields = ("title", "summary")
  with pytest.raises(ConfigError, match=r"config\.data\.fields: no "
                     r"config\.data\.max_len for \['summary'\]"):
    config_lib.validate(config)
