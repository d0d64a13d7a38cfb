"""Will it fit? `--compile_for=SLICE`: the TPU compiler's verdict on a job, from any machine.

  python train.py --config=configs/t3_wan.py:stage2 --workdir=/tmp/x --compile_for=v5p-16
  python sample.py --config=configs/t3_wan.py --output_dir=/tmp/x --compile_for=v6e-4

libtpu (`pip install "jax[tpu]"`) describes any Cloud TPU slice as compile-only devices, with
no TPU attached. The command's exact program (the train step over the configured mesh, or
the 50-step denoising loop and the VAE decode) is lowered for those devices with abstract,
sharded arguments (no weights, no data) and compiled by the real TPU compiler, Mosaic
kernels included. The compiler sizes every buffer per chip and refuses a program that does
not fit a chip's HBM; it also estimates the run time (`optimal_seconds`).

What is reported, per program and per chip (table on stdout, compile_report.json):
  argument / output / temp bytes, total = argument + output - alias + temp, and the
  compiler's peak; the chip's HBM; fits (the compiler accepted it) and the headroom
  (HBM - peak, less what stays resident from an earlier stage); FLOPs from the project's
  own MAC count (`t3_jax.core.schedule.model_macs`; the compiler's own count leaves out the
  FLOPs inside Mosaic kernels, it is given beside); the compiler's seconds per step; the
  attention kernel and the number of Mosaic kernels (`tpu_custom_call`) in the HLO; the
  compile seconds. Every figure is compiler output, not a run.

Exit status: 0 fits, 3 does not fit (one line naming the fixes), 2 bad input (an unknown
slice, a mesh the slice's chips can't be split into).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

GiB = 1 << 30


# ----------------------------------------------------------------------------- slices


@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation as Cloud TPU sells it."""
  name: str               # Cloud TPU's prefix: v4, v5p, v5e, v6e
  libtpu: str             # libtpu's topology prefix
  device_kind: str        # what jax.Device.device_kind says on that chip
  hbm_gib: float          # HBM per chip
  cores_per_name: int     # the slice name counts TensorCores (2 per chip: v4, v5p) or chips (1)
  megacore: bool          # the chip's 2 TensorCores act as one JAX device
  peak_bf16_flops: float  # dense bf16 FLOP/s per chip (datasheet)
  topologies: dict        # chips -> the slice's chip grid, as Cloud TPU names it


# v4 / v5p: 3D tori of 4-chip hosts; the slice name counts TensorCores (v5p-8 = 4 chips).
_CUBES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 192: "4x4x12",
          256: "4x8x8", 384: "4x8x12", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
# v5e / v6e: 2D grids; up to 8 chips on one host, larger slices of 4-chip hosts; the name counts chips.
_GRIDS = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}

