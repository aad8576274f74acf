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

from genre_jax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SENTENCES = [
    "you recommend books to a reader",
    "books liked : the hobbit , dune , emma",
    "reply with a json object with title and description",
    "assistant : a new book about dragons and the sea",
]


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


# Set in a subprocess's environment, Python lists every import on stderr.
LIST_IMPORTS = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}


def imported_modules(stderr: str) -> set[str]:
  """Modules a Python run with PYTHONPROFILEIMPORTTIME=1 imported."""
  return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
          if line.startswith("import time:") and "|" in line}


def build_tiny_llama(model_dir: pathlib.Path) -> pathlib.Path:
  """Saves a tiny random LlamaForCausalLM and a WordLevel tokenizer.json."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      unk_token="<unk>"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  trainer = tokenizers.trainers.WordLevelTrainer(
      special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
  tokenizer.train_from_iterator(_SENTENCES, trainer)
  tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", 1)])
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=tokenizer.get_vocab_size(), hidden_size=32,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      intermediate_size=64,
      max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
      eos_token_id=2, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(model_dir, safe_serialization=True)
  tokenizer.save(str(model_dir / "tokenizer.json"))
  return model_dir


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


# transformers' config and causal-LM classes of the model types that
# build_tiny_causal_lm writes.
CAUSAL_LM_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def build_tiny_causal_lm(model_dir: pathlib.Path, model_type: str = "llama",
                         *, vocab_size: int = 128, special_tokens=(),
                         eos_token: str = "</s>", chat_template=None,
                         seed: int = 0, max_shard_size=None,
                         **config) -> pathlib.Path:
  """Saves a tiny random `model_type` causal LM (fp32 safetensors) with a
  WordLevel tokenizer.json of exactly `vocab_size` entries.

  The vocabulary is <pad> <s> </s> <unk>, then `special_tokens` (added as
  special tokens, e.g. chat markers), the words of _SENTENCES, and filler
  words w0, w1, ...; the tokenizer prepends <s>. The model has 2 layers,
  hidden size 32, 4 query and 2 key/value heads unless `config` says
  otherwise, and eos_token_id = `eos_token`'s id. With a `chat_template`,
  a tokenizer_config.json holding it is written too; with a
  `max_shard_size` (e.g. "20KB") the weights are sharded.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model_dir = pathlib.Path(model_dir)
  specials = ["<pad>", "<s>", "</s>", "<unk>", *special_tokens]
  words = list(dict.fromkeys(w for s in _SENTENCES for w in s.split()))
  vocab = {}
  for token in specials + words:
    vocab.setdefault(token, len(vocab))
  filler = 0
  while len(vocab) < vocab_size:
    vocab[f"w{filler}"] = len(vocab)
    filler += 1
  if len(vocab) > vocab_size:
    raise ValueError(f"vocab_size {vocab_size} < {len(vocab)} tokens")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      vocab=vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tokenizer.add_special_tokens(specials)
  tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", 1)])
  config_class, model_class = CAUSAL_LM_CLASSES[model_type]
  settings = dict(
      vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
      max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
      eos_token_id=vocab[eos_token], tie_word_embeddings=False)
  settings.update(config)
  settings.setdefault("head_dim", settings["hidden_size"] //
                      settings["num_attention_heads"])
  torch.manual_seed(seed)
  model = getattr(transformers, model_class)(
      getattr(transformers, config_class)(**settings)).eval()
  model.save_pretrained(model_dir, safe_serialization=True,
                        **({"max_shard_size": max_shard_size}
                           if max_shard_size else {}))
  tokenizer.save(str(model_dir / "tokenizer.json"))
  if chat_template is not None:
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": eos_token, "unk_token": "<unk>", "pad_token": "<pad>",
        "chat_template": chat_template}))
  return model_dir


def build_tiny_opt(model_dir: pathlib.Path, *, minilm_tokenizer: bool = False,
                   **config) -> pathlib.Path:
  """Saves a tiny random OPTForCausalLM (every weight, biases and LayerNorms
  too, drawn at random) with a tokenizer.json: a WordLevel one over
  _SENTENCES (pad 0, bos 1, eos 2), or with `minilm_tokenizer` a link to
  the default MiniLM one (vocab 30522). `config` overrides OPTConfig fields.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from genre_jax.lm import hf  # pylint: disable=g-import-not-at-top
  model_dir = pathlib.Path(model_dir)
  model_dir.mkdir(parents=True, exist_ok=True)
  if minilm_tokenizer:
    os.symlink(os.path.join(hf.model_dir(), hf.TOKENIZER_FILE),
               model_dir / hf.TOKENIZER_FILE)
    vocab = 30522
  else:
    tokenizer = _word_level_tokenizer()
    tokenizer.save(str(model_dir / hf.TOKENIZER_FILE))
    vocab = tokenizer.get_vocab_size()
  settings = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, ffn_dim=64,
                  max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
  settings.update(config)
  torch.manual_seed(0)
  model = transformers.OPTForCausalLM(
      transformers.OPTConfig(**settings)).eval()
  randomize_weights(model)
  model.save_pretrained(model_dir, safe_serialization=True)
  return model_dir


def randomize_weights(model, scale: float = 0.2) -> None:
  """Redraws every parameter of a torch model (HF's init leaves biases at 0
  and LayerNorms at 1, which would hide a bias or norm a port got wrong)."""
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator) * scale
      param.copy_(1.0 + noise if name.endswith("norm.weight") or
                  "LayerNorm.weight" in name else noise)


def _word_level_tokenizer():
  """A WordLevel tokenizer over _SENTENCES: <pad> 0, <s> 1, </s> 2, <unk> 3;
  encodings start with <s>."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      unk_token="<unk>"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  trainer = tokenizers.trainers.WordLevelTrainer(
      special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
  tokenizer.train_from_iterator(_SENTENCES, trainer)
  tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", 1)])
  return tokenizer


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
