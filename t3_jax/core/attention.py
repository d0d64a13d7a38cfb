"""T3 multi-scale weight-sharing window attention, and the choice of attention kernel.

  t3_attention(q, k, v, grid, blocks) = (close(q, k, v) + remote(q, k, v)) / 2

where close/remote is plain softmax attention inside every close/remote window
(`t3_jax.core.windows`), with the same q, k, v. blocks = (1, 1, 1) is full attention.

Kernels ("implementation"), chosen for the devices a program is compiled for (`Target`),
never for the host's default backend:
  "xla"               jax.nn.dot_product_attention's XLA path: any platform (materialises logits).
  "cudnn"             cuDNN flash attention: NVIDIA GPUs, bf16/fp16.
  "pallas"            Pallas splash attention, the real Mosaic kernel: TPU only.
  "pallas_interpret"  the same kernel in Pallas' interpreter: any platform, for tests.
  None                by the target's platform: cudnn on GPU (xla for float32, said once in
                      the log), pallas on TPU, xla on CPU.
A kernel that can't run raises; nothing falls back silently.

Mosaic kernels can't be partitioned by XLA: on a mesh, every call of `t3_attention` with
the pallas kernel must sit inside a shard_map (t3_jax.parallel.layout does that).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t3_jax import logs
from t3_jax.core import windows

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices a program is compiled for: platform ("cpu", "gpu", "tpu") and device kind
  (e.g. "TPU v5 lite", "NVIDIA H200"). Kernels and their block sizes are chosen by it."""
  platform: str
  device_kind: str = ""

  @classmethod
  def of(cls, devices) -> "Target":
    """The target of a mesh's devices (real or abstract TPU devices alike)."""
    first = next(iter(np.asarray(devices).flat))
    return cls(first.platform, getattr(first, "device_kind", ""))

  @classmethod
  def default(cls) -> "Target":
    """The device a program without a mesh runs on: the first of jax.devices()."""
    return cls.of(jax.devices()[:1])


def choose_implementation(implementation: str | None, dtype, head_dim: int, target: Target) -> str:
  """Resolves the kernel for the target's platform and this dtype; raises if it can't run."""
  platform = target.platform
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if implementation is None:
    if platform == "gpu":
      if half and head_dim <= 128:
        return "cudnn"
      logs.warn_once(f"cuDNN attention needs bf16/fp16 and head_dim <= 128 (got {jnp.dtype(dtype).name}, "
                     f"{head_dim}): using the XLA attention kernel")
      return "xla"
    if platform == "tpu":
      return "pallas"
    return "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  if implementation == "cudnn":
    if platform != "gpu":
      raise ValueError(f"implementation='cudnn' needs an NVIDIA GPU, but the program is compiled for {platform}: "
                       "use 'xla' or None")
    if not half:
      raise ValueError(f"implementation='cudnn' needs bf16 or fp16 inputs, got {jnp.dtype(dtype).name}: "
                       "use dtype=bfloat16 or implementation='xla'")
  if implementation == "pallas" and platform != "tpu":
    raise ValueError(f"implementation='pallas' is the TPU splash kernel, but the program is compiled for {platform}: "
                     "use None (the platform's kernel), or 'pallas_interpret' to test the kernel on CPU")
  return implementation


# The XLA kernel materialises [windows, heads, L, L] logits: above this many elements
# it runs over chunks of windows (a scan) so that memory stays bounded. The XLA
# cross-attention uses the same bound for its chunks of queries.
XLA_MAX_LOGITS = 1 << 27


