"""T3 window attention over a sequence-sharded video.

Window attention on a sequence-sharded video (`sharded_t3_attention`): every window
is independent, so it is enough that each device holds whole windows. Two re-layouts:

  heads    (the default) one all-to-all gives each device every token of heads/D heads,
           the one-device `t3_attention` runs on them, one all-to-all returns the output
           (as DeepSpeed-Ulysses). Per device the memory is that of its N/D tokens; four
           tensors cross the links. Heads that don't divide by D are padded with zero
           heads (12 heads on 8 shards: 16, two per device), which attend to zeros and are
           dropped: no extra buffers, at most a third more attention work.
  windows  (any head count; "auto" takes it where padding heads would waste more than a
           third, e.g. 12 heads on 32 shards) each device receives whole
           (window, head group) units of each partition. The token -> (window, slot)
           maps are arithmetic (the maps `t3_jax.windows` builds by reshape), so the
           re-layout is a static permutation computed in the graph: items are packed per
           destination and exchanged with one all-to-all or one collective-permute per
           device offset, whichever (with contiguous or strided placement of windows on
           devices) needs the smallest buffer. Windows whose count doesn't divide the
           devices are split further by head groups (frames x head groups: 21 x 3 = 63
           units on 64 devices) and the rest padded with all-zero units, which attend to
           zeros and are dropped. Eight tensors cross the links (two partitions).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from t3_jax import logs
from t3_jax.core import attention as t3_attention_lib
from t3_jax.core import windows

# --- T3 attention over a sequence-sharded video. ---

RELAYOUTS = ("auto", "heads", "windows")
COLLECTIVES = ("auto", "all_to_all", "ppermute")


def check_layout_options(relayout: str, collective: str) -> None:
  """The sequence-parallel options (config mesh.relayout, mesh.collective), checked early."""
  if relayout not in RELAYOUTS:
    raise ValueError(f"mesh.relayout must be one of {RELAYOUTS}, got {relayout!r}")
  if collective not in COLLECTIVES:
    raise ValueError(f"mesh.collective must be one of {COLLECTIVES}, got {collective!r}")


def _axis_maps(i, size: int, n: int, remote: bool):
  """Per axis of the grid: window index a, slot b, and the window's real extent v(a).

  Works on NumPy or jnp integer arrays. Real tokens of a window form a box, so the
  slot of a token among its window's real tokens (real first, (b_t, b_h, b_w) order,
  as windows.window_indices lays them out) is arithmetic.
  """
  w = -(-size // n)
  if remote:  # i = b * n + a; window a holds ceil((size - a) / n) real tokens
    a, b = i % n, i // n
    v = (size - a + n - 1) // n
  else:       # i = a * w + b; the last window may be short
    a, b = i // w, i % w
    v = np.minimum(w, size - a * w) if isinstance(i, np.ndarray) else jnp.minimum(w, size - a * w)
  return a, b, v


def token_window_slot(token, grid, blocks, remote: bool):
  """Flat token index -> (window, slot) of a close/remote partition (NumPy or jnp)."""
  T, H, W = grid
  t, h, w = token // (H * W), (token // W) % H, token % W
  (at, bt, vt), (ah, bh, vh), (aw, bw, vw) = (
      _axis_maps(i, g, n, remote) for i, g, n in zip((t, h, w), grid, blocks))
  window = (at * blocks[1] + ah) * blocks[2] + aw
  slot = (bt * vh + bh) * vw + bw
  return window, slot


def _place(unit, units_per_device: int, devices: int, strided: bool):
  """Window unit -> (device, index on that device). Contiguous: blocks of units per
  device; strided: unit u on device u % devices (spreads every device's needs over
  the whole sequence, which balances an all-to-all)."""
  if strided:
    return unit % devices, unit // devices
  return unit // units_per_device, unit % units_per_device


@functools.lru_cache(maxsize=128)
def _relayout_plan(grid, blocks, remote: bool, devices: int, heads: int, collective: str):
  """Static plan of the token -> window-unit exchange for one partition.

  A unit is (window, head group); units are placed contiguously or strided over the
  devices, and exchanged with one all-to-all (buffer: devices x the largest
  device-to-device count) or one collective-permute per device offset (buffer: the
  largest count per offset); the cheapest buffer wins ("auto"; all-to-all within 10%).
  Returns a dict: groups, units_per_device, tokens_per_window, strided, shifts and
  sizes (per offset), max_size, lengths [devices * units_per_device] (real tokens
  per unit in unit order; padding units count as full: they attend to zeros),
  padded (grid padded), use_all_to_all, padded_units, buffer (items per device).
  """
  check_layout_options("auto", collective)
  num_tokens = math.prod(grid)
  nw = windows.num_windows(blocks)
  L = math.prod(windows.window_shape(grid, blocks))
  # Head groups: the fewest that keep padding units under 5% (else the least padding).
  options = [g for g in range(1, heads + 1) if heads % g == 0]
  waste = lambda g: (-(-nw * g // devices) * devices - nw * g) / (nw * g)
  groups = min(options, key=lambda g: (waste(g) > 0.05, g if waste(g) <= 0.05 else waste(g)))
  units = nw * groups
  upd = -(-units // devices)
  token = np.arange(num_tokens, dtype=np.int64)
  window, _ = token_window_slot(token, grid, blocks, remote)
  unit = (window[:, None] * groups + np.arange(groups)[None, :]).reshape(devices, -1)  # [src, C*G]
  candidates = []
  for strided in (False, True):
    dest, _ = _place(unit, upd, devices, strided)
    shift = (dest - np.arange(devices)[:, None]) % devices
    counts = np.stack([np.bincount(s, minlength=devices) for s in shift])  # [src, offset]
    sizes = counts.max(axis=0)
    for all_to_all in (True, False):
      if devices == 1 and all_to_all:
        continue
      if collective != "auto" and all_to_all != (collective == "all_to_all") and devices > 1:
        continue
      buffer = devices * int(sizes.max()) if all_to_all else int(sizes.sum())
      candidates.append((buffer / (1.1 if all_to_all else 1.0), buffer, strided, all_to_all, sizes))
  _, buffer, strided, use_all_to_all, sizes = min(candidates, key=lambda c: c[:1])
  shifts = tuple(int(k) for k in np.nonzero(sizes)[0])
  _, lengths = windows.window_indices(tuple(grid), tuple(blocks), remote)
  unit_lengths = np.full(upd * devices, L, np.int32)
  unit_lengths[:units] = np.repeat(lengths, groups)
  return dict(groups=groups, units_per_device=upd, tokens_per_window=L, strided=strided, shifts=shifts,
              sizes=tuple(int(sizes[k]) for k in shifts), max_size=int(sizes.max()),
              lengths=unit_lengths, padded=windows.is_padded(grid, blocks),
              use_all_to_all=use_all_to_all, padded_units=upd * devices - units, buffer=buffer)


def _pack(x, token, grid, blocks, remote, plan, axis, devices):
  """Inside shard_map: this device's tokens -> its window units.

  x: [B, C, G, ...] local tokens by head group; token: [C] global indices.
  Returns (windows [B, units_per_device, L, ...], route) where route lets
  `_unpack` send results back along the same paths.
  """
  me = jax.lax.axis_index(axis)
  batch, local, groups = x.shape[:3]
  upd, L = plan["units_per_device"], plan["tokens_per_window"]
  window, slot = token_window_slot(token, grid, blocks, remote)
  unit = window[:, None] * groups + jnp.arange(groups)[None, :]        # [C, G]
  dest, index = _place(unit, upd, devices, plan["strided"])
  target = (index * L + slot[:, None]).reshape(-1)                      # slot on the receiver
  shift = ((dest - me) % devices).reshape(-1)
  items = local * groups
  order = jnp.argsort(shift, stable=True).astype(jnp.int32)             # items grouped by shift
  counts = jnp.bincount(shift, length=devices)
  starts = jnp.cumsum(counts) - counts
  order = jnp.concatenate([order, jnp.full((plan["max_size"],), items, jnp.int32)])
  x = x.reshape(batch, items, *x.shape[3:])
  x = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)            # row `items`: zeros
  target = jnp.concatenate([target, jnp.array([upd * L])]).astype(jnp.int32)  # dummy slot

  def select(k, size):  # the items for shift k, padded to the static size
    idx = jax.lax.dynamic_slice(order, (starts[k],), (size,))
    return jnp.where(jnp.arange(size) < counts[k], idx, items)

  if plan["use_all_to_all"]:
    size = plan["max_size"]
    send = jnp.stack([select(k, size) for k in range(devices)])         # [shift, M]
    send = jnp.roll(send, me, axis=0)                                   # -> [destination, M]
    payload = jax.lax.all_to_all(x[:, send], axis, 1, 1, tiled=False)   # [B, source, M, ...]
    slots = jax.lax.all_to_all(target[send], axis, 0, 0, tiled=False)   # [source, M]
    received, slots = payload.reshape(batch, -1, *x.shape[2:]), slots.reshape(-1)
    sent = send.reshape(-1)
  else:
    sends = [select(k, size) for k, size in zip(plan["shifts"], plan["sizes"])]
    perm = lambda k: [(i, (i + k) % devices) for i in range(devices)]
    move = lambda a, k: a if k == 0 else jax.lax.ppermute(a, axis, perm(k))
    received = jnp.concatenate([move(x[:, s], k) for s, k in zip(sends, plan["shifts"])], axis=1)
    slots = jnp.concatenate([move(target[s], k) for s, k in zip(sends, plan["shifts"])])
    sent = jnp.concatenate(sends)
  buffer = jnp.zeros((batch, upd * L + 1, *x.shape[2:]), x.dtype).at[:, slots].set(received)
  out = buffer[:, :-1].reshape(batch, upd, L, *x.shape[2:])
  return out, (sent, slots, items)


def _unpack(out, route, plan, axis, devices):
  """Inverse of `_pack` for the attention output: [B, upd, L, ...] -> [B, C*G, ...]."""
  sent, slots, items = route
  batch = out.shape[0]
  flat = out.reshape(batch, -1, *out.shape[3:])
  flat = jnp.concatenate([flat, jnp.zeros_like(flat[:, :1])], axis=1)
  back = flat[:, slots]
  if plan["use_all_to_all"]:
    back = back.reshape(batch, devices, -1, *back.shape[2:])
    back = jax.lax.all_to_all(back, axis, 1, 1, tiled=False).reshape(batch, -1, *back.shape[3:])
  else:
    pieces, start = [], 0
    for k, size in zip(plan["shifts"], plan["sizes"]):
      piece = back[:, start:start + size]
      start += size
      if k:
        piece = jax.lax.ppermute(piece, axis, [((i + k) % devices, i) for i in range(devices)])
      pieces.append(piece)
    back = jnp.concatenate(pieces, axis=1)
  tokens = jnp.zeros((batch, items + 1, *out.shape[3:]), out.dtype).at[:, sent].set(back)
  return tokens[:, :items]


def head_parallel_attention(q, k, v, grid, blocks, implementation, axis: str, devices: int, stages: int = 1,
                            target: t3_attention_lib.Target | None = None):
  """Inside shard_map: T3 attention with whole-sequence head groups (as DeepSpeed-Ulysses).

  q, k, v: [B, N/D, h, d], this device's contiguous tokens, all its h heads. One all-to-all
  turns them into [B, N, h/D, d], every token of h/D heads: every window of both partitions
  is then local, and `t3_attention` runs exactly as on one device (reshape partitions,
  coinciding ones once). One all-to-all sends the output back. Per layer each device sends
  (D-1)/D of four [N/D, h, d] tensors, half of what exchanging whole windows per partition
  costs, with no gathers or scatters. Heads that don't divide by D are padded with zero
  heads (their outputs are zeros, dropped).

  stages > 1 splits the heads into up to that many groups (the most <= stages that divide
  h into groups of a multiple of D), exchanged and attended one after another:
  independent work that lets XLA overlap one group's all-to-all with another's attention
  (a static pipeline of a few stages; on 2 H200s at 4K, 3 stages are 3% faster than 1).
  """
  heads = q.shape[2]
  padded = -(-heads // devices) * devices
  if padded != heads:
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, padded - heads), (0, 0)))
    q, k, v = pad(q), pad(k), pad(v)
  stages = max(s for s in range(1, stages + 1) if padded % (s * devices) == 0)  # the most that divide
  per = padded // stages
  outs = []
  for s in range(stages):
    part = slice(s * per, (s + 1) * per)
    qkv = jnp.stack([q[:, :, part], k[:, :, part], v[:, :, part]], axis=2)  # [B, N/D, 3, per, d]
    qkv = jax.lax.all_to_all(qkv, axis, split_axis=3, concat_axis=1, tiled=True)  # [B, N, 3, per/D, d]
    out = t3_attention_lib.t3_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], grid, blocks, implementation,
                                        target=target)
    outs.append(jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True))  # [B, N/D, per, d]
  out = outs[0] if stages == 1 else jnp.concatenate(outs, axis=2)
  return out[:, :, :heads]


# "auto" pads heads up to a multiple of the sequence shards while that adds at most this
# fraction of attention work; beyond it, whole windows are exchanged instead.
MAX_HEAD_PADDING = 1 / 3


def sharded_t3_attention(mesh: Mesh, axis: str, spec: PartitionSpec, head_shards: int = 1,
                         collective: str = "auto", relayout: str = "auto", stages: int = 3,
                         target: t3_attention_lib.Target | None = None) -> Callable:
  """t3_attention for q, k, v [batch, tokens, heads, head_dim] laid out as `spec` on `mesh`,
  the tokens split over the mesh axis `axis` (the heads over `head_shards` devices); same
  signature and result as `t3_jax.core.attention.t3_attention`.

  relayout: how each device comes to hold whole windows.
    "heads"   one all-to-all gives each device all tokens of heads/D heads
              (`head_parallel_attention`; heads padded up to a multiple of D).
    "windows" each device receives whole (window, head group) units per partition and
              attends them with `attention.attend`; works for any head count.
              collective: "auto" (all-to-all when the exchange is balanced, else
              collective-permutes), "all_to_all" or "ppermute".
    "auto"    "heads" unless padding the heads would add more than MAX_HEAD_PADDING of
              attention work, then "windows" (said once in the log).
  stages: at most this many head groups pipelined by the "heads" re-layout
    (`head_parallel_attention`).
  """
  check_layout_options(relayout, collective)
  devices = mesh.shape[axis]
  target = target or t3_attention_lib.Target.of(mesh.devices)

  def attention(q, k, v, grid, blocks, implementation=None, **unused):
    grid, blocks = tuple(int(g) for g in grid), tuple(int(n) for n in blocks)
    windows.check_blocks(grid, blocks)
    num_tokens = math.prod(grid)
    if q.shape[1] != num_tokens:
      raise ValueError(f"q has {q.shape[1]} tokens, but grid {grid} has {num_tokens}")
    if devices == 1:
      return t3_attention_lib.t3_attention(q, k, v, grid, blocks, implementation, target=target)
    if num_tokens % devices:
      raise ValueError(f"{num_tokens} tokens don't split over {devices} sequence shards: choose a sequence axis size dividing the token count")
    local_heads = q.shape[2] // head_shards
    padding = -(-local_heads // devices) * devices / local_heads - 1
    use_heads = relayout == "heads" or (relayout == "auto" and padding <= MAX_HEAD_PADDING + 1e-9)
    if use_heads:
      if padding:
        logs.warn_once(f"sequence parallel: {local_heads} heads per device padded to "
                       f"{-(-local_heads // devices) * devices} for {devices} sequence shards "
                       f"({padding:.0%} more attention work)")
      body = functools.partial(head_parallel_attention, grid=grid, blocks=blocks, implementation=implementation,
                               axis=axis, devices=devices, stages=stages, target=target)
      return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
    if relayout == "auto":
      logs.warn_once(f"sequence parallel: padding {local_heads} heads per device for {devices} sequence shards "
                     f"would add {padding:.0%} attention work; exchanging whole windows per partition instead")
    parts = [False] if windows.partitions_coincide(grid, blocks) else [False, True]
    plans = [_relayout_plan(grid, blocks, remote, devices, local_heads, collective) for remote in parts]

    def body(q, k, v):
      batch, local = q.shape[:2]
      me = jax.lax.axis_index(axis)
      token = me * local + jnp.arange(local)
      qkv = jnp.stack([q, k, v], axis=3)                                # [B, C, h, 3, d]
      units, routes, lengths = [], [], []
      for remote, plan in zip(parts, plans):
        g = plan["groups"]
        x = qkv.reshape(batch, local, g, -1, 3, qkv.shape[-1])          # [B, C, G, h/G, 3, d]
        packed, route = _pack(x, token, grid, blocks, remote, plan, axis, devices)
        units.append(packed)                                            # [B, upd, L, h/G, 3, d]
        routes.append(route)
        upd = plan["units_per_device"]
        table = jnp.asarray(plan["lengths"])  # this device's units: contiguous or strided
        lengths.append(table.reshape(upd, devices)[:, me] if plan["strided"] else
                       jax.lax.dynamic_slice(table, (me * upd,), (upd,)))
      # Partitions with the same head-group split and window size run in one kernel call.
      same = len(units) == 2 and units[0].shape == units[1].shape
      groups_of_calls = [units] if same else [[u] for u in units]
      lengths_of_calls = [lengths] if same else [[l] for l in lengths]
      outs = []
      for call, lens in zip(groups_of_calls, lengths_of_calls):
        x = jnp.concatenate(call, axis=1)                               # [B, units, L, hg, 3, d]
        fold = lambda i: x[..., i, :].reshape(-1, *x.shape[2:4], x.shape[-1])
        lens = jnp.tile(jnp.concatenate(lens), batch) if plans[0]["padded"] else None
        out = t3_attention_lib.attend(fold(0), fold(1), fold(2), lengths=lens, implementation=implementation,
                                      target=target)
        outs += jnp.split(out.reshape(x.shape[:4] + x.shape[-1:]), len(call), axis=1)
      results = []
      for out, route, plan in zip(outs, routes, plans):
        tokens = _unpack(out, route, plan, axis, devices)                # [B, C*G, hg, d]
        results.append(tokens.reshape(batch, local, -1, q.shape[-1]).astype(jnp.float32))
      mean = results[0] if len(results) == 1 else (results[0] + results[1]) * 0.5
      return mean.astype(q.dtype)

    return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)

  return attention


def describe_relayout(grid, blocks, devices: int, heads: int, collective: str = "auto") -> list[dict]:
  """Human-readable plan per partition (for logs and docs)."""
  parts = [False] if windows.partitions_coincide(grid, blocks) else [False, True]
  out = []
  for remote in parts:
    plan = _relayout_plan(tuple(grid), tuple(blocks), remote, devices, heads, collective)
    out.append(dict(partition="remote" if remote else "close", windows=windows.num_windows(blocks),
                    head_groups=plan["groups"], units_per_device=plan["units_per_device"],
                    padded_units=plan["padded_units"],
                    placement="strided" if plan["strided"] else "contiguous",
                    collective="all_to_all" if plan["use_all_to_all"] else f"ppermute x{sum(1 for k in plan['shifts'] if k)}",
                    buffer_items_per_device=plan["buffer"],
                    items_per_device=math.prod(grid) * plan["groups"] // devices))
  return out


def collectives_in(compiled_text: str) -> dict[str, int]:
  """Counts collective ops in compiled HLO text (compiled.as_text())."""
  names = ("all-to-all", "collective-permute", "all-gather", "all-reduce", "reduce-scatter")
  counts = {}
  for name in names:
    # Count op instances ("= f32[...] all-gather(" / "-start(" for async forms).
    n = sum(1 for line in compiled_text.splitlines()
            if f" {name}(" in line or f" {name}-start(" in line)
    if n:
      counts[name] = n
  return counts
