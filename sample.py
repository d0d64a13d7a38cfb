"""Text to native 4K video with T3 (T3-Video on Wan DiTs), written as H.264 mp4 files.

  python sample.py --config=configs/t3_wan.py --prompt "A drone shot over a snowy ridge"
      T3-Video-Wan2.1-T2V-1.3B at 2176x3840, 81 frames, 50 Euler steps, CFG 5 (the release's
      defaults; a config path without ":variant" is the file's "default" variant)
  python sample.py --config=configs/t3_wan.py:5b --prompt "..."        T3-Video-Wan2.2-T2V-5B
  python sample.py --config=configs/t3_wan.py:demo --output_dir=/tmp/demo
      no weights needed: tiny RANDOM models (noise-like video), 9 frames at 128x256
  python sample.py --config=configs/t3_wan.py --config.sample.random_init=wan2.1-t2v-1.3b --steps=3
      no weights needed: the full-size models with RANDOM weights, to time a 4K run end to end
  python sample.py --config=configs/t3_wan.py --prompts_file=4K-World-Vision.json --output_dir=out
      a JSON list of {"prompt_en": ...} (or strings); with several processes
      (--distributed) each takes every process_count-th prompt

Every field of config.sample can be set with --config.sample.FIELD=VALUE (e.g.
--config.sample.crop_to_request=True, --config.sample.dit_checkpoint=DIR); the DiT's
attention, schedule, kernel and dtype are config.model's (--config.model.attention=full). The short flags
--prompt --prompts_file --output_dir --seed --steps --guidance --height --width --frames --fps
--save_latents set the config.sample field of the same name and win over --config.sample.*.

Checkpoints come from `python convert_torch_weights.py SOURCE DIR --kind dit|vae|umt5`; the
tokenizer is the google/umt5-xxl/ folder of a Wan release (config.sample.tokenizer_dir).

Outputs: OUTPUT_DIR/NNNN_<prompt words>.mp4 (written to a hidden temporary file, then renamed:
never a half-written mp4) and, with save_latents, the denoised latents as .npy. Existing
outputs are skipped unless config.sample.overwrite. At the end, one line per stage (seconds)
and the peak memory. Bad input (frames not 4k+1, an unknown config field, a missing checkpoint,
a bad prompts file) prints one line `error: ...` and exits with status 2.
"""

import json
import os
import re
import sys
import warnings

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from t3_jax import cli
from t3_jax.cli import USER_ERRORS, fail


DEFAULT_CONFIG = "configs/t3_wan.py:default"


def define_flags() -> None:
  """The command line (defined when run as a script, so importing this module defines nothing)."""
  try:  # without --config, the default config is loaded and overridden here, as the flag is defined
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "config file[:variant] (see configs/t3_wan.py)")
  except Exception as e:
    fail(cli.explain_flag_error(e, sys.argv, DEFAULT_CONFIG))
  flags.DEFINE_string("prompt", None, "text prompt (config.sample.prompt)")
  flags.DEFINE_string("prompts_file", None, "JSON list of {\"prompt_en\": ...} (config.sample.prompts_file)")
  flags.DEFINE_string("output_dir", None, "where the mp4 files go (config.sample.output_dir)")
  flags.DEFINE_integer("seed", None, "noise seed (config.sample.seed)")
  flags.DEFINE_integer("steps", None, "denoising steps (config.sample.steps)")
  flags.DEFINE_float("guidance", None, "classifier-free guidance scale (config.sample.guidance)")
  flags.DEFINE_integer("height", None, "video height (config.sample.height)")
  flags.DEFINE_integer("width", None, "video width (config.sample.width)")
  flags.DEFINE_integer("frames", None, "frames, 4k+1 (config.sample.frames)")
  flags.DEFINE_integer("fps", None, "mp4 frame rate (config.sample.fps)")
  flags.DEFINE_bool("save_latents", None, "also save the latents as .npy (config.sample.save_latents)")
  flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() and split the prompts over processes")


FLAGS = flags.FLAGS

SHORT_FLAGS = ("prompt", "prompts_file", "output_dir", "seed", "steps", "guidance", "height", "width", "frames",
               "fps", "save_latents")
# ----------------------------------------------------------------------------- flags


def parse_flags(argv):
  return cli.parse_flags(FLAGS, argv, DEFAULT_CONFIG)


