"""End-to-end behaviour of training, evaluation, resume and recommend.

Everything runs on a tiny synthetic dataset on CPU through the public entry
points (train_and_evaluate, run.py).
"""

import glob
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from genre_jax import checkpoint as ckpt_lib
from genre_jax import data as data_lib
from genre_jax import logs
from genre_jax import train
from genre_jax import workdir as workdir_lib
from genre_jax.config import load_preset
from genre_jax.errors import ConfigError
from tests.helpers import leave_temporary, shrink

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """One short NRMS run shared by the eval/recommend/resume tests."""
  workdir = tmp_path_factory.mktemp("run") / "nrms"
  config = shrink(load_preset("nrms"), data_dir, max_steps=6,
                  checkpoint_every=3)
  summary = train.train_and_evaluate(config, str(workdir))
  return config, str(workdir), summary


PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                 if not p.stem.startswith(("bert", "llama", "mlm")))


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_and_trains(preset, data_dir, tmp_path):
  config = shrink(load_preset(preset), data_dir, max_steps=2)
  summary = train.train_and_evaluate(config, str(tmp_path / preset))
  for split in ("dev", "test"):
    for key in ("auc", "mrr", "ndcg5", "ndcg10"):
      assert np.isfinite(summary[split]["all"][key]), (preset, split, key)
  assert summary["steps"] == 2


def test_summary_and_metrics_file(trained):
  _, workdir, summary = trained
  records = workdir_lib.read_metrics(workdir)
  assert records and records[-1]["step"] == 6
  assert {"auc", "mrr", "ndcg5", "ndcg10", "cold"} <= set(records[-1])
  assert summary["test"]["all"]["num_impressions"] > 0
  assert 0.0 <= summary["test"]["cold"]["auc"] <= 1.0
  assert "oracle" in summary and summary["oracle"]["test"]["auc"] > 0.6
  assert json.loads(pathlib.Path(workdir, "config.json").read_text())


@pytest.mark.slow
def test_train_step_compiles_once_with_padded_last_batch(data_dir, tmp_path,
                                                         monkeypatch):
  from genre_jax.train import step as step_lib

  traces = []
  original = step_lib.compute_loss

  def counting(*args, **kwargs):
    traces.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(step_lib, "compute_loss", counting)
  config = shrink(load_preset("nrms"), data_dir)
  dataset = data_lib.load_dataset(config.data)
  num_samples = int(dataset.splits["train"].cand_labels.sum())
  # A batch size that leaves a partial last batch.
  batch_size = next(b for b in (48, 40, 56, 36, 44) if num_samples % b)
  config.train.batch_size = batch_size
  summary = train.train_and_evaluate(config, str(tmp_path / "w"),
                                     dataset=dataset)
  # Every batch was trained on, the last one padded, with one compilation.
  assert summary["steps"] == -(-num_samples // batch_size)
  assert len(traces) == 1


def _final_params(workdir, which="latest"):
  checkpoints = ckpt_lib.Checkpoints(workdir)
  try:
    params, progress = checkpoints.restore_saved(getattr(checkpoints, which))
  finally:
    checkpoints.close()
  return progress["step"], params


@pytest.mark.slow
def test_interrupt_and_resume_matches_uninterrupted_run(data_dir, tmp_path):
  def config():
    return shrink(load_preset("nrms"), data_dir, max_steps=8,
                  checkpoint_every=3)

  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config(), straight)

  class Crash(Exception):
    pass

  def crash_at_five(step):
    if step == 5:
      raise Crash()

  resumed = str(tmp_path / "resumed")
  with pytest.raises(Crash):
    train.train_and_evaluate(config(), resumed, step_callback=crash_at_five)
  steps_seen = []
  train.train_and_evaluate(config(), resumed, step_callback=steps_seen.append)
  assert steps_seen[0] == 4, "must resume after the step-3 checkpoint"
  step_a, params_a = _final_params(straight)
  step_b, params_b = _final_params(resumed)
  assert step_a == step_b == 8
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_half_written_checkpoint_is_never_restored(trained):
  config, workdir, _ = trained
  latest = pathlib.Path(workdir, "checkpoints", "latest")
  good = ckpt_lib.Checkpoints(workdir)
  good_step = good.latest.latest_step()
  good.close()
  # What a process killed in the middle of saving step 999 leaves behind.
  partial = latest / "999.orbax-checkpoint-tmp-1234567"
  (partial / "params").mkdir(parents=True)
  (partial / "params" / "garbage").write_bytes(b"\x00" * 10)
  checkpoints = ckpt_lib.Checkpoints(workdir)
  try:
    assert checkpoints.latest.latest_step() == good_step
  finally:
    checkpoints.close()


