"""The 4K DiT forward (batch 1, bf16) compiled for TPU chips by the TPU compiler on this host.

  ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu python benchmarks/tpu_dit_forward.py v6e:2x2 wan2.1-t2v-1.3b 1

Arguments: a topology (jax.experimental.topologies), a DiT preset, the chips to use (the tokens
split over them). Prints the per-chip memory the compiler plans (or its refusal) and the
largest buffers. Compiler output, not a run.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from memory_plan import largest_results  # noqa: E402
from t3_jax.models import dit  # noqa: E402
from t3_jax.parallel import mesh as mesh_lib  # noqa: E402
from t3_jax.parallel.layout import Layout  # noqa: E402


def main():
  topology, preset, chips = sys.argv[1], sys.argv[2], int(sys.argv[3])
  devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[:chips]
  mesh = mesh_lib.make_mesh(data=1, fsdp=1, sequence=chips, devices=devices)
  cfg = dit.DiTConfig.preset(preset)
  model = nnx.eval_shape(lambda: dit.WanDiT(cfg, attention="t3", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                            layout=Layout(mesh), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  replicated = NamedSharding(mesh, P())
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), state)
  stride = 8 if cfg.family == "wan2.1" else 16  # the VAE's spatial stride: 2176x3840 latents
  latents = (1, cfg.in_channels, 21, 2176 // stride, 3840 // stride)
  args = (jax.ShapeDtypeStruct(latents, jnp.bfloat16, sharding=replicated),
          jax.ShapeDtypeStruct((1,), jnp.float32, sharding=replicated),
          jax.ShapeDtypeStruct((1, 512, cfg.text_dim), jnp.bfloat16, sharding=replicated))
  start = time.time()
  try:
    compiled = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c)).lower(state, *args).compile()
  except Exception as e:  # the compiler's refusal is the result
    print("REFUSED", " ".join(str(e).split())[:300])
    return
  ma, text = compiled.memory_analysis(), compiled.as_text()
  print(f"{topology} x{chips} {preset}: compiled {time.time() - start:.0f}s mosaic={text.count('tpu_custom_call')} "
        f"arg={ma.argument_size_in_bytes / 2**30:.2f} out={ma.output_size_in_bytes / 2**30:.2f} "
        f"temp={ma.temp_size_in_bytes / 2**30:.2f} peak={ma.peak_memory_in_bytes / 2**30:.2f} GiB")
  print(largest_results(text, None, 8))


if __name__ == "__main__":
  main()