GENERATIONS = {
    "v4": Generation("v4", "v4", "TPU v4", 32, 2, True, 275e12, _CUBES),
    "v5p": Generation("v5p", "v5p", "TPU v5", 95, 2, True, 459e12, _CUBES),
    "v5e": Generation("v5e", "v5e", "TPU v5 lite", 16, 1, False, 197e12, _GRIDS),
    "v6e": Generation("v6e", "v6e", "TPU v6 lite", 32, 1, False, 918e12, _GRIDS),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class TPUSlice:
  """One Cloud TPU slice: v5p-16 is 8 v5p chips in a 2x2x2 torus on 2 hosts."""
  name: str
  generation: Generation
  chips: int
  topology: str            # the chip grid, e.g. "2x2x2"
  chips_per_host: int

  @property
  def hosts(self) -> int:
    return self.chips // self.chips_per_host

  @property
  def hbm_bytes(self) -> int:
    return int(self.generation.hbm_gib * GiB)

  def host_bounds(self) -> tuple[int, int, int]:
    """The chips of one host as a grid (what libtpu calls chips_per_host_bounds)."""
    dims = [int(d) for d in self.topology.split("x")] + [1]
    if self.hosts == 1:
      return tuple(dims[:3])
    return (2, 2, 1)

  def wrap(self) -> tuple[bool, bool, bool]:
    """Which axes close into rings: full 3D tori from 4x4x4 on (v4, v5p); 2D axes of 16 chips."""
    dims = [int(d) for d in self.topology.split("x")]
    if len(dims) == 3:
      return (min(dims) >= 4,) * 3
    return (dims[0] >= 16, dims[1] >= 16, False)


def slice_names(generation: str) -> list[str]:
  g = GENERATIONS[generation]
  return [f"{g.name}-{chips * g.cores_per_name}" for chips in g.topologies]


def parse_slice(name: str) -> TPUSlice:
  """A Cloud TPU slice name (v4-8, v5p-16, v5e-32 or v5litepod-32, v6e-8, ...) -> its TPUSlice."""
  match = re.fullmatch(r"\s*(v\d+[a-z]*)-(\d+)\s*", str(name or "").lower())
  if not match:
    raise ValueError(f"--compile_for={name!r} is not a Cloud TPU slice name: use e.g. v5p-8, v5p-64, v5e-16, "
                     f"v6e-32 or v4-8 (v4/v5p count TensorCores, 2 per chip; v5e/v6e count chips)")
  prefix, count = match.group(1), int(match.group(2))
  prefix = _ALIASES.get(prefix, prefix)
  if prefix not in GENERATIONS:
    raise ValueError(f"--compile_for={name!r}: unknown TPU generation {match.group(1)!r}: use one of "
                     f"{', '.join(GENERATIONS)}")
  g = GENERATIONS[prefix]
  if count % g.cores_per_name or count // g.cores_per_name not in g.topologies:
    raise ValueError(f"--compile_for={name!r}: Cloud TPU has no {g.name} slice of that size: use one of "
                     f"{', '.join(slice_names(prefix))}")
  chips = count // g.cores_per_name
  per_host = chips if (g.cores_per_name == 1 and chips <= 8) else min(4, chips)
  return TPUSlice(f"{g.name}-{count}", g, chips, g.topologies[chips], per_host)


def _quiet_libtpu(tpu_slice: TPUSlice) -> None:
  """With no TPU attached, libtpu's start-up warns (several lines) that it can't find one:
  tell it what it would otherwise look up. Only where nothing says otherwise."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu_slice.name)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def host_is_cpu() -> None:
  """Compile-only work needs no accelerator: keep JAX's own devices on the CPU (a GPU or a
  TPU of this machine stays free, and libtpu is loaded once, for the abstract slice)."""
  import jax
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])  # no effect once backends started


def slice_devices(tpu_slice: TPUSlice) -> list:
  """The slice's chips as compile-only JAX devices (process_index: the host each sits on)."""
  from jax.experimental import topologies

  _quiet_libtpu(tpu_slice)
  g = tpu_slice.generation
  try:
    topology = topologies.get_topology_desc(
        topology_name=f"{g.libtpu}:{tpu_slice.topology}", platform="tpu",
        chip_config_name="megacore" if g.megacore else "default",
        chips_per_host_bounds=tpu_slice.host_bounds(), wrap=tpu_slice.wrap())
  except (RuntimeError, ImportError, OSError) as e:  # no libtpu, or libtpu held by another process
    text = " ".join(str(e).split())
    raise ValueError(f"the TPU compiler (libtpu) could not describe {tpu_slice.name} ({text[:200]}): install it "
                     "with `pip install \"jax[tpu]\"`; if another process holds libtpu, set "
                     "ALLOW_MULTIPLE_LIBTPU_LOAD=1") from None
  devices = list(topology.devices)
  if len(devices) != tpu_slice.chips:
    raise ValueError(f"libtpu describes {tpu_slice.name} as {len(devices)} devices, expected {tpu_slice.chips} chips")
  return devices


def host_devices(devices: Sequence[Any], host: int = 0) -> list:
  """The devices of one host (process) of the slice."""
  return [d for d in devices if d.process_index == host]


# ----------------------------------------------------------------------------- compiling


