r"""Training and evaluation throughput of any preset on synthetic inputs.

Times full, compiled training steps (forward, backward, AdamW update) on
random item tables and batches of a given shape, after compilation and
warm-up, with the device synchronised around every timed group of steps; then
the evaluator's two passes (encode every item, score impressions). Reports
median step time, samples/s, titles/s, compile time, peak device memory,
FLOPs per step and MFU against a matmul rate measured on the same device.

  # CPU smoke test (CI):
  python experiments/benchmark.py --preset=nrms --smoke
  # The shapes of ../shared/bench/torch_anchor.py (title 30, history 50,
  # 1 + 4 candidates), for a side-by-side run on the same GPU:
  python experiments/benchmark.py --anchor
  # Any preset with overrides:
  python experiments/benchmark.py --preset=naml --batch_size=128 \
      --set=model.dtype=bfloat16

FLOPs per step: XLA's own count of the compiled step (`cost_analysis`), and,
for the self-attention (NRMS) encoders, an analytic count of the matmuls:
per title of L tokens (embedding E, hidden D, attention query A)
  3*2*L*E*D (Q, K, V) + 2*2*L*L*D (scores, mix) + 2*L*D*D (output)
  + 2*L*D*A (additive attention),
the same per user over H history vectors with E = D, plus 2*C*D for the
scores; a training step costs 3x the forward pass (backward = 2x forward).
MFU = analytic (or XLA) FLOPs per second / measured dense matmul FLOP/s.

The output ends with one line of JSON: {"rows": [...], "device": ...,
"matmul_flops_per_s": ...}.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from genre_jax import train  # pylint: disable=g-import-not-at-top
from genre_jax.data.types import Behaviors, ItemInputSpec  # pylint: disable=g-import-not-at-top

_PRESET = flags.DEFINE_string("preset", "nrms", "Preset name in configs/.")
_SET = flags.DEFINE_multi_string(
    "set", [], "Config overrides, e.g. --set=model.dtype=bfloat16.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes, few steps (CPU/CI).")
_ANCHOR = flags.DEFINE_bool(
    "anchor", False, "Run the rows of ../shared/bench/torch_anchor.py with "
    "its exact shapes (presets that are not available are skipped).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Samples per step.")
_HISTORY = flags.DEFINE_integer("history_len", 50, "History items per sample.")
_CANDIDATES = flags.DEFINE_integer("num_candidates", 5, "1 + K negatives.")
_TITLE = flags.DEFINE_integer("title_len", 30, "Tokens per title (all real).")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 20000, "Catalogue size.")
_VOCAB = flags.DEFINE_integer("vocab_size", 30522, "Token vocabulary.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
_GROUP = flags.DEFINE_integer("group", 5, "Steps per synchronised timing.")
_EVAL = flags.DEFINE_bool("eval", True, "Also time the evaluator.")
_EVAL_IMPRESSIONS = flags.DEFINE_integer(
    "eval_impressions", 2048, "Impressions scored in the eval timing.")

_ANCHOR_ROWS = (
    # (label, preset, batch, overrides)
    ("NRMS b256", "nrms", 256, ()),
    ("NRMS b64", "nrms", 64, ()),
    ("BERT-NRMS full b64", "bert_nrms", 64, ("model.lm.tune_from=0",)),
    ("BERT-NRMS top layer b64", "bert_nrms", 64,
     ("model.lm.tune_from=5", "model.lm.cache=False")),
)


@dataclasses.dataclass
class Shape:
  batch: int
  history: int
  candidates: int
  title: int
  num_items: int
  vocab: int


def load_preset(name: str, overrides) -> "ml_collections.ConfigDict":
  """configs/<name>.py's config with `key=value` overrides applied."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.join(root, "configs", f"{name}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no preset {path}")
  spec = importlib.util.spec_from_file_location(f"preset_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("")
  for item in overrides:
    key, _, value = item.partition("=")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    old = node[leaf]
    if isinstance(old, bool):
      new = value.lower() in ("1", "true", "yes")
    elif isinstance(old, (int, float)):
      new = type(old)(float(value)) if isinstance(old, int) else float(value)
    else:
      new = value
    node[leaf] = new
  return config


def random_items(shape: Shape, fields, rng) -> dict:
  """Token table of every item, every field fully used: [N+1, L]."""
  tokens, masks = {}, {}
  for f in fields:
    t = rng.integers(1, shape.vocab, (shape.num_items + 1, shape.title),
                     dtype=np.int32)
    m = np.ones_like(t, dtype=bool)
    t[0], m[0] = 0, False
    tokens[f], masks[f] = t, m
  return {"tokens": tokens, "masks": masks}


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


def analytic_flops(config, shape: Shape) -> float | None:
  """Matmul FLOPs of one NRMS-style training step (formula in the docstring)."""
  m = config.model
  if (m.item_encoder, m.user_encoder) != ("self_attention", "self_attention"):
    return None
  e, d, a = m.embed_dim, m.hidden_dim, m.attention_dim

  def encoder(length, width):
    return (3 * 2 * length * width * d + 2 * 2 * length * length * d +
            2 * length * d * d + 2 * length * d * a)

  titles = shape.batch * (shape.history + shape.candidates)
  forward = (titles * encoder(shape.title, e) +
             shape.batch * encoder(shape.history, d) +
             shape.batch * 2 * shape.candidates * d)
  return 3.0 * forward


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


def bench_row(label: str, config, shape: Shape, *, steps: int, warmup: int,
              group: int, with_eval: bool, eval_impressions: int,
              matmul_rate: float) -> dict:
  """Times one configuration; returns its row of figures."""
  rng = np.random.default_rng(0)
  config.data.history_len = shape.history
  config.data.num_negatives = shape.candidates - 1
  fields = tuple(config.data.fields)
  spec = ItemInputSpec(vocab_size=shape.vocab, fields=fields,
                       lengths=(shape.title,) * len(fields), num_users=100)
  mesh = train.make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, train.P())
  data = jax.sharding.NamedSharding(mesh, train.P("data"))
  items = jax.device_put(random_items(shape, fields, rng), replicated)
  parts, state = train.init_model(config, spec, total_steps=10_000)
  state = jax.device_put(state, replicated)
  host_batches = [random_batch(shape, rng) for _ in range(4)]
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in host_batches[0].items()}

  tick = time.perf_counter()
  step = train.compile_train_step(parts, state, shapes, items, mesh, seed=0)
  compile_seconds = time.perf_counter() - tick
  batches = [train.to_global(b, data) for b in host_batches]

  for i in range(warmup):
    state, metrics = step(state, batches[i % len(batches)], items)
  jax.block_until_ready(metrics["loss"]) if warmup else None
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
  formula_flops = analytic_flops(config, shape)
  flops = formula_flops or xla_flops
  row = {
      "label": label, "preset": config.get("name", label),
      "batch": shape.batch, "history": shape.history,
      "candidates": shape.candidates, "title_len": shape.title,
      "dtype": config.model.dtype,
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
      "final_loss": float(metrics["loss"]),
  }
  if with_eval:
    evaluator = train.Evaluator(config, parts, items, mesh, shape.num_items)
    params = state["params"]
    jax.block_until_ready(evaluator.item_vectors(params))  # compile
    tick = time.perf_counter()
    vecs = jax.block_until_ready(evaluator.item_vectors(params))
    row["items_encoded_per_s"] = (shape.num_items + 1) / (
        time.perf_counter() - tick)
    behaviors = random_behaviors(shape, eval_impressions, rng)
    evaluator.scores(params, behaviors, vecs)  # compile
    tick = time.perf_counter()
    evaluator.scores(params, behaviors, vecs)
    row["impressions_scored_per_s"] = eval_impressions / (
        time.perf_counter() - tick)
  return row


