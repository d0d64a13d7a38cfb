"""Several GPUs, one host: sequence-parallel and guidance-parallel T3 DiT forwards.

  python benchmarks/multi_gpu.py --preset wan2.1-t2v-1.3b --grid 21,136,240 [--repeats 3] [--json OUT]

Sequence parallel: the 4K token sequence is split over a mesh axis "sequence"; each
self-attention re-lays the tokens so that every device holds whole windows
(t3_jax.core.sequence_parallel.sharded_t3_attention, --relayouts: "heads" = one all-to-all of head
groups each way, "windows" = whole windows per partition), and the rest of the block
(linears, norms, cross-attention, FFN) runs on each device's own tokens. Parameters are
replicated (2.8 GB for Wan2.1-1.3B in bf16).
Guidance parallel: the batch of two (conditional, unconditional) split over "data".

For k = 1, 2, 4, ... devices it times the forward (median of --repeats) and reports
the scaling efficiency t(1) / (k * t(k)), the peak memory of device 0, and the
collectives in the compiled program. With --check it first compares the sharded
output with the one-device output (the numbers must agree to bf16 rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3_jax.models import dit
from t3_jax.parallel import mesh as mesh_lib
from t3_jax.core import sequence_parallel
from t3_jax.parallel.layout import Layout


def timed(fn, repeats):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def forward_on(mesh, model_state, graphdef_fn, inputs):
  """Jitted forward on `mesh`: params replicated, batch over "batch", tokens over "sequence"."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: graphdef_fn(mesh)))  # no weights: they come in model_state
  replicated = mesh_lib.replicated(mesh)
  state = jax.device_put(model_state, replicated)
  batch_sharding = mesh_lib.batch_shardings(inputs, mesh)
  inputs = jax.device_put(inputs, batch_sharding)
  out_sharding = mesh_lib.logical_sharding(mesh, "batch", None, None, None, None)
  f = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c), out_shardings=out_sharding)
  return (lambda: f(state, *inputs)), f.lower(state, *inputs).compile()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="wan2.1-t2v-1.3b")
  p.add_argument("--grid", default="21,136,240")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--layers", type=int, default=None, help="fewer layers (quick checks)")
  p.add_argument("--check", action="store_true", help="compare sharded and one-device outputs first")
  p.add_argument("--min-devices", type=int, default=1, help="skip setups on fewer devices (no 1-GPU baseline then)")
  p.add_argument("--relayouts", default="heads,windows",
                 help="sequence-parallel re-layouts to time: heads, heads/S (S pipelined stages), windows "
                      "(the first is also used for guidance+sequence)")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)

  grid = tuple(int(g) for g in args.grid.split(","))
  config = dit.DiTConfig.preset(args.preset)
  if args.layers:
    config = dit.DiTConfig.from_dict({**config.to_dict(), "num_layers": args.layers})
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  devices = jax.devices()
  print(f"{args.preset} grid {grid} on {len(devices)} x {devices[0].device_kind}", flush=True)

  def builder(relayout):  # "heads", "heads/3" (3 pipelined stages), "windows", "auto"
    name, _, stages = relayout.partition("/")
    return lambda mesh: dit.WanDiT(config, attention="t3", dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0),
                                   layout=Layout(mesh, relayout=name, stages=int(stages or 1)))

  _, state = nnx.split(nnx.eval_shape(lambda: builder("auto")(None)))
  state = jax.tree.map(lambda s: jnp.asarray(
      np.random.default_rng(0).standard_normal(s.shape, np.float32) * 0.02, dtype), state)
  keys = jax.random.split(jax.random.key(1), 2)
  latent_shape = (config.in_channels, *(g * p for g, p in zip(grid, config.patch_size)))

  def make_inputs(batch):
    return (jax.random.normal(keys[0], (batch, *latent_shape), dtype), jnp.full((batch,), 500.0),
            jax.random.normal(keys[1], (batch, 512, config.text_dim), dtype))

  rows, result = [], {"preset": args.preset, "grid": grid, "device": devices[0].device_kind,
                      "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
  relayouts = args.relayouts.split(",")
  setups = [("sequence", 1, 1, relayouts[0])]
  setups += [("sequence", 1, k, r) for r in relayouts for k in (2, 4, 8)
             if k <= len(devices) and (not r.startswith("heads")
                                       or config.num_heads % (k * int(r.partition("/")[2] or 1)) == 0)]
  setups += [("guidance", 2, 1, relayouts[0])] if len(devices) >= 2 else []
  setups += [("guidance+sequence", 2, len(devices) // 2, relayouts[0])] if len(devices) >= 4 else []
  setups = [s for s in setups if s[1] * s[2] >= args.min_devices]
  reference = None
  for name, data, seq, relayout in setups:
    mesh = mesh_lib.make_mesh(data=data, fsdp=1, sequence=seq, devices=devices[:data * seq])
    inputs = make_inputs(2 if name.startswith("guidance") else 1)
    run, compiled = forward_on(mesh, state, builder(relayout), inputs)
    if args.check:
      out = np.asarray(run(), np.float32)
      if name == "sequence" and seq == 1:
        reference = out
      elif reference is not None and out.shape == reference.shape:
        err = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        print(f"  {name} x{data * seq} ({relayout}): rel err vs one device {err:.2e}", flush=True)
        result[f"rel_err_{name}_{data * seq}_{relayout}"] = err
    seconds = timed(run, args.repeats)
    stats = devices[0].memory_stats() or {}
    row = {"setup": name, "relayout": relayout if seq > 1 else None, "devices": data * seq,
           "batch": inputs[0].shape[0], "seconds": seconds,
           "peak_bytes_device0": stats.get("peak_bytes_in_use"),
           "collectives": sequence_parallel.collectives_in(compiled.as_text())}
    rows.append(row)
    print(f"  {name:>18} on {data * seq} device(s), batch {row['batch']}, relayout {row['relayout']}: {seconds:.3f} s; "
          f"collectives {row['collectives']}", flush=True)
  base = {r["batch"]: r["seconds"] for r in rows if r["devices"] == 1}
  for r in rows:
    if r["batch"] in base and r["devices"] > 1:
      r["scaling_efficiency"] = base[r["batch"]] / (r["devices"] * r["seconds"])
    elif r["batch"] == 2 and 1 in base:  # vs two one-device batch-1 forwards in a row
      r["scaling_efficiency"] = 2 * base[1] / (r["devices"] * r["seconds"])
  result["rows"] = rows
  print(json.dumps(result, indent=1, default=str))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
  main()
