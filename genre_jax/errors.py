"""Errors for bad user input: each names the file, line and field at fault."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class DataFormatError(ValueError):
  """A malformed row in an input file.

  The message always reads `FILE:LINE: field 'FIELD': what is wrong`, so a
  researcher can jump straight to the offending row.
  """

  def __init__(self, path: str, line: int | None, field: str | None,
               message: str):
    self.path = str(path)
    self.line = line
    self.field = field
    where = self.path if line is None else f"{self.path}:{line}"
    what = f" field '{field}':" if field else ""
    super().__init__(f"{where}:{what} {message}")


class ConfigError(ValueError):
  """An invalid or inconsistent configuration value (names the config field)."""


def exit_on_input_error(main: Callable, *also: type[BaseException]
                        ) -> Callable:
  """An absl `main` that ends on bad input (a ConfigError, DataFormatError,
  missing file or absl UsageError, plus the `also` types) with one line
  `error: ...` and exit status 2: the message names what to fix; a traceback
  or a page of usage text would bury it."""
  from absl import app  # pylint: disable=g-import-not-at-top

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except (ConfigError, DataFormatError, FileNotFoundError,
            app.UsageError, *also) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapped
