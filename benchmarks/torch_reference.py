#!/usr/bin/env python
"""PyTorch reference of the T3 forward: diffusers' WanTransformer3DModel, T3 self-attention.

The GPU benchmark (benchmarks/dit_forward.py --ref DIR) checks our JAX WanDiT against
this and times both. Only the self-attention *pattern* changes (docs/T3.md section 1):
every block's `attn1` gets a `T3WanAttnProcessor` that knows its layer's block counts
(n_t, n_h, n_w) and the token grid, and computes

  q, k, v, RMSNorm, RoPE     exactly as diffusers' WanAttnProcessor does (before windowing:
                             windows keep global positions);
  close, remote windows      torch reshape + permute (index i = a*w + b -> window a;
                             i = b*n + a -> window a), [windows, heads, L, head_dim];
  attention                  one F.scaled_dot_product_attention call over all windows of a
                             partition (no Python loop over windows);
  out = (close + remote) / 2 in token order (one in-place lerp, float32 math), then to_out.

Where close and remote windows coincide (n == 1 or w == 1 on every axis, e.g. one frame
per window) their mean is one attention, computed ONCE, as t3_jax.core.attention does (the
release computes it twice). Where block counts don't divide the grid (t3_jax.core.schedule
derives such layers for 720P), windows are gathered with t3_jax.core.windows.window_indices:
each window lists its real tokens first, padded keys are masked by a boolean attn_mask
and padded queries are dropped, as in t3_jax.

SDPA kernel: PyTorch's own choice. Measured on one H200 (torch 2.11, bf16, 12 heads x 128),
it picks cuDNN attention: 510 windows x 1,344 tokens 10.2 ms (555 TFLOP/s); forcing the
"flash" backend (FlashAttention-2) takes 17.1 ms, so it is not forced. Padded layers
(720P): with the key mask it picks cuDNN too, 10.9 ms vs 7.1 ms for the same windows
unmasked; varlen_attn over the packed real tokens was no faster (11.5 ms).

Precision follows diffusers' from_pretrained(torch_dtype=bf16): parameters of the modules
in `_keep_in_fp32_modules` (time embedder, norms, modulation tables) stay float32, the
others are bf16; RoPE tables are float32 buffers.

Timesteps: one scalar per sample (timestep [1]) by default, for Wan2.1 and Wan2.2 alike.
Diffusers 0.42 runs Wan2.2-TI2V with `expand_timesteps=True`: the pipeline passes a
timestep per token, [B, T*H*W] (mask * t, where the mask is all ones for text-to-video),
and the transformer then builds a [B, T*H*W, 6, dim] modulation. For T2V every token has
the same t, so the scalar path gives the same numbers (up to rounding) with far less memory;
--per-token-timesteps runs the pipeline's per-token path instead (timestep.npy then holds
[1, T*H*W]).

  python benchmarks/torch_reference.py --preset wan2.1-t2v-1.3b --grid 21,136,240 --out DIR \
      [--layers N] [--repeats 3] [--device cuda] [--dtype bf16] [--seed 0] [--attention t3|full] \
      [--schedule "21,1,1;1,17,30;..."] [--per-token-timesteps]

Writes DIR/model.safetensors (diffusers layout, the dtypes the model ran in; read by
convert_torch_weights.py), DIR/{latents,timestep,context}.npy (float32 inputs),
DIR/torch_out.npy (float32 output) and DIR/torch_timing.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import statistics
import sys
import time
from typing import Sequence

if __name__ == "__main__":
  # This process uses only t3_jax's NumPy code (schedules, window tables); keep JAX off the GPU.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from t3_jax.core import schedule as schedule_lib
from t3_jax.core import windows as windows_lib

log = logging.getLogger(__name__)

Triple = tuple[int, int, int]

# The dims of t3_jax.models.dit.PRESETS (kept here so that this process never imports the JAX
# model; tests/test_torch_reference.py checks that they agree).
PRESETS: dict[str, dict] = {
    "wan2.1-t2v-1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_channels=16,
                            out_channels=16, text_dim=4096, freq_dim=256, family="wan2.1"),
    "wan2.1-t2v-14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_channels=16,
                           out_channels=16, text_dim=4096, freq_dim=256, family="wan2.1"),
    "wan2.2-ti2v-5b": dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_channels=48,
                           out_channels=48, text_dim=4096, freq_dim=256, family="wan2.2"),
    "tiny-wan2.1": dict(dim=48, ffn_dim=96, num_heads=2, num_layers=2, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=64, family="wan2.1"),
    "tiny-wan2.2": dict(dim=96, ffn_dim=192, num_heads=2, num_layers=2, in_channels=48,
                        out_channels=48, text_dim=32, freq_dim=64, family="wan2.2"),
}
PATCH_SIZE = (1, 2, 2)
TEXT_LEN = 512
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------- T3 attention

def _split_pairs(grid: Sequence[int], blocks: Sequence[int], remote: bool) -> list[int]:
  """Per axis (n, w) for close (i = a*w + b) or (w, n) for remote (i = b*n + a)."""
  w = windows_lib.window_shape(grid, blocks)
  return [size for n_i, w_i in zip(blocks, w) for size in ((w_i, n_i) if remote else (n_i, w_i))]


def to_windows(x: torch.Tensor, grid: Sequence[int], blocks: Sequence[int], remote: bool) -> torch.Tensor:
  """[B, T*H*W, heads, d] -> [B * windows, heads, L, d] (SDPA layout); grids the blocks divide.

  Windows come out in (a_t, a_h, a_w) order, tokens inside a window in (b_t, b_h, b_w)
  order, as in t3_jax.core.windows.
  """
  batch, _, heads, d = x.shape
  x = x.reshape(batch, *_split_pairs(grid, blocks, remote), heads, d)
  a_axes, b_axes = ((2, 4, 6), (1, 3, 5)) if remote else ((1, 3, 5), (2, 4, 6))
  x = x.permute(0, *a_axes, 7, *b_axes, 8)  # [B, n_t, n_h, n_w, heads, w_t, w_h, w_w, d]
  return x.reshape(batch * windows_lib.num_windows(blocks), heads, -1, d)


def _token_order_view(out: torch.Tensor, batch: int, grid: Sequence[int], blocks: Sequence[int],
                      remote: bool) -> torch.Tensor:
  """[B * windows, heads, L, d] -> a view (no copy) [B, *axis pairs, heads, d] in token order.

  The axis pairs are those to_windows split by: (n, w) per axis for close, (w, n) for remote.
  """
  heads, d = out.shape[1], out.shape[3]
  out = out.reshape(batch, *blocks, heads, *windows_lib.window_shape(grid, blocks), d)
  # Interleave (a, b) per axis in the order to_windows split them.
  order = (0, 5, 1, 6, 2, 7, 3, 4, 8) if remote else (0, 1, 5, 2, 6, 3, 7, 4, 8)
  return out.permute(*order)


def from_windows(out: torch.Tensor, batch: int, grid: Sequence[int], blocks: Sequence[int],
                 remote: bool) -> torch.Tensor:
  """Inverse of to_windows: [B * windows, heads, L, d] -> [B, T*H*W, heads, d]."""
  view = _token_order_view(out, batch, grid, blocks, remote)
  return view.reshape(batch, math.prod(grid), *view.shape[-2:])


@functools.lru_cache(maxsize=64)
def _gather_table(grid: Triple, blocks: Triple, remote: bool, device: str):
  """Padded partitions: (index [windows, L], key mask [windows, 1, 1, L], position [N]) on device.

  index: token of each window slot (N = padding, reads a zero row); mask: keys a query
  may see (a window's real tokens; at least one, so an all-padding window is not NaN:
  its outputs are dropped); position: where each token sits in the flat window layout.
  """
  index, lengths = windows_lib.window_indices(grid, blocks, remote)
  num_tokens = math.prod(grid)
  mask = np.arange(index.shape[1])[None, :] < np.maximum(lengths, 1)[:, None]
  position = np.empty(num_tokens + 1, np.int64)
  position[index.reshape(-1)] = np.arange(index.size)
  as_tensor = lambda a: torch.as_tensor(a, device=device)
  return as_tensor(index.astype(np.int64)), as_tensor(mask[:, None, None, :]), as_tensor(position[:num_tokens])


def _gather_windows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
  """[B, N, heads, d] -> [B * windows, heads, L, d] through a gather table (padding reads zeros)."""
  batch, _, heads, d = x.shape
  x = torch.cat([x, x.new_zeros(batch, 1, heads, d)], dim=1)[:, index]  # [B, windows, L, heads, d]
  return x.transpose(2, 3).reshape(-1, heads, index.shape[1], d)


def _scatter_windows(out: torch.Tensor, batch: int, position: torch.Tensor) -> torch.Tensor:
  """Inverse of _gather_windows: [B * windows, heads, L, d] -> [B, N, heads, d]; padding dropped."""
  heads, length, d = out.shape[1:]
  out = out.reshape(batch, -1, heads, length, d).transpose(2, 3).reshape(batch, -1, heads, d)
  return out[:, position]


def _attend(q, k, v, mask=None):
  """Softmax attention (scale 1/sqrt(d)) in every window: [windows, heads, L, d]."""
  if mask is not None:
    mask = mask.repeat(q.shape[0] // mask.shape[0], 1, 1, 1)  # same windows for every sample
  return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _partition_windows(q, k, v, grid, blocks, remote: bool):
  """Attention inside the close or remote windows of [B, N, heads, d] inputs.

  Returns the output as [B, N, heads, d], or for divisible grids as the token-order view
  of the windows' output (no copy yet; see _token_order_view).
  """
  if windows_lib.is_padded(grid, blocks):
    index, mask, position = _gather_table(grid, blocks, remote, str(q.device))
    out = _attend(*(_gather_windows(x, index) for x in (q, k, v)), mask)
    return _scatter_windows(out, q.shape[0], position)
  out = _attend(*(to_windows(x, grid, blocks, remote) for x in (q, k, v)))
  return _token_order_view(out, q.shape[0], grid, blocks, remote)


def t3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Sequence[int],
                 blocks: Sequence[int]) -> torch.Tensor:
  """T3 window attention, (close + remote) / 2. q, k, v: [B, T*H*W, heads, d], RoPE applied.

  blocks (1, 1, 1) is full attention. Returns [B, T*H*W, heads, d] in q's dtype.
  """
  grid, blocks = tuple(int(g) for g in grid), tuple(int(n) for n in blocks)
  windows_lib.check_blocks(grid, blocks)
  if q.shape[1] != math.prod(grid):
    raise ValueError(f"q has {q.shape[1]} tokens, but grid {grid} has {math.prod(grid)}")
  # Close and remote windows are the same sets: their mean is one attention, done once.
  coincide = windows_lib.partitions_coincide(grid, blocks)
  close = _partition_windows(q, k, v, grid, blocks, remote=False).reshape(q.shape)  # token order, contiguous
  if coincide:
    return close
  remote = _partition_windows(q, k, v, grid, blocks, remote=True)
  # The mean, written into `close` in one pass, reading the remote output straight from its
  # windows: lerp(a, b, 0.5) = (a + b) / 2, computed in float32 for bf16 (PyTorch's opmath)
  # and rounded once, as t3_jax does.
  close.view(remote.shape).lerp_(remote, 0.5)
  return close


# ------------------------------------------------------------ diffusers processor

def _apply_rotary_emb(hidden_states, freqs_cos, freqs_sin):
  """diffusers' WanAttnProcessor RoPE, verbatim: consecutive (real, imag) pairs."""
  x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
  cos = freqs_cos[..., 0::2]
  sin = freqs_sin[..., 1::2]
  out = torch.empty_like(hidden_states)
  out[..., 0::2] = x1 * cos - x2 * sin
  out[..., 1::2] = x1 * sin + x2 * cos
  return out.type_as(hidden_states)


