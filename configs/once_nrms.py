r"""ONCE's DIRE at MiniLM scale: an open LM encodes item text, NRMS users.

Liu et al., "ONCE: Boosting Content-based Recommendation with Both Open- and
Closed-source Large Language Models" (WSDM 2024). The LM's lower layers are
frozen and their output cached once (layers 0-4 of all-MiniLM-L6-v2), its top
layer is tuned, and ONCE's item head projects every token of the last layer
and pools them by additive attention (`lm.pooling=attention`).

  python run.py --config=configs/once_nrms.py:goodreads \
      --config.data.path=../shared/data/goodreads --workdir=/tmp/once_nrms

With a Llama-family LLM as ONCE ran it (LLaMA-7B: 32 layers, the top two
tuned, or LoRA rank 32 on them; one GPU):

  python run.py --config=configs/once_nrms.py:goodreads \
      --config.model.lm.path=/path/to/Llama-2-7b-hf \
      --config.model.lm.tune_from=30 --config.model.lm.lora.rank=32 \
      --config.model.lm.lora.targets="('q_proj','v_proj')" \
      --config.model.lm.cache_dtype=bfloat16 --config.model.dtype=bfloat16 \
      --workdir=/tmp/once_llama

Data-specific (`:goodreads`): titles cut at 20 word pieces (95% fit in 16),
history from the dataset argument, and two epochs (the learning rate decays
over them): with the tuned MiniLM layer a step costs ~3x an NRMS step,
and two epochs keep the run inside the issue's 90 minutes on a 2-core CPU.
"""

from genre_jax.config import apply_dataset, base_config


def get_config(arg=None):
  c = base_config()
  c.model.item_encoder = "lm"
  c.model.lm.tune_from = 5
  c.model.lm.pooling = "attention"
  c.model.lm.lr = 1e-4
  apply_dataset(c, arg)
  if (arg or "").strip() == "goodreads":
    c.model.lm.max_len = 20
    c.train.epochs = 2
  return c
