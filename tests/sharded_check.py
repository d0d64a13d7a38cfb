"""Sharded-vs-single-device checks, run in their own process with 8 fake CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_check.py

(tests/test_sharding.py runs it so the rest of the suite keeps one device.) Prints one
JSON object: per check, the largest differences and the collectives XLA compiled.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

import jax
import jax.numpy as jnp
import numpy as np

from t3_jax.core import attention
from t3_jax.models import dit
from t3_jax.parallel import mesh as mesh_lib
from t3_jax.core import sequence_parallel
from t3_jax.parallel.layout import Layout
from t3_jax.training import trainer


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check_attention(mesh, grid, blocks, collective, relayout, batch=2, heads=4, head_dim=8, stages=1):
  """sharded_t3_attention == t3_attention, forward and gradient (fp32); stages: pipelined
  head groups of the heads re-layout."""
  rng = np.random.default_rng(0)
  n = int(np.prod(grid))
  q, k, v = (jnp.asarray(rng.normal(size=(batch, n, heads, head_dim)), jnp.float32) for _ in range(3))
  fn = Layout(mesh, relayout=relayout, collective=collective, stages=stages).self_attention
  spec = mesh_lib.logical_sharding(mesh, "batch", "tokens", "heads", None)
  qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))
  loss = lambda f: (lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, grid, blocks, "xla"))))
  forward = jax.jit(lambda q, k, v: fn(q, k, v, grid, blocks, "xla")).lower(qs, ks, vs).compile()
  out = forward(qs, ks, vs)
  grads = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(qs, ks, vs)
  ref = attention.t3_attention(q, k, v, grid, blocks, "xla")
  ref_grads = jax.grad(loss(attention.t3_attention), argnums=(0, 1, 2))(q, k, v)
  plan = sequence_parallel.describe_relayout(grid, blocks, mesh_lib.axis_size(mesh, "tokens"), heads, collective)
  return {"grid": grid, "blocks": blocks, "collective": collective, "relayout": relayout, "stages": stages, "heads": heads, "out": max_diff(out, ref), "grad": max_diff(grads, ref_grads),
          "collectives": sequence_parallel.collectives_in(forward.as_text()), "plan": plan}


def check_chunked_forward():
  """The DiT with chunk_blocks (the TPU default) on fsdp 2 x sequence 4, each device's 12 of
  48 tokens in chunks of 4, against one device without chunks (fp32, tiny, random params)."""
  from flax import nnx

  config = dit.PRESETS["tiny-wan2.1"]
  schedule = [(1, 2, 2), (3, 1, 1)]
  make = lambda layout: dit.WanDiT(config, attention="t3", schedule=schedule, dtype=jnp.float32, layout=layout,
                                   rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make(Layout(chunk_blocks=False))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, params)
  latents = jax.random.normal(jax.random.key(0), (2, 16, 3, 8, 8))
  t, context = jnp.array([321.0, 5.0]), jax.random.normal(jax.random.key(1), (2, 7, 32))
  ref = nnx.merge(graphdef, state)(latents, t, context)
  mesh = mesh_lib.make_mesh(fsdp=2, sequence=4)
  sharded_graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(Layout(mesh, chunk_blocks=True))))
  out = jax.jit(lambda s, x: nnx.merge(sharded_graphdef, s)(x, t, context))(state, latents)
  return {"out": max_diff(out, ref), "scale": float(np.max(np.abs(np.asarray(ref))))}


def one_step(config, mesh):
  tr = trainer.Trainer(config, "/tmp/unused", mesh=mesh)
  state, frozen = tr.initial_state()
  batch = trainer._global_batch(tr.loader.batch(0), tr.batch_sharding)
  compiled = tr.train_step.lower(state, frozen, batch).compile()
  state, metrics = compiled(state, frozen, batch)
  tr.loader.close()
  return jax.device_get(state["params"]), jax.device_get(metrics), sequence_parallel.collectives_in(compiled.as_text())


def main():
  import t3_wan

  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  result = {"attention": []}
  mesh = mesh_lib.make_mesh(fsdp=2, sequence=4)
  for grid, blocks, collective, relayout in [
      ((3, 4, 8), (3, 1, 1), "ppermute", "windows"),     # 3 frame windows on 4 devices: head groups + padding
      ((3, 4, 8), (1, 2, 4), "all_to_all", "windows"),   # 8 windows spread over everything
      ((3, 5, 8), (1, 2, 2), "auto", "windows"),         # blocks don't divide the grid: padded windows
      ((3, 4, 8), (1, 2, 4), "auto", "auto"),            # 4 heads on 4 shards: head groups (all-to-all)
      ((3, 5, 8), (3, 2, 2), "auto", "heads")]:          # padded windows, head groups
    result["attention"].append(check_attention(mesh, grid, blocks, collective, relayout))
  # Head groups in 2 pipelined stages (8 heads, 4 shards): 2 all-to-alls per stage.
  result["attention"].append(check_attention(mesh, (3, 4, 8), (1, 2, 4), "auto", "heads", heads=8, stages=2))
  # 6 heads on 4 shards: padded to 8 heads (2 per device), still two all-to-alls.
  result["attention"].append(check_attention(mesh, (3, 4, 8), (1, 2, 4), "auto", "auto", heads=6))

  # The FFN runs over chunks of tokens (of each device's own tokens when sharded), as at 4K,
  # and the tiny model's parameters are sharded as a real model's are (none is "small").
  dit.FFN_CHUNK_TOKENS = 4
  mesh_lib.MIN_SHARDED_ELEMENTS = 0
  config = t3_wan.get_config("tiny")
  config.data.frames = 9                         # latents [16, 3, 8, 8]: 3x4x4 tokens
  config.model.schedule = "3,1,1;1,2,2"          # 3 frame windows, then 4 windows of 3x2x2
  config.batch_size = 4
  config.optimizer.warmup_steps = 0
  # A large Adam eps keeps the update a smooth function of the gradient: with 1e-8,
  # gradients that are rounding noise (~1e-9) become +-lr steps and hide the comparison.
  config.optimizer.eps = 1e-3
  ref_params, ref_metrics, _ = one_step(config, mesh_lib.make_mesh(devices=jax.devices()[:1]))
  result["train"] = []
  for axes, micro in [(dict(data=2, fsdp=2, sequence=2), 1), (dict(data=1, fsdp=2, sequence=4), 2)]:
    config.microbatches = micro
    params, metrics, collectives = one_step(config, mesh_lib.make_mesh(**axes))
    result["train"].append({"mesh": axes, "microbatches": micro, "loss": float(metrics["loss"]),
                            "ref_loss": float(ref_metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                            "ref_grad_norm": float(ref_metrics["grad_norm"]),
                            "params": max_diff(params, ref_params),
                            "collectives": collectives})
  result["chunked_forward"] = check_chunked_forward()
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main()
