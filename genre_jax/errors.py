"""Errors for bad user input: each names the file, line and field at fault."""

from __future__ import annotations

import errno
import functools
import os
import re
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
      end_with_error(str(e))
    except Exception as e:  # pylint: disable=broad-except
      message = storage_error_message(e)
      if message is None:
        raise
      end_with_error(message)

  return wrapped


def end_with_error(message: str) -> None:
  """Prints `error: message` and ends the process with status 2 at once.

  Not sys.exit: a failed Orbax/TensorStore read or write leaves asyncio
  callbacks behind, and at interpreter shutdown they print tracebacks of
  their own under the one error line. Every output is complete or absent
  already (written under a temporary name, then renamed) and the workdir
  lock goes with the process, so nothing is lost by skipping shutdown.
  """
  print(f"error: {message}", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(2)  # pylint: disable=protected-access


# Errors of the storage rather than of the program: a full disk, a quota, a
# file-size limit, a read-only file system. Orbax and TensorStore report them
# as their own error types, by text (RESOURCE_EXHAUSTED: No space left...).
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_STORAGE_TEXTS = ("No space left on device", "Disk quota exceeded",
                  "File too large", "Read-only file system",
                  "RESOURCE_EXHAUSTED")


def storage_error_message(error: BaseException) -> str | None:
  """One line for an error caused by the storage (disk full, quota, size
  limit, read-only), found anywhere in the exception's chain; None for any
  other error. Every output is written under a temporary name and renamed,
  and checkpoints are complete or absent, so running the same command again
  once there is room resumes where it stopped."""
  seen, pending = set(), [error]
  while pending:
    e = pending.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
      where = f" writing {e.filename}" if e.filename else ""
      return (f"{e.strerror}{where}: free some space (or lift the limit) and "
              "run the same command again; it resumes from the last complete "
              "checkpoint, and no finished output was damaged")
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text and ("memory" in text.lower() or
                                         "allocat" in text):
      return ("the device ran out of memory (RESOURCE_EXHAUSTED): lower "
              "config.train.batch_size or config.eval.batch_size, or the "
              "model's sizes, and run the same command again")
    for sign in _STORAGE_TEXTS:
      if sign in text:
        paths = re.findall(r'"(/[^"]+)"', text)
        # Orbax writes a save under <folder>/<save>.orbax-checkpoint-tmp.
        where = (f" under {re.split(r'/[^/]*orbax-checkpoint-tmp', paths[0])[0]}"
                 if paths else "")
        reason = sign
        for known in _STORAGE_TEXTS[:-1]:
          if known in text:
            reason = known
            break
        return (f"a write{where} failed: {reason}: free some space (or "
                "lift the limit) and run the same command again; it resumes "
                "from the last complete checkpoint, and no finished output "
                "was damaged")
    pending.extend([e.__cause__, e.__context__])
  return None
