"""The T3 retrofit in miniature: train full attention, switch to T3, fine-tune briefly.

  python benchmarks/retrofit_demo.py --out benchmarks/results/retrofit_demo.json

A small, honest CPU experiment that shows the mechanism of T3-Video (see docs/RETROFIT.md):

  phase A   a tiny Wan DiT learns synthetic latent videos with full self-attention until
            its loss flattens;
  switch    the same weights are evaluated with T3 window attention (and with the two
            single-scale ablations) without any training: the loss jumps;
  phase B   fine-tuning from the phase-A weights for a fraction of phase A's steps, one run
            per attention variant, all on the same batches, noise and timesteps:
              t3      mean of close-window and remote-window attention (the paper's retrofit)
              close   close (contiguous) windows only   (ablation)
              remote  remote (dilated) windows only     (ablation)
              full    full attention, kept training     (control: what more steps alone give)

Every number is a deterministic eval loss on a fixed held-out set (fixed videos, noise and
timesteps), the release's weighted flow-matching loss (t3_jax.diffusion.flow). float32 on the CPU.

Data: latent videos [16 channels, T frames, 16 x 16 latent pixels] made of a few Gaussian
blobs moving in straight lines (wrapping at the borders) over a travelling plane wave. Both
carry a channel code shared by the whole video: the class code (told by the paired "text"
context) plus a per-video perturbation that only the video itself reveals. Denoising a blob
thus needs local detail (its shape and position) and global context (the video's code, its
motion through time).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from typing import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from t3_jax.core import attention as attention_lib
from t3_jax.models import dit as dit_lib
from t3_jax.diffusion import flow
from t3_jax.core import windows
from t3_jax.parallel.layout import Layout

VARIANTS = ("t3", "close", "remote", "full")


# ------------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the experiment depends on (stored in the results JSON)."""
  # Data: latent videos [channels, frames, height, width], patch (1, 2, 2) -> tokens (T, H/2, W/2).
  channels: int = 16
  frames: int = 4
  height: int = 16
  width: int = 16
  num_classes: int = 8
  blobs: int = 3
  text_len: int = 8
  text_dim: int = 32
  # Model (a tiny Wan2.1-style DiT).
  dim: int = 64
  ffn_dim: int = 256
  num_heads: int = 2
  num_layers: int = 4
  # T3 schedule over the token grid (4, 8, 8), cycled by layer: the published roles in
  # miniature. (4,1,1): one frame per window (close == remote, as the published layer 0);
  # (1,2,2): windows (4,4,4), the whole time axis; (1,4,4): windows (4,2,2);
  # (2,2,2): windows (2,4,4), time split too.
  schedule: tuple = ((4, 1, 1), (1, 2, 2), (1, 4, 4), (2, 2, 2))
  # Optimisation (AdamW, weight decay and clipping as the release's trainer).
  batch: int = 8
  steps_a: int = 800
  lr_a: float = 1e-3
  warmup_a: int = 100
  final_lr_ratio_a: float = 0.1
  finetune_fraction: float = 0.25   # phase B steps = fraction * steps_a
  lr_b: float = 3e-4
  warmup_b: int = 25
  weight_decay: float = 1e-2
  clip_norm: float = 1.0
  # Evaluation: eval_videos held-out videos, each at one timestep of a stratified grid.
  eval_videos: int = 128
  eval_batch: int = 32
  eval_points_b: int = 5            # eval curve points during phase B (besides step 0)
  log_every: int = 100
  # Tests: XLA's backend optimisation level 0 (compiles about twice as fast) and the eval set
  # synthesised under jit (seconds faster; differs from eager synthesis in the last float bits).
  fast_compile: bool = False

  @property
  def steps_b(self) -> int:
    return max(1, int(round(self.finetune_fraction * self.steps_a)))

  @property
  def latent_shape(self) -> tuple[int, int, int, int]:
    return (self.channels, self.frames, self.height, self.width)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["schedule"] = [list(b) for b in self.schedule]
    d["steps_b"] = self.steps_b
    return d