def sample_config():
  """config.sample with the short flags applied (the DiT's fields are config.model's)."""
  if "sample" not in FLAGS.config:
    raise ValueError(f"config variant {FLAGS.config.get('variant')!r} is not a sampling config (it has no sample "
                     "group): sample with configs/t3_wan.py (T3-Video-Wan2.1-T2V-1.3B), :5b "
                     "(T3-Video-Wan2.2-T2V-5B), :demo or :tiny (random tiny models)")
  sample = FLAGS.config.sample
  for name in SHORT_FLAGS:
    value = getattr(FLAGS, name)
    if value is not None:
      sample[name] = value
  return sample


# ----------------------------------------------------------------------------- prompts


def load_prompts(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompts file {path} not found")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"prompts file {path} is not valid JSON ({e})") from None
  if not isinstance(data, list) or not data:
    raise ValueError(f"prompts file {path} must hold a non-empty JSON list of {{\"prompt_en\": ...}} objects or strings")
  prompts = []
  for i, item in enumerate(data):
    text = item if isinstance(item, str) else (item.get("prompt_en", item.get("prompt")) if isinstance(item, dict) else None)
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"prompts file {path}: entry {i} has no \"prompt_en\" (or \"prompt\") string")
    prompts.append(text)
  return prompts


def slug(text: str, max_len: int = 48) -> str:
  words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
  out = "-".join(words)[:max_len].strip("-")
  return out or "prompt"


# ----------------------------------------------------------------------------- outputs


def check_writable(directory: str) -> None:
  """Fails now, not after loading the models, if `directory` can't be created or written."""
  existing = os.path.abspath(directory)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
    raise PermissionError(f"cannot write to {directory}: choose a writable --output_dir")


def write_mp4(path: str, frames, fps: int) -> None:
  """H.264 mp4 of uint8 frames [F, H, W, 3], via a hidden temporary file renamed into place."""
  import imageio

  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f".{name}.partial.mp4")  # ends in .mp4: ffmpeg picks the container by it
  try:
    with warnings.catch_warnings():
      # imageio-ffmpeg starts ffmpeg with fork+exec, which is safe; JAX warns about any fork.
      warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
      with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                              pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="error") as writer:
        for frame in frames:
          writer.append_data(frame)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_npy(path: str, array) -> None:
  import numpy as np

  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f".{name}.partial.npy")
  try:
    np.save(tmp, array)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ----------------------------------------------------------------------------- main


def validate(s, m) -> None:
  """The sampling job's values (s: config.sample, m: config.model), checked before anything loads."""
  from t3_jax.diffusion import flow, pipeline

  pipeline.check_frames(s.frames)  # both Wan VAEs: temporal stride 4
  pipeline.round_size(s.height, s.width, 1)
  if s.steps < 1:
    raise ValueError(f"steps must be >= 1, got {s.steps}")
  if s.sampler not in flow.SAMPLERS:
    raise ValueError(f"unknown sampler {s.sampler!r}: use one of {flow.SAMPLERS}")
  if s.fps <= 0:
    raise ValueError(f"fps must be positive, got {s.fps}")
  if s.crop_to_request and (s.height % 2 or s.width % 2):
    raise ValueError(f"H.264 needs an even height and width, got {s.height}x{s.width}: "
                     "request even sizes or set crop_to_request=False")
  if s.guidance_parallel and s.guidance == 1:
    raise ValueError("guidance_parallel needs guidance != 1 (two passes per step): set sample.guidance_parallel=False")
  if m.attention not in ("t3", "full"):
    raise ValueError(f"model.attention must be 't3' or 'full', got {m.attention!r}")
  pipeline.as_dtype(m.dtype)
  if s.random_init:
    pipeline.random_configs(s.random_init, s.random_num_layers)  # a bad preset or layer count fails here


def build_pipeline(s, m):
  from t3_jax.diffusion import pipeline
  from t3_jax.parallel import layout as layout_lib

  mesh = layout_lib.sampling_mesh(s.sequence, s.guidance_parallel)
  if s.random_init:
    return pipeline.T3Pipeline.random(s.random_init, seed=0, num_layers=s.random_num_layers,
                                      attention=m.attention, schedule=m.schedule, dtype=m.dtype,
                                      text_len=s.text_len, mesh=mesh)
  return pipeline.T3Pipeline.from_checkpoints(
      s.dit_checkpoint, s.vae_checkpoint, s.umt5_checkpoint, s.tokenizer_dir, attention=m.attention,
      schedule=m.schedule, dtype=m.dtype, implementation=m.implementation, text_len=s.text_len, mesh=mesh)


