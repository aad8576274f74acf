"""Sharded safetensors checkpoints: shards load, and only files the model
directory names inside itself (an index naming `../x` or `/x` is refused;
the folder's own symlinks are followed, as the Hugging Face cache needs)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors import numpy as safetensors_np

from genre_jax.errors import DataFormatError
from genre_jax.lm import hf

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SHARDS = {
    "model-00001-of-00002.safetensors": {
        "embeddings.word_embeddings.weight":
            np.arange(12, dtype=np.float32).reshape(4, 3),
        "embeddings.position_ids": np.arange(5, dtype=np.int64)[None],
    },
    "model-00002-of-00002.safetensors": {
        "pooler.dense.bias": np.array([0.5, -1.25, 3.0], np.float16),
    },
}


def _sharded_dir(root: pathlib.Path, names: dict[str, str] | None = None
                 ) -> pathlib.Path:
  """Writes root/model with two shards and an index; `names` maps a shard's
  file name to the name the index gives it instead (the file stays put)."""
  model_dir = root / "model"
  model_dir.mkdir(parents=True)
  weight_map = {}
  for file_name, tensors in _SHARDS.items():
    safetensors_np.save_file(tensors, model_dir / file_name)
    for key in tensors:
      weight_map[key] = (names or {}).get(file_name, file_name)
  (model_dir / hf.WEIGHTS_INDEX_FILE).write_text(json.dumps(
      {"metadata": {"total_size": 0}, "weight_map": weight_map}))
  return model_dir


def _point_index_at(model_dir: pathlib.Path, name: str) -> None:
  """Makes the index list the second shard's tensor under file `name`."""
  index = model_dir / hf.WEIGHTS_INDEX_FILE
  content = json.loads(index.read_text())
  content["weight_map"]["pooler.dense.bias"] = name
  index.write_text(json.dumps(content))


def _outside_shard(root: pathlib.Path, name: str = "outside.safetensors"
                   ) -> pathlib.Path:
  """A valid shard outside the model directory, holding the second shard's
  tensor, so only the location check can refuse it."""
  path = root / name
  path.parent.mkdir(parents=True, exist_ok=True)
  safetensors_np.save_file(
      _SHARDS["model-00002-of-00002.safetensors"], path)
  return path


def _assert_reads_back(checkpoint: hf.Checkpoint) -> None:
  expected = {k: v for tensors in _SHARDS.values() for k, v in tensors.items()}
  assert checkpoint.keys() == sorted(expected)
  for key, value in expected.items():
    got = checkpoint.get(key)
    assert got.dtype == value.dtype and got.shape == value.shape, key
    np.testing.assert_array_equal(got, value)


def test_sharded_checkpoint_reads_back_exactly(tmp_path):
  model_dir = _sharded_dir(tmp_path)
  checkpoint = hf.Checkpoint(model_dir)
  assert checkpoint.path == model_dir / hf.WEIGHTS_INDEX_FILE
  assert checkpoint.file_of("pooler.dense.bias") == (
      model_dir / "model-00002-of-00002.safetensors")
  _assert_reads_back(checkpoint)


def test_shards_inside_the_folder_by_any_route_are_accepted(tmp_path):
  """Names that stay inside (a `..` that comes back, a subfolder, a symlink
  to a file inside) and a model directory reached through a symlink load."""
  model_dir = _sharded_dir(
      tmp_path, {"model-00001-of-00002.safetensors":
                 "sub/../model-00001-of-00002.safetensors"})
  (model_dir / "sub").mkdir()
  (model_dir / "sub" / "second.safetensors").symlink_to(
      model_dir / "model-00002-of-00002.safetensors")
  _point_index_at(model_dir, "sub/second.safetensors")
  _assert_reads_back(hf.Checkpoint(model_dir))
  link = tmp_path / "linked_model"
  link.symlink_to(model_dir, target_is_directory=True)
  _assert_reads_back(hf.Checkpoint(link))


