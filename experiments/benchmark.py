r"""Training and evaluation throughput of any preset, on any device.

Times full, compiled training steps (forward, backward, AdamW update) after
compilation and warm-up, with the device synchronised around every timed
group of steps; then the evaluator's two passes (encode every item, score
impressions). Reports median step time, samples/s, titles/s, compile time,
peak device memory, FLOPs per step, MFU against a dense-matmul rate measured
on the same device, and how many cuDNN fused-attention calls the compiled
step holds.

Inputs are random (every title exactly --title_len real tokens, full
histories: the anchor's protocol) unless --data_dir names a dataset in the
Goodreads layout: then batches are the real TrainBatcher batches of that
data, with each distinct item encoded once per batch (our "dedup" extra).

  # CPU smoke test (CI):
  python experiments/benchmark.py --presets=nrms --smoke
  # Side by side with the PyTorch anchor (third_party/torch_anchor/, after
  # pip install -e ".[bench]"), on one GPU: the anchor's rows at its exact
  # shapes (title 30, history 50, 1 + 4 candidates, bf16 compute), plus our
  # extras rows (cached frozen layers; dedup on real Goodreads batches),
  # then the anchor itself on the same device, and one table of both:
  python experiments/benchmark.py --anchor --data_dir=../shared/data/goodreads
  # The same, at smoke size on a CPU (the anchor's --smoke: batch 2, eager):
  python experiments/benchmark.py --anchor --smoke
  # Any preset and shape, with config overrides:
  python experiments/benchmark.py --presets=naml --batch_size=128 \
      --set=model.dtype=bfloat16
  # Encoding each distinct item once vs every slot, on real batches:
  python experiments/benchmark.py --presets=nrms --data_dir=DIR \
      --batch_size=128 --history_len=8 --title_len=16 --dedup_ablation
  # The tuned LM layers on padded rows vs packed rows (model.lm.pack), on
  # real batches (random titles all hold --title_len tokens: nothing to pack):
  python experiments/benchmark.py --presets=once_nrms --data_dir=DIR \
      --batch_size=128 --history_len=8 --title_len=20 --pack_ablation

With --anchor, the anchor (`third_party/torch_anchor/torch_anchor.py`, which
picks CUDA when PyTorch sees a GPU, else the CPU) runs first, in its own
process, on the configs matching our rows: eager and torch.compile (eager
only with --smoke: compiling takes minutes on a CPU); --anchor_results=FILE
reads the anchor.json of an earlier anchor run instead. Our rows then run,
and a last table puts each row's samples/s beside the anchor's and gives
the ratio ours / anchor. An anchor that cannot run (no PyTorch, another
device) is said in one line, and our rows are printed all the same.

FLOPs per step are counted analytically the way the anchor counts them
(every matmul 2mnk forward; + 2mnk for a trained weight's gradient; + 2mnk
for the input gradient when something below needs it; attention 4 L^2 d
forward per sequence and 3x that when trained; embeddings, norms, softmax
and the optimizer 0), for NRMS and BERT-NRMS; XLA's own count
(`cost_analysis`, which counts one device's share of the step) is reported
beside it for every preset. MFU = one device's FLOPs per second (analytic /
number of devices, else XLA) / the matmul rate measured on one device.

With more than one row (`--anchor`, `--presets=nrms,naml`, `--dedup_ablation`)
each row is measured in a fresh process of this script (`--isolate_rows`,
on by default): JAX cannot reset the allocator's peak-memory counter, so rows
sharing one process would each report the largest peak so far. The parent
process never touches the accelerator, so it holds none of its memory.

The output ends with one line of JSON: {"device", "num_devices",
"matmul_flops_per_s", "rows": [...]}, with --anchor also "anchor" (where
its figures came from, its device, its configs' samples/s) and
"comparison": [{label, anchor_config, ours_samples_per_s,
anchor_samples_per_s: {mode: x}, ratio: {mode: ours / anchor}}]. A bad
preset name or --set override fails before anything is measured.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from genre_jax import train
from genre_jax.config import load_preset
from genre_jax.errors import exit_on_input_error
from genre_jax.logs import json_line
from genre_jax.data.types import Behaviors, ItemInputSpec
from genre_jax.models import lm_encoder
from genre_jax.registry import ITEM_ENCODERS

import common_flags

# The PyTorch reference these rows are compared with (`--anchor`).
ANCHOR_SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "third_party", "torch_anchor", "torch_anchor.py")

_PRESETS = common_flags.presets(["nrms"])  # one row each
_SET = common_flags.overrides()
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes, few steps (CPU/CI).")
_ANCHOR = flags.DEFINE_bool(
    "anchor", False, "Run the rows of third_party/torch_anchor/"
    "torch_anchor.py at its exact shapes, then the same rows with our "
    "extras; run the anchor itself on the same device and tabulate both "
    "sides with the ratio ours / anchor.")
_ANCHOR_RESULTS = flags.DEFINE_string(
    "anchor_results", "", "With --anchor: compare with this anchor.json "
    "(written by an earlier torch_anchor.py --out DIR) instead of running "
    "the anchor.")
_ANCHOR_MODELS_FLAG = flags.DEFINE_list(
    "anchor_models", ["nrms", "bert_full", "bert_last1"], "With --anchor: "
    "the anchor's models whose rows run (nrms: NRMS; bert_full: BERT-NRMS "
    "fully tuned; bert_last1: BERT-NRMS, top layer tuned).")
# Real batches (deduplicated items) instead of random ones.
_DATA_DIR = common_flags.data_dir(
    default="", when_empty="random inputs (the anchor's protocol)")
_CACHE_DIR = common_flags.cache_dir()
_DEDUP_ABLATION = flags.DEFINE_bool(
    "dedup_ablation", False, "With --data_dir: time the same real batches "
    "with every item slot encoded, then with each distinct item once.")
_PACK_ABLATION = flags.DEFINE_bool(
    "pack_ablation", False, "For LM item-encoder presets: time the same "
    "batches with the tuned LM layers on padded rows (model.lm.pack=False), "
    "then on packed rows (True). Use --data_dir: random titles all hold "
    "--title_len real tokens, so packing has nothing to remove.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Samples per step.")
_HISTORY = flags.DEFINE_integer("history_len", 50, "History items per sample.")
_CANDIDATES = flags.DEFINE_integer("num_candidates", 5, "1 + K negatives.")
_TITLE = flags.DEFINE_integer("title_len", 30, "Tokens per title.")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 20000, "Catalogue size.")
_VOCAB = flags.DEFINE_integer("vocab_size", 30522, "Token vocabulary.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
_GROUP = flags.DEFINE_integer("group", 5, "Steps per synchronised timing.")
_EVAL = flags.DEFINE_bool("eval", True, "Also time the evaluator.")
_EVAL_IMPRESSIONS = flags.DEFINE_integer(
    "eval_impressions", 2048, "Impressions scored in the eval timing.")
_ISOLATE = flags.DEFINE_bool(
    "isolate_rows", True, "With more than one row, measure each in a fresh "
    "process of this script: JAX cannot reset the allocator's peak, so rows "
    "sharing a process would each report the largest peak so far.")
_ONLY_ROW = flags.DEFINE_integer(
    "only_row", -1, "Measure only this row of the plan (what --isolate_rows "
    "runs in each child process).")

# The anchor's NRMS: 300-wide word embeddings, 16 heads of 16, query 200.
_ANCHOR_NRMS = ("model.embed_dim=300", "model.hidden_dim=256",
                "model.num_heads=16", "model.attention_dim=200")
_BF16 = ("model.dtype=bfloat16",)
# The anchor's models (its config names) as our rows call them.
_ANCHOR_MODELS = {"nrms": "NRMS", "bert_full": "BERT-NRMS full",
                  "bert_last1": "BERT-NRMS top layer"}
_ANCHOR_ROWS = (
    # (anchor model, batch, label suffix, preset, overrides, needs real data)
    ("nrms", 256, "", "nrms", _ANCHOR_NRMS + _BF16, False),
    ("nrms", 64, "", "nrms", _ANCHOR_NRMS + _BF16, False),
    ("bert_full", 64, "", "bert_nrms",
     ("model.lm.tune_from=0", "model.lm.cache=False") + _BF16, False),
    ("bert_last1", 64, "", "bert_nrms",
     ("model.lm.tune_from=5", "model.lm.cache=False") + _BF16, False),
)
_EXTRA_ROWS = (
    ("bert_last1", 64, " +cache", "bert_nrms",
     ("model.lm.tune_from=5", "model.lm.cache=True",
      "model.lm.cache_dtype=bfloat16") + _BF16, False),
    ("nrms", 256, " +dedup Goodreads", "nrms", _ANCHOR_NRMS + _BF16, True),
    ("nrms", 64, " +dedup Goodreads", "nrms", _ANCHOR_NRMS + _BF16, True),
    ("bert_full", 64, " +dedup Goodreads", "bert_nrms",
     ("model.lm.tune_from=0", "model.lm.cache=False") + _BF16, True),
)
# The anchor's --smoke keeps its batch-64 configs, at batch 2.
_ANCHOR_SMOKE_BATCH = 2


@dataclasses.dataclass
class Shape:
  batch: int
  history: int
  candidates: int
  title: int
  num_items: int
  vocab: int


# --- Inputs -------------------------------------------------------------------


def random_items(config, shape: Shape, rng) -> tuple[dict, ItemInputSpec]:
  """A random item table of every title `shape.title` tokens long, [N+1, L],
  in the form the configured item encoder reads (its random_inputs hook)."""
  encoder = ITEM_ENCODERS.get(config.model.item_encoder)
  return encoder.random_inputs(config, shape.num_items, shape.title,
                               shape.vocab, rng)


def random_batch(shape: Shape, rng) -> dict[str, np.ndarray]:
  """A training batch in the trainer's layout (positive in column 0)."""
  b, h, c = shape.batch, shape.history, shape.candidates
  labels = np.zeros((b, c), np.float32)
  labels[:, 0] = 1.0
  return {
      "history": rng.integers(1, shape.num_items + 1, (b, h), dtype=np.int32),
      "history_mask": np.ones((b, h), bool),
      "candidates": rng.integers(1, shape.num_items + 1, (b, c),
                                 dtype=np.int32),
      "candidate_mask": np.ones((b, c), bool),
      "labels": labels,
      "users": rng.integers(1, 100, (b,), dtype=np.int32),
      "weights": np.ones((b,), np.float32),
  }


