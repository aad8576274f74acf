"""Evaluation: every item encoded once, then each impression scored; and a
trained run loaded back for eval, recommend and export.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from genre_jax import checkpoint as ckpt_lib
from genre_jax import metrics as metrics_lib
from genre_jax import workdir as workdir_lib
from genre_jax.data import batching
from genre_jax.data.types import Behaviors, Dataset
from genre_jax.errors import ConfigError
from genre_jax.train.mesh import P, abstract, batch_sharding
from genre_jax.train.mesh import check_batch_size, make_mesh
from genre_jax.train.mesh import to_global
from genre_jax.train.step import Parts, init_model, merge, model_inputs
from genre_jax.train.step import split_item_table


def padded_candidates(behaviors: Behaviors, width: int):
  """Labels and mask of every impression padded to `width`: ([M, C], [M, C])."""
  counts = behaviors.num_candidates()
  column = np.arange(len(behaviors.cand_items)) - np.repeat(
      behaviors.cand_offsets[:-1], counts)
  row = np.repeat(np.arange(len(behaviors)), counts)
  labels = np.zeros((len(behaviors), width), np.float32)
  masks = np.zeros((len(behaviors), width), bool)
  labels[row, column] = behaviors.cand_labels
  masks[row, column] = True
  return labels, masks


class Evaluator:
  """Encodes every item once, then each impression's user, then scores.

  Item vectors are computed in fixed-size chunks by one compiled function, so
  evaluation costs one item-encoder pass over the catalogue plus a user pass
  per impression, instead of re-encoding every candidate of every impression.
  """

  def __init__(self, config, parts: Parts, items, mesh, num_items: int,
               synthetic: np.ndarray | None = None,
               popularity: np.ndarray | None = None,
               host_items: dict | None = None):
    self.config = config
    # [N+1] bool: LLM-generated items, not counted in a cold user's history.
    self.synthetic = synthetic
    # [N+1] train counts: an item at 0 was never seen in training.
    self.popularity = popularity
    self.parts = parts
    self.items = items
    # Host-resident item fields (step.split_item_table), not on the devices:
    # each chunk's rows are gathered on the host and sent with it.
    self.host_items = host_items
    self.mesh = mesh
    self.num_rows = num_items + 1  # with the padding item
    check_batch_size(config, "eval")
    self.batch_size = int(config.eval.batch_size)
    self.chunk = self.batch_size * 4
    replicated = jax.sharding.NamedSharding(mesh, P())
    data = batch_sharding(mesh)
    self._replicated = replicated
    # Input layouts come from the arguments: parameters replicated or
    # FSDP-sharded as training left them, batches split over every device.
    self._encode = jax.jit(self._encode_chunk, out_shardings=replicated)
    self._score = jax.jit(self._score_batch, out_shardings=data)

  def _encode_chunk(self, params, items, ids, host_rows):
    model = merge(self.parts.eval_graphdef, params, self.parts.rest)
    tokens = {f: jnp.take(t, ids, axis=0) for f, t in items["tokens"].items()}
    masks = {f: jnp.take(m, ids, axis=0) for f, m in items["masks"].items()}
    tokens.update(host_rows["tokens"])  # [n, ...] rows of host fields
    masks.update(host_rows["masks"])
    return model.encode_items(tokens, masks).astype(jnp.float32)  # [n, D]

  @staticmethod
  def _user(model, item_vecs, batch):
    """History vectors (with the profile in front), mask and user repr."""
    profile = batch.get("profile")
    hist, mask = model.with_profile(
        jnp.take(item_vecs, batch["history"], axis=0),  # [B, H, D]
        batch["history_mask"],
        None if profile is None else jnp.take(item_vecs, profile, axis=0),
        profile)
    return hist, mask, model.encode_users(hist, mask, batch["users"])

  def _score_batch(self, params, item_vecs, batch):
    model = merge(self.parts.eval_graphdef, params, self.parts.rest)
    hist, mask, user = self._user(model, item_vecs, batch)
    cands = jnp.take(item_vecs, batch["candidates"], axis=0)  # [B, C, D]
    return model.score(user, cands, hist, mask).astype(jnp.float32)  # [B, C]

  def _score_items(self, params, item_vecs, batch, ids):
    model = merge(self.parts.eval_graphdef, params, self.parts.rest)
    hist, mask, user = self._user(model, item_vecs, batch)
    cands = jnp.take(item_vecs, ids, axis=0)  # [n, D]
    cands = jnp.broadcast_to(cands[None], (hist.shape[0],) + cands.shape)
    return model.score(user, cands, hist, mask).astype(jnp.float32)  # [B, n]

  def score_all_items(self, params, item_vecs, batch) -> np.ndarray:
    """Scores of every item for each user row of a host batch: [B, N+1]."""
    if not hasattr(self, "_score_items_jit"):
      self._score_items_jit = jax.jit(self._score_items)
    # Bound the [B, n, D] candidate block the predictor sees at once.
    chunk = max(64, 65536 // self.batch_size)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    out = []
    for start in range(0, self.num_rows, chunk):
      ids = np.arange(start, start + chunk) % self.num_rows
      out.append(np.asarray(self._score_items_jit(
          params, item_vecs, batch, jnp.asarray(ids, jnp.int32))))
    return np.concatenate(out, axis=1)[:, :self.num_rows]

  def item_vectors(self, params) -> jax.Array:
    """[N+1, D] vectors of every item (row 0: the padding item)."""
    num_chunks = math.ceil(self.num_rows / self.chunk)
    vecs = []
    for c in range(num_chunks):
      ids = np.arange(c * self.chunk, (c + 1) * self.chunk) % self.num_rows
      vecs.append(self._encode(params, self.items, jnp.asarray(ids, jnp.int32),
                               self._host_rows(ids)))
    return jnp.concatenate(vecs)[:self.num_rows]

  def _host_rows(self, ids: np.ndarray) -> dict:
    """Rows `ids` of the host fields, gathered on the host and put on the
    devices (replicated, as the chunk's encoding is)."""
    host = self.host_items or {}
    rows = {kind: {f: np.asarray(t[ids]) for f, t in host.get(kind, {}).items()}
            for kind in ("tokens", "masks")}
    return jax.device_put(rows, self._replicated)

  def scores(self, params, behaviors: Behaviors,
             item_vecs: jax.Array | None = None):
    """Scores of every impression: ([M, C] scores, [M, C] labels, [M, C] mask)."""
    if item_vecs is None:
      item_vecs = self.item_vectors(params)
    batcher = batching.EvalBatcher(
        behaviors, batch_size=self.batch_size,
        history_len=int(self.config.data.history_len),
        process_index=jax.process_index(), process_count=jax.process_count())
    data = batch_sharding(self.mesh)
    width = batcher.max_candidates
    all_scores = np.zeros((len(behaviors), width), np.float32)
    for batch in batcher:
      device_batch = to_global(
          {k: batch[k] for k in ("history", "history_mask", "candidates",
                                 "users", "profile") if k in batch}, data)
      scores = self._score(params, item_vecs, device_batch)  # [B, C] global
      scores = np.asarray(multihost_utils.process_allgather(scores, tiled=True))
      rows = np.asarray(multihost_utils.process_allgather(
          batch["impressions"], tiled=True))  # [B] global, -1 = padding
      keep = rows >= 0
      all_scores[rows[keep]] = scores[keep]
    labels, masks = padded_candidates(behaviors, width)
    return all_scores, labels, masks

  def evaluate(self, params, behaviors: Behaviors,
               item_vecs: jax.Array | None = None) -> dict[str, dict]:
    """Metrics on all impressions and on cold users' impressions.

    The metrics are config.eval.metrics, and "auc" (model selection) even
    if it is not listed (metrics_lib.evaluated_metrics); every one is
    computed from one scoring pass. A user is a user id of `behaviors`
    (per-user GAUC pools each id's impressions, new users' too).
    """
    scores, labels, masks = self.scores(params, behaviors, item_vecs)
    cold = (behaviors.real_history_lengths(self.synthetic) <=
            int(self.config.data.cold_threshold))
    # With train item counts: impressions whose clicked item never appears
    # in the train split (cold items), reported apart.
    selections = {"all": None, "cold": cold}
    if self.popularity is not None and len(behaviors):
      unseen = np.asarray(self.popularity)[behaviors.cand_items] == 0
      clicked_unseen = (unseen & (behaviors.cand_labels > 0)).astype(np.int64)
      selections["unseen_items"] = np.add.reduceat(
          clicked_unseen, behaviors.cand_offsets[:-1]) > 0  # [M]
    return metrics_lib.evaluate_scores(
        scores, labels, masks,
        metrics=metrics_lib.evaluated_metrics(
            self.config.eval.get("metrics", metrics_lib.METRIC_KEYS)),
        users=np.asarray(behaviors.user_ids),
        selections=selections)


def restore_params_from(workdir: str, target_params, *, which: str = "best"):
  """Parameters of another run's best (or latest) checkpoint, shaped as target."""
  checkpoints = ckpt_lib.Checkpoints(workdir)
  try:
    manager = checkpoints.best if which == "best" else checkpoints.latest
    params = checkpoints.restore_params(manager, abstract(target_params))
  except ckpt_lib.CheckpointDamagedError as e:
    raise ckpt_lib.CheckpointDamagedError(
        f"{e}. To rebuild it, train the same config again into a new "
        f"workdir (training is deterministic: the same {which} checkpoint), "
        f"e.g. python run.py --mode=train --config=<the preset and "
        f"--config.* flags of this run; every field is in "
        f"{os.path.join(workdir, 'config.json')}> --workdir=NEW") from None
  finally:
    checkpoints.close()
  if params is None:
    raise ConfigError(f"{workdir}: no {which} checkpoint to load parameters "
                      "from (was it trained with run.py --mode=train?)")
  return params


def load_for_inference(workdir: str, *, dataset: Dataset | None = None):
  """(config, dataset, evaluator, best params) of a trained workdir."""
  from genre_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  config = workdir_lib.load_config(workdir)
  if dataset is None:
    dataset = data_lib.load_dataset(config.data)
  mesh = make_mesh()
  host_items, spec = model_inputs(config, dataset)
  parts, state = init_model(config, spec, total_steps=1)
  replicated = jax.sharding.NamedSharding(mesh, P())
  device_items, host_fields = split_item_table(host_items)
  items = jax.device_put(device_items, replicated)
  params = restore_params_from(workdir, jax.device_put(state["params"],
                                                       replicated))
  evaluator = Evaluator(config, parts, items, mesh, dataset.items.num_items,
                        synthetic=dataset.items.synthetic,
                        popularity=dataset.items.popularity,
                        host_items=host_fields)
  return config, dataset, evaluator, params
