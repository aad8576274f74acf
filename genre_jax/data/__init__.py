"""Data: MIND-format readers, TFDS builders and the `load_dataset` entry point.

Importing this package registers the dataset builders (mind, goodreads_genre,
synthetic) in genre_jax.registry.DATASETS.
"""

import ml_collections

from genre_jax.data import builders
from genre_jax.data import splits
from genre_jax.data import types


def load_dataset(data_config: ml_collections.ConfigDict) -> types.Dataset:
  """builders.load_dataset (prepares once, loads, tokenizes), then the splits
  config.data.validation asks for (splits.apply_validation: "valid" and an
  honest test; the prepared data is not changed). Training, eval, predict,
  export and recommend all read a run's data through this, so they see the
  same splits."""
  return splits.apply_validation(builders.load_dataset(data_config),
                                 data_config)


__all__ = ["load_dataset"]
