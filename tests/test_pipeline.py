"""t3_jax.diffusion.pipeline: the jitted sampling loop against a step-by-step re-run, sizes, errors.

Tiny random models (T3Pipeline.random). The reference calls the DiT eagerly once per step
and per prompt (conditional and unconditional as two separate batch-1 calls) in a Python
loop, and does guidance and the Euler update in NumPy, with the release's schedule written
out from its formula.
"""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t3_jax.diffusion import pipeline
from t3_jax.models import dit, umt5, vae

PROMPT = "a red fox running through fresh snow"


@pytest.fixture(scope="module")
def pipe():
  return pipeline.T3Pipeline.random("tiny-wan2.1", seed=0, text_len=16)


def euler_reference(pipe, x, cond, uncond, *, steps, shift, guidance):
  """The sampling loop in Python: one DiT call per pass and step, guidance and Euler in NumPy
  (float64 schedule). The single forward is jitted only because eager calls retrace the DiT's
  layer scan every time (about 4 s each on a CPU)."""
  graphdef, state = nnx.split(pipe.dit)
  forward = jax.jit(lambda state, x, t, c: nnx.merge(graphdef, state)(x, t, c))
  u = np.linspace(1.0, 0.0, steps + 1)[:-1]
  sigmas = np.append(shift * u / (1 + (shift - 1) * u), 0.0)
  x = np.asarray(x, np.float32)
  for i in range(steps):
    t = jnp.full((1,), 1000.0 * sigmas[i], jnp.float32)
    v_cond = np.asarray(forward(state, jnp.asarray(x), t, jnp.asarray(cond)))
    v_uncond = np.asarray(forward(state, jnp.asarray(x), t, jnp.asarray(uncond)))
    v = v_uncond + guidance * (v_cond - v_uncond)
    x = (x + v * np.float32(sigmas[i + 1] - sigmas[i])).astype(np.float32)
  return x


def test_sampling_loop_equals_step_by_step_rerun(pipe):
  steps, shift, guidance, seed = 3, 3.0, 4.0, 7
  traces = pipeline.TRACE_COUNTS["denoise"]
  out = pipe(PROMPT, height=40, width=56, frames=5, steps=steps, shift=shift, guidance=guidance, seed=seed,
             crop_to_request=True, return_latents=True, progress=False)

  # Reference: contexts straight from the encoder (prompts cleaned as Wan does: ftfy turns the
  # negative prompt's full-width commas into ASCII ones), noise straight from the PRNG.
  ids, mask = pipe.tokenizer([umt5.clean_prompt(p) for p in (PROMPT, pipeline.WAN_NEGATIVE_PROMPT)], 16)
  contexts = np.asarray(umt5.encode_tokens(pipe.text_encoder, jnp.asarray(ids), jnp.asarray(mask)))
  assert out.shape.latent == (4, 2, 6, 8)  # 5 frames -> 2 latent frames; 48x64 / 8
  noise = jax.random.normal(jax.random.key(seed), (1, 4, 2, 6, 8), jnp.float32)
  expected = euler_reference(pipe, noise, contexts[:1], contexts[1:], steps=steps, shift=shift, guidance=guidance)

  err = np.linalg.norm(out.latents - expected) / np.linalg.norm(expected)
  assert err < 1e-5, err
  assert np.abs(expected - np.asarray(noise)).mean() > 0.1  # the loop did move the sample

  # 40x56 is generated at 48x64 (multiples of 16) and cropped back to the request.
  assert out.frames.shape == (5, 40, 56, 3) and out.frames.dtype == np.uint8
  assert out.shape.generated == (5, 48, 64) and out.shape.requested == (5, 40, 56)
  for key in ("load_s", "text_s", "compile_s", "denoise_s", "decode_s", "peak_memory_bytes"):
    assert out.stats[key] >= 0
  assert out.stats["peak_memory_bytes"] > 0

  # Another seed and no crop: the same compiled loop (no retrace), the uncropped frames.
  full = pipe.generate(contexts[0], contexts[1], height=40, width=56, frames=5, steps=steps, shift=shift,
                       guidance=guidance, seed=seed, progress=False)
  assert pipeline.TRACE_COUNTS["denoise"] == traces + 1
  assert full.frames.shape == (5, 48, 64, 3)
  np.testing.assert_array_equal(pipeline.center_crop(full.frames, 40, 56), out.frames)
  other = pipe.generate(contexts[0], contexts[1], height=48, width=64, frames=5, steps=steps, shift=shift,
                        guidance=guidance, seed=seed + 1, progress=False, return_latents=True)
  assert pipeline.TRACE_COUNTS["denoise"] == traces + 1
  assert not np.allclose(other.latents, out.latents)


