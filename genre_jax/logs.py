"""Logging set-up shared by run.py and the experiment scripts."""

from __future__ import annotations

import logging as pylogging

from absl import logging


class _LibraryInfoFilter(pylogging.Filter):
  """Drops the INFO chatter of Orbax and TFDS; their warnings still show."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    noisy = ("orbax" in record.pathname or
             "tensorflow_datasets" in record.pathname)
    return record.levelno >= pylogging.WARNING or not noisy


def quiet_library_logging() -> None:
  """Keeps the logs to genre_jax's own progress (idempotent)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())
