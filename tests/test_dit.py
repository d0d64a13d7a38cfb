"""Wan DiT (t3_jax.models.dit) against diffusers' WanTransformer3DModel, and T3 inside the DiT.

Tiny random models: every torch weight perturbed (so zero-initialised paths count),
converted with the converter CLI's main(), loaded with load_dit, compared in fp32.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from t3_jax.core import attention
from t3_jax.weights import checkpoint
from t3_jax.weights import convert
from t3_jax.models import dit

import diffusers  # noqa: E402  (requirements-test.txt)

TOL = 1e-5


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def diffusers_wan(preset: str, seed: int = 0):
  """diffusers WanTransformer3DModel with a tiny preset's architecture, all weights perturbed."""
  c = dit.PRESETS[preset]
  torch.manual_seed(seed)
  model = diffusers.WanTransformer3DModel(
      patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
      in_channels=c.in_channels, out_channels=c.out_channels, text_dim=c.text_dim, freq_dim=c.freq_dim,
      ffn_dim=c.ffn_dim, num_layers=c.num_layers).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, latents, timesteps, context):
  return nnx.merge(graphdef, state)(latents, timesteps, context)


def forward(model, latents, timesteps, context):
  """Jitted model call; models with equal graphdefs share the compiled function."""
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, *(jnp.asarray(np.asarray(a)) for a in (latents, timesteps, context))))


def torch_forward(model, latents, timesteps, context):
  with torch.no_grad():
    return model(latents, timesteps, context, return_dict=False)[0].numpy()


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
  """Tiny Wan2.1 (16 channels): diffusers model, inputs, reference output, fp32 checkpoint."""
  tmp = tmp_path_factory.mktemp("wan21")
  model = diffusers_wan("tiny-wan2.1")
  inputs = (torch.randn(2, 16, 3, 4, 6), torch.tensor([999.0, 250.5]), torch.randn(2, 7, 32))
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
  assert convert.main([str(tmp / "model.safetensors"), str(tmp / "ckpt"), "--dtype", "fp32", "--quiet"]) == 0
  return dict(model=model, inputs=inputs, ref=torch_forward(model, *inputs), ckpt=str(tmp / "ckpt"), tmp=tmp)


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
  """Tiny Wan2.2-TI2V (48 channels, a timestep per token, first frame clean)."""
  tmp = tmp_path_factory.mktemp("wan22")
  model = diffusers_wan("tiny-wan2.2", seed=1)
  latents, context = torch.randn(2, 48, 3, 4, 4), torch.randn(2, 5, 32)
  grid = (3, 2, 2)
  per_frame = torch.tensor([[0.0, 700.0, 700.0], [0.0, 31.5, 31.5]])       # [B, T]
  per_token = per_frame.repeat_interleave(grid[1] * grid[2], dim=1)        # [B, T*H*W]
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
  assert convert.main([str(tmp / "model.safetensors"), str(tmp / "ckpt"), "--dtype", "fp32", "--quiet"]) == 0
  return dict(inputs=(latents, per_token, context), per_frame=per_frame,
              ref=torch_forward(model, latents, per_token, context), ckpt=str(tmp / "ckpt"))


@pytest.mark.parametrize("ffn_chunk_tokens", [None, 16])
def test_wan21_matches_diffusers(wan21, ffn_chunk_tokens, monkeypatch):
  if ffn_chunk_tokens:  # the FFN and the cross-attention's queries over chunks of tokens, as at 4K
    monkeypatch.setattr(dit, "FFN_CHUNK_TOKENS", ffn_chunk_tokens)
    # batch 2 x 2 heads x 7 text tokens: chunks of 6 of the 18 queries (and self-attention one window at a time)
    monkeypatch.setattr(attention, "XLA_MAX_LOGITS", 192)
  model = dit.load_dit(wan21["ckpt"], attention="full", dtype=jnp.float32)
  assert model.config == dit.PRESETS["tiny-wan2.1"]
  out = forward(model, *wan21["inputs"])
  assert out.shape == wan21["ref"].shape and out.dtype == np.float32
  assert rel_err(out, wan21["ref"]) < TOL


