"""Window schedules: which (n_t, n_h, n_w) each layer uses, and what that costs.

Layer i uses pattern[i % len(pattern)] ("hierarchical blocking": the published
patterns cycle every 5 layers). (1, 1, 1) is full attention. The two published 4K
schedules are reproduced exactly; for any other latent grid `schedule_for_grid`
derives one whose windows stay close to the published window shapes, padding an
axis (padded keys masked, padded queries dropped) where no block count divides it.
"""

from __future__ import annotations

import math
from typing import Sequence

from t3_jax.core import windows

Triple = tuple[int, int, int]

FULL: tuple[Triple, ...] = ((1, 1, 1),)

# Published schedules of the T3-Video release, at 2176x3840, 81 frames.
PUBLISHED: dict[str, dict] = {
    "wan2.1-4k": {
        "grid": (21, 136, 240),
        "pattern": ((21, 1, 1), (1, 17, 30), (1, 8, 40), (3, 17, 8), (7, 8, 6)),
    },
    "wan2.2-4k": {
        "grid": (21, 68, 120),
        "pattern": ((21, 1, 1), (1, 17, 20), (1, 17, 6), (3, 4, 15), (7, 4, 8)),
    },
}

# The VAE's family decides which published windows a derived schedule imitates.
FAMILY_OF_PRESET = {"wan2.1": "wan2.1-4k", "wan2.2": "wan2.2-4k"}

# Cost of a padded token relative to a unit of log-distance from the target window
# size: 1 % of padding along an axis weighs like a window 4 % off its target size.
_PAD_WEIGHT = 4.0


