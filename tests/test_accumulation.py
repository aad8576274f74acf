"""Gradient accumulation (config.train.accumulate_steps): k batches of B make
the update one batch of k * B makes, the schedule counts updates, and a run
resumes mid-accumulation exactly."""

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from genre_jax import checkpoint as ckpt_lib
from genre_jax import data as data_lib
from genre_jax import train
from genre_jax import variables
from genre_jax.config import base_config, load_preset
from genre_jax.data import batching
from genre_jax.errors import ConfigError
from tests.helpers import shrink


def _config(data_dir, k=1):
  config = shrink(load_preset("nrms"), data_dir, warmup_steps=1,
                  weight_decay=0.01, accumulate_steps=k)
  config.model.dropout = 0.0
  return config


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_k_micro_batches_give_the_update_of_one_k_times_larger_batch(
    data_dir):
  k, rows, updates = 4, 32, 2
  dataset = data_lib.load_dataset(_config(data_dir).data)
  batcher = batching.TrainBatcher(
      dataset.splits["train"], dataset.items, batch_size=rows,
      history_len=10, num_negatives=4, seed=0)
  big = [b for _, b in zip(range(updates), batcher.epoch(0))]
  # Rows of equal weight: the mean of the micro-batches' mean gradients is
  # the big batch's mean gradient (a padded row would weigh differently).
  assert all((b["weights"] == 1).all() for b in big)
  micro = [[{n: v[i * rows // k:(i + 1) * rows // k] for n, v in b.items()}
            for i in range(k)] for b in big]

  mesh = train.make_mesh()
  dat = jax.sharding.NamedSharding(mesh, train.P("data"))
  host_items, spec = train.model_inputs(_config(data_dir), dataset)
  items = jax.device_put(host_items)

  def stepper(config, total_steps, batch):
    parts, state = train.init_model(config, spec, total_steps=total_steps)
    shapes = {n: jax.ShapeDtypeStruct(v.shape, v.dtype)
              for n, v in batch.items()}
    step = train.compile_train_step(parts, state, shapes, items, mesh, 0)
    return parts, state, lambda s, b: step(s, train.to_global(b, dat),
                                           items)[0]

  # The same schedule: 10 updates, of one batch or of k.
  parts, state_a, step_a = stepper(_config(data_dir), 10, big[0])
  _, state_b, step_b = stepper(_config(data_dir, k), 10 * k, micro[0][0])
  grad_fn = jax.jit(jax.grad(
      lambda params, batch: train.compute_loss(
          params, parts.rest, parts.train_graphdef, batch, items,
          jax.random.key(0))[0]))
  initial = _leaves(state_a["params"])
  for x, y in zip(initial, _leaves(state_b["params"]), strict=True):
    np.testing.assert_array_equal(x, y)
  # Entries whose gradient is float noise in either layout (|g| <= 1e-6,
  # below 100 x Adam's eps, and not exactly 0 in both: the attention key
  # bias, which the softmax cancels, and the additive-attention pools at
  # their near-uniform start): Adam divides them by their own size, so
  # rounding noise in the gradient moves them up to ~1e-3 of a step apart.
  # Only their Adam moments are compared, below.
  noise = [np.zeros(x.shape, bool) for x in initial]
  for u in range(updates):
    g_big = _leaves(grad_fn(state_a["params"], big[u]))
    g_micro = [_leaves(grad_fn(state_b["params"], b)) for b in micro[u]]
    g_micro = [np.mean(g, axis=0) for g in zip(*g_micro)]
    noise = [n | (((np.abs(g) <= 1e-6) | (np.abs(h) <= 1e-6)) &
                  ((g != 0) | (h != 0)))
             for n, g, h in zip(noise, g_big, g_micro)]
    state_a = step_a(state_a, big[u])
    before = _leaves(state_b["params"])
    for i, b in enumerate(micro[u]):
      state_b = step_b(state_b, b)
      if i < k - 1:  # mid-accumulation: no parameter moves
        for x, y in zip(before, _leaves(state_b["params"])):
          np.testing.assert_array_equal(x, y)
    assert int(state_b["step"]) == (u + 1) * k
    assert int(state_b["opt"].gradient_step) == u + 1
    # Adam's moments hold the mean gradient itself (its scale too: a sum of
    # the k gradients would be k times the first moment).
    inner = state_b["opt"].inner_opt_state
    for name in ("mu", "nu"):
      want = _leaves(optax.tree_utils.tree_get(state_a["opt"], name))
      got = _leaves(optax.tree_utils.tree_get(inner, name))
      scale = max(np.abs(x).max() for x in want)
      for x, y in zip(want, got, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=f"{name} after update {u + 1}")
    after_a, after_b = _leaves(state_a["params"]), _leaves(state_b["params"])
    moved = sum(int((x != y).sum()) for x, y in zip(initial, after_a))
    skipped = sum(int(n.sum()) for n in noise)
    assert moved > 1000 and skipped < 0.01 * moved, (moved, skipped)
    for x, y, n in zip(after_a, after_b, noise, strict=True):
      np.testing.assert_allclose(y[~n], x[~n], rtol=1e-5, atol=1e-7,
                                 err_msg=f"parameters after update {u + 1}")


def _grouped_params():
  """A recommender weight, a pretrained LM weight, LoRA adapters and a
  frozen (5, 7) kernel, typed as the encoders type them."""
  rng = np.random.default_rng(0)
  leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {"lm": {"kernel": variables.Frozen(leaf(5, 7)),
                 "lora_a": variables.LoRAParam(leaf(5, 2)),
                 "bias": variables.Pretrained(leaf(7))},
          "user_encoder": {"w": nnx.Param(leaf(3, 3))}}


def _schedule_config(k):
  config = base_config()
  config.train.lr = 0.1
  config.train.warmup_steps = 3
  config.train.decay = "cosine"
  config.train.weight_decay = 0.01
  config.train.grad_clip = 0.5
  config.model.lm.lr = 0.03
  config.train.accumulate_steps = k
  return config


def _schedule_counts(opt_state):
  """Every ScaleByScheduleState count in an optimizer state."""
  is_count = lambda s: isinstance(s, optax.ScaleByScheduleState)
  return [int(s.count) for s in jax.tree.leaves(opt_state, is_leaf=is_count)
          if is_count(s)]


@pytest.mark.parametrize("grouped", [False, True])
def test_the_schedule_counts_updates_not_batches(grouped):
  k, updates = 3, 6
  params = (_grouped_params() if grouped else
            {"w": jnp.ones((3, 3)), "b": jnp.ones((3,))})
  one = train.make_optimizer(_schedule_config(1), updates, params)
  acc = train.make_optimizer(_schedule_config(k), updates * k, params)
  state_one, state_acc = one.init(params), acc.init(params)
  one_update, acc_update = jax.jit(one.update), jax.jit(acc.update)
  if grouped:  # frozen weights keep no accumulator, as they keep no state
    shapes = [x.shape for x in jax.tree.leaves(state_acc)]
    assert (5, 7) not in shapes and (5, 2) in shapes
  rng = np.random.default_rng(1)
  for u in range(1, updates + 1):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    expected, state_one = one_update(grads, state_one, params)
    for i in range(k):  # the same gradient k times: their mean is it
      got, state_acc = acc_update(grads, state_acc, params)
      if i < k - 1:
        assert all(not np.asarray(x).any() for x in jax.tree.leaves(got))
    # The learning rate of update u is the schedule's at step u - 1 in both
    # (warm-up 3, cosine decay over the 3 after it): the same counts and
    # the same update.
    assert _schedule_counts(state_one) == _schedule_counts(state_acc)
    assert set(_schedule_counts(state_acc)) == {u}
    for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(got),
                    strict=True):
      # To float32 rounding: MultiSteps runs the inner optimizer under a
      # lax.cond, compiled, which rounds a few entries 1 ulp apart (in
      # float64 the two agree to 1e-17).
      assert x.shape == y.shape
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-8,
                                 err_msg=f"update {u}")
  if grouped:
    np.testing.assert_array_equal(got["lm"]["kernel"].get_value(), 0.0)
  # The schedule's rate at the last update: its decay has not ended.
  lr = train.make_schedule(_schedule_config(1), updates)
  assert 0 < float(lr(updates - 1)) < 0.1


