"""Tests of the recommender modules: attention core, encoders, predictors.

Dimensions are tiny and compiled functions few, because XLA compile time
dominates on CPU: the item encoders are each checked end to end through the
Recommender, and every user encoder x predictor pair on random item vectors
(item encoders only meet the rest through [N, D] vectors, so this covers the
full product of parts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genre_jax import models
from genre_jax.config import base_config
from genre_jax.data.types import ItemInputSpec
from genre_jax.errors import ConfigError
from genre_jax.models import item_encoders
from genre_jax.models import layers
from genre_jax.models import recommender
from genre_jax.registry import ITEM_ENCODERS
from genre_jax.registry import PREDICTORS
from genre_jax.registry import USER_ENCODERS

SPEC = ItemInputSpec(vocab_size=50, fields=("title", "abstract"),
                     lengths=(5, 4), num_users=7)
NUM_ITEMS = 12
B, H, C, D = 2, 3, 4, 16
# Encoders trained from scratch; pretrained-LM encoders have their own tests.
WORD_ITEM_ENCODERS = ("cnn", "fastformer", "pooling", "self_attention",
                      "transformer")


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
  """Skips XLA's optimisation passes: compile time dominates these tests."""
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def tiny_config(**model):
  c = base_config()
  m = c.model
  m.embed_dim, m.hidden_dim, m.num_heads, m.attention_dim = 12, D, 2, 8
  m.dropout = 0.1
  m.cnn.num_filters = 8
  m.transformer.num_layers, m.transformer.mlp_dim = 1, 16
  m.fastformer.num_layers = 1
  m.poly.num_interests, m.poly.code_dim = 3, 8
  m.mlp.hidden = (8,)
  m.dcn.num_cross, m.dcn.hidden = 2, (8,)
  m.update(model)
  return c


def item_table(seed=0):
  """Random token tables [N+1, L_f] with ragged masks; row 0 is padding."""
  rng = np.random.default_rng(seed)
  tokens, masks = {}, {}
  for field, length in zip(SPEC.fields, SPEC.lengths):
    tokens[field] = rng.integers(1, SPEC.vocab_size, (NUM_ITEMS + 1, length),
                                 dtype=np.int32)
    lengths = rng.integers(1, length + 1, (NUM_ITEMS + 1, 1))
    masks[field] = np.arange(length)[None] < lengths
    masks[field][3] = False  # An item with an empty field.
    tokens[field][0], masks[field][0] = 0, False
  return tokens, masks


def scramble_padding(tokens, masks, seed=1):
  """The same table with different token ids under every False mask entry."""
  rng = np.random.default_rng(seed)
  return {f: np.where(masks[f], t, rng.integers(1, SPEC.vocab_size, t.shape))
             .astype(np.int32) for f, t in tokens.items()}


def make_batch():
  """Two impressions: one with a padded history slot, one empty history."""
  return dict(
      history=np.array([[4, 7, 0], [0, 0, 0]], np.int32),
      history_mask=np.array([[True, True, False], [False] * 3]),
      candidates=np.array([[1, 2, 3, 0], [5, 9, 12, 4]], np.int32),
      candidate_mask=np.array([[True, True, True, False], [True] * 4]),
      users=np.array([3, 0], np.int32))


