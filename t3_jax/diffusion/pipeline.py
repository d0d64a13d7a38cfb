"""Text to native 4K video: umT5 -> T3 Wan DiT (flow matching, CFG) -> Wan VAE.

  pipe = T3Pipeline.from_checkpoints(dit_dir, vae_dir, umt5_dir, tokenizer_dir)
  out = pipe("A drone shot over a snowy ridge", height=2176, width=3840, frames=81)
  out.frames        # uint8 [frames, height, width, 3]
  out.stats         # seconds per stage (text, compile, denoise, decode) and peak memory

What it does, as the T3-Video release does it (docs/T3.md section 4):
  1. text: umT5 encodes the prompt and the negative prompt (Wan's standard Chinese one by
     default), each padded to 512 tokens, padding zeroed.
  2. denoise: noise x_T ~ N(0, I) of the latent shape [1, z, 1 + (F-1)/4, H/s, W/s] from an
     integer seed; flow-match Euler (or UniPC), 50 steps, shift 5; classifier-free guidance
     v = v_u + g (v_c - v_u), g = 5, the conditional and unconditional passes as ONE forward
     of batch 2. The whole loop is one jitted program (a fori_loop inside t3_jax.diffusion.flow.sample)
     that takes the DiT's parameters, the noise and the text contexts as arguments: it is
     traced and compiled once per shape and reused for every prompt and seed.
  3. decode: latents are de-normalised with the VAE's per-channel statistics and decoded by
     the Wan VAE in spatial tiles (the release's command line: latent tiles (68, 120) every
     (34, 60)), then mapped from [-1, 1] to uint8.

Several devices (`mesh=layout.sampling_mesh(sequence, guidance_parallel)`): the DiT runs
sequence parallel (each video's tokens split over `sequence` devices; every self-attention
exchanges head groups with two all-to-alls) and/or guidance parallel (the conditional and
unconditional halves of the batch on two device groups); the VAE decodes its tiles on all the
mesh's devices at once. Same outputs as one device, to floating-point rounding.

Sizes: height and width must be multiples of VAE stride x patch = 16 (Wan2.1) or 32 (Wan2.2);
other sizes are rounded UP to the next multiple, as DiffSynth (the release) does, and with
`crop_to_request` the output is centre-cropped back to the requested size. E.g. Wan2.2 at
2160x3840 generates 2176x3840. (On Wan2.1, 2160 is already a multiple of 16 and is generated as
is, with a derived T3 schedule that pads 135 token rows to 136; ask for 2176 to run the published
schedule the T3 weights were trained with.) Frames must be 4k + 1 (81, 121, ...).

Wan2.2-TI2V-5B takes a timestep per latent token (its image-to-video mode keeps the first
frame's tokens at t = 0). For text-to-video every token shares the step's timestep, so the
sampler passes one timestep per example, [batch], which the DiT broadcasts over all tokens:
the same numbers as Wan2.2's per-token input with equal entries, without the per-token
modulation tensors.

Differences from the release, on purpose: latents are kept in float32 between steps (the
release keeps them in bf16), the initial noise comes from JAX's PRNG (not torch's), and the
frames are rounded, not truncated, to uint8.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import resource
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3_jax.weights import checkpoint as checkpoint_lib
from t3_jax.weights import engine
from t3_jax.models import dit as dit_lib
from t3_jax.diffusion import flow
from t3_jax.logs import log
from t3_jax.parallel import mesh as mesh_lib
from t3_jax.parallel.layout import Layout
from t3_jax.models import umt5 as umt5_lib
from t3_jax.models import vae as vae_lib

# Wan's standard negative prompt (Wan2.1 wan/configs/shared_config.py `sample_neg_prompt`;
# the T3-Video release passes the same string in infer_multi_gpu.py).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")

# The release's VAE tiling (infer_multi_gpu.py, --tiled true, ratio 2), in latent pixels.
RELEASE_VAE_TILE = (68, 120)
RELEASE_VAE_TILE_STRIDE = (34, 60)

# What convert_torch_weights.py reads to make each checkpoint kind.
CHECKPOINT_SOURCES = {
    "dit": "T3-Video-Wan2.1-T2V-1.3B.safetensors or T3-Video-Wan2.2-T2V-5B.safetensors",
    "vae": "Wan2.1_VAE.pth or Wan2.2_VAE.pth",
    "umt5": "models_t5_umt5-xxl-enc-bf16.pth",
}

_DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32,
           "float16": jnp.float16, "fp16": jnp.float16}


def converter_command(directory: str, kind: str) -> str:
  return f"python convert_torch_weights.py SOURCE {directory} --kind {kind}"


def require_checkpoint(directory: str, kind: str) -> None:
  """Raises FileNotFoundError naming the converter command when `directory` holds no checkpoint."""
  if not directory or not os.path.isfile(os.path.join(directory, checkpoint_lib.CONFIG_FILE)):
    raise FileNotFoundError(
        f"no {kind} checkpoint at {directory or '(empty path)'}: make it with "
        f"`{converter_command(directory or 'DIR', kind)}` (SOURCE: {CHECKPOINT_SOURCES[kind]})")


def as_dtype(name_or_dtype) -> Any:
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in _DTYPES:
      raise ValueError(f"unknown dtype {name_or_dtype!r}: use one of {sorted(_DTYPES)}")
    return _DTYPES[name_or_dtype]
  return name_or_dtype


# ----------------------------------------------------------------------------- sizes


def check_frames(frames: int, temporal_stride: int = 4) -> None:
  if not isinstance(frames, (int, np.integer)) or frames < 1 or (frames - 1) % temporal_stride:
    raise ValueError(f"frames must be {temporal_stride}k+1, e.g. 81 (got {frames})")


def round_up(value: int, multiple: int) -> int:
  return -(-int(value) // multiple) * multiple


def round_size(height: int, width: int, multiple: int) -> tuple[int, int]:
  """(height, width) rounded up to multiples of `multiple` (VAE stride x patch)."""
  for name, v in (("height", height), ("width", width)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  return round_up(height, multiple), round_up(width, multiple)


def center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """[F, H, W, C] -> [F, height, width, C], the centre."""
  top, left = (frames.shape[1] - height) // 2, (frames.shape[2] - width) // 2
  return frames[:, top:top + height, left:left + width]


@dataclasses.dataclass(frozen=True)
class VideoShape:
  """What was asked for, what is generated, and the latent it comes from."""
  requested: tuple[int, int, int]  # (frames, height, width)
  generated: tuple[int, int, int]  # (frames, height, width), multiples of the size multiple
  latent: tuple[int, int, int, int]  # (channels, latent frames, latent height, latent width)


# ----------------------------------------------------------------------------- tokenizer


class ByteTokenizer:
  """DEMO ONLY: UTF-8 bytes as token ids (id = byte + 2; 0 = pad, 1 = EOS), no model file.

  Its ids mean nothing to a trained umT5; it exists so that the random-weight demo runs on a
  machine with no downloads. Same call as UMT5Tokenizer.
  """

  vocab_size = 258

  def __call__(self, prompts: Sequence[str], max_length: int = umt5_lib.TEXT_LENGTH):
    if isinstance(prompts, str):
      raise ValueError("prompts must be a list of strings, not one string: wrap it as [prompt]")
    ids = np.zeros((len(prompts), max_length), np.int32)
    mask = np.zeros((len(prompts), max_length), np.int32)
    for row, prompt in enumerate(prompts):
      tokens = [b + 2 for b in prompt.encode("utf-8")][:max_length - 1] + [umt5_lib.EOS_ID]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask


# ----------------------------------------------------------------------------- memory


def peak_memory() -> tuple[int, str]:
  """(bytes, source): the largest `peak_bytes_in_use` of the local devices where the backend
  reports it (GPU, TPU), else the process's peak resident memory (CPU)."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return max(peaks), "device peak_bytes_in_use"
  # ru_maxrss is in KiB on Linux.
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


