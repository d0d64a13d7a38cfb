"""T3 window partitions: pure functions over arrays, no model.

Tokens are in Wan's flatten order over the latent-token grid (T, H, W): frame-major,
then row, then column. A layer's block counts (n_t, n_h, n_w) cut every axis of
length G into n pieces of w = G / n tokens:

  close  partition: index i = a * w + b goes to window a (contiguous blocks);
  remote partition: index i = b * n + a goes to window a (dilated: every n-th token).

Both give n_t * n_h * n_w windows of w_t * w_h * w_w tokens. Windows come out in
(a_t, a_h, a_w) order and the tokens inside a window in (b_t, b_h, b_w) order.

When n does not divide G the grid is padded at the end of each axis to n * ceil(G / n)
(`padded_grid`); the padded positions are not tokens: `window_indices` returns a
gather table that puts each window's real tokens first, so kernels can mask the
padded keys by a per-window length and the padded queries are dropped.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import einops
import jax.numpy as jnp
import numpy as np

Grid = tuple[int, int, int]
Blocks = tuple[int, int, int]


def check_blocks(grid: Sequence[int], blocks: Sequence[int]) -> None:
  """Raises a clear error for block counts a grid can't take."""
  if len(grid) != 3 or len(blocks) != 3:
    raise ValueError(f"grid and blocks are (T, H, W) and (n_t, n_h, n_w) triples, got {grid} and {blocks}")
  for axis, g, n in zip("THW", grid, blocks):
    if not (isinstance(n, (int, np.integer)) and 1 <= n <= g):
      raise ValueError(f"block count n_{axis.lower()}={n} must be an integer in [1, {g}] for grid {tuple(grid)}")