def test_sizes_round_up_to_the_stride_and_crop_back(pipe):
  # Wan2.1: VAE stride 8 x patch 2 = 16. 2160 is a multiple of 16, kept; others round up.
  assert pipe.size_multiple == 16
  assert pipe.video_shape(2160, 3840, 81).generated == (81, 2160, 3840)
  assert pipe.video_shape(2170, 3832, 81).generated == (81, 2176, 3840)
  # The release's 4K grid from a 2160 request: round to 128 (2176 = 17 x 128), crop back.
  shape = pipe.video_shape(2160, 3840, 81, size_multiple=128)
  assert shape.generated == (81, 2176, 3840) and shape.requested == (81, 2160, 3840)
  assert shape.latent[1:] == (21, 272, 480) and pipe.token_grid(shape) == (21, 136, 240)
  with pytest.raises(ValueError, match="size_multiple must be 0 or a multiple of 16"):
    pipe.video_shape(2160, 3840, 81, size_multiple=24)
  with pytest.raises(ValueError, match="height must be a positive integer"):
    pipe.video_shape(0, 64, 5)

  # Wan2.2: VAE stride 16 x patch 2 = 32, so 2160 -> 2176 as in the release.
  wan22 = pipeline.T3Pipeline.random("tiny-wan2.2", text_len=16)
  assert wan22.size_multiple == 32
  assert wan22.video_shape(2160, 3840, 81).generated == (81, 2176, 3840)
  assert wan22.token_grid(wan22.video_shape(2160, 3840, 81)) == (21, 68, 120)

  video = np.arange(3 * 2176 * 8 * 3).reshape(3, 2176, 8, 3)
  cropped = pipeline.center_crop(video, 2160, 8)
  np.testing.assert_array_equal(cropped, video[:, 8:2168])


def test_frames_must_be_4k_plus_1(pipe):
  for frames in (80, 0, 82):
    with pytest.raises(ValueError, match=r"frames must be 4k\+1, e.g. 81"):
      pipe.video_shape(64, 64, frames)
  with pytest.raises(ValueError, match=r"frames must be 4k\+1, e.g. 81 \(got 80\)"):
    pipe(PROMPT, height=64, width=64, frames=80, steps=1)  # fails before any work
  pipe.video_shape(64, 64, 81)


def test_missing_checkpoint_names_the_converter_command(tmp_path):
  dirs = {kind: str(tmp_path / kind) for kind in ("dit", "vae", "umt5")}
  for present in ([], ["dit"], ["dit", "vae"]):
    for kind in present:
      os.makedirs(dirs[kind], exist_ok=True)
      with open(os.path.join(dirs[kind], "config.json"), "w") as f:
        json.dump({"kind": kind}, f)
    missing = next(k for k in ("dit", "vae", "umt5") if k not in present)
    with pytest.raises(FileNotFoundError) as info:
      pipeline.T3Pipeline.from_checkpoints(dirs["dit"], dirs["vae"], dirs["umt5"], str(tmp_path / "tok"))
    message = str(info.value)
    assert f"python convert_torch_weights.py SOURCE {dirs[missing]} --kind {missing}" in message
    assert "\n" not in message