def count_mosaic_kernels(hlo_text: str) -> int:
  """Mosaic (Pallas TPU) kernels in compiled HLO: its `tpu_custom_call` custom-calls."""
  return len(re.findall(r'custom_call_target="tpu_custom_call"', hlo_text))


_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


def parse_refusal(message: str) -> dict:
  """The compiler's numbers from an out-of-memory refusal: "Used 16.32G of 15.75G hbm", or "the
  total memory required for HLO temporaries (2.20T) exceeds available HBM (15.75G)"."""
  text = " ".join(str(message).split())
  out = {"compiler_message": text[:600], "compiler_message_full": str(message)[:20000]}
  used = re.search(rf"Used {_SIZE} of {_SIZE} hbm", text)
  if used:
    out["used_bytes"] = _bytes(used.group(1), used.group(2))
    out["limit_bytes"] = _bytes(used.group(3), used.group(4))
  needed = re.search(rf"required for ([\w ]+?) \({_SIZE}\) exceeds available HBM \({_SIZE}\)", text)
  if needed and not used:
    out["used_bytes"] = _bytes(needed.group(2), needed.group(3))
    out["limit_bytes"] = _bytes(needed.group(4), needed.group(5))
  over = re.search(rf"[Ee]xceeded hbm capacity by {_SIZE}", text)
  if over:
    out["over_bytes"] = _bytes(over.group(1), over.group(2))
  return out


