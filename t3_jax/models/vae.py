"""Wan2.1 and Wan2.2 video VAEs in Flax NNX: causal 3D conv autoencoders with a temporal chunk cache.

Reference: diffusers' `AutoencoderKLWan` (diffusers layout) and Wan's own `WanVAE`
(original layout, as in DiffSynth-Studio and the T3-Video release).

Video -> latents:
  Wan2.1: [B, 3, 1+4n, H, W] -> [B, 16, 1+n, H/8, W/8]
  Wan2.2: [B, 3, 1+4n, H, W] -> [B, 48, 1+n, H/16, W/16]  (a 2x2 patchify before the encoder)

Both encoder and decoder are causal in time and run chunk by chunk, as Wan does: the encoder sees the
first frame alone and then chunks of 4 frames, the decoder one latent frame at a time. Every causal
conv keeps the last 2 frames of its input (`ChunkCache`) and prepends them to the next chunk, so the
chunked result equals one causal pass over the whole video except where Wan deliberately treats the
first chunk differently (no temporal up/down-sampling of the first frame). The chunk loop is a
`jax.lax.scan` whose carry is the cache; the first chunk runs before it.

Internal layout is channels-last, [batch, frames, height, width, channels]; the public API
(`encode`, `decode`) takes and returns Wan's [batch, channels, frames, height, width].

Spatially tiled `encode`/`decode` run the whole time axis of one spatial tile at a time (same tile shape
for every tile, so it compiles once) and blend overlapping tiles with linear ramps, normalised by the sum
of the weights, as the T3-Video release (DiffSynth's `WanVideoVAE.tiled_decode`) does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3_jax.weights import engine
from t3_jax.logs import log


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

# Per-channel latent statistics published with each VAE (Wan repos, diffusers configs, DiffSynth).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Hyper-parameters of a Wan VAE (names follow diffusers' `AutoencoderKLWan`)."""

  base_dim: int = 96
  decoder_base_dim: int | None = None  # None: same as base_dim (Wan2.1); 256 for Wan2.2
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temporal_downsample: tuple[bool, ...] = (False, True, True)  # per encoder stage transition
  is_residual: bool = False  # Wan2.2: residual down/up blocks with parameter-free shortcuts
  patch_size: int = 1  # Wan2.2: 2x2 pixel patchify before the encoder (12 input channels)
  image_channels: int = 3
  latents_mean: tuple[float, ...] = ()
  latents_std: tuple[float, ...] = ()

  def __post_init__(self):
    if len(self.temporal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(
          f"temporal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries, "
          f"got {len(self.temporal_downsample)}")
    for name in ("latents_mean", "latents_std"):
      values = getattr(self, name)
      if values and len(values) != self.z_dim:
        raise ValueError(f"{name} needs z_dim = {self.z_dim} entries, got {len(values)}")

  @property
  def decoder_dim(self) -> int:
    return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

  @property
  def in_channels(self) -> int:
    """Channels the encoder sees (after the patchify)."""
    return self.image_channels * self.patch_size**2

  @property
  def spatial_stride(self) -> int:
    return self.patch_size * 2 ** (len(self.dim_mult) - 1)

  @property
  def temporal_stride(self) -> int:
    return 2 ** sum(bool(t) for t in self.temporal_downsample)

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
    return cls(**kwargs)


PRESETS: dict[str, VAEConfig] = {
    "wan2.1": VAEConfig(
        base_dim=96, z_dim=16, latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD),
    "wan2.2": VAEConfig(
        base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2,
        latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD),
    # Tiny versions with the same structure (4 stages, 2 temporal down/up-samplings) for tests.
    "tiny-wan2.1": VAEConfig(base_dim=8, z_dim=4, num_res_blocks=1),
    "tiny-wan2.2": VAEConfig(
        base_dim=8, decoder_base_dim=12, z_dim=6, num_res_blocks=1, is_residual=True, patch_size=2),
}


def get_config(name_or_config: str | VAEConfig) -> VAEConfig:
  if isinstance(name_or_config, VAEConfig):
    return name_or_config
  if name_or_config not in PRESETS:
    raise ValueError(f"Unknown VAE preset {name_or_config!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name_or_config]


# ---------------------------------------------------------------------------------------------
# Temporal chunk cache
# ---------------------------------------------------------------------------------------------


class ChunkCache:
  """The frames each causal layer carries from one chunk to the next (Wan's `feat_cache`).

  A chunk reads the previous chunk's entries in call order and writes its own: every cached layer
  calls `read` then `write` once per chunk. `previous is None` marks the first chunk, whose layers
  read zeros (the causal zero padding). `entries` is a list of arrays: the carry of the scan.
  """

  def __init__(self, previous: list[jax.Array] | None = None):
    self.previous = previous
    self.entries: list[jax.Array] = []

  @property
  def first_chunk(self) -> bool:
    return self.previous is None

  def read(self, shape: tuple[int, ...], dtype) -> jax.Array:
    if self.previous is None:
      return jnp.zeros(shape, dtype)
    past = self.previous[len(self.entries)]
    if past.shape != tuple(shape):
      raise ValueError(f"chunk cache entry {len(self.entries)} has shape {past.shape}, expected {shape}")
    return past

  def write(self, frames: jax.Array) -> None:
    self.entries.append(frames)


# ---------------------------------------------------------------------------------------------
# Layers ([batch, frames, height, width, channels] throughout)
# ---------------------------------------------------------------------------------------------

# PyTorch's default conv init (kaiming-uniform with a=sqrt(5)), so random models behave like torch ones.
_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class CausalConv3d(nnx.Module):
  """Conv3d, causal in time: 2*p_t frames of left context (zeros, or the cached previous frames)."""

  def __init__(self, in_dim: int, out_dim: int, kernel_size: int | Sequence[int], *, stride=(1, 1, 1),
               padding: int | Sequence[int] = 0, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kernel_size = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    self.padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
    self.stride = tuple(stride)
    self.context = 2 * self.padding[0]  # frames of left context, taken from the cache
    self.dtype = dtype
    self.kernel = nnx.Param(_conv_init(rngs.params(), (*kernel_size, in_dim, out_dim), param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_dim,), param_dtype))

  def __call__(self, x: jax.Array, cache: ChunkCache | None = None) -> jax.Array:
    """x: [B, T, H, W, C_in] -> [B, T', H', W', C_out]. Without a cache, zeros are the left context."""
    if self.context:
      b, _, h, w, c = x.shape
      shape = (b, self.context, h, w, c)
      past = jnp.zeros(shape, x.dtype) if cache is None else cache.read(shape, x.dtype)
      x = jnp.concatenate([past.astype(x.dtype), x], axis=1)
      if cache is not None:
        cache.write(x[:, -self.context:])
    _, ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=self.stride,
        padding=((0, 0), (ph, ph), (pw, pw)), dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + self.bias[...].astype(self.dtype)


class Conv2d(nnx.Module):
  """A 2D convolution applied to every frame."""

  def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3, *, stride: int = 1,
               padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1)),
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.stride = (stride, stride)
    self.padding = padding
    self.dtype = dtype
    self.kernel = nnx.Param(_conv_init(rngs.params(), (kernel_size, kernel_size, in_dim, out_dim), param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    y = jax.lax.conv_general_dilated(
        x.reshape(b * t, h, w, c).astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=self.stride, padding=self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y + self.bias[...].astype(self.dtype)
    return y.reshape(b, t, *y.shape[1:])


class RMSNorm(nnx.Module):
  """x / ||x|| * sqrt(C) * gamma over channels (torch's F.normalize, eps 1e-12), computed in fp32."""

  def __init__(self, dim: int, *, param_dtype=jnp.float32):
    self.gamma = nnx.Param(jnp.ones((dim,), param_dtype))
    self.scale = math.sqrt(dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, 1e-12) * self.scale * self.gamma[...].astype(jnp.float32)
    return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
  """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1x1 conv shortcut when widths differ."""

  def __init__(self, in_dim: int, out_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = RMSNorm(in_dim, param_dtype=param_dtype)
    self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1, **kw)
    self.norm2 = RMSNorm(out_dim, param_dtype=param_dtype)
    self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1, **kw)
    self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1, **kw) if in_dim != out_dim else None

  def __call__(self, x: jax.Array, cache: ChunkCache) -> jax.Array:
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
    x = self.conv1(jax.nn.silu(self.norm1(x)), cache)
    x = self.conv2(jax.nn.silu(self.norm2(x)), cache)
    return x + shortcut


class AttentionBlock(nnx.Module):
  """Single-head self-attention over the pixels of each frame (the middle of encoder and decoder)."""

  def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = RMSNorm(dim, param_dtype=param_dtype)
    self.to_qkv = nnx.Linear(dim, 3 * dim, kernel_init=_conv_init, **kw)
    self.proj = nnx.Linear(dim, dim, kernel_init=_conv_init, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c)  # [frames, tokens, heads=1, 3C]
    q, k, v = jnp.split(qkv, 3, axis=-1)
    # The head dims (384 / 640 / 1024) exceed cuDNN's limit; XLA's path keeps the softmax in fp32.
    out = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    return x + self.proj(out.reshape(b, t, h, w, c))


class Resample(nnx.Module):
  """Wan's resampling: 2x nearest upsample + conv, or pad + stride-2 conv; the 3d modes also resample time.

  upsample3d doubles the frames with a causal (3,1,1) conv to 2C channels whose halves become the even
  and odd frames; downsample3d halves them with a stride-2 (3,1,1) conv over [cached frame, chunk].
  The first chunk is not resampled in time (1 frame stays 1 frame), exactly as in Wan.
  """

  MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

  def __init__(self, dim: int, mode: str, out_dim: int | None = None, *, dtype, param_dtype, rngs: nnx.Rngs):
    if mode not in self.MODES:
      raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mode = mode
    self.up = mode.startswith("up")
    if self.up:
      self.conv = Conv2d(dim, dim // 2 if out_dim is None else out_dim, 3, **kw)
    else:  # ZeroPad2d((0, 1, 0, 1)) then a 3x3 stride-2 conv
      self.conv = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
    if mode == "upsample3d":
      self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), **kw)
    elif mode == "downsample3d":
      self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), **kw)
    else:
      self.time_conv = None

  def __call__(self, x: jax.Array, cache: ChunkCache) -> jax.Array:
    if self.mode == "upsample3d":
      if cache.first_chunk:
        cache.write(jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype))  # Wan's "Rep": zeros next
      else:
        b, t, h, w, c = x.shape
        x = self.time_conv(x, cache)  # [B, T, H, W, 2C]: frame 2i from the first half
        x = x.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
    if self.up:
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest (= nearest-exact at 2x)
    x = self.conv(x)
    if self.mode == "downsample3d":
      if cache.first_chunk:
        cache.write(x[:, -1:])
      else:
        past = cache.read((x.shape[0], 1, *x.shape[2:]), x.dtype)
        cache.write(x[:, -1:])
        x = self.time_conv(jnp.concatenate([past, x], axis=1))
    return x


