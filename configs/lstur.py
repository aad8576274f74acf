r"""LSTUR: An et al., "Neural News Recommendation with Long- and Short-term
User Representations" (ACL 2019). Items: word CNN + additive attention over
the title and categories; users: a GRU over the history whose initial state
is the user-id embedding (LSTUR-ini); click score: dot product.

  python run.py --config=configs/lstur.py --workdir=/tmp/lstur
"""

from genre_jax.config import apply_dataset, base_config


def get_config(arg=None):
  c = base_config()
  c.model.item_encoder = "cnn"
  c.model.user_encoder = "gru"
  c.data.fields = ("title", "category", "subcategory")
  apply_dataset(c, arg)
  if arg == "goodreads":
    c.data.fields = ("title",)
  return c
