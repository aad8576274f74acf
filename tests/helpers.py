"""Helpers shared by the test modules: tiny data, tiny configs, a tiny
Llama, a fake OpenAI-compatible server, subprocess probes. Fixtures stay
in conftest.py."""

from __future__ import annotations

import collections
import http.server
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import numpy as np

# The tiny random LMs: experiments/tiny_lms.py, which lm_parity.py
# --families builds its models with too (experiments/ is a namespace
# package beside tests/).
from experiments import tiny_configs
from experiments import tiny_lms
from genre_jax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]

CAUSAL_LM_CLASSES = tiny_lms.CAUSAL_LM_CLASSES
build_tiny_causal_lm = tiny_lms.build_tiny_causal_lm
build_tiny_opt = tiny_lms.build_tiny_opt
randomize_weights = tiny_lms.randomize_weights


def write_tsv(path: str | os.PathLike, rows: list[list[str]],
              newline: str = "\n") -> str:
  """Writes rows tab-separated (no quoting) and returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.write("".join("\t".join(r) + newline for r in rows))
  return str(path)


# behaviors.tsv rows per split: impression id, user, time, history, impressions.
TINY_BEHAVIORS = {
    "train": [
        ["1", "U1", "11/11/2019 9:05:58 AM", "N1 N2", "N3-1 N4-0 N5-0"],
        ["2", "U2", "", "", "N1-0 N3-1"],
        ["3", "U1", "", "N1 N2 N3", "N5-1 N4-0"],
    ],
    "dev": [
        ["4", "U3", "", "N4", "N1-1 N2-0"],
        ["5", "U2", "", "N1", "N2-0 N5-1"],
    ],
    "test": [
        ["6", "U1", "", "N1 N2 N3 N5", "N4-1 N2-0 N3-0"],
    ],
}


# Five items; the title of N3 holds quotes and its abstract a tab-free comma
# list, as real MIND rows do. Entity columns are raw JSON, kept unparsed.
TINY_NEWS = [
    ["N1", "sports", "golf", "Golf is back", "A round of golf.", "u1", "[]",
     "[]"],
    ["N2", "news", "politics", "Votes counted", "", "u2",
     '[{"Label": "Vote", "Type": "O"}]', "[]"],
    ["N3", "sports", "tennis", 'The "big" serve', "Aces, faults, lets.", "",
     "[]", "[]"],
    ["N4", "food", "", "Soup of the day", "Hot soup.", "", "[]", "[]"],
    ["N5", "news", "world", "Rain everywhere", "Wet.", "", "[]", "[]"],
]


def leave_temporary(path) -> str:
  """Has a process write a temporary for `path` and die before the rename,
  as a killed run would; returns the temporary's name."""
  script = ("import sys; from genre_jax import workdir; "
            "p = workdir.temporary_path(sys.argv[1]); p.write_text('part'); "
            "print(p.name)")
  result = subprocess.run([sys.executable, "-c", script, str(path)],
                          capture_output=True, text=True, cwd=ROOT,
                          check=True, timeout=120)
  return result.stdout.strip()


shrink = tiny_configs.shrink  # a preset shrunk to seconds on a CPU


def shrink_flags(data_dir, epochs: int = 1) -> list[str]:
  """run.py's --config.* flags for what `shrink` sets."""
  return [
      f"--config.data.data_dir={data_dir}",
      "--config.data.synthetic.num_users=150",
      "--config.data.synthetic.num_items=200",
      "--config.data.synthetic.num_topics=4", "--config.data.history_len=10",
      "--config.data.max_len.title=8", "--config.model.embed_dim=16",
      "--config.model.hidden_dim=16", "--config.model.num_heads=2",
      "--config.model.attention_dim=8", "--config.train.batch_size=16",
      f"--config.train.epochs={epochs}", "--config.train.warmup_steps=2",
      "--config.train.log_every=1000", "--config.eval.batch_size=32",
      "--demo_recommend_users=0"]


