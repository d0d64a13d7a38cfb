"""Flow matching for Wan DiTs: the training objective and the samplers. Pure JAX, no model.

Convention (rectified flow, as Wan and the T3-Video release use it): a noise level sigma in
[0, 1] mixes data x0 and Gaussian noise eps as

  x_sigma = (1 - sigma) * x0 + sigma * eps,      velocity v = eps - x0,

and the DiT takes the timestep t = 1000 * sigma. Sampling integrates dx/dsigma = v from
sigma = 1 (noise) down to sigma = 0.

Schedules shift a uniform grid u in [0, 1] with shift s:  sigma = s * u / (1 + (s - 1) * u).

Where the numbers come from:
- Training and the Euler sampler follow the T3-Video release (github zhangzjn/T3-Video,
  `diffsynth/schedulers/flow_match.py`, DiffSynth-Studio's `FlowMatchScheduler` built as
  `FlowMatchScheduler(shift=5, sigma_min=0.0, extra_one_step=True)` in
  `diffsynth/pipelines/wan_video_new.py`). It computes the schedule in float32 torch on the CPU;
  `euler_sigmas` and `training_sigmas` reproduce those float32 values bit for bit.
- UniPC follows Wan's `FlowUniPCMultistepScheduler` (Wan2.1/Wan2.2 `wan/utils/fm_solvers_unipc.py`,
  order 2, bh2, x0-prediction, lower order on the final step, built with shift=1 then
  `set_timesteps(steps, shift=shift)` as Wan's `generate` does). Its update is the same as
  diffusers' `UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")`.

Samplers run as one `jax.lax.fori_loop` over the steps: the velocity function is traced once,
whatever the number of steps, and the solver's history rides in the loop carry. Schedules are
NumPy constants computed when tracing, so `num_steps`, `shift` and `sampler` are static.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]

NUM_TRAIN_TIMESTEPS = 1000
SAMPLERS = ("euler", "unipc")


# ----------------------------------------------------------------------------------------------
# Schedules (host side, NumPy)
# ----------------------------------------------------------------------------------------------


def _fma_f32(a, b, c) -> np.ndarray:
  """float32(a * b + c) with a single rounding, as torch's FMA-compiled CPU kernels compute it."""
  a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
  product = a * b  # exact: two 24-bit significands fit in float64's 53
  total = product + c
  # TwoSum: `error` is what rounding `total` to float64 lost, so total + error == a * b + c.
  z = total - product
  error = (product - (total - z)) + (c - z)
  result = total.astype(np.float32)
  # Rounding twice (to float64, then to float32) differs from rounding once only when `total`
  # lands exactly halfway between two float32 values; then the lost error picks the side.
  neighbour = np.nextafter(result, np.where(error > 0, np.inf, -np.inf).astype(np.float32))
  halfway = (result.astype(np.float64) + neighbour.astype(np.float64)) / 2 == total
  return np.where(halfway & (error != 0), neighbour, result)


def _torch_linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
  """`torch.linspace(start, stop, num)` in float32 on the CPU, bit for bit.

  torch fills the first half as start + step * i and the second half as stop - step * (num-1-i),
  each one fused multiply-add in its AVX2/AVX-512 kernels (checked against torch 2.13 for every
  num up to 3000; `ATEN_CPU_CAPABILITY=default` builds round twice and differ by an ulp here and
  there). The release builds its schedules this way.
  """
  start, stop = np.float32(start), np.float32(stop)
  step = (stop - start) / np.float32(num - 1) if num > 1 else np.float32(0)
  i = np.arange(num)
  first_half = _fma_f32(step, i.astype(np.float32), start)
  second_half = _fma_f32(-step, (num - 1 - i).astype(np.float32), stop)
  return np.where(i < num // 2, first_half, second_half).astype(np.float32)


def _release_sigmas(num: int, shift: float) -> np.ndarray:
  """The release's `FlowMatchScheduler.set_timesteps(num, shift=shift)` sigmas, float32 [num].

  sigma_min = 0 and extra_one_step=True: u = linspace(1, 0, num + 1)[:-1], then the shift, each
  operation in float32 as torch does it (Python scalars become float32 operands).
  """
  if not (isinstance(num, numbers.Integral) and num >= 1):
    raise ValueError(f"the number of steps must be a positive integer, got {num!r}")
  if not shift > 0:
    raise ValueError(f"shift must be positive, got {shift!r}")
  u = _torch_linspace_f32(1.0, 0.0, num + 1)[:-1]
  return (np.float32(shift) * u / (np.float32(1) + np.float32(shift - 1) * u)).astype(np.float32)


def training_sigmas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, shift: float = 5.0):
  """The training schedule: sigma = s*u/(1+(s-1)*u), u = linspace(1, 0, n+1)[:-1].

  Returns (sigmas, timesteps), float32 [num_train_timesteps] each, timesteps = 1000 * sigma
  (float32, as the release computes them).
  """
  sigmas = _release_sigmas(num_train_timesteps, shift)
  return sigmas, (sigmas * np.float32(NUM_TRAIN_TIMESTEPS)).astype(np.float32)