def random_behaviors(shape: Shape, num_impressions: int, rng) -> Behaviors:
  """Impressions with full histories and `candidates` candidates each."""
  m, h, c = num_impressions, shape.history, shape.candidates
  labels = np.zeros((m, c), np.int8)
  labels[:, 0] = 1
  return Behaviors(
      impression_ids=np.array([str(i) for i in range(m)], object),
      user_ids=np.array([f"U{i}" for i in range(m)], object),
      users=rng.integers(1, 100, (m,), dtype=np.int32),
      history_offsets=np.arange(m + 1, dtype=np.int64) * h,
      history_items=rng.integers(1, shape.num_items + 1, (m * h,),
                                 dtype=np.int32),
      cand_offsets=np.arange(m + 1, dtype=np.int64) * c,
      cand_items=rng.integers(1, shape.num_items + 1, (m * c,),
                              dtype=np.int32),
      cand_labels=labels.reshape(-1))


def real_inputs(config, shape: Shape, data_path: str, num_batches: int,
                dedup: bool = True):
  """Item table, spec, TrainBatcher batches (deduplicated unless told) and
  the dataset of a Goodreads-layout folder (titles cut to shape.title)."""
  from genre_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from genre_jax.data import batching  # pylint: disable=g-import-not-at-top

  config.data.name = "goodreads_genre"
  config.data.path = data_path
  config.data.max_len.title = shape.title
  config.model.lm.max_len = shape.title
  dataset = data_lib.load_dataset(config.data)
  host_items, spec = train.model_inputs(config, dataset)
  batcher = batching.TrainBatcher(
      dataset.splits["train"], dataset.items, batch_size=shape.batch,
      history_len=shape.history, num_negatives=shape.candidates - 1, seed=0)
  if dedup:
    batcher.unique_items = train.dedup_capacity(batcher, num_batches)
  batches = [b for _, b in zip(range(num_batches), batcher.epoch(0))]
  return host_items, spec, batches, dataset


