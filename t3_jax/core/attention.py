"""T3 multi-scale weight-sharing window attention, and the choice of attention kernel.

  t3_attention(q, k, v, grid, blocks) = (close(q, k, v) + remote(q, k, v)) / 2

where close/remote is plain softmax attention inside every close/remote window
(`t3_jax.core.windows`), with the same q, k, v. blocks = (1, 1, 1) is full attention.

Kernels ("implementation"):
  "xla"     jax.nn.dot_product_attention's XLA path: any platform (materialises logits).
  "cudnn"   cuDNN flash attention: NVIDIA GPUs, bf16/fp16.
  "pallas"  Pallas splash attention: TPU (on CPU it runs in interpret mode, for tests).
  None      by platform: cudnn on GPU (xla for float32, said once in the log),
            pallas on TPU, xla on CPU.
A kernel that can't run raises; nothing falls back silently.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t3_jax.core import windows

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")
_SPLASH_BLOCK = 128


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
  log.warning(message)


def choose_implementation(implementation: str | None, dtype, head_dim: int,
                          platform: str | None = None) -> str:
  """Resolves the kernel for this platform and dtype; raises if it can't run."""
  platform = platform or jax.default_backend()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if implementation is None:
    if platform == "gpu":
      if half and head_dim <= 128:
        return "cudnn"
      _say_once(f"cuDNN attention needs bf16/fp16 and head_dim <= 128 (got {jnp.dtype(dtype).name}, "
                f"{head_dim}): using the XLA attention kernel")
      return "xla"
    if platform == "tpu":
      return "pallas"
    return "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  if implementation == "cudnn":
    if platform != "gpu":
      raise ValueError(f"implementation='cudnn' needs an NVIDIA GPU, but JAX runs on {platform}: use 'xla' or None")
    if not half:
      raise ValueError(f"implementation='cudnn' needs bf16 or fp16 inputs, got {jnp.dtype(dtype).name}: "
                       "use dtype=bfloat16 or implementation='xla'")
  if implementation == "pallas":
    if platform == "gpu":
      raise ValueError("implementation='pallas' is the TPU splash kernel: on GPU use 'cudnn' or 'xla'")
    if platform != "tpu":
      _say_once(f"Pallas splash attention runs in interpret mode on {platform} (slow; for testing)")
  return implementation


# The XLA kernel materialises [windows, heads, L, L] logits: above this many elements
# it runs over chunks of windows (a scan) so that memory stays bounded. The DiT's XLA
# cross-attention uses the same bound for its chunks of queries.
XLA_MAX_LOGITS = 1 << 27


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


def _attend_splash(q, k, v, lengths):
  """Splash attention over a batch of windows; windows padded to the kernel's block."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

  batch, length, heads, head_dim = q.shape
  padded = -(-length // _SPLASH_BLOCK) * _SPLASH_BLOCK
  if lengths is None:
    lengths = np.full((batch,), length, np.int32)
  # Real tokens are segment 0, padding segment 1: padded keys are invisible to real
  # queries, and padded queries (dropped later) see only padding, so nothing is NaN.
  segments = (jnp.arange(padded)[None, :] >= jnp.asarray(lengths)[:, None]).astype(jnp.int32)

  def to_kernel_layout(x):  # [B, L, h, d] -> [B, h, Lp, d]
    return _pad_windows(x, padded).transpose(0, 2, 1, 3)

  block = splash.BlockSizes(
      block_q=_SPLASH_BLOCK, block_kv=_SPLASH_BLOCK, block_kv_compute=_SPLASH_BLOCK,
      block_q_dkv=_SPLASH_BLOCK, block_kv_dkv=_SPLASH_BLOCK, block_kv_dkv_compute=_SPLASH_BLOCK,
      block_q_dq=_SPLASH_BLOCK, block_kv_dq=_SPLASH_BLOCK)
  mask = splash_mask.MultiHeadMask([splash_mask.FullMask((padded, padded))] * heads)
  kernel = splash.make_splash_mha(mask, block_sizes=block, head_shards=1, q_seq_shards=1,
                                  interpret=jax.default_backend() != "tpu")
  scale = head_dim ** -0.5  # splash does not scale q
  out = jax.vmap(kernel)(to_kernel_layout(q * jnp.asarray(scale, q.dtype)), to_kernel_layout(k),
                         to_kernel_layout(v), splash.SegmentIds(q=segments, kv=segments))
  return out.transpose(0, 2, 1, 3)[:, :length]


def attend(q, k, v, lengths=None, implementation: str | None = None):
  """Softmax attention over a batch of windows.

  q, k, v: [windows, tokens_per_window, heads, head_dim]; lengths: [windows] real
  tokens at the front of each window (keys past it are masked), or None.
  Returns [windows, tokens_per_window, heads, head_dim].
  """
  implementation = choose_implementation(implementation, q.dtype, q.shape[-1])
  if lengths is not None:
    # A window can be all padding (e.g. 5 rows in 4 close windows of 2): let it see one
    # zero key rather than none, so that no kernel gives NaN; its outputs are dropped.
    lengths = jnp.maximum(jnp.asarray(lengths, jnp.int32), 1)
  if implementation == "pallas":
    return _attend_splash(q, k, v, lengths)
  return _attend_dot_product(q, k, v, lengths, implementation)


def _fold(x):  # [B, windows, L, h, d] -> [B * windows, L, h, d]
  return x.reshape(-1, *x.shape[2:])


def t3_attention(q, k, v, grid: Sequence[int], blocks: Sequence[int],
                 implementation: str | None = None, fuse_partitions: bool = False,
                 window_constraint: Callable | None = None):
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
    window_constraint: optional f(x) applied to every windowed array
      [batch, windows, tokens_per_window, heads, head_dim] (e.g. a sharding
      constraint that keeps whole windows on a device).
  Returns:
    [batch, T*H*W, heads, head_dim], dtype of q.
  """
  grid, blocks = tuple(int(g) for g in grid), tuple(int(n) for n in blocks)
  windows.check_blocks(grid, blocks)
  if q.shape[1] != math.prod(grid):
    raise ValueError(f"q has {q.shape[1]} tokens, but grid {grid} has {math.prod(grid)}")
  constrain = window_constraint or (lambda x: x)

  def run(parts, lengths):
    """parts: per partition, (q, k, v) windows [B, nw, L, h, d]; lengths: per partition
    [nw] real tokens, or None. One kernel call over all windows of all parts."""
    qkv = [constrain(jnp.concatenate(x, axis=1)) for x in zip(*parts)]
    if lengths is not None:  # window order after folding: (batch, partition, window)
      lengths = np.tile(np.concatenate(lengths), q.shape[0])
    out = attend(*(_fold(x) for x in qkv), lengths=lengths, implementation=implementation)
    out = constrain(out.reshape(qkv[0].shape))
    return jnp.split(out, len(parts), axis=1)

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
