r"""BERT-NAML: a pretrained BERT reads a worded template of the item's fields
(title and category), NAML's additive attention encodes users.

NAML: Wu et al., "Neural News Recommendation with Attentive Multi-View
Learning" (IJCAI 2019), with its word-CNN views replaced by one pretrained
LM over "Title: ... Category: ..." as in PLM-NR (Wu et al., SIGIR 2021) and
ONCE (Liu et al., WSDM 2024). Defaults as bert_nrms (all MiniLM layers
frozen and cached; see that preset for the GPU settings).

  python run.py --config=configs/bert_naml.py:goodreads \
      --config.data.path=../shared/data/goodreads --workdir=/tmp/bert_naml

Data-specific: the template names the dataset's fields (every Goodreads
category is "book": `:goodreads` sets lm.template="Title: {title}").
"""

from genre_jax.config import apply_dataset, base_config


def get_config(arg=None):
  c = base_config()
  c.model.item_encoder = "lm"
  c.model.user_encoder = "additive"
  c.model.lm.kind = "bert"
  c.model.lm.template = "Title: {title} Category: {category}"
  c.model.lm.max_len = 40
  c.model.lm.tune_from = 6
  c.model.lm.lr = 1e-5
  apply_dataset(c, arg)
  if (arg or "").strip() == "goodreads":
    c.model.lm.template = "Title: {title}"
  return c
