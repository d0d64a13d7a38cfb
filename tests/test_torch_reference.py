"""The PyTorch T3 reference (benchmarks/torch_reference.py) agrees with our JAX code.

CPU, float32, tiny configs. The end-to-end test is the small-scale proof that the
benchmark's two sides compute the same thing: the CLI builds diffusers'
WanTransformer3DModel with T3 processors and random weights, our converter reads its
state dict, and t3_jax.models.dit.load_dit's WanDiT (attention="t3", same schedule) must give
the same output. The GPU benchmark re-checks at full scale in bf16.
"""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import torch_reference as ref
from flax import nnx

from t3_jax.core import attention
from t3_jax.weights import convert
from t3_jax.models import dit
from t3_jax.core import windows


@pytest.fixture(autouse=True)
def one_torch_thread():
  # Tiny ops: thread wake-ups cost more than the work on a small CPU (20 ms per Linear with 2).
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_presets_match_t3_jax():
  for name, p in ref.PRESETS.items():
    config = dit.PRESETS[name]
    assert {k: getattr(config, k) for k in p} == p, name
    assert config.patch_size == ref.PATCH_SIZE


GRID = (3, 4, 6)
BLOCKS = [
    (3, 1, 1),  # one frame per window: close == remote, computed once
    (1, 1, 1),  # full attention
    (1, 2, 3),  # divisible: reshape + permute
    (1, 3, 4),  # padded on H and W; a close window of H is all padding
    (2, 2, 2),  # padded on T
]


@pytest.mark.parametrize("blocks", BLOCKS)
def test_t3_attention_matches_jax(blocks):
  assert windows.partitions_coincide(GRID, BLOCKS[0]) and windows.is_padded(GRID, BLOCKS[3])
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, math.prod(GRID), 2, 8), dtype=np.float32) for _ in range(3))
  ours = ref.t3_attention(*(torch.from_numpy(x) for x in (q, k, v)), GRID, blocks)
  # Jitted: one compile is cheaper than JAX's op-by-op dispatch here.
  theirs = jax.jit(functools.partial(attention.t3_attention, grid=GRID, blocks=blocks, implementation="xla"))(q, k, v)
  assert ours.shape == q.shape
  np.testing.assert_allclose(ours.numpy(), np.asarray(theirs), atol=2e-6)


def test_full_schedule_processor_matches_diffusers():
  """With (1, 1, 1) the T3 processor is diffusers' own attention: checks q/k/v, norms and RoPE."""
  model = ref.build_model("tiny-wan2.1", None, "cpu", torch.float32, seed=1)
  latents, timestep, context = (torch.from_numpy(x) for x in ref.make_inputs("tiny-wan2.1", GRID, seed=1))
  with torch.inference_mode():
    expected = model(latents, timestep, context, return_dict=False)[0]
    ref.install_t3(model, GRID, schedule=[(1, 1, 1)])
    assert isinstance(model.blocks[1].attn1.processor, ref.T3WanAttnProcessor)
    got = model(latents, timestep, context, return_dict=False)[0]
  assert rel_err(got, expected) < 1e-6


CASES = {
    # 4 layers: coinciding, divisible, padded (with an all-padding close window), padded on T.
    "wan2.1-scalar-t": ("tiny-wan2.1", 4, "3,1,1;1,2,3;1,3,4;2,2,2", []),
    # Wan2.2 (48 channels), a timestep per token as diffusers' TI2V pipeline passes it.
    "wan2.2-per-token-t": ("tiny-wan2.2", 2, "1,3,4;3,2,3", ["--per-token-timesteps"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_jax_wandit(case, tmp_path, monkeypatch):
  preset, layers, schedule, extra = CASES[case]
  if layers != dit.PRESETS[preset].num_layers:
    # The converter names checkpoints by preset: register this depth as one.
    monkeypatch.setitem(dit.PRESETS, f"{preset}-{layers}-layers",
                        dataclasses.replace(dit.PRESETS[preset], num_layers=layers))
  out = tmp_path / "ref"
  assert ref.main(["--preset", preset, "--grid", ",".join(map(str, GRID)), "--out", str(out),
                   "--layers", str(layers), "--schedule", schedule, "--device", "cpu", "--dtype", "fp32",
                   "--repeats", "1", *extra]) == 0
  timing = json.loads((out / "torch_timing.json").read_text())
  assert timing["num_layers"] == layers and timing["attention"] == "t3" and timing["median_s"] > 0

  ckpt = str(tmp_path / "ckpt")
  assert convert.main([str(out / "model.safetensors"), ckpt, "--kind", "dit", "--dtype", "fp32", "--quiet"]) == 0
  model = dit.load_dit(ckpt, attention="t3", schedule=schedule, dtype=jnp.float32)
  assert model.layer_schedule(GRID) == ref.install_t3(
      ref.build_model(preset, layers, "cpu", torch.float32, 0), GRID, schedule)
  latents, timestep, context = (np.load(out / f"{name}.npy") for name in ("latents", "timestep", "context"))
  if extra:
    assert timestep.shape == (1, math.prod(GRID))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, *inputs: nnx.merge(graphdef, state)(*inputs))
  ours = forward(state, jnp.asarray(latents), jnp.asarray(timestep), jnp.asarray(context))
  theirs = np.load(out / "torch_out.npy")
  assert ours.shape == theirs.shape == latents.shape[:1] + (dit.PRESETS[preset].out_channels,) + latents.shape[2:]
  assert rel_err(ours, theirs) < 1e-5