# --- Counting -----------------------------------------------------------------


def measure_matmul_rate() -> float:
  """Dense matmul FLOP/s of device 0 (bf16 on accelerators, f32 on CPU)."""
  on_cpu = jax.devices()[0].platform == "cpu"
  n = 1024 if on_cpu else 8192
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  reps = 3 if on_cpu else 50
  times = []
  for _ in range(3):
    tick = time.perf_counter()
    for _ in range(reps):
      out = f(a)
    out.block_until_ready()
    times.append((time.perf_counter() - tick) / reps)
  return 2 * n**3 / min(times)


class Flops:
  """Training FLOPs of one step, counted the way the anchor counts them."""

  def __init__(self):
    self.total = 0.0

  def matmul(self, m, k, n, trained=True, input_grad=True):
    self.total += (2 + 2 * trained + 2 * input_grad) * m * k * n

  def attention(self, sequences, length, width, trained=True):
    self.total += 4 * sequences * length**2 * width * (3 if trained else 1)

  def pooling(self, sequences, length, width, trained=True):
    self.total += 2 * sequences * length * width * (3 if trained else 1)


def _user_and_scores(fl: Flops, m, shape: Shape, d: int) -> None:
  b, h = shape.batch, shape.history
  fl.matmul(b * h, d, 3 * d)  # NRMS user self-attention Q, K, V
  fl.attention(b, h, d)
  fl.matmul(b * h, d, m.attention_dim)  # additive attention
  fl.matmul(b * h, m.attention_dim, 1)
  fl.pooling(b, h, d)
  fl.pooling(b, shape.candidates, d)  # dot-product scores


