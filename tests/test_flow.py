"""Flow matching against independent references.

- The T3-Video release's scheduler (DiffSynth-Studio `FlowMatchScheduler`, built as
  `FlowMatchScheduler(shift=5, sigma_min=0.0, extra_one_step=True)`), transcribed below in
  torch float32 exactly as the release computes it.
- Wan's `FlowUniPCMultistepScheduler` schedule, transcribed below, and diffusers'
  `UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")` for the
  UniPC update itself.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from t3_jax.diffusion import flow


class ReleaseFlowMatchScheduler:
  """The release's FlowMatchScheduler (sigma_min=0, extra_one_step=True), the lines that matter."""

  def __init__(self, shift=5, sigma_min=0.0, sigma_max=1.0, num_train_timesteps=1000):
    self.shift, self.sigma_min, self.sigma_max = shift, sigma_min, sigma_max
    self.num_train_timesteps = num_train_timesteps

  def set_timesteps(self, num_inference_steps, denoising_strength=1.0, training=False, shift=None):
    if shift is not None:
      self.shift = shift
    sigma_start = self.sigma_min + (self.sigma_max - self.sigma_min) * denoising_strength
    self.sigmas = torch.linspace(sigma_start, self.sigma_min, num_inference_steps + 1)[:-1]
    self.sigmas = self.shift * self.sigmas / (1 + (self.shift - 1) * self.sigmas)
    self.timesteps = self.sigmas * self.num_train_timesteps
    if training:
      x = self.timesteps
      y = torch.exp(-2 * ((x - num_inference_steps / 2) / num_inference_steps) ** 2)
      y_shifted = y - y.min()
      self.linear_timesteps_weights = y_shifted * (num_inference_steps / y_shifted.sum())

  def step(self, model_output, timestep, sample):
    timestep_id = torch.argmin((self.timesteps - timestep).abs())
    sigma = self.sigmas[timestep_id]
    sigma_ = 0 if timestep_id + 1 >= len(self.timesteps) else self.sigmas[timestep_id + 1]
    return sample + model_output * (sigma_ - sigma)


def wan_unipc_schedule(num_steps, shift, num_train_timesteps=1000):
  """Wan's FlowUniPCMultistepScheduler(shift=1) + set_timesteps(num_steps, shift=shift)."""
  alphas = np.linspace(1, 1 / num_train_timesteps, num_train_timesteps)[::-1].copy()
  init_sigmas = torch.from_numpy(1.0 - alphas).to(dtype=torch.float32)
  init_sigmas = 1 * init_sigmas / (1 + (1 - 1) * init_sigmas)  # the constructor's shift=1
  sigma_min, sigma_max = init_sigmas[-1].item(), init_sigmas[0].item()
  sigmas = np.linspace(sigma_max, sigma_min, num_steps + 1).copy()[:-1]
  sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
  timesteps = torch.from_numpy(sigmas * num_train_timesteps).to(dtype=torch.int64)
  return np.concatenate([sigmas, [0]]).astype(np.float32), timesteps.numpy()


def fake_velocity(channels=4, seed=0):
  """A fixed random linear map over channels plus a timestep term: v = W x + (t/1000) b."""
  rng = np.random.default_rng(seed)
  w = (rng.standard_normal((channels, channels)) / math.sqrt(channels)).astype(np.float32)
  b = rng.standard_normal(channels).astype(np.float32)

  def numpy_fn(x, t):
    return np.einsum("dc,bc...->bd...", w, x) + (t / 1000).reshape(-1, 1, 1, 1, 1) * b.reshape(1, -1, 1, 1, 1)

  def jax_fn(x, t):
    return jnp.einsum("dc,bc...->bd...", w, x) + (t / 1000).reshape(-1, 1, 1, 1, 1) * b.reshape(1, -1, 1, 1, 1)

  return numpy_fn, jax_fn


def relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


X_SHAPE = (2, 4, 3, 4, 5)  # [batch, channels, frames, height, width]


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps, shift", [(50, 5.0), (30, 3.0), (40, 3.3), (1, 5.0)])
def test_euler_schedule_is_the_release_bit_for_bit(num_steps, shift):
  release = ReleaseFlowMatchScheduler(shift=5)
  release.set_timesteps(num_steps, denoising_strength=1.0, shift=shift)
  sigmas, timesteps = flow.euler_sigmas(num_steps, shift)

  assert sigmas.dtype == timesteps.dtype == np.float32
  np.testing.assert_array_equal(sigmas[:-1], release.sigmas.numpy())
  assert sigmas[-1] == 0
  np.testing.assert_array_equal(timesteps, release.timesteps.numpy())
  # and the formula itself, in float64
  u = np.linspace(1, 0, num_steps + 1)[:-1]
  np.testing.assert_allclose(sigmas[:-1], shift * u / (1 + (shift - 1) * u), rtol=2e-7)