def step_fn(model):
  """A jitted (params, rest, tokens) -> ((loss, (logits, item vectors)), grads)
  in the trainer's functional form; compiled once per model.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  masks = item_table()[1]
  batch = make_batch()

  def loss(params, rest, tokens):
    net = nnx.merge(graphdef, params, rest, copy=True)
    logits, aux = net(batch, tokens, masks)
    real = jnp.where(batch["candidate_mask"], logits, 0.0)
    return real.sum() + aux.get("aux_loss", 0.0), (logits, aux["items"])

  fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  return lambda tokens: fn(params, rest, tokens)


def all_finite(tree):
  return all(np.isfinite(np.asarray(x, np.float32)).all()
             for x in jax.tree.leaves(tree))


# --- Attention core against numpy references --------------------------------


def np_softmax(x, mask):
  x = np.where(mask, x, -np.inf)
  top = np.max(np.where(mask, x, -1e30), -1, keepdims=True)
  e = np.where(mask, np.exp(x - top), 0.0)
  total = e.sum(-1, keepdims=True)
  return e / np.where(total > 0, total, 1.0)


def test_masked_attention_matches_numpy_and_zeroes_padding():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(3, 5, 2, 4)).astype(np.float32)
             for _ in range(3))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0] * 5], bool)
  out = np.asarray(layers.masked_attention(q, k, v, mask))
  scores = np.einsum("bqnh,bknh->bnqk", q, k) / 2.0  # [B, N, Lq, Lk]
  w = np_softmax(scores, mask[:, None, None, :])
  want = np.einsum("bnqk,bknh->bqnh", w, v) * mask[:, :, None, None]
  np.testing.assert_allclose(out, want, atol=1e-5)
  assert np.all(out[2] == 0)  # All-padding sequence: zeros, not NaN.


def test_multi_head_self_attention_matches_numpy():
  rng = np.random.default_rng(1)
  mha = layers.MultiHeadSelfAttention(6, 8, 2, dtype=jnp.float32,
                                      rngs=nnx.Rngs(0))
  x = rng.normal(size=(2, 5, 6)).astype(np.float32)
  mask = np.array([[1, 1, 0, 1, 0], [0] * 5], bool)
  out = np.asarray(mha(x, mask))
  qkv = x @ np.asarray(mha.qkv.kernel[...]) + np.asarray(mha.qkv.bias[...])
  q, k, v = np.split(qkv.reshape(2, 5, 3, 2, 4), 3, axis=2)
  q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [B, L, N, Dh]
  w = np_softmax(np.einsum("bqnh,bknh->bnqk", q, k) / 2.0,
                 mask[:, None, None, :])
  heads = np.einsum("bnqk,bknh->bqnh", w, v).reshape(2, 5, 8)
  want = heads @ np.asarray(mha.out.kernel[...]) + np.asarray(
      mha.out.bias[...])
  np.testing.assert_allclose(out, want * mask[..., None], atol=1e-5)


def test_additive_attention_matches_numpy_and_handles_empty():
  rng = np.random.default_rng(2)
  pool = layers.AdditiveAttention(6, 5, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = rng.normal(size=(3, 4, 6)).astype(np.float32)
  mask = np.array([[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
  hidden = np.tanh(x @ np.asarray(pool.proj.kernel[...])
                   + np.asarray(pool.proj.bias[...]))
  w = np_softmax((hidden @ np.asarray(pool.query.kernel[...]))[..., 0], mask)
  np.testing.assert_allclose(np.asarray(pool.weights(x, mask)), w, atol=1e-6)
  assert np.all(np.asarray(pool.weights(x, mask))[~mask] == 0)
  out = np.asarray(pool(x, mask))
  np.testing.assert_allclose(out, np.einsum("bl,bld->bd", w, x), atol=1e-5)
  assert np.all(out[2] == 0)
  grads = jax.grad(lambda x: pool(x, mask).sum())(jnp.asarray(x))
  assert all_finite(grads)


def test_masked_softmax_all_masked_has_finite_gradient():
  logits = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
  mask = jnp.array([[True, False, True], [False, False, False]])
  w = layers.masked_softmax(logits, mask)
  np.testing.assert_allclose(np.asarray(w[1]), 0.0)
  np.testing.assert_allclose(float(w[0].sum()), 1.0, rtol=1e-6)
  grad = jax.grad(lambda l: (layers.masked_softmax(l, mask) ** 2).sum())(
      logits)
  assert all_finite(grad)


def test_fastformer_and_poly_ignore_padding():
  rng = np.random.default_rng(3)
  fast = layers.FastformerAttention(8, 2, dtype=jnp.float32, rngs=nnx.Rngs(0))
  poly = layers.PolyAttention(8, 5, 3, dtype=jnp.float32, rngs=nnx.Rngs(1))
  x = rng.normal(size=(2, 4, 8)).astype(np.float32)
  mask = np.array([[1, 1, 0, 1], [0, 0, 0, 0]], bool)
  noisy = np.where(mask[..., None], x, 100.0 * rng.normal(size=x.shape))
  noisy = noisy.astype(np.float32)
  for layer in (fast, poly):
    out, out_noisy = np.asarray(layer(x, mask)), np.asarray(layer(noisy, mask))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, out_noisy, atol=1e-5)
  assert poly(x, mask).shape == (2, 3, 8)
  np.testing.assert_allclose(np.asarray(poly(x, mask))[1], 0.0)


def test_disagreement_is_mean_pairwise_cosine():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 3, 5)).astype(np.float32)
  unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
  want = np.einsum("bpd,bqd->bpq", unit, unit).mean()
  np.testing.assert_allclose(float(layers.disagreement(x)), want, rtol=1e-5)
  assert float(layers.disagreement(np.zeros((1, 3, 5)))) == 0.0


# --- Item encoders through the whole Recommender ----------------------------


@pytest.mark.parametrize("item_encoder", WORD_ITEM_ENCODERS)
def test_item_encoder_end_to_end_and_padding_invariance(item_encoder):
  """Finite logits and gradients; padded tokens do not change anything."""
  assert item_encoder in ITEM_ENCODERS
  config = tiny_config(item_encoder=item_encoder, user_encoder="additive",
                       predictor="dot", dropout=0.0)
  step = step_fn(models.build_model(config, SPEC, seed=0))
  tokens, masks = item_table()
  (loss, (logits, items)), grads = step(tokens)
  assert logits.shape == (B, C) and logits.dtype == jnp.float32
  assert items.shape == (B * (H + C), D)
  assert np.isfinite(float(loss)) and all_finite(logits) and all_finite(grads)
  assert float(logits[0, 3]) == recommender.MASKED_LOGIT
  (_, (logits2, items2)), _ = step(scramble_padding(tokens, masks))
  np.testing.assert_allclose(np.asarray(items2), np.asarray(items), atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits),
                             atol=1e-5)


# --- User encoders x predictors ---------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("user_encoder", USER_ENCODERS.names())
def test_user_encoder_with_every_predictor(user_encoder):
  """Each predictor scores this user encoder's output with finite values and
  gradients; padded history vectors and an empty history are harmless.
  """
  rng = np.random.default_rng(5)
  hist = rng.normal(size=(B, H, D)).astype(np.float32)
  cands = rng.normal(size=(B, C, D)).astype(np.float32)
  mask = make_batch()["history_mask"]
  users = make_batch()["users"]
  noisy = np.where(mask[..., None], hist, 50.0 * rng.normal(size=hist.shape))
  noisy = noisy.astype(np.float32)
  moved = hist.copy()  # one real history item of user 0 replaced
  moved[0, 1] = rng.normal(size=D)
  for predictor in PREDICTORS.names():
    config = tiny_config(user_encoder=user_encoder, predictor=predictor)
    rngs = nnx.Rngs(0)
    parts = nnx.List([USER_ENCODERS.get(user_encoder)(config, SPEC, rngs=rngs),
                      PREDICTORS.get(predictor)(config, rngs=rngs)])
    parts.eval()

    def score(parts, hist):
      return parts[1](parts[0](hist, mask, users), cands, hist, mask)

    logits = score(parts, hist)
    grads = nnx.grad(lambda p: score(p, hist).sum())(parts)
    assert logits.shape == (B, C), predictor
    assert all_finite(logits) and all_finite(grads), predictor
    np.testing.assert_allclose(np.asarray(score(parts, noisy)),
                               np.asarray(logits), atol=1e-4,
                               err_msg=predictor)
    # The scores read the real history: a history-blind (e.g. constant)
    # user encoder or predictor passes every check above.
    assert not np.allclose(np.asarray(score(parts, moved))[0],
                           np.asarray(logits)[0], atol=1e-4), predictor
  if user_encoder == "pooling":  # the one parameter-free encoder
    np.testing.assert_allclose(
        np.asarray(parts[0](hist, mask, users)),
        (hist * mask[..., None]).sum(1) / np.maximum(mask.sum(1), 1)[:, None],
        rtol=1e-5, atol=1e-6)


def test_gru_skips_padding_steps_and_starts_from_user_vector():
  config = tiny_config(user_encoder="gru")
  encoder = USER_ENCODERS.get("gru")(config, SPEC, rngs=nnx.Rngs(0))
  encoder.eval()
  rng = np.random.default_rng(6)
  hist = rng.normal(size=(3, 4, D)).astype(np.float32)
  mask = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
  users = np.array([0, 2, 5], np.int32)
  out = np.asarray(encoder(hist, mask, users))

  def run_cell(state, items):
    for x in items:
      state, _ = encoder.cell(state, x[None])
    return np.asarray(state)[0]

  user_vecs = np.asarray(encoder.user_embed(users))
  # Unknown user 0 starts from zeros and reads only its real items 0 and 2.
  np.testing.assert_allclose(
      out[0], run_cell(np.zeros((1, D), np.float32), hist[0, [0, 2]]),
      atol=1e-5)
  # An empty history returns the user's long-term vector unchanged.
  np.testing.assert_allclose(out[1], user_vecs[1], atol=1e-6)
  np.testing.assert_allclose(out[2], run_cell(user_vecs[2:3], hist[2]),
                             atol=1e-5)


def test_dedup_path_gives_the_same_logits():
  config = tiny_config(item_encoder="pooling", user_encoder="poly",
                       predictor="dot")
  model = models.build_model(config, SPEC, seed=0)
  models.set_training(model, False)
  tokens, masks = item_table()
  batch = make_batch()
  plain, plain_aux = model(batch, tokens, masks)
  ids = np.concatenate([batch["history"].ravel(), batch["candidates"].ravel()])
  unique, inverse = np.unique(ids, return_inverse=True)
  dedup = dict(batch, item_ids=unique.astype(np.int32),
               history_pos=inverse[:B * H].reshape(B, H).astype(np.int32),
               candidate_pos=inverse[B * H:].reshape(B, C).astype(np.int32))
  logits, aux = model(dedup, tokens, masks)
  assert aux["items"].shape == (len(unique), D)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), atol=1e-5)
  assert np.isfinite(float(aux["disagreement"]))
  np.testing.assert_allclose(float(aux["disagreement"]),
                             float(plain_aux["disagreement"]), rtol=1e-5)


def test_dot_predictor_target_aware_aggregation_matches_numpy():
  config = tiny_config(user_encoder="poly", predictor="dot")
  dot = PREDICTORS.get("dot")(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(7)
  user = rng.normal(size=(B, 3, D)).astype(np.float32)
  cands = rng.normal(size=(B, C, D)).astype(np.float32)
  out = np.asarray(dot(user, cands, None, None))
  keys = np.asarray(jax.nn.gelu(
      user @ np.asarray(dot.target_proj.kernel[...])
      + np.asarray(dot.target_proj.bias[...])))
  w = np_softmax(np.einsum("bpd,bcd->bcp", keys, cands), True)
  want = (w * np.einsum("bpd,bcd->bcp", user, cands)).sum(-1)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  single = np.asarray(dot(user[:, 0], cands, None, None))
  np.testing.assert_allclose(single, np.einsum("bd,bcd->bc", user[:, 0], cands),
                             rtol=1e-5, atol=1e-5)


def test_scaled_dot_divides_scores_by_sqrt_hidden_dim():
  rng = np.random.default_rng(8)
  user = rng.normal(size=(B, D)).astype(np.float32)
  cands = rng.normal(size=(B, C, D)).astype(np.float32)
  want = np.einsum("bd,bcd->bc", user, cands) / np.sqrt(D)
  scaled = PREDICTORS.get("dot")(tiny_config(scaled_dot=True),
                                 rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(scaled(user, cands, None, None)),
                             want, rtol=1e-5, atol=1e-5)
  # Multi-interest users: each interest's score is scaled alike.
  poly = tiny_config(user_encoder="poly", scaled_dot=True)
  plain = PREDICTORS.get("dot")(tiny_config(user_encoder="poly"),
                                rngs=nnx.Rngs(0))
  scaled = PREDICTORS.get("dot")(poly, rngs=nnx.Rngs(0))
  interests = rng.normal(size=(B, 3, D)).astype(np.float32)
  np.testing.assert_allclose(
      np.asarray(scaled(interests, cands, None, None)),
      np.asarray(plain(interests, cands, None, None)) / np.sqrt(D),
      rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  config = tiny_config(item_encoder="transformer", user_encoder="gru",
                       predictor="dot", dtype="bfloat16")
  model = models.build_model(config, SPEC, seed=0)
  params = nnx.state(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  model.eval()
  tokens, masks = item_table()
  logits, aux = model(make_batch(), tokens, masks)
  assert logits.dtype == jnp.float32 and all_finite(logits)
  assert aux["items"].dtype == jnp.bfloat16


def test_train_mode_applies_dropout_and_eval_mode_does_not():
  config = tiny_config(item_encoder="pooling", user_encoder="additive",
                       predictor="mlp", dropout=0.5)
  model = models.build_model(config, SPEC, seed=0)
  tokens, masks = item_table()
  batch = make_batch()
  first, _ = model(batch, tokens, masks)
  second, _ = model(batch, tokens, masks)
  assert not np.allclose(np.asarray(first), np.asarray(second))
  models.set_training(model, False)
  first, _ = model(batch, tokens, masks)
  second, _ = model(batch, tokens, masks)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_unknown_part_name_is_a_config_error():
  with pytest.raises(ConfigError, match="user encoder 'lstm'"):
    models.build_model(tiny_config(user_encoder="lstm"), SPEC, seed=0)
  with pytest.raises(ConfigError, match="config.model.dtype"):
    models.build_model(tiny_config(dtype="float16"), SPEC, seed=0)
  with pytest.raises(ConfigError, match="num_heads"):
    models.build_model(tiny_config(num_heads=3), SPEC, seed=0)
  # scaled_dot means nothing to another predictor: refused, not ignored.
  with pytest.raises(ConfigError, match="scaled_dot.*'mlp'"):
    models.build_model(tiny_config(predictor="mlp", scaled_dot=True), SPEC,
                       seed=0)


def test_attention_implementations_agree_and_bad_names_are_config_errors():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 2, 4)), jnp.float32)
             for _ in range(3))
  mask = jnp.asarray(np.arange(6)[None] < np.array([[4], [6]]))
  auto = models.layers.masked_attention(q, k, v, mask, "auto")
  xla = models.layers.masked_attention(q, k, v, mask, "xla")
  np.testing.assert_allclose(np.asarray(auto), np.asarray(xla), atol=1e-6)
  with pytest.raises(ConfigError, match="config.model.attention"):
    models.layers.masked_attention(q, k, v, mask, "flash")


def test_profile_vector_goes_in_front_of_the_history():
  config = tiny_config(item_encoder="pooling", user_encoder="additive",
                       predictor="dot", dropout=0.0)
  model = models.build_model(config, SPEC, seed=0)
  model.eval()
  tokens, masks = item_table()
  batch = make_batch()
  b = batch["history"].shape[0]
  without, _ = model(batch, tokens, masks)
  none = dict(batch, profile=np.zeros(b, np.int32))
  same, _ = model(none, tokens, masks)  # profile 0 = no profile
  np.testing.assert_allclose(np.asarray(same), np.asarray(without),
                             rtol=1e-5, atol=1e-5)
  profile = np.full(b, 2, np.int32)
  with_profile, aux = model(dict(batch, profile=profile), tokens, masks)
  assert aux["history"].shape[1] == batch["history"].shape[1] + 1
  item = model.encode_items({f: t[2:3] for f, t in tokens.items()},
                            {f: m[2:3] for f, m in masks.items()})
  np.testing.assert_allclose(np.asarray(aux["history"][:, 0]),
                             np.broadcast_to(np.asarray(item), (b, D)),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(with_profile), np.asarray(without))


def test_masked_attention_zeroes_padded_rows_even_if_the_kernel_gives_nan(
    monkeypatch):
  # A fused kernel (cuDNN) may return NaN for a fully masked row; NaN * 0 is
  # NaN, so padded rows must be selected away, not multiplied by the mask.
  def nan_on_padded_queries(q, k, v, key_mask, implementation="auto"):
    del k, implementation
    rows = key_mask[:, 0, 0, :]  # [B, L]: here queries as keys
    return jnp.where(rows[:, :, None, None], v, jnp.nan).astype(q.dtype)

  monkeypatch.setattr(layers, "dot_product_attention", nan_on_padded_queries)
  q = k = v = jnp.ones((2, 3, 2, 4), jnp.float32)
  mask = jnp.asarray([[True, True, False], [False, False, False]])
  out = np.asarray(layers.masked_attention(q, k, v, mask, "xla"))
  assert np.isfinite(out).all()
  np.testing.assert_array_equal(out[1], 0.0)  # empty history: exact zeros
  np.testing.assert_array_equal(out[0, 2], 0.0)
  np.testing.assert_array_equal(out[0, :2], 1.0)


@pytest.mark.slow
def test_documented_part_settings_can_be_overridden():
  # item_encoders.TransformerItemEncoder and recommender.Recommender read
  # model.transformer.pooling and model.poly.disagreement_weight; as fields
  # of the base config they can be set like any other (--config.X=...).
  from genre_jax.config import load_preset  # pylint: disable=g-import-not-at-top

  config = load_preset("miner", overrides=[
      "model.transformer.pooling=first",
      "model.poly.disagreement_weight=0.5"])
  assert config.model.transformer.pooling == "first"
  assert config.model.poly.disagreement_weight == 0.5
  defaults = base_config().model
  assert defaults.transformer.pooling == "mean"
  assert defaults.poly.disagreement_weight == 0.0
  config = tiny_config(item_encoder="transformer", user_encoder="poly")
  config.model.transformer.pooling = "first"
  config.model.poly.disagreement_weight = 0.5
  model = recommender.Recommender(config, SPEC, rngs=nnx.Rngs(0))
  assert model.item_encoder.pooling == "first"
  assert model.disagreement_weight == 0.5
  # And they take effect: "first" is the final state of the first token
  # (zero for an empty item), not the masked mean; the aux loss is the
  # weight times the disagreement.
  model.eval()
  tokens, masks = item_table()
  encoder = model.item_encoder
  ids, mask = item_encoders.field_inputs(tokens, masks, SPEC.fields)
  x = encoder.embed(ids, mask)
  for block in encoder.blocks:
    x = block(x, mask)
  want = np.asarray(encoder.norm(x))[:, 0] * mask[:, :1]
  np.testing.assert_allclose(np.asarray(model.encode_items(tokens, masks)),
                             want, rtol=1e-5, atol=1e-6)
  _, aux = model(make_batch(), tokens, masks)
  assert float(aux["disagreement"]) != 0.0
  np.testing.assert_allclose(float(aux["aux_loss"]),
                             0.5 * float(aux["disagreement"]), rtol=1e-6)