class T3WanAttnProcessor:
  """Self-attention of one Wan block through T3 windows (a diffusers attention processor).

  blocks: this layer's (n_t, n_h, n_w); grid: the (T, H, W) latent-token grid of the
  input, set before the forward (`install_t3`).
  """

  def __init__(self, blocks: Sequence[int], grid: Sequence[int]):
    self.blocks = tuple(int(n) for n in blocks)
    self.grid = tuple(int(g) for g in grid)
    windows_lib.check_blocks(self.grid, self.blocks)

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
    if encoder_hidden_states is not None or attention_mask is not None or rotary_emb is None:
      raise ValueError("T3WanAttnProcessor is for self-attention (attn1) only, with RoPE and no mask")
    if hidden_states.shape[1] != math.prod(self.grid):
      raise ValueError(f"input has {hidden_states.shape[1]} tokens, not those of grid {self.grid}: "
                       "call install_t3(model, grid) with the grid of these latents")
    # As diffusers' WanAttnProcessor: projections, RMSNorm over all heads, RoPE.
    query, key, value = _get_qkv_projections(attn, hidden_states, None)
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    query = query.unflatten(2, (attn.heads, -1))
    key = key.unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    query = _apply_rotary_emb(query, *rotary_emb)
    key = _apply_rotary_emb(key, *rotary_emb)

    hidden_states = t3_attention(query, key, value, self.grid, self.blocks)
    hidden_states = hidden_states.flatten(2, 3).type_as(query)
    hidden_states = attn.to_out[0](hidden_states)
    return attn.to_out[1](hidden_states)


