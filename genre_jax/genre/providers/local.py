"""The `local` GENRE provider: batched generation with a Flax causal LM (any
causal family of lm/families.py: Llama, OPT, ...) from a local Hugging Face
model dir (imported, with JAX, only when built).
"""

from __future__ import annotations

import datetime
import functools
import json
import pathlib
from typing import Sequence

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from genre_jax.data import tokenize as tokenize_lib
from genre_jax.errors import ConfigError
from genre_jax.genre.providers.base import (Prompt, Provider, ReplyCache,
                                            request_fingerprint)
from genre_jax.lm import families


def render_plain(system: str, user: str) -> str:
  """The fallback chat format when a model has no usable chat template."""
  return f"{system}\n\n{user}\n\nassistant:"


def _template_source(model_dir: pathlib.Path,
                     config: dict) -> tuple[str | None, pathlib.Path]:
  """The chat template's Jinja source and the file it came from, as
  transformers finds it: chat_template.jinja (where transformers >= 4.47
  saves it), else tokenizer_config.json's "chat_template", a string or a
  list of {"name", "template"} (the one named "default")."""
  jinja_file = model_dir / "chat_template.jinja"
  if jinja_file.is_file():
    return jinja_file.read_text(encoding="utf-8"), jinja_file
  source = config.get("chat_template")
  if isinstance(source, list):
    source = next((t.get("template") for t in source if isinstance(t, dict)
                   and t.get("name") == "default"), None)
  path = model_dir / "tokenizer_config.json"
  return (source if isinstance(source, str) else None), path


def chat_renderer(model_dir: pathlib.Path):
  """A function (system, user) -> text from the model's Jinja chat template,
  or None when there is none or it cannot render.

  The template renders in the environment transformers' apply_chat_template
  gives it (sandboxed, loop controls, raise_exception, strftime_now, a tojson
  that does not escape HTML). A template that refuses a system message (as
  Mistral's [INST] templates do) gets the system text folded into the user
  message: "system\n\nuser".
  """
  path = model_dir / "tokenizer_config.json"
  try:
    config = (json.loads(path.read_text(encoding="utf-8"))
              if path.is_file() else {})
    if not isinstance(config, dict):
      config = {}
    source, path = _template_source(model_dir, config)
    if source is None:
      return None
    # Optional: jinja2 is not a dependency of genre_jax (transformers has it).
    import jinja2.sandbox  # pylint: disable=g-import-not-at-top
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None,
               sort_keys=False):
      return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                        separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = (
        lambda fmt: datetime.datetime.now().strftime(fmt))
    template = env.from_string(source)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("%s: chat template unusable (%s); using plain format",
                    path, e)
    return None

  def token_text(name):
    value = config.get(name) or ""
    return value.get("content", "") if isinstance(value, dict) else value

  def with_system(system: str, user: str) -> str:
    return template.render(
        messages=[{"role": "system", "content": system},
                  {"role": "user", "content": user}],
        add_generation_prompt=True, bos_token=token_text("bos_token"),
        eos_token=token_text("eos_token"))

  def folded(system: str, user: str) -> str:
    return template.render(
        messages=[{"role": "user", "content": f"{system}\n\n{user}"}],
        add_generation_prompt=True, bos_token=token_text("bos_token"),
        eos_token=token_text("eos_token"))

  errors = []
  for render in (with_system, folded):  # Probe each once.
    try:
      render("system", "user")
      return render
    except Exception as e:  # pylint: disable=broad-except
      errors.append(str(e))
  logging.warning("%s: chat template failed (%s); using plain format",
                  path, "; ".join(errors))
  return None


def _eos_ids(model_dir: pathlib.Path) -> set[int]:
  """End-of-sequence ids from config.json and generation_config.json."""
  ids = set()
  for name in ("config.json", "generation_config.json"):
    path = model_dir / name
    if path.is_file():
      value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
      if isinstance(value, int):
        ids.add(value)
      elif isinstance(value, list):
        ids.update(v for v in value if isinstance(v, int))
  return ids