def _is_refusal(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower()


def layer_loop_trips(model, grid) -> float:
  """How many times the DiT's layers run for each one the compiler's cost analysis counts.

  The DiT scans over cycles of its per-layer schedule (dit.WanDiT._run_blocks): one cycle of
  `period` layers is the scan's body, the remainder layers are unrolled. XLA's cost analysis
  counts a loop's body once, whatever its trip count, so it sees period + remainder layers.
  """
  from t3_jax.core import schedule as schedule_lib

  per_layer = model.layer_schedule(grid)
  period = len(schedule_lib.cycle(per_layer))
  cycles, remainder = divmod(len(per_layer), period)
  return len(per_layer) / (period + remainder) if cycles else 1.0


def compile_program(name: str, lower, tpu_slice: TPUSlice, *, flops_per_chip: float, steps_per_program: int = 1,
                    loop_trips: float = 1.0, kernel: str = "", resident_bytes: int = 0,
                    mesh: dict | None = None) -> dict:
  """Compiles `lower()` (a jax Lowered) for the slice and reports it (see the module doc).

  steps_per_program: steps the program runs (the sampling loop runs all of them; its body,
  one step, is what the compiler's estimate covers).
  loop_trips: the compiler counts every loop body once; its time and FLOPs are scaled by
  this (microbatches x `layer_loop_trips`) to give one step. Loops inside a layer (chunks
  of tokens or windows) are not scaled: compare compiler_flops_per_step with the model's.
  resident_bytes: per-chip bytes an earlier stage keeps allocated while this one runs.
  """
  report = {"program": name, "mesh": mesh or {}, "attention_kernel": kernel,
            "model_flops_per_chip": float(flops_per_chip), "hbm_bytes": tpu_slice.hbm_bytes,
            "resident_bytes": int(resident_bytes)}
  start = time.perf_counter()
  lowered = lower()
  try:
    compiled = lowered.compile()
  except Exception as e:
    if not _is_refusal(e):
      raise
    report.update(compile_s=time.perf_counter() - start, fits=False, **parse_refusal(e))
    return report
  report["compile_s"] = time.perf_counter() - start
  memory = compiled.memory_analysis()
  arg, out = int(memory.argument_size_in_bytes), int(memory.output_size_in_bytes)
  alias, temp = int(memory.alias_size_in_bytes), int(memory.temp_size_in_bytes)
  peak = int(getattr(memory, "peak_memory_in_bytes", 0) or 0)
  total = arg + out - alias + temp
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  estimate = cost.get("optimal_seconds")
  used = max(peak, 0) + int(resident_bytes)
  report.update(
      argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=temp, total_bytes=total,
      peak_bytes=peak, fits=used <= tpu_slice.hbm_bytes, headroom_bytes=tpu_slice.hbm_bytes - used,
      compiler_flops=float(cost["flops"]) if "flops" in cost else None,
      compiler_bytes_accessed=float(cost["bytes accessed"]) if "bytes accessed" in cost else None,
      compiler_optimal_seconds=float(estimate) if estimate is not None else None,
      loop_trips=float(loop_trips),
      compiler_flops_per_step=float(cost["flops"]) * loop_trips if "flops" in cost else None,
      estimated_seconds_per_step=(float(estimate) * loop_trips if estimate is not None else None),
      steps_per_program=int(steps_per_program))
  seconds = report["estimated_seconds_per_step"]
  # An upper bound: the estimate leaves out the time inside Mosaic kernels.
  report.update(
      model_flops_per_s_per_chip=(float(flops_per_chip) / seconds if seconds and flops_per_chip else None),
      mosaic_kernels=count_mosaic_kernels(compiled.as_text()))
  return report


def _fmt_gib(n) -> str:
  return "-" if n is None else f"{n / GiB:.2f}"


def format_table(report: dict) -> str:
  """The report as one table, a line per program."""
  s = report
  head = (f"{s['command']} --compile_for={s['slice']}: {s['chips']} x {s['device_kind']} chips on {s['hosts']} "
          f"host(s), topology {s['topology']}, {_fmt_gib(s['hbm_bytes_per_chip'])} GiB HBM per chip "
          "(TPU compiler output, not a run)")
  cols = ("program", "mesh", "arg GiB", "out GiB", "temp GiB", "total GiB", "peak GiB", "fits (headroom GiB)",
          "TFLOP/chip", "compiler s/step", "kernel (Mosaic calls)", "compile s")
  rows = []
  for p in s["programs"]:
    mesh = " x ".join(f"{k} {v}" for k, v in p["mesh"].items() if v > 1) or "1 chip"
    if "peak_bytes" in p:
      fits = f"{'yes' if p['fits'] else 'NO'} ({(p['headroom_bytes']) / GiB:+.2f})"
      sizes = [_fmt_gib(p[k]) for k in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "peak_bytes")]
      est = p["estimated_seconds_per_step"]
      est = "-" if est is None else f"{est:.4g}"
      kernel = f"{p['attention_kernel'] or '-'} ({p['mosaic_kernels']})"
    else:
      used = p.get("used_bytes")
      fits = f"NO: refused, {_fmt_gib(used)} of {_fmt_gib(p.get('limit_bytes'))}" if used else "NO: refused"
      sizes, est, kernel = ["-"] * 5, "-", p["attention_kernel"] or "-"
    rows.append((p["program"], mesh, *sizes, fits, f"{p['model_flops_per_chip'] / 1e12:.4g}", est, kernel,
                 f"{p['compile_s']:.1f}"))
  widths = [max(len(str(r[i])) for r in (cols, *rows)) for i in range(len(cols))]
  line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()
  return "\n".join([head, line(cols), line(["-" * w for w in widths]), *map(line, rows)])


def write_report(report: dict, directory: str) -> str:
  """compile_report.json in `directory`, written whole (temporary file, then renamed)."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "compile_report.json")
  tmp = os.path.join(directory, ".compile_report.json.partial")
  with open(tmp, "w") as f:
    json.dump(report, f, indent=2)
  os.replace(tmp, path)
  return path


def _slice_report(command: str, tpu_slice: TPUSlice) -> dict:
  return {"command": command, "slice": tpu_slice.name, "generation": tpu_slice.generation.name,
          "device_kind": tpu_slice.generation.device_kind, "topology": tpu_slice.topology,
          "chips": tpu_slice.chips, "hosts": tpu_slice.hosts, "chips_per_host": tpu_slice.chips_per_host,
          "hbm_bytes_per_chip": tpu_slice.hbm_bytes, "peak_bf16_flops_per_chip": tpu_slice.generation.peak_bf16_flops,
          "note": "TPU compiler output (memory_analysis, cost_analysis), not a run"}


def _finish(report: dict) -> dict:
  report["fits"] = all(p["fits"] for p in report["programs"])
  report["compile_s"] = sum(p["compile_s"] for p in report["programs"])
  return report


def _resolve_kernel(implementation: str | None, dtype, head_dim: int, mesh) -> str:
  """The attention kernel the DiT compiles for the mesh's (TPU) devices, as its Layout picks it."""
  from t3_jax.core import attention
  return attention.choose_implementation(implementation, dtype, head_dim, attention.Target.of(mesh.devices))


