r"""Fastformer: Wu et al., "Fastformer: Additive Attention Can Be All You
Need" (2021), used as news and user encoder as in its news-recommendation
experiments (Fastformer-NR). Click score: dot product.

  python run.py --config=configs/fastformer.py --workdir=/tmp/fastformer
"""

from genre_jax.config import apply_dataset, base_config


def get_config(arg=None):
  c = base_config()
  c.model.item_encoder = "fastformer"
  c.model.user_encoder = "fastformer"
  # Post-LN encoders emit unit-variance features: unscaled dot scores start ~8
  # logits apart and training collapsed (AUC 0.49; experiments/init_scale.py).
  c.model.scaled_dot = True
  apply_dataset(c, arg)
  return c
