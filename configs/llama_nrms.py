r"""Llama-NRMS (ONCE's DIRE): a Llama-family decoder encodes item text
(last-token pooling), NRMS encodes users.

Liu et al., "ONCE: Boosting Content-based Recommendation with Both Open- and
Closed-source Large Language Models" (WSDM 2024): the LLM's lower layers are
frozen and their hidden states cached, the top layers are fine-tuned (or
LoRA adapters, `--config.model.lm.lora.rank=8`). Needs a local Hugging Face
Llama-family directory (nothing is downloaded):

  python run.py --config=configs/llama_nrms.py:goodreads \
      --config.data.path=../shared/data/goodreads \
      --config.model.lm.path=/models/Llama-2-7b-hf \
      --config.model.lm.tune_from=30 --workdir=/tmp/llama_nrms

tune_from=30 of Llama-2-7B's 32 layers tunes the top two, as in ONCE.
"""

from genre_jax.config import apply_dataset, base_config


def get_config(arg=None):
  c = base_config()
  c.model.item_encoder = "lm"
  c.model.lm.kind = "llama"
  c.model.lm.pooling = "last"
  c.model.lm.tune_from = 30
  c.model.lm.cache_dtype = "bfloat16"
  c.model.lm.lora.targets = ("q_proj", "v_proj")
  c.model.lm.lr = 1e-4
  c.model.dtype = "bfloat16"
  apply_dataset(c, arg)
  return c