def test_init_from_starts_from_best_weights(trained, tmp_path):
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.train.max_steps = 1
  config.train.lr = 1e-12  # the one step moves no weight measurably
  new = str(tmp_path / "finetune")
  summary = train.train_and_evaluate(config, new, init_from=workdir)
  assert summary["steps"] == 1
  # The new run holds the old run's best weights, not a fresh init (which
  # six steps at lr 1e-3 left far more than 1e-9 away from them).
  _, best = _final_params(workdir, "best")
  _, got = _final_params(new, "best")
  for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-9)
  with pytest.raises(Exception, match="no best checkpoint"):
    train.train_and_evaluate(config, str(tmp_path / "x"),
                             init_from=str(tmp_path / "nothing"))


@pytest.mark.slow
def test_checkpoint_of_another_model_is_a_clear_error(trained, tmp_path):
  """eval, init_from and resume name every parameter that does not fit."""
  config, workdir, _ = trained
  # eval of a workdir whose config.json no longer matches its checkpoint.
  other = tmp_path / "edited"
  subprocess.run(["cp", "-r", workdir, str(other)], check=True)
  saved = json.loads((other / "config.json").read_text())
  saved["model"]["embed_dim"] = 24
  (other / "config.json").write_text(json.dumps(saved))
  result = _run("--mode=eval", f"--workdir={other}", "--split=test")
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "does not fit this model" in result.stderr
  assert "shape differs (saved -> model)" in result.stderr
  assert "-> [24" in result.stderr or ", 24]" in result.stderr

  # init_from a run of another item encoder.
  wider = config.copy_and_resolve_references()
  wider.model.item_encoder = "cnn"
  with pytest.raises(Exception, match="in the checkpoint only"):
    train.train_and_evaluate(wider, str(tmp_path / "cnn"), init_from=workdir)

  # Resume from a checkpoint whose word table is named as before 0944cdf.
  checkpoints = ckpt_lib.Checkpoints(workdir)
  try:
    params, _ = checkpoints.restore_saved(checkpoints.latest)
  finally:
    checkpoints.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          params)
  keys = next([k.key for k in p] for p, _ in
              jax.tree_util.tree_flatten_with_path(params)[0]
              if any(k.key == "word_table" for k in p))
  node = params
  for key in keys[:keys.index("word_table")]:
    node = node[key]
  node["table"] = node.pop("word_table")
  old = ckpt_lib.Checkpoints(str(tmp_path / "old"))
  try:
    old.save(old.latest, {"params": params, "opt": {}, "step": 0}, {})
    with pytest.raises(Exception) as error:
      old.restore({"params": abstract, "opt": {}, "step": None})
  finally:
    old.close()
  message = str(error.value)
  assert "not in the checkpoint (1): item_encoder/embed/word_table" in message
  assert "in the checkpoint only (1): item_encoder/embed/table" in message
  assert "'word_table' since 0944cdf" in message