def _self_attention_item_flops(fl: "Flops", config, titles: int,
                               length: int) -> int:
  """NRMS's word self-attention item encoder; returns its output width."""
  m = config.model
  tokens, d = titles * length, m.hidden_dim
  fl.matmul(tokens, m.embed_dim, 3 * d)
  fl.attention(titles, length, d)
  fl.matmul(tokens, d, m.attention_dim)
  fl.matmul(tokens, m.attention_dim, 1)
  fl.pooling(titles, length, d)
  return d


def _lm_item_flops(fl: "Flops", config, titles: int, length: int) -> int:
  """A BERT-family LM item encoder (layers below tune_from frozen, skipped
  when cached) and its projection; returns its output width."""
  m = config.model
  c = lm_encoder.read_lm_config(config)
  tokens, h, inter = titles * length, c.hidden_size, c.intermediate_size
  frozen = int(m.lm.tune_from)
  skipped = frozen if lm_encoder.uses_cache(config) else 0
  for layer in range(skipped, c.num_layers):
    trained = layer >= frozen
    input_grad = trained and (frozen == 0 or layer > frozen)
    fl.matmul(tokens, h, 3 * h, trained, input_grad)
    fl.attention(titles, length, h, trained)
    fl.matmul(tokens, h, h, trained, trained)
    fl.matmul(tokens, h, inter, trained, trained)
    fl.matmul(tokens, inter, h, trained, trained)
  fl.pooling(titles, length, h)
  fl.matmul(titles, h, m.hidden_dim)
  return m.hidden_dim


# Matmul FLOP formulas of the item encoders that have one, by registered
# name; the others are measured by XLA's count only.
ITEM_ENCODER_FLOPS = {"self_attention": _self_attention_item_flops,
                      "lm": _lm_item_flops}


def analytic_flops(config, shape: Shape, titles: int) -> float | None:
  """Matmul FLOPs of one training step with a self-attention user encoder
  and dot predictor (NRMS, BERT-NRMS) and an item encoder of
  ITEM_ENCODER_FLOPS, else None.

  `titles` is the number of item encodings per step: B * (H + C) for the
  anchor's protocol, the deduplicated count for real batches.
  """
  m = config.model
  item_flops = ITEM_ENCODER_FLOPS.get(m.item_encoder)
  if (item_flops is None or m.user_encoder != "self_attention" or
      m.predictor != "dot"):
    return None
  fl = Flops()
  item_flops(fl, config, titles, shape.title)
  _user_and_scores(fl, m, shape, m.hidden_dim)
  return fl.total


def peak_memory_bytes(compiled) -> tuple[int | None, str]:
  """Peak device memory: the allocator's counter, else XLA's static estimate."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "allocator peak"
  memory = compiled.memory_analysis()
  if memory is None:
    return None, "unavailable"
  total = (memory.temp_size_in_bytes + memory.argument_size_in_bytes +
           memory.output_size_in_bytes)
  return int(total), "XLA estimate"


def cudnn_attention_calls(compiled) -> int:
  """cuDNN fused-attention custom calls in the compiled step's HLO."""
  try:
    text = compiled.as_text()
  except Exception:  # pylint: disable=broad-except
    return 0
  return len(re.findall(r'custom_call_target="__cudnn\$fmha', text))


# --- One row ------------------------------------------------------------------


def _encodes_items_with_lm(config) -> bool:
  """Whether item text goes through model.lm (alone or inside a hybrid)."""
  encoder = config.model.item_encoder
  if encoder == "hybrid":
    encoder = config.model.hybrid.content
  return encoder == "lm"


