"""What the command-line entry points share: bad input is one `error:` line, not a traceback."""

import sys
from typing import NoReturn

# Exceptions that mean bad input (a config value, a path, a checkpoint or dataset): their
# messages name the fix, so the commands print them as one line.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError)


def error(message) -> None:
  """Prints `error: MESSAGE` to stderr, its whitespace folded onto one line."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def fail(message, status: int = 2) -> NoReturn:
  """`error(message)`, then exits with `status`."""
  error(message)
  sys.exit(status)