def training_weights(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, shift: float = 5.0) -> np.ndarray:
  """Loss weight per timestep index, float32 [num_train_timesteps].

  The release's formula over its float32 timesteps t: y = exp(-2 * ((t - n/2) / n)^2),
  y -= min(y), w = y * (n / sum(y)); so the weights average to 1. Computed in float64 and rounded
  once (torch's float32 exp and sum round differently: within 1e-6 relative of the release).
  """
  n = num_train_timesteps
  _, timesteps = training_sigmas(n, shift)
  t = timesteps.astype(np.float64)
  y = np.exp(-2.0 * ((t - n / 2) / n) ** 2)
  y -= y.min()
  return (y * (n / y.sum())).astype(np.float32)


def euler_sigmas(num_steps: int = 50, shift: float = 5.0):
  """The release's inference schedule for flow-match Euler.

  Returns (sigmas float32 [num_steps + 1], timesteps float32 [num_steps]): sigmas from
  u = linspace(1, 0, num_steps + 1)[:-1] shifted, then a final 0 (the last step lands on
  sigma = 0); timesteps = 1000 * sigma of each step, the DiT's input.
  """
  sigmas, timesteps = training_sigmas(num_steps, shift)
  return np.append(sigmas, np.float32(0)), timesteps


def unipc_sigmas(num_steps: int = 50, shift: float = 5.0):
  """Wan's UniPC schedule (`FlowUniPCMultistepScheduler(shift=1)` then `set_timesteps(n, shift=s)`).

  Returns (sigmas float32 [num_steps + 1], timesteps float32 [num_steps]). Wan starts from
  sigma_max = float32(0.999), its training table's largest sigma, not from 1:
  u = linspace(0.999, 0, n + 1)[:-1] in float64, shifted, then a final 0. Its timesteps are
  1000 * sigma truncated to integers (Wan feeds the DiT int64 timesteps), returned as floats.
  """
  if not (isinstance(num_steps, numbers.Integral) and num_steps >= 1):
    raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
  sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
  u = np.linspace(sigma_max, 0.0, num_steps + 1)[:-1]
  sigmas = shift * u / (1 + (shift - 1) * u)
  timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64).astype(np.float32)
  return np.append(sigmas, 0.0).astype(np.float32), timesteps


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def sample_training_batch(
    rng: jax.Array,
    x0: jax.Array,
    *,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    shift: float = 5.0,
    round_timesteps_to_bf16: bool = False,
):
  """Draws one noise level per example and builds the flow-matching regression problem.

  Args:
    rng: a JAX PRNG key.
    x0: clean latents [batch, ...] (any float dtype).
    round_timesteps_to_bf16: reproduce the release exactly: it casts the drawn timestep to its
      bf16 compute dtype and then takes sigma and weight at the float32 table's nearest entry
      (an argmin). Off: sigma, weight and timestep all come from the drawn index.

  Returns:
    (x_t, target, timestep, weight): x_t = (1 - sigma) x0 + sigma eps and target = eps - x0,
    float32 [batch, ...]; timestep = 1000 * sigma, the DiT's input, float32 [batch]; the loss
    weight, float32 [batch]. The index is uniform over [0, num_train_timesteps).
  """
  sigmas, timesteps = training_sigmas(num_train_timesteps, shift)
  weights = training_weights(num_train_timesteps, shift)
  sigmas, timesteps, weights = jnp.asarray(sigmas), jnp.asarray(timesteps), jnp.asarray(weights)

  batch = x0.shape[0]
  index_rng, noise_rng = jax.random.split(rng)
  index = jax.random.randint(index_rng, (batch,), 0, num_train_timesteps)
  timestep = timesteps[index]
  if round_timesteps_to_bf16:
    timestep = timestep.astype(jnp.bfloat16).astype(jnp.float32)
    index = jnp.argmin(jnp.abs(timesteps[None, :] - timestep[:, None]), axis=1)
  sigma = sigmas[index].reshape((batch,) + (1,) * (x0.ndim - 1))

  x0 = x0.astype(jnp.float32)
  eps = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  x_t = (1 - sigma) * x0 + sigma * eps
  return x_t, eps - x0, timestep, weights[index]