def bench_row(label: str, config, shape: Shape, *, steps: int, warmup: int,
              group: int, with_eval: bool, eval_impressions: int,
              matmul_rate: float, data_path: str = "",
              dedup: bool = True) -> dict:
  """Times one configuration; returns its row of figures."""
  rng = np.random.default_rng(0)
  config.data.history_len = shape.history
  config.data.num_negatives = shape.candidates - 1
  config.model.lm.max_len = shape.title
  mesh = train.make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, train.P())
  data = jax.sharding.NamedSharding(mesh, train.P("data"))
  if data_path:
    host_items, spec, host_batches, dataset = real_inputs(
        config, shape, data_path, num_batches=min(steps + warmup, 32),
        dedup=dedup)
    num_items = dataset.items.num_items
    titles = (statistics.fmean(len(b["item_ids"]) for b in host_batches)
              if dedup else shape.batch * (shape.history + shape.candidates))
  else:
    host_items, spec = random_items(config, shape, rng)
    host_batches = [random_batch(shape, rng) for _ in range(4)]
    num_items = shape.num_items
    titles = shape.batch * (shape.history + shape.candidates)
  items = jax.device_put(host_items, replicated)
  parts, state = train.init_model(config, spec, total_steps=10_000)
  state = jax.device_put(state, replicated)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in host_batches[0].items()}

  tick = time.perf_counter()
  step = train.compile_train_step(parts, state, shapes, items, mesh, seed=0)
  compile_seconds = time.perf_counter() - tick
  batches = [train.to_global(b, data) for b in host_batches]

  metrics = None
  for i in range(warmup):
    state, metrics = step(state, batches[i % len(batches)], items)
  if metrics is not None:
    jax.block_until_ready(metrics["loss"])
  per_step = []
  done = 0
  while done < steps:
    n = min(group, steps - done)
    tick = time.perf_counter()
    for i in range(n):
      state, metrics = step(state, batches[(done + i) % len(batches)], items)
    jax.block_until_ready(metrics["loss"])
    per_step.append((time.perf_counter() - tick) / n)
    done += n
  step_seconds = statistics.median(per_step)
  memory, memory_kind = peak_memory_bytes(step)
  cost = step.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
  formula_flops = analytic_flops(config, shape, titles)
  # The analytic count is the whole global batch's; XLA's and the measured
  # matmul rate are one device's: MFU compares one device's share.
  flops = (formula_flops / jax.device_count() if formula_flops
           else xla_flops)
  if data_path and _encodes_items_with_lm(config) and config.model.lm.pack:
    # Real titles on packed rows: the analytic count assumes every title
    # padded to title_len, XLA's counts every compiled capacity; the work
    # done depends on the batch's lengths. No MFU rather than a wrong one.
    flops = None
  row = {
      "label": label, "preset": config.get("name", label),
      "batch": shape.batch, "history": shape.history,
      "candidates": shape.candidates, "title_len": shape.title,
      "data": data_path or "random", "dtype": config.model.dtype,
      "lm_pack": (bool(config.model.lm.pack)
                  if _encodes_items_with_lm(config) else None),
      "item_encodings_per_step": titles,
      "step_ms": 1e3 * step_seconds,
      "samples_per_s": shape.batch / step_seconds,
      "titles_per_s": shape.batch * (shape.history + shape.candidates) /
                      step_seconds,
      "compile_s": compile_seconds,
      "peak_memory_mib": None if memory is None else memory / 2**20,
      "memory_kind": memory_kind,
      "flops_per_step_analytic": formula_flops,
      "flops_per_step_xla": xla_flops,
      "mfu": flops / step_seconds / matmul_rate if flops else None,
      "matmul_flops_per_s": matmul_rate,  # the rate "mfu" divides by
      "cudnn_fused_attention_calls": cudnn_attention_calls(step),
      "final_loss": float(metrics["loss"]),
  }
  if with_eval:
    evaluator = train.Evaluator(config, parts, items, mesh, num_items)
    params = state["params"]
    jax.block_until_ready(evaluator.item_vectors(params))  # compile
    tick = time.perf_counter()
    vecs = jax.block_until_ready(evaluator.item_vectors(params))
    row["items_encoded_per_s"] = (num_items + 1) / (time.perf_counter() - tick)
    behaviors = random_behaviors(
        dataclasses.replace(shape, num_items=num_items), eval_impressions, rng)
    evaluator.scores(params, behaviors, vecs)  # compile
    tick = time.perf_counter()
    evaluator.scores(params, behaviors, vecs)
    row["impressions_scored_per_s"] = eval_impressions / (
        time.perf_counter() - tick)
  return row


def format_table(rows: list[dict]) -> str:
  header = (f"{'row':<36}{'batch':>6}{'step ms':>9}{'samples/s':>11}"
            f"{'titles/s':>11}{'compile s':>10}{'mem MiB':>9}{'MFU':>7}"
            f"{'cuDNN':>6}{'items/s':>10}{'impr/s':>9}")
  lines = [header, "-" * len(header)]
  for r in rows:
    mem = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    items = r.get("items_encoded_per_s")
    impr = r.get("impressions_scored_per_s")
    lines.append(
        f"{r['label']:<36}{r['batch']:>6}{r['step_ms']:>9.2f}"
        f"{r['samples_per_s']:>11.0f}{r['titles_per_s']:>11.0f}"
        f"{r['compile_s']:>10.1f}{mem:>9}{mfu:>7}"
        f"{r['cudnn_fused_attention_calls']:>6}"
        f"{'-' if items is None else f'{items:.0f}':>10}"
        f"{'-' if impr is None else f'{impr:.0f}':>9}")
  return "\n".join(lines)


# --- The PyTorch anchor -------------------------------------------------------