def _refusal(model_dir: pathlib.Path, name: str) -> str:
  """The message expected when the index names shard `name`."""
  return (re.escape(f"{model_dir / hf.WEIGHTS_INDEX_FILE}: field "
                    f"'weight_map': 'pooler.dense.bias' names shard "
                    f"{name!r}; ") +
          "a shard must be a file inside the model directory")


@pytest.mark.parametrize("name", ["../outside.safetensors",
                                  "../model-evil/outside.safetensors",
                                  "sub/../../outside.safetensors"])
def test_shard_escaping_with_dotdot_is_refused(tmp_path, name):
  model_dir = _sharded_dir(tmp_path)
  (model_dir / "sub").mkdir()
  target = pathlib.Path(os.path.normpath(model_dir / name))
  _outside_shard(target.parent, target.name)
  _point_index_at(model_dir, name)
  with pytest.raises(DataFormatError, match=_refusal(model_dir, name)):
    hf.Checkpoint(model_dir)


def test_absolute_shard_path_is_refused(tmp_path):
  model_dir = _sharded_dir(tmp_path)
  name = str(_outside_shard(tmp_path / "elsewhere"))
  _point_index_at(model_dir, name)
  with pytest.raises(DataFormatError, match=_refusal(model_dir, name)):
    hf.Checkpoint(model_dir)


def test_absolute_path_into_the_folder_is_still_refused(tmp_path):
  """An index names shards relative to its folder; an absolute name is
  refused even where it happens to point inside."""
  model_dir = _sharded_dir(tmp_path)
  name = str(model_dir / "model-00002-of-00002.safetensors")
  _point_index_at(model_dir, name)
  with pytest.raises(DataFormatError, match=_refusal(model_dir, name)):
    hf.Checkpoint(model_dir)


def test_a_symlinked_shard_as_in_the_hugging_face_cache_loads(tmp_path):
  # snapshots/<hash>/model-0000x.safetensors -> ../../blobs/<sha>: the folder
  # itself links its shards elsewhere; the index only names files inside.
  model_dir = _sharded_dir(tmp_path)
  name = "model-00002-of-00002.safetensors"
  blobs = tmp_path / "blobs"
  blobs.mkdir()
  os.replace(model_dir / name, blobs / "0123abcd")
  (model_dir / name).symlink_to(blobs / "0123abcd")
  _assert_reads_back(hf.Checkpoint(model_dir))


def test_shard_name_with_a_nul_byte_is_refused(tmp_path):
  model_dir = _sharded_dir(tmp_path)
  name = "model-00002\x00.safetensors"
  _point_index_at(model_dir, name)
  with pytest.raises(DataFormatError, match=_refusal(model_dir, name)):
    hf.Checkpoint(model_dir)


def test_run_py_refuses_a_shard_outside_the_model_dir(tmp_path):
  """The whole CLI path: a BERT directory whose index names `../x` ends with
  one `error:` line naming the index and the shard, exit status 2."""
  source = pathlib.Path(hf.model_dir())
  model_dir = _sharded_dir(tmp_path)
  config = json.loads((source / hf.CONFIG_FILE).read_text())
  config.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64)
  (model_dir / hf.CONFIG_FILE).write_text(json.dumps(config))
  (model_dir / hf.TOKENIZER_FILE).write_bytes(
      (source / hf.TOKENIZER_FILE).read_bytes())
  name = "../outside.safetensors"
  _outside_shard(tmp_path)
  _point_index_at(model_dir, name)
  result = subprocess.run(
      [sys.executable, str(ROOT / "run.py"), "--config=configs/bert_nrms.py",
       f"--config.model.lm.path={model_dir}",
       f"--config.data.data_dir={tmp_path / 'data'}",
       "--config.data.synthetic.num_users=150",
       "--config.data.synthetic.num_items=200",
       f"--workdir={tmp_path / 'run'}"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert re.fullmatch("error: " + _refusal(model_dir, name), errors[0]), (
      errors[0])
  assert not (tmp_path / "run" / "checkpoints").exists()
