"""t3-jax: T3-Video (multi-scale weight-sharing window attention) on Wan DiTs in JAX."""

import importlib

# Loaded on first use, so that light modules (t3_jax.cli: the scripts' one-line errors)
# import without JAX and Flax.
_EXPORTS = {"t3_attention": "t3_jax.core.attention", "load_dit": "t3_jax.models.dit"}
__all__ = list(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 't3_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)
