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


# Chat templates as Qwen2-Instruct and Mistral-7B-Instruct-v0.1 ship them;
# Mistral's refuses a system message (the provider folds it into the user's).
_QWEN2_CHAT = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] "
    "!= 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant."
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' "
    "+ message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if "
    "add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_MISTRAL_CHAT = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == "
    "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation "
    "roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + "
    "' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
    "message['content'] + eos_token}}{% else %}{{ raise_exception('Only user "
    "and assistant roles are supported!') }}{% endif %}{% endfor %}")


def _hf_chat_greedy(model_dir, root, data_dir, limit, max_new_tokens,
                    fold_system):
  """transformers' greedy replies to the first `limit` summarizer prompts
  of the dataset, rendered by transformers' apply_chat_template."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from genre_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from genre_jax.config import load_preset  # pylint: disable=g-import-not-at-top
  from genre_jax.genre import generate as generate_lib  # pylint: disable=g-import-not-at-top
  from genre_jax.genre import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  from genre_jax.genre.providers import local  # pylint: disable=g-import-not-at-top
  config = load_preset("nrms")
  config.data.name = "goodreads_genre"
  config.data.path = str(root)
  config.data.data_dir = str(data_dir)
  dataset = data_lib.load_dataset(config.data)
  scheme = prompts_lib.steps("summarizer", "book")[-1]
  item_ids = [str(i) for i in dataset.items.ids[1:limit + 1]]
  items = generate_lib.item_dicts(dataset)[1:limit + 1]
  chat = transformers.AutoTokenizer.from_pretrained(model_dir)
  tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
  render = local.chat_renderer(model_dir)
  encodings = []
  for item in items:
    system, user = scheme.system, scheme.build(item)
    messages = ([{"role": "user", "content": f"{system}\n\n{user}"}]
                if fold_system else [{"role": "system", "content": system},
                                     {"role": "user", "content": user}])
    text = chat.apply_chat_template(messages, tokenize=False,
                                    add_generation_prompt=True)
    assert render(system, user) == text
    encodings.append(tokenizer.encode(text, add_special_tokens=False).ids)
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
  eos = model.generation_config.eos_token_id
  length = max(map(len, encodings))
  ids = torch.zeros((len(encodings), length), dtype=torch.long)
  mask = torch.zeros((len(encodings), length), dtype=torch.long)
  for row, tokens in enumerate(encodings):
    ids[row, length - len(tokens):] = torch.tensor(tokens)
    mask[row, length - len(tokens):] = 1
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=0)
  replies = {}
  for item_id, row in zip(item_ids, out[:, length:].tolist()):
    row = row[:row.index(eos)] if eos in row else row
    replies[item_id] = tokenizer.decode(row, skip_special_tokens=True).strip()
  return replies, min(map(len, encodings))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_local_qwen2_and_mistral_match_transformers(tmp_path, make_tiny_mind,
                                                    model_type):
  from tests.helpers import build_tiny_causal_lm  # pylint: disable=g-import-not-at-top
  root = make_tiny_mind(tmp_path / "tiny")
  if model_type == "qwen2":
    model_dir = build_tiny_causal_lm(
        tmp_path / model_type, "qwen2", vocab_size=160,
        special_tokens=("<|im_start|>", "<|im_end|>"),
        eos_token="<|im_end|>", chat_template=_QWEN2_CHAT)
  else:  # A window shorter than every prompt.
    model_dir = build_tiny_causal_lm(
        tmp_path / model_type, "mistral", vocab_size=160,
        special_tokens=("[INST]", "[/INST]"), chat_template=_MISTRAL_CHAT,
        sliding_window=8)
  summary, rows, _ = _generate(
      root, tmp_path / "w", "--generate.provider=local",
      f"--generate.local.model_dir={model_dir}", "--generate.limit=3",
      "--generate.local.max_new_tokens=5", "--generate.local.batch_size=2",
      scheme="summarizer")
  expected, shortest = _hf_chat_greedy(
      model_dir, root, tmp_path / "w" / "data", limit=3, max_new_tokens=5,
      fold_system=model_type == "mistral")
  assert {r["item_id"]: r["response"] for r in rows} == expected
  assert all(expected.values())
  assert summary["count"] == 3
  if model_type == "mistral":
    assert shortest > 8  # The sliding window is in play.
