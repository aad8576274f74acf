"""genre_jax: LLM-powered content-based recommendation in JAX/Flax."""

__version__ = "0.1.0"
