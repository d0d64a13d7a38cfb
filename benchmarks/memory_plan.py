"""Memory plan without hardware: compile (never run) a training step on fake CPU devices.

  python benchmarks/memory_plan.py --variant=stage2 --devices=8,16,32,64 --out=benchmarks/memory_plan.json

For each device count N the mesh is (data 1, fsdp N/S, sequence S) with S = --sequence
(default 8), one example per sequence group (global batch N/S), and XLA's per-device
estimate is recorded: arguments (params + optimizer state + batch), outputs, temporaries.

Caveats (JAX_NOTES.md): the CPU backend computes bf16 dots in f32, which inflates
temporaries; its attention is the XLA kernel, which materialises logits per chunk of
windows (cuDNN / splash attention don't), so by default the window kernel is replaced
by a stand-in with flash attention's footprint (--attention=stand_in: keeps q, k, v,
no logits); `peak_memory_in_bytes` is not reliable on CPU.
Treat the figures as an upper-bound plan, not a measurement.
"""

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variant", default="stage2", help="configs/t3_wan.py variant")
  p.add_argument("--devices", default="8,16,32,64")
  p.add_argument("--sequence", type=int, default=8, help="sequence-parallel group size")
  p.add_argument("--remat", default=None, help="override model.remat")
  p.add_argument("--layers", type=int, default=None, help="override the layer count (to separate per-layer memory)")
  p.add_argument("--attention", default="stand_in", choices=("stand_in", "xla"),
                 help="stand_in: a linear-memory stand-in for the window kernel (cuDNN/splash keep no "
                      "logits; CPU's XLA kernel materialises them); xla: the CPU kernel as is")
  p.add_argument("--out", default=None, help="append JSON lines here")
  p.add_argument("--hlo_dir", default=None, help="also write each compiled HLO text here")
  p.add_argument("--residuals", action="store_true",
                 help="instead: trace (don't compile) the variant's loss on one device and list what the "
                      "backward pass keeps (JAX's saved residuals), the whole video, grouped by source")
  return p.parse_args()


def print_residuals(config):
  """The saved residuals of the DiT's loss for the whole (unsharded) video, biggest first."""
  import collections

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax._src.ad_checkpoint import saved_residuals  # public: jax.ad_checkpoint.print_saved_residuals

  from t3_jax.training import trainer

  model, dit_cfg = trainer.build_model(config, abstract=True)
  graphdef, state = nnx.split(model)
  c, f, h, w = trainer.latent_shape(config, dit_cfg)
  x = jax.ShapeDtypeStruct((1, c, f, h, w), jnp.bfloat16)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  context = jax.ShapeDtypeStruct((1, config.data.text_len, dit_cfg.text_dim), jnp.bfloat16)
  loss = lambda s, x, t, context: jnp.mean(jnp.square(nnx.merge(graphdef, s)(x, t, context)))
  groups = collections.defaultdict(lambda: [0, 0])
  for aval, source in saved_residuals(loss, state, x, t, context):
    key = (f"{aval.dtype}{list(aval.shape)}", source.split(" from ")[-1][:90])
    groups[key][0] += 1
    groups[key][1] += int(np.prod(aval.shape)) * aval.dtype.itemsize
  total = sum(b for _, b in groups.values())
  print(f"{config.model.preset}, latents {(c, f, h, w)}, remat {config.model.remat}: "
        f"saved residuals {total / 2**30:.2f} GiB for the whole video (divide the token-sized ones by the sequence axis)")
  for (array, source), (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:12]:
    print(f"  {b / 2**30:8.2f} GiB  {n} x {array}  {source}")