# The anchor's modes, in its order.
_ANCHOR_MODES = ("eager", "compile")


def run_anchor(configs: list[tuple[str, int]], smoke: bool
               ) -> tuple[dict | None, str]:
  """Runs the anchor on `configs` ((model, batch) at full size), in its own
  process, before this one touches the accelerator: its anchor.json, or None
  and the one-line reason it did not run."""
  needed = ["torch"] + (["transformers"] if any(
      model.startswith("bert") for model, _ in configs) else [])
  missing = [m for m in needed if importlib.util.find_spec(m) is None]
  if missing:
    return None, (f"{' and '.join(missing)} not installed "
                  "(pip install -e \".[bench]\")")
  # torch.compile takes minutes per config on a CPU: smoke runs eager only.
  modes = _ANCHOR_MODES[:1] if smoke else _ANCHOR_MODES
  only = ",".join(f"{model}_b{batch}_{mode}" for mode in modes
                  for model, batch in dict.fromkeys(configs))
  with tempfile.TemporaryDirectory(prefix="torch_anchor_") as out:
    command = [sys.executable, ANCHOR_SCRIPT, "--out", out, "--only", only,
               *(["--smoke"] if smoke else [])]
    print(f"running the PyTorch anchor: torch_anchor.py --only {only}"
          + (" --smoke" if smoke else ""), file=sys.stderr, flush=True)
    child = subprocess.run(command, capture_output=True, text=True,
                           check=False)
    sys.stderr.write(child.stdout)  # the anchor's own table, for the log
    if child.returncode:
      last = (child.stderr.strip().splitlines() or ["no message"])[-1]
      return None, (f"torch_anchor.py exited with status {child.returncode}"
                    f" ({last})")
    return read_anchor_results(os.path.join(out, "anchor.json")), ""


def read_anchor_results(path: str) -> dict:
  """The anchor.json at `path`, checked to hold the anchor's results;
  UsageError naming the file otherwise."""
  try:
    with open(path, encoding="utf-8") as f:
      anchor = json.load(f)
  except OSError as e:
    raise app.UsageError(f"--anchor_results={path}: cannot read it "
                         f"({e.strerror})") from e
  except json.JSONDecodeError as e:
    raise app.UsageError(f"--anchor_results={path}:{e.lineno}: not valid "
                         f"JSON ({e.msg})") from e
  results = anchor.get("results") if isinstance(anchor, dict) else None
  if not isinstance(results, list) or not all(
      isinstance(r, dict) and {"model", "batch", "mode"} <= set(r)
      and isinstance(r.get("samples_per_s", 0.0), (int, float))
      for r in results):
    raise app.UsageError(
        f"--anchor_results={path}: not an anchor.json of torch_anchor.py (no "
        "\"results\" list of configs with model, batch, mode and a number "
        "of samples_per_s)")
  if not isinstance(anchor.get("env", {}), dict):
    raise app.UsageError(f"--anchor_results={path}: its \"env\" is not an "
                         "object")
  return anchor


def anchor_device(anchor: dict) -> str:
  """The device the anchor ran on: its GPU's name, else "cpu"."""
  return str(anchor.get("env", {}).get("gpu") or "cpu")


def compare_with_anchor(rows: list[dict], models: list[str],
                        anchor: dict) -> list[dict]:
  """Each row beside the anchor's config of the same model and batch:
  samples/s per anchor mode and the ratio ours / anchor (absent where the
  anchor has no such config or it failed)."""
  found = {(r["model"], r["batch"], r["mode"]): r for r in anchor["results"]}
  comparison = []
  for row, model in zip(rows, models):
    theirs = {mode: found[model, row["batch"], mode].get("samples_per_s")
              for mode in _ANCHOR_MODES
              if (model, row["batch"], mode) in found}
    comparison.append({
        "label": row["label"], "anchor_config": f"{model}_b{row['batch']}",
        "ours_samples_per_s": row["samples_per_s"],
        "anchor_samples_per_s": theirs,
        "ratio": {mode: row["samples_per_s"] / value
                  for mode, value in theirs.items() if value}})
  return comparison


def format_comparison(comparison: list[dict]) -> str:
  """Ours beside the anchor, samples/s, one line per row."""
  modes = [m for m in _ANCHOR_MODES
           if any(m in c["anchor_samples_per_s"] for c in comparison)]
  header = f"{'row':<36}{'anchor config':<16}{'ours':>10}" + "".join(
      f"{'anchor ' + m:>16}{'ours/' + m:>14}" for m in modes)
  lines = ["samples/s, ours beside the PyTorch anchor's:", header,
           "-" * len(header)]
  for c in comparison:
    line = (f"{c['label']:<36}{c['anchor_config']:<16}"
            f"{c['ours_samples_per_s']:>10.1f}")
    for mode in modes:
      if mode not in c["anchor_samples_per_s"]:
        line += f"{'-':>16}{'-':>14}"
      elif mode not in c["ratio"]:
        line += f"{'failed':>16}{'-':>14}"
      else:
        line += (f"{c['anchor_samples_per_s'][mode]:>16.1f}"
                 f"{c['ratio'][mode]:>13.2f}x")
    lines.append(line)
  return "\n".join(lines)