def format_table(rows: list[dict]) -> str:
  header = (f"{'row':<26}{'batch':>6}{'step ms':>9}{'samples/s':>11}"
            f"{'titles/s':>11}{'compile s':>10}{'mem MiB':>9}{'MFU':>7}"
            f"{'items/s':>10}{'impr/s':>9}")
  lines = [header, "-" * len(header)]
  for r in rows:
    mem = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    items = r.get("items_encoded_per_s")
    impr = r.get("impressions_scored_per_s")
    lines.append(
        f"{r['label']:<26}{r['batch']:>6}{r['step_ms']:>9.2f}"
        f"{r['samples_per_s']:>11.0f}{r['titles_per_s']:>11.0f}"
        f"{r['compile_s']:>10.1f}{mem:>9}{mfu:>7}"
        f"{'-' if items is None else f'{items:.0f}':>10}"
        f"{'-' if impr is None else f'{impr:.0f}':>9}")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  device = jax.devices()[0]
  matmul_rate = measure_matmul_rate()
  plans = []
  if _ANCHOR.value:
    for label, preset, batch, overrides in _ANCHOR_ROWS:
      plans.append((label, preset, Shape(batch, 50, 5, 30, 20000, 30522),
                    tuple(overrides) + tuple(_SET.value)))
  elif _SMOKE.value:
    plans.append((f"{_PRESET.value} smoke", _PRESET.value,
                  Shape(8, 6, 3, 8, 64, 128), tuple(_SET.value)))
  else:
    plans.append((_PRESET.value, _PRESET.value,
                  Shape(_BATCH.value, _HISTORY.value, _CANDIDATES.value,
                        _TITLE.value, _NUM_ITEMS.value, _VOCAB.value),
                  tuple(_SET.value)))
  steps = 4 if _SMOKE.value else _STEPS.value
  warmup = 1 if _SMOKE.value else _WARMUP.value
  group = 2 if _SMOKE.value else _GROUP.value
  rows, skipped = [], []
  for label, preset, shape, overrides in plans:
    try:
      config = load_preset(preset, overrides)
    except FileNotFoundError as e:
      skipped.append({"label": label, "reason": str(e)})
      continue
    config.name = preset
    rows.append(bench_row(
        label, config, shape, steps=steps, warmup=warmup, group=group,
        with_eval=_EVAL.value,
        eval_impressions=64 if _SMOKE.value else _EVAL_IMPRESSIONS.value,
        matmul_rate=matmul_rate))
  print(f"device: {device.device_kind} ({jax.device_count()} device(s)), "
        f"measured matmul rate {matmul_rate / 1e12:.2f} TFLOP/s")
  print(format_table(rows))
  for s in skipped:
    print(f"skipped {s['label']}: {s['reason']}")
  print(json.dumps({"device": device.device_kind,
                    "num_devices": jax.device_count(),
                    "matmul_flops_per_s": matmul_rate, "rows": rows,
                    "skipped": skipped}))


if __name__ == "__main__":
  app.run(main)
