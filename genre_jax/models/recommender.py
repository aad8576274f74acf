"""The Recommender: item encoder, user encoder and click predictor, chosen by
their registered names in config.model and run end to end on a batch.

Training mode (dropout on) and evaluation mode are switched with
`model.train()` / `model.eval()` (flax.nnx Module methods) or `set_training`.
The module holds nothing but nnx Variables and RNG streams, so the functional
form `nnx.split(model)` ... `nnx.merge(graphdef, state)` inside `jax.jit` works.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from genre_jax.data import batching
from genre_jax.data.types import ItemInputSpec
from genre_jax.errors import ConfigError
from genre_jax.models import layers
from genre_jax.registry import ITEM_ENCODERS
from genre_jax.registry import PREDICTORS
from genre_jax.registry import USER_ENCODERS

# Logit given to padded candidates: exp() of it underflows to exactly zero.
MASKED_LOGIT = -1e9


def _gather_rows(table: dict[str, jax.Array],
                 ids: jax.Array) -> dict[str, jax.Array]:
  """Rows `ids` [N] of every field's [N_items + 1, L_f] array -> [N, L_f]."""
  return {field: jnp.take(rows, ids, axis=0) for field, rows in table.items()}


class Recommender(nnx.Module):
  """A content-based recommender: items are encoded from their text tokens."""

  def __init__(self, config: ml_collections.ConfigDict, spec: ItemInputSpec,
               *, rngs: nnx.Rngs):
    m = config.model
    self.item_encoder = ITEM_ENCODERS.get(m.item_encoder)(config, spec,
                                                          rngs=rngs)
    self.user_encoder = USER_ENCODERS.get(m.user_encoder)(config, spec,
                                                          rngs=rngs)
    self.predictor = PREDICTORS.get(m.predictor)(config, rngs=rngs)
    # MINER's loss weight on the interests' disagreement (0 = not used).
    self.disagreement_weight = float(m.poly.get("disagreement_weight", 0.0))

  def encode_items(self, tokens: dict[str, jax.Array],
                   masks: dict[str, jax.Array]) -> jax.Array:
    """tokens/masks: field -> [N, L_f] -> item vectors [N, D]."""
    return self.item_encoder(tokens, masks)

  def encode_users(self, hist_vecs: jax.Array, hist_mask: jax.Array,
                   users: jax.Array) -> jax.Array:
    """[B, H, D], [B, H] bool, [B] int32 -> [B, D] (or [B, P, D] interests)."""
    return self.user_encoder(hist_vecs, hist_mask.astype(bool), users)

  def score(self, user_repr: jax.Array, cand_vecs: jax.Array,
            hist_vecs: jax.Array, hist_mask: jax.Array) -> jax.Array:
    """Logits [B, C] of the candidates [B, C, D] for the users."""
    return self.predictor(user_repr, cand_vecs, hist_vecs,
                          hist_mask.astype(bool))

  @staticmethod
  def with_profile(hist_vecs: jax.Array, hist_mask: jax.Array,
                   profile_vecs: jax.Array | None,
                   profile_ids: jax.Array | None
                   ) -> tuple[jax.Array, jax.Array]:
    """Puts each user's GENRE profile vector in front of their history.

    hist_vecs [B, H, D], hist_mask [B, H], profile_vecs [B, D], profile_ids
    [B] (0 = no profile) -> [B, 1+H, D], [B, 1+H]; unchanged without
    profiles. The user encoder then weighs the profile like a history item.
    """
    if profile_vecs is None:
      return hist_vecs, hist_mask
    hist = jnp.concatenate([profile_vecs[:, None].astype(hist_vecs.dtype),
                            hist_vecs], axis=1)
    mask = jnp.concatenate([(profile_ids > 0)[:, None],
                            hist_mask.astype(bool)], axis=1)
    return hist, mask

  def _item_vectors(self, batch: dict[str, jax.Array],
                    item_tokens: dict[str, jax.Array],
                    item_masks: dict[str, jax.Array]):
    """Encodes the batch's items once.

    Returns history [B, H, D], candidate [B, C, D] and profile [B, D] (None
    without profiles) vectors, and all encoded [N, D] vectors.
    """
    b, h = batch["history"].shape
    c = batch["candidates"].shape[1]
    has_profile = "profile" in batch
    if "item_ids" in batch:
      # Deduplicated: encode the U distinct items, then gather by position.
      # Host-resident fields' rows [U, ...] come with the batch instead.
      ids = batch["item_ids"]  # [U]
      host_tokens, host_masks = batching.batch_host_rows(batch)
      vecs = self.encode_items(
          {**_gather_rows(item_tokens, ids), **host_tokens},
          {**_gather_rows(item_masks, ids), **host_masks})  # [U, D]
      hist = jnp.take(vecs, batch["history_pos"], axis=0)  # [B, H, D]
      cands = jnp.take(vecs, batch["candidate_pos"], axis=0)  # [B, C, D]
      profile = (jnp.take(vecs, batch["profile_pos"], axis=0)
                 if has_profile else None)  # [B, D]
      return hist, cands, profile, vecs
    parts = [batch["history"].reshape(-1), batch["candidates"].reshape(-1)]
    if has_profile:
      parts.append(batch["profile"])
    ids = jnp.concatenate(parts)  # [B * (H + C) (+ B)]
    vecs = self.encode_items(_gather_rows(item_tokens, ids),
                             _gather_rows(item_masks, ids))  # [len(ids), D]
    hist = vecs[:b * h].reshape(b, h, -1)  # [B, H, D]
    cands = vecs[b * h:b * (h + c)].reshape(b, c, -1)  # [B, C, D]
    profile = vecs[b * (h + c):] if has_profile else None  # [B, D]
    return hist, cands, profile, vecs

  def __call__(self, batch: dict[str, jax.Array],
               item_tokens: dict[str, jax.Array],
               item_masks: dict[str, jax.Array]
               ) -> tuple[jax.Array, dict[str, Any]]:
    """Scores a batch of impressions.

    Args:
      batch: history [B, H] int32, history_mask [B, H], candidates [B, C]
        int32, candidate_mask [B, C], users [B] int32; optionally profile [B]
        (GENRE profile pseudo-items, 0 = none); optionally item_ids [U] with
        history_pos [B, H], candidate_pos [B, C] (and profile_pos [B]),
        positions into item_ids, to encode each distinct item once; with
        item_ids, the rows [U, ...] of host-resident item fields under
        batching.HOST_ROWS keys (not in item_tokens/item_masks).
      item_tokens: field -> [N_items + 1, L_f] int32 token table.
      item_masks: field -> [N_items + 1, L_f] bool.

    Returns:
      float32 logits [B, C] (MASKED_LOGIT on padded candidates) and an aux dict
      with "user", "history", "candidates", "items" and, for multi-interest
      users, MINER's "disagreement" regulariser and "aux_loss" (it times
      config.model.poly.disagreement_weight), to be added to the loss.
    """
    hist, cands, profile, vecs = self._item_vectors(batch, item_tokens,
                                                    item_masks)
    hist, hist_mask = self.with_profile(
        hist, batch["history_mask"].astype(bool), profile,
        batch.get("profile"))  # [B, H(+1), D], [B, H(+1)]
    user = self.encode_users(hist, hist_mask, batch["users"])
    logits = self.score(user, cands, hist, hist_mask).astype(jnp.float32)
    logits = jnp.where(batch["candidate_mask"].astype(bool), logits,
                       MASKED_LOGIT)  # [B, C]
    aux = {"user": user, "history": hist, "candidates": cands, "items": vecs}
    if user.ndim == 3:
      aux["disagreement"] = layers.disagreement(user)
      aux["aux_loss"] = self.disagreement_weight * aux["disagreement"]
    return logits, aux


def set_training(model: nnx.Module, training: bool) -> None:
  """Turns dropout on (training) or off (evaluation) in every submodule."""
  if training:
    model.train()
  else:
    model.eval()


def build_model(config: ml_collections.ConfigDict, spec: ItemInputSpec,
                seed: int) -> Recommender:
  """The configured Recommender, initialised from `seed`, in training mode.

  Parameters come from the 'params' stream and dropout masks from the
  'dropout' stream of nnx.Rngs(seed).
  """
  if len(spec.fields) != len(spec.lengths) or not spec.fields:
    raise ConfigError(
        f"config.data.fields: spec has fields {spec.fields} but lengths "
        f"{spec.lengths}; need one length per field and at least one field")
  if config.model.get("scaled_dot", False) and config.model.predictor != "dot":
    raise ConfigError(
        "config.model.scaled_dot=True scales the dot predictor's scores, but "
        f"config.model.predictor is '{config.model.predictor}'; set "
        "predictor=dot or scaled_dot=False")
  rngs = nnx.Rngs(params=seed, dropout=jax.random.fold_in(
      jax.random.key(seed), 1))
  model = Recommender(config, spec, rngs=rngs)
  model.train()
  return model