TINY = dict(frames=2, height=8, width=8, num_classes=2, blobs=1, text_len=4, dim=24, ffn_dim=48,
            num_layers=2, schedule=((2, 1, 1), (1, 2, 2)), batch=2, steps_a=2, warmup_a=1,
            finetune_fraction=1.0, warmup_b=1, eval_videos=4, eval_batch=4, eval_points_b=1,
            log_every=1, fast_compile=True)


def _jit(fn, s: Settings, **kw):
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0} if s.fast_compile else None, **kw)


def dit_config(s: Settings) -> dit_lib.DiTConfig:
  return dit_lib.DiTConfig(dim=s.dim, ffn_dim=s.ffn_dim, num_heads=s.num_heads, num_layers=s.num_layers,
                           in_channels=s.channels, out_channels=s.channels, text_dim=s.text_dim,
                           freq_dim=64)


# ----------------------------------------------------------------------------------- data

_DATASET_KEY = 1234      # the class codes and "captions": fixed, shared by train and eval
_EVAL_KEY = 999_999      # the held-out set: videos, noise, timesteps


def dataset_constants(s: Settings):
  """Per class: a channel code for the blobs [K, C], one for the background wave [K, C],
  and a caption embedding [K, text_len, text_dim]."""
  k1, k2, k3 = jax.random.split(jax.random.key(_DATASET_KEY), 3)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  blob_code = unit(jax.random.normal(k1, (s.num_classes, s.channels)))
  wave_code = unit(jax.random.normal(k2, (s.num_classes, s.channels)))
  caption = jax.random.normal(k3, (s.num_classes, s.text_len, s.text_dim))
  return blob_code, wave_code, caption


def make_videos(key, batch: int, s: Settings):
  """Synthetic latent videos and their paired text context (pure JAX, jittable).

  Returns (x0 [batch, C, T, H, W] float32, context [batch, text_len, text_dim] float32).
  """
  blob_code, wave_code, caption = dataset_constants(s)
  C, T, H, W = s.latent_shape
  ks = jax.random.split(key, 9)
  label = jax.random.randint(ks[0], (batch,), 0, s.num_classes)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  # The video's code: its class's code plus a perturbation only the video itself shows.
  code = unit(blob_code[label] + 0.6 * unit(jax.random.normal(ks[1], (batch, C))))          # [B, C]
  wcode = unit(wave_code[label] + 0.6 * unit(jax.random.normal(ks[2], (batch, C))))         # [B, C]

  # Blobs: start anywhere, move in a straight line, wrap at the borders (a torus).
  size = jnp.array([H, W], jnp.float32)
  start = jax.random.uniform(ks[3], (batch, s.blobs, 2)) * size
  velocity = jax.random.uniform(ks[4], (batch, s.blobs, 2), minval=-1.5, maxval=1.5)
  width = jax.random.uniform(ks[5], (batch, s.blobs), minval=1.0, maxval=2.2)
  amp = jax.random.uniform(ks[6], (batch, s.blobs), minval=0.6, maxval=1.4) * 2.5
  t = jnp.arange(T, dtype=jnp.float32)
  centre = start[:, :, None] + velocity[:, :, None] * t[None, None, :, None]               # [B, n, T, 2]
  yy, xx = jnp.meshgrid(jnp.arange(H, dtype=jnp.float32), jnp.arange(W, dtype=jnp.float32), indexing="ij")
  pos = jnp.stack([yy, xx], -1)                                                            # [H, W, 2]
  d = pos[None, None, None] - centre[:, :, :, None, None]                                  # [B, n, T, H, W, 2]
  d = jnp.mod(d + size / 2, size) - size / 2
  g = jnp.exp(-jnp.sum(d * d, -1) / (2 * width[:, :, None, None, None] ** 2))              # [B, n, T, H, W]
  blobs = jnp.sum(amp[:, :, None, None, None] * g, axis=1)                                 # [B, T, H, W]

  # Background: a plane wave travelling through time, random direction and phase per video.
  freq = jax.random.randint(ks[7], (batch, 2), -2, 3).astype(jnp.float32)
  freq = freq.at[:, 0].set(jnp.where(jnp.all(freq == 0, -1), 1.0, freq[:, 0]))
  phase, speed = jnp.split(jax.random.uniform(ks[8], (batch, 2), minval=0, maxval=2 * jnp.pi), 2, -1)
  arg = (2 * jnp.pi * (freq[:, None, None, None, 0] * yy / H + freq[:, None, None, None, 1] * xx / W)
         + phase[:, :, None, None] + 0.5 * speed[:, :, None, None] * t[None, :, None, None])
  wave = 0.8 * jnp.cos(arg)                                                                # [B, T, H, W]

  x0 = code[:, :, None, None, None] * blobs[:, None] + wcode[:, :, None, None, None] * wave[:, None]
  # About unit variance per element (sum over channels of code^2 is 1, spread over C channels).
  x0 = x0 * math.sqrt(C) / 1.07
  return x0.astype(jnp.float32), caption[label].astype(jnp.float32)