def test_wan22_per_token_timesteps_match_diffusers(wan22):
  model = dit.load_dit(wan22["ckpt"], attention="full", dtype=jnp.float32)
  with open(os.path.join(wan22["ckpt"], "config.json")) as f:
    config = json.load(f)
  assert config["preset"] == "tiny-wan2.2" and config["per_token_timesteps"] and config["family"] == "wan2.2"
  latents, per_token, context = wan22["inputs"]
  out = forward(model, latents, per_token, context)
  assert rel_err(out, wan22["ref"]) < TOL
  # One timestep per latent frame: the same numbers, without per-token modulation.
  assert rel_err(forward(model, latents, wan22["per_frame"], context), wan22["ref"]) < TOL


def test_t3_in_the_dit_runs_and_differs_from_full(wan21):
  latents, t, context = torch.randn(1, 16, 3, 8, 8), torch.tensor([500.0]), torch.randn(1, 7, 32)
  full = dit.load_dit(wan21["ckpt"], attention="full", dtype=jnp.float32)
  t3 = dit.load_dit(wan21["ckpt"], attention="t3", schedule=[(3, 1, 1), (1, 2, 2)], dtype=jnp.float32)
  assert t3.layer_schedule((3, 4, 4)) == ((3, 1, 1), (1, 2, 2))
  out_full, out_t3 = forward(full, latents, t, context), forward(t3, latents, t, context)
  assert rel_err(out_full, torch_forward(wan21["model"], latents, t, context)) < TOL
  assert np.isfinite(out_t3).all()
  assert rel_err(out_t3, out_full) > 1e-3
  # T3 with a single window everywhere is full attention.
  one = dit.load_dit(wan21["ckpt"], attention="t3", schedule=[(1, 1, 1)], dtype=jnp.float32)
  assert rel_err(forward(one, latents, t, context), out_full) < TOL


