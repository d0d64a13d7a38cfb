"""The Wan video DiT (Wan2.1 / Wan2.2) in Flax NNX, with T3 window self-attention.

T3-Video changes one thing in a pretrained Wan DiT: the *pattern* of self-attention
(`t3_jax.core.attention.t3_attention`, window shape per layer from `t3_jax.core.schedule`).
Every parameter, and everything else (cross-attention, FFN, modulation, RoPE, head),
is Wan's, so pretrained weights load unchanged (`t3_jax.weights.convert`, `load_dit`).

  x = patch_embedding(latents)                      # Conv3d k=s=(1,2,2) as a Linear
  e = time_embedding(sinusoid(t));  e0 = time_projection(e)   # six modulations
  c = text_embedding(context)
  per block:  x += gate1 * SelfAttn(LN(x) * (1 + scale1) + shift1)   # T3 windows
              x += CrossAttn(norm3(x), c)
              x += gate2 * FFN(LN(x) * (1 + scale2) + shift2)
  out = unpatchify(head(LN(x) * (1 + scale) + shift))

Block parameters are stacked with a leading [num_layers] axis and run with
`jax.lax.scan` over *cycles* of the per-layer schedule (period 5 for the published T3
schedules, 1 for full attention), so each layer keeps its static window shape and
the compiled program holds one period of layers, not all of them.

Precision: matmuls and attention run in `dtype` (bf16 for real use); norms,
modulation, the time embedding, RoPE and the head run in float32. The residual
stream is kept in `dtype`, as in diffusers and DiffSynth (the T3 release).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3_jax.core import schedule as schedule_lib
from t3_jax.parallel.layout import Layout
from t3_jax.weights import engine

f32 = jnp.float32
Triple = tuple[int, int, int]

CONVERT_HINT = "run: python convert_torch_weights.py SOURCE DIR --kind dit"


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Architecture of a Wan DiT (what a checkpoint's config.json stores)."""
  dim: int = 1536
  ffn_dim: int = 8960
  num_heads: int = 12
  num_layers: int = 30
  in_channels: int = 16
  out_channels: int = 16
  text_dim: int = 4096
  freq_dim: int = 256
  patch_size: tuple[int, int, int] = (1, 2, 2)
  eps: float = 1e-6
  rope_theta: float = 10000.0
  # "wan2.1" (VAE stride (4, 8, 8)) or "wan2.2" (VAE stride (4, 16, 16)): decides
  # which published T3 schedule a derived schedule imitates.
  family: str = "wan2.1"
  # Wan2.2-TI2V takes a timestep per token (the first, clean frame gets t = 0).
  per_token_timesteps: bool = False

  def __post_init__(self):
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
    if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
      raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
    if self.family not in schedule_lib.FAMILY_OF_PRESET:
      raise ValueError(f"family must be one of {sorted(schedule_lib.FAMILY_OF_PRESET)}, got {self.family!r}")

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def schedule_family(self) -> str:
    return schedule_lib.FAMILY_OF_PRESET[self.family]

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["patch_size"] = list(self.patch_size)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "DiTConfig":
    """Builds a config from a dict, ignoring keys that are not config fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  @classmethod
  def preset(cls, name: str) -> "DiTConfig":
    if name not in PRESETS:
      raise ValueError(f"unknown DiT preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]


PRESETS: dict[str, DiTConfig] = {
    "wan2.1-t2v-1.3b": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan2.2-ti2v-5b": DiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30,
                                in_channels=48, out_channels=48, family="wan2.2",
                                per_token_timesteps=True),
    # Tiny models for tests. Head sizes are multiples of 6 (docs/T3.md section 5: RoPE split).
    "tiny-wan2.1": DiTConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=2, text_dim=32, freq_dim=64),
    "tiny-wan2.2": DiTConfig(dim=96, ffn_dim=192, num_heads=2, num_layers=2, in_channels=48,
                             out_channels=48, text_dim=32, freq_dim=64, family="wan2.2",
                             per_token_timesteps=True),
}


# ------------------------------------------------------------------ fixed embeddings

def timestep_sinusoid(t: jax.Array, dim: int) -> jax.Array:
  """Wan's sinusoidal timestep embedding: [...] -> [..., dim], [cos, sin] halves, fp32."""
  half = dim // 2
  freqs = np.power(10000.0, -np.arange(half, dtype=np.float64) / half).astype(np.float32)
  angles = t.astype(f32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def rope_pairs(head_dim: int) -> Triple:
  """Complex pairs of a head given to (frame, row, column): Wan's c - 2(c//3), c//3, c//3."""
  c = head_dim // 2
  return (c - 2 * (c // 3), c // 3, c // 3)


@functools.lru_cache(maxsize=32)
def _rope_axis_tables(grid: Triple, head_dim: int, theta: float):
  """Per axis, cos and sin of position * frequency: [n, pairs] each, computed in float64."""
  tables = []
  for n, pairs in zip(grid, rope_pairs(head_dim)):
    inv_freq = 1.0 / theta ** (np.arange(pairs, dtype=np.float64) / pairs)
    angles = np.outer(np.arange(n, dtype=np.float64), inv_freq)
    tables.append((np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)))
  return tuple(tables)


def rope_tables(grid: Triple, head_dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
  """Wan's 3D RoPE at every token of `grid`: (cos, sin), each [T*H*W, 1, head_dim // 2] fp32.

  Only the small per-axis tables are constants; the full tables are broadcast in the graph.
  """
  T, H, W = grid
  per_axis = _rope_axis_tables(tuple(grid), head_dim, float(theta))

  def full(which):
    (t, h, w) = (jnp.asarray(tables[which]) for tables in per_axis)
    parts = [jnp.broadcast_to(t[:, None, None], (T, H, W, t.shape[-1])),
             jnp.broadcast_to(h[None, :, None], (T, H, W, h.shape[-1])),
             jnp.broadcast_to(w[None, None, :], (T, H, W, w.shape[-1]))]
    return jnp.concatenate(parts, axis=-1).reshape(T * H * W, 1, -1)

  return full(0), full(1)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotates consecutive (real, imag) pairs. x: [batch, tokens, heads, head_dim] -> fp32."""
  cos, sin = rope
  x = x.astype(f32).reshape(*x.shape[:-1], -1, 2)
  real, imag = x[..., 0], x[..., 1]
  out = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
  return out.reshape(*out.shape[:-2], -1)


# -------------------------------------------------------------------------- modules

_ACTIVATIONS = {"gelu_tanh": functools.partial(jax.nn.gelu, approximate=True), "silu": jax.nn.silu}


def _axes(init, names):
  """An initializer whose parameter carries logical axis names (mapped to mesh axes by
  t3_jax.parallel.mesh.LOGICAL_AXIS_RULES; no mesh is needed to build the model)."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


def _dense(in_features, out_features, axes, *, dtype, param_dtype, rngs):
  """Linear layer; axes: logical names of its (in, out) dimensions, e.g. ("embed", "mlp")."""
  return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=_axes(nnx.initializers.xavier_uniform(), axes),
                    bias_init=_axes(nnx.initializers.zeros_init(), axes[1:]), rngs=rngs)


def _layer_norm(dim, eps, affine, *, param_dtype, rngs):
  # Statistics and output in float32; two-pass variance (as torch) for parity.
  return nnx.LayerNorm(dim, epsilon=eps, use_bias=affine, use_scale=affine, dtype=f32,
                       param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)


class MLP(nnx.Module):
  """Linear - activation - Linear (Wan's text/time embeddings and FFN)."""

  def __init__(self, in_features, hidden, out_features, activation, axes, *, dtype, param_dtype, rngs):
    """axes: logical names of (in, hidden, out)."""
    self.fc1 = _dense(in_features, hidden, axes[:2], dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = _dense(hidden, out_features, axes[1:], dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.activation = activation

  def __call__(self, x):
    return self.fc2(_ACTIVATIONS[self.activation](self.fc1(x)))


class Attention(nnx.Module):
  """Wan attention: q, k, v, o projections; q/k RMSNorm over the whole dim (not per head)."""

  def __init__(self, dim, num_heads, eps, *, dtype, param_dtype, rngs):
    self.num_heads = num_heads
    self.dtype = dtype
    for name in ("q", "k", "v", "o"):
      axes = ("heads", "embed") if name == "o" else ("embed", "heads")
      setattr(self, name, _dense(dim, dim, axes, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
    self.norm_q = nnx.RMSNorm(dim, epsilon=eps, dtype=f32, param_dtype=param_dtype, rngs=rngs)
    self.norm_k = nnx.RMSNorm(dim, epsilon=eps, dtype=f32, param_dtype=param_dtype, rngs=rngs)

  def _heads(self, x):  # [B, N, dim] -> [B, N, heads, head_dim]
    return x.reshape(*x.shape[:2], self.num_heads, -1)

  def project_qkv(self, x, rope):
    """q, k (RMSNorm, then RoPE at global positions: windows keep them) and v of the video
    tokens. x: [batch, N, dim] -> three [batch, N, heads, head_dim] in the compute dtype."""
    q = self._heads(self.norm_q(self.q(x).astype(f32)))
    k = self._heads(self.norm_k(self.k(x).astype(f32)))
    v = self._heads(self.v(x))
    return apply_rope(q, rope).astype(self.dtype), apply_rope(k, rope).astype(self.dtype), v.astype(self.dtype)

  def self_attention(self, x, rope, grid, blocks, layout: Layout, implementation=None):
    """T3 window self-attention. x: [batch, T*H*W, dim] -> [batch, T*H*W, dim]."""
    out = layout.self_attention(*self.project_qkv(x, rope), grid, blocks, implementation)
    return self.o(out.reshape(x.shape))

  def project_text(self, context):
    """k, v of the text. context: [batch, L, dim] -> two [batch, L, heads, head_dim]."""
    k = self._heads(self.norm_k(self.k(context).astype(f32))).astype(self.dtype)
    return k, self._heads(self.v(context)).astype(self.dtype)

  def attend_text(self, x, text_kv, layout: Layout, implementation=None):
    """Attention of the video tokens x [batch, N, dim] over the text's (k, v)."""
    q = self._heads(self.norm_q(self.q(x).astype(f32))).astype(self.dtype)
    return self.o(layout.cross_attention(q, *text_kv, implementation).reshape(x.shape))

  def cross_attention(self, x, context, layout: Layout, implementation=None):
    """Attention of the video tokens over the text. x: [batch, N, dim], context: [batch, L, dim]."""
    return self.attend_text(x, self.project_text(context), layout, implementation)


# The FFN's hidden activations ([tokens, ffn_dim], 12 GB at 4K for Wan2.1-1.3B in bf16,
# twice over with the GELU) set the forward's peak memory; above this many tokens (per
# device) the FFN runs over chunks of tokens, one after another (the same matmuls, a
# fraction of the memory; Layout.token_chunks), and with Layout.chunk_blocks the rest of
# each block's token-wise work too.
FFN_CHUNK_TOKENS = 1 << 17


def _grouped(x, groups):  # [B, N, D] -> [B, G, N/G, D]: tokens that share a timestep
  return x.reshape(x.shape[0], groups, -1, x.shape[-1])


def _modulate(norm, x, shift, scale):
  """norm(x) * (1 + scale) + shift in fp32. x: [B, N, D]; shift, scale: [B, G, 1, D]."""
  y = norm(_grouped(x, shift.shape[1]).astype(f32)) * (1 + scale) + shift
  return y.reshape(x.shape)


def _gated_add(x, y, gate):
  """x + y * gate in fp32, back in x's dtype. gate: [B, G, 1, D]."""
  groups = gate.shape[1]
  out = _grouped(x, groups).astype(f32) + _grouped(y, groups).astype(f32) * gate
  return out.reshape(x.shape).astype(x.dtype)


class Block(nnx.Module):
  """One Wan DiT block, self-attention through T3 windows."""

  def __init__(self, config: DiTConfig, *, dtype, param_dtype, rngs):
    dim, eps = config.dim, config.eps
    self.dtype = dtype
    self.norm1 = _layer_norm(dim, eps, False, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = Attention(dim, config.num_heads, eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm3 = _layer_norm(dim, eps, True, param_dtype=param_dtype, rngs=rngs)
    self.cross_attn = Attention(dim, config.num_heads, eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = _layer_norm(dim, eps, False, param_dtype=param_dtype, rngs=rngs)
    self.ffn = MLP(dim, config.ffn_dim, dim, "gelu_tanh", ("embed", "mlp", "embed"), dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)
    self.modulation = nnx.Param(
        (jax.random.normal(rngs.params(), (1, 6, dim), f32) / dim**0.5).astype(param_dtype))

  def __call__(self, x, context, e0, rope, grid: Triple, blocks: Triple, layout: Layout | None = None,
               implementation=None):
    """x: [B, N, dim]; context: [B, L, dim]; e0: [B, G, 6, dim] fp32 (G groups of tokens
    that share a timestep: 1, frames or tokens); rope: (cos, sin) [N, 1, head_dim/2];
    layout: where the activations live (one device by default); implementation: the
    attention kernel (None: the layout's devices decide)."""
    layout = layout or Layout()
    tokens = layout.tokens
    mod = self.modulation[...].astype(f32)[None] + e0                  # [B, G, 6, dim]
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, :, j, None] for j in range(6))

    if layout.chunk_blocks and mod.shape[1] == 1:
      # Everything but self-attention is token-wise: run it over chunks of tokens, so that its
      # fp32 [tokens, dim] intermediates (norms, modulation, RoPE, gates) exist one chunk at a
      # time. Same operations per token as below.
      def before_attention(x, cos, sin):
        h = _modulate(self.norm1, x, shift1, scale1).astype(self.dtype)
        return self.self_attn.project_qkv(h, (cos, sin))

      text_kv = self.cross_attn.project_text(context)

      def after_attention(x, attended):
        x = _gated_add(x, self.self_attn.o(attended.reshape(x.shape)), gate1)
        h = self.norm3(x.astype(f32)).astype(self.dtype)
        x = x + self.cross_attn.attend_text(h, text_kv, layout, implementation).astype(x.dtype)
        h = _modulate(self.norm2, x, shift2, scale2).astype(self.dtype)
        return _gated_add(x, self.ffn(h), gate2)

      q, k, v = layout.token_chunks(before_attention, x, FFN_CHUNK_TOKENS, tables=rope)
      attended = layout.self_attention(q, k, v, grid, blocks, implementation)
      return tokens(layout.token_chunks(after_attention, (x, attended), FFN_CHUNK_TOKENS))

    h = tokens(_modulate(self.norm1, x, shift1, scale1)).astype(self.dtype)
    x = tokens(_gated_add(x, self.self_attn.self_attention(h, rope, grid, blocks, layout, implementation), gate1))
    h = self.norm3(x.astype(f32)).astype(self.dtype)
    x = x + self.cross_attn.cross_attention(h, context, layout, implementation).astype(x.dtype)
    h = tokens(_modulate(self.norm2, x, shift2, scale2)).astype(self.dtype)
    return tokens(_gated_add(x, layout.token_chunks(self.ffn, h, FFN_CHUNK_TOKENS), gate2))


class Head(nnx.Module):
  """Output head: LN, shift/scale from its modulation + the time embedding, Linear (fp32)."""

  def __init__(self, config: DiTConfig, *, param_dtype, rngs):
    dim = config.dim
    self.norm = _layer_norm(dim, config.eps, False, param_dtype=param_dtype, rngs=rngs)
    self.linear = _dense(dim, config.out_channels * math.prod(config.patch_size), ("embed", "patch"), dtype=f32,
                         param_dtype=param_dtype, rngs=rngs)
    self.modulation = nnx.Param(
        (jax.random.normal(rngs.params(), (1, 2, dim), f32) / dim**0.5).astype(param_dtype))

  def __call__(self, x, e):
    """x: [B, N, dim]; e: [B, G, dim] fp32 time embedding -> [B, N, out * prod(patch)] fp32."""
    mod = self.modulation[...].astype(f32)[None] + e[:, :, None]        # [B, G, 2, dim]
    return self.linear(_modulate(self.norm, x, mod[:, :, 0, None], mod[:, :, 1, None]))


# ---------------------------------------------------------------------------- model

REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@functools.lru_cache(maxsize=64)
def _resolve(attention: str, schedule, grid: Triple, num_layers: int, family: str):
  """(per-layer block counts, their shortest period), cached per grid."""
  per_layer = schedule_lib.resolve_schedule(attention, schedule, grid, num_layers, family=family)
  period = tuple(schedule_lib.cycle(per_layer))
  assert all(per_layer[i] == period[i % len(period)] for i in range(num_layers))
  return tuple(per_layer), period


def _stacked_blocks(config: DiTConfig, dtype, param_dtype, rngs) -> Block:
  """One Block whose parameters carry a leading [num_layers] axis."""

  @nnx.split_rngs(splits=config.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(rngs):
    return Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  return create(rngs)


class WanDiT(nnx.Module):
  """Wan DiT with T3 (or full) self-attention.

  Call: model(latents [B, C, F, H, W], timesteps, context [B, L, text_dim])
        -> velocity [B, C_out, F, H, W] float32.
  timesteps (0..1000): [B]; or [B, T*H*W] one per latent token (Wan2.2-TI2V); or
  [B, G] for any G dividing the token count in flatten order, e.g. G = T latent frames
  (the same numbers as per token when timesteps are constant per frame, far cheaper).
  Context: umT5 output; Wan pads it with zeros to 512 tokens (the caller's job).
  """

  def __init__(self, config: DiTConfig, *, attention: str = "t3", schedule=None,
               dtype=jnp.bfloat16, param_dtype=jnp.float32, remat: str = "none",
               implementation: str | None = None, layout: Layout | None = None, rngs: nnx.Rngs):
    """
    Args:
      attention: "t3" (window attention) or "full" (the pretrained model as it was).
      schedule: for "t3": None (published schedule on its grid, a derived one elsewhere),
        a published name (see t3_jax.core.schedule.PUBLISHED), or [(n_t, n_h, n_w), ...]
        applied cyclically by layer index (or "a,b,c;d,e,f").
      dtype: compute dtype; param_dtype: parameter dtype.
      remat: rematerialisation per layer, one of REMAT_POLICIES.
      implementation: attention kernel (t3_jax.core.attention.choose_implementation; None:
        the kernel of the layout's devices).
      layout: where the activations live (t3_jax.parallel.layout.Layout; default one device):
        `WanDiT(..., layout=Layout(mesh))` runs data, fsdp and sequence parallel.
    """
    if attention not in ("t3", "full"):
      raise ValueError(f"attention must be 't3' or 'full', got {attention!r}")
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    if schedule is not None and not (isinstance(schedule, str) and schedule in schedule_lib.PUBLISHED):
      schedule = schedule_lib.parse_schedule(schedule)  # hashable tuple of triples
    self.config = config
    self.attention = attention
    self.schedule = schedule
    self.dtype = dtype
    self.remat = remat
    self.implementation = implementation
    self.layout = layout or Layout()

    dim, kw = config.dim, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embedding = _dense(config.in_channels * math.prod(config.patch_size), dim, ("patch", "embed"), **kw)
    self.text_embedding = MLP(config.text_dim, dim, dim, "gelu_tanh", ("text_dim", "embed", "mlp"), **kw)
    # Time embedding and projection in float32, as Wan computes them.
    kw32 = dict(dtype=f32, param_dtype=param_dtype, rngs=rngs)
    self.time_embedding = MLP(config.freq_dim, dim, dim, "silu", ("freq", "embed", "mlp"), **kw32)
    self.time_projection = _dense(dim, 6 * dim, ("embed", "mlp"), **kw32)
    self.blocks = _stacked_blocks(config, dtype, param_dtype, rngs)
    self.head = Head(config, param_dtype=param_dtype, rngs=rngs)

  def token_grid(self, latent_shape: Sequence[int]) -> Triple:
    """(T, H, W) tokens of latents shaped [B, C, F, H, W]."""
    _, channels, *spatial = latent_shape
    if channels != self.config.in_channels:
      raise ValueError(f"latents have {channels} channels, the model takes {self.config.in_channels}")
    if any(s % p for s, p in zip(spatial, self.config.patch_size)):
      raise ValueError(f"latent (frames, height, width) {tuple(spatial)} must be multiples of the "
                       f"patch {self.config.patch_size}")
    return tuple(s // p for s, p in zip(spatial, self.config.patch_size))

  def layer_schedule(self, grid: Sequence[int]) -> tuple[Triple, ...]:
    """Block counts (n_t, n_h, n_w) of every layer at this token grid."""
    return _resolve(self.attention, self.schedule, tuple(grid), self.config.num_layers,
                    self.config.schedule_family)[0]

  def __call__(self, latents, timesteps, context):
    cfg = self.config
    batch = latents.shape[0]
    grid = self.token_grid(latents.shape)
    num_tokens = math.prod(grid)

    self.layout.check_tokens(num_tokens)
    tokens = self.layout.tokens(patchify(latents, cfg.patch_size))
    x = self.patch_embedding(tokens.astype(self.dtype))

    timesteps = jnp.asarray(timesteps)
    timesteps = timesteps.reshape(batch, -1) if timesteps.ndim == 1 else timesteps
    if timesteps.ndim != 2 or timesteps.shape[0] != batch or num_tokens % timesteps.shape[1]:
      raise ValueError(f"timesteps must be [batch] or [batch, G] with G dividing the {num_tokens} "
                       f"tokens (e.g. G = tokens), got shape {timesteps.shape} for batch {batch}")
    e = self.time_embedding(timestep_sinusoid(timesteps, cfg.freq_dim))          # [B, G, dim]
    e0 = self.time_projection(jax.nn.silu(e)).reshape(*e.shape[:2], 6, cfg.dim)  # [B, G, 6, dim]

    context = self.text_embedding(context.astype(self.dtype))
    rope = tuple(self.layout.token_table(r) for r in rope_tables(grid, cfg.head_dim, cfg.rope_theta))
    x = self._run_blocks(x, context, e0, rope, grid)
    if self.remat == "none":
      out = self.head(x, e)
    else:  # the head's fp32 intermediates ([B, N, dim] x 4: 16 GiB at 4K) are recomputed, not saved
      out = jax.checkpoint(lambda x, e: self.head(x, e))(x, e)
    out = self.layout.tokens(out)
    return unpatchify(out, grid, cfg.patch_size, cfg.out_channels)

  def _run_blocks(self, x, context, e0, rope, grid):
    """Scans over cycles of the per-layer schedule; a remainder of layers runs after."""
    per_layer, period = _resolve(self.attention, self.schedule, grid, self.config.num_layers,
                                 self.config.schedule_family)
    graphdef, state = nnx.split(self.blocks)  # every leaf: [num_layers, ...]

    def layer(blocks, layer_state, x, context, e0, rope):
      block = nnx.merge(graphdef, layer_state)
      return block(x, context, e0, rope, grid, blocks, self.layout, self.implementation)

    def make_layer(blocks, prevent_cse):
      fn = functools.partial(layer, blocks)
      policy = REMAT_POLICIES[self.remat]
      if self.remat == "none":
        return fn
      return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse)

    num_period = len(period)
    num_cycles, remainder = divmod(len(per_layer), num_period)
    if num_cycles:
      in_scan = [make_layer(blocks, prevent_cse=False) for blocks in period]

      def cycle_body(x, cycle_state):
        for p, fn in enumerate(in_scan):
          x = fn(jax.tree.map(lambda a: a[p], cycle_state), x, context, e0, rope)
        return x, None

      cycles = jax.tree.map(
          lambda a: a[:num_cycles * num_period].reshape(num_cycles, num_period, *a.shape[1:]), state)
      x, _ = jax.lax.scan(cycle_body, x, cycles)
    for j in range(remainder):  # fewer than one period of layers
      i = num_cycles * num_period + j
      fn = make_layer(per_layer[i], prevent_cse=True)
      x = fn(jax.tree.map(lambda a: a[i], state), x, context, e0, rope)
    return x


def patchify(latents, patch_size: Sequence[int]):
  """[B, C, F, H, W] -> [B, T*H'*W', C*pt*ph*pw] (Wan's token order; Conv3d weight order)."""
  pt, ph, pw = patch_size
  return einops.rearrange(latents, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)


def unpatchify(x, grid: Sequence[int], patch_size: Sequence[int], channels: int):
  """[B, T*H*W, pt*ph*pw*C] -> [B, C, T*pt, H*ph, W*pw] (head features ordered (pt, ph, pw, C))."""
  (t, h, w), (pt, ph, pw) = grid, patch_size
  return einops.rearrange(x, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w,
                          pt=pt, ph=ph, pw=pw, c=channels)


# ------------------------------------------------------------------- torch layouts

# Wan's original names (Wan-AI releases, DiffSynth, the T3-Video release) and diffusers'
# (WanTransformer3DModel), side by side; "{i}" is the block index.
_LINEARS = [  # torch Linear modules: (our module, original, diffusers)
    ("text_embedding/fc1", "text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding/fc2", "text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding/fc1", "time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding/fc2", "time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection", "time_projection.1", "condition_embedder.time_proj"),
    ("blocks/self_attn/q", "blocks.{i}.self_attn.q", "blocks.{i}.attn1.to_q"),
    ("blocks/self_attn/k", "blocks.{i}.self_attn.k", "blocks.{i}.attn1.to_k"),
    ("blocks/self_attn/v", "blocks.{i}.self_attn.v", "blocks.{i}.attn1.to_v"),
    ("blocks/self_attn/o", "blocks.{i}.self_attn.o", "blocks.{i}.attn1.to_out.0"),
    ("blocks/cross_attn/q", "blocks.{i}.cross_attn.q", "blocks.{i}.attn2.to_q"),
    ("blocks/cross_attn/k", "blocks.{i}.cross_attn.k", "blocks.{i}.attn2.to_k"),
    ("blocks/cross_attn/v", "blocks.{i}.cross_attn.v", "blocks.{i}.attn2.to_v"),
    ("blocks/cross_attn/o", "blocks.{i}.cross_attn.o", "blocks.{i}.attn2.to_out.0"),
    ("blocks/ffn/fc1", "blocks.{i}.ffn.0", "blocks.{i}.ffn.net.0.proj"),
    ("blocks/ffn/fc2", "blocks.{i}.ffn.2", "blocks.{i}.ffn.net.2"),
    ("head/linear", "head.head", "proj_out"),
]
_TENSORS = [  # other tensors: (our param, original, diffusers, transform)
    ("patch_embedding/kernel", "patch_embedding.weight", "patch_embedding.weight", "conv_as_linear"),
    ("patch_embedding/bias", "patch_embedding.bias", "patch_embedding.bias", "identity"),
    ("blocks/self_attn/norm_q/scale", "blocks.{i}.self_attn.norm_q.weight", "blocks.{i}.attn1.norm_q.weight",
     "identity"),
    ("blocks/self_attn/norm_k/scale", "blocks.{i}.self_attn.norm_k.weight", "blocks.{i}.attn1.norm_k.weight",
     "identity"),
    ("blocks/cross_attn/norm_q/scale", "blocks.{i}.cross_attn.norm_q.weight", "blocks.{i}.attn2.norm_q.weight",
     "identity"),
    ("blocks/cross_attn/norm_k/scale", "blocks.{i}.cross_attn.norm_k.weight", "blocks.{i}.attn2.norm_k.weight",
     "identity"),
    ("blocks/norm3/scale", "blocks.{i}.norm3.weight", "blocks.{i}.norm2.weight", "identity"),
    ("blocks/norm3/bias", "blocks.{i}.norm3.bias", "blocks.{i}.norm2.bias", "identity"),
    ("blocks/modulation", "blocks.{i}.modulation", "blocks.{i}.scale_shift_table", "identity"),
    ("head/modulation", "head.modulation", "scale_shift_table", "identity"),
]


def _rules(layout: int) -> list[engine.Rule]:
  """The (torch key, param path, transform) rules of one column (1: original, 2: diffusers)."""
  return ([rule for row in _LINEARS for rule in engine.dense(row[layout], row[0])]
          + [(row[layout], row[0], row[3]) for row in _TENSORS])


# Per layout, the tensors whose shapes give the architecture.
_PROBES = {
    "original": {"patch": "patch_embedding.weight", "text": "text_embedding.0.weight",
                 "time": "time_embedding.0.weight", "ffn": "blocks.0.ffn.0.weight", "head": "head.head.weight"},
    "diffusers": {"patch": "patch_embedding.weight", "text": "condition_embedder.text_embedder.linear_1.weight",
                  "time": "condition_embedder.time_embedder.linear_1.weight",
                  "ffn": "blocks.0.ffn.net.0.proj.weight", "head": "proj_out.weight"},
}


def _fields_from_shapes(shapes, layout: str) -> dict:
  """Every DiTConfig field the tensor shapes show; the head count is not among them."""
  probes = _PROBES[layout]
  missing = [k for k in probes.values() if k not in shapes or not shapes[k]]
  if missing:
    raise engine.WeightsError(f"Wan DiT checkpoint ({layout} layout) lacks {', '.join(missing)}: "
                              "it is incomplete (a missing shard?)")
  patch = shapes[probes["patch"]]
  if len(patch) != 5:
    raise engine.WeightsError(f"{probes['patch']} has shape {patch}, expected a Conv3d weight (out, in, kt, kh, kw)")
  patch_size = tuple(patch[2:])
  layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
  return {"dim": patch[0], "in_channels": patch[1], "patch_size": patch_size,
          "ffn_dim": shapes[probes["ffn"]][0], "text_dim": shapes[probes["text"]][-1],
          "freq_dim": shapes[probes["time"]][-1], "num_layers": max(layers) + 1 if layers else 0,
          "out_channels": shapes[probes["head"]][0] // math.prod(patch_size)}


def _fields_from_json(config: dict) -> dict | None:
  """The fields of a diffusers WanTransformer3DModel config.json or a Wan release's
  config.json (dim, num_heads, in_dim, ...); None for anything else."""
  if config.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in config:
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    fields = {"num_heads": heads, "dim": heads * head_dim if heads and head_dim else None,
              **{k: config.get(k) for k in ("ffn_dim", "num_layers", "in_channels", "out_channels", "text_dim",
                                             "freq_dim", "patch_size", "eps")}}
  elif config.get("_class_name") == "WanModel" or ("dim" in config and "num_heads" in config):
    fields = {"dim": config.get("dim"), "num_heads": config.get("num_heads"), "in_channels": config.get("in_dim"),
              "out_channels": config.get("out_dim"),
              **{k: config.get(k) for k in ("ffn_dim", "num_layers", "text_dim", "freq_dim", "patch_size", "eps")}}
  else:
    return None
  return {k: v for k, v in fields.items() if v is not None}


def _from_fields(fields: dict) -> DiTConfig:
  """A DiTConfig; unless given, the family follows the latent channels (48: Wan2.2's VAE)."""
  family = fields.get("family", "wan2.2" if fields.get("in_channels") == 48 else "wan2.1")
  return DiTConfig.from_dict({"family": family, "per_token_timesteps": family == "wan2.2", **fields})


def _build(config: DiTConfig, *, param_dtype, rngs, **kwargs) -> WanDiT:
  return WanDiT(config, param_dtype=param_dtype, rngs=rngs, **kwargs)


WEIGHTS = engine.ModelWeights(
    kind="dit", name="Wan DiT", short_name="DiT", config_type=DiTConfig, build=_build,
    layouts={
        "original": engine.Layout(_rules(1), signature=(
            "patch_embedding.weight", "text_embedding.0.weight", "head.head.weight", "blocks.0.self_attn.q.weight")),
        "diffusers": engine.Layout(_rules(2), signature=(
            "patch_embedding.weight", "condition_embedder.text_embedder.linear_1.weight", "proj_out.weight",
            "blocks.0.attn1.to_q.weight")),
    },
    fields_from_shapes=_fields_from_shapes, from_fields=_from_fields, fields_from_json=_fields_from_json,
    presets=PRESETS, unseen={"num_heads": "--num_heads"}, make_hint=CONVERT_HINT)


# ------------------------------------------------------------------------- loading

def param_logical_axes(model: WanDiT) -> dict:
  """The logical axis names of every parameter (a pure dict of PartitionSpecs of names,
  e.g. blocks.ffn.fc1.kernel: ("layers", "embed", "mlp")), as the modules declared them."""
  return nnx.to_pure_dict(nnx.get_partition_spec(nnx.split(model)[1]))


def load_dit(ckpt_dir: str, attention: str = "t3", schedule=None, dtype=jnp.bfloat16,
             param_dtype=None, implementation: str | None = None, remat: str = "none",
             layout: Layout | None = None) -> WanDiT:
  """A ready WanDiT from a t3-jax DiT checkpoint (made by convert_torch_weights.py).

  param_dtype None keeps the checkpoint's dtype (restored straight into it). Other
  arguments as for WanDiT.
  """
  return engine.load(WEIGHTS, ckpt_dir, param_dtype=param_dtype, attention=attention, schedule=schedule,
                     dtype=dtype, implementation=implementation, remat=remat, layout=layout)
