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
  c.model.predictor = "dot"
  c.model.fastformer.num_layers = 1
  c.model.num_heads = 16
  # The post-LN Fastformer encoders emit unit-variance features: unscaled, the
  # 256-d inner products start ~8 logits apart within a Goodreads impression
  # (NRMS: 0.01; experiments/init_scale.py), and training collapsed to equal
  # scores (test AUC 0.49 after one epoch).
  c.model.scaled_dot = True
  apply_dataset(c, arg)
  return c
