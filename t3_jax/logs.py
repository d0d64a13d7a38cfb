"""The project's one logger ("t3_jax") and its say-once helper."""

import functools
import logging

log = logging.getLogger("t3_jax")


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
  """Logs a warning the first time `message` is seen (kernel choices, layout fallbacks)."""
  log.warning(message)