def test_training_schedule_and_weights_are_the_release():
  release = ReleaseFlowMatchScheduler(shift=5)
  release.set_timesteps(1000, training=True)
  sigmas, timesteps = flow.training_sigmas(1000, 5.0)
  weights = flow.training_weights(1000, 5.0)

  np.testing.assert_array_equal(sigmas, release.sigmas.numpy())
  np.testing.assert_array_equal(timesteps, release.timesteps.numpy())
  # torch's float32 exp and sum round differently from one float64 pass: equal to 1e-6
  assert relative_error(weights, release.linear_timesteps_weights.numpy()) < 1e-6

  # the formulas in float64
  u = np.linspace(1, 0, 1001)[:-1]
  sigma64 = 5 * u / (1 + 4 * u)
  np.testing.assert_allclose(sigmas, sigma64, rtol=2e-7)
  t = 1000 * sigma64
  y = np.exp(-2 * ((t - 500) / 1000) ** 2)
  y -= y.min()
  assert relative_error(weights, y * 1000 / y.sum()) < 1e-6
  assert weights.min() == 0 and abs(weights.astype(np.float64).sum() - 1000) < 1e-2


@pytest.mark.parametrize("num_steps, shift", [(50, 5.0), (40, 3.0), (8, 12.0)])
def test_unipc_schedule_is_wans(num_steps, shift):
  sigmas, timesteps = flow.unipc_sigmas(num_steps, shift)
  wan_sigmas, wan_timesteps = wan_unipc_schedule(num_steps, shift)
  np.testing.assert_array_equal(sigmas, wan_sigmas)
  np.testing.assert_array_equal(timesteps, wan_timesteps.astype(np.float32))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def test_training_batch_builds_the_flow_matching_problem():
  sigmas, timesteps = flow.training_sigmas()
  weights = flow.training_weights()
  x0 = jax.random.normal(jax.random.key(1), (512, 3, 2), jnp.bfloat16)
  x_t, target, timestep, weight = jax.jit(flow.sample_training_batch)(jax.random.key(2), x0)

  index = np.searchsorted(-timesteps, -np.asarray(timestep))  # timesteps decrease
  np.testing.assert_array_equal(timesteps[index], timestep)  # every timestep is a table entry
  np.testing.assert_array_equal(weights[index], weight)
  assert len(np.unique(index)) > 350  # spread over [0, 1000) (512 draws hit ~400 indices)
  assert 350 < index.mean() < 650

  x0 = np.asarray(x0, np.float32)
  eps = np.asarray(target) + x0
  sigma = sigmas[index][:, None, None]
  np.testing.assert_allclose(x_t, (1 - sigma) * x0 + sigma * eps, rtol=1e-5, atol=1e-5)
  assert abs(eps.std() - 1) < 0.1


def test_training_batch_can_round_timesteps_like_the_release():
  """The release casts t to bf16, then looks sigma and weight up by argmin over the table."""
  release = ReleaseFlowMatchScheduler(shift=5)
  release.set_timesteps(1000, training=True)
  x0 = jnp.zeros((4096, 1))
  x_t, target, timestep, weight = flow.sample_training_batch(jax.random.key(3), x0, round_timesteps_to_bf16=True)

  t_bf16 = torch.from_numpy(np.array(timestep)).to(torch.bfloat16)
  np.testing.assert_array_equal(t_bf16.float().numpy(), np.asarray(timestep))  # already bf16 values
  index = torch.argmin((release.timesteps[None, :] - t_bf16[:, None].float()).abs(), dim=1).numpy()
  assert len(np.unique(index)) < 600  # bf16 merges neighbouring timesteps
  sigma = release.sigmas.numpy()[index]
  eps = np.asarray(target)[:, 0]  # x0 = 0: target = eps, x_t = sigma * eps
  np.testing.assert_allclose(np.asarray(x_t)[:, 0], sigma * eps, rtol=1e-6)
  assert relative_error(weight, release.linear_timesteps_weights.numpy()[index]) < 1e-6


