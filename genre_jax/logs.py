"""Logging set-up shared by run.py and the experiment scripts."""

from __future__ import annotations

import json
import logging as pylogging
import math
import os
import sys
from typing import Any

from absl import logging


class _LibraryInfoFilter(pylogging.Filter):
  """Drops the INFO chatter of Orbax, TFDS and JAX's backend probe ("Unable
  to initialize backend 'tpu'" on every machine without one); their
  warnings still show."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    noisy = ("orbax" in record.pathname or
             "tensorflow_datasets" in record.pathname or
             record.pathname.endswith(os.path.join("jax", "_src",
                                                   "xla_bridge.py")))
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


def progress_bar(total: int, *, initial: int = 0, desc: str = "",
                 unit: str = "sample", stream=None):
  """A tqdm bar (rate and ETA) on `stream` (stderr) when it is a terminal,
  else None: in a log file or CI the caller's periodic log lines are the one
  progress display, and a bar's carriage returns would only clutter them."""
  stream = sys.stderr if stream is None else stream
  if not getattr(stream, "isatty", lambda: False)():
    return None
  import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit=unit,
                   unit_scale=True, dynamic_ncols=True, file=stream,
                   leave=True)