def run(s, m) -> None:
  import time

  import jax

  from t3_jax.diffusion import pipeline

  validate(s, m)
  prompts = load_prompts(s.prompts_file) if s.prompts_file else [s.prompt]
  if not all(isinstance(p, str) and p.strip() for p in prompts):
    raise ValueError("the prompt is empty: pass --prompt \"...\" or --prompts_file")
  if FLAGS.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
  rank, world = jax.process_index(), jax.process_count()
  mine = [(i, p) for i, p in enumerate(prompts) if i % world == rank]

  check_writable(s.output_dir)
  jobs = [(i, p, os.path.join(s.output_dir, f"{i:04d}_{slug(p)}.mp4")) for i, p in mine]
  todo = []
  for job in jobs:
    if s.overwrite or not os.path.exists(job[2]):
      todo.append(job)
    else:
      print(f"skip {job[2]}: exists (set --config.sample.overwrite=True to redo)")
  if not todo:
    print(f"nothing to do on process {rank}")
    return

  pipe = build_pipeline(s, m)
  os.makedirs(s.output_dir, exist_ok=True)
  shape = pipe.video_shape(s.height, s.width, s.frames, s.size_multiple)
  print(f"{len(prompts)} prompt(s), {len(todo)} to generate on process {rank}/{world}; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s); variant {FLAGS.config.get('variant')}"
        + ("" if pipe.mesh is None else f"; DiT on mesh {dict(pipe.mesh.shape)}, VAE tiles on {pipe.mesh.size} devices"))
  print(f"video {shape.generated[1]}x{shape.generated[2]}x{shape.generated[0]}"
        + (f" (cropped to {s.height}x{s.width})" if s.crop_to_request and shape.generated[1:] != shape.requested[1:]
           else "")
        + f", latent {shape.latent}, tokens {pipe.token_grid(shape)}, {m.attention} windows per layer "
        f"(cycle) {list(pipe.window_pattern(shape))}, {s.steps} {s.sampler} steps, CFG {s.guidance}")
  if pipe.random_weights and s.random_init.startswith("tiny-"):
    print("demo: the weights are RANDOM (tiny untrained models), so the video is noise-like; "
          "it shows the pipeline running end to end, not a trained model")
  elif pipe.random_weights:
    print(f"the weights are RANDOM ({s.random_init} DiT, its VAE and umT5-XXL at their real sizes, "
          f"untrained): the timings and memory are a real run's, the video is noise")

  totals = dict(load_s=pipe.load_seconds, text_s=0.0, compile_s=0.0, denoise_s=0.0, decode_s=0.0, write_s=0.0)
  start = time.perf_counter()
  guided = s.guidance != 1
  negative = s.negative_prompt or pipeline.WAN_NEGATIVE_PROMPT
  contexts = pipe.encode([p for _, p, _ in todo] + ([negative] if guided else []))
  negative_context = contexts[-1] if guided else None
  pipe.release_text_encoder()
  totals["text_s"] = time.perf_counter() - start

  stats = {}
  for n, (index, prompt, path) in enumerate(todo):
    out = pipe.generate(contexts[n], negative_context, height=s.height, width=s.width, frames=s.frames,
                        steps=s.steps, guidance=s.guidance, shift=s.shift, sampler=s.sampler, seed=s.seed,
                        size_multiple=s.size_multiple, crop_to_request=s.crop_to_request,
                        vae_tiled=s.vae_tiled, vae_tile=tuple(s.vae_tile), vae_tile_stride=tuple(s.vae_tile_stride),
                        progress=s.progress, return_latents=s.save_latents)
    start = time.perf_counter()
    write_mp4(path, out.frames, s.fps)
    if s.save_latents:
      write_npy(path[:-len(".mp4")] + "_latents.npy", out.latents)
    out.stats["write_s"] = time.perf_counter() - start
    stats = out.stats
    for key in ("compile_s", "denoise_s", "decode_s", "write_s"):
      totals[key] += out.stats[key]
    print(f"[{n + 1}/{len(todo)}] {path}  {out.frames.shape[0]} frames {out.frames.shape[1]}x{out.frames.shape[2]}"
          f"  denoise {out.stats['denoise_s']:.1f} s, decode {out.stats['decode_s']:.1f} s", flush=True)

  totals.update(peak_memory_bytes=stats["peak_memory_bytes"], peak_memory_source=stats["peak_memory_source"])
  for line in pipeline.format_stats(totals):
    print(line)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {' '.join(argv[1:])}: quote the prompt, e.g. --prompt \"a red fox\"")
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    s = sample_config()
    run(s, FLAGS.config.model)
  except USER_ERRORS as e:
    if os.environ.get("T3_TRACEBACK"):
      raise
    fail(e)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