def _mesh_dict(mesh) -> dict:
  return {k: int(v) for k, v in mesh.shape.items()} if mesh is not None else {}


# ----------------------------------------------------------------------------- train.py


def slice_mesh(tpu_slice: TPUSlice, devices, *sizes):
  """make_mesh over the slice's devices; a shape the chip grid can't be laid out as (jax.make_mesh
  maps each mesh axis onto whole physical axes) is bad input, as it would be on the slice."""
  from t3_jax.parallel import mesh as mesh_lib
  try:
    return mesh_lib.make_mesh(*sizes, devices=devices)
  except NotImplementedError as e:
    raise ValueError(f"mesh (data, fsdp, sequence) = {tuple(sizes)} can't be laid out on the "
                     f"{tpu_slice.topology} chips of {tpu_slice.name} ({' '.join(str(e).split())[:160]}): choose "
                     "mesh sizes that are products of the topology's axis sizes") from None


def host_rows(batch_sharding, global_batch: int) -> dict[str, str]:
  """The batch rows each host's loader reads: those the mesh puts on its chips (a sequence axis
  across hosts has several hosts read the same rows), as `Trainer` reads them on the slice."""
  from t3_jax.parallel import mesh as mesh_lib
  return {str(host): _rows(rows) for host, rows in mesh_lib.batch_rows(batch_sharding, global_batch).items()}


def _rows(rows) -> str:
  rows = sorted(rows)
  return f"{rows[0]}..{rows[-1]}" if rows == list(range(rows[0], rows[-1] + 1)) else ", ".join(map(str, rows[:6])) + (
      "..." if len(rows) > 6 else "")


