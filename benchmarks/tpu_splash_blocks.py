"""Splash block sizes on TPU, checked by the TPU compiler on this CPU host (no TPU needed).

  ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu python benchmarks/tpu_splash_blocks.py \
      --out benchmarks/results/tpu_splash_blocks.json

For every window length of the published 4K schedules (Wan2.1-1.3B and Wan2.2-5B) and every
TPU generation (v5e, v5p, v6e, abstract devices from jax.experimental.topologies), compiles
splash attention over a few windows, forward and backward, with every candidate block size
(t3_jax.core.attention.SPLASH_BLOCKS), and records which compile (the limit is each core's
VMEM), the block the rule picks (`splash_blocks`), and the compiler's own cost estimate,
which leaves Mosaic kernels out (so it can't rank block sizes). Everything here is compiler
output, not a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t3_jax.core import attention, schedule, windows

GENERATIONS = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
MODELS = {"wan2.1-1.3b": ("wan2.1-4k", 12), "wan2.2-5b": ("wan2.2-4k", 24)}


def compile_attend(device, length: int, heads: int, blocks: attention.SplashBlocks | None, grad: bool,
                   num_windows: int = 4):
  """Compiles splash over [num_windows, length, heads, 128] on one abstract chip."""
  mesh = Mesh(np.array([device]), ("x",))
  target = attention.Target.of([device])
  spec = jax.ShapeDtypeStruct((num_windows, length, heads, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  original = attention.splash_blocks
  if blocks is not None:  # a forced candidate
    attention.splash_blocks = lambda *a, **k: blocks
  try:
    fn = functools.partial(attention.attend, implementation="pallas", target=target)
    body = lambda q, k, v: jax.shard_map(fn, mesh=mesh, in_specs=(P(),) * 3, out_specs=P(), check_vma=False)(q, k, v)
    if grad:
      body = jax.grad(lambda q, k, v, f=body: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    start = time.perf_counter()
    compiled = jax.jit(body).lower(spec, spec, spec).compile()
    seconds = time.perf_counter() - start
  finally:
    attention.splash_blocks = original
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {"compiled": True, "compile_s": round(seconds, 2),
          "compiler_optimal_seconds": cost.get("optimal_seconds"), "compiler_flops": cost.get("flops"),
          "model_flops": (3.5 if grad else 1.0) * 4 * num_windows * heads * length * length * 128,
          "mosaic_kernels": compiled.as_text().count("tpu_custom_call")}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="")
  parser.add_argument("--generations", default=",".join(GENERATIONS))
  parser.add_argument("--chosen_only", action="store_true", help="compile only the blocks the rule picks")
  args = parser.parse_args()
  rows = []
  for gen in args.generations.split(","):
    device = topologies.get_topology_desc(topology_name=GENERATIONS[gen], platform="tpu").devices[0]
    for model, (name, heads) in MODELS.items():
      grid, pattern = schedule.PUBLISHED[name]["grid"], schedule.PUBLISHED[name]["pattern"]
      lengths = sorted({int(np.prod(windows.window_shape(grid, b))) for b in pattern})
      for length in lengths:
        chosen = attention.splash_blocks(length, 128, device.device_kind)
        for block in attention.SPLASH_BLOCKS:
          padded = -(-length // block) * block
          candidate = attention.SplashBlocks(padded, block, block, min(block, attention.SPLASH_MAX_KV_COMPUTE))
          if args.chosen_only and candidate != chosen:
            continue
          for grad in (False, True):
            row = {"generation": gen, "device_kind": device.device_kind, "model": model, "window_tokens": length,
                   "heads": heads, **dataclasses.asdict(candidate), "backward": grad,
                   "chosen_by_rule": candidate == chosen}
            try:
              row.update(compile_attend(device, length, heads, candidate, grad))
            except Exception as e:  # the compiler refused it (VMEM): a result, recorded
              row.update(compiled=False, error=" ".join(str(e).split())[:160])
            rows.append(row)
            print(json.dumps(row), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