def eval_set(s: Settings):
  """The fixed held-out problem: (x_t, target, timestep, weight, context), deterministic.

  Video j gets the timestep index floor((j + 0.5) * 1000 / N): a stratified grid over the
  training distribution of timesteps, so the weighted mean is a low-variance estimate of
  the expected training loss.
  """
  kv, kn = jax.random.split(jax.random.key(_EVAL_KEY))
  videos = _jit(make_videos, s, static_argnums=(1, 2)) if s.fast_compile else make_videos
  x0, context = videos(kv, s.eval_videos, s)
  sigmas, timesteps = flow.training_sigmas()
  weights = flow.training_weights()
  n = flow.NUM_TRAIN_TIMESTEPS
  index = np.floor((np.arange(s.eval_videos) + 0.5) * n / s.eval_videos).astype(np.int64)
  sigma = jnp.asarray(sigmas[index]).reshape(-1, 1, 1, 1, 1)
  eps = jax.random.normal(kn, x0.shape, jnp.float32)
  x_t = (1 - sigma) * x0 + sigma * eps
  return x_t, eps - x0, jnp.asarray(timesteps[index]), jnp.asarray(weights[index]), context


# ------------------------------------------------------------------ attention variants

def _single_partition_attention(q, k, v, grid, blocks, remote: bool, implementation=None):
  """Softmax attention inside the close (or remote) windows only. [B, N, h, d] -> [B, N, h, d]."""
  grid, blocks = tuple(int(g) for g in grid), tuple(int(n) for n in blocks)
  if windows.is_padded(grid, blocks):
    raise ValueError(f"blocks {blocks} must divide grid {grid} for the single-partition ablations")
  split = windows.remote_windows if remote else windows.close_windows
  merge = windows.merge_remote_windows if remote else windows.merge_close_windows
  qw, kw, vw = (split(x, grid, blocks) for x in (q, k, v))   # [B, nw, L, h, d]
  fold = lambda x: x.reshape(-1, *x.shape[2:])
  out = attention_lib.attend(fold(qw), fold(kw), fold(vw), implementation=implementation)
  return merge(out.reshape(qw.shape), grid, blocks)


def close_only_attention(q, k, v, grid, blocks, implementation=None):
  """Ablation: close (contiguous) windows only; same signature as t3_attention."""
  return _single_partition_attention(q, k, v, grid, blocks, False, implementation)


def remote_only_attention(q, k, v, grid, blocks, implementation=None):
  """Ablation: remote (dilated) windows only; same signature as t3_attention."""
  return _single_partition_attention(q, k, v, grid, blocks, True, implementation)


@dataclasses.dataclass(frozen=True)
class SinglePartitionLayout(Layout):
  """One device, self-attention in one partition only (the ablations)."""
  remote: bool = False

  def self_attention(self, q, k, v, grid, blocks, implementation=None):
    return _single_partition_attention(q, k, v, grid, blocks, self.remote, implementation)


LAYOUTS: dict[str, Layout] = {"t3": Layout(), "close": SinglePartitionLayout(remote=False),
                              "remote": SinglePartitionLayout(remote=True)}


