"""Tiny random Hugging Face models, written with transformers' save_pretrained.

The parity checks of every LM family (experiments/lm_parity.py
--families=...) and the tests (tests/helpers.py imports these) build their
models here: a few layers of hidden size 32, fp32 safetensors, with a
WordLevel tokenizer.json where the family generates. Not a script: the
scripts beside it import it as `tiny_lms`, the tests as
`experiments.tiny_lms`. torch, transformers and tokenizers are imported only
inside the builders.
"""

from __future__ import annotations

import json
import os
import pathlib

# The words of the WordLevel vocabularies.
SENTENCES = [
    "you recommend books to a reader",
    "books liked : the hobbit , dune , emma",
    "reply with a json object with title and description",
    "assistant : a new book about dragons and the sea",
]

# transformers' config and causal-LM classes of the model types that
# build_tiny_causal_lm writes.
CAUSAL_LM_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}

# transformers' config and model classes of the encoders build_tiny_bert
# writes (RoBERTa as a masked-LM head model: its tensors under `roberta.`).
ENCODER_CLASSES = {
    "bert": ("BertConfig", "BertModel"),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel"),
}


def randomize_weights(model, scale: float = 0.2) -> None:
  """Redraws every parameter of a torch model (HF's init leaves biases at 0
  and LayerNorms at 1, which would hide a bias or norm a port got wrong)."""
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator) * scale
      param.copy_(1.0 + noise if name.endswith("norm.weight") or
                  "LayerNorm.weight" in name else noise)


def word_level_tokenizer():
  """A WordLevel tokenizer over SENTENCES: <pad> 0, <s> 1, </s> 2, <unk> 3;
  encodings start with <s>."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      unk_token="<unk>"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  trainer = tokenizers.trainers.WordLevelTrainer(
      special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
  tokenizer.train_from_iterator(SENTENCES, trainer)
  tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", 1)])
  return tokenizer


def build_tiny_causal_lm(model_dir: pathlib.Path, model_type: str = "llama",
                         *, vocab_size: int = 128, special_tokens=(),
                         eos_token: str = "</s>", chat_template=None,
                         seed: int = 0, max_shard_size=None,
                         randomize: bool = False,
                         **config) -> pathlib.Path:
  """Saves a tiny random `model_type` causal LM (fp32 safetensors) with a
  WordLevel tokenizer.json of exactly `vocab_size` entries.

  The vocabulary is <pad> <s> </s> <unk>, then `special_tokens` (added as
  special tokens, e.g. chat markers), the words of SENTENCES, and filler
  words w0, w1, ...; the tokenizer prepends <s>. The model has 2 layers,
  hidden size 32, 4 query and 2 key/value heads unless `config` says
  otherwise, and eos_token_id = `eos_token`'s id. With a `chat_template`,
  a tokenizer_config.json holding it is written too; with a
  `max_shard_size` (e.g. "20KB") the weights are sharded. With `randomize`
  every weight, bias and norm is redrawn (`randomize_weights`); otherwise
  the model keeps transformers' initialisation (norms 1, biases 0).
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model_dir = pathlib.Path(model_dir)
  specials = ["<pad>", "<s>", "</s>", "<unk>", *special_tokens]
  words = list(dict.fromkeys(w for s in SENTENCES for w in s.split()))
  vocab = {}
  for token in specials + words:
    vocab.setdefault(token, len(vocab))
  filler = 0
  while len(vocab) < vocab_size:
    vocab[f"w{filler}"] = len(vocab)
    filler += 1
  if len(vocab) > vocab_size:
    raise ValueError(f"vocab_size {vocab_size} < {len(vocab)} tokens")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      vocab=vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tokenizer.add_special_tokens(specials)
  tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", 1)])
  config_class, model_class = CAUSAL_LM_CLASSES[model_type]
  settings = dict(
      vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
      max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
      eos_token_id=vocab[eos_token], tie_word_embeddings=False)
  settings.update(config)
  settings.setdefault("head_dim", settings["hidden_size"] //
                      settings["num_attention_heads"])
  torch.manual_seed(seed)
  model = getattr(transformers, model_class)(
      getattr(transformers, config_class)(**settings)).eval()
  if randomize:
    randomize_weights(model)
  model.save_pretrained(model_dir, safe_serialization=True,
                        **({"max_shard_size": max_shard_size}
                           if max_shard_size else {}))
  tokenizer.save(str(model_dir / "tokenizer.json"))
  if chat_template is not None:
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": eos_token, "unk_token": "<unk>", "pad_token": "<pad>",
        "chat_template": chat_template}))
  return model_dir


def build_tiny_opt(model_dir: pathlib.Path, *, minilm_tokenizer: bool = False,
                   **config) -> pathlib.Path:
  """Saves a tiny random OPTForCausalLM (every weight, biases and LayerNorms
  too, drawn at random) with a tokenizer.json: a WordLevel one over
  SENTENCES (pad 0, bos 1, eos 2), or with `minilm_tokenizer` a link to
  the default MiniLM one (vocab 30522). `config` overrides OPTConfig fields.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from genre_jax.lm import hf  # pylint: disable=g-import-not-at-top
  model_dir = pathlib.Path(model_dir)
  model_dir.mkdir(parents=True, exist_ok=True)
  if minilm_tokenizer:
    os.symlink(os.path.join(hf.model_dir(), hf.TOKENIZER_FILE),
               model_dir / hf.TOKENIZER_FILE)
    vocab = 30522
  else:
    tokenizer = word_level_tokenizer()
    tokenizer.save(str(model_dir / hf.TOKENIZER_FILE))
    vocab = tokenizer.get_vocab_size()
  settings = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, ffn_dim=64,
                  max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
  settings.update(config)
  torch.manual_seed(0)
  model = transformers.OPTForCausalLM(
      transformers.OPTConfig(**settings)).eval()
  randomize_weights(model)
  model.save_pretrained(model_dir, safe_serialization=True)
  return model_dir


def build_tiny_bert(model_dir: pathlib.Path, model_type: str = "bert", *,
                    seed: int = 0, **config) -> pathlib.Path:
  """Saves a tiny random bidirectional encoder of `model_type` (bert,
  roberta or xlm-roberta; ENCODER_CLASSES), every weight, bias and
  LayerNorm redrawn: 2 layers, hidden size 32, 4 heads, vocabulary 128,
  unless `config` says otherwise. RoBERTa's pad_token_id is 1 and its
  positions start after it, so max_position_embeddings is 64 + 2 there."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  roberta = model_type != "bert"
  settings = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=66 if roberta else 64,
                  pad_token_id=1 if roberta else 0)
  if roberta:
    settings.update(type_vocab_size=1, layer_norm_eps=1e-5)
  settings.update(config)
  config_class, model_class = ENCODER_CLASSES[model_type]
  torch.manual_seed(seed)
  model = getattr(transformers, model_class)(
      getattr(transformers, config_class)(**settings)).eval()
  randomize_weights(model)
  model.save_pretrained(model_dir, safe_serialization=True)
  return pathlib.Path(model_dir)