def compile_train(config, slice_name: str) -> dict:
  """The report of the train step `python train.py --config=...` runs on `slice_name`."""
  tpu_slice = parse_slice(slice_name)  # before libtpu loads: a bad name is one line
  host_is_cpu()
  import jax.numpy as jnp

  from t3_jax.training import trainer

  devices = slice_devices(tpu_slice)
  m = config.mesh
  mesh = slice_mesh(tpu_slice, devices, m.get("data", 1), m.get("fsdp", -1), m.get("sequence", 1))
  dit_cfg = trainer.dit_config(config)
  kernel = _resolve_kernel(config.model.get("implementation", None), jnp.dtype(config.model.dtype),
                           dit_cfg.dim // dit_cfg.num_heads, mesh)
  program = trainer.train_program(config, mesh)
  grid = program.model.token_grid((1, *program.latent_shape))
  microbatches = program.microbatches
  report = _slice_report("train", tpu_slice)
  report.update(mesh=_mesh_dict(mesh), variant=config.get("variant"), global_batch=program.global_batch,
                rows_per_host=host_rows(program.batch_sharding["latents"], program.global_batch),
                microbatches=microbatches,
                latent_shape=list(program.latent_shape),
                flops_convention="model FLOPs: 3 x forward (backward = 2 x forward; rematerialisation not counted)")
  report["programs"] = [compile_program(
      "train step", program.lower, tpu_slice, flops_per_chip=program.flops_per_step / tpu_slice.chips,
      loop_trips=microbatches * layer_loop_trips(program.model, grid), kernel=kernel,
      mesh=_mesh_dict(mesh))]
  return _finish(report)


TRAIN_FIXES = ("more chips (a larger slice), more of them on --config.mesh.sequence, --config.model.remat=full, "
               "gradient accumulation (--config.microbatches), or LoRA (--config.lora.rank=64)")


# ----------------------------------------------------------------------------- sample.py


def _dit_config_for_sampling(s):
  """(DiTConfig, param dtype) that sample.py would build: the random_init preset, else the
  architecture stored with the DiT checkpoint, else the preset its path names."""
  import jax.numpy as jnp

  from t3_jax.models import dit as dit_lib
  from t3_jax.weights import checkpoint as checkpoint_lib

  if s.get("preset", None):
    return dit_lib.DiTConfig.preset(s.preset), jnp.bfloat16
  path = s.dit_checkpoint
  if path and os.path.isfile(os.path.join(path, checkpoint_lib.CONFIG_FILE)):
    stored = checkpoint_lib.read_config(path)
    return dit_lib.DiTConfig.from_dict(stored), jnp.dtype(stored.get("dtype", "float32"))
  name = os.path.basename(os.path.normpath(path or "")).lower()
  for key, preset in (("5b", "wan2.2-ti2v-5b"), ("14b", "wan2.1-t2v-14b"), ("1.3b", "wan2.1-t2v-1.3b")):
    if key in name:
      # The converter's default storage dtype is bf16, which load_dit keeps.
      return dit_lib.DiTConfig.preset(preset), jnp.bfloat16
  raise ValueError(f"--compile_for needs the DiT's architecture: no checkpoint at {path or '(empty path)'} and its "
                   "name names no model size (1.3b, 5b, 14b): point sample.dit_checkpoint at a converted checkpoint "
                   "(only its config.json is read) or at a path naming the size")


def _sampling_models(s, m):
  """(dit_cfg, param_dtype, vae_config, vae_param_dtype) as sample.py's pipeline builds them."""
  import jax.numpy as jnp

  from t3_jax.diffusion import pipeline
  from t3_jax.models import vae as vae_lib
  from t3_jax.weights import checkpoint as checkpoint_lib

  if s.random_init:  # as T3Pipeline.random builds them
    dit_cfg, vae_config, _, dtypes = pipeline.random_configs(s.random_init, s.random_num_layers, m.dtype)
    param = lambda kind: dtypes[kind].get("param_dtype", jnp.float32)  # the modules' default: fp32
    return dit_cfg, param("dit"), vae_config, param("vae")
  dit_cfg, param_dtype = _dit_config_for_sampling(s)
  vae_dir = s.vae_checkpoint
  if vae_dir and os.path.isfile(os.path.join(vae_dir, checkpoint_lib.CONFIG_FILE)):
    vae_config = vae_lib.VAEConfig.from_dict(checkpoint_lib.read_config(vae_dir, kind="vae"))
  else:
    vae_config = vae_lib.get_config(dit_cfg.family)
  return dit_cfg, param_dtype, vae_config, jnp.float32


def _video_shape(s, dit_cfg, vae_config):
  """(latent [C, F, h, w], generated (frames, height, width)) as T3Pipeline.video_shape makes them."""
  from t3_jax.diffusion import pipeline

  pipeline.check_frames(s.frames, vae_config.temporal_stride)
  base = vae_config.spatial_stride * dit_cfg.patch_size[1]
  multiple = s.size_multiple
  if not isinstance(multiple, int) or multiple < 0 or multiple % base:
    raise ValueError(f"size_multiple must be 0 or a multiple of {base} (VAE stride x patch), got {multiple!r}")
  h, w = pipeline.round_size(s.height, s.width, multiple or base)
  st = vae_config.spatial_stride
  latent = (vae_config.z_dim, 1 + (s.frames - 1) // vae_config.temporal_stride, h // st, w // st)
  return latent, (s.frames, h, w)


def compile_sample(s, m, slice_name: str, vae: bool = True) -> dict:
  """The report of what `python sample.py` runs on one host of `slice_name` (s: config.sample,
  m: config.model, whose attention, schedule, kernel and dtype the DiT takes): the jitted
  denoising loop (guided batch) and the VAE decode. Hosts sample their own prompts, so the
  DiT's mesh (sample.sequence x guidance) lies within one host's chips. vae=False leaves the
  VAE out (its compile takes minutes on a small CPU)."""
  tpu_slice = parse_slice(slice_name)
  host_is_cpu()
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from t3_jax.core import schedule as schedule_lib
  from t3_jax.diffusion import pipeline
  from t3_jax.models import dit as dit_lib
  from t3_jax.models import vae as vae_lib
  from t3_jax.parallel import layout as layout_lib
  from t3_jax.parallel import mesh as mesh_lib

  dit_cfg, param_dtype, vae_config, vae_param_dtype = _sampling_models(s, m)
  latent, generated = _video_shape(s, dit_cfg, vae_config)
  devices = slice_devices(tpu_slice)
  local = host_devices(devices, devices[0].process_index)
  try:
    mesh = layout_lib.sampling_mesh(s.sequence, s.guidance_parallel, devices=local)
  except NotImplementedError as e:
    raise ValueError(f"sample.sequence {s.sequence} x guidance can't be laid out on one {tpu_slice.name} host's "
                     f"chips ({' '.join(str(e).split())[:160]}): choose 1, 2 or 4 devices") from None
  dtype = pipeline.as_dtype(m.dtype)
  kernel = _resolve_kernel(m.get("implementation", None), dtype, dit_cfg.dim // dit_cfg.num_heads, mesh)
  # As T3Pipeline builds it (Layout(mesh)); with one chip the mesh is that chip, so the kernel
  # is chosen for it, not for this host.
  dit = nnx.eval_shape(lambda: dit_lib.WanDiT(
      dit_cfg, attention=m.attention, schedule=m.get("schedule", None), dtype=dtype, param_dtype=param_dtype,
      implementation=m.get("implementation", None), layout=layout_lib.Layout(mesh), rngs=nnx.Rngs(0)))
  guided = s.guidance != 1
  grid = dit.token_grid((1, *latent))
  tokens = math.prod(grid)
  shards = mesh_lib.axis_size(mesh, "tokens")
  if tokens % shards:  # as T3Pipeline._check_mesh
    raise ValueError(f"{tokens} latent tokens don't split over sample.sequence={shards} devices: "
                     f"choose a sequence size dividing {tokens}")
  replicated = NamedSharding(mesh, P())
  struct = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt, sharding=replicated)
  graphdef, state = nnx.split(dit)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
  dit_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  context = struct((1, s.text_len, dit_cfg.text_dim))
  args = (graphdef, state, struct((1, *latent)), context, context if guided else None, struct(()))
  macs = schedule_lib.model_macs(dit_cfg, grid, dit.layer_schedule(grid), text_len=s.text_len)["total"]
  step_flops = 2.0 * macs * (2 if guided else 1)  # one forward per pass, both passes of the guided batch

  report = _slice_report("sample", tpu_slice)
  report.update(mesh=_mesh_dict(mesh), variant=None, dit=dit_cfg.to_dict(),
                video=list(generated), latent_shape=list(latent), token_grid=list(grid), steps=int(s.steps),
                guided=guided, flops_convention="model FLOPs of one step (one forward per pass)",
                per_host_note="each host runs this on its own chips and prompts")
  programs = [compile_program(
      f"denoise loop ({s.steps} {s.sampler} steps)",
      lambda: pipeline._denoise_jit.lower(*args, sampler=s.sampler, num_steps=int(s.steps), shift=float(s.shift),
                                          progress=bool(s.progress)),
      tpu_slice, flops_per_chip=step_flops / mesh.size, steps_per_program=int(s.steps),
      loop_trips=layer_loop_trips(dit, grid), kernel=kernel, mesh=_mesh_dict(mesh))]

  report["dit_parameter_bytes_per_chip"] = int(dit_bytes)
  report["programs"] = programs
  if not vae:
    return _finish(report)
  # The VAE: tiles over the DiT mesh's chips (T3Pipeline.decode), the DiT's parameters still held.
  vae = nnx.eval_shape(lambda: vae_lib.WanVAE(vae_config, dtype=dtype, param_dtype=vae_param_dtype,
                                              rngs=nnx.Rngs(0)))
  vgraph, vstate = nnx.split(vae)
  chip = NamedSharding(jax.sharding.Mesh(list(mesh.devices.flat)[:1], ("chip",)), P())
  on_chip = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt, sharding=chip)
  vstate = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=chip), vstate)
  sts = vae_config.spatial_stride
  video = (1, vae_config.image_channels, 1 + vae_config.temporal_stride * (latent[1] - 1),
           latent[2] * sts, latent[3] * sts)
  z = on_chip((1, *latent))
  vae_mesh = {"tiles on chips": mesh.size}
  if s.vae_tiled:
    tile = tuple(min(t, n) for t, n in zip(s.vae_tile, latent[2:]))
    stride = tuple(min(a, t) for a, t in zip(s.vae_tile_stride, tile))
    offsets, _, tile_hw = vae_lib.tile_weights(latent[2:], tile, stride, sts)
    on_first = -(-len(offsets) // mesh.size)
    weight = on_chip((tile_hw[0] * sts, tile_hw[1] * sts))
    index = on_chip((), jnp.int32)
    programs.append(compile_program(
        f"VAE decode tile ({len(offsets)} tiles {tile_hw}, {on_first} on the first chip)",
        lambda: vae_lib._decode_tile_into.lower(vgraph, on_chip(video), vstate, tile_hw, z, weight, index, index),
        tpu_slice, flops_per_chip=0.0, resident_bytes=dit_bytes, mesh=vae_mesh))
    if mesh.size > 1 and len(offsets) > 1:
      programs.append(compile_program(
          "VAE canvases summed on the first chip",
          lambda: vae_lib._add_in_place.lower(on_chip(video), on_chip(video)),
          tpu_slice, flops_per_chip=0.0, resident_bytes=dit_bytes, mesh=vae_mesh))
  else:
    programs.append(compile_program(
        "VAE decode (untiled)", lambda: vae_lib._decode_untiled.lower(vgraph, vstate, z),
        tpu_slice, flops_per_chip=0.0, resident_bytes=dit_bytes, mesh={}))
  return _finish(report)


SAMPLE_FIXES = ("more chips on --config.sample.sequence (and --config.sample.guidance_parallel=True), a larger "
                "TPU generation, or smaller VAE tiles (--config.sample.vae_tile)")


# ----------------------------------------------------------------------------- the commands


def run(command: str, config, slice_name: str, directory: str, variant: str | None = None, vae: bool = True,
        model=None) -> int:
  """Compiles, prints the table, writes compile_report.json in `directory`; returns the exit
  status (0 fits, 3 does not fit: one `error:` line naming the fixes). Bad input raises
  ValueError (the caller prints it as one line, status 2). config: the training config, or for
  sample.py config.sample with `model` its config.model."""
  from t3_jax import cli

  report = compile_train(config, slice_name) if command == "train" else compile_sample(config, model, slice_name, vae)
  report["variant"] = config.get("variant") if command == "train" else variant
  print(format_table(report), flush=True)
  path = write_report(report, directory)
  print(f"report: {path}")
  if report["fits"]:
    return 0
  worst = [p for p in report["programs"] if not p["fits"]]
  cli.error(f"{worst[0]['program']} does not fit a {report['device_kind']} chip of {report['slice']} "
            f"({_refusal_text(worst[0])}): use {TRAIN_FIXES if command == 'train' else SAMPLE_FIXES}")
  return 3


def _refusal_text(p: dict) -> str:
  if "used_bytes" in p:
    return f"the compiler needs {_fmt_gib(p['used_bytes'])} GiB of {_fmt_gib(p['limit_bytes'])} GiB"
  if "peak_bytes" in p:
    return (f"peak {_fmt_gib(p['peak_bytes'])} GiB + {_fmt_gib(p['resident_bytes'])} GiB resident of "
            f"{_fmt_gib(p['hbm_bytes'])} GiB")
  return "refused: " + p.get("compiler_message", "")[:160]
