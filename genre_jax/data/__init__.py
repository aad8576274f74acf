"""Data: MIND-format readers, TFDS builders and the `load_dataset` entry point.

Importing this package registers the dataset builders (mind, goodreads_genre,
synthetic) in genre_jax.registry.DATASETS.
"""

from genre_jax.data.builders import load_dataset

__all__ = ["load_dataset"]