# ----------------------------------------------------------------------------- denoising


# How often the denoising loop has been traced (tests check it is once per shape).
TRACE_COUNTS: collections.Counter = collections.Counter()

# The tqdm bar the running denoising loop reports to. The jitted loop calls one fixed
# module-level function, so a new bar per call does not retrace the loop.
_progress_bar = None


def _report_progress(done: int, total: int) -> None:
  bar = _progress_bar
  if bar is not None and done > bar.n:  # callbacks may arrive out of order
    bar.update(done - bar.n)


def _denoise(graphdef, state, noise, context, negative_context, guidance, *, sampler: str,
             num_steps: int, shift: float, progress: bool):
  """The sampling loop: noise [1, C, F, h, w] -> latents [1, C, F, h, w] float32.

  context, negative_context: [1, L, text_dim]; negative_context None means no guidance (one
  conditional pass per step). guidance: a traced scalar, so changing it does not recompile.
  """
  TRACE_COUNTS["denoise"] += 1
  model = nnx.merge(graphdef, state)

  def model_fn(x, t, ctx):
    return model(x, t, ctx)

  if negative_context is None:
    velocity_fn = lambda x, t: model_fn(x, t, context)
  else:
    velocity_fn = flow.guided_velocity(model_fn, context, negative_context, guidance)
  return flow.sample(velocity_fn, noise, sampler=sampler, num_steps=num_steps, shift=shift,
                     progress_callback=_report_progress if progress else None)


