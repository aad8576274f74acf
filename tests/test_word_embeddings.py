"""Pretrained and frozen word-embedding tables (config.model.word_embeddings).

The from-scratch item encoders (NRMS, NAML, Fastformer, ...) can read item
text through a pretrained token table, the real all-MiniLM-L6-v2 one or any
.npy matrix, and keep it fixed in training, as Legommenders does by default.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy
import tokenizers
from flax import nnx

from genre_jax import checkpoint as ckpt_lib
from genre_jax import data as data_lib
from genre_jax.errors import ConfigError
from genre_jax.lm import hf
from genre_jax.config import load_preset
from genre_jax.models import recommender
from tests.helpers import changed_leaves, first_losses, shrink


ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 30522  # the MiniLM tokenizer's, which the items are tokenized with


@pytest.fixture(scope="module")
def dataset(data_dir):
  return data_lib.load_dataset(shrink(load_preset("nrms"), data_dir).data)


def _minilm_table() -> np.ndarray:
  """The reference: the tensor as the safetensors library reads it."""
  weights = safetensors_numpy.load_file(
      os.path.join(hf.model_dir(), "model.safetensors"))
  return weights["embeddings.word_embeddings.weight"]


def _word_table(params) -> np.ndarray:
  [table] = [np.asarray(leaf) for path, leaf in
             jax.tree_util.tree_leaves_with_path(params)
             if "'word_table'" in jax.tree_util.keystr(path)]
  return table


def _config(preset, data_dir, init, frozen):
  config = shrink(load_preset(preset), data_dir)
  config.model.word_embeddings.init = init
  config.model.word_embeddings.frozen = frozen
  return config


def _tiny_run_flags(data_dir):
  """run.py flags: 4 steps of a 16-wide model on small synthetic data."""
  return [
      f"--config.data.data_dir={data_dir}",
      "--config.data.synthetic.num_users=150",
      "--config.data.synthetic.num_items=200", "--config.data.history_len=10",
      "--config.model.embed_dim=16", "--config.model.hidden_dim=16",
      "--config.model.num_heads=2", "--config.train.batch_size=16",
      "--config.train.max_steps=4", "--config.train.warmup_steps=2",
  ]


@pytest.mark.slow
def test_run_py_trains_nrms_on_frozen_minilm_token_embeddings(data_dir,
                                                              tmp_path):
  workdir = tmp_path / "run"
  config_flags = [
      "--config=configs/nrms.py", *_tiny_run_flags(data_dir),
      "--config.model.word_embeddings.init=lm",
      "--config.model.word_embeddings.frozen=True"]
  result = subprocess.run(
      [sys.executable, str(ROOT / "run.py"), f"--workdir={workdir}",
       *config_flags], capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  # The checkpoint still holds MiniLM's table, untouched by 4 steps of Adam,
  # read through a trained 384 -> 16 projection.
  checkpoints = ckpt_lib.Checkpoints(str(workdir))
  params, _ = checkpoints.restore_saved(checkpoints.latest)
  np.testing.assert_array_equal(_word_table(params), _minilm_table())
  kernels = [leaf.shape for path, leaf in
             jax.tree_util.tree_leaves_with_path(params)
             if "'embed']['proj']['kernel'" in jax.tree_util.keystr(path)]
  assert kernels == [(384, 16)]
  evaluated = subprocess.run(
      [sys.executable, str(ROOT / "run.py"), "--mode=eval",
       f"--workdir={workdir}", "--split=test"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 0.0 <= json.loads(evaluated.stdout.strip().splitlines()[-1])[
      "auc"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_table_gets_no_update_and_the_rest_trains(
    data_dir, dataset, frozen):
  config = _config("nrms", data_dir, "lm", frozen)
  _, before, after = first_losses(config, dataset, steps=2)
  np.testing.assert_array_equal(_word_table(before), _minilm_table())
  table = changed_leaves(before, after, "'word_table'")
  rest = changed_leaves(before, after, "'item_encoder'")
  assert table and all(v == (not frozen) for v in table.values())
  assert any(v for k, v in rest.items() if "'word_table'" not in k)


def test_npy_table_of_another_width_is_projected(data_dir, dataset, tmp_path):
  matrix = np.random.default_rng(0).normal(size=(VOCAB, 12)).astype(
      np.float32)
  np.save(tmp_path / "table.npy", matrix)
  config = _config("naml", data_dir, str(tmp_path / "table.npy"), True)
  config.data.fields = ("title",)  # the dataset fixture's only field
  _, before, after = first_losses(config, dataset, steps=2)
  np.testing.assert_array_equal(_word_table(before), matrix)
  assert not any(changed_leaves(before, after, "'word_table'").values())
  assert any(changed_leaves(before, after, "'proj'").values())


def test_default_table_is_learnt_from_a_random_start(data_dir, dataset):
  config = shrink(load_preset("nrms"), data_dir)
  model = recommender.build_model(config, _spec(config, dataset), seed=0)
  table = _word_table(nnx.state(model, nnx.Param))
  assert table.shape == (VOCAB, config.model.embed_dim)
  _, before, after = first_losses(config, dataset, steps=2)
  assert any(changed_leaves(before, after, "'word_table'").values())


@pytest.mark.parametrize("init_std", [0.0, 1.0])
def test_random_table_starts_at_init_std(data_dir, dataset, init_std):
  # 0: Flax's default N(0, 1/embed_dim); 1.0: PyTorch's nn.Embedding N(0, 1).
  config = shrink(load_preset("naml"), data_dir)
  config.data.fields = ("title",)  # the dataset fixture's only field
  config.model.word_embeddings.init_std = init_std
  model = recommender.build_model(config, _spec(config, dataset), seed=0)
  table = _word_table(nnx.state(model, nnx.Param))
  want = init_std or config.model.embed_dim ** -0.5
  assert table.std() == pytest.approx(want, rel=0.02)
  assert abs(table.mean()) < 0.02 * want
  # Either way the table is learnt.
  _, before, after = first_losses(config, dataset, steps=2)
  assert any(changed_leaves(before, after, "'word_table'").values())


@pytest.mark.slow
def test_run_py_starts_the_table_at_init_std(data_dir, tmp_path):
  # The setting behind the Goodreads torch_init/ grid, through the entry
  # point: PyTorch's N(0, 1) start, not Flax's N(0, 1/16) for a 16-wide table.
  workdir = tmp_path / "run"
  config_flags = [
      "--config=configs/naml.py", *_tiny_run_flags(data_dir),
      "--config.model.word_embeddings.init_std=1.0"]
  result = subprocess.run(
      [sys.executable, str(ROOT / "run.py"), f"--workdir={workdir}",
       *config_flags], capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  checkpoints = ckpt_lib.Checkpoints(str(workdir))
  params, _ = checkpoints.restore_saved(checkpoints.latest)
  table = _word_table(params)
  assert table.shape == (VOCAB, 16)
  assert table.std() == pytest.approx(1.0, rel=0.02)
  evaluated = subprocess.run(
      [sys.executable, str(ROOT / "run.py"), "--mode=eval",
       f"--workdir={workdir}", "--split=test"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 0.0 <= json.loads(evaluated.stdout.strip().splitlines()[-1])[
      "auc"] <= 1.0
  # A bad value is one line naming the field, and the workdir stays empty.
  bad = subprocess.run(
      [sys.executable, str(ROOT / "run.py"), f"--workdir={tmp_path / 'bad'}",
       *config_flags[:-1], "--config.model.word_embeddings.init_std=-1"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert bad.returncode != 0
  assert ("config.model.word_embeddings.init_std=-1.0: must be a finite "
          "number >= 0") in bad.stderr
  assert "Traceback" not in bad.stderr
  assert not list((tmp_path / "bad").rglob("*"))  # no checkpoint, no state


def test_bad_init_std_is_a_clear_error(data_dir, dataset):
  config = _config("nrms", data_dir, "", False)
  config.model.word_embeddings.init_std = -1.0
  with pytest.raises(ConfigError, match=(
      r"config.model.word_embeddings.init_std=-1.0: must be >= 0")):
    _build(config, dataset)
  config = _config("nrms", data_dir, "lm", False)
  config.model.word_embeddings.init_std = 1.0
  with pytest.raises(ConfigError, match=(
      r"init_std=1.0 sets the start .*\.init='lm' fills it")):
    _build(config, dataset)


def _spec(config, dataset):
  from genre_jax import train

  return train.model_inputs(config, dataset)[1]


def _build(config, dataset):
  recommender.build_model(config, _spec(config, dataset), seed=0)


def test_bad_tables_are_clear_errors(data_dir, dataset, tmp_path):
  short = tmp_path / "short.npy"
  np.save(short, np.zeros((100, 8), np.float32))
  with pytest.raises(ConfigError, match=(
      f"config.model.word_embeddings.init: {short} has 100 rows but the "
      f"tokenizer of config.data.tokenizer has {VOCAB} tokens")):
    _build(_config("nrms", data_dir, str(short), True), dataset)
  flat = tmp_path / "flat.npy"
  np.save(flat, np.zeros(VOCAB, np.float32))
  with pytest.raises(ConfigError, match="not a float matrix"):
    _build(_config("nrms", data_dir, str(flat), True), dataset)
  broken = tmp_path / "broken.npy"
  broken.write_text("not numpy")
  with pytest.raises(ConfigError, match=f"cannot read {broken}"):
    _build(_config("nrms", data_dir, str(broken), True), dataset)
  with pytest.raises(ConfigError, match="'glove' is not 'lm'"):
    _build(_config("nrms", data_dir, "glove", True), dataset)


def test_lm_table_needs_the_lm_tokenizer(data_dir, dataset, tmp_path):
  # Another vocabulary: the MiniLM table's rows are not its token ids.
  other = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"[PAD]": 0, "[UNK]": 1, "book": 2}, unk_token="[UNK]"))
  other.save(str(tmp_path / "tokenizer.json"))
  config = _config("nrms", data_dir, "lm", True)
  config.data.tokenizer = str(tmp_path / "tokenizer.json")
  with pytest.raises(ConfigError, match=(
      "word_embeddings.init='lm' takes the token embeddings of .* another "
      "vocabulary")):
    _build(config, dataset)
  # The same vocabulary in another file is fine.
  same = tmp_path / "same"
  same.mkdir()
  data = json.loads(pathlib.Path(hf.model_dir(),
                                 "tokenizer.json").read_text())
  (same / "tokenizer.json").write_text(json.dumps(data, indent=1))
  config.data.tokenizer = str(same)
  _build(config, dataset)
