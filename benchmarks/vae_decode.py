"""Time (or plan the memory of) a tiled Wan VAE decode with random weights, e.g. 81 frames at 4K.

  python benchmarks/vae_decode.py --version wan2.1                 # 2176x3840x81, tiles (30,52)/(15,26)
  python benchmarks/vae_decode.py --version wan2.2 --dtype bf16 --repeats 2
  python benchmarks/vae_decode.py --version wan2.1 --analyze       # compile only: XLA's memory plan

Prints the compile time of the per-tile function, the decode time (median of --repeats, after a
warm-up call), the tile count, and the device's peak memory where the backend reports it. --analyze
lowers and compiles the per-tile function on abstract inputs (allocates nothing, runs on CPU too) and
prints XLA's argument / output / temp sizes. On CPU, XLA computes bf16 convolutions in fp32, so temp
sizes there overstate a GPU/TPU's.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t3_jax.models import vae as V  # noqa: E402
from t3_jax.weights import engine  # noqa: E402

DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}


def pair(text: str) -> tuple[int, int]:
  a, b = text.split(",")
  return int(a), int(b)


def gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def decode_flops(cfg, tile_hw, latent_frames: int, dtype, param_dtype) -> float:
  """FLOPs of one tile's decode over all frames, from XLA's cost analysis of the lowered
  program for 1 and for 2 latent frames: a scan body counts once, so the first chunk is
  f(1) and every later chunk f(2) - f(1)."""
  abstract = nnx.eval_shape(lambda: V.WanVAE(cfg, dtype=dtype, param_dtype=param_dtype))
  graphdef, state = nnx.split(abstract)

  def flops(frames):
    z = jax.ShapeDtypeStruct((1, frames, *tile_hw, cfg.z_dim), jnp.float32)
    fn = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode_frames(z, clip=False))
    cost = fn.lower(state, z).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost else float("nan")  # the GPU machine's install reports none

  first, two = flops(1), flops(2)
  return first + (latent_frames - 1) * (two - first)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--version", default="wan2.1", choices=sorted(V.PRESETS))
  parser.add_argument("--height", type=int, default=2176)
  parser.add_argument("--width", type=int, default=3840)
  parser.add_argument("--frames", type=int, default=81)
  parser.add_argument("--tile", type=pair, default=(30, 52), help="latent tile rows,cols")
  parser.add_argument("--stride", type=pair, default=(15, 26), help="latent tile stride rows,cols")
  parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="compute dtype")
  parser.add_argument("--param-dtype", default="bf16", choices=sorted(DTYPES))
  parser.add_argument("--out-dtype", default="fp32", choices=sorted(DTYPES),
                      help="dtype of the decoded video, which the tiles are blended into")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--analyze", action="store_true", help="compile the tile function only, print its memory")
  args = parser.parse_args(argv)

  cfg = V.get_config(args.version)
  s, ts = cfg.spatial_stride, cfg.temporal_stride
  if args.height % s or args.width % s or (args.frames - 1) % ts:
    parser.error(f"{args.version} needs height/width multiples of {s} and frames = 1 + {ts}n")
  latent_shape = (1, cfg.z_dim, 1 + (args.frames - 1) // ts, args.height // s, args.width // s)
  offsets, _, tile_hw = V.tile_weights(latent_shape[3:], args.tile, args.stride, s)
  dtype, param_dtype = DTYPES[args.dtype], DTYPES[args.param_dtype]
  print(f"{args.version}: latents {latent_shape} -> video (1, 3, {args.frames}, {args.height}, {args.width}); "
        f"{len(offsets)} tiles of {tile_hw} latent pixels; compute {args.dtype}, params {args.param_dtype}, "
        f"video {args.out_dtype}; "
        f"device {jax.devices()[0].device_kind}")

  if args.analyze:
    abstract = nnx.eval_shape(lambda: V.WanVAE(cfg, dtype=dtype, param_dtype=param_dtype))
    graphdef, state = nnx.split(abstract)
    canvas = jax.ShapeDtypeStruct((1, 3, args.frames, args.height, args.width), DTYPES[args.out_dtype])
    latents = jax.ShapeDtypeStruct(latent_shape, jnp.float32)
    weight = jax.ShapeDtypeStruct((tile_hw[0] * s, tile_hw[1] * s), jnp.float32)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    start = time.perf_counter()
    compiled = V._decode_tile_into.lower(graphdef, canvas, state, tile_hw, latents, weight, index, index).compile()
    mem = compiled.memory_analysis()
    print(f"compile {time.perf_counter() - start:.1f} s; per-tile program: arguments "
          f"{gib(mem.argument_size_in_bytes)} (canvas {gib(np.prod(canvas.shape) * canvas.dtype.itemsize)}), output "
          f"{gib(mem.output_size_in_bytes)} (aliases the donated canvas), temp {gib(mem.temp_size_in_bytes)}")
    flops = (compiled.cost_analysis() or {}).get("flops")
    if flops:
      print(f"XLA flops per tile {flops / 1e12:.2f} T; whole decode {flops * len(offsets) / 1e12:.1f} T")
    return

  flops = decode_flops(cfg, tile_hw, latent_shape[2], dtype, param_dtype) * len(offsets)
  untiled = decode_flops(cfg, latent_shape[3:], latent_shape[2], dtype, param_dtype)
  print(f"FLOPs: {flops / 1e15:.2f} PFLOP for the {len(offsets)} tiles ({untiled / 1e15:.2f} PFLOP untiled: "
        f"overlaps cost {flops / untiled:.2f}x)", flush=True)

  start = time.perf_counter()
  vae = engine.random_init(lambda: V.WanVAE(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)), seed=0)
  print(f"random weights {time.perf_counter() - start:.1f} s")
  latents = jax.random.normal(jax.random.key(0), latent_shape, jnp.float32)

  start = time.perf_counter()
  decode = functools.partial(vae.decode, tiled=True, tile=args.tile, stride=args.stride,
                             out_dtype=DTYPES[args.out_dtype])
  video = decode(latents)
  video.block_until_ready()
  print(f"first decode (compile + run) {time.perf_counter() - start:.1f} s; video {video.shape} {video.dtype}")
  del video
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    video = decode(latents)
    video.block_until_ready()
    times.append(time.perf_counter() - start)
    del video
  seconds = statistics.median(times)
  print(f"decode {seconds:.2f} s (median of {len(times)}: "
        f"{', '.join(f'{t:.2f}' for t in times)}); {seconds / len(offsets) * 1e3:.0f} ms per tile; "
        f"{flops / seconds / 1e12:.0f} TFLOP/s")
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    print(f"peak device memory {gib(stats['peak_bytes_in_use'])} of {gib(stats.get('bytes_limit', 0))}")


if __name__ == "__main__":
  main()