_denoise_jit = jax.jit(_denoise, static_argnums=0,
                       static_argnames=("sampler", "num_steps", "shift", "progress"))


# ----------------------------------------------------------------------------- outputs


def to_uint8_frames(video: jax.Array) -> np.ndarray:
  """VAE output [1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] (rounded), converted on device."""
  frames = jnp.clip(jnp.round((video[0].astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
  return np.asarray(jax.device_get(frames.transpose(1, 2, 3, 0)))


@dataclasses.dataclass
class SampleOutput:
  frames: np.ndarray  # uint8 [frames, height, width, 3]
  latents: np.ndarray | None  # float32 [1, C, F, h, w], the DiT's (normalised) latent space
  shape: VideoShape
  stats: dict  # text_s, compile_s, denoise_s, decode_s (seconds), peak_memory_bytes, peak_memory_source


def format_stats(stats: dict) -> list[str]:
  """One line per stage and one for peak memory."""
  lines = [f"{name[:-2]}: {stats[name]:.2f} s" for name in ("load_s", "text_s", "compile_s", "denoise_s",
                                                            "decode_s", "write_s") if name in stats]
  if "peak_memory_bytes" in stats:
    lines.append(f"peak memory: {stats['peak_memory_bytes'] / 2**30:.2f} GiB ({stats['peak_memory_source']})")
  return lines


# ----------------------------------------------------------------------------- pipeline


def _vae_with_latent_stats(config: vae_lib.VAEConfig) -> vae_lib.VAEConfig:
  """The VAE config with its per-channel latent statistics (the DiT's latent space)."""
  if config.latents_mean and config.latents_std:
    return config
  for preset in ("wan2.1", "wan2.2"):
    p = vae_lib.PRESETS[preset]
    if dataclasses.replace(config, latents_mean=(), latents_std=()) == dataclasses.replace(
        p, latents_mean=(), latents_std=()):
      log.warning("the VAE checkpoint stores no latents_mean/latents_std: using the %s preset's", preset)
      return p
  raise ValueError("the VAE checkpoint has no latents_mean/latents_std and matches no Wan preset: "
                   "convert it again with convert_torch_weights.py --kind vae")


# The one random init (t3_jax.weights.engine), under the name T3Pipeline.random calls (tests swap it).
random_init = engine.random_init


# What T3Pipeline.random builds: the tiny test models, or the DiT presets at full size.
RANDOM_PRESETS = ("tiny-wan2.1", "tiny-wan2.2", "wan2.1-t2v-1.3b", "wan2.2-ti2v-5b", "wan2.1-t2v-14b")


def random_configs(preset: str, num_layers: int | None = None, dtype="float32"):
  """(DiT config, VAE config, umT5 config, {"dit"|"vae"|"umt5": dtype kwargs}) of a random pipeline.

  Tiny presets: the DiT is made to fit the tiny VAE's latent channels and the tiny encoder's
  width, the VAE gets identity latent statistics, every module computes and stores in `dtype`
  (as before). Full presets: the DiT preset, its family's VAE preset (real latent statistics) and
  umT5-XXL unchanged; parameters stored as `from_checkpoints` holds converted weights (DiT and
  umT5 in bf16, the VAE in fp32), computing in `dtype`.
  """
  if preset not in RANDOM_PRESETS:
    raise ValueError(f"unknown random_init preset {preset!r}: use one of {', '.join(RANDOM_PRESETS)}")
  if num_layers is not None and (not isinstance(num_layers, (int, np.integer)) or num_layers < 0):
    raise ValueError(f"num_layers must be a positive integer (or 0: the preset's), got {num_layers!r}")
  dtype = as_dtype(dtype)
  dit_config = dit_lib.DiTConfig.preset(preset)
  if preset.startswith("tiny-"):
    vae_config = vae_lib.get_config(preset)
    vae_config = dataclasses.replace(vae_config, latents_mean=(0.0,) * vae_config.z_dim,
                                     latents_std=(1.0,) * vae_config.z_dim)
    umt5_config = dataclasses.replace(umt5_lib.UMT5Config.tiny(), vocab_size=ByteTokenizer.vocab_size)
    dit_config = dataclasses.replace(dit_config, in_channels=vae_config.z_dim, out_channels=vae_config.z_dim,
                                     text_dim=umt5_config.d_model)
    dtypes = {"dit": {"dtype": dtype}, "vae": {"dtype": dtype}, "umt5": {"dtype": dtype}}
  else:
    vae_config = vae_lib.get_config(dit_config.family)
    umt5_config = umt5_lib.UMT5Config.umt5_xxl()
    # As from_checkpoints holds them: the DiT as the converter stores the release's (bf16), the
    # VAE in fp32, umT5 in bf16 (load_umt5's storage), whatever the compute dtype.
    dtypes = {"dit": {"dtype": dtype, "param_dtype": jnp.bfloat16},
              "vae": {"dtype": dtype, "param_dtype": jnp.float32},
              "umt5": {"dtype": dtype, "param_dtype": jnp.bfloat16}}
  if num_layers:
    dit_config = dataclasses.replace(dit_config, num_layers=int(num_layers))
  return dit_config, vae_config, umt5_config, dtypes


class T3Pipeline:
  """Text-to-video with a Wan DiT (T3 or full attention), the umT5 encoder and a Wan VAE.

  Build with `from_checkpoints` (converted weights) or `random` (tiny random weights, demo
  and tests). Call: pipe(prompt, height=..., width=..., frames=...) -> SampleOutput; or, for
  many prompts, `encode` them all once, `release_text_encoder`, then `generate` each.
  """

  def __init__(self, dit: dit_lib.WanDiT, vae: vae_lib.WanVAE, text_encoder: umt5_lib.UMT5Encoder | None,
               tokenizer, *, text_len: int = umt5_lib.TEXT_LENGTH, random_weights: bool = False,
               mesh=None):
    """mesh: `t3_jax.parallel.layout.sampling_mesh(...)` to run the DiT sequence- and/or guidance-parallel
    (the DiT must then be built with `layout=Layout(mesh)`, as `from_checkpoints`
    and `random` do) and to decode the VAE tiles on all its devices; None: one device."""
    if dit.config.in_channels != vae.config.z_dim or dit.config.out_channels != vae.config.z_dim:
      raise ValueError(f"the DiT takes {dit.config.in_channels} latent channels but the VAE makes "
                       f"{vae.config.z_dim}: pair Wan2.1 DiTs with the Wan2.1 VAE, Wan2.2 with Wan2.2")
    if text_encoder is not None and text_encoder.config.d_model != dit.config.text_dim:
      raise ValueError(f"the text encoder makes {text_encoder.config.d_model}-dim contexts, the DiT "
                       f"takes {dit.config.text_dim}")
    if dit.config.patch_size[1] != dit.config.patch_size[2]:
      raise ValueError(f"non-square spatial patch {dit.config.patch_size} is not supported")
    self.dit = dit
    self.vae = vae
    self.vae_config = _vae_with_latent_stats(vae.config)
    self.text_encoder = text_encoder
    self.tokenizer = tokenizer
    self.text_len = text_len
    self.random_weights = random_weights
    self.mesh = mesh
    self._graphdef, self._state = nnx.split(dit)
    if mesh is not None:  # parameters replicated on every device of the mesh
      self._state = jax.device_put(self._state, mesh_lib.replicated(mesh))
    self._compiled = {}
    self.load_seconds = 0.0

  # -- construction -------------------------------------------------------------------------

  @classmethod
  def from_checkpoints(cls, dit_dir: str, vae_dir: str, umt5_dir: str, tokenizer_dir: str, *,
                       attention: str = "t3", schedule=None, dtype="bfloat16",
                       implementation: str | None = None, text_len: int = umt5_lib.TEXT_LENGTH,
                       mesh=None) -> "T3Pipeline":
    """Loads converted checkpoints (convert_torch_weights.py) and the umT5 sentencepiece folder.

    Every path is checked before anything loads, so a missing one fails at once, naming the
    converter command that makes it.
    """
    for directory, kind in ((dit_dir, "dit"), (vae_dir, "vae"), (umt5_dir, "umt5")):
      require_checkpoint(directory, kind)
    start = time.perf_counter()
    tokenizer = umt5_lib.UMT5Tokenizer.from_dir(tokenizer_dir)
    dtype = as_dtype(dtype)
    dit = dit_lib.load_dit(dit_dir, attention=attention, schedule=schedule, dtype=dtype,
                           implementation=implementation, layout=Layout(mesh))
    vae = vae_lib.load_vae(vae_dir, dtype=dtype, param_dtype=jnp.float32)
    text_encoder = umt5_lib.load_umt5(umt5_dir, dtype=dtype, param_dtype=jnp.bfloat16)
    pipe = cls(dit, vae, text_encoder, tokenizer, text_len=text_len, mesh=mesh)
    pipe.load_seconds = time.perf_counter() - start
    return pipe

  @classmethod
  def random(cls, preset: str = "tiny-wan2.1", *, seed: int = 0, num_layers: int | None = None,
             attention: str = "t3", schedule=None, dtype="float32", text_len: int = 64,
             mesh=None) -> "T3Pipeline":
    """Randomly initialised DiT, VAE and umT5 (DEMO, tests, and timing without weights).

    preset: one of RANDOM_PRESETS.
      - "tiny-wan2.1", "tiny-wan2.2": tiny models (dit.PRESETS and vae.PRESETS share these
        names), drawn on the host; the VAE gets identity latent statistics.
      - a full DiT preset ("wan2.1-t2v-1.3b", "wan2.2-ti2v-5b", "wan2.1-t2v-14b"): the DiT at
        that preset, its family's Wan VAE and umT5-XXL, all at their real sizes, drawn on the
        device in the dtypes `from_checkpoints` holds them in (bf16 DiT and umT5 parameters, fp32
        VAE parameters), so a run times what a user's run with converted weights computes.
    num_layers: a shallower DiT (None or 0: the preset's). The tokenizer is the byte-level
    ByteTokenizer (its ids are valid umT5-XXL ids). The videos are noise-like: nothing here is trained.
    """
    dit_config, vae_config, umt5_config, dtypes = random_configs(preset, num_layers, dtype)
    full = not preset.startswith("tiny-")
    start = time.perf_counter()
    dit = random_init(lambda: dit_lib.WanDiT(dit_config, attention=attention, schedule=schedule,
                                             rngs=nnx.Rngs(0), layout=Layout(mesh), **dtypes["dit"]),
                      seed, on_device=full)
    vae = random_init(lambda: vae_lib.WanVAE(vae_config, rngs=nnx.Rngs(0), **dtypes["vae"]), seed + 1,
                      on_device=full)
    text_encoder = random_init(lambda: umt5_lib.UMT5Encoder(umt5_config, rngs=nnx.Rngs(0), **dtypes["umt5"]),
                               seed + 2, on_device=full)
    pipe = cls(dit, vae, text_encoder, ByteTokenizer(), text_len=text_len, random_weights=True, mesh=mesh)
    jax.block_until_ready(pipe._state)
    pipe.load_seconds = time.perf_counter() - start
    return pipe

  # -- sizes --------------------------------------------------------------------------------

  @property
  def size_multiple(self) -> int:
    """Height and width granularity: VAE spatial stride x DiT patch (16 Wan2.1, 32 Wan2.2)."""
    return self.vae_config.spatial_stride * self.dit.config.patch_size[1]

  def video_shape(self, height: int, width: int, frames: int, size_multiple: int = 0) -> VideoShape:
    """Checks frames (4k+1) and rounds (height, width) up to a multiple of `size_multiple`
    (0: `self.size_multiple`; else a multiple of it, e.g. 128 makes 2160 -> 2176 on Wan2.1)."""
    check_frames(frames, self.vae_config.temporal_stride)
    base = self.size_multiple
    if not isinstance(size_multiple, (int, np.integer)) or size_multiple < 0 or size_multiple % base:
      raise ValueError(f"size_multiple must be 0 or a multiple of {base} (VAE stride x patch), got {size_multiple!r}")
    gen_h, gen_w = round_size(height, width, size_multiple or base)
    s = self.vae_config.spatial_stride
    latent = (self.vae_config.z_dim, 1 + (frames - 1) // self.vae_config.temporal_stride, gen_h // s, gen_w // s)
    return VideoShape(requested=(frames, height, width), generated=(frames, gen_h, gen_w), latent=latent)

  def token_grid(self, shape: VideoShape) -> tuple[int, int, int]:
    """(T, H, W) DiT tokens of a video shape."""
    return self.dit.token_grid((1, *shape.latent))

  def window_pattern(self, shape: VideoShape) -> tuple:
    """The self-attention block counts (n_t, n_h, n_w) of one schedule cycle at this shape."""
    from t3_jax.core import schedule as schedule_lib
    return tuple(schedule_lib.cycle(self.dit.layer_schedule(self.token_grid(shape))))

  # -- text ---------------------------------------------------------------------------------

  def encode(self, prompts: Sequence[str], batch_size: int = 8) -> np.ndarray:
    """Prompts -> contexts float32 [len(prompts), text_len, text_dim] (host memory).

    Runs in batches of `batch_size` (the last one padded, so one compiled shape).
    """
    if self.text_encoder is None:
      raise ValueError("the text encoder was released: encode every prompt before release_text_encoder()")
    prompts = list(prompts)
    out = []
    for i in range(0, len(prompts), batch_size):
      chunk = prompts[i:i + batch_size]
      padded = chunk + [""] * (min(batch_size, len(prompts)) - len(chunk))
      context = umt5_lib.encode_text(self.text_encoder, self.tokenizer, padded, self.text_len)
      out.append(np.asarray(jax.device_get(context))[:len(chunk)])
    return np.concatenate(out, axis=0)

  def release_text_encoder(self) -> None:
    """Drops the umT5 encoder (11 GB in bf16 for XXL) so the DiT and VAE get its memory."""
    self.text_encoder = None

  # -- denoising and decoding ----------------------------------------------------------------

  def _compiled_loop(self, noise, context, negative_context, guidance, sampler, num_steps, shift, progress):
    structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (noise, context, negative_context))
    key = (jax.tree.structure(structs), tuple(jax.tree.leaves(structs)), sampler, num_steps, float(shift), progress)
    if key not in self._compiled:
      lowered = _denoise_jit.lower(self._graphdef, self._state, noise, context, negative_context, guidance,
                                   sampler=sampler, num_steps=num_steps, shift=float(shift), progress=progress)
      self._compiled[key] = lowered.compile()
    return self._compiled[key]

  def denoise(self, context, negative_context, noise, *, guidance: float = 5.0, steps: int = 50,
              shift: float = 5.0, sampler: str = "euler", progress: bool = True) -> tuple[jax.Array, float, float]:
    """The jitted sampling loop. context, negative_context: [1, L, text_dim] (negative_context
    None, or guidance 1, runs without guidance); noise: [1, C, F, h, w].

    Returns (latents float32 [1, C, F, h, w], compile seconds, run seconds).
    """
    global _progress_bar
    if sampler not in flow.SAMPLERS:
      raise ValueError(f"unknown sampler {sampler!r}: use one of {flow.SAMPLERS}")
    if not (isinstance(steps, (int, np.integer)) and steps >= 1):
      raise ValueError(f"steps must be a positive integer, got {steps!r}")
    context = jnp.asarray(context, jnp.float32)
    if guidance == 1 or negative_context is None:
      negative_context = None
    else:
      negative_context = jnp.asarray(negative_context, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    guidance = jnp.float32(guidance)
    if self.mesh is not None:
      self._check_mesh(noise.shape, negative_context is not None)
      # Small inputs, replicated; the DiT's layout hooks split the tokens and the guided batch.
      noise, context, negative_context, guidance = jax.device_put(
          (noise, context, negative_context, guidance), mesh_lib.replicated(self.mesh))

    start = time.perf_counter()
    compiled = self._compiled_loop(noise, context, negative_context, guidance, sampler, int(steps), shift, progress)
    compile_s = time.perf_counter() - start

    bar = None
    if progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=int(steps), desc="denoising", unit="step", leave=False)
    _progress_bar = bar
    start = time.perf_counter()
    try:
      latents = compiled(self._state, noise, context, negative_context, guidance)
      latents.block_until_ready()
      jax.effects_barrier()  # every progress callback has run
    finally:
      _progress_bar = None
      if bar is not None:
        bar.close()
    return latents, compile_s, time.perf_counter() - start

  def _check_mesh(self, latent_shape, guided: bool) -> None:
    tokens = math.prod(self.dit.token_grid(latent_shape))
    shards = mesh_lib.axis_size(self.mesh, "tokens")
    if tokens % shards:
      raise ValueError(f"{tokens} latent tokens don't split over sample.sequence={shards} devices: "
                       f"choose a sequence size dividing {tokens} (e.g. 2 or 4 at 2176x3840)")
    if mesh_lib.axis_size(self.mesh, "batch") > 1 and not guided:
      raise ValueError("guidance-parallel sampling needs guidance != 1 (two passes per step): "
                       "set sample.guidance_parallel=False")

  def decode(self, latents, *, tiled: bool = True, tile=RELEASE_VAE_TILE,
             tile_stride=RELEASE_VAE_TILE_STRIDE) -> jax.Array:
    """DiT-space latents [1, C, F, h, w] -> video [1, 3, 1 + 4(F-1), h*s, w*s] in [-1, 1]."""
    z = vae_lib.denormalize_latents(jnp.asarray(latents, jnp.float32), self.vae_config)
    # A latent smaller than a tile is one tile: clamp tile and stride to it (vae.tile_starts
    # rejects a stride longer than the clamped tile).
    tile = tuple(min(t, n) for t, n in zip(tile, z.shape[3:]))
    tile_stride = tuple(min(s, t) for s, t in zip(tile_stride, tile))
    devices = None if self.mesh is None else list(self.mesh.devices.flat)
    return self.vae.decode(z, tiled=tiled, tile=tile, stride=tile_stride, devices=devices)

  def generate(self, context, negative_context=None, *, height: int, width: int, frames: int,
               steps: int = 50, guidance: float = 5.0, shift: float = 5.0, sampler: str = "euler",
               seed: int = 0, size_multiple: int = 0, crop_to_request: bool = False, vae_tiled: bool = True,
               vae_tile=RELEASE_VAE_TILE, vae_tile_stride=RELEASE_VAE_TILE_STRIDE, progress: bool = True,
               return_latents: bool = False) -> SampleOutput:
    """One video from encoded text (contexts [L, text_dim] or [1, L, text_dim]).

    Returns uint8 frames at the generated size (height and width rounded up, see
    `video_shape`), or centre-cropped to the requested one with crop_to_request.
    """
    shape = self.video_shape(height, width, frames, size_multiple)
    context = np.asarray(context, np.float32).reshape(1, -1, self.dit.config.text_dim)
    if negative_context is not None:
      negative_context = np.asarray(negative_context, np.float32).reshape(1, -1, self.dit.config.text_dim)
    noise = flow.initial_noise(int(seed), (1, *shape.latent))

    latents, compile_s, denoise_s = self.denoise(context, negative_context, noise, guidance=guidance, steps=steps,
                                                 shift=shift, sampler=sampler, progress=progress)
    start = time.perf_counter()
    video = to_uint8_frames(self.decode(latents, tiled=vae_tiled, tile=vae_tile, tile_stride=vae_tile_stride))
    decode_s = time.perf_counter() - start
    if crop_to_request:
      video = center_crop(video, height, width)
    peak, source = peak_memory()
    stats = dict(compile_s=compile_s, denoise_s=denoise_s, decode_s=decode_s,
                 peak_memory_bytes=peak, peak_memory_source=source)
    return SampleOutput(frames=video, latents=np.asarray(latents) if return_latents else None,
                        shape=shape, stats=stats)

  def __call__(self, prompt: str, negative_prompt: str | None = None, *, height: int, width: int,
               frames: int, guidance: float = 5.0, **kwargs) -> SampleOutput:
    """prompt -> SampleOutput. negative_prompt None: Wan's standard one; guidance 1: none.
    Other arguments as for `generate`; stats gain load_s and text_s."""
    self.video_shape(height, width, frames, kwargs.get("size_multiple", 0))  # fail before any work
    guided = guidance != 1
    negative_prompt = WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
    start = time.perf_counter()
    contexts = self.encode([prompt, negative_prompt] if guided else [prompt], batch_size=2 if guided else 1)
    text_s = time.perf_counter() - start
    out = self.generate(contexts[0], contexts[1] if guided else None, height=height, width=width, frames=frames,
                        guidance=guidance, **kwargs)
    out.stats = {"load_s": self.load_seconds, "text_s": text_s, **out.stats}
    return out