# --- Running the plan ---------------------------------------------------------


def _rows_in_child_processes(num_rows: int) -> tuple[dict, list[dict]]:
  """Runs this command once per row (--only_row=i): the first process's
  device figures (with the median matmul rate) and every row; a failing
  row stops the rest."""
  results = []
  for i in range(num_rows):
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *sys.argv[1:],
         f"--only_row={i}"], stdout=subprocess.PIPE, text=True, check=False)
    if child.returncode:
      sys.stdout.write(child.stdout)
      raise SystemExit(child.returncode)
    results.append(json.loads(child.stdout.strip().splitlines()[-1]))
  rows = [row for result in results for row in result["rows"]]
  rate = statistics.median(r["matmul_flops_per_s"] for r in results)
  return {"device": results[0]["device"],
          "num_devices": results[0]["num_devices"],
          "matmul_flops_per_s": rate,
          "rate_note": f"median of {num_rows} processes, one per row",
          "rows_in_child_processes": True}, rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  plans = []  # (label, preset, shape, overrides, data path)
  anchor_configs = []  # each row's anchor config, (model, full-size batch)
  if _ANCHOR.value:
    unknown = sorted(set(_ANCHOR_MODELS_FLAG.value) - set(_ANCHOR_MODELS))
    if unknown or not _ANCHOR_MODELS_FLAG.value:
      raise app.UsageError(
          f"--anchor_models={','.join(_ANCHOR_MODELS_FLAG.value)}: choose "
          f"from {','.join(_ANCHOR_MODELS)}")
    for model, batch, suffix, preset, overrides, real in (_ANCHOR_ROWS +
                                                          _EXTRA_ROWS):
      if (model not in _ANCHOR_MODELS_FLAG.value
          or (real and not _DATA_DIR.value)
          or (_SMOKE.value and batch != 64)):
        continue
      anchor_configs.append((model, batch))
      if _SMOKE.value:  # the anchor's smoke configs: batch 64 at batch 2
        batch = _ANCHOR_SMOKE_BATCH
      shape = Shape(batch, 50, 5, 30, 64 if _SMOKE.value else 20000, 30522)
      plans.append((f"{_ANCHOR_MODELS[model]} b{batch}{suffix}", preset,
                    shape, tuple(overrides) + tuple(_SET.value),
                    _DATA_DIR.value if real else ""))
  else:
    if _ANCHOR_RESULTS.value:
      raise app.UsageError("--anchor_results needs --anchor")
    shape = (Shape(8, 6, 3, 8, 64, 128) if _SMOKE.value else
             Shape(_BATCH.value, _HISTORY.value, _CANDIDATES.value,
                   _TITLE.value, _NUM_ITEMS.value, _VOCAB.value))
    if _DEDUP_ABLATION.value and not _DATA_DIR.value:
      raise app.UsageError("--dedup_ablation needs --data_dir")
    # (label suffix, overrides) of each variant timed per preset.
    variants = [("", ())]
    if _PACK_ABLATION.value:
      variants = [(" padded", ("model.lm.pack=False",)),
                  (" packed", ("model.lm.pack=True",))]
    for preset in _PRESETS.value:
      label = f"{preset} smoke" if _SMOKE.value else preset
      for suffix, extra in variants:
        overrides = tuple(_SET.value) + extra
        if _DEDUP_ABLATION.value:
          plans.append((f"{label}{suffix} every slot", preset, shape,
                        overrides, _DATA_DIR.value, False))
        plans.append((f"{label}{suffix}", preset, shape, overrides,
                      _DATA_DIR.value))
  for name, value, least in (("steps", _STEPS.value, 1),
                              ("group", _GROUP.value, 1),
                              ("warmup", _WARMUP.value, 0),
                              ("eval_impressions", _EVAL_IMPRESSIONS.value, 1)):
    if value < least:  # else a traceback (or a loop that never ends) later
      raise app.UsageError(f"--{name}={value}: must be >= {least}")
  if not 0 <= _ONLY_ROW.value < len(plans) and _ONLY_ROW.value != -1:
    raise app.UsageError(f"--only_row={_ONLY_ROW.value}: the plan has "
                         f"{len(plans)} rows")
  steps = 4 if _SMOKE.value else _STEPS.value
  warmup = 1 if _SMOKE.value else _WARMUP.value
  group = 2 if _SMOKE.value else _GROUP.value
  # Every config is built first: a typo fails before minutes of measuring.
  configs = [load_preset(preset, "", overrides)
             for _, preset, _, overrides, *_ in plans]
  if _PACK_ABLATION.value:
    not_lm = sorted({preset for (_, preset, *_), config in zip(plans, configs)
                     if not _encodes_items_with_lm(config)})
    if not_lm:
      raise app.UsageError(
          f"--pack_ablation: {','.join(not_lm)} encode items without an LM "
          "(model.item_encoder, or hybrid.content, is not 'lm'); nothing is "
          "packed")
  anchor, anchor_source, anchor_missing = None, "", ""
  if _ANCHOR.value and _ONLY_ROW.value < 0:
    if _ANCHOR_RESULTS.value:
      anchor = read_anchor_results(_ANCHOR_RESULTS.value)
      anchor_source = _ANCHOR_RESULTS.value
    else:
      # Before this process, or any row's, touches the accelerator.
      anchor, anchor_missing = run_anchor(anchor_configs, _SMOKE.value)
      anchor_source = os.path.relpath(ANCHOR_SCRIPT)
  if _ONLY_ROW.value >= 0:
    configs, plans = [configs[_ONLY_ROW.value]], [plans[_ONLY_ROW.value]]
  if len(plans) > 1 and _ISOLATE.value:
    # Before this process touches the accelerator (it would hold memory).
    figures, rows = _rows_in_child_processes(len(plans))
  else:
    figures, rows = _rows_in_this_process(configs, plans, steps=steps,
                                          warmup=warmup, group=group)
  print(f"device: {figures['device']} ({figures['num_devices']} device(s)), "
        f"measured matmul rate {figures['matmul_flops_per_s'] / 1e12:.3f} "
        "TFLOP/s" + (f" ({figures['rate_note']})" if "rate_note" in figures
                     else ""))
  print(format_table(rows))
  result = {key: value for key, value in figures.items() if key != "rate_note"}
  result["rows"] = rows
  if _ANCHOR.value and _ONLY_ROW.value < 0:
    if anchor is None:
      print(f"anchor not run: {anchor_missing}; our rows only")
      result["anchor"] = {"source": anchor_source, "not_run": anchor_missing}
    else:
      theirs = anchor_device(anchor)
      print(f"anchor: {anchor_source}, on {theirs}")
      if (theirs == "cpu") != (str(figures["device"]).lower() == "cpu"):
        print(f"note: the anchor ran on {theirs}, our rows on "
              f"{figures['device']}: the ratios compare devices too")
      elif theirs == "cpu":
        print("note: on a CPU the anchor computes in float32 (its bf16 "
              "autocast is CUDA only); CPU figures check the code paths, "
              "not speed")
      result["comparison"] = compare_with_anchor(
          rows, [model for model, _ in anchor_configs], anchor)
      print(format_comparison(result["comparison"]))
      result["anchor"] = {
          "source": anchor_source, "device": theirs,
          "torch": anchor.get("env", {}).get("torch"),
          "results": [{key: r.get(key) for key in (
              "model", "batch", "mode", "samples_per_s", "step_ms_median",
              "peak_mem_gib", "achieved_tflops", "error") if key in r}
                      for r in anchor["results"]]}
  print(json_line(result))


