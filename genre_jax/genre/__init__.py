"""GENRE generation: prompt schemes, LLM providers, driver (reply parsing and
augmentation are data-side: genre_jax.data.genre_parsing, genre_augment)."""