def test_flow_matching_loss():
  rng = np.random.default_rng(0)
  pred, target = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
  weight = np.array([0.5, 2.0, 1.0], np.float32)
  expected = np.mean(np.mean((pred - target) ** 2, axis=(1, 2)) * weight)
  np.testing.assert_allclose(flow.flow_matching_loss(jnp.asarray(pred), jnp.asarray(target), weight), expected,
                             rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def test_euler_loop_equals_a_step_by_step_rerun():
  numpy_fn, jax_fn = fake_velocity()
  x_T = flow.initial_noise(0, X_SHAPE)
  x0 = jax.jit(lambda x: flow.sample(jax_fn, x, sampler="euler", num_steps=50, shift=5.0))(x_T)

  release = ReleaseFlowMatchScheduler(shift=5)
  release.set_timesteps(50, shift=5.0)
  x = np.array(x_T)
  for t in release.timesteps:
    v = numpy_fn(x, np.full(X_SHAPE[0], t.item(), np.float32))
    x = release.step(torch.from_numpy(v), t, torch.from_numpy(x)).numpy()
  assert relative_error(x0, x) < 1e-6


def test_unipc_equals_diffusers_step_by_step():
  numpy_fn, jax_fn = fake_velocity(seed=1)
  num_steps, shift = 50, 5.0
  sigmas, timesteps = flow.unipc_sigmas(num_steps, shift)

  # diffusers' UniPC with Wan's schedule: pass Wan's unshifted grid, diffusers applies the shift.
  scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=2, solver_type="bh2",
                                      prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                      lower_order_final=True, final_sigmas_type="zero")
  scheduler.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0.0, num_steps + 1)[:-1])
  scheduler.set_begin_index(0)
  np.testing.assert_array_equal(scheduler.sigmas.numpy(), sigmas)
  np.testing.assert_array_equal(scheduler.timesteps.numpy().astype(np.float32), timesteps)

  x_T = flow.initial_noise(1, X_SHAPE)
  coefficients = flow.unipc_coefficients(sigmas)
  step = jax.jit(flow.unipc_step)
  state = flow.unipc_init(x_T)
  x_ref = torch.from_numpy(np.array(x_T))
  for i, t in enumerate(scheduler.timesteps):
    t_batch = np.full(X_SHAPE[0], float(t), np.float32)
    x_ref = scheduler.step(torch.from_numpy(numpy_fn(x_ref.numpy(), t_batch)), t, x_ref).prev_sample
    state = step(state, jax_fn(state.x, t_batch), i, coefficients)
    assert relative_error(state.x, x_ref.numpy()) < 1e-5, f"step {i}"

  x0 = jax.jit(lambda x: flow.sample(jax_fn, x, sampler="unipc", num_steps=num_steps, shift=shift))(x_T)
  assert relative_error(x0, x_ref.numpy()) < 1e-5


@pytest.mark.parametrize("sampler", flow.SAMPLERS)
def test_sampler_traces_the_velocity_once(sampler):
  _, jax_fn = fake_velocity()
  traces, reported = [], []

  def velocity_fn(x, t):
    traces.append(1)
    return jax_fn(x, t)

  run = jax.jit(lambda x: flow.sample(velocity_fn, x, sampler=sampler, num_steps=50,
                                      progress_callback=lambda done, total: reported.append((done, total))))
  run(flow.initial_noise(0, X_SHAPE)).block_until_ready()
  run(flow.initial_noise(1, X_SHAPE)).block_until_ready()
  jax.effects_barrier()
  assert len(traces) == 1
  assert sorted(reported) == sorted([(i, 50) for i in range(1, 51)] * 2)


def test_guidance_is_one_batched_forward():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)
  calls = []

  def model_fn(x, t, context):
    calls.append(x.shape[0])
    scale = context["text"].mean(axis=(1, 2)) + t / 1000  # per-example, so a mixed-up batch would show
    return jnp.einsum("dc,bc...->bd...", w, x) * scale.reshape(-1, 1, 1, 1, 1) + context["bias"].reshape(-1, 1, 1, 1, 1)

  cond = {"text": jnp.asarray(rng.standard_normal((2, 7, 3)), jnp.float32), "bias": jnp.array([1.0, 2.0])}
  uncond = {"text": jnp.asarray(rng.standard_normal((2, 7, 3)), jnp.float32), "bias": jnp.array([-1.0, 0.5])}
  x = flow.initial_noise(0, X_SHAPE)
  t = jnp.array([999.0, 500.0])

  v = flow.guided_velocity(model_fn, cond, uncond, 5.0)(x, t)
  assert calls == [4]
  v_c, v_u = model_fn(x, t, cond), model_fn(x, t, uncond)
  np.testing.assert_allclose(v, v_u + 5.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)

  calls.clear()
  np.testing.assert_array_equal(flow.guided_velocity(model_fn, cond, uncond, 1.0)(x, t), v_c)
  assert calls == [2]  # scale 1: the conditional pass only

  with pytest.raises(ValueError, match="same structure and shapes"):
    flow.guided_velocity(model_fn, cond, {"text": cond["text"][:, :5], "bias": cond["bias"]}, 5.0)


def test_initial_noise_and_bad_arguments():
  a, b = flow.initial_noise(7, (2, 3)), flow.initial_noise(7, (2, 3))
  np.testing.assert_array_equal(a, b)
  assert a.dtype == jnp.float32 and not np.array_equal(a, flow.initial_noise(8, (2, 3)))
  with pytest.raises(ValueError, match="unknown sampler"):
    flow.sample(lambda x, t: x, a, sampler="ddim")
  with pytest.raises(ValueError, match="positive integer"):
    flow.euler_sigmas(0)
