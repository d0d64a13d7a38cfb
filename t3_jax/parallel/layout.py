"""How the DiT's activations are laid out over devices: one `Layout` object.

`Layout()` is one device (the default). `Layout(mesh)` lays the DiT out over a mesh
(t3_jax.parallel.mesh):
  - the residual stream, the modulated inputs and the patch tokens [B, N, dim] are pinned
    to ("batch", "tokens", None): examples over data x fsdp, tokens over sequence;
  - self-attention runs inside a shard_map: each device attends its own examples
    (`t3_attention` on its batch shard), or, with a sequence axis, exchanges head groups
    or whole windows (`t3_jax.core.sequence_parallel`). Mosaic kernels (TPU splash) can't
    be partitioned by XLA, so every attention call sits inside a shard_map on every path;
  - cross-attention per device, on its own queries against the replicated text;
  - the FFN over chunks of each device's own tokens;
  - the RoPE tables [N, 1, d/2] split over the sequence axis like the tokens.
The attention kernel is chosen for the mesh's devices (`Target.of(mesh.devices)`), which
may be abstract TPU devices on a CPU host (`--compile_for`), never for the host's backend.

`sampling_mesh` is the mesh sample.py runs the DiT on: one process's devices, sequence x the
guided batch over data.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from t3_jax.core import attention as attention_lib
from t3_jax.core import sequence_parallel
from t3_jax.parallel import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the DiT's activations live. mesh None: one device.

  relayout, collective, stages: the sequence-parallel attention's options
  (`t3_jax.core.sequence_parallel.sharded_t3_attention`).
  """
  mesh: Mesh | None = None
  relayout: str = "auto"
  collective: str = "auto"
  stages: int = 3

  def __post_init__(self):
    sequence_parallel.check_layout_options(self.relayout, self.collective)

  @functools.cached_property
  def target(self) -> attention_lib.Target:
    """The devices the program is compiled for: the mesh's, else the default device."""
    return attention_lib.Target.default() if self.mesh is None else attention_lib.Target.of(self.mesh.devices)

  @property
  def sequence_shards(self) -> int:
    return 1 if self.mesh is None else mesh_lib.axis_size(self.mesh, "tokens")

  def _spec(self, *logical):
    return mesh_lib.logical_to_spec(self.mesh, logical)

  # -- activations ----------------------------------------------------------------------

  def tokens(self, x):
    """Pins [B, N, ...] to ("batch", "tokens", None...)."""
    if self.mesh is None:
      return x
    return mesh_lib.constrain(x, self.mesh, "batch", "tokens", *([None] * (x.ndim - 2)))

  def token_table(self, x):
    """Pins a per-token table [N, ...] (RoPE) to ("tokens", None...): each device computes
    its own tokens' rows instead of all of them."""
    if self.mesh is None:
      return x
    return mesh_lib.constrain(x, self.mesh, "tokens", *([None] * (x.ndim - 1)))

  # -- attention --------------------------------------------------------------------------

  def self_attention(self, q, k, v, grid, blocks, implementation: str | None = None):
    """T3 attention of q, k, v [B, N, heads, head_dim] (`t3_attention`'s contract)."""
    if self.mesh is None:
      return attention_lib.t3_attention(q, k, v, grid, blocks, implementation, target=self.target)
    spec = self._spec("batch", "tokens", "heads", None)
    if self.sequence_shards > 1:
      axis = mesh_lib._mesh_axes(self.mesh, "tokens")
      fn = sequence_parallel.sharded_t3_attention(
          self.mesh, axis, spec, mesh_lib.axis_size(self.mesh, "heads"), self.collective, self.relayout,
          self.stages, self.target)
      return fn(q, k, v, grid, blocks, implementation)
    body = functools.partial(attention_lib.t3_attention, grid=grid, blocks=blocks,
                             implementation=implementation, target=self.target)
    return jax.shard_map(body, mesh=self.mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)

  def cross_attention(self, q, k, v, implementation: str | None = None):
    """Attention of the video queries [B, N, h, d] over the text keys [B, L, h, d]; on a
    mesh each device attends its own queries (no query chunks gathered across devices)."""
    dense = functools.partial(attention_lib.dense_attention, implementation=implementation, target=self.target)
    if self.mesh is None:
      return dense(q, k, v)
    q_spec = self._spec("batch", "tokens", "heads", None)
    kv_spec = self._spec("batch", "text", "heads", None)
    return jax.shard_map(dense, mesh=self.mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v)

  def token_chunks(self, fn: Callable, x, max_tokens: int):
    """fn over [B, N, D] token-wise in sequential chunks of at most max_tokens per device.

    On a mesh, chunk c holds the c-th slice of every device's tokens
    ([B, S, chunks, N/(S*chunks), D], sharded over S): chunks of the global token axis
    would each live on one device and be gathered."""
    if self.mesh is None:
      return attention_lib.over_token_chunks(fn, x, max_tokens)
    shards = self.sequence_shards
    batch, n = x.shape[:2]
    local = n // shards
    chunks = -(-local // max_tokens)
    while local % chunks:
      chunks += 1
    if chunks == 1:
      return self.tokens(fn(self.tokens(x)))
    pinned = lambda a: mesh_lib.constrain(a, self.mesh, "batch", "tokens", None, None)
    xs = pinned(x.reshape(batch, shards, chunks, local // chunks, *x.shape[2:]))
    # Each chunk rematerialised when differentiated, as in over_token_chunks.
    out = jax.lax.map(jax.checkpoint(lambda xi: pinned(fn(pinned(xi)))), jnp.moveaxis(xs, 2, 0))
    return self.tokens(jnp.moveaxis(out, 0, 2).reshape(batch, n, *out.shape[4:]))

  def check_tokens(self, num_tokens: int) -> None:
    """Raises a clear error when the tokens don't split over the sequence shards."""
    if num_tokens % self.sequence_shards:
      raise ValueError(f"{num_tokens} latent tokens don't split over {self.sequence_shards} sequence shards: "
                       f"choose a sequence size dividing {num_tokens}")


def sampling_mesh(sequence: int = 1, guidance_parallel: bool = False, devices: Sequence[Any] | None = None) -> Mesh | None:
  """The mesh sample.py runs the DiT on: this process's first `2 if guidance_parallel else 1`
  x `sequence` devices, the conditional/unconditional batch over "data" and the tokens over
  "sequence". None (one device) when both are 1. Processes sample their own prompts, so the
  mesh never spans hosts."""
  data = 2 if guidance_parallel else 1
  if sequence < 1:
    raise ValueError(f"sample.sequence must be >= 1, got {sequence}")
  if data * sequence == 1 and devices is None:
    return None
  devices = list(jax.local_devices() if devices is None else devices)
  if len(devices) < data * sequence:
    raise ValueError(f"sequence {sequence} x guidance {data} needs {data * sequence} devices, this process has "
                     f"{len(devices)}: lower sample.sequence or set sample.guidance_parallel=False")
  return mesh_lib.make_mesh(data=data, fsdp=1, sequence=sequence, devices=devices[:data * sequence])