def test_byte_tokenizer_and_negative_prompt():
  ids, mask = pipeline.ByteTokenizer()(["ab", "é"], 6)
  np.testing.assert_array_equal(ids, [[ord("a") + 2, ord("b") + 2, 1, 0, 0, 0], [0xC3 + 2, 0xA9 + 2, 1, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
  # Wan's standard negative prompt: 28 terms separated by full-width commas.
  terms = pipeline.WAN_NEGATIVE_PROMPT.split("，")
  assert len(terms) == 28 and terms[0] == "色调艳丽" and terms[-1] == "倒着走"


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_multi_device_sampling_equals_one_device(run_on_fake_devices):
  """4 fake devices: the DiT sequence- and guidance-parallel (2 x 2) and the VAE tiles on all
  four give the one-device video (fp32 rounding; frames within one 8-bit step)."""
  result = run_on_fake_devices("sampling_check.py", 4)
  assert result["latents"] < 1e-5 * result["latents_scale"], result
  assert result["frames"] <= 1 and result["frames_shape"] == [5, 64, 64, 3], result
  assert "all-to-all" in result["collectives"], result  # the tokens really were split


def n_params(module):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def param_dtypes(module):
  return {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param))}


@pytest.mark.parametrize("preset, vae_preset, latent, grid", [
    ("wan2.1-t2v-1.3b", "wan2.1", (16, 21, 272, 480), (21, 136, 240)),
    ("wan2.2-ti2v-5b", "wan2.2", (48, 21, 136, 240), (21, 68, 120)),
])
def test_random_full_presets_build_the_real_models(preset, vae_preset, latent, grid, monkeypatch):
  """random_init's full presets, abstractly (nothing allocated): the DiT at its preset, the
  family's VAE with its real latent statistics and umT5-XXL, stored as converted weights are
  held (bf16 DiT and umT5, fp32 VAE), all drawn on the device; the 4K shape is the release's."""
  drawn = []

  def abstract_init(make, seed, *, on_device=False):
    drawn.append(on_device)
    return nnx.eval_shape(make)

  monkeypatch.setattr(pipeline, "random_init", abstract_init)
  pipe = pipeline.T3Pipeline.random(preset, dtype="bfloat16", text_len=512)
  assert drawn == [True, True, True]
  assert pipe.dit.config == dit.PRESETS[preset]
  assert pipe.vae.config == vae.PRESETS[vae_preset] and pipe.vae_config.latents_std == vae.PRESETS[vae_preset].latents_std
  assert pipe.text_encoder.config == umt5.UMT5Config.umt5_xxl()
  assert param_dtypes(pipe.dit) == {jnp.dtype(jnp.bfloat16)} == param_dtypes(pipe.text_encoder)
  assert param_dtypes(pipe.vae) == {jnp.dtype(jnp.float32)}
  assert n_params(pipe.text_encoder) > 5.6e9  # umT5-XXL's encoder: 5.7 B parameters
  assert (1.2e9 < n_params(pipe.dit) < 1.6e9) if preset.endswith("1.3b") else (4.5e9 < n_params(pipe.dit) < 5.5e9)
  shape = pipe.video_shape(2176, 3840, 81)
  assert shape.latent == latent and pipe.token_grid(shape) == grid
  assert pipe.tokenizer(["\xff"], 4)[0].max() < pipe.text_encoder.config.vocab_size  # valid umT5-XXL ids

  # A shallower DiT on request; bad presets and layer counts fail with the choices named.
  assert pipeline.T3Pipeline.random(preset, num_layers=2, dtype="bfloat16").dit.config.num_layers == 2
  with pytest.raises(ValueError, match="unknown random_init preset 'wan9'.*wan2.1-t2v-1.3b"):
    pipeline.random_configs("wan9")
  with pytest.raises(ValueError, match="num_layers must be a positive integer"):
    pipeline.random_configs(preset, -1)


def test_random_init_on_device_follows_the_host_rules():
  """on_device=True draws each parameter in its own dtype (bf16 stays bf16) with the same rules
  as the host path: matching per-leaf means and spreads, different draws per leaf and seed, the
  same draws for the same seed."""
  config = dataclasses.replace(dit.PRESETS["tiny-wan2.1"], dim=96, ffn_dim=192, num_heads=2)
  make = lambda: dit.WanDiT(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  device = nnx.to_pure_dict(nnx.state(pipeline.random_init(make, 3, on_device=True), nnx.Param))
  again = nnx.to_pure_dict(nnx.state(pipeline.random_init(make, 3, on_device=True), nnx.Param))
  other = nnx.to_pure_dict(nnx.state(pipeline.random_init(make, 4, on_device=True), nnx.Param))
  host = nnx.to_pure_dict(nnx.state(pipeline.random_init(make, 3), nnx.Param))
  leaves = jax.tree_util.tree_leaves_with_path(device)
  assert {leaf.dtype for _, leaf in leaves} == {jnp.dtype(jnp.bfloat16)}
  jax.tree.map(np.testing.assert_array_equal, device, again)
  seen = set()
  for (path, d), h, o in zip(leaves, jax.tree.leaves(host), jax.tree.leaves(other)):
    d, h = np.asarray(d, np.float64), np.asarray(h, np.float64)
    assert not np.array_equal(d, np.asarray(o, np.float64)), path
    assert d.tobytes() not in seen, path  # no two leaves share a draw
    seen.add(d.tobytes())
    if d.size >= 2000:  # enough samples for 10% agreement of the spread
      assert abs(d.std() / h.std() - 1) < 0.1, (path, d.std(), h.std())
      assert abs(d.mean() - h.mean()) < 0.1 * h.std() + 0.01 * abs(h.mean()), (path, d.mean(), h.mean())