@jax.jit
def sample_next(logits: jax.Array, rng: jax.Array, temperature: jax.Array,
                top_p: jax.Array) -> jax.Array:
  """Next token ids [B] from last-position logits [B, V].

  Greedy (argmax) where temperature == 0; otherwise nucleus sampling: the
  smallest set of most likely tokens whose probability reaches `top_p` (at
  least one token), sampled at `temperature`. Both are traced scalars, so
  one compiled step serves every setting.
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)        # [B]
  scaled = logits / jnp.maximum(temperature, 1e-6)
  order = jnp.argsort(-scaled, axis=-1)                          # [B, V]
  probs = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # Mass of likelier tokens.
  keep = jnp.zeros(scaled.shape, bool).at[
      jnp.arange(scaled.shape[0])[:, None], order].set(before < top_p)
  sampled = jax.random.categorical(rng, jnp.where(keep, scaled, -jnp.inf),
                                   axis=-1).astype(jnp.int32)    # [B]
  return jnp.where(temperature > 0, sampled, greedy)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode_step(state, ids, cache, positions, mask, rng, temperature, top_p,
                 graphdef):
  """One model step on ids [B, T] and the next token ids [B] it picks."""
  model = nnx.merge(graphdef, state)
  logits, cache = model.step(ids, cache, positions, mask)  # [B, T, V]
  return sample_next(logits[:, -1], rng, temperature, top_p), cache


class LocalProvider(Provider):
  """Generation with a Flax causal LM from a Hugging Face model dir.

  Prompts are rendered with the model's chat template (tokenizer_config.json,
  when present and compilable) or `render_plain`, tokenized with the dir's
  tokenizer.json, left-padded into fixed [batch_size, P] batches (P the next
  power of two >= the longest prompt, at most `max_prompt_len`; longer
  prompts keep their last tokens, counted in stats["truncated_prompts"]),
  prefilled, then decoded one token per jitted step until every row hit EOS,
  a stop string, or `max_new_tokens`. temperature 0 is greedy.

  With a `cache_path`, each batch's replies are appended to a ReplyCache as
  soon as it is decoded, keyed by prompt and a fingerprint of the model
  files and generation settings: a crashed or re-run generation decodes
  only what is missing (sampled replies then differ from an uninterrupted
  run's, as the random stream is not replayed).
  """

  def __init__(self, model_dir: str, *, dtype: str = "float32",
               batch_size: int = 8, max_new_tokens: int = 128,
               max_prompt_len: int = 1024, temperature: float = 0.0,
               top_p: float = 1.0, stop: Sequence[str] = (), seed: int = 0,
               chat_template: bool = True, stop_check_every: int = 8,
               cache_path: str = ""):
    super().__init__()
    if batch_size < 1 or max_new_tokens < 1 or max_prompt_len < 1:
      raise ConfigError("local provider: batch_size, max_new_tokens and "
                        "max_prompt_len must be >= 1")
    if not 0.0 < top_p <= 1.0:
      raise ConfigError(f"local provider: top_p must be in (0, 1], got {top_p}")
    self.model_dir = pathlib.Path(model_dir).expanduser()
    self.dtype = jnp.dtype(dtype)
    family = families.family_of(self.model_dir)
    if not family.causal:
      raise ConfigError(f"local provider: {self.model_dir} holds a "
                        f"'{family.name}' model, which cannot generate; "
                        "give a causal LM (" + ", ".join(
                            f.name for f in families.FAMILIES.values()
                            if f.causal) + ")")
    # Any causal family decodes through init_cache and step.
    self.model, self.config = family.load(
        str(self.model_dir), dtype=self.dtype, rngs=nnx.Rngs(seed))
    self.tokenizer = tokenize_lib.load_tokenizer(str(self.model_dir),
                                                 field="local provider")
    self.tokenizer.no_padding()
    self.tokenizer.no_truncation()
    self.render = (chat_renderer(self.model_dir) if chat_template else None)
    self.add_special_tokens = self.render is None
    self.render = self.render or render_plain
    self.eos_ids = _eos_ids(self.model_dir)
    self.pad_id = min(self.eos_ids) if self.eos_ids else 0
    self.batch_size = batch_size
    self.max_new_tokens = max_new_tokens
    self.max_prompt_len = max_prompt_len
    self.stop = tuple(s for s in stop if s)
    self.stop_check_every = max(1, stop_check_every)
    self._rng = jax.random.key(seed)
    # What shapes a reply besides the prompt: the model's files as they are
    # now (weights replaced in place ask again) and the generation settings.
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                   for f in self.model_dir.iterdir() if f.is_file())
    self._settings = {
        "model": str(self.model_dir.resolve()), "files": files,
        "dtype": self.dtype.name, "max_new_tokens": max_new_tokens,
        "max_prompt_len": max_prompt_len, "temperature": float(temperature),
        "top_p": float(top_p), "stop": list(self.stop), "seed": seed,
        "chat_template": bool(chat_template)}
    self.cache = ReplyCache(cache_path) if cache_path else None
    if self.cache is not None:
      self.stats["torn_cache_lines"] = self.cache.torn
      self.stats["ignored_cache_rows"] = self.cache.ignored
    graphdef, self._state = nnx.split(self.model)
    # Module-level jit keyed on the (hashable) graph definition: providers on
    # models of one shape share a compiled step, whatever their sampling.
    self._step = functools.partial(
        _decode_step, temperature=jnp.float32(temperature),
        top_p=jnp.float32(top_p), graphdef=graphdef)

  def _encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
    texts = [self.render(p.system, p.user) for p in prompts]
    encodings = self.tokenizer.encode_batch(
        texts, add_special_tokens=self.add_special_tokens)
    ids = []
    for encoding in encodings:
      tokens = list(encoding.ids)
      if len(tokens) > self.max_prompt_len:
        self.stats["truncated_prompts"] += 1
        tokens = tokens[-self.max_prompt_len:]
      ids.append(tokens)
    return ids

  def _generate_batch(self, token_lists: list[list[int]]) -> list[str]:
    return [self._finish(tokens) for tokens in self.generate_tokens(
        token_lists)]

  def generate_tokens(self, token_lists: Sequence[Sequence[int]]
                      ) -> list[np.ndarray]:
    """Decodes one batch of at most `batch_size` prompts given as token ids.

    Returns each row's new token ids: up to `max_new_tokens`, ending at the
    first end-of-sequence token (included) or once a stop string showed.
    """
    token_lists = [list(t) for t in token_lists]
    rows = len(token_lists)
    if not 1 <= rows <= self.batch_size:
      raise ValueError(f"generate_tokens: {rows} prompts, expected 1 to "
                       f"batch_size={self.batch_size}")
    longest = max(max(len(t) for t in token_lists), 1)
    length = min(self.max_prompt_len, 1 << (longest - 1).bit_length())
    length = max(length, min(16, self.max_prompt_len))
    ids = np.full((self.batch_size, length), self.pad_id, np.int32)
    mask = np.zeros((self.batch_size, length), bool)
    for row, tokens in enumerate(token_lists):  # Left padding.
      if tokens:
        ids[row, length - len(tokens):] = tokens
        mask[row, length - len(tokens):] = True
    mask[rows:, -1] = True  # Filler rows: one token, so softmax is defined.
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    cache = self.model.init_cache(self.batch_size,
                                  length + self.max_new_tokens, self.dtype)
    self._rng, rng = jax.random.split(self._rng)
    token, cache = self._step(self._state, jnp.asarray(ids), cache,
                              jnp.asarray(positions), jnp.asarray(mask), rng)
    next_pos = positions[:, -1:] + 1                                # [B, 1]
    ones = jnp.ones((self.batch_size, 1), bool)
    out = np.zeros((self.batch_size, self.max_new_tokens), np.int32)
    done = np.zeros(self.batch_size, bool)
    done[rows:] = True
    lengths = np.zeros(self.batch_size, np.int64)
    for t in range(self.max_new_tokens):
      token_np = np.asarray(token)
      live = ~done
      out[live, t] = token_np[live]
      lengths[live] += 1
      done |= np.isin(token_np, list(self.eos_ids)) & live
      if self.stop and (t + 1) % self.stop_check_every == 0:
        done |= self._hit_stop(out, lengths)
      if done.all() or t + 1 == self.max_new_tokens:
        break
      self._rng, rng = jax.random.split(self._rng)
      token, cache = self._step(self._state, token[:, None], cache,
                                jnp.asarray(next_pos), ones, rng)
      next_pos = next_pos + 1
    self.stats["generated_tokens"] += int(lengths[:rows].sum())
    return [out[r, :lengths[r]] for r in range(rows)]

  def _hit_stop(self, out: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    texts = self.tokenizer.decode_batch(
        [out[r, :lengths[r]].tolist() for r in range(len(lengths))])
    return np.array([any(s in text for s in self.stop) for text in texts])

  def _finish(self, tokens: np.ndarray) -> str:
    """Reply text: tokens up to EOS, decoded, cut at the first stop string."""
    tokens = tokens.tolist()
    for i, token in enumerate(tokens):
      if token in self.eos_ids:
        tokens = tokens[:i]
        break
    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
    cuts = [text.find(s) for s in self.stop if s in text]
    return (text[:min(cuts)] if cuts else text).strip()

  def generate(self, prompts: Sequence[Prompt]) -> list[str]:
    replies: list[str] = [""] * len(prompts)
    fingerprints = [request_fingerprint(self._settings, p) for p in prompts]
    todo = []  # Indices of the prompts to decode.
    for i, (prompt, fingerprint) in enumerate(zip(prompts, fingerprints)):
      cached = (self.cache.get(prompt.key, fingerprint)
                if self.cache is not None else None)
      if cached is None:
        todo.append(i)
      else:
        replies[i] = cached
        self.stats["cache_hits"] += 1
    token_lists = self._encode([prompts[i] for i in todo])
    for start in range(0, len(todo), self.batch_size):
      batch = todo[start:start + self.batch_size]
      answers = self._generate_batch(
          token_lists[start:start + self.batch_size])
      for i, answer in zip(batch, answers):
        replies[i] = answer
        if self.cache is not None and answer:  # "" is decoded again.
          self.cache.add(prompts[i].key, fingerprints[i], answer,
                         self._settings["model"])
    return replies

  def close(self) -> None:
    if self.cache is not None:
      self.cache.close()