def random_model(config, **kwargs):
  """A WanDiT with random parameters, built abstractly (eager init compiles every op: slow)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: dit.WanDiT(config, rngs=nnx.Rngs(0), **kwargs)))
  rng = np.random.default_rng(0)
  nnx.replace_by_pure_dict(state, jax.tree.map(
      lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def _layer_by_layer(model, latents, timesteps, context):
  """Reference: the blocks applied one by one in a Python loop (no scan)."""
  cfg = model.config
  grid = model.token_grid(latents.shape)
  x = model.patch_embedding(dit.patchify(latents, cfg.patch_size))
  e = model.time_embedding(dit.timestep_sinusoid(timesteps.reshape(len(timesteps), 1), cfg.freq_dim))
  e0 = model.time_projection(jax.nn.silu(e)).reshape(*e.shape[:2], 6, cfg.dim)
  context = model.text_embedding(context)
  rope = dit.rope_tables(grid, cfg.head_dim)
  graphdef, state = nnx.split(model.blocks)
  for i, blocks in enumerate(model.layer_schedule(grid)):
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
    x = block(x, context, e0, rope, grid, blocks)
  return dit.unpatchify(model.head(x, e), grid, cfg.patch_size, cfg.out_channels)


def test_scan_over_schedule_cycles_with_remainder():
  # 3 layers, period 2: one scanned cycle, then one remaining layer.
  config = dataclasses.replace(dit.PRESETS["tiny-wan2.1"], num_layers=3)
  model = random_model(config, attention="t3", schedule=[(1, 2, 1), (3, 1, 2)], dtype=jnp.float32)
  latents = jax.random.normal(jax.random.key(0), (1, 16, 3, 4, 8))
  t, context = jnp.array([321.0]), jax.random.normal(jax.random.key(1), (1, 4, 32))
  assert model.layer_schedule((3, 2, 4)) == ((1, 2, 1), (3, 1, 2), (1, 2, 1))
  out = forward(model, latents, t, context)
  assert rel_err(out, nnx.jit(_layer_by_layer)(model, latents, t, context)) < 1e-6


def test_bf16_params_and_compute_close_to_fp32(wan21):
  fp32_out = forward(dit.load_dit(wan21["ckpt"], attention="full", dtype=jnp.float32), *wan21["inputs"])
  as_bf16 = dit.load_dit(wan21["ckpt"], attention="full", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(nnx.state(as_bf16, nnx.Param)))
  out = forward(as_bf16, *wan21["inputs"])
  assert out.dtype == np.float32 and np.isfinite(out).all()
  assert rel_err(out, fp32_out) < 3e-2
  # A checkpoint converted to bf16 loads as bf16 and gives the same numbers.
  tmp = wan21["tmp"]
  assert convert.main([str(tmp / "model.safetensors"), str(tmp / "ckpt_bf16"), "--dtype", "bf16", "--quiet"]) == 0
  stored_bf16 = dit.load_dit(str(tmp / "ckpt_bf16"), attention="full")
  assert rel_err(forward(stored_bf16, *wan21["inputs"]), out) < 1e-6


def test_gradients_with_remat_match_torch(wan21):
  """Backward through the scanned, rematerialised blocks vs torch autograd."""
  latents, t, context = (a[:1] for a in wan21["inputs"])
  weights = torch.randn(1, 16, 3, 4, 6)
  torch_model = wan21["model"]
  torch_model.zero_grad()
  latents_t = latents.clone().requires_grad_(True)
  (torch_model(latents_t, t, context, return_dict=False)[0] * weights).sum().backward()

  model = dit.load_dit(wan21["ckpt"], attention="full", dtype=jnp.float32, remat="full")
  graphdef, state = nnx.split(model)
  loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x, jnp.asarray(t.numpy()),
                                                             jnp.asarray(context.numpy())) * weights.numpy())
  d_state, d_latents = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, jnp.asarray(latents.numpy()))
  assert rel_err(d_latents, latents_t.grad.numpy()) < TOL
  d_params = nnx.to_pure_dict(d_state)
  blocks = torch_model.blocks
  for ours, param in [(d_params["blocks"]["ffn"]["fc1"]["kernel"][1].T, blocks[1].ffn.net[0].proj.weight),
                      (d_params["blocks"]["self_attn"]["q"]["kernel"][0].T, blocks[0].attn1.to_q.weight),
                      (d_params["blocks"]["modulation"][0], blocks[0].scale_shift_table),
                      (d_params["time_projection"]["bias"], torch_model.condition_embedder.time_proj.bias),
                      (d_params["head"]["linear"]["kernel"].T, torch_model.proj_out.weight),  # the head is remat'ed too
                      (d_params["head"]["modulation"], torch_model.scale_shift_table)]:
    assert rel_err(ours, param.grad.numpy()) < TOL


def test_bad_arguments(tmp_path):
  config = dit.PRESETS["tiny-wan2.1"]
  with pytest.raises(ValueError, match="attention"):
    nnx.eval_shape(lambda: dit.WanDiT(config, attention="sparse", rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="remat"):
    nnx.eval_shape(lambda: dit.WanDiT(config, remat="some", rngs=nnx.Rngs(0)))
  model = random_model(config, attention="full", dtype=jnp.float32)
  context = jnp.zeros((1, 3, 32))
  with pytest.raises(ValueError, match="channels"):
    model(jnp.zeros((1, 48, 2, 4, 4)), jnp.array([1.0]), context)
  with pytest.raises(ValueError, match="multiples of the patch"):
    model(jnp.zeros((1, 16, 2, 5, 4)), jnp.array([1.0]), context)
  with pytest.raises(ValueError, match="timesteps"):
    model(jnp.zeros((1, 16, 2, 4, 4)), jnp.ones((1, 3)), context)


def test_load_dit_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="convert_torch_weights.py SOURCE DIR --kind dit"):
    dit.load_dit(str(tmp_path / "nowhere"))
  checkpoint.save_checkpoint(str(tmp_path / "vae"), {"w": np.zeros(2, np.float32)}, {"kind": "vae"})
  with pytest.raises(ValueError, match="'vae' checkpoint, not a DiT.*--kind dit"):
    dit.load_dit(str(tmp_path / "vae"))


def test_ffn_over_token_chunks_equals_whole():
  x = jax.random.normal(jax.random.key(0), (2, 60, 8))
  fn = lambda h: jnp.tanh(h @ jnp.arange(64.0).reshape(8, 8) / 64)
  np.testing.assert_allclose(attention.over_token_chunks(fn, x, max_tokens=16), fn(x), rtol=1e-6, atol=1e-6)
  assert attention.over_token_chunks(fn, x, max_tokens=1000).shape == x.shape
