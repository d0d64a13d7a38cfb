"""t3-jax: T3-Video (multi-scale weight-sharing window attention) on Wan DiTs in JAX."""

from t3_jax.attention import t3_attention
from t3_jax.dit import load_dit

__all__ = ["t3_attention", "load_dit"]