def build_model(s: Settings, variant: str, seed: int = 0) -> dit_lib.WanDiT:
  """A tiny WanDiT whose self-attention is `variant` (one of VARIANTS)."""
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  cfg = dit_config(s)
  if variant == "full":
    return dit_lib.WanDiT(cfg, attention="full", dtype=jnp.float32, param_dtype=jnp.float32,
                          rngs=nnx.Rngs(seed))
  return dit_lib.WanDiT(cfg, attention="t3", schedule=[tuple(b) for b in s.schedule],
                        layout=LAYOUTS[variant], dtype=jnp.float32,
                        param_dtype=jnp.float32, rngs=nnx.Rngs(seed))


# ------------------------------------------------------------------------- train / eval

def make_optimizer(s: Settings) -> optax.GradientTransformation:
  """AdamW without its learning rate (clip, Adam, decoupled weight decay): the step scales
  the update by a learning rate passed in, so one compiled step serves every schedule."""
  return optax.chain(optax.clip_by_global_norm(s.clip_norm), optax.scale_by_adam(),
                     optax.add_decayed_weights(s.weight_decay))


def lr_schedule(lr: float, warmup: int, steps: int, final_ratio: float) -> optax.Schedule:
  """Linear warm-up, then a cosine decay to final_ratio * lr (final_ratio 1: constant)."""
  warmup = max(1, warmup)
  warm = optax.linear_schedule(0.0, lr, warmup)
  if final_ratio < 1.0:
    main = optax.cosine_decay_schedule(lr, max(1, steps - warmup), alpha=final_ratio)
  else:
    main = optax.constant_schedule(lr)
  return optax.join_schedules([warm, main], [warmup])


def make_train_step(graphdef, s: Settings):
  """step(params, opt_state, key, lr) -> (params, opt_state, loss): synthesises the batch,
  draws timesteps and noise (flow.sample_training_batch), one AdamW update. Jitted."""
  tx = make_optimizer(s)

  def loss_fn(params, x_t, target, timestep, weight, context):
    pred = nnx.merge(graphdef, params)(x_t, timestep, context)
    return flow.flow_matching_loss(pred, target, weight)

  def step(params, opt_state, key, lr):
    data_key, noise_key = jax.random.split(key)
    x0, context = make_videos(data_key, s.batch, s)
    x_t, target, timestep, weight = flow.sample_training_batch(noise_key, x0)
    loss, grads = jax.value_and_grad(loss_fn)(params, x_t, target, timestep, weight, context)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    return params, opt_state, loss

  return _jit(step, s)


def make_eval_fn(graphdef, s: Settings):
  """eval(params, problem) -> {"loss": weighted flow-matching loss, "mse": unweighted}."""

  def chunk_errors(params, x_t, target, timestep, context):
    pred = nnx.merge(graphdef, params)(x_t, timestep, context)
    err = jnp.square(pred - target)
    return jnp.mean(err.reshape(err.shape[0], -1), axis=1)

  chunk_errors = _jit(chunk_errors, s)

  def evaluate(params, problem):
    x_t, target, timestep, weight, context = problem
    per_example = []
    for i in range(0, x_t.shape[0], s.eval_batch):
      sl = slice(i, i + s.eval_batch)
      per_example.append(chunk_errors(params, x_t[sl], target[sl], timestep[sl], context[sl]))
    per_example = np.asarray(jnp.concatenate(per_example), np.float64)
    return {"loss": float(np.mean(per_example * np.asarray(weight, np.float64))),
            "mse": float(np.mean(per_example))}

  return evaluate


