r"""Masked-LM pretraining of all-MiniLM-L6-v2 on the item corpus.

Continues BERT's masked-LM objective (Devlin et al., NAACL 2019) on the
dataset's own item text (titles, abstracts, and GENRE-generated text when the
dataset carries it), the domain-adaptive pretraining step before using the
model as an item encoder (Gururangan et al., "Don't Stop Pretraining", ACL
2020; PLM-NR, Wu et al., SIGIR 2021).

  python run.py --mode=pretrain --config=configs/mlm_minilm.py \
      --workdir=/tmp/mlm
  # then fine-tune a recommender from it:
  python run.py --config=configs/bert_nrms.py \
      --config.model.lm.init=/tmp/mlm --workdir=/tmp/bert_nrms_mlm

`--config.pretrain.accumulate_steps=K` makes each update the mean gradient
of K batches of `pretrain.batch_size` (`pretrain.steps` counts batches,
`warmup_steps` updates, as in training); the K batches hold the rows one
batch of K x batch_size would. `--config.pretrain.from_scratch=True` trains
the same architecture from a random initialisation instead. Dataset argument as for the recommender
presets (`configs/mlm_minilm.py:goodreads`).
"""

import ml_collections

from genre_jax.config import apply_dataset, base_config


def get_config(arg=None):
  c = base_config()
  c.model.item_encoder = "lm"
  c.model.lm.kind = "bert"
  c.data.fields = ("title", "abstract")
  c.model.lm.max_len = 64
  c.pretrain = ml_collections.ConfigDict(dict(
      from_scratch=False, mask_rate=0.15, steps=300, batch_size=32,
      accumulate_steps=1, lr=5e-5, warmup_steps=30, log_every=20,
      checkpoint_every=100))
  apply_dataset(c, arg)
  return c
