"""`run.py --mode=generate` end to end with each provider, and the generated
file fed back into training as a GENRE augmentation."""

import json
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import FakeServer, LIST_IMPORTS, build_tiny_llama
from tests.helpers import imported_modules

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _generate(root, workdir, *flags, scheme="summarizer", env=None):
  cmd = [sys.executable, str(ROOT / "run.py"), "--mode=generate",
         "--config=configs/nrms.py", "--config.data.name=goodreads_genre",
         f"--config.data.path={root}",
         f"--config.data.data_dir={workdir}/data",
         f"--generate.scheme={scheme}", f"--workdir={workdir}", *flags]
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  out = pathlib.Path(summary["out_path"])
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  return summary, rows, result


@pytest.mark.slow
def test_replay_then_train_on_the_generations(tmp_path, make_tiny_mind):
  root = make_tiny_mind(tmp_path / "tiny")
  released = tmp_path / "released"
  released.mkdir()
  (released / "summarizer.jsonl").write_text("".join(
      json.dumps({"item_id": f"N{i}", "response": f"[description] book {i}"})
      + "\n" for i in range(1, 6)))
  summary, rows, result = _generate(
      root, tmp_path / "w", "--generate.provider=replay",
      f"--generate.replay.path={released}", env=LIST_IMPORTS)
  assert [r["item_id"] for r in rows] == ["N1", "N2", "N3", "N4", "N5"]
  # Replaying (like asking an endpoint) needs no JAX: none is loaded.
  modules = imported_modules(result.stderr)
  assert "genre_jax.genre.generate" in modules
  assert not modules & {"jax", "flax", "orbax", "genre_jax.train"}
  assert summary["statuses"] == {"ok": 5}
  assert "summarizer" in result.stdout  # the table
  # The written file is a generations source for training.
  train = subprocess.run(
      [sys.executable, str(ROOT / "run.py"), "--config=configs/nrms.py",
       "--config.data.name=goodreads_genre", f"--config.data.path={root}",
       f"--config.data.data_dir={tmp_path}/w/data",
       f"--config.data.genre.summarizer={summary['out_path']}",
       "--config.data.fields=('title','summary')",
       "--config.data.num_negatives=1", "--config.data.history_len=4",
       "--config.model.embed_dim=16", "--config.model.hidden_dim=16",
       "--config.model.num_heads=2", "--config.train.batch_size=2",
       "--config.eval.batch_size=2", "--config.train.epochs=1",
       "--demo_recommend_users=0", f"--workdir={tmp_path}/run"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  assert '"items_summarized": 5' in train.stderr


def test_openai_against_a_local_server(tmp_path, make_tiny_mind):
  root = make_tiny_mind(tmp_path / "tiny")
  server = FakeServer()
  try:
    summary, rows, _ = _generate(
        root, tmp_path / "w", "--generate.provider=openai",
        f"--generate.openai.base_url={server.url}",
        "--generate.openai.model=test", "--generate.openai.backoff=0.01",
        scheme="profiler")
    asked = len(server.log)
    # A re-run is served from the answer cache: nothing is asked again.
    again, rows_again, _ = _generate(
        root, tmp_path / "w", "--generate.provider=openai",
        f"--generate.openai.base_url={server.url}",
        "--generate.openai.model=test", scheme="profiler")
  finally:
    server.close()
  assert [r["user_id"] for r in rows] == ["U1", "U2", "U3"]
  assert all(r["response"].startswith("echo: ") for r in rows)
  assert asked == 3 and len(server.log) == 3
  assert again["provider_stats"]["cache_hits"] == 3
  assert rows_again == rows


@pytest.mark.slow
def test_local_llama(tmp_path, make_tiny_mind):
  root = make_tiny_mind(tmp_path / "tiny")
  model_dir = build_tiny_llama(tmp_path / "llama")
  summary, rows, _ = _generate(
      root, tmp_path / "w", "--generate.provider=local",
      f"--generate.local.model_dir={model_dir}",
      "--generate.local.max_new_tokens=5", "--generate.local.batch_size=2",
      scheme="generator")
  # Cold users with a history: every one is recorded, gibberish or not.
  assert [r["user_id"] for r in rows] == ["U1", "U2", "U3"]
  assert all(r["response"] for r in rows)
  assert summary["provider_stats"]["generated_tokens"] == 15


def test_unknown_provider_is_a_clear_error(tmp_path, make_tiny_mind):
  root = make_tiny_mind(tmp_path / "tiny")
  result = subprocess.run(
      [sys.executable, str(ROOT / "run.py"), "--mode=generate",
       "--config=configs/nrms.py", "--config.data.name=goodreads_genre",
       f"--config.data.path={root}", f"--config.data.data_dir={tmp_path}/d",
       "--generate.provider=replay", f"--workdir={tmp_path}/w"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 2
  assert "--generate.replay.path" in result.stderr


def test_openai_endpoint_down_is_a_clear_error_and_writes_nothing(
    tmp_path, make_tiny_mind):
  import socket  # pylint: disable=g-import-not-at-top
  root = make_tiny_mind(tmp_path / "tiny")
  with socket.socket() as s:  # A port nothing listens on.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  result = subprocess.run(
      [sys.executable, str(ROOT / "run.py"), "--mode=generate",
       "--config=configs/nrms.py", "--config.data.name=goodreads_genre",
       f"--config.data.path={root}", f"--config.data.data_dir={tmp_path}/d",
       "--generate.scheme=summarizer", "--generate.provider=openai",
       f"--generate.openai.base_url=http://127.0.0.1:{port}/v1",
       "--generate.openai.max_retries=1", "--generate.openai.backoff=0.01",
       "--generate.openai.give_up_after=3", f"--workdir={tmp_path}/w"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  assert ("error: openai: stopped asking after 3 prompts in a row got no "
          f"answer from http://127.0.0.1:{port}/v1/chat/completions"
          in result.stderr)
  assert "Connection refused" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "w" / "summarizer.jsonl").exists()
