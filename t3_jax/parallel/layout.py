"""How the DiT's activations are laid out over a mesh: its layout hooks.

Sampling uses a smaller mesh on one process's devices (`sampling_mesh`: sequence x the
guided batch over data) with `sampling_dit_kwargs`.

The DiT takes all of it through its layout hooks, WanDiT(**dit_kwargs(mesh)): the sharded
self-attention, cross-attention and FFN chunks per device, and activation constraints.
`collectives_in(compiled.as_text())` counts the collectives XLA compiled.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from t3_jax.core.sequence_parallel import check_layout_options, sharded_t3_attention
from t3_jax.parallel.mesh import axis_size, constrain, logical_to_spec, make_mesh

# --- The DiT's layout hooks. ---

def sharded_cross_attention(mesh: Mesh, dense_attention: Callable) -> Callable:
  """Cross-attention with the video tokens sharded: each device attends its own queries
  to the (replicated) text keys. Without this, the DiT's chunked query loop would make
  XLA gather query chunks across devices."""
  q_spec = logical_to_spec(mesh, ("batch", "tokens", "heads", None))
  kv_spec = logical_to_spec(mesh, ("batch", "text", "heads", None))

  def attention(q, k, v, implementation):
    body = lambda q, k, v: dense_attention(q, k, v, implementation)
    return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v)

  return attention


def sharded_token_chunks(mesh: Mesh, default_max_tokens: int) -> Callable:
  """fn over [B, N, D] token-wise in sequential chunks of each device's own tokens.

  The DiT's FFN runs over chunks of tokens to bound memory; chunks of the *global* token
  axis would each live on one device and be gathered. Here chunk c holds the c-th slice
  of every device's tokens: [B, S, chunks, N/(S*chunks), D], sharded over S.
  """
  shards = axis_size(mesh, "tokens")
  tokens = lambda x: constrain(x, mesh, "batch", "tokens", None)

  def over_token_chunks(fn, x, max_tokens=None):
    max_tokens = max_tokens or default_max_tokens
    batch, n = x.shape[:2]
    local = n // shards
    chunks = -(-local // max_tokens)
    while local % chunks:
      chunks += 1
    if chunks == 1:
      return tokens(fn(tokens(x)))
    pinned = lambda a: constrain(a, mesh, "batch", "tokens", None, None)
    xs = pinned(x.reshape(batch, shards, chunks, local // chunks, *x.shape[2:]))
    # Each chunk rematerialised when differentiated, as in dit._over_token_chunks.
    out = jax.lax.map(jax.checkpoint(lambda xi: pinned(fn(pinned(xi)))), jnp.moveaxis(xs, 2, 0))  # [chunks, B, S, n', D']
    return tokens(jnp.moveaxis(out, 0, 2).reshape(batch, n, *out.shape[4:]))

  return over_token_chunks


def sampling_mesh(sequence: int = 1, guidance_parallel: bool = False, devices: Sequence[Any] | None = None) -> Mesh | None:
  """The mesh sample.py runs the DiT on: this process's first `2 if guidance_parallel else 1`
  x `sequence` devices, the conditional/unconditional batch over "data" and the tokens over
  "sequence". None (one device) when both are 1. Processes sample their own prompts, so the
  mesh never spans hosts."""
  data = 2 if guidance_parallel else 1
  if sequence < 1:
    raise ValueError(f"sample.sequence must be >= 1, got {sequence}")
  if data * sequence == 1:
    return None
  devices = list(jax.local_devices() if devices is None else devices)
  if len(devices) < data * sequence:
    raise ValueError(f"sequence {sequence} x guidance {data} needs {data * sequence} devices, this process has "
                     f"{len(devices)}: lower sample.sequence or set sample.guidance_parallel=False")
  return make_mesh(data=data, fsdp=1, sequence=sequence, devices=devices[:data * sequence])


def sampling_dit_kwargs(mesh: Mesh | None, relayout: str = "auto") -> dict:
  """dit_kwargs for inference: the sequence-parallel hooks, and with only a data axis (guidance
  parallel) the residual stream pinned to ("batch", "tokens", None) so the two halves of the
  guided batch stay on their devices."""
  kwargs = dit_kwargs(mesh, relayout=relayout)
  if mesh is not None and not kwargs and axis_size(mesh, "batch") > 1:
    kwargs = {"token_constraint": lambda x: constrain(x, mesh, "batch", "tokens", None)}
  return kwargs


def dit_kwargs(mesh: Mesh | None, collective: str = "auto", relayout: str = "auto", stages: int = 3) -> dict:
  """WanDiT's layout hooks for sequence parallelism over `mesh` ({} without it).

  Self-attention through `sharded_t3_attention`; cross-attention per device
  (`sharded_cross_attention`); the FFN's token chunks per device
  (`sharded_token_chunks`); the patch tokens, modulated inputs and residual stream
  pinned to ("batch", "tokens", None). Then everything between the attention calls runs
  on each device's own tokens, and XLA all-gathers the fsdp-sharded weights at each use
  instead of moving activations to match the weights' sharding.
  """
  check_layout_options(relayout, collective)
  if mesh is None or axis_size(mesh, "tokens") == 1:
    return {}
  from t3_jax.models import dit  # late: the DiT module is this module's user
  return {"attention_fn": sharded_t3_attention(mesh, collective, relayout, stages),
          "token_constraint": lambda x: constrain(x, mesh, "batch", "tokens", None),
          "cross_attention_fn": sharded_cross_attention(mesh, dit._dense_attention),
          "token_chunks_fn": sharded_token_chunks(mesh, dit.FFN_CHUNK_TOKENS)}
