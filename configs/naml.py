r"""NAML: Wu et al., "Neural News Recommendation with Attentive Multi-View
Learning" (IJCAI 2019). Items: a word CNN + additive attention per text field
(title, abstract, category, subcategory), then attention across fields;
users: additive attention; click score: dot product.

  python run.py --config=configs/naml.py --workdir=/tmp/naml
  python run.py --config=configs/naml.py:goodreads \
      --config.data.path=../shared/data/goodreads --workdir=/tmp/naml_gr

On Goodreads only titles exist (no abstract or categories), so NAML reads the
title field alone there, as the MIND paper's title-only NAML does.
"""

from genre_jax.config import apply_dataset, base_config


def get_config(arg=None):
  c = base_config()
  c.model.item_encoder = "cnn"
  c.model.user_encoder = "additive"
  c.data.fields = ("title", "abstract", "category", "subcategory")
  apply_dataset(c, arg)
  if arg == "goodreads":
    c.data.fields = ("title",)
  return c
