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


HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def parse_flags(flag_values, argv, default_config: str):
  """absl's flag parsing for a command with a `--config=file[:variant]` flag: --help exits 0,
  and a bad flag, config file, variant or config field is one `error:` line, exit 2."""
  argv = list(argv)
  try:
    return flag_values(argv)
  except SystemExit as e:  # absl's --help prints the usage, then exits 1
    if e.code == 1 and any(a.split("=", 1)[0] in HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except Exception as e:  # absl flag errors, config-file errors, unknown config fields
    fail(explain_flag_error(e, argv, default_config))


def _override_paths(argv):
  return [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def _load_config_quietly(argv, default_config: str):
  """The config that --config names, without overrides (to explain a failed override)."""
  import importlib.util

  spec = next((a[len("--config="):] for a in argv if a.startswith("--config=")), default_config)
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_t3_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def explain_flag_error(error: Exception, argv, default_config: str) -> str:
  from absl import flags

  if _override_paths(argv) and not isinstance(error, flags.Error):
    try:
      config = _load_config_quietly(argv, default_config)
      for path in _override_paths(argv):
        node, parts = config, path.split(".")
        for k, part in enumerate(parts):
          if not hasattr(node, "keys"):
            return f"unknown config field {path!r}: {'.'.join(parts[:k])} is not a group of fields"
          if part not in node:
            where = ".".join(parts[:k]) or "the config"
            return f"unknown config field {path!r}: {where} has {', '.join(sorted(node.keys()))}"
          node = node[part]
    except Exception:  # explaining must never hide the original error
      pass
    if isinstance(error, (AttributeError, KeyError)):
      return f"unknown config field ({error}) in {' '.join(_override_paths(argv))}"
  text = str(error).strip()
  lines = [line for line in text.splitlines() if line.strip()]
  if len(lines) > 1:  # a config file's traceback: its last line is the message
    first = lines[0].split(": ", 1)[0] if lines[0].startswith("flag ") else ""
    return f"{first}: {lines[-1].strip()}" if first else lines[-1].strip()
  return text