def _rows_in_this_process(configs, plans, *, steps: int, warmup: int,
                          group: int) -> tuple[dict, list[dict]]:
  """Measures every planned row here: the device figures and the rows."""
  for label, _, shape, *_ in plans:
    if shape.batch < 1 or shape.batch % jax.device_count():
      raise app.UsageError(
          f"--batch_size={shape.batch} (row '{label}'): must be a positive "
          f"multiple of the number of devices ({jax.device_count()})")
  matmul_rate = measure_matmul_rate()
  rows = []
  for config, (label, preset, shape, _, data_path, *dedup) in zip(configs,
                                                                  plans):
    config.name = preset
    if data_path and _CACHE_DIR.value:
      config.data.data_dir = _CACHE_DIR.value
    rows.append(bench_row(
        label, config, shape, steps=steps, warmup=warmup, group=group,
        with_eval=_EVAL.value,
        eval_impressions=64 if _SMOKE.value else _EVAL_IMPRESSIONS.value,
        matmul_rate=matmul_rate, data_path=data_path,
        dedup=dedup[0] if dedup else True))
  return {"device": jax.devices()[0].device_kind,
          "num_devices": jax.device_count(),
          "matmul_flops_per_s": matmul_rate}, rows


if __name__ == "__main__":
  app.run(exit_on_input_error(main), flags_parser=common_flags.parse)
