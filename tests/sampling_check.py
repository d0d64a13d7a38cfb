"""Multi-device sampling vs one device, in its own process with 4 fake CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sampling_check.py

(tests/test_pipeline.py runs it.) The tiny random pipeline generates the same video on one
device and with the DiT sequence- and guidance-parallel (2 x 2 devices) and the VAE tiles on
all four; prints one JSON line: the largest differences and the collectives compiled.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import numpy as np

from t3_jax.diffusion import pipeline
from t3_jax.core import sequence_parallel
from t3_jax.parallel import layout as layout_lib


def main():
  assert jax.device_count() == 4, "run with XLA_FLAGS=--xla_force_host_platform_device_count=4"
  rng = np.random.default_rng(0)
  kwargs = dict(height=64, width=64, frames=5, steps=3, guidance=5.0, seed=1, vae_tile=(4, 4),
                vae_tile_stride=(2, 2), progress=False, return_latents=True)
  outs, collectives = [], []
  for mesh in (None, layout_lib.sampling_mesh(sequence=2, guidance_parallel=True)):
    pipe = pipeline.T3Pipeline.random("tiny-wan2.1", num_layers=2, mesh=mesh)
    dim = pipe.dit.config.text_dim
    context, negative = (rng.standard_normal((16, dim)).astype(np.float32) for _ in range(2))
    rng = np.random.default_rng(0)  # the same contexts for both pipelines
    outs.append(pipe.generate(context, negative, **kwargs))
    compiled = next(iter(pipe._compiled.values()))
    collectives.append(sequence_parallel.collectives_in(compiled.as_text()))
  one, many = outs
  result = {
      "latents": float(np.max(np.abs(one.latents - many.latents))),
      "latents_scale": float(np.max(np.abs(one.latents))),
      "frames": int(np.max(np.abs(one.frames.astype(int) - many.frames.astype(int)))),
      "frames_shape": list(many.frames.shape),
      "collectives": collectives[1],
  }
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main()