def _axis_blocks(length: int, published_n: int, published_length: int) -> int:
  """Block count along one axis of a new grid, imitating one published axis."""
  if published_n == 1:  # the whole axis is one window: keep it whole
    return 1
  if published_n == published_length:  # one token per window (e.g. one frame): keep it
    return length
  target = published_length / published_n  # published tokens per window along this axis

  def cost(n):
    w = -(-length // n)
    return abs(math.log(w / target)) + _PAD_WEIGHT * (n * w - length) / length

  # Ties go to fewer, larger windows.
  return min(range(1, length + 1), key=lambda n: (cost(n), n))


def schedule_for_grid(grid: Sequence[int], family: str = "wan2.1-4k") -> tuple[Triple, ...]:
  """A 5-layer pattern for `grid` whose windows follow the published `family` schedule.

  On the published grid this returns the published pattern exactly. Elsewhere each
  axis keeps its role (whole axis, one frame per window, or a window of about the
  published size), choosing the block count that balances window size against padding.
  """
  if family not in PUBLISHED:
    raise ValueError(f"unknown schedule family {family!r}: choose one of {sorted(PUBLISHED)}")
  grid = tuple(int(g) for g in grid)
  ref = PUBLISHED[family]
  return tuple(
      tuple(_axis_blocks(g, n, rg) for g, n, rg in zip(grid, pattern, ref["grid"]))
      for pattern in ref["pattern"])


def parse_schedule(spec) -> tuple[Triple, ...]:
  """Accepts [(n_t, n_h, n_w), ...] or a string "21,1,1;1,17,30;..."."""
  if isinstance(spec, str):
    spec = [tuple(int(v) for v in part.split(",")) for part in spec.replace(" ", "").split(";") if part]
  try:
    pattern = tuple(tuple(int(v) for v in triple) for triple in spec)
  except (TypeError, ValueError):
    raise ValueError(f"a schedule is a list of (n_t, n_h, n_w) triples, got {spec!r}") from None
  if not pattern or any(len(t) != 3 for t in pattern):
    raise ValueError(f"a schedule is a non-empty list of (n_t, n_h, n_w) triples, got {spec!r}")
  return pattern


def resolve_schedule(attention: str, schedule, grid: Sequence[int], num_layers: int,
                     family: str = "wan2.1-4k") -> tuple[Triple, ...]:
  """Per-layer block counts, one triple per layer.

  attention: "full" (the pretrained model as it was) or "t3".
  schedule: None (published or derived for `grid`), a preset name from PUBLISHED
    (it must match the grid), or a list of triples applied cyclically by layer index.
  """
  grid = tuple(int(g) for g in grid)
  if attention == "full":
    pattern = FULL
  elif attention != "t3":
    raise ValueError(f"attention must be 't3' or 'full', got {attention!r}")
  elif schedule is None:
    pattern = schedule_for_grid(grid, family)
  elif isinstance(schedule, str) and schedule in PUBLISHED:
    if PUBLISHED[schedule]["grid"] != grid:
      raise ValueError(f"schedule {schedule!r} is for grid {PUBLISHED[schedule]['grid']}, not {grid}: "
                       "pass schedule=None to derive one for this grid")
    pattern = PUBLISHED[schedule]["pattern"]
  else:
    pattern = parse_schedule(schedule)
  for blocks in pattern:
    windows.check_blocks(grid, blocks)
  return tuple(pattern[i % len(pattern)] for i in range(num_layers))


def cycle(per_layer: Sequence[Triple]) -> tuple[Triple, ...]:
  """The shortest period P with per_layer[i] == per_layer[i % P] for all i."""
  per_layer = tuple(per_layer)
  for p in range(1, len(per_layer) + 1):
    if all(per_layer[i] == per_layer[i % p] for i in range(len(per_layer))):
      return per_layer[:p]
  return per_layer


# --- Cost. One multiply-add = one MAC; FLOPs = 2 * MACs. ---

def layer_attention_macs(grid: Sequence[int], blocks: Sequence[int], dim: int,
                         dedup: bool = True) -> int:
  """Self-attention MACs of one layer: 2 * windows * L^2 * dim per partition.

  (q k^T and p v each cost L^2 * dim per window.) Padded windows are counted at
  their padded size, which is what a kernel computes. With dedup, coinciding
  partitions are counted once; otherwise twice, as the release computes them.
  """
  tokens_per_window = math.prod(windows.window_shape(grid, blocks))
  one = 2 * windows.num_windows(blocks) * tokens_per_window**2 * dim
  if tuple(blocks) == (1, 1, 1):  # full attention: one partition by definition
    return one
  return one if dedup and windows.partitions_coincide(grid, blocks) else 2 * one


def attention_macs(grid, per_layer, dim: int, dedup: bool = True) -> int:
  return sum(layer_attention_macs(grid, b, dim, dedup) for b in per_layer)


def linear_macs(num_tokens: int, dim: int, ffn_dim: int, num_layers: int,
                text_len: int = 512, in_channels: int = 16, out_channels: int = 16,
                patch=(1, 2, 2), text_dim: int = 4096, freq_dim: int = 256) -> dict[str, int]:
  """MACs of everything but self-attention's scores, split by part."""
  patch_volume = math.prod(patch)
  per_layer_tokens = num_tokens * (4 * dim * dim          # self q, k, v, o
                                   + 2 * dim * dim        # cross q, o
                                   + 2 * dim * ffn_dim)   # FFN
  return {
      "blocks_linear": num_layers * per_layer_tokens,
      "cross_kv": num_layers * text_len * 2 * dim * dim,
      "cross_attention": num_layers * 2 * num_tokens * text_len * dim,
      "embed_and_head": num_tokens * dim * patch_volume * (in_channels + out_channels)
                        + text_len * (text_dim * dim + dim * dim)
                        + freq_dim * dim + dim * dim + dim * 6 * dim,
  }


def model_macs(config, grid: Sequence[int], per_layer: Sequence[Triple], text_len: int = 512,
               dedup: bool = True) -> dict[str, int]:
  """MACs of one DiT forward at `grid` (batch 1) with the given per-layer schedule.

  `config` needs dim, ffn_dim, num_layers, in_channels, out_channels, patch_size,
  text_dim, freq_dim (a DiTConfig or anything with those attributes).
  Returns the parts and "total" (all of them) and "total_paper" (self-attention +
  block linears: the quantity that reproduces the paper's whole-model figures).
  """
  num_tokens = math.prod(grid)
  parts = {"self_attention": attention_macs(grid, per_layer, config.dim, dedup)}
  parts.update(linear_macs(num_tokens, config.dim, config.ffn_dim, config.num_layers, text_len,
                           config.in_channels, config.out_channels, tuple(config.patch_size),
                           config.text_dim, config.freq_dim))
  parts["total"] = sum(parts.values())
  parts["total_paper"] = parts["self_attention"] + parts["blocks_linear"]
  return parts
