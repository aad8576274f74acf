"""FSDP: parameters and optimizer state split over the mesh's fsdp axis.

Run in subprocesses with fake CPU devices (the device count is fixed when
JAX starts): the same losses on 1 device and on 4 devices under every
(data, fsdp) mesh, each device holding ~1/4 of the sharded weights, and a
checkpoint of a sharded run resumed exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from genre_jax import data as data_lib
from genre_jax.config import load_preset
from tests.helpers import ROOT, shrink

_SCRIPT = r"""
import json, sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from genre_jax import data as data_lib, train
from genre_jax.config import load_preset
from genre_jax.data import batching
from genre_jax.train import mesh as mesh_lib
from tests.helpers import shrink

def config_for(data, fsdp):
  config = shrink(load_preset("nrms"), {data_dir!r})
  config.model.dropout = 0.0
  config.model.embed_dim = 64  # a word table of 30522 x 64: sharded
  config.mesh.data, config.mesh.fsdp = data, fsdp
  return config

out = {{"devices": jax.device_count(), "meshes": {{}}}}
for data, fsdp in {meshes!r}:
  config = config_for(data, fsdp)
  dataset = data_lib.load_dataset(config.data)
  mesh = mesh_lib.make_mesh(config)
  host_items, spec = train.model_inputs(config, dataset)
  parts, state = train.init_model(config, spec, total_steps=10)
  state = jax.device_put(state, mesh_lib.state_sharding(state, mesh))
  items = jax.device_put(host_items, jax.sharding.NamedSharding(mesh, train.P()))
  batcher = batching.TrainBatcher(dataset.splits["train"], dataset.items,
      batch_size=16, history_len=10, num_negatives=4, seed=0)
  batches = [b for _, b in zip(range(3), batcher.epoch(0))]
  shapes = {{k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in batches[0].items()}}
  step = train.compile_train_step(parts, state, shapes, items, mesh, 0)
  losses = []
  for b in batches:
    state, m = step(state, train.to_global(b, mesh_lib.batch_sharding(mesh)),
                    items)
    losses.append(float(m["loss"]))
  table = state["params"]["item_encoder"]["embed"]["word_table"][
      "embedding"][...]
  mu = jax.tree.leaves(state["opt"])
  big_mu = [x for x in mu if x.shape == table.shape][0]
  small = state["params"]["item_encoder"]["pool"]["query"]["kernel"][...]
  out["meshes"][f"{{data}}x{{fsdp}}"] = {{
      "losses": losses,
      "table": list(table.shape),
      "table_shard": list(table.addressable_shards[0].data.shape),
      "adam_shard": list(big_mu.addressable_shards[0].data.shape),
      "small_shard": list(small.addressable_shards[0].data.shape),
      "small": list(small.shape)}}
print(json.dumps(out))
"""


def _run(data_dir, devices: int, meshes) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             f" --xla_force_host_platform_device_count={devices}")
  script = _SCRIPT.format(root=str(ROOT), data_dir=str(data_dir),
                          meshes=list(meshes))
  done = subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=900,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sharded_losses_equal_one_device_and_weights_are_split(data_dir):
  config = shrink(load_preset("nrms"), data_dir)
  config.model.embed_dim = 64
  data_lib.load_dataset(config.data)  # prepared once, read by the children
  one = _run(data_dir, 1, [(1, 1)])["meshes"]["1x1"]
  four = _run(data_dir, 4, [(4, 1), (1, 4), (2, 2)])
  assert four["devices"] == 4
  for name, run in four["meshes"].items():
    np.testing.assert_allclose(run["losses"], one["losses"], rtol=1e-5,
                               atol=1e-6, err_msg=name)
  sharded = four["meshes"]["1x4"]
  # The word table and its Adam moments: a quarter on each device.
  assert np.prod(sharded["table_shard"]) * 4 == np.prod(sharded["table"])
  assert np.prod(sharded["adam_shard"]) * 4 == np.prod(sharded["table"])
  assert sharded["small_shard"] == sharded["small"]  # small: replicated
  assert four["meshes"]["4x1"]["table_shard"] == sharded["table"]
  assert np.prod(four["meshes"]["2x2"]["table_shard"]) * 2 == np.prod(
      sharded["table"])


_RESUME_SCRIPT = r"""
import contextlib, json, sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from genre_jax import checkpoint as ckpt_lib, train
from genre_jax.config import load_preset
from tests.helpers import shrink

class Crash(Exception):
  'A simulated crash after a given step.'

def crash_at_three(step):
  if step == 3:
    raise Crash()

def run(workdir, callback=None):
  config = shrink(load_preset("nrms"), {data_dir!r}, max_steps=5,
                  checkpoint_every=2)
  config.model.embed_dim = 64
  config.mesh.fsdp = 4
  return train.train_and_evaluate(config, workdir, step_callback=callback)

full = run({tmp!r} + "/full")
with contextlib.suppress(Crash):  # the kill asked for, after step 3
  run({tmp!r} + "/resumed", crash_at_three)
resumed = run({tmp!r} + "/resumed")  # from the sharded step-2 save
def params(workdir):
  checkpoints = ckpt_lib.Checkpoints(workdir)
  try:
    p, progress = checkpoints.restore_saved(checkpoints.latest)
  finally:
    checkpoints.close()
  return [np.asarray(x) for x in jax.tree.leaves(p)]
diff = max(float(np.max(np.abs(a - b))) for a, b in
           zip(params({tmp!r} + "/full"), params({tmp!r} + "/resumed")))
print(json.dumps({{"diff": diff, "auc": [full["test"]["all"]["auc"],
                                        resumed["test"]["all"]["auc"]]}}))
"""


@pytest.mark.slow
def test_a_sharded_run_resumes_exactly(data_dir, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             " --xla_force_host_platform_device_count=4")
  script = _RESUME_SCRIPT.format(root=str(ROOT), data_dir=str(data_dir),
                                 tmp=str(tmp_path))
  done = subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=900,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["diff"] <= 1e-6
  assert result["auc"][0] == pytest.approx(result["auc"][1], abs=1e-6)


def test_mesh_that_does_not_fit_the_devices_is_one_error():
  from genre_jax.errors import ConfigError
  from genre_jax.train import mesh as mesh_lib

  config = load_preset("nrms")
  config.mesh.fsdp = 3  # one CPU device here
  with pytest.raises(ConfigError, match="config.mesh"):
    mesh_lib.make_mesh(config)