@functools.lru_cache(maxsize=None)
def _programs(s: Settings, variant: str):
  """(train step, evaluate) of a variant, built once per process: each compiles once."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(s, variant)))
  return make_train_step(graphdef, s), make_eval_fn(graphdef, s)


def train(params, variant: str, steps: int, schedule: optax.Schedule, key, s: Settings, problem=None,
          eval_at: Sequence[int] = (), log: Callable = print, tag: str = ""):
  """Runs `steps` AdamW steps of `variant` from `params` (fresh optimizer state).

  Batch i uses jax.random.fold_in(key, i): every variant given the same key sees the same
  videos, timesteps and noise. Returns (params, curve [{"step", "loss", "mse"}] at eval_at,
  train_losses [steps], seconds of training excluding evaluation but including the first
  step's compilation when this variant's step is new to the process).
  """
  step_fn, evaluate = _programs(s, variant)
  opt_state = make_optimizer(s).init(params)
  curve, losses, seconds = [], [], 0.0
  eval_at = sorted(set(eval_at))
  if 0 in eval_at:
    curve.append({"step": 0, **evaluate(params, problem)})
  tick = time.perf_counter()
  for i in range(steps):
    params, opt_state, loss = step_fn(params, opt_state, jax.random.fold_in(key, i),
                                      jnp.float32(schedule(i)))
    losses.append(loss)
    if (i + 1) in eval_at or (i + 1) % s.log_every == 0:
      jax.block_until_ready(params)
      seconds += time.perf_counter() - tick
      recent = float(np.mean(np.asarray(losses[-s.log_every:])))
      msg = f"{tag} step {i + 1}/{steps} train loss (last {min(len(losses), s.log_every)}) {recent:.4f}"
      if (i + 1) in eval_at:
        curve.append({"step": i + 1, **evaluate(params, problem)})
        msg += f"  eval {curve[-1]['loss']:.4f}"
      log(msg)
      tick = time.perf_counter()
  jax.block_until_ready(params)
  seconds += time.perf_counter() - tick
  return params, curve, [float(x) for x in np.asarray(losses)], seconds


def run_seed(seed: int, s: Settings, problem=None, log: Callable = print,
             variants: Sequence[str] = VARIANTS) -> dict:
  """Phase A (full attention), the switch (zero-shot evals), phase B (one run per variant)."""
  if not variants or any(v not in VARIANTS for v in variants):
    raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got {tuple(variants)}")
  problem = eval_set(s) if problem is None else problem
  # Initialised under jit: the same bits as eager initialisation, seconds faster on the CPU.
  params = jax.jit(lambda: nnx.state(build_model(s, "full", seed)))()
  record: dict = {"seed": seed}

  # Phase A: full attention for steps_a steps, the lr decaying (cosine) to final_lr_ratio.
  evals_a = sorted({0, *range(s.steps_a // 4, s.steps_a + 1, max(1, s.steps_a // 4)), s.steps_a})
  sched = lr_schedule(s.lr_a, s.warmup_a, s.steps_a, s.final_lr_ratio_a)
  params, curve, losses, sec = train(params, "full", s.steps_a, sched, jax.random.key(10 * seed + 1), s,
                                     problem, evals_a, log, tag=f"[seed {seed}] A full")
  record["phase_a"] = {"curve": curve, "seconds": sec, "train_loss_last_10pct":
                       float(np.mean(losses[-max(1, len(losses) // 10):]))}

  # The switch: the same weights with every attention variant, no training.
  record["zero_shot"] = {v: _programs(s, v)[1](params, problem) for v in variants}
  log(f"[seed {seed}] zero-shot: " + "  ".join(f"{v} {r['loss']:.4f}" for v, r in record["zero_shot"].items()))

  # Phase B: brief fine-tunes from the phase-A weights, same batches for every variant.
  n = s.steps_b
  evals_b = sorted({0, *(int(round(n * (j + 1) / s.eval_points_b)) for j in range(s.eval_points_b))})
  key_b = jax.random.key(10 * seed + 2)
  record["phase_b"] = {}
  for variant in variants:
    sched = lr_schedule(s.lr_b, s.warmup_b, n, 1.0)
    _, curve, losses, sec = train(params, variant, n, sched, key_b, s, problem, evals_b, log,
                                  tag=f"[seed {seed}] B {variant}")
    record["phase_b"][variant] = {"curve": curve, "seconds": sec,
                                  "train_loss_last_10pct": float(np.mean(losses[-max(1, len(losses) // 10):]))}
  return record


# ------------------------------------------------------------------------------ summary

# (row name, stage, variant): stage "a" = end of phase A, "zero" = the switch, "b" = end of phase B.
ROWS = (("full attention after phase A", "a", "full"),
        ("T3 zero-shot (the switch)", "zero", "t3"),
        ("close-only zero-shot", "zero", "close"),
        ("remote-only zero-shot", "zero", "remote"),
        ("T3 after fine-tune", "b", "t3"),
        ("close-only after fine-tune", "b", "close"),
        ("remote-only after fine-tune", "b", "remote"),
        ("full attention continued", "b", "full"))


def _row_value(record: dict, stage: str, variant: str):
  if stage == "a":
    return record["phase_a"]["curve"][-1]["loss"]
  if stage == "zero":
    return record["zero_shot"].get(variant, {}).get("loss")
  run = record["phase_b"].get(variant)
  return run["curve"][-1]["loss"] if run else None


def summarise(records: Sequence[dict]) -> dict:
  """Per table row: per-seed eval losses, mean and std; the phase-B curves, mean over seeds;
  and per seed, each variant's gap to the full-attention run at the same phase-B step."""
  rows = {}
  for name, stage, variant in ROWS:
    values = [_row_value(r, stage, variant) for r in records]
    if any(v is None for v in values):
      continue  # a variant this run left out
    rows[name] = {"per_seed": values, "mean": float(np.mean(values)),
                  "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
  variants = [v for v in VARIANTS if v in records[0]["phase_b"]]
  curves, gaps = {}, {}
  for v in variants:
    steps = [p["step"] for p in records[0]["phase_b"][v]["curve"]]
    losses = np.array([[p["loss"] for p in r["phase_b"][v]["curve"]] for r in records])   # [seeds, points]
    curves[v] = {"step": steps, "loss_mean": losses.mean(0).tolist()}
    if "full" in records[0]["phase_b"]:
      full = np.array([[p["loss"] for p in r["phase_b"]["full"]["curve"]] for r in records])
      gaps[v] = {"step": steps, "gap_to_full_per_seed": (losses - full).tolist(),
                 "gap_to_full_mean": (losses - full).mean(0).tolist()}
  return {"table": rows, "phase_b_curves_mean": curves, "phase_b_gap_to_full": gaps}


def format_table(summary: dict, seeds: Sequence[int]) -> str:
  head = "| eval loss (weighted flow matching) | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |"
  lines = [head, "|" + "---|" * (len(seeds) + 2)]
  for name, row in summary["table"].items():
    lines.append(f"| {name} | " + " | ".join(f"{x:.4f}" for x in row["per_seed"]) + f" | {row['mean']:.4f} |")
  curves = summary["phase_b_curves_mean"]
  steps = next(iter(curves.values()))["step"]
  lines += ["", "| phase B step (mean eval loss) | " + " | ".join(str(x) for x in steps) + " |",
            "|" + "---|" * (len(steps) + 1)]
  for v, c in curves.items():
    lines.append(f"| {v} | " + " | ".join(f"{x:.4f}" for x in c["loss_mean"]) + " |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="benchmarks/results/retrofit_demo.json")
  p.add_argument("--seeds", default="0,1", help="comma-separated model/data seeds")
  p.add_argument("--steps-a", type=int, default=None, help="phase A steps (default Settings.steps_a)")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help=f"attention variants to evaluate zero-shot and fine-tune (subset of {','.join(VARIANTS)})")
  p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
  args = p.parse_args(argv)

  overrides = dict(TINY) if args.tiny else {}
  if args.steps_a is not None:
    overrides["steps_a"] = args.steps_a
  s = Settings(**overrides)
  seeds = [int(x) for x in args.seeds.split(",") if x]
  variants = tuple(v for v in args.variants.split(",") if v)
  start = time.perf_counter()
  problem = eval_set(s)
  records = []
  for seed in seeds:
    records.append(run_seed(seed, s, problem, variants=variants))
  wall = time.perf_counter() - start
  summary = summarise(records)
  result = {
      "settings": s.to_dict(),
      "seeds": seeds,
      "records": records,
      "summary": summary,
      "wall_seconds": wall,
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "jax": jax.__version__, "backend": jax.default_backend()},
  }
  print(format_table(summary, seeds))
  print(f"wall time {wall:.0f} s")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
