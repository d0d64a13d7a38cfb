"""The MFU yardstick: the best bf16 GEMM rate this device reaches, measured in this process.

  python benchmarks/yardstick.py [--repeats 20] [--json OUT.json]

MFU here is achieved FLOP/s over a ceiling, and the ceiling is given two ways:
  - the best of several bf16 GEMMs measured in the same process as the work they judge: the
    square 8192^3 and the Wan2.1-1.3B DiT's own 4K shapes (685,440 tokens x dim 1536, FFN
    8960), each warmed, then the median of `repeats` timings; the best median is the ceiling;
  - the card's datasheet dense bf16 peak (989 TFLOP/s on an H100 or H200 SXM), where known.

Each timing dispatches enough back-to-back products to run about 20 ms and waits once, so
the host's launch and synchronisation latency (0.3-0.5 ms on a GPU) is not counted against a
1.4 ms 8192^3 product; the products run one after another on the device, so seconds per
product is the batch's time over its count. Operands are random normal (zeros run faster).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

# (m, k, n) of [m, k] x [k, n]. The 4K shapes: attention projections, FFN in, FFN out.
GEMM_SHAPES = {
    "8192^3": (8192, 8192, 8192),
    "[685440,1536]x[1536,1536]": (685440, 1536, 1536),
    "[685440,1536]x[1536,8960]": (685440, 1536, 8960),
    "[685440,8960]x[8960,1536]": (685440, 8960, 1536),
}
BATCH_SECONDS = 0.02  # each timing runs about this long


def datasheet_tflops(device=None) -> float | None:
  """The card's dense bf16 datasheet peak in TFLOP/s, matched on device_kind; None if unknown."""
  # The project's one table of datasheet peaks.
  from t3_jax.training.trainer import peak_flops
  peak = peak_flops(device or jax.devices()[0])
  return None if peak is None else peak / 1e12


def gemm_rate(m: int, k: int, n: int, *, repeats: int = 20, warmup: int = 3, dtype=jnp.bfloat16) -> dict:
  """Median (and best) TFLOP/s of a jitted [m, k] x [k, n] product, bf16 in and out."""
  ka, kb = jax.random.split(jax.random.key(m + k + n))
  a = jax.random.normal(ka, (m, k), dtype)
  b = jax.random.normal(kb, (k, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  for _ in range(warmup):
    f(a, b).block_until_ready()
  start = time.perf_counter()
  f(a, b).block_until_ready()
  one = time.perf_counter() - start
  inner = max(1, min(64, round(BATCH_SECONDS / max(one, 1e-6))))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    outs = [f(a, b) for _ in range(inner)]
    outs[-1].block_until_ready()
    seconds.append((time.perf_counter() - start) / inner)
    del outs
  flop = 2 * m * k * n
  del a, b
  return {"m": m, "k": k, "n": n, "per_timing": inner, "repeats": repeats,
          "median_s": statistics.median(seconds), "tflops": flop / statistics.median(seconds) / 1e12,
          "best_tflops": flop / min(seconds) / 1e12}


def per_call_matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
  """The yardstick used before (kept to show the difference): one n^3 product per timing, waited
  for each time, median of `repeats` after 2 warm-ups. The host latency of each wait is counted."""
  ka, kb = jax.random.split(jax.random.key(0))
  a, b = jax.random.normal(ka, (n, n), jnp.bfloat16), jax.random.normal(kb, (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  for _ in range(2):
    f(a, b).block_until_ready()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    seconds.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(seconds) / 1e12


def measure(shapes: dict = GEMM_SHAPES, *, repeats: int = 20, per_call_n: int = 8192, verbose: bool = True) -> dict:
  """Every GEMM of `shapes`, the best median as the ceiling, and the datasheet peak."""
  gemms = {}
  for name, (m, k, n) in shapes.items():
    gemms[name] = gemm_rate(m, k, n, repeats=repeats)
    if verbose:
      g = gemms[name]
      print(f"  GEMM {name}: {g['tflops']:.0f} TFLOP/s (median of {repeats}, best {g['best_tflops']:.0f})",
            flush=True)
  best = max(gemms, key=lambda name: gemms[name]["tflops"])
  out = {"gemms": gemms, "best_gemm": best, "best_gemm_tflops": gemms[best]["tflops"],
         "datasheet_tflops": datasheet_tflops(), "per_call_square_tflops": per_call_matmul_tflops(per_call_n)}
  if verbose:
    print(f"  yardstick: best GEMM {best} {out['best_gemm_tflops']:.0f} TFLOP/s; datasheet "
          f"{out['datasheet_tflops']} TFLOP/s; the old per-call {per_call_n}^3 timing "
          f"{out['per_call_square_tflops']:.0f}",
          flush=True)
  return out


def mfu(tflops: float, yardstick: dict) -> dict:
  """Achieved TFLOP/s as fractions of the best GEMM and of the datasheet peak."""
  sheet = yardstick.get("datasheet_tflops")
  return {"vs_best_gemm": tflops / yardstick["best_gemm_tflops"],
          "vs_datasheet": None if not sheet else tflops / sheet}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--scale", type=float, default=1.0,
                 help="scale the token count of the DiT shapes (e.g. 0.01 for a quick CPU check)")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  shapes = {name: (max(1, math.ceil(m * args.scale)) if m == 685440 else m, k, n)
            for name, (m, k, n) in GEMM_SHAPES.items()}
  if args.scale != 1.0:
    del shapes["8192^3"]
    shapes["1024^3"] = (1024, 1024, 1024)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
            **measure(shapes, repeats=args.repeats, per_call_n=8192 if args.scale == 1.0 else 1024)}
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
