r"""NRMS with item identity: each item's vector is NRMS's title encoding plus
a learnt vector of its own (zero for items unseen in training, which are
scored from their text alone). Legommenders' ID-based variants.

  python run.py --config=configs/nrms_id.py:goodreads \
      --config.data.path=../shared/data/goodreads --workdir=/tmp/nrms_id

`:goodreads` also gives every item seen in training its 512 spectral
co-occurrence dimensions (model.hybrid.spectral_dim; data/cooccurrence.py):
the table alone learns who-read-what slowly from next-book clicks (test AUC
0.8376, MRR 0.5345 without them; 0.8562 / 0.5746 with 256 dimensions;
0.8567 / 0.5787 with 512, in 23 minutes on a 2-core CPU; README).
"""

from genre_jax.config import apply_dataset, base_config


def get_config(arg=None):
  c = base_config()
  c.model.item_encoder = "hybrid"
  c.model.hybrid.content = "self_attention"
  apply_dataset(c, arg)
  if (arg or "").strip() == "goodreads":
    c.model.hybrid.spectral_dim = 512
  return c