def largest_results(text: str, op: str | None = None, top: int = 3):
  """The biggest results of `op` (any op when None) in compiled HLO text, as (shape, MiB)."""
  sizes = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "pred": 1}
  found = []
  for line in text.splitlines():
    if "=" not in line or (op and f" {op}(" not in line and f" {op}-start(" not in line):
      continue
    result = line.split("=", 1)[1].split("(", 1)[0] if op is None else line.split("=", 1)[1].split(f" {op}", 1)[0]
    for dtype, dims in re.findall(r"(bf16|f16|f32|s32|u32|f64|pred)\[([0-9,]*)\]", result):
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      found.append((n * sizes[dtype] / 2**20, f"{dtype}[{dims}]"))
  found.sort(reverse=True)
  return [(shape, round(mib, 1)) for mib, shape in found[:top]]


def main():
  args = parse_args()
  counts = [int(n) for n in args.devices.split(",")]
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={max(counts)}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import jax
  import jax.numpy as jnp

  import t3_wan
  from t3_jax.core import sequence_parallel
  from t3_jax.parallel import mesh as mesh_lib
  from t3_jax.training import trainer

  if args.residuals:
    config = t3_wan.get_config(args.variant)
    config.model.init_checkpoint = ""
    if args.remat:
      config.model.remat = args.remat
    print_residuals(config)
    return

  if args.attention == "stand_in":
    from t3_jax.core import attention

    def stand_in(q, k, v, lengths=None, implementation=None, target=None):
      """Flash attention's memory footprint (saves q, k, v; no [L, L] logits), not its math."""
      kv = jnp.mean(k.astype(jnp.float32) * v.astype(jnp.float32), axis=1, keepdims=True)
      return (q.astype(jnp.float32) * kv).astype(q.dtype)

    attention.attend = stand_in  # read at trace time by t3_attention and sequence_parallel

  for n in counts:
    config = t3_wan.get_config(args.variant)
    seq = min(args.sequence, n)
    config.mesh.data, config.mesh.fsdp, config.mesh.sequence = 1, n // seq, seq
    config.batch_size = n // seq
    config.microbatches = 1
    config.data.kind = "synthetic"
    if args.remat:
      config.model.remat = args.remat
    if args.layers:
      config.model.overrides.num_layers = args.layers
    mesh = mesh_lib.make_mesh(1, n // seq, seq, devices=jax.devices()[:n])
    t0 = time.time()
    tr = trainer.Trainer(config, "/tmp/memory_plan_unused", mesh=mesh)
    batch = {k: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=tr.batch_sharding[k])
             for k, s in [("latents", jax.ShapeDtypeStruct((config.batch_size, *tr.latent_shape), jnp.float32)),
                          ("context", jax.ShapeDtypeStruct((config.batch_size, config.data.text_len, tr.dit_cfg.text_dim), jnp.float32))]}
    frozen = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          tr.frozen_abstract, tr.frozen_sharding)
    compiled = tr.train_step.lower(tr.abstract_state, frozen, batch).compile()
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    if args.hlo_dir:
      os.makedirs(args.hlo_dir, exist_ok=True)
      with open(os.path.join(args.hlo_dir, f"{args.variant}_{n}.hlo.txt"), "w") as f:
        f.write(text)
    gib = lambda b: round(b / 2**30, 2)
    record = {
        "variant": args.variant, "devices": n, "mesh": dict(mesh.shape), "global_batch": config.batch_size,
        "latent_shape": list(tr.latent_shape), "remat": config.model.remat, "layers": tr.dit_cfg.num_layers,
        "lora_rank": int(config.lora.rank), "attention": args.attention,
        "argument_gib": gib(mem.argument_size_in_bytes), "output_gib": gib(mem.output_size_in_bytes),
        "temp_gib": gib(mem.temp_size_in_bytes), "alias_gib": gib(mem.alias_size_in_bytes),
        "total_gib": gib(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                         + mem.temp_size_in_bytes),
        "collectives": sequence_parallel.collectives_in(text),
        "largest_all_gathers": largest_results(text, "all-gather"),
        "largest_all_to_alls": largest_results(text, "all-to-all"),
        "largest_buffers": largest_results(text, None, top=6),
        "compile_s": round(time.time() - t0, 1),
    }
    tr.loader.close()
    print(json.dumps(record), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  main()
