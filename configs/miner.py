r"""MINER: Li et al., "MINER: Multi-Interest Matching Network for News
Recommendation" (ACL 2022). Items: self-attention title encoder (the paper
uses BERT; see configs/bert_nrms.py for pretrained item encoders); users:
poly attention with learnable context codes giving several interest vectors;
click score: target-aware aggregation of the per-interest dot products.

  python run.py --config=configs/miner.py --workdir=/tmp/miner
"""

from genre_jax.config import apply_dataset, base_config


def get_config(arg=None):
  c = base_config()
  c.model.user_encoder = "poly"
  apply_dataset(c, arg)
  return c
