"""Recommender models; importing this package registers every part by name."""

from genre_jax.models import id_encoders
from genre_jax.models import item_encoders
from genre_jax.models import layers
from genre_jax.models import lm_encoder
from genre_jax.models import predictors
from genre_jax.models import user_encoders
from genre_jax.models.recommender import build_model
from genre_jax.models.recommender import Recommender
from genre_jax.models.recommender import set_training

__all__ = ["Recommender", "build_model", "set_training", "id_encoders",
           "item_encoders",
           "layers", "lm_encoder", "predictors", "user_encoders"]