def avg_down(x: jax.Array, out_dim: int, factor_t: int, factor_s: int) -> jax.Array:
  """Wan2.2's parameter-free down shortcut: space/time-to-channels, then the mean of channel groups.

  [B, T, H, W, C] -> [B, ceil(T/ft), H/fs, W/fs, out_dim]; time is zero-padded at the front.
  """
  b, t, h, w, c = x.shape
  pad_t = (-t) % factor_t
  x = jnp.pad(x, ((0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)))
  t = (t + pad_t) // factor_t
  x = x.reshape(b, t, factor_t, h // factor_s, factor_s, w // factor_s, factor_s, c)
  x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # channel index = ((c * ft + a) * fs + i) * fs + j
  x = x.reshape(b, t, h // factor_s, w // factor_s, out_dim, -1)
  return x.mean(axis=-1)


def dup_up(x: jax.Array, out_dim: int, factor_t: int, factor_s: int, first_chunk: bool) -> jax.Array:
  """Wan2.2's parameter-free up shortcut: repeat channels, then channels-to-space/time (inverse of avg_down).

  The first chunk keeps only the last of its factor_t frames, as the main path yields one frame there.
  """
  b, t, h, w, c = x.shape
  x = jnp.repeat(x, out_dim * factor_t * factor_s**2 // c, axis=-1)
  x = x.reshape(b, t, h, w, out_dim, factor_t, factor_s, factor_s)
  x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * factor_t, h * factor_s, w * factor_s, out_dim)
  return x[:, factor_t - 1:] if first_chunk else x


class MidBlock(nnx.Module):
  """ResidualBlock -> AttentionBlock -> ResidualBlock."""

  def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResidualBlock(dim, dim, **kw), ResidualBlock(dim, dim, **kw)])
    self.attention = AttentionBlock(dim, **kw)

  def __call__(self, x: jax.Array, cache: ChunkCache) -> jax.Array:
    x = self.resnets[0](x, cache)
    x = self.attention(x)
    return self.resnets[1](x, cache)