def window_shape(grid: Sequence[int], blocks: Sequence[int]) -> Grid:
  """(w_t, w_h, w_w): tokens per window along each axis, ceil(G / n)."""
  check_blocks(grid, blocks)
  return tuple(-(-g // n) for g, n in zip(grid, blocks))


def padded_grid(grid: Sequence[int], blocks: Sequence[int]) -> Grid:
  """The grid rounded up so that every axis splits into n windows of w tokens."""
  return tuple(n * w for n, w in zip(blocks, window_shape(grid, blocks)))


def is_padded(grid: Sequence[int], blocks: Sequence[int]) -> bool:
  return padded_grid(grid, blocks) != tuple(grid)


def partitions_coincide(grid: Sequence[int], blocks: Sequence[int]) -> bool:
  """True when close and remote windows are the same sets in the same order.

  Along an axis with n == 1 (one window) or w == 1 (one token per window) the two
  index maps i = a*w + b and i = b*n + a are identical; if that holds on every axis
  the mean of the two attentions is one attention.
  """
  return all(n == 1 or w == 1 for n, w in zip(blocks, window_shape(grid, blocks)))


def num_windows(blocks: Sequence[int]) -> int:
  return math.prod(blocks)


# --- Divisible grids: reshape + transpose (no gather), the fast path. ---
#
# Along an axis, close splits the index as (n, w): i = a*w + b; remote as (w, n): i = b*n + a.
# Windows come out in (a_t, a_h, a_w) order, tokens inside a window in (b_t, b_h, b_w) order.
_TOKENS = {False: "(nt wt nh wh nw ww)", True: "(wt nt wh nh ww nw)"}
_WINDOWS = "(nt nh nw) (wt wh ww)"


def _sizes(grid, blocks) -> dict:
  (nt, nh, nw), (wt, wh, ww) = blocks, window_shape(grid, blocks)
  return dict(nt=nt, nh=nh, nw=nw, wt=wt, wh=wh, ww=ww)


def _split_axes(x, grid, blocks, remote: bool):
  """[B, T*H*W, *F] -> [B, windows, tokens_per_window, *F] (NumPy or jnp)."""
  return einops.rearrange(x, f"b {_TOKENS[remote]} ... -> b {_WINDOWS} ...", **_sizes(grid, blocks))


def _partition(x, grid, blocks, remote: bool):
  if is_padded(grid, blocks):
    raise ValueError(f"blocks {tuple(blocks)} do not divide grid {tuple(grid)}: use window_indices (padding)")
  if x.shape[1] != math.prod(grid):
    raise ValueError(f"x has {x.shape[1]} tokens but grid {tuple(grid)} has {math.prod(grid)}")
  return _split_axes(x, grid, blocks, remote)


def _merge(windows, grid, blocks, remote: bool):
  """Inverse of _split_axes: [B, windows, tokens_per_window, *F] -> [B, T*H*W, *F]."""
  return einops.rearrange(windows, f"b {_WINDOWS} ... -> b {_TOKENS[remote]} ...", **_sizes(grid, blocks))


def close_windows(x, grid, blocks):
  """[B, T*H*W, *F] -> [B, windows, tokens_per_window, *F]; contiguous windows."""
  return _partition(x, grid, blocks, remote=False)


def remote_windows(x, grid, blocks):
  """[B, T*H*W, *F] -> [B, windows, tokens_per_window, *F]; dilated windows."""
  return _partition(x, grid, blocks, remote=True)


def merge_close_windows(windows, grid, blocks):
  """Inverse of close_windows: [B, windows, tokens_per_window, *F] -> [B, T*H*W, *F]."""
  return _merge(windows, grid, blocks, remote=False)


def merge_remote_windows(windows, grid, blocks):
  """Inverse of remote_windows."""
  return _merge(windows, grid, blocks, remote=True)


# --- Any grid: a static gather table, real tokens first in each window. ---

@functools.lru_cache(maxsize=64)
def window_indices(grid: Grid, blocks: Blocks, remote: bool) -> tuple[np.ndarray, np.ndarray]:
  """Gather table of a (possibly padded) partition, computed once per shape in NumPy.

  Returns (index [windows, tokens_per_window] int32, lengths [windows] int32).
  index[w, j] is the flat token index of slot j of window w, or T*H*W (one past the
  last token: the padding sentinel) for padded slots; each window lists its real
  tokens first (in (b_t, b_h, b_w) order), so lengths[w] real tokens then padding.
  A close window can be all padding (lengths 0) when n * w - G >= w on some axis.
  """
  grid, blocks = tuple(int(g) for g in grid), tuple(int(n) for n in blocks)
  num_tokens = math.prod(grid)
  pgrid = padded_grid(grid, blocks)
  coords = np.stack(np.meshgrid(*[np.arange(g) for g in pgrid], indexing="ij"), -1)  # [T', H', W', 3]
  valid = np.all(coords < np.array(grid), axis=-1)
  flat = np.where(valid, np.ravel_multi_index(tuple(np.minimum(coords, np.array(grid) - 1).transpose(3, 0, 1, 2)), grid), num_tokens)
  flat = flat.reshape(1, -1, 1)
  index = _split_axes(flat, pgrid, blocks, remote).reshape(num_windows(blocks), -1)
  # Stable sort puts real tokens first without reordering them.
  index = np.take_along_axis(index, np.argsort(index == num_tokens, axis=1, kind="stable"), axis=1)
  lengths = np.sum(index < num_tokens, axis=1)
  return index.astype(np.int32), lengths.astype(np.int32)


def gather_windows(x, index):
  """[B, N, *F] -> [B, windows, tokens_per_window, *F]; sentinel N reads zeros."""
  x = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
  return x[:, index]


def scatter_windows(windows, index, num_tokens: int):
  """Inverse of gather_windows: [B, windows, L, *F] -> [B, N, *F]; padded slots dropped."""
  flat_index = index.reshape(-1)
  position = np.full(num_tokens + 1, -1, np.int64)
  position[flat_index] = np.arange(flat_index.size)  # where each token sits in the window layout
  flat = windows.reshape(windows.shape[0], -1, *windows.shape[3:])
  return flat[:, position[:num_tokens]]