def chunk_count(n: int, max_tokens: int) -> int:
  """The fewest chunks of at most max_tokens that divide n tokens evenly."""
  chunks = -(-n // max_tokens)
  while n % chunks:
    chunks += 1
  return chunks


def over_token_chunks(fn, x, max_tokens: int, tables=()):
  """fn applied token-wise over [B, N, ...] in sequential chunks of at most max_tokens.

  x: one array or a tuple of them, all [B, N, ...]; tables: arrays [N, ...] without a batch
  axis (e.g. RoPE), chunked alike; fn(*x_chunks, *table_chunks) may return any pytree of
  [B, n, ...] arrays. Each chunk is rematerialised (jax.checkpoint) when differentiated: the
  backward pass recomputes one chunk's intermediates at a time instead of keeping all of them,
  which would undo the chunking's memory saving in training. Without gradients it changes nothing.
  """
  xs = x if isinstance(x, tuple) else (x,)
  batch, n = xs[0].shape[:2]
  chunks = chunk_count(n, max_tokens)
  if chunks == 1:
    return fn(*xs, *tables)
  split = lambda a: jnp.moveaxis(a.reshape(batch, chunks, n // chunks, *a.shape[2:]), 1, 0)
  split_table = lambda a: a.reshape(chunks, n // chunks, *a.shape[1:])
  out = jax.lax.map(jax.checkpoint(lambda args: fn(*args[0], *args[1])),
                    (tuple(map(split, xs)), tuple(map(split_table, tables))))
  return jax.tree.map(lambda o: jnp.moveaxis(o, 0, 1).reshape(batch, n, *o.shape[3:]), out)


def dense_attention(q, k, v, implementation: str | None, target: Target):
  """Full softmax attention with unequal query/key lengths (the DiT's cross-attention).

  cuDNN where the resolved kernel is cuDNN; otherwise XLA over chunks of queries when the
  logits would be large (512 text keys are cheap for XLA on every platform).
  q: [B, N, h, d], k, v: [B, L, h, d] -> [B, N, h, d].
  """
  if choose_implementation(implementation, q.dtype, q.shape[-1], target) == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  batch, _, heads, _ = q.shape
  max_queries = max(1, XLA_MAX_LOGITS // (batch * heads * k.shape[1]))
  return over_token_chunks(lambda qc: jax.nn.dot_product_attention(qc, k, v, implementation="xla"), q, max_queries)


def _pad_windows(x, length: int):
  """[windows, L, heads, d] -> [windows, length, heads, d], zeros appended (masked by lengths)."""
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _attend_dot_product(q, k, v, lengths, implementation):
  def kernel(q, k, v, lengths=None):
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)

  num_windows, length, heads, _ = q.shape
  if lengths is not None and implementation == "cudnn" and length % 2:
    # cuDNN's backward pass with a padding mask takes even lengths only: pad one
    # more (masked) slot; its output row is dropped.
    q, k, v = (_pad_windows(x, length + 1) for x in (q, k, v))
    return kernel(q, k, v, lengths)[:, :length]
  chunk = max(1, XLA_MAX_LOGITS // (length * length * heads))
  if implementation != "xla" or chunk >= num_windows:
    return kernel(q, k, v, lengths)
  while num_windows % chunk:  # a chunk size that divides the windows: no ragged tail
    chunk -= 1
  args = (q, k, v) if lengths is None else (q, k, v, lengths)
  args = tuple(x.reshape(num_windows // chunk, chunk, *x.shape[1:]) for x in args)
  out = jax.lax.map(lambda a: kernel(*a), args)
  return out.reshape(q.shape)


# --- Splash block sizes: a rule per window length. ---
#
# Splash attention tiles every (window, head) into [block_q, block_kv] steps, the key block
# computed block_kv_compute keys at a time; the blocks must divide the (padded) window, and
# padded slots are masked (segment ids) but still computed. Each grid step costs a fixed
# overhead (the Pallas TPU guide gives about 0.35 us), worth OVERHEAD_S x peak FLOPs, so
# small blocks on short windows are mostly overhead, while large blocks pad more. The rule
# minimises the modelled time  Lp^2 * (1 + c / (block_q * block_kv_compute)),
# c = OVERHEAD_S * peak / (4 * head_dim), over block sizes that compile on every TPU
# generation (v5e's VMEM is the limit: [1536, 1536] blocks fail its backward pass).
# The TPU compiler's own time estimate leaves Mosaic kernels out, so it can't choose
# (BENCHMARKS.md, TPU section).
SPLASH_BLOCKS = (128, 256, 512, 1024)
SPLASH_MAX_KV_COMPUTE = 512
SPLASH_OVERHEAD_S = 0.35e-6
# Dense bf16 peak FLOP/s per chip, by device kind.
TPU_PEAK_FLOPS = (("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v6", 918e12),
                  ("TPU v4", 275e12))


def tpu_peak_flops(device_kind: str) -> float:
  for name, flops in TPU_PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return 459e12  # unknown kind: a v5p-like chip


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
  padded_length: int  # the window padded to a multiple of block_q and block_kv
  block_q: int
  block_kv: int
  block_kv_compute: int


def splash_blocks(length: int, head_dim: int = 128, device_kind: str = "") -> SplashBlocks:
  """The block sizes of splash attention for windows of `length` tokens (see the rule above)."""
  c = SPLASH_OVERHEAD_S * tpu_peak_flops(device_kind) / (4 * head_dim)

  def candidate(block):
    padded = -(-length // block) * block
    compute = min(block, SPLASH_MAX_KV_COMPUTE)
    cost = padded * padded * (1 + c / (block * compute))
    return cost, SplashBlocks(padded, block, block, compute)

  return min((candidate(b) for b in SPLASH_BLOCKS), key=lambda x: x[0])[1]


def _attend_splash(q, k, v, lengths, target: Target, interpret: bool):
  """Splash attention over a batch of windows; windows padded to the kernel's blocks."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

  batch, length, heads, head_dim = q.shape
  blocks = splash_blocks(length, head_dim, target.device_kind)
  padded = blocks.padded_length
  if lengths is None and padded != length:
    lengths = np.full((batch,), length, np.int32)
  segments = None
  if lengths is not None:
    # Real tokens are segment 0, padding segment 1: padded keys are invisible to real
    # queries, and padded queries (dropped later) see only padding, so nothing is NaN.
    segments = (jnp.arange(padded)[None, :] >= jnp.asarray(lengths)[:, None]).astype(jnp.int32)

  def to_kernel_layout(x):  # [B, L, h, d] -> [B, h, Lp, d]
    return _pad_windows(x, padded).transpose(0, 2, 1, 3)

  sizes = splash.BlockSizes(
      block_q=blocks.block_q, block_kv=blocks.block_kv, block_kv_compute=blocks.block_kv_compute,
      block_q_dkv=blocks.block_q, block_kv_dkv=blocks.block_kv, block_kv_dkv_compute=blocks.block_kv_compute,
      block_q_dq=blocks.block_q, block_kv_dq=blocks.block_kv)
  mask = splash_mask.MultiHeadMask([splash_mask.FullMask((padded, padded))] * heads)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
  scale = head_dim ** -0.5  # splash does not scale q
  qkv = (to_kernel_layout(q * jnp.asarray(scale, q.dtype)), to_kernel_layout(k), to_kernel_layout(v))
  if segments is None:
    out = jax.vmap(kernel)(*qkv)
  else:
    out = jax.vmap(kernel)(*qkv, splash.SegmentIds(q=segments, kv=segments))
  return out.transpose(0, 2, 1, 3)[:, :length]


def attend(q, k, v, lengths=None, implementation: str | None = None, target: Target | None = None):
  """Softmax attention over a batch of windows.

  q, k, v: [windows, tokens_per_window, heads, head_dim]; lengths: [windows] real
  tokens at the front of each window (keys past it are masked), or None.
  target: the devices the program is compiled for (default: the first of jax.devices()).
  Returns [windows, tokens_per_window, heads, head_dim].
  """
  target = target or Target.default()
  implementation = choose_implementation(implementation, q.dtype, q.shape[-1], target)
  if lengths is not None:
    # A window can be all padding (e.g. 5 rows in 4 close windows of 2): let it see one
    # zero key rather than none, so that no kernel gives NaN; its outputs are dropped.
    lengths = jnp.maximum(jnp.asarray(lengths, jnp.int32), 1)
  if implementation.startswith("pallas"):
    return _attend_splash(q, k, v, lengths, target, interpret=implementation == "pallas_interpret")
  return _attend_dot_product(q, k, v, lengths, implementation)


def _fold(x):  # [B, windows, L, h, d] -> [B * windows, L, h, d]
  return x.reshape(-1, *x.shape[2:])


def t3_attention(q, k, v, grid: Sequence[int], blocks: Sequence[int],
                 implementation: str | None = None, fuse_partitions: bool = False,
                 target: Target | None = None):
  """T3 window attention: the mean of close-window and remote-window attention.

  Args:
    q, k, v: [batch, T*H*W, heads, head_dim] in Wan's (frame, row, column) flatten
      order, RoPE already applied (windows keep global positions).
    grid: (T, H, W) latent-token grid.
    blocks: (n_t, n_h, n_w) block counts. (1, 1, 1) is full attention. Counts that
      don't divide the grid pad it (padded keys masked, padded queries dropped).
    implementation: attention kernel, see `choose_implementation`.
    fuse_partitions: run close and remote windows in one kernel call (concatenated).
      Off by default: on an H200 at 4K the concatenation costs more than the second
      launch saves (BENCHMARKS.md, notes: 1-4% slower per layer).
    target: the devices the program is compiled for (default: the first of jax.devices()).
  Returns:
    [batch, T*H*W, heads, head_dim], dtype of q.
  """
  grid, blocks = tuple(int(g) for g in grid), tuple(int(n) for n in blocks)
  windows.check_blocks(grid, blocks)
  if q.shape[1] != math.prod(grid):
    raise ValueError(f"q has {q.shape[1]} tokens, but grid {grid} has {math.prod(grid)}")
  target = target or Target.default()

  def run(parts, lengths):
    """parts: per partition, (q, k, v) windows [B, nw, L, h, d]; lengths: per partition
    [nw] real tokens, or None. One kernel call over all windows of all parts."""
    qkv = [jnp.concatenate(x, axis=1) for x in zip(*parts)]
    if lengths is not None:  # window order after folding: (batch, partition, window)
      lengths = np.tile(np.concatenate(lengths), q.shape[0])
    out = attend(*(_fold(x) for x in qkv), lengths=lengths, implementation=implementation, target=target)
    return jnp.split(out.reshape(qkv[0].shape), len(parts), axis=1)

  def run_partitions(parts, lengths):
    if fuse_partitions:
      return run(parts, lengths)
    return [run([p], None if lengths is None else [l])[0] for p, l in zip(parts, lengths or [None] * len(parts))]

  if windows.partitions_coincide(grid, blocks):
    # Close and remote windows are the same: their mean is one attention (half the work).
    (out,) = run([[windows.close_windows(x, grid, blocks) for x in (q, k, v)]], None)
    return windows.merge_close_windows(out, grid, blocks)

  if windows.is_padded(grid, blocks):
    tables = [windows.window_indices(grid, blocks, remote) for remote in (False, True)]
    parts = [[windows.gather_windows(x, index) for x in (q, k, v)] for index, _ in tables]
    outs = run_partitions(parts, [lengths for _, lengths in tables])
    close, remote = (windows.scatter_windows(o, index, q.shape[1]) for o, (index, _) in zip(outs, tables))
  else:
    parts = [[fn(x, grid, blocks) for x in (q, k, v)] for fn in (windows.close_windows, windows.remote_windows)]
    close, remote = run_partitions(parts, None)
    close = windows.merge_close_windows(close, grid, blocks)
    remote = windows.merge_remote_windows(remote, grid, blocks)
  mean = (close.astype(jnp.float32) + remote.astype(jnp.float32)) * 0.5
  return mean.astype(q.dtype)
