"""Logging set-up shared by run.py and the experiment scripts."""

from __future__ import annotations

import json
import logging as pylogging
import math
import sys
from typing import Any

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


def _finite_or_null(value: Any) -> tuple[Any, list[str]]:
  """`value` with each NaN or inf float replaced by None, and where they were
  (as "cold.auc=nan")."""
  undefined = []

  def clean(x, where):
    if isinstance(x, dict):
      return {k: clean(v, f"{where}.{k}" if where else str(k))
              for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, float) and not math.isfinite(x):
      undefined.append(f"{where}={x}")
      return None
    return x

  return clean(value, ""), undefined


def strict_json(value: Any, **dumps_kwargs) -> str:
  """JSON text any parser reads: NaN and inf written as null.

  Python's json writes NaN, which other JSON parsers reject; an undefined
  figure (e.g. the cold-user AUC of a split without cold users) becomes
  null. `dumps_kwargs` go to json.dumps (e.g. indent=2, default=str).
  """
  return json.dumps(_finite_or_null(value)[0], allow_nan=False,
                    **dumps_kwargs)


def json_line(value: Any, **dumps_kwargs) -> str:
  """The final JSON line of run.py or a script: strict_json, with a warning
  on stderr naming each undefined figure written as null."""
  value, undefined = _finite_or_null(value)
  if undefined:
    print(f"warning: undefined figures written as null: "
          f"{', '.join(undefined)}", file=sys.stderr)
  return json.dumps(value, allow_nan=False, **dumps_kwargs)
