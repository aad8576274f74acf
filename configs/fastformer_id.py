r"""Fastformer with item identity: the Fastformer item vector plus a learnt
vector per item seen in training (content alone for the others).

`:goodreads` reads the GENRE summaries in place of the titles (the release's
GPT-3.5 descriptions: +0.012 test AUC for plain Fastformer, README) and
trains two epochs: a step on 32-piece summaries costs twice one on titles,
and the identity table has converged by then (nrms_id gains 0.002 dev AUC
in its third epoch while its training loss keeps falling).

  python run.py --config=configs/fastformer_id.py:goodreads \
      --config.data.path=../shared/data/goodreads --workdir=/tmp/fastformer_id
"""

from genre_jax.config import apply_dataset, base_config


def get_config(arg=None):
  c = base_config()
  c.model.item_encoder = "hybrid"
  c.model.hybrid.content = "fastformer"
  c.model.user_encoder = "fastformer"
  # Post-LN encoders emit unit-variance features: scores scaled by
  # 1/sqrt(hidden_dim) (see configs/fastformer.py).
  c.model.scaled_dot = True
  apply_dataset(c, arg)
  if (arg or "").strip() == "goodreads":
    c.data.genre.summarizer = "release"
    c.data.genre.summary_field = "title"
    c.data.max_len.title = c.data.max_len.summary
    c.train.epochs = 2
  return c
