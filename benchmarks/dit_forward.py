"""GPU benchmark of the Wan DiT forward: T3 vs full attention, per layer kind, MFU, memory.

  python benchmarks/dit_forward.py --preset wan2.1-t2v-1.3b --grid 21,136,240 \
      [--ref DIR] [--repeats 3] [--json OUT.json]

With --ref DIR (written by benchmarks/torch_reference.py), the weights and inputs are
the PyTorch reference's: its diffusers-layout state dict goes through our converter,
and our output is compared with its output before anything is timed.

What is timed (bf16, batch 1, median of --repeats after a warm-up, wall clock around
block_until_ready):
  - the whole T3 forward (published or derived schedule for the grid), jitted once;
  - one block of every distinct layer kind of the schedule, and one full-attention
    block; the full-attention forward is estimated as num_layers x that block plus the
    T3 forward's non-block part (embeddings, head), since it takes minutes;
  - each layer kind's self-attention alone (t3_attention), the rest of the block
    (linear layers, norms, cross-attention) being the difference;
  - the MFU yardstick (benchmarks/yardstick.py), last, in the same process: the best of
    several warmed bf16 GEMMs (8192^3 and the DiT's own 4K shapes, median of 20 each), and
    the card's datasheet peak; MFU is reported against both.
FLOPs are 2 x MACs from t3_jax.core.schedule.model_macs, coinciding partitions counted once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import yardstick
from t3_jax.core import attention, schedule, windows
from t3_jax.models import dit


def timed(fn, *args, repeats=3, warmup=1):
  """Median wall seconds of fn(*args) (outputs waited for), and the last output."""
  out = None
  for _ in range(warmup):
    out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def peak_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0)


def build_model(args, config):
  if args.ref:
    from t3_jax.weights import convert
    ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
    convert.convert(os.path.join(args.ref, "model.safetensors"), ckpt, kind="dit", dtype="bf16")
    return dit.load_dit(ckpt, attention="t3", dtype=jnp.bfloat16)
  return dit.WanDiT(config, attention="t3", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                    rngs=nnx.Rngs(0))


def inputs(args, config, grid):
  if args.ref:
    load = lambda name: jnp.asarray(np.load(os.path.join(args.ref, name)))
    return load("latents.npy").astype(jnp.bfloat16), load("timestep.npy"), load("context.npy").astype(jnp.bfloat16)
  shape = (1, config.in_channels, *(g * p for g, p in zip(grid, config.patch_size)))
  keys = jax.random.split(jax.random.key(1), 2)
  return (jax.random.normal(keys[0], shape, jnp.bfloat16), jnp.array([500.0]),
          jax.random.normal(keys[1], (1, 512, config.text_dim), jnp.bfloat16))


def block_fns(model, grid):
  """jitted (one block, its self-attention alone) for given block counts."""
  cfg = model.config
  graphdef, state = nnx.split(model.blocks)
  layer0 = jax.tree.map(lambda a: a[0], state)
  n, dim, heads = math.prod(grid), cfg.dim, cfg.num_heads
  keys = jax.random.split(jax.random.key(2), 5)
  x = jax.random.normal(keys[0], (1, n, dim), jnp.bfloat16)
  context = jax.random.normal(keys[1], (1, 512, dim), jnp.bfloat16)
  e0 = 0.1 * jax.random.normal(keys[2], (1, 1, 6, dim), jnp.float32)
  rope = dit.rope_tables(grid, cfg.head_dim, cfg.rope_theta)
  qkv = [jax.random.normal(k, (1, n, heads, cfg.head_dim), jnp.bfloat16) for k in keys[2:]]

  def block(blocks):
    f = jax.jit(lambda s, x, c, e0, rope: nnx.merge(graphdef, s)(x, c, e0, rope, grid, blocks))
    return lambda: f(layer0, x, context, e0, rope)

  def attn(blocks, **options):  # options of t3_attention; its defaults are the model's
    f = jax.jit(lambda q, k, v: attention.t3_attention(q, k, v, grid, blocks, **options))
    return lambda: f(*qkv)

  return block, attn


def attention_fusion(args, model, grid, per_layer, result):
  """Each layer kind's t3_attention with close and remote windows in one kernel call and in two."""
  _, attn = block_fns(model, grid)
  rows = {}
  for blocks in dict.fromkeys(per_layer):
    if windows.partitions_coincide(grid, blocks):
      continue
    fused, _ = timed(attn(blocks, fuse_partitions=True), repeats=args.repeats)
    separate, _ = timed(attn(blocks, fuse_partitions=False), repeats=args.repeats)
    rows[str(blocks)] = {"fused_s": fused, "separate_s": separate, "count": per_layer.count(blocks)}
    print(f"  layer {blocks}: one call {fused * 1e3:.1f} ms, two calls {separate * 1e3:.1f} ms", flush=True)
  result["attention_fusion"] = rows
  result["fused_total_s"] = sum(r["fused_s"] * r["count"] for r in rows.values())
  result["separate_total_s"] = sum(r["separate_s"] * r["count"] for r in rows.values())
  print(json.dumps(result, indent=1, default=str))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1, default=str)
  return 0


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="wan2.1-t2v-1.3b")
  p.add_argument("--grid", default="21,136,240", help="latent-token grid T,H,W")
  p.add_argument("--ref", default=None, help="directory written by benchmarks/torch_reference.py")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--no-full", action="store_true", help="skip the full-attention block")
  p.add_argument("--guided-step", action="store_true", help="also time one CFG denoising step (batch 2)")
  p.add_argument("--forward-only", action="store_true", help="only the whole T3 forward (time, memory)")
  p.add_argument("--attention-only", action="store_true",
                 help="only each layer kind's t3_attention, close and remote in one kernel call vs two")
  p.add_argument("--no-yardstick", action="store_true", help="skip the GEMM yardstick (no MFU)")
  p.add_argument("--gemm-repeats", type=int, default=20, help="timings per yardstick GEMM")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)

  grid = tuple(int(g) for g in args.grid.split(","))
  config = dit.DiTConfig.preset(args.preset)
  device = jax.devices()[0]
  result = {"preset": args.preset, "grid": grid, "tokens": math.prod(grid), "device": device.device_kind,
            "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
  print(f"{args.preset} grid {grid} ({math.prod(grid):,} tokens) on {device.device_kind}, jax {jax.__version__}", flush=True)

  model = build_model(args, config)
  per_layer = model.layer_schedule(grid)
  if args.attention_only:
    return attention_fusion(args, model, grid, per_layer, result)
  period = schedule.cycle(per_layer)
  result["schedule"] = period
  latents, timestep, context = inputs(args, config, grid)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))

  t0 = time.perf_counter()
  out = jax.block_until_ready(forward(state, latents, timestep, context))
  result["t3_compile_and_first_s"] = time.perf_counter() - t0
  result["t3_forward_s"], out = timed(forward, state, latents, timestep, context, repeats=args.repeats, warmup=0)
  result["peak_bytes_t3_forward"] = peak_bytes()
  print(f"T3 forward {result['t3_forward_s']:.3f} s, peak {result['peak_bytes_t3_forward'] / 2**30:.1f} GiB", flush=True)
  if args.ref:
    ref = np.load(os.path.join(args.ref, "torch_out.npy")).astype(np.float64)
    ours = np.asarray(out, np.float64)
    result["rel_err_vs_torch"] = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    with open(os.path.join(args.ref, "torch_timing.json")) as f:
      result["torch"] = json.load(f)
    print(f"vs PyTorch reference: rel err {result['rel_err_vs_torch']:.2e}; torch {result['torch']['median_s']:.3f} s", flush=True)
  del out

  if args.guided_step:
    # One guided denoising step: conditional + unconditional in one batch-2 forward, CFG, Euler.
    def step(s, x, t, c, c_neg, dsigma):
      v = nnx.merge(graphdef, s)(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([c, c_neg]))
      v_c, v_u = jnp.split(v, 2)
      return (x.astype(jnp.float32) + (v_u + 5.0 * (v_c - v_u)) * dsigma).astype(x.dtype)
    step = jax.jit(step)
    result["guided_step_s"], _ = timed(step, state, latents, timestep, context, jnp.zeros_like(context),
                                       jnp.float32(-0.02), repeats=args.repeats)
    result["peak_bytes_guided_step"] = peak_bytes()
    print(f"guided denoising step (batch 2) {result['guided_step_s']:.3f} s, "
          f"peak {result['peak_bytes_guided_step'] / 2**30:.1f} GiB", flush=True)

  t3_macs = schedule.model_macs(config, grid, per_layer, dedup=True)
  result["t3_tflop"] = 2 * t3_macs["total"] / 1e12
  result["t3_tflops"] = result["t3_tflop"] / result["t3_forward_s"]
  if args.forward_only:
    return finish(args, result)

  block, attn = block_fns(model, grid)
  kinds = list(dict.fromkeys(period)) + ([] if args.no_full else [(1, 1, 1)])
  layers = {}
  for blocks in kinds:
    repeats = 1 if blocks == (1, 1, 1) and math.prod(grid) > 200_000 else args.repeats
    block_s, _ = timed(block(blocks), repeats=repeats)
    attn_s, _ = timed(attn(blocks), repeats=repeats)
    attn_flops = 2 * schedule.layer_attention_macs(grid, blocks, config.dim, dedup=True)
    layers[str(blocks)] = {"block_s": block_s, "attention_s": attn_s, "rest_s": block_s - attn_s,
                           "attention_tflops": attn_flops / attn_s / 1e12,
                           "count": per_layer.count(blocks),
                           "coincide": windows.partitions_coincide(grid, blocks),
                           "padded": windows.is_padded(grid, blocks)}
    print(f"  layer {blocks}: block {block_s * 1e3:.1f} ms, attention {attn_s * 1e3:.1f} ms "
          f"({layers[str(blocks)]['attention_tflops']:.0f} TFLOP/s)", flush=True)
  result["layers"] = layers

  full_macs = schedule.model_macs(config, grid, schedule.resolve_schedule("full", None, grid, config.num_layers))
  sum_blocks = sum(layers[str(b)]["block_s"] for b in per_layer)
  result["t3_sum_of_blocks_s"] = sum_blocks
  result["non_block_s"] = max(0.0, result["t3_forward_s"] - sum_blocks)
  result["attention_s_total"] = sum(layers[str(b)]["attention_s"] for b in per_layer)
  result["rest_s_total"] = sum(layers[str(b)]["rest_s"] for b in per_layer)
  if not args.no_full:
    full = layers[str((1, 1, 1))]
    result["full_forward_est_s"] = config.num_layers * full["block_s"] + result["non_block_s"]
    result["full_tflop"] = 2 * full_macs["total"] / 1e12
    result["speedup_vs_full"] = result["full_forward_est_s"] / result["t3_forward_s"]
  return finish(args, result)


def finish(args, result):
  """The yardstick last (its 12 GB operands stay out of the measured peaks), MFU, the JSON."""
  if not args.no_yardstick:
    print("MFU yardstick (same process):", flush=True)
    result["yardstick"] = yardstick.measure(repeats=args.gemm_repeats)
    result["t3_mfu"] = yardstick.mfu(result["t3_tflops"], result["yardstick"])
    if "guided_step_s" in result:  # two forwards' FLOPs (batch 2) plus an elementwise update
      result["guided_step_mfu"] = yardstick.mfu(2 * result["t3_tflop"] / result["guided_step_s"], result["yardstick"])
    m = result["t3_mfu"]
    print(f"T3 forward {result['t3_tflops']:.0f} TFLOP/s: MFU {m['vs_best_gemm']:.1%} of the best GEMM "
          f"({result['yardstick']['best_gemm_tflops']:.0f} TFLOP/s)"
          + ("" if m["vs_datasheet"] is None else
             f", {m['vs_datasheet']:.1%} of the datasheet ({result['yardstick']['datasheet_tflops']:.0f})"), flush=True)
  print(json.dumps(result, indent=1, default=str))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1, default=str)
  return 0


if __name__ == "__main__":
  sys.exit(main())