class DownBlock(nnx.Module):
  """One encoder stage: residual blocks, then an optional downsample (+ avg_down shortcut on Wan2.2)."""

  def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, mode: str | None, residual: bool,
               *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dims = [in_dim] + [out_dim] * num_res_blocks
    self.resnets = nnx.List([ResidualBlock(i, o, **kw) for i, o in zip(dims[:-1], dims[1:])])
    self.downsampler = Resample(out_dim, mode, **kw) if mode else None
    self.residual = residual
    self.out_dim = out_dim
    self.factor_t = 2 if mode == "downsample3d" else 1
    self.factor_s = 2 if mode else 1

  def __call__(self, x: jax.Array, cache: ChunkCache) -> jax.Array:
    x_in = x
    for resnet in self.resnets:
      x = resnet(x, cache)
    if self.downsampler is not None:
      x = self.downsampler(x, cache)
    if self.residual:
      x = x + avg_down(x_in, self.out_dim, self.factor_t, self.factor_s)
    return x


class UpBlock(nnx.Module):
  """One decoder stage: residual blocks, then an optional upsample (+ dup_up shortcut on Wan2.2).

  Wan2.1's upsample halves the width (the next stage starts at out_dim // 2); Wan2.2's keeps it.
  """

  def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, mode: str | None, residual: bool,
               *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
    self.resnets = nnx.List([ResidualBlock(i, o, **kw) for i, o in zip(dims[:-1], dims[1:])])
    upsample_out = out_dim if residual else out_dim // 2
    self.upsampler = Resample(out_dim, mode, upsample_out, **kw) if mode else None
    self.residual = residual and mode is not None
    self.out_dim = out_dim
    self.factor_t = 2 if mode == "upsample3d" else 1

  def __call__(self, x: jax.Array, cache: ChunkCache) -> jax.Array:
    x_in = x
    for resnet in self.resnets:
      x = resnet(x, cache)
    if self.upsampler is not None:
      x = self.upsampler(x, cache)
    if self.residual:
      x = x + dup_up(x_in, self.out_dim, self.factor_t, 2, cache.first_chunk)
    return x


class Encoder(nnx.Module):
  """Video chunk [B, T, H, W, in_channels] -> [B, T', H/2^s, W/2^s, 2 z_dim] (mean and log-variance)."""

  def __init__(self, config: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dims = [config.base_dim * m for m in (1, *config.dim_mult)]
    last = len(config.dim_mult) - 1
    self.conv_in = CausalConv3d(config.in_channels, dims[0], 3, padding=1, **kw)
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      mode = None if i == last else ("downsample3d" if config.temporal_downsample[i] else "downsample2d")
      blocks.append(DownBlock(in_dim, out_dim, config.num_res_blocks, mode, config.is_residual, **kw))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], **kw)
    self.norm_out = RMSNorm(dims[-1], param_dtype=param_dtype)
    self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim, 3, padding=1, **kw)

  def __call__(self, x: jax.Array, cache: ChunkCache) -> jax.Array:
    x = self.conv_in(x, cache)
    for block in self.down_blocks:
      x = block(x, cache)
    x = self.mid_block(x, cache)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


class Decoder(nnx.Module):
  """Latent chunk [B, 1, h, w, z_dim] -> [B, 1 or temporal_stride, h*2^s, w*2^s, in_channels]."""

  def __init__(self, config: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    mult = config.dim_mult
    dims = [config.decoder_dim * m for m in (mult[-1], *mult[::-1])]
    temporal_upsample = config.temporal_downsample[::-1]
    last = len(mult) - 1
    self.conv_in = CausalConv3d(config.z_dim, dims[0], 3, padding=1, **kw)
    self.mid_block = MidBlock(dims[0], **kw)
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0 and not config.is_residual:
        in_dim //= 2  # Wan2.1's upsample halved the width
      mode = None if i == last else ("upsample3d" if temporal_upsample[i] else "upsample2d")
      blocks.append(UpBlock(in_dim, out_dim, config.num_res_blocks, mode, config.is_residual, **kw))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], param_dtype=param_dtype)
    self.conv_out = CausalConv3d(dims[-1], config.in_channels, 3, padding=1, **kw)

  def __call__(self, x: jax.Array, cache: ChunkCache) -> jax.Array:
    x = self.conv_in(x, cache)
    x = self.mid_block(x, cache)
    for block in self.up_blocks:
      x = block(x, cache)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


