r"""NRMS: Wu et al., "Neural News Recommendation with Multi-Head Self-Attention"
(EMNLP 2019). Items: word embeddings -> multi-head self-attention -> additive
attention; users: self-attention over history item vectors -> additive
attention; click score: dot product.

  # Synthetic demo (CPU, a few minutes):
  python run.py --config=configs/nrms.py --workdir=/tmp/nrms
  # Goodreads (GENRE/ONCE benchmark):
  python run.py --config=configs/nrms.py:goodreads \
      --config.data.path=../shared/data/goodreads --workdir=/tmp/nrms_gr

Data-specific settings (history length, title length, epochs) come from the
dataset argument; see genre_jax.config.apply_dataset.
"""

from genre_jax.config import apply_dataset, base_config


def get_config(arg=None):
  c = base_config()  # base_config's model is NRMS: nothing to change.
  apply_dataset(c, arg)
  return c