def token_grid(model: WanTransformer3DModel, latent_shape: Sequence[int]) -> Triple:
  """(T, H, W) tokens of latents [B, C, F, H, W] after the model's patchify."""
  spatial, patch = latent_shape[2:], model.config.patch_size
  if any(s % p for s, p in zip(spatial, patch)):
    raise ValueError(f"latent (frames, height, width) {tuple(spatial)} must be multiples of the patch {tuple(patch)}")
  return tuple(s // p for s, p in zip(spatial, patch))


def install_t3(model: WanTransformer3DModel, grid: Sequence[int], schedule=None,
               family: str = "wan2.1-4k") -> tuple[Triple, ...]:
  """Gives every block's self-attention a T3WanAttnProcessor for `grid`; returns the per-layer blocks.

  schedule: as t3_jax.core.schedule.resolve_schedule (None: published on its grid, derived elsewhere).
  Cross-attention keeps diffusers' processor.
  """
  per_layer = schedule_lib.resolve_schedule("t3", schedule, tuple(grid), len(model.blocks), family=family)
  for block, blocks in zip(model.blocks, per_layer):
    block.attn1.set_processor(T3WanAttnProcessor(blocks, grid))
  return per_layer


# ------------------------------------------------------------------------- model

def diffusers_config(preset: str, num_layers: int | None = None) -> dict:
  """WanTransformer3DModel kwargs of a preset (Wan's released configs)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
  p = PRESETS[preset]
  return dict(patch_size=PATCH_SIZE, num_attention_heads=p["num_heads"],
              attention_head_dim=p["dim"] // p["num_heads"], in_channels=p["in_channels"],
              out_channels=p["out_channels"], text_dim=p["text_dim"], freq_dim=p["freq_dim"],
              ffn_dim=p["ffn_dim"], num_layers=num_layers or p["num_layers"], cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6)


def cast_like_from_pretrained(model: WanTransformer3DModel, dtype: torch.dtype) -> WanTransformer3DModel:
  """Parameter dtypes of from_pretrained(torch_dtype=dtype): `_keep_in_fp32_modules` stay float32.

  Buffers (the RoPE tables, float32) are left as they are, as diffusers leaves them.
  """
  keep = model._keep_in_fp32_modules or []
  for name, param in model.named_parameters():
    if not any(module in name.split(".") for module in keep):
      param.data = param.data.to(dtype)
  return model


@torch.no_grad()
def build_model(preset: str, num_layers: int | None, device: str, dtype: torch.dtype,
                seed: int) -> WanTransformer3DModel:
  """A randomly initialised WanTransformer3DModel, seeded (weights differ between CPU and CUDA RNGs).

  PyTorch's default init scales every Linear/Conv by 1/sqrt(fan_in), which keeps activations
  sane in bf16. Norm weights (ones) and biases (zeros) get N(0, 0.1) noise, so a
  test would notice a missing or misplaced norm parameter.
  """
  torch.manual_seed(seed)
  with torch.device(device):
    model = WanTransformer3DModel(**diffusers_config(preset, num_layers))
  for name, param in model.named_parameters():
    if "norm" in name:
      param.add_(0.1 * torch.randn_like(param))
  return cast_like_from_pretrained(model, dtype).eval()


def make_inputs(preset: str, grid: Sequence[int], seed: int, per_token_timesteps: bool = False):
  """Seeded float32 inputs: latents [1, C, F, H, W], timestep [1] (or [1, T*H*W]), context [1, 512, text_dim]."""
  p = PRESETS[preset]
  rng = np.random.default_rng(seed)
  shape = (1, p["in_channels"], *(g * s for g, s in zip(grid, PATCH_SIZE)))
  latents = rng.standard_normal(shape, dtype=np.float32)
  timestep = rng.uniform(0.0, 1000.0, size=(1,)).astype(np.float32)
  if per_token_timesteps:  # the pipeline's expand_timesteps for text-to-video: mask of ones * t
    timestep = np.broadcast_to(timestep[:, None], (1, math.prod(grid))).copy()
  context = rng.standard_normal((1, TEXT_LEN, p["text_dim"]), dtype=np.float32)
  return latents, timestep, context


def save_state_dict(model: torch.nn.Module, path: str) -> None:
  from safetensors.torch import save_file
  save_file({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, path)


def _timer(device: torch.device):
  """Seconds of fn() on `device`: CUDA events (synchronised) on GPU, perf_counter on CPU."""
  def run(fn):
    if device.type == "cuda":
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      torch.cuda.synchronize(device)
      start.record()
      out = fn()
      end.record()
      torch.cuda.synchronize(device)
      return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out
  return run


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="wan2.1-t2v-1.3b", choices=sorted(PRESETS))
  p.add_argument("--grid", default="21,136,240", help="latent-token grid T,H,W (default: 4K, 81 frames)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--layers", type=int, default=None, help="number of blocks (default: the preset's)")
  p.add_argument("--repeats", type=int, default=3, help="timed forwards after one warm-up")
  p.add_argument("--device", default="cuda")
  p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--attention", default="t3", choices=("t3", "full"),
                 help="t3: T3 windows; full: diffusers' untouched attention (sanity)")
  p.add_argument("--schedule", default=None,
                 help="T3 schedule 'n_t,n_h,n_w;...' cycled by layer (default: published or derived for the grid)")
  p.add_argument("--per-token-timesteps", action="store_true",
                 help="pass a timestep per token, as diffusers' Wan2.2-TI2V pipeline does")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

  try:
    grid = tuple(int(g) for g in args.grid.split(","))
    if len(grid) != 3:
      raise ValueError
  except ValueError:
    p.error(f"--grid must be T,H,W (three integers), got {args.grid!r}")
  if args.layers is not None and args.layers < 1:
    p.error("--layers must be >= 1")
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  device = torch.device(args.device)
  if device.type == "cuda" and not torch.cuda.is_available():
    p.error("--device cuda but PyTorch sees no GPU: use --device cpu (tiny presets)")
  dtype = DTYPES[args.dtype]
  os.makedirs(args.out, exist_ok=True)

  model = build_model(args.preset, args.layers, str(device), dtype, args.seed)
  family = schedule_lib.FAMILY_OF_PRESET[PRESETS[args.preset]["family"]]
  per_layer = None
  if args.attention == "t3":
    try:
      per_layer = install_t3(model, grid, args.schedule, family)
    except ValueError as e:
      p.error(str(e))
    log.info("T3 schedule for grid %s: %s", grid, schedule_lib.cycle(per_layer))
  save_state_dict(model, os.path.join(args.out, "model.safetensors"))

  latents, timestep, context = make_inputs(args.preset, grid, args.seed, args.per_token_timesteps)
  for name, array in (("latents", latents), ("timestep", timestep), ("context", context)):
    np.save(os.path.join(args.out, f"{name}.npy"), array)
  x = torch.from_numpy(latents).to(device, dtype)
  t = torch.from_numpy(timestep).to(device)
  c = torch.from_numpy(context).to(device, dtype)

  def forward():
    return model(x, t, c, return_dict=False)[0]

  timer = _timer(device)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  with torch.inference_mode():
    warmup_s, out = timer(forward)
    log.info("warm-up forward %.3f s", warmup_s)
    times = []
    for i in range(args.repeats):
      del out
      seconds, out = timer(forward)
      times.append(seconds)
      log.info("forward %d: %.3f s", i, seconds)
  np.save(os.path.join(args.out, "torch_out.npy"), out.float().cpu().numpy())

  timing = {
      "median_s": statistics.median(times), "all_s": times, "warmup_s": warmup_s,
      "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
      "torch": torch.__version__, "preset": args.preset, "grid": list(grid), "tokens": math.prod(grid),
      "num_layers": len(model.blocks), "dtype": args.dtype, "attention": args.attention,
      "schedule": [list(b) for b in schedule_lib.cycle(per_layer)] if per_layer else None,
      "timestep": "per-token" if args.per_token_timesteps else "scalar", "seed": args.seed,
  }
  with open(os.path.join(args.out, "torch_timing.json"), "w") as f:
    json.dump(timing, f, indent=1)
  print(json.dumps(timing))
  return 0


if __name__ == "__main__":
  sys.exit(main())