def patchify(x: jax.Array, p: int) -> jax.Array:
  """[B, T, H, W, C] -> [B, T, H/p, W/p, C*p*p], channel index c*p*p + col_offset*p + row_offset (Wan2.2)."""
  if p == 1:
    return x
  b, t, h, w, c = x.shape
  x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
  return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x: jax.Array, p: int) -> jax.Array:
  """Inverse of `patchify`."""
  if p == 1:
    return x
  b, t, h, w, cpp = x.shape
  x = x.reshape(b, t, h, w, cpp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
  return x.reshape(b, t, h * p, w * p, cpp // (p * p))


# ---------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------


class WanVAE(nnx.Module):
  """Wan2.1 / Wan2.2 video VAE.

  Public API (Wan layout): `encode(video [B, 3, F, H, W] in [-1, 1]) -> latents [B, z, 1+(F-1)/4, H/s, W/s]`
  (the posterior mean, not normalised) and `decode(latents) -> video in [-1, 1]`; `normalize_latents` /
  `denormalize_latents` apply the per-channel statistics the DiT was trained with.
  """

  def __init__(self, config: str | VAEConfig = "wan2.1", *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    config = get_config(config)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.dtype = dtype
    self.encoder = Encoder(config, **kw)
    self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1, **kw)
    self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1, **kw)
    self.decoder = Decoder(config, **kw)

  # -- whole-time-axis passes on channels-last arrays (traced inside jit) --------------------

  def encode_frames(self, video: jax.Array) -> jax.Array:
    """[B, F, H, W, 3] -> posterior moments [B, 1+(F-1)/4, H/s, W/s, 2 z_dim], chunk by chunk."""
    x = patchify(video.astype(self.dtype), self.config.patch_size)
    step = self.config.temporal_stride

    def run_chunk(previous, chunk):
      cache = ChunkCache(previous)
      out = self.encoder(chunk, cache)
      return cache.entries, out

    cache, first = run_chunk(None, x[:, :1])
    rest = x[:, 1:]
    if rest.shape[1]:
      b, f, h, w, c = rest.shape
      chunks = rest.reshape(b, f // step, step, h, w, c).swapaxes(0, 1)  # [chunks, B, 4, H, W, C]
      _, outs = jax.lax.scan(run_chunk, cache, chunks)
      outs = outs.swapaxes(0, 1).reshape(b, -1, *outs.shape[3:])
      first = jnp.concatenate([first, outs], axis=1)
    return self.quant_conv(first)

  def decode_frames(self, latents: jax.Array, clip: bool = True) -> jax.Array:
    """[B, F, h, w, z_dim] -> video [B, 1+4(F-1), h*s, w*s, 3], one latent frame per chunk.

    clip: clamp to [-1, 1] (tiles are blended unclamped and clamped after, as the references do).
    """
    x = self.post_quant_conv(latents.astype(self.dtype))

    def run_chunk(previous, chunk):
      cache = ChunkCache(previous)
      out = self.decoder(chunk, cache)
      return cache.entries, out

    cache, video = run_chunk(None, x[:, :1])
    if x.shape[1] > 1:
      _, outs = jax.lax.scan(run_chunk, cache, x[:, 1:].swapaxes(0, 1)[:, :, None])
      outs = outs.swapaxes(0, 1)  # [B, F-1, 4, H, W, C]
      video = jnp.concatenate([video, outs.reshape(outs.shape[0], -1, *outs.shape[3:])], axis=1)
    video = unpatchify(video, self.config.patch_size)
    return jnp.clip(video, -1.0, 1.0) if clip else video

  # -- public API (Wan layout [B, C, F, H, W]) ------------------------------------------------

  def encode(self, video: jax.Array, *, tiled: bool = False, tile: tuple[int, int] = (34, 34),
             stride: tuple[int, int] = (18, 16), return_logvar: bool = False):
    """video [B, 3, F, H, W] in [-1, 1], F = 1 + 4n, H and W multiples of the spatial stride ->
    latents [B, z_dim, 1 + n, H/s, W/s] (posterior mean; with return_logvar, (mean, logvar)).

    tiled: encode spatial tiles of `tile` latent pixels every `stride` latent pixels (DiffSynth's
    defaults) and blend them; the video must then be on one device, the latents are small.
    """
    cfg = self.config
    video = jnp.asarray(video)
    _check_video(video, cfg)
    s = cfg.spatial_stride
    lat_hw = (video.shape[3] // s, video.shape[4] // s)
    graphdef, state = nnx.split(self)
    if tiled:
      moments = _tiled(
          functools.partial(_encode_tile_into, graphdef), state, video, lat_hw, tile, stride,
          out_scale=1,
          out_shape=(video.shape[0], 2 * cfg.z_dim, 1 + (video.shape[2] - 1) // cfg.temporal_stride,
                     *lat_hw))
    else:
      moments = _encode_untiled(graphdef, state, video)
    mean, logvar = jnp.split(moments, 2, axis=1)
    return (mean, logvar) if return_logvar else mean

  def decode(self, latents: jax.Array, *, tiled: bool = True, tile: tuple[int, int] = (30, 52),
             stride: tuple[int, int] = (15, 26), out_dtype=jnp.float32, devices=None) -> jax.Array:
    """latents [B, z_dim, F, h, w] (not normalised) -> video [B, 3, 1 + 4(F-1), h*s, w*s] in [-1, 1].

    tiled: decode spatial tiles of `tile` latent pixels every `stride` latent pixels (the T3 release's
    (30, 52) / (15, 26)), each over the whole time axis, and blend them; a latent smaller than a tile is
    one tile, so tiled == untiled there. Untiled decoding holds every frame's full-resolution
    activations and an O((h*w)^2) attention map per frame: use it for small videos only.
    out_dtype: dtype of the video, which tiles are blended into on the device (81 frames at 4K: 7.6 GiB
    in fp32, 3.8 GiB in bf16, whose blend rounding, <= 2^-8, is below an 8-bit video's step).
    devices: decode the tiles on these devices at once (a canvas on each, summed on the first);
    the video lands on the first.
    """
    cfg = self.config
    latents = jnp.asarray(latents)
    if latents.ndim != 5 or latents.shape[1] != cfg.z_dim:
      raise ValueError(f"latents must be [batch, {cfg.z_dim}, frames, height, width], got {latents.shape}")
    graphdef, state = nnx.split(self)
    if not tiled:
      return _decode_untiled(graphdef, state, latents).astype(out_dtype)
    b, _, f, h, w = latents.shape
    s = cfg.spatial_stride
    canvas = _tiled(
        functools.partial(_decode_tile_into, graphdef), state, latents, (h, w), tile, stride,
        out_scale=s, out_dtype=out_dtype, devices=devices,
        out_shape=(b, cfg.image_channels, 1 + cfg.temporal_stride * (f - 1), h * s, w * s))
    return _clip_in_place(canvas)

  def normalize_latents(self, latents: jax.Array) -> jax.Array:
    return normalize_latents(latents, self.config)

  def denormalize_latents(self, latents: jax.Array) -> jax.Array:
    return denormalize_latents(latents, self.config)


def _latent_stats(config: VAEConfig, dtype) -> tuple[jax.Array, jax.Array]:
  if not config.latents_mean or not config.latents_std:
    raise ValueError("this VAE config has no latents_mean/latents_std; use the 'wan2.1'/'wan2.2' presets")
  shape = (1, config.z_dim, 1, 1, 1)
  return (jnp.asarray(config.latents_mean, dtype).reshape(shape),
          jnp.asarray(config.latents_std, dtype).reshape(shape))


def normalize_latents(latents: jax.Array, config: str | VAEConfig) -> jax.Array:
  """(z - mean) / std per channel, latents [B, z_dim, F, H, W]: what the DiT sees."""
  mean, std = _latent_stats(get_config(config), latents.dtype)
  return (latents - mean) / std


def denormalize_latents(latents: jax.Array, config: str | VAEConfig) -> jax.Array:
  """z * std + mean per channel: back to what the VAE decoder takes."""
  mean, std = _latent_stats(get_config(config), latents.dtype)
  return latents * std + mean


def _check_video(video: jax.Array, cfg: VAEConfig) -> None:
  if video.ndim != 5 or video.shape[1] != cfg.image_channels:
    raise ValueError(f"video must be [batch, {cfg.image_channels}, frames, height, width], got {video.shape}")
  f, h, w = video.shape[2:]
  if (f - 1) % cfg.temporal_stride:
    raise ValueError(f"video frames must be 1 + {cfg.temporal_stride}n, got {f}; trim or pad the clip")
  if h % cfg.spatial_stride or w % cfg.spatial_stride:
    raise ValueError(f"video height and width must be multiples of {cfg.spatial_stride}, got {h}x{w}")


# ---------------------------------------------------------------------------------------------
# Jitted entry points. graphdef is static: each model structure and input shape compiles once.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _encode_untiled(graphdef, state, video):
  model = nnx.merge(graphdef, state)
  moments = model.encode_frames(video.transpose(0, 2, 3, 4, 1))
  return moments.transpose(0, 4, 1, 2, 3).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _decode_untiled(graphdef, state, latents):
  model = nnx.merge(graphdef, state)
  video = model.decode_frames(latents.transpose(0, 2, 3, 4, 1))
  return video.transpose(0, 4, 1, 2, 3).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=1)
def _decode_tile_into(graphdef, canvas, state, tile_hw, latents, weight, h0, w0):
  """canvas[..., s*h0:, s*w0:] += weight * decode(latents[..., h0:h0+th, w0:w0+tw]) (canvas donated)."""
  model = nnx.merge(graphdef, state)
  b, c, f = latents.shape[:3]
  z = jax.lax.dynamic_slice(latents, (0, 0, 0, h0, w0), (b, c, f, *tile_hw))
  video = model.decode_frames(z.transpose(0, 2, 3, 4, 1), clip=False).transpose(0, 4, 1, 2, 3)
  s = model.config.spatial_stride
  return _add_tile(canvas, video, weight, h0 * s, w0 * s)


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=1)
def _encode_tile_into(graphdef, canvas, state, tile_hw, video, weight, h0, w0):
  """canvas[..., h0:, w0:] += weight * encode(video[..., s*h0:, s*w0:] tile) (canvas donated)."""
  model = nnx.merge(graphdef, state)
  s = model.config.spatial_stride
  b, c, f = video.shape[:3]
  x = jax.lax.dynamic_slice(video, (0, 0, 0, h0 * s, w0 * s), (b, c, f, tile_hw[0] * s, tile_hw[1] * s))
  moments = model.encode_frames(x.transpose(0, 2, 3, 4, 1)).transpose(0, 4, 1, 2, 3)
  return _add_tile(canvas, moments, weight, h0, w0)


@functools.partial(jax.jit, donate_argnums=0)
def _clip_in_place(video):
  return jnp.clip(video, -1.0, 1.0)


def _add_tile(canvas, tile, weight, y0, x0):
  start = (0, 0, 0, y0, x0)
  old = jax.lax.dynamic_slice(canvas, start, tile.shape).astype(jnp.float32)
  new = old + tile.astype(jnp.float32) * weight
  return jax.lax.dynamic_update_slice(canvas, new.astype(canvas.dtype), start)


# ---------------------------------------------------------------------------------------------
# Spatial tiling
# ---------------------------------------------------------------------------------------------


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
  """Tile offsets along one axis: every `stride`, the last tile shifted back to end at `size`.

  Every tile has the same length min(tile, size) (one compiled shape, no padding). Where (size - tile)
  is a multiple of stride these are DiffSynth's tiles.
  """
  if not 0 < stride <= tile:
    raise ValueError(f"tile stride must be in (0, tile={tile}], got {stride}")
  if size <= tile:
    return [0]  # one tile, clamped to the input
  starts = list(range(0, size - tile + 1, stride))
  if starts[-1] + tile < size:
    starts.append(size - tile)
  return starts


def blend_ramp(length: int, ramp: int, left_open: bool, right_open: bool) -> np.ndarray:
  """DiffSynth's 1D tile weight: 1 inside, rising (k+1)/ramp over `ramp` pixels on each side that meets
  another tile (an "open" side)."""
  weight = np.ones(length, np.float32)
  ramp = min(ramp, length)
  if ramp > 0:
    up = (np.arange(ramp, dtype=np.float32) + 1) / ramp
    if left_open:
      weight[:ramp] = up
    if right_open:
      weight[-ramp:] = up[::-1]
  return weight


def tile_weights(size_hw: tuple[int, int], tile_hw: tuple[int, int], stride_hw: tuple[int, int], scale: int):
  """Normalised blend weights of every tile, in output pixels.

  Returns ((h0, w0) tile offsets in input units, their [tile_h*scale, tile_w*scale] weights, and the
  tile size clamped to the input).
  A tile's weight is min(row ramp, column ramp), divided by the sum of all tiles' weights at each pixel,
  so the weighted sum of tiles is the blended output (DiffSynth's `values / weight`).
  """
  size_h, size_w = size_hw
  starts_h = tile_starts(size_h, tile_hw[0], stride_hw[0])
  starts_w = tile_starts(size_w, tile_hw[1], stride_hw[1])
  ramp_h = (tile_hw[0] - stride_hw[0]) * scale
  ramp_w = (tile_hw[1] - stride_hw[1]) * scale
  tile_hw = (min(tile_hw[0], size_h), min(tile_hw[1], size_w))
  th, tw = tile_hw[0] * scale, tile_hw[1] * scale
  offsets, masks = [], []
  total = np.zeros((size_h * scale, size_w * scale), np.float32)
  for h0 in starts_h:
    rows = blend_ramp(th, ramp_h, h0 > 0, h0 + tile_hw[0] < size_h)
    for w0 in starts_w:
      cols = blend_ramp(tw, ramp_w, w0 > 0, w0 + tile_hw[1] < size_w)
      mask = np.minimum(rows[:, None], cols[None, :])
      total[h0 * scale:h0 * scale + th, w0 * scale:w0 * scale + tw] += mask
      offsets.append((h0, w0))
      masks.append(mask)
  masks = [m / total[h0 * scale:h0 * scale + th, w0 * scale:w0 * scale + tw]
           for (h0, w0), m in zip(offsets, masks)]
  return offsets, masks, tile_hw


def _tiled(tile_into, state, inputs, size_hw, tile, stride, *, out_scale, out_shape, out_dtype=jnp.float32,
           devices=None):
  """Run `tile_into` over all tiles, accumulating weighted tiles into a canvas of out_shape.

  devices: spread the tiles over these devices (tile i on device i mod n, each with its own
  canvas; JAX dispatches asynchronously, so they run at once), then sum the canvases on the
  first. None: the default device.
  """
  offsets, masks, tile_hw = tile_weights(size_hw, tuple(tile), tuple(stride), out_scale)
  devices = list(devices or [None])[:len(offsets)]  # device_put(x, None): the default device
  states = [jax.device_put(state, d) for d in devices]
  inputs = [jax.device_put(inputs, d) for d in devices]
  canvases = [jnp.zeros(out_shape, out_dtype, device=d) for d in devices]
  for i, ((h0, w0), mask) in enumerate(zip(offsets, masks)):
    k = i % len(devices)
    h0, w0, mask = jax.device_put((np.int32(h0), np.int32(w0), mask), devices[k])
    canvases[k] = tile_into(canvases[k], states[k], tile_hw, inputs[k], mask, h0, w0)
  canvas = canvases[0]
  for other in canvases[1:]:
    canvas = _add_in_place(canvas, jax.device_put(other, devices[0]))
  return canvas


@functools.partial(jax.jit, donate_argnums=0)
def _add_in_place(canvas, other):
  return canvas + other


# ---------------------------------------------------------------------------------------------
# Torch checkpoints: Wan's original layout ("wan") and diffusers' AutoencoderKLWan ("diffusers")
# ---------------------------------------------------------------------------------------------

# Our module kinds -> (torch sub-key, our sub-path, transform) per layout.
_RESBLOCK = {
    "wan": [("residual.0.gamma", ("norm1", "gamma")), ("residual.2", ("conv1",)),
            ("residual.3.gamma", ("norm2", "gamma")), ("residual.6", ("conv2",)), ("shortcut", ("conv_shortcut",))],
    "diffusers": [("norm1.gamma", ("norm1", "gamma")), ("conv1", ("conv1",)), ("norm2.gamma", ("norm2", "gamma")),
                  ("conv2", ("conv2",)), ("conv_shortcut", ("conv_shortcut",))],
}


def _module_entries(torch_prefix: str, path: tuple, kind: str, layout: str, has_shortcut: bool = False):
  """(torch key, our param path, transform) rows of one module."""
  def conv(tk, p, transform):
    return [(f"{tk}.weight", (*p, "kernel"), transform), (f"{tk}.bias", (*p, "bias"), "vector")]

  rows = []
  if kind == "conv3d":
    rows += conv(torch_prefix, path, "conv3d")
  elif kind == "resblock":
    for sub, ours in _RESBLOCK[layout]:
      key = f"{torch_prefix}.{sub}"
      if ours[-1] == "gamma":
        rows.append((key, (*path, *ours), "vector"))
      elif ours == ("conv_shortcut",):
        if has_shortcut:
          rows += conv(key, (*path, *ours), "conv3d")
      else:
        rows += conv(key, (*path, *ours), "conv3d")
  elif kind == "attention":
    rows.append((f"{torch_prefix}.norm.gamma", (*path, "norm", "gamma"), "vector"))
    rows += conv(f"{torch_prefix}.to_qkv", (*path, "to_qkv"), "conv1x1_as_linear")
    rows += conv(f"{torch_prefix}.proj", (*path, "proj"), "conv1x1_as_linear")
  elif kind in ("resample", "resample3d"):
    rows += conv(f"{torch_prefix}.resample.1", (*path, "conv"), "conv2d")
    if kind == "resample3d":
      rows += conv(f"{torch_prefix}.time_conv", (*path, "time_conv"), "conv3d")
  elif kind == "rms":
    rows.append((f"{torch_prefix}.gamma", (*path, "gamma"), "vector"))
  else:
    raise AssertionError(kind)
  return rows


def torch_rules(config: str | VAEConfig, layout: str) -> list[engine.Rule]:
  """The (torch key, param path, transform) rules of a torch checkpoint in `layout` ("wan" | "diffusers").

  "wan" is Wan's original `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` layout (DiffSynth's `VideoVAE_` /
  `VideoVAE38_` modules); "diffusers" is `AutoencoderKLWan`'s. The VAE's stages are lists
  of modules whose count and numbering follow the config, so the rules are made from it.
  """
  cfg = get_config(config)
  if layout not in ("wan", "diffusers"):
    raise ValueError(f"layout must be 'wan' or 'diffusers', got {layout!r}")
  wan = layout == "wan"
  rows = []

  def add(prefix, path, kind, **kw):
    rows.extend(_module_entries(prefix, path, kind, layout, **kw))

  last = len(cfg.dim_mult) - 1
  # Encoder
  enc_dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
  add("encoder.conv1" if wan else "encoder.conv_in", ("encoder", "conv_in"), "conv3d")
  flat = 0  # index into Wan2.1's flat `downsamples` list
  for i in range(len(cfg.dim_mult)):
    in_dim, out_dim = enc_dims[i], enc_dims[i + 1]
    for j in range(cfg.num_res_blocks):
      if cfg.is_residual:
        prefix = f"encoder.downsamples.{i}.downsamples.{j}" if wan else f"encoder.down_blocks.{i}.resnets.{j}"
      else:
        prefix = f"encoder.{'downsamples' if wan else 'down_blocks'}.{flat}"
        flat += 1
      add(prefix, ("encoder", "down_blocks", i, "resnets", j), "resblock",
          has_shortcut=(in_dim if j == 0 else out_dim) != out_dim)
    if i != last:
      kind = "resample3d" if cfg.temporal_downsample[i] else "resample"
      if cfg.is_residual:
        prefix = (f"encoder.downsamples.{i}.downsamples.{cfg.num_res_blocks}" if wan
                  else f"encoder.down_blocks.{i}.downsampler")
      else:
        prefix = f"encoder.{'downsamples' if wan else 'down_blocks'}.{flat}"
        flat += 1
      add(prefix, ("encoder", "down_blocks", i, "downsampler"), kind)
  # Decoder
  mult = cfg.dim_mult
  dec_dims = [cfg.decoder_dim * m for m in (mult[-1], *mult[::-1])]
  temporal_upsample = cfg.temporal_downsample[::-1]
  add("decoder.conv1" if wan else "decoder.conv_in", ("decoder", "conv_in"), "conv3d")
  flat = 0
  for i in range(len(mult)):
    in_dim, out_dim = dec_dims[i], dec_dims[i + 1]
    if i > 0 and not cfg.is_residual:
      in_dim //= 2
    for j in range(cfg.num_res_blocks + 1):
      if cfg.is_residual:
        prefix = f"decoder.upsamples.{i}.upsamples.{j}" if wan else f"decoder.up_blocks.{i}.resnets.{j}"
      else:
        prefix = f"decoder.upsamples.{flat}" if wan else f"decoder.up_blocks.{i}.resnets.{j}"
        flat += 1
      add(prefix, ("decoder", "up_blocks", i, "resnets", j), "resblock",
          has_shortcut=(in_dim if j == 0 else out_dim) != out_dim)
    if i != last:
      kind = "resample3d" if temporal_upsample[i] else "resample"
      if cfg.is_residual:
        prefix = (f"decoder.upsamples.{i}.upsamples.{cfg.num_res_blocks + 1}" if wan
                  else f"decoder.up_blocks.{i}.upsampler")
      else:
        prefix = f"decoder.upsamples.{flat}" if wan else f"decoder.up_blocks.{i}.upsamplers.0"
        flat += 1
      add(prefix, ("decoder", "up_blocks", i, "upsampler"), kind)
  # Middle blocks and heads
  for part in ("encoder", "decoder"):
    mid = f"{part}.middle" if wan else f"{part}.mid_block"
    add(f"{mid}.0" if wan else f"{mid}.resnets.0", (part, "mid_block", "resnets", 0), "resblock")
    add(f"{mid}.1" if wan else f"{mid}.attentions.0", (part, "mid_block", "attention"), "attention")
    add(f"{mid}.2" if wan else f"{mid}.resnets.1", (part, "mid_block", "resnets", 1), "resblock")
    add(f"{part}.head.0" if wan else f"{part}.norm_out", (part, "norm_out"), "rms")
    add(f"{part}.head.2" if wan else f"{part}.conv_out", (part, "conv_out"), "conv3d")
  add("conv1" if wan else "quant_conv", ("quant_conv",), "conv3d")
  add("conv2" if wan else "post_quant_conv", ("post_quant_conv",), "conv3d")
  return [(key, "/".join(map(str, path)), transform) for key, path, transform in rows]


def _fields_from_shapes(shapes: Mapping[str, Sequence[int]], layout: str) -> dict:
  """Config fields of a torch state dict (either layout) from its key -> shape map: base/decoder
  widths, z_dim, dim_mult, num_res_blocks, temporal down-sampling, residual blocks, patch size."""
  shapes = {k: tuple(v) for k, v in shapes.items()}
  wan = layout == "wan"
  enc_in = shapes["encoder.conv1.weight" if wan else "encoder.conv_in.weight"]
  base_dim, in_channels = enc_in[0], enc_in[1]
  z_dim = shapes["conv2.weight" if wan else "post_quant_conv.weight"][0]
  dec_out = shapes["decoder.head.2.weight" if wan else "decoder.conv_out.weight"]
  patch = math.isqrt(in_channels // 3)
  if 3 * patch * patch != in_channels or dec_out[0] != in_channels:
    raise ValueError(f"unexpected VAE image channels: encoder in {in_channels}, decoder out {dec_out[0]}")
  decoder_dim = dec_out[1]  # decoder_dim * dim_mult[0], and dim_mult[0] is 1 in every Wan VAE

  root = "encoder.downsamples" if wan else "encoder.down_blocks"
  is_residual = any(re.match(rf"{re.escape(root)}\.\d+\.(downsamples|resnets)\.", k) for k in shapes)
  # Walk the encoder stages: residual blocks (their conv1 out-width gives dim_mult), then a resample.
  norm1 = "residual.0.gamma" if wan else "norm1.gamma"
  conv1 = "residual.2.weight" if wan else "conv1.weight"
  dim_mult, temporal, num_res = [], [], None
  if is_residual:
    inner = "downsamples" if wan else "resnets"
    stage = 0
    while f"{root}.{stage}.{inner}.0.{norm1}" in shapes:
      n = 0
      while f"{root}.{stage}.{inner}.{n}.{norm1}" in shapes:
        n += 1
      num_res = n
      dim_mult.append(shapes[f"{root}.{stage}.{inner}.0.{conv1}"][0] // base_dim)
      down = f"{root}.{stage}.downsamples.{n}" if wan else f"{root}.{stage}.downsampler"
      if f"{down}.resample.1.weight" in shapes:
        temporal.append(f"{down}.time_conv.weight" in shapes)
      stage += 1
  else:
    k, count = 0, 0
    while f"{root}.{k}.{norm1}" in shapes or f"{root}.{k}.resample.1.weight" in shapes:
      if f"{root}.{k}.{norm1}" in shapes:
        if count == 0:
          dim_mult.append(shapes[f"{root}.{k}.{conv1}"][0] // base_dim)
        count += 1
      else:
        temporal.append(f"{root}.{k}.time_conv.weight" in shapes)
        num_res, count = count, 0
      k += 1
    num_res = count if num_res is None else num_res
  if not dim_mult or len(temporal) != len(dim_mult) - 1:
    raise ValueError("could not read the encoder stages of this VAE state dict")
  return dict(
      base_dim=int(base_dim), decoder_base_dim=None if decoder_dim == base_dim else int(decoder_dim),
      z_dim=int(z_dim), dim_mult=tuple(int(m) for m in dim_mult), num_res_blocks=int(num_res),
      temporal_downsample=tuple(temporal), is_residual=is_residual, patch_size=patch)


def _from_fields(fields: Mapping[str, Any]) -> VAEConfig:
  """The VAEConfig of `fields`; the Wan2.1/Wan2.2 latent statistics when z_dim is 16/48 and
  the fields have none."""
  config = VAEConfig.from_dict(fields)
  if not config.latents_mean:
    stats = {16: (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD), 48: (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)}
    mean, std = stats.get(config.z_dim, ((), ()))
    if not mean:
      log.warning("VAE with z_dim=%d has no published latent statistics; normalize_latents will fail",
                     config.z_dim)
    config = dataclasses.replace(config, latents_mean=mean, latents_std=std)
  return config


def _fields_from_json(config: Mapping[str, Any]) -> dict | None:
  """diffusers' AutoencoderKLWan config.json; None for anything else."""
  if config.get("_class_name") != "AutoencoderKLWan":
    return None
  patch = config.get("patch_size") or 1
  names = {"base_dim": "base_dim", "decoder_base_dim": "decoder_base_dim", "z_dim": "z_dim",
           "dim_mult": "dim_mult", "num_res_blocks": "num_res_blocks",
           "temperal_downsample": "temporal_downsample", "is_residual": "is_residual",
           "latents_mean": "latents_mean", "latents_std": "latents_std"}
  fields = {ours: config[theirs] for theirs, ours in names.items() if theirs in config}
  if fields.get("decoder_base_dim") == fields.get("base_dim"):
    fields["decoder_base_dim"] = None
  fields["patch_size"] = patch
  if "in_channels" in config:
    fields["image_channels"] = config["in_channels"] // (patch * patch)
  return fields


def _build(config: VAEConfig, *, param_dtype, rngs, dtype=jnp.float32) -> WanVAE:
  return WanVAE(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


WEIGHTS = engine.ModelWeights(
    kind="vae", name="Wan VAE", short_name="VAE", config_type=VAEConfig, build=_build,
    layouts={
        "wan": engine.Layout(functools.partial(torch_rules, layout="wan"),
                             signature=("encoder.conv1.weight", "decoder.head.2.weight", "conv2.weight")),
        "diffusers": engine.Layout(functools.partial(torch_rules, layout="diffusers"),
                                   signature=("encoder.conv_in.weight", "decoder.conv_out.weight",
                                              "post_quant_conv.weight")),
    },
    fields_from_shapes=_fields_from_shapes, from_fields=_from_fields, fields_from_json=_fields_from_json,
    presets=PRESETS, make_hint="run: python convert_torch_weights.py SOURCE DIR --kind vae")


# ---------------------------------------------------------------------------------------------
# Orbax checkpoints
# ---------------------------------------------------------------------------------------------


def save_vae(directory: str, model: WanVAE, **extra) -> None:
  engine.save(WEIGHTS, directory, model, **extra)


def load_vae(ckpt_dir: str, dtype=jnp.bfloat16, param_dtype=jnp.float32) -> WanVAE:
  """A WanVAE from an Orbax checkpoint written by `save_vae` or the torch converter (kind "vae").

  dtype: compute dtype (bf16 for real use; norms and softmax stay fp32); param_dtype: storage dtype.
  """
  return engine.load(WEIGHTS, ckpt_dir, param_dtype=param_dtype, dtype=dtype)