# Set in a subprocess's environment, Python lists every import on stderr.
LIST_IMPORTS = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}


def imported_modules(stderr: str) -> set[str]:
  """Modules a Python run with PYTHONPROFILEIMPORTTIME=1 imported."""
  return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
          if line.startswith("import time:") and "|" in line}


def build_tiny_llama(model_dir: pathlib.Path) -> pathlib.Path:
  """Saves a tiny random LlamaForCausalLM and a WordLevel tokenizer.json
  (experiments/tiny_lms.py, transformers' initialisation)."""
  return tiny_lms.build_tiny_causal_lm(model_dir, "llama")


class FakeServer:
  """Answers chat completions with "echo: <user text>", misbehaving on cue.

  The user text picks the behaviour: "500-once:..." and "429-once:..." fail
  the first request; "sleep-once:..." first sleeps past the client timeout;
  "broken:..." fails with 500 while `broken` is set; "trickle-once:..."
  first sends its reply 8 bytes every 0.1 s; "bad:..." (or a text
  holding one of `refuse`) is a 400; "slow:..." takes 0.1 s. Odd replies:
  "parts:..." has a list of content parts, "null-message:..." no message,
  "empty-once:..." empty content at first, "filtered:..." null content
  filtered by the endpoint, "surrogate:..." half a surrogate pair. Every
  request's user text (and model, temperature) is logged.
  """

  def __init__(self):
    self.log = []
    self.bodies = []
    self.auth = []
    self.refuse = ()
    self.broken = True
    self.lock = threading.Lock()
    self.seen = collections.Counter()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def log_message(self, *args):
        del args

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][1]["content"]
        with server.lock:
          server.log.append(user)
          server.bodies.append(body)
          server.auth.append(self.headers.get("Authorization"))
          server.seen[user] += 1
          first = server.seen[user] == 1
        try:
          self._answer(user, first)
        except (BrokenPipeError, ConnectionResetError):
          pass

      def _answer(self, user, first):
        kind = user.split(":", 1)[0]
        if kind == "sleep-once" and first:
          time.sleep(0.5)
        elif (kind == "500-once" and first) or (
            kind == "broken" and server.broken):
          return self._send(500, {"error": "boom"})
        elif kind == "429-once" and first:
          return self._send(429, {"error": "slow down"})
        elif kind == "bad" or any(s in user for s in server.refuse):
          return self._send(400, {"error": "bad request"})
        elif kind == "trickle-once" and first:
          return self._send(200, {"choices": [{"message": {
              "role": "assistant", "content": "late"}}]}, trickle=0.1)
        time.sleep(0.1 if kind == "slow" else 0.03)
        message = {"role": "assistant", "content": f"echo: {user}"}
        finish = "stop"
        if kind == "parts":
          message["content"] = [{"type": "text", "text": "echo: "},
                                {"type": "text", "text": user}]
        elif kind == "null-message":
          message = None
        elif kind == "empty-once" and first:
          message["content"] = ""
        elif kind == "filtered":
          message["content"], finish = None, "content_filter"
        elif kind == "surrogate":
          message["content"] = "echo: \ud83d cut"  # Sent as JSON "\ud83d".
        self._send(200, {"choices": [
            {"message": message, "finish_reason": finish}]})

      def _send(self, code, payload, trickle=0.0):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not trickle:
          return self.wfile.write(data)
        for start in range(0, len(data), 8):  # 8 bytes every `trickle` s.
          self.wfile.write(data[start:start + 8])
          self.wfile.flush()
          time.sleep(trickle)

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    self.thread = threading.Thread(target=self.httpd.serve_forever,
                                   daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def changed_leaves(before, after, prefix):
  """Which leaves under `prefix` (a path string) changed in training."""
  out = {}
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before),
                          jax.tree.leaves(after)):
    key = jax.tree_util.keystr(path)
    if prefix in key:
      out[key] = not np.array_equal(a, b)
  return out


