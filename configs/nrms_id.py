r"""NRMS with item identity: each item's vector is NRMS's title encoding plus
a learnt vector of its own (zero for items unseen in training, which are
scored from their text alone). Legommenders' ID-based variants.

  python run.py --config=configs/nrms_id.py:goodreads \
      --config.data.path=../shared/data/goodreads --workdir=/tmp/nrms_id
"""

from genre_jax.config import apply_dataset, base_config


def get_config(arg=None):
  c = base_config()
  c.model.item_encoder = "hybrid"
  c.model.hybrid.content = "self_attention"
  apply_dataset(c, arg)
  return c
