"""Item identity encoders: `id` (a learnt table) and `hybrid` (content + id)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genre_jax import data as data_lib
from genre_jax import train
from genre_jax.config import load_preset
from genre_jax.models import id_encoders
from tests.helpers import shrink


@pytest.fixture(scope="module")
def dataset(data_dir):
  return data_lib.load_dataset(shrink(load_preset("nrms_id"), data_dir).data)


def _encode(config, dataset, params=None, rows=None):
  host_items, spec = train.model_inputs(config, dataset)
  parts, state = train.init_model(config, spec, total_steps=10)
  model = nnx.merge(parts.eval_graphdef, params or state["params"],
                    parts.rest)
  rows = np.arange(1, dataset.items.num_items + 1) if rows is None else rows
  take = lambda table: {k: jnp.take(jnp.asarray(v), rows, axis=0)
                        for k, v in table.items()}
  return np.asarray(model.encode_items(take(host_items["tokens"]),
                                       take(host_items["masks"])))


def test_seen_items_are_those_of_the_train_split(dataset):
  config = load_preset("nrms_id")
  seen = id_encoders.identity_inputs(config, dataset)[
      id_encoders.SEEN_FIELD][:, 0]
  train_split = dataset.splits["train"]
  want = np.zeros(dataset.items.num_items + 1, bool)
  want[train_split.history_items] = True
  want[train_split.cand_items] = True
  np.testing.assert_array_equal(seen, want)
  assert seen.any()


@pytest.mark.parametrize("spectral_dim", [0, 8])
def test_hybrid_starts_as_its_content_model(data_dir, dataset, spectral_dim):
  hybrid = shrink(load_preset("nrms_id"), data_dir)
  hybrid.model.hybrid.spectral_dim = spectral_dim
  content = shrink(load_preset("nrms"), data_dir)
  content_params = train.init_model(
      content, train.model_inputs(content, dataset)[1], 10)[1]["params"]
  hybrid_params = train.init_model(
      hybrid, train.model_inputs(hybrid, dataset)[1], 10)[1]["params"]
  # Same seed, content built first: its weights are the plain model's.
  np.testing.assert_array_equal(
      np.asarray(content_params["item_encoder"]["pool"]["query"]["kernel"]
                 [...]),
      np.asarray(hybrid_params["item_encoder"]["content"]["pool"]["query"]
                 ["kernel"][...]))
  np.testing.assert_allclose(_encode(hybrid, dataset),
                             _encode(content, dataset), atol=1e-6)


def test_unseen_items_keep_their_content_vector_after_training(
    data_dir, dataset, tmp_path):
  config = shrink(load_preset("nrms_id"), data_dir, max_steps=6)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"),
                                     dataset=dataset)
  assert np.isfinite(summary["test"]["all"]["auc"])
  host_items, spec = train.model_inputs(config, dataset)
  _, state = train.init_model(config, spec, total_steps=10)
  params = train.restore_params_from(str(tmp_path / "run"), state["params"],
                                     which="latest")
  table = np.asarray(params["item_encoder"]["identity"]["table"]
                     ["embedding"][...])
  seen = host_items["tokens"][id_encoders.SEEN_FIELD][:, 0]
  assert np.abs(table[seen]).sum() > 0  # seen items learnt a vector
  # Unseen rows get no gradient (their vector is masked) and stay zero.
  np.testing.assert_array_equal(table[~seen], 0.0)


def test_id_encoder_trains(data_dir, dataset, tmp_path):
  config = shrink(load_preset("nrms"), data_dir, max_steps=4)
  config.model.item_encoder = "id"
  summary = train.train_and_evaluate(config, str(tmp_path / "run"),
                                     dataset=dataset)
  assert summary["steps"] == 4
  assert np.isfinite(summary["test"]["all"]["auc"])


def test_hybrid_of_a_hybrid_is_refused(data_dir, dataset):
  from genre_jax.errors import ConfigError

  config = shrink(load_preset("nrms_id"), data_dir)
  config.model.hybrid.content = "hybrid"
  with pytest.raises(ConfigError, match="model.hybrid.content"):
    train.model_inputs(config, dataset)


def test_metrics_of_impressions_whose_clicked_item_is_unseen(
    data_dir, dataset, tmp_path):
  config = shrink(load_preset("nrms"), data_dir, max_steps=2)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir, dataset=dataset)
  _, _, evaluator, params = train.load_for_inference(workdir, dataset=dataset)
  behaviors = dataset.splits["test"]
  clicked = behaviors.cand_items[behaviors.cand_labels > 0]
  hidden = np.unique(clicked)[::3]  # pretend training never showed these
  evaluator.popularity = np.array(dataset.items.popularity)
  evaluator.popularity[hidden] = 0
  result = evaluator.evaluate(params, behaviors)
  starts, counts = behaviors.cand_offsets[:-1], behaviors.num_candidates()
  want = sum(
      1 for s, c in zip(starts, counts)
      if np.isin(behaviors.cand_items[s:s + c][
          behaviors.cand_labels[s:s + c] > 0], hidden).any()
      and 0 < behaviors.cand_labels[s:s + c].sum() < c)
  assert result["unseen_items"]["num_impressions"] == want > 0


def test_spectral_features_are_the_train_splits_and_train_end_to_end(
    data_dir, dataset, tmp_path):
  # The id table plus a learnt map of each item's spectral co-occurrence
  # vector (data/cooccurrence.py, from the train split), through training,
  # evaluation and recommendation from the saved run.
  import json
  import subprocess
  import sys

  from genre_jax.data import cooccurrence
  from tests.helpers import ROOT, shrink_flags

  config = shrink(load_preset("nrms_id"), data_dir)
  config.model.hybrid.spectral_dim = 8
  host_items, _ = train.model_inputs(config, dataset)
  np.testing.assert_array_equal(
      host_items["tokens"][id_encoders.SPECTRAL_FIELD],
      cooccurrence.spectral_item_vectors(dataset.splits["train"],
                                         dataset.items.num_items, 8))
  workdir = tmp_path / "run"
  run = lambda *args: subprocess.run(
      [sys.executable, str(ROOT / "run.py"), *args], capture_output=True,
      text=True, cwd=ROOT, timeout=600)
  trained = run("--config=configs/nrms_id.py", *shrink_flags(data_dir),
                "--config.model.hybrid.spectral_dim=8",
                "--config.train.max_steps=6", f"--workdir={workdir}")
  assert trained.returncode == 0, trained.stderr[-3000:]
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert np.isfinite(final["test"]["all"]["auc"])
  _, state = train.init_model(config, train.model_inputs(config, dataset)[1],
                              total_steps=10)
  params = train.restore_params_from(str(workdir), state["params"],
                                     which="latest")
  kernel = np.asarray(params["item_encoder"]["identity"]["spectral"]
                      ["kernel"][...])
  assert kernel.shape == (8, config.model.hidden_dim) and np.abs(kernel).sum()
  evaluated = run("--mode=eval", f"--workdir={workdir}", "--split=test")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  # The features come back from their cache (same train split): the same
  # scores.
  assert "Spectral co-occurrence cache hit" in evaluated.stderr
  assert json.loads(evaluated.stdout.strip().splitlines()[-1])[
      "auc"] == pytest.approx(final["test"]["all"]["auc"], abs=1e-6)
  user = dataset.user_vocab[1]
  recommended = run("--mode=recommend", f"--workdir={workdir}",
                    f"--user_ids={user}")
  assert recommended.returncode == 0, recommended.stderr[-3000:]


def test_spectral_dim_without_an_identity_encoder_is_one_error_line(
    data_dir, tmp_path):
  import subprocess
  import sys

  from tests.helpers import ROOT, shrink_flags

  result = subprocess.run(
      [sys.executable, str(ROOT / "run.py"), "--config=configs/nrms.py",
       *shrink_flags(data_dir), "--config.model.hybrid.spectral_dim=8",
       f"--workdir={tmp_path / 'run'}"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert ("error: config.model.hybrid.spectral_dim=8: only the id and hybrid "
          "item encoders read it") in result.stderr
  assert "Traceback" not in result.stderr