def first_losses(config, dataset, steps=3):
  from genre_jax.data import batching

  mesh = train.make_mesh()
  host_items, spec = train.model_inputs(config, dataset)
  parts, state = train.init_model(config, spec, total_steps=20)
  rep = jax.sharding.NamedSharding(mesh, train.P())
  dat = jax.sharding.NamedSharding(mesh, train.P("data"))
  items = jax.device_put(host_items, rep)
  state = jax.device_put(state, rep)
  batcher = batching.TrainBatcher(
      dataset.splits["train"], dataset.items, batch_size=8, history_len=10,
      num_negatives=4, seed=0)
  batches = [b for _, b in zip(range(steps), batcher.epoch(0))]
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in batches[0].items()}
  initial = jax.tree.map(np.asarray, state["params"])
  step = train.compile_train_step(parts, state, shapes, items, mesh, 0)
  losses = []
  for b in batches:
    state, m = step(state, train.to_global(b, dat), items)
    losses.append(float(m["loss"]))
  return losses, initial, jax.tree.map(np.asarray, state["params"])


def run_lm_item_encoder(tmp_path: pathlib.Path, data_dir, preset: str,
                        model_dir, *flags: str) -> dict:
  """run.py --mode=train (two steps, tiny sizes, the synthetic data) with
  `model_dir` as the LM item encoder, then --mode=eval and --mode=recommend
  on its workdir; asserts each exits 0 and the recommendations agree with
  the ones training wrote. Returns the eval metrics (test split)."""
  workdir = tmp_path / "run"
  cache_dir = tmp_path / "lm_cache"

  def run_py(*args):
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), *args],
                            capture_output=True, text=True, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result

  run_py("--mode=train", f"--config={preset}", f"--workdir={workdir}",
         "--config.model.item_encoder=lm",
         f"--config.model.lm.path={model_dir}",
         f"--config.model.lm.cache_dir={cache_dir}",
         "--config.model.lm.max_len=12", "--config.model.lm.tune_from=1",
         "--config.model.lm.cache_dtype=float32",
         "--config.model.dtype=float32",
         f"--config.data.data_dir={data_dir}",
         "--config.data.synthetic.num_users=150",
         "--config.data.synthetic.num_items=200",
         "--config.data.synthetic.num_topics=4",
         "--config.data.history_len=10", "--config.model.embed_dim=16",
         "--config.model.hidden_dim=16", "--config.model.num_heads=2",
         "--config.model.attention_dim=8", "--config.train.batch_size=16",
         "--config.train.epochs=1", "--config.train.max_steps=2",
         "--config.train.warmup_steps=2", "--config.train.log_every=1000",
         "--config.eval.batch_size=32", "--demo_recommend_users=1",
         "--top_k=5", *flags)
  assert len(os.listdir(cache_dir)) == 1  # the frozen layer, cached
  evaluated = run_py("--mode=eval", f"--workdir={workdir}", "--split=test")
  metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
  assert metrics["num_impressions"] > 0 and np.isfinite(metrics["auc"])
  demo = json.loads((workdir / "recommendations.jsonl").read_text()
                    .splitlines()[0])
  out = tmp_path / "recs.jsonl"
  run_py("--mode=recommend", f"--workdir={workdir}",
         f"--user_ids={demo['user_id']}", "--top_k=5", f"--out={out}")
  recs = json.loads(out.read_text().splitlines()[0])
  assert recs["user_id"] == demo["user_id"]
  assert [i["item_id"] for i in recs["items"]] == [
      i["item_id"] for i in demo["items"]]
  return metrics


def small_lm_config(preset: str, data_dir, tmp_path, **lm):
  """A shrunk LM preset: its cache under tmp_path, 16 tokens per item, and
  the given config.model.lm fields."""
  from genre_jax.config import load_preset  # pylint: disable=g-import-not-at-top

  config = shrink(load_preset(preset), data_dir)
  config.model.lm.cache_dir = str(tmp_path / "lm_cache")
  config.model.lm.max_len = 16
  for key, value in lm.items():
    config.model.lm[key] = value
  return config