def test_k_1_is_exactly_the_optimizer_without_accumulation():
  params = _grouped_params()
  config = _schedule_config(1)
  del config.train["accumulate_steps"]  # a config from before the field
  a = train.make_optimizer(config, 10, params).init(params)
  b = train.make_optimizer(_schedule_config(1), 10, params).init(params)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert not isinstance(b, optax.MultiStepsState)


def _final(workdir):
  checkpoints = ckpt_lib.Checkpoints(workdir)
  try:
    params, progress = checkpoints.restore_saved(checkpoints.latest)
  finally:
    checkpoints.close()
  return progress["step"], params


@pytest.mark.slow
def test_a_run_interrupted_mid_accumulation_resumes_exactly(data_dir,
                                                            tmp_path, caplog):
  def config():
    # checkpoint_every=3 with k=2: the step-3 save holds half a sum.
    return shrink(load_preset("nrms"), data_dir, max_steps=8,
                  checkpoint_every=3, accumulate_steps=2)

  straight = str(tmp_path / "straight")
  with caplog.at_level(logging.INFO, logger="absl"):
    summary = train.train_and_evaluate(config(), straight)
  assert summary["steps"] == 8 and summary["updates"] == 4
  # The step log line (step 1 is always logged) says the updates made.
  assert any(r.getMessage().startswith("epoch 0 step 1/8 update 0/4 loss")
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  written = json.loads(pathlib.Path(straight, "final_metrics.json")
                       .read_text())
  assert written["steps"] == 8 and written["updates"] == 4

  class Crash(Exception):
    """A simulated crash after a given step."""

  def crash_at_five(step):
    if step == 5:
      raise Crash()

  resumed = str(tmp_path / "resumed")
  with pytest.raises(Crash):
    train.train_and_evaluate(config(), resumed, step_callback=crash_at_five)
  steps_seen = []
  summary = train.train_and_evaluate(config(), resumed,
                                     step_callback=steps_seen.append)
  assert steps_seen[0] == 4, "must resume after the step-3 checkpoint"
  assert summary["updates"] == 4
  step_a, params_a = _final(straight)
  step_b, params_b = _final(resumed)
  assert step_a == step_b == 8
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_divergence_is_caught_with_accumulation(data_dir, tmp_path):
  # The first update (step 2) sends the parameters to ~1e30: caught at
  # once, before the step-3 checkpoint, as without accumulation.
  config = shrink(load_preset("nrms"), data_dir, lr=1e30, warmup_steps=0,
                  max_steps=6, checkpoint_every=3, accumulate_steps=2)
  workdir = tmp_path / "diverged"
  with pytest.raises(FloatingPointError,
                     match=r"training diverged: .* at step [23]; lower "
                     r"config.train.lr \(now 1e\+30\)"):
    train.train_and_evaluate(config, str(workdir))
  assert not ckpt_lib.has_checkpoint(str(workdir))
  assert not (workdir / "final_metrics.json").exists()


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_a_bad_accumulate_steps_is_one_config_error(value, tmp_path):
  config = ml_collections.ConfigDict(base_config().to_dict(), type_safe=False)
  config.train.accumulate_steps = value
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(config, str(tmp_path / "w"))
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(
      f"config.train.accumulate_steps={value!r}: must be an integer >= 1")
  assert not (tmp_path / "w").exists()
  with pytest.raises(ConfigError, match=r"config\.train\.accumulate_steps"):
    train.make_optimizer(config, 10, {"w": jnp.ones(2)})
