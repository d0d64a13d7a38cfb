"""Device mesh and logical axis rules.

One mesh spans every device of every host, with three named axes (all Auto, so XLA's
SPMD partitioner places what the rules don't pin down):

  data      pure data parallelism: a replica of the parameters per index
  fsdp      data parallelism with parameters and optimizer state sharded (ZeRO-3)
  sequence  the video's tokens split across devices (4K: 685,440 tokens)

There is no tensor (head / MLP) axis: at these model widths the sequence axis is the one
that splits the 4K activations, and a head axis would only add collectives.

Parameters are sharded over fsdp x sequence (the devices that hold different data),
on their largest dimension that divides; activations follow LOGICAL_AXIS_RULES.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "sequence")

# The one table from logical axis names to mesh axes (None: replicated). Activations are
# named in the layout (t3_jax.parallel.layout), parameters where the model makes them.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),   # examples: data parallel over data x fsdp
    ("tokens", "sequence"),        # the video's latent tokens
    ("heads", None),               # attention heads (and a projection's heads x head_dim)
    ("text", None),                # context tokens (512): small, replicated
    # parameters: ZeRO-3 over every device that holds other data (fsdp x sequence), on the
    # model width; the other dimensions stay whole
    ("embed", ("fsdp", "sequence")),
    ("mlp", None),                 # FFN hidden, 6 x dim modulation
    ("layers", None),              # stacked blocks: scanned, never sharded (a sharded slice
                                   # would all-gather every layer)
    ("patch", None), ("freq", None), ("text_dim", None),
    ("params", ("fsdp", "sequence")),  # trees without declared axes (LoRA adapters): largest dim
)
_RULES = dict(LOGICAL_AXIS_RULES)


def make_mesh(data: int = 1, fsdp: int = -1, sequence: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over all devices (all hosts), or over `devices` (real or abstract): axes
  (data, fsdp, sequence).

  One size may be -1: it takes the remaining devices. Axis types are Auto so that
  jitted code with sharded contracting dimensions is partitioned, not rejected.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(data), int(fsdp), int(sequence)]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes (data, fsdp, sequence) = {tuple(sizes)}: use positive sizes and at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices can't be split into mesh {tuple(sizes)}: choose sizes whose product divides the device count")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, found {len(devices)}: set one size to -1")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_from_config(config, devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh from a ConfigDict with fields data, fsdp, sequence (over `devices`, default all)."""
  return make_mesh(config.get("data", 1), config.get("fsdp", -1), config.get("sequence", 1), devices=devices)


def _mesh_axes(mesh: Mesh, logical: str | None):
  """Mesh axes of a logical name, dropping axes of size 1 (or absent)."""
  if logical is None:
    return None
  if logical not in _RULES:
    raise ValueError(f"unknown logical axis {logical!r}: add it to LOGICAL_AXIS_RULES")
  axes = _RULES[logical]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
  return None if not axes else axes[0] if len(axes) == 1 else axes


def logical_to_spec(mesh: Mesh, logical_axes: Sequence[str | None]) -> P:
  """PartitionSpec for an array whose dimensions have these logical names."""
  return P(*(_mesh_axes(mesh, name) for name in logical_axes))


def logical_sharding(mesh: Mesh, *logical_axes: str | None) -> NamedSharding:
  """e.g. logical_sharding(mesh, "batch", "tokens", "embed")."""
  return NamedSharding(mesh, logical_to_spec(mesh, logical_axes))


def axis_size(mesh: Mesh, logical: str) -> int:
  axes = _mesh_axes(mesh, logical)
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def constrain(x, mesh: Mesh | None, *logical_axes: str | None):
  """with_sharding_constraint by logical names; a no-op without a mesh."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, *logical_axes))


# --- Parameters: fsdp over the largest dimension. ---

# Parameters (per layer, for stacked ones) with fewer elements stay replicated: biases, norm
# scales and modulation tables weigh nothing, and sharding them costs an all-gather each per
# use (and made XLA's partitioner replicate-then-repartition the [6, dim] modulation).
MIN_SHARDED_ELEMENTS = 1 << 16


def param_spec(shape: Sequence[int], mesh: Mesh, stacked: bool = False) -> P:
  """Shards the largest dimension that divides the fsdp x sequence size.

  stacked: the leading axis is the [num_layers] axis of scanned blocks; it stays
  whole (the scan slices it, and a sharded slice would all-gather every layer).
  Falls back to fsdp alone, then to replication, when nothing divides, and
  replicates parameters under MIN_SHARDED_ELEMENTS (per layer).
  """
  first = 1 if stacked and len(shape) > 1 else 0
  if math.prod(shape[first:]) < MIN_SHARDED_ELEMENTS:
    return P()
  full = _mesh_axes(mesh, "params")
  candidates = [full]
  if isinstance(full, tuple):  # try the single axes too, the larger first
    candidates += sorted(full, key=lambda a: -mesh.shape[a])
  dims = sorted(range(first, len(shape)), key=lambda d: -shape[d])
  for axes in candidates:
    if axes is None:
      break
    size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    for d in dims:
      if shape[d] % size == 0 and shape[d] >= size:
        spec = [None] * len(shape)
        spec[d] = axes
        return P(*spec)
  return P()


def logical_param_spec(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh) -> P:
  """The PartitionSpec of a parameter whose dimensions have these logical names.

  The first dimension whose name maps to mesh axes that divide it is sharded over them
  (else over the larger single axis that divides); parameters under MIN_SHARDED_ELEMENTS
  (per layer) stay replicated.
  """
  names = tuple(names) + (None,) * (len(shape) - len(names))
  per_layer = math.prod(s for s, n in zip(shape, names) if n != "layers")
  if per_layer < MIN_SHARDED_ELEMENTS:
    return P()
  for d, name in enumerate(names):
    full = _mesh_axes(mesh, name)
    if full is None:
      continue
    candidates = [full] + (sorted(full, key=lambda a: -mesh.shape[a]) if isinstance(full, tuple) else [])
    for axes in candidates:
      size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
      if shape[d] % size == 0:
        spec = [None] * len(shape)
        spec[d] = axes
        return P(*spec)
  return P()


def _is_stacked(path) -> bool:
  names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return any(n == "blocks" for n in names)


def param_shardings(params, mesh: Mesh, logical=None):
  """NamedShardings for a parameter tree (arrays or ShapeDtypeStructs).

  logical: the same tree of logical axis names (PartitionSpecs of names, as
  `t3_jax.models.dit.param_logical_axes` gives them): each parameter is sharded as its
  module declared. Without it (trees the models did not make, e.g. LoRA adapters), the
  largest dimension that divides is sharded (`param_spec`), leaves under a "blocks" key
  being stacked [num_layers, ...].
  """
  if logical is not None:
    return jax.tree.map(lambda x, names: NamedSharding(mesh, logical_param_spec(np.shape(x), tuple(names), mesh)),
                        params, logical, is_leaf=lambda x: isinstance(x, P))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(np.shape(x), mesh, _is_stacked(path))), params)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shardings(batch, mesh: Mesh):
  """Every batch array split over "batch" on its leading axis, the rest replicated."""
  return jax.tree.map(lambda x: NamedSharding(mesh, logical_to_spec(mesh, ["batch"] + [None] * (np.ndim(x) - 1))), batch)
