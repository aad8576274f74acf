"""LLM providers for GENRE: one `generate(prompts) -> replies` interface.

Importing the package registers every provider in PROVIDERS: replay, openai,
and local, whose module (and with it JAX) is imported only when one is built.
"""

from genre_jax.genre.providers import base
from genre_jax.genre.providers import openai
from genre_jax.genre.providers import replay
from genre_jax.genre.providers.base import (PROVIDERS, Prompt, Provider,
                                            ProviderError, ReplyCache,
                                            get_provider, request_fingerprint,
                                            split_key, valid_utf8)
from genre_jax.genre.providers.openai import OpenAIProvider, TokenBucket
from genre_jax.genre.providers.replay import ReplayProvider, id_field

__all__ = ["PROVIDERS", "OpenAIProvider", "Prompt", "Provider",
           "ProviderError", "ReplayProvider", "ReplyCache", "TokenBucket",
           "get_provider", "id_field", "request_fingerprint", "split_key",
           "valid_utf8"]


@PROVIDERS.register("local")
def _local_provider(**kwargs) -> Provider:
  """local.LocalProvider, imported on use: it loads JAX and Flax."""
  from genre_jax.genre.providers import local  # pylint: disable=g-import-not-at-top
  return local.LocalProvider(**kwargs)