def _run(*args, env=None):
  return subprocess.run([sys.executable, str(ROOT / "run.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, env=env,
                        timeout=600)


@pytest.mark.slow
def test_eval_mode_prints_table_and_json(trained):
  _, workdir, summary = trained
  result = _run("--mode=eval", f"--workdir={workdir}", "--split=test")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(metrics) == {"auc", "mrr", "ndcg5", "ndcg10", "num_impressions"}
  np.testing.assert_allclose(metrics["auc"], summary["test"]["all"]["auc"],
                             rtol=1e-5)


@pytest.mark.slow
def test_eval_file_with_unseen_users(trained, tmp_path):
  config, workdir, _ = trained
  source = glob.glob(os.path.join(config.data.data_dir, "**", "test",
                                  "behaviors.tsv"), recursive=True)
  assert source, "synthetic source files not found under the data dir"
  rows = pathlib.Path(source[0]).read_text().splitlines()[:20]
  renamed = ["\t".join([f"x{i}", f"NEWUSER{i}"] + r.split("\t")[2:])
             for i, r in enumerate(rows)]
  path = tmp_path / "behaviors.tsv"
  path.write_text("\n".join(renamed) + "\n")
  result = _run("--mode=eval", f"--workdir={workdir}", f"--eval_file={path}")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads(result.stdout.strip().splitlines()[-1])
  assert metrics["num_impressions"] > 0
  # The file's whole name heads its rows, apart from the next column.
  assert re.search(r"^behaviors\.tsv +all ", result.stdout, re.M), result.stdout
  assert re.search(r"^behaviors\.tsv +cold ", result.stdout, re.M)


@pytest.mark.slow
def test_recommend_known_and_unknown_users(trained, tmp_path):
  config, workdir, _ = trained
  dataset = data_lib.load_dataset(config.data)
  known = str(dataset.splits["test"].user_ids[0])
  out = tmp_path / "recs.jsonl"
  result = _run("--mode=recommend", f"--workdir={workdir}",
                f"--user_ids={known},NO_SUCH_USER", "--top_k=5", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "NO_SUCH_USER" in result.stderr
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert [l["user_id"] for l in lines] == [known]
  items = lines[0]["items"]
  assert len(items) == 5
  scores = [i["score"] for i in items]
  assert scores == sorted(scores, reverse=True)
  test = dataset.splits["test"]
  row = list(test.user_ids).index(known)
  history = {dataset.items.ids[j] for j in test.history_items[
      test.history_offsets[row]:test.history_offsets[row + 1]]}
  assert not history & {i["item_id"] for i in items}


@pytest.mark.slow
def test_bad_recommend_or_eval_input_keeps_earlier_results(trained, tmp_path):
  # Each is one line naming the input, and no earlier output is overwritten.
  _, workdir, _ = trained
  out = tmp_path / "recs.jsonl"
  out.write_text("earlier results\n")
  empty = tmp_path / "empty.tsv"
  empty.write_text("")
  missing = tmp_path / "missing.tsv"
  for args, expected in [
      (["--user_ids=NO_SUCH_USER"],
       "error: no user to recommend for: none of the user ids "
       "['NO_SUCH_USER'] has a history in the dataset"),
      (["--user_ids=NO_SUCH_USER", "--top_k=0"],
       "error: flag --top_k=0: 0 is not a positive integer"),
      ([f"--behaviors_file={missing}"],
       f"error: behaviors file {missing}: no such file"),
      ([f"--behaviors_file={empty}"],
       f"error: no user to recommend for: behaviors file {empty} has no rows"),
  ]:
    result = _run("--mode=recommend", f"--workdir={workdir}", f"--out={out}",
                  *args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
  assert out.read_text() == "earlier results\n"
  result = _run("--mode=eval", f"--workdir={workdir}", f"--eval_file={missing}")
  assert result.returncode == 2
  assert f"error: --eval_file={missing}: no such file" in result.stderr


@pytest.mark.slow
def test_eval_of_a_run_with_no_checkpoint_yet(trained, tmp_path):
  # A run stopped before its first checkpoint: one line, and no traceback
  # from Orbax's clean-up thread at exit (it used to print one, by chance).
  _, workdir, _ = trained
  early = tmp_path / "early"
  early.mkdir()
  (early / "config.json").write_text(
      (pathlib.Path(workdir) / "config.json").read_text())
  for _ in range(2):
    result = _run("--mode=eval", f"--workdir={early}")
    assert result.returncode == 2
    assert f"error: {early}: no best checkpoint" in result.stderr
    assert "Traceback" not in result.stderr

_LOSS_SCRIPT = r"""
import json, sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from genre_jax import data as data_lib, train
from genre_jax.config import load_preset
from tests.helpers import shrink
config = shrink(load_preset("nrms"), {data_dir!r})
config.model.dropout = 0.0
dataset = data_lib.load_dataset(config.data)
mesh = train.make_mesh()
host_items, spec = train.model_inputs(config, dataset)
parts, state = train.init_model(config, spec, total_steps=10)
from genre_jax.data import batching
batcher = batching.TrainBatcher(dataset.splits["train"], dataset.items,
    batch_size=16, history_len=10, num_negatives=4, seed=0)
rep = jax.sharding.NamedSharding(mesh, train.P())
dat = jax.sharding.NamedSharding(mesh, train.P("data"))
items = jax.device_put(host_items, rep)
state = jax.device_put(state, rep)
batches = [b for _, b in zip(range(3), batcher.epoch(0))]
shapes = {{k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}}
step = train.compile_train_step(parts, state, shapes, items, mesh, 0)
losses = []
for b in batches:
  state, m = step(state, train.to_global(b, dat), items)
  losses.append(float(m["loss"]))
print(json.dumps({{"devices": jax.device_count(), "losses": losses}}))
"""


@pytest.mark.slow
def test_two_devices_give_the_same_loss_as_one(data_dir):
  # Prepare the dataset once in this process so both children only read it.
  data_lib.load_dataset(shrink(load_preset("nrms"), data_dir).data)
  script = _LOSS_SCRIPT.format(root=str(ROOT), data_dir=str(data_dir))
  results = {}
  for count in (1, 2):
    env = dict(os.environ,
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
               f" --xla_force_host_platform_device_count={count}",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results[count] = json.loads(out.stdout.strip().splitlines()[-1])
  assert results[2]["devices"] == 2
  np.testing.assert_allclose(results[1]["losses"], results[2]["losses"],
                             rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_pure_bfloat16_trains_with_bfloat16_weights_and_moments(data_dir):
  config = shrink(load_preset("nrms"), data_dir)
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  dataset = data_lib.load_dataset(config.data)
  host_items, spec = train.model_inputs(config, dataset)
  parts, state = train.init_model(config, spec, total_steps=10)
  floats = [x for x in jax.tree.leaves(state) if x.dtype.kind == "f" or
            x.dtype == jax.numpy.bfloat16]
  assert floats and all(x.dtype == jax.numpy.bfloat16 for x in floats)
  from genre_jax.data import batching
  batcher = batching.TrainBatcher(dataset.splits["train"], dataset.items,
                                  batch_size=16, history_len=10,
                                  num_negatives=4, seed=0)
  batch = next(batcher.epoch(0))
  mesh = train.make_mesh()
  items = jax.device_put(host_items)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  step = train.compile_train_step(parts, state, shapes, items, mesh, 0)
  dat = jax.sharding.NamedSharding(mesh, train.P("data"))
  new_state, metrics = step(state, train.to_global(batch, dat), items)
  assert np.isfinite(float(metrics["loss"]))
  assert jax.tree.leaves(new_state["params"])[0].dtype == jax.numpy.bfloat16


@pytest.mark.slow
def test_wandb_offline_logs_into_the_workdir(data_dir, tmp_path):
  config = shrink(load_preset("nrms"), data_dir, max_steps=2, log_every=1)
  workdir = tmp_path / "wb"
  train.train_and_evaluate(config, str(workdir), wandb_mode="offline")
  runs = list((workdir / "wandb").glob("offline-run-*"))
  assert len(runs) == 1
  assert list(runs[0].glob("*.wandb")), "no offline run file was written"
  with pytest.raises(Exception, match="wandb_mode"):
    train.train_and_evaluate(config, str(tmp_path / "x"), wandb_mode="cloud")


def test_config_of_an_older_workdir_gets_new_fields_defaults(tmp_path):
  saved = load_preset("naml").to_dict()
  del saved["model"]["attention"]  # a field added after this run
  saved["train"]["lr"] = 0.123
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = workdir_lib.load_config(str(tmp_path))
  assert config.model.attention == "auto"
  assert config.train.lr == 0.123
  assert config.model.item_encoder == "cnn"
  (tmp_path / "config.json").write_text("{\n  \"model\": [1,\n")
  with pytest.raises(Exception, match=r"config.json:\d+: not valid JSON"):
    workdir_lib.load_config(str(tmp_path))


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/no_such_preset.py"],
     "error: --config=configs/no_such_preset.py: no such file "),
    (["--config=BROKEN"], "error: --config=BROKEN: line 2: closing "
     "parenthesis '}' does not match"),
    (["--config=configs/nrms.py:bogus"],
     "unknown dataset argument 'bogus'"),
    (["--config=configs/nrms.py", "--config.train.batchsize=3"],
     "error: --config.train.batchsize: no field 'batchsize'; did you mean "
     "\"batch_size\""),
    (["--config=configs/nrms.py", "--generate.shceme=profiler"],
     "error: --generate.shceme: no field 'shceme'; did you mean \"scheme\""),
    (["--config=configs/nrms.py", "--config.train.batch_size=0",
      "--config.data.data_dir=DATA"],
     "error: config.train.batch_size=0: must be an integer >= 1"),
])
@pytest.mark.slow
def test_bad_config_is_one_line_naming_the_flag(args, expected, tmp_path):
  # A typo'd override, a missing or broken config file: one line that names
  # the flag, the file and line or the field; never ml_collections' traceback.
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(arg=None):\n  return {'a': (1,}\n")
  data = tmp_path / "data"
  args = [a.replace("BROKEN", str(broken)).replace("DATA", str(data))
          for a in args]
  result = _run(*args, f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2, result.stderr[-3000:]
  assert expected.replace("BROKEN", str(broken)) in result.stderr
  assert "Traceback" not in result.stderr
  # Sizes are checked before anything is prepared or written.
  assert not data.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, expected", [
    (["--mode=recommend", "--workdir=RUN", "--top_k=0"],
     "error: flag --top_k=0: 0 is not a positive integer"),
    (["--mode=eval"], "error: --mode=eval needs --workdir"),
    # The run's config.json decides: --config overrides were silently ignored.
    (["--mode=eval", "--workdir=RUN", "--config=configs/nrms.py",
      "--config.data.cold_threshold=50"],
     "error: --mode=eval uses the config the run in --workdir was trained "
     "with"),
    (["--mode=recommend", "--workdir=RUN", "--user_ids=U1",
      "--config=configs/nrms.py"], "error: --mode=recommend uses the config"),
])
def test_flag_and_usage_errors_come_before_loading_jax(args, expected,
                                                       tmp_path):
  # A typo is answered at once: JAX (seconds to import) is never loaded.
  from tests.helpers import LIST_IMPORTS, imported_modules
  result = _run(*[a.replace("RUN", str(tmp_path)) for a in args],
                env=LIST_IMPORTS)
  assert result.returncode == 2
  assert expected in result.stderr
  assert not imported_modules(result.stderr) & {"jax", "flax", "orbax"}


@pytest.mark.slow
def test_synthetic_sizes_below_its_limits_are_one_line(tmp_path):
  # synthetic.generate's ValueError used to come out as a traceback.
  result = _run("--config=configs/nrms.py",
                f"--config.data.data_dir={tmp_path / 'data'}",
                "--config.data.synthetic.num_items=120",
                f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2, result.stderr[-3000:]
  assert ("error: config.data.synthetic.num_items=120: the synthetic data "
          "needs at least 200") in result.stderr
  assert "Traceback" not in result.stderr


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
  # Every result file (metrics, recommendations, generations, demo data)
  # goes through atomic_write_text.
  path = tmp_path / "final_metrics.json"
  path.write_text("old\n")
  with pytest.raises(TypeError):
    workdir_lib.atomic_write_text(path, None)  # fails half-way
  assert path.read_text() == "old\n"
  assert [p.name for p in tmp_path.iterdir()] == ["final_metrics.json"]
  workdir_lib.atomic_write_text(path, "a\tb\r\nc\n")
  assert path.read_bytes() == b"a\tb\r\nc\n"  # written as given
  assert [p.name for p in tmp_path.iterdir()] == ["final_metrics.json"]
  # With the permissions any new file gets (the umask's), not owner-only:
  # colleagues on a shared machine can read the results.
  plain = tmp_path / "plain.txt"
  plain.write_text("")
  new = tmp_path / "new.json"
  workdir_lib.atomic_write_text(new, "{}")
  assert new.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_an_interrupt_just_after_the_rename_is_not_an_error(tmp_path,
                                                           monkeypatch):
  # Ctrl-C landing as os.replace returns: the file is complete and the
  # interrupt must reach the user, not a FileNotFoundError for the renamed
  # temporary (run.py reported it as "error: [Errno 2] ...", status 2).
  path = tmp_path / "metrics.json"
  replace = os.replace

  def replace_then_interrupt(src, dst):
    replace(src, dst)
    raise KeyboardInterrupt

  monkeypatch.setattr(workdir_lib.os, "replace", replace_then_interrupt)
  with pytest.raises(KeyboardInterrupt):
    workdir_lib.atomic_write_text(path, "new\n")
  assert path.read_text() == "new\n"
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
  dead = leave_temporary(tmp_path / "metrics.json")
  assert (tmp_path / dead).is_file()
  # Still being written (this process runs), another host's (a shared
  # folder), or not ours at all: kept.
  live = workdir_lib.temporary_path(tmp_path / "config.json")
  live.write_text("part")
  other_host = re.sub(r"\.[0-9a-f]{8}-", ".00000000-", dead)
  assert other_host != dead
  (tmp_path / other_host).write_text("part")
  (tmp_path / ".notes.tmp").write_text("mine")
  workdir_lib.atomic_write_text(tmp_path / "metrics.json", "[]")
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      [".notes.tmp", live.name, other_host, "metrics.json"])


@pytest.mark.slow
def test_resume_under_another_config_is_an_error_naming_the_fields(
    trained, tmp_path):
  # A checkpoint is never resumed (nor its metrics reported) under another
  # data or training config, and the rejected run leaves config.json as it
  # was, so that eval still reads the checkpoint's own config.
  config, workdir, _ = trained
  copy = tmp_path / "run"
  subprocess.run(["cp", "-r", workdir, str(copy)], check=True)
  saved = (copy / "config.json").read_text()
  other = config.copy_and_resolve_references()
  other.data.history_len = 7
  other.train.lr = 0.5
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(other, str(copy))
  message = str(error.value)
  assert "trained with another config" in message
  assert (f"(saved -> now: data.history_len: 10 -> 7; train.lr: "
          f"{config.train.lr!r} -> 0.5)") in message
  assert (copy / "config.json").read_text() == saved
  # Raising the step limit (and logging more often) extends the run.
  longer = config.copy_and_resolve_references()
  longer.train.max_steps = 7
  longer.train.log_every = 1
  summary = train.train_and_evaluate(longer, str(copy))
  assert summary["steps"] == 7
  assert json.loads((copy / "config.json").read_text())["train"][
      "max_steps"] == 7


@pytest.mark.slow
def test_diverged_training_stops_and_saves_nothing(data_dir, tmp_path,
                                                   monkeypatch):
  # lr 1e30: the loss is NaN from step 2. It is caught at once (not at the
  # next log step), before any checkpoint, evaluation or final metrics.
  config = shrink(load_preset("nrms"), data_dir, lr=1e30, warmup_steps=0,
                  max_steps=4, checkpoint_every=3)
  workdir = tmp_path / "diverged"
  with pytest.raises(FloatingPointError,
                     match="training diverged: loss is nan at step 2; lower "
                     r"config.train.lr \(now 1e\+30\)") as error:
    train.train_and_evaluate(config, str(workdir))
  assert isinstance(error.value, ConfigError)  # run.py: one line, no trace
  assert not ckpt_lib.has_checkpoint(str(workdir))
  assert not (workdir / "metrics.json").exists()
  assert not (workdir / "final_metrics.json").exists()

  # A model whose dev scores are not finite is never saved as the best one
  # nor reported, even when its loss looked fine.
  def nan_scores(self, params, behaviors, item_vecs=None):
    scores, labels, masks = original(self, params, behaviors, item_vecs)
    return np.full_like(scores, np.nan), labels, masks

  original = train.Evaluator.scores
  monkeypatch.setattr(train.Evaluator, "scores", nan_scores)
  config = shrink(load_preset("nrms"), data_dir, max_steps=2)
  workdir = tmp_path / "nan_scores"
  with pytest.raises(FloatingPointError,
                     match="scores dev candidates as NaN or infinite"):
    train.train_and_evaluate(config, str(workdir))
  checkpoints = ckpt_lib.Checkpoints(str(workdir))
  try:
    assert checkpoints.best.latest_step() is None
  finally:
    checkpoints.close()
  assert not (workdir / "final_metrics.json").exists()


@pytest.mark.slow
def test_eval_with_nothing_to_score_is_an_error_not_nan(trained, tmp_path):
  # No impression with metrics (empty file, unknown items only, one-class
  # impressions): one line naming the file and why, exit status 2, no
  # {"auc": NaN} (not JSON) on stdout.
  _, workdir, _ = trained
  cases = {
      "empty.tsv": ("", "the file has no rows"),
      "unknown.tsv": ("1\tU1\t\t\tNX-1 NY-0\n", "every candidate item of "
                      "its rows (1) is unknown"),
      "one_class.tsv": ("1\tU1\t\t\tN1-1 N2-1\n2\tU2\t\t\tN3-0\n",
                        "every impression (2) has only clicked or only "
                        "non-clicked candidates"),
  }
  for name, (text, why) in cases.items():
    path = tmp_path / name
    path.write_text(text)
    result = _run("--mode=eval", f"--workdir={workdir}",
                  f"--eval_file={path}")
    assert result.returncode == 2, (name, result.stderr[-3000:])
    assert (f"error: --eval_file={path}: no impression can be scored: "
            f"{why}") in result.stderr, name
    assert "Traceback" not in result.stderr
    assert "NaN" not in result.stdout


def test_final_json_lines_are_strict_json(capsys):
  # Undefined figures (e.g. cold-user AUC with no cold users) print as null
  # with a warning: NaN is not JSON. run.py and every script use json_line.
  line = logs.json_line({"auc": float("nan"),
                         "cold": {"auc": float("inf"), "n": 0}, "xs": [1.5]})
  assert json.loads(line) == {"auc": None, "cold": {"auc": None, "n": 0},
                              "xs": [1.5]}
  assert "NaN" not in line and "Infinity" not in line
  assert ("written as null: auc=nan, cold.auc=inf"
          in capsys.readouterr().err)


def test_files_of_a_run_without_cold_users_are_strict_json(data_dir,
                                                          tmp_path):
  # The cold-user figures of a split without cold users are undefined: NaN
  # in the summary Python gets back, null in the files (JSON has no NaN).
  config = shrink(load_preset("nrms"), data_dir, max_steps=2)
  config.data.cold_threshold = -1  # no impression has <= -1 history items
  workdir = tmp_path / "run"
  summary = train.train_and_evaluate(config, str(workdir))
  assert np.isnan(summary["test"]["cold"]["auc"])

  def reject(constant):
    raise AssertionError(f"{constant} written (not JSON)")

  final = json.loads((workdir / "final_metrics.json").read_text(),
                     parse_constant=reject)
  assert final["test"]["cold"]["auc"] is None
  assert final["test"]["all"]["auc"] == summary["test"]["all"]["auc"]
  (record,) = json.loads((workdir / "metrics.json").read_text(),
                         parse_constant=reject)
  assert record["cold"]["auc"] is None and record["auc"] > 0


def test_an_evaluation_replayed_after_a_crash_is_listed_once(tmp_path):
  # Killed between an evaluation and the next checkpoint, a run evaluates
  # that step again when resumed: the new record replaces the old one.
  workdir = str(tmp_path)
  workdir_lib.append_metrics(workdir, {"step": 5, "split": "dev", "auc": 0.6})
  workdir_lib.append_metrics(workdir, {"step": 5, "split": "test",
                                       "auc": 0.5})
  workdir_lib.append_metrics(workdir, {"step": 5, "split": "dev", "auc": 0.7})
  workdir_lib.append_metrics(workdir, {"step": 9, "split": "dev", "auc": 0.8})
  assert workdir_lib.read_metrics(workdir) == [
      {"step": 5, "split": "test", "auc": 0.5},
      {"step": 5, "split": "dev", "auc": 0.7},
      {"step": 9, "split": "dev", "auc": 0.8}]


def _clicked_or_seen(dataset, user_id):
  """Item ids in any history or clicked candidate of user_id, all splits."""
  seen = set()
  for behaviors in dataset.splits.values():
    for row in np.flatnonzero(behaviors.user_ids == user_id):
      h0, h1 = behaviors.history_offsets[row:row + 2]
      c0, c1 = behaviors.cand_offsets[row:row + 2]
      items = list(behaviors.history_items[h0:h1]) + list(
          behaviors.cand_items[c0:c1][behaviors.cand_labels[c0:c1] == 1])
      seen |= {dataset.items.ids[j] for j in items}
  return seen


def test_recommend_never_returns_items_the_user_clicked(trained, tmp_path):
  # Clicked candidates of any row (the leave-last-out test positive too)
  # are blocked, not only the latest row's history.
  from genre_jax import recommend

  config, workdir, _ = trained
  dataset = data_lib.load_dataset(config.data)
  users = sorted(set(dataset.splits["test"].user_ids))[:20]
  out = tmp_path / "recs.jsonl"
  recommend.recommend(workdir, str(out), user_ids=users, top_k=10_000)
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert [l["user_id"] for l in lines] == users
  for line in lines:
    seen = _clicked_or_seen(dataset, line["user_id"])
    assert seen, line["user_id"]
    assert not seen & {i["item_id"] for i in line["items"]}, line["user_id"]


@pytest.mark.slow
def test_recommend_file_needs_only_users_and_histories(trained, tmp_path):
  # Empty impressions column, all-unknown candidates: still served; a user
  # whose history ids are all unknown is reported, never silently dropped.
  config, workdir, _ = trained
  dataset = data_lib.load_dataset(config.data)
  ids = [str(i) for i in dataset.items.ids[1:4]]
  path = tmp_path / "requests.tsv"
  path.write_text(f"1\tNEW_A\t\t{ids[0]} {ids[1]}\t\n"
                  f"2\tNEW_B\t\t{ids[1]}\tNO_SUCH_ITEM-1\n"
                  f"3\tNEW_C\t\tNO_SUCH_ITEM NOR_THIS\t\n"
                  f"4\tNEW_D\t\t{ids[2]}\t{ids[0]}-1 {ids[1]}-0\n")
  out = tmp_path / "recs.jsonl"
  result = _run("--mode=recommend", f"--workdir={workdir}", "--top_k=5",
                f"--behaviors_file={path}", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["unserved_users"] == ["NEW_C"]
  assert (f"warning: user 'NEW_C' in {path}: none of its history item ids "
          "is in the item table; not served") in result.stderr
  lines = {l["user_id"]: l for l in map(json.loads,
                                         out.read_text().splitlines())}
  assert sorted(lines) == ["NEW_A", "NEW_B", "NEW_D"]
  assert all(len(l["items"]) == 5 for l in lines.values())
  # NEW_D's clicked candidate is blocked like its history.
  assert not {ids[0], ids[2]} & {i["item_id"] for i in lines["NEW_D"]["items"]}
  # Only unservable users: an error, not an empty output.
  only = tmp_path / "only_unknown.tsv"
  only.write_text("1\tNEW_C\t\tNO_SUCH_ITEM\t\n")
  result = _run("--mode=recommend", f"--workdir={workdir}",
                f"--behaviors_file={only}", f"--out={out}")
  assert result.returncode == 2, result.stderr[-3000:]
  assert "no user with a known history item" in result.stderr


def test_recommend_flags_short_lists_and_empty_histories(trained, tmp_path):
  # Fewer than top_k items and empty histories are marked, never silent;
  # ties (all scores equal without a history) are ordered by item row.
  from genre_jax import recommend

  config, workdir, _ = trained
  dataset = data_lib.load_dataset(config.data)
  index = dataset.items.index()
  known = str(dataset.splits["test"].user_ids[0])
  item = str(dataset.items.ids[1])
  path = tmp_path / "requests.tsv"
  path.write_text(f"1\tNEW_EMPTY\t\t\t{item}-0\n"
                  f"2\t{known}\t\t{item}\t{item}-0\n")
  out = tmp_path / "recs.jsonl"
  n = dataset.items.num_items
  summary = recommend.recommend(workdir, str(out), behaviors_file=str(path),
                                top_k=n + 5)
  lines = {l["user_id"]: l for l in map(json.loads,
                                         out.read_text().splitlines())}
  assert summary["num_fewer_than_k"] == 2
  assert summary["num_empty_history"] == 1
  assert all(l.get("fewer_than_k") is True for l in lines.values())
  assert lines["NEW_EMPTY"].get("empty_history") is True
  assert "empty_history" not in lines[known]
  for line in lines.values():
    keys = [(-i["score"], index[i["item_id"]]) for i in line["items"]]
    assert keys == sorted(keys), line["user_id"]
  # Deterministic and complete with a small top_k too: the head of the
  # full ranking above (every item sorted), not any 3 items sorted.
  full = lines
  summary = recommend.recommend(workdir, str(out), behaviors_file=str(path),
                                top_k=3)
  lines = {l["user_id"]: l for l in map(json.loads,
                                         out.read_text().splitlines())}
  assert summary["num_fewer_than_k"] == 0
  for user, line in lines.items():
    assert line["items"] == full[user]["items"][:3], user
  assert [index[i["item_id"]] for i in lines["NEW_EMPTY"]["items"]] == [1, 2, 3]
  assert "fewer_than_k" not in lines[known]


@pytest.mark.slow
def test_early_stopping_keeps_and_reports_the_best_dev_checkpoint(
    data_dir, tmp_path, monkeypatch):
  # Dev AUC scripted per epoch: best after epoch 1, then two evaluations
  # without a gain, so patience 2 stops training after epoch 3 of 6; the
  # final metrics come from the best checkpoint, not the last weights.
  scripted = iter([0.60, 0.70, 0.65, 0.69, 0.99, 0.99])
  real_evaluate = train.Evaluator.evaluate

  def evaluate(self, params, behaviors, item_vecs=None):
    result = real_evaluate(self, params, behaviors, item_vecs)
    if item_vecs is None:  # the dev evaluation that ends each epoch
      result["all"]["auc"] = next(scripted)
    return result

  monkeypatch.setattr(train.Evaluator, "evaluate", evaluate)
  config = shrink(load_preset("nrms"), data_dir, batch_size=64, epochs=6,
                  patience=2, checkpoint_every=0)
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(config, workdir)
  dev = [r for r in workdir_lib.read_metrics(workdir) if r["split"] == "dev"]
  assert [r["auc"] for r in dev] == [0.60, 0.70, 0.65, 0.69]
  steps_per_epoch = dev[0]["step"]
  assert [r["step"] for r in dev] == [steps_per_epoch * k
                                     for k in (1, 2, 3, 4)]
  assert summary["steps"] == 4 * steps_per_epoch
  assert summary["best_step"] == 2 * steps_per_epoch
  step_of_best, best = _final_params(workdir, "best")
  step_of_last, last = _final_params(workdir, "latest")
  assert (step_of_best, step_of_last) == (2 * steps_per_epoch,
                                          4 * steps_per_epoch)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(best), jax.tree.leaves(last)))
  # The reported test figures are the best checkpoint's: `--mode=eval`
  # (which restores it) gives the same numbers.
  result = _run("--mode=eval", f"--workdir={workdir}", "--split=test")
  assert result.returncode == 0, result.stderr[-3000:]
  reported = json.loads(result.stdout.strip().splitlines()[-1])
  for key in ("auc", "mrr", "ndcg5", "ndcg10"):
    assert reported[key] == pytest.approx(summary["test"]["all"][key],
                                          abs=1e-6), key
