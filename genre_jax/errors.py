"""Errors for bad user input: each names the file, line and field at fault."""

from __future__ import annotations


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