def flow_matching_loss(pred: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
  """mean over the batch of weight * MSE(pred, target), the MSE per example in float32.

  pred, target [batch, ...]; weight [batch]. With batch 1 this is the release's
  `mse_loss(pred.float(), target.float()) * training_weight(t)`.
  """
  error = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  per_example = jnp.mean(error.reshape(error.shape[0], -1), axis=1)
  return jnp.mean(per_example * weight.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------
# Solvers: one step each, given the velocity at the current sample
# ----------------------------------------------------------------------------------------------


def euler_step(x: jax.Array, v: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
  """x <- x + v * (sigma_next - sigma), in x's dtype."""
  return (x + v * (sigma_next - sigma)).astype(x.dtype)


class UniPCCoefficients(NamedTuple):
  """Per-step weights of UniPC-2 (bh2, x0-prediction) on a flow schedule; float32 [num_steps] each.

  UniPC is linear in the sample and the x0-predictions m = x - sigma * v, so each step is
  a weighted sum whose weights depend on the schedule only. At step i, with m the new
  x0-prediction and m_prev, m_prev2 those of steps i-1, i-2:
    corrector (UniC):  x <- c_x x + c_last last + c_prev m_prev + c_prev2 m_prev2 + c_new m
    predictor (UniP):  x_next <- p_x x + p_new m + p_prev m_prev
  `last` is the corrected sample the previous predictor started from; step 0 has no corrector.
  """

  sigma: np.ndarray
  c_x: np.ndarray
  c_last: np.ndarray
  c_prev: np.ndarray
  c_prev2: np.ndarray
  c_new: np.ndarray
  p_x: np.ndarray
  p_new: np.ndarray
  p_prev: np.ndarray


class UniPCState(NamedTuple):
  """The loop carry of UniPC: the sample and the history the multistep update needs."""

  x: jax.Array  # the sample the next velocity is evaluated at (not yet corrected)
  last: jax.Array  # the corrected sample of the previous step
  m_prev: jax.Array  # x0-prediction of the previous step
  m_prev2: jax.Array  # x0-prediction of the step before that


def _log_snr(sigma: float) -> float:
  """lambda = log(alpha / sigma) with alpha = 1 - sigma (flow matching)."""
  return np.log(1.0 - sigma) - np.log(sigma)


def _bh2(h: float):
  """UniPC's B(h) terms for bh2 and x0-prediction: h*phi_1, B(h), and b_1, b_2 of its 2x2 system."""
  hh = -h
  h_phi_1 = np.expm1(hh)
  b_h = np.expm1(hh)  # bh2: B(h) = e^{-h} - 1
  h_phi_k = h_phi_1 / hh - 1
  b1 = h_phi_k / b_h
  h_phi_k = h_phi_k / hh - 1 / 2
  b2 = h_phi_k * 2 / b_h
  return h_phi_1, b_h, b1, b2


def unipc_coefficients(sigmas: np.ndarray) -> UniPCCoefficients:
  """UniPC-2 weights for a schedule sigmas [num_steps + 1] (decreasing, last one 0), in float64.

  The order schedule is diffusers'/Wan's for solver_order=2, lower_order_final=True: the
  predictor is first order at the first step (no history yet) and at the last step, second
  order in between; the corrector at step i uses the order of predictor i - 1.
  """
  s = np.asarray(sigmas, np.float64)
  n = len(s) - 1
  if n < 1 or s[-1] != 0 or np.any(s[:-1] <= 0) or np.any(np.diff(s) >= 0):
    raise ValueError("UniPC needs sigmas decreasing to a final 0, all others positive")
  order = [1 if i == 0 or i == n - 1 else 2 for i in range(n)]
  lam = [_log_snr(x) for x in s[:-1]]  # sigma = 0 (lambda = inf) is only ever a target, below
  coef = {k: np.zeros(n) for k in UniPCCoefficients._fields}
  coef["sigma"] = s[:-1]

  for i in range(n):
    # UniC: correct the sample of step i, predicted from step i-1, with the new x0-prediction.
    if i == 0:
      coef["c_x"][i] = 1.0
    else:
      alpha_t = 1.0 - s[i]
      h = lam[i] - lam[i - 1]
      h_phi_1, b_h, b1, b2 = _bh2(h)
      if order[i - 1] == 1:
        rho_prev, rho_new, rk = 0.0, 0.5, 1.0
      else:
        rk = (lam[i - 2] - lam[i - 1]) / h
        rho_prev, rho_new = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([b1, b2]))
      # x = s_t/s_0 last - a_t h_phi_1 m0 - a_t B(h) (rho_prev (m1 - m0) / rk + rho_new (m - m0))
      coef["c_last"][i] = s[i] / s[i - 1]
      coef["c_prev"][i] = -alpha_t * h_phi_1 + alpha_t * b_h * (rho_prev / rk + rho_new)
      coef["c_prev2"][i] = -alpha_t * b_h * rho_prev / rk
      coef["c_new"][i] = -alpha_t * b_h * rho_new

    # UniP: predict the sample at sigma_{i+1}.
    if s[i + 1] == 0:
      # lambda = inf: e^{-h} = 0, so the first-order update returns the x0-prediction itself.
      assert order[i] == 1, "the step onto sigma = 0 is first order (lower_order_final)"
      coef["p_new"][i] = 1.0
      continue
    alpha_t = 1.0 - s[i + 1]
    h = _log_snr(s[i + 1]) - lam[i]
    h_phi_1, b_h, _, _ = _bh2(h)
    coef["p_x"][i] = s[i + 1] / s[i]
    coef["p_new"][i] = -alpha_t * h_phi_1
    if order[i] == 2:
      # - a_t B(h) * 0.5 * (m_prev - m) / rk: UniPC's fixed rho = 1/2 for the second order.
      rk = (lam[i - 1] - lam[i]) / h
      coef["p_new"][i] += alpha_t * b_h * 0.5 / rk
      coef["p_prev"][i] = -alpha_t * b_h * 0.5 / rk

  return UniPCCoefficients(**{k: v.astype(np.float32) for k, v in coef.items()})


def unipc_init(x_T: jax.Array) -> UniPCState:
  zeros = jnp.zeros_like(x_T)
  return UniPCState(x_T, zeros, zeros, zeros)


def unipc_step(state: UniPCState, v: jax.Array, i, coefficients: UniPCCoefficients) -> UniPCState:
  """One UniPC step, given the velocity v at state.x and the step index i (may be traced)."""
  c = jax.tree.map(lambda a: jnp.asarray(a)[i], coefficients)
  dtype = state.x.dtype
  m = (state.x - c.sigma * v).astype(dtype)  # x0-prediction
  x = (c.c_x * state.x + c.c_last * state.last + c.c_prev * state.m_prev + c.c_prev2 * state.m_prev2
       + c.c_new * m).astype(dtype)
  x_next = (c.p_x * x + c.p_new * m + c.p_prev * state.m_prev).astype(dtype)
  return UniPCState(x=x_next, last=x, m_prev=m, m_prev2=state.m_prev)


# ----------------------------------------------------------------------------------------------
# Sampling loop
# ----------------------------------------------------------------------------------------------


def sampling_schedule(sampler: str = "euler", num_steps: int = 50, shift: float = 5.0):
  """(sigmas [num_steps + 1], timesteps [num_steps]) of a sampler, float32 NumPy."""
  if sampler == "euler":
    return euler_sigmas(num_steps, shift)
  if sampler == "unipc":
    return unipc_sigmas(num_steps, shift)
  raise ValueError(f"unknown sampler {sampler!r}: use one of {SAMPLERS}")


def sample(
    velocity_fn: VelocityFn,
    x_T: jax.Array,
    *,
    sampler: str = "euler",
    num_steps: int = 50,
    shift: float = 5.0,
    progress_callback: Callable[[int, int], Any] | None = None,
) -> jax.Array:
  """Integrates from noise x_T (sigma = 1) to a sample (sigma = 0).

  Args:
    velocity_fn: (x [batch, ...], timestep float32 [batch]) -> v [batch, ...]. Traced once.
      For classifier-free guidance wrap the model with `guided_velocity`.
    x_T: the initial noise (`initial_noise`); its dtype is the loop's (float32 recommended;
      the release keeps its latents in bf16).
    sampler: "euler" (the T3-Video release's flow-match Euler) or "unipc" (Wan's default).
    num_steps, shift: static; the release uses 50 and 5.
    progress_callback: optional f(steps_done, num_steps), called from inside the loop through
      `jax.debug.callback` (unordered, so calls may arrive out of order). Off by default.

  Call it inside `jax.jit` (with the model's params and the text contexts as arguments of the
  jitted function, so they are not baked into the program as constants).
  """
  sigmas, timesteps = sampling_schedule(sampler, num_steps, shift)
  batch = x_T.shape[0]

  if sampler == "euler":
    sigmas_j = jnp.asarray(sigmas)
    init, step = (x_T,), lambda state, v, i: (euler_step(state[0], v, sigmas_j[i], sigmas_j[i + 1]),)
  else:
    coefficients = jax.tree.map(jnp.asarray, unipc_coefficients(sigmas))
    init, step = unipc_init(x_T), lambda state, v, i: unipc_step(state, v, i, coefficients)

  timesteps_j = jnp.asarray(timesteps)

  def body(i, state):
    v = velocity_fn(state[0], jnp.broadcast_to(timesteps_j[i], (batch,)))
    state = step(state, v, i)
    if progress_callback is not None:
      jax.debug.callback(lambda done: progress_callback(int(done), num_steps), i + 1, ordered=False)
    return state

  return jax.lax.fori_loop(0, num_steps, body, init)[0]


def guided_velocity(model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], cond_context, uncond_context,
                    scale: float) -> VelocityFn:
  """Classifier-free guidance as one batched forward: v = v_u + scale * (v_c - v_u).

  model_fn(x [B, ...], timestep [B], context) -> v [B, ...]; the contexts are arrays or pytrees
  of arrays [B, ...] of the same shapes (Wan pads text to 512 tokens). The conditional and
  unconditional passes run as one batch of 2B (conditional first). With scale == 1 only the
  conditional pass runs, as in the release.
  """
  if isinstance(scale, numbers.Real) and scale == 1:
    return lambda x, t: model_fn(x, t, cond_context)
  shapes = jax.tree.map(jnp.shape, (cond_context, uncond_context))
  if jax.tree.structure(cond_context) != jax.tree.structure(uncond_context) or shapes[0] != shapes[1]:
    raise ValueError(f"cond and uncond contexts must have the same structure and shapes, got {shapes}: pad both "
                     "to the same text length")
  context = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond_context, uncond_context)

  def velocity_fn(x, t):
    v = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), context)
    v_cond, v_uncond = jnp.split(v, 2, axis=0)
    return v_uncond + scale * (v_cond - v_uncond)

  return velocity_fn


def initial_noise(seed: int, shape, dtype=jnp.float32) -> jax.Array:
  """Standard normal noise x_T from an integer seed (JAX's PRNG: not the same numbers as torch's)."""
  return jax.random.normal(jax.random.key(seed), tuple(shape), dtype)
