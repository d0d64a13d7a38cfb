"""Training: T3 fine-tuning of a Wan DiT with flow matching (full or LoRA).

The recipe is the paper's: AdamW (lr 2e-5, weight decay 1e-2, gradient clip 1.0), the
release's flow-matching loss and timestep weights (`t3_jax.diffusion.flow`), steps with a
non-finite loss or gradient skipped (and counted). `validate(config)` checks a training
config's values, once, before anything is built.

Train state, a plain pytree (what the Orbax checkpoint holds):
  step      int32    steps taken (skipped ones included: data and RNG move on)
  params    trained parameters, fp32 master copy (LoRA: the adapters only)
  opt_state optax AdamW state, sharded like params
  rng       uint32[2] base key; step s uses fold_in(rng, s), so a resume is exact
  skipped   int32    steps skipped for a non-finite loss or gradient

The step: microbatches (gradient accumulation) in a `lax.scan`, compute in the
model's dtype (bf16 for real use), rematerialisation per layer by the model's policy,
`jax.jit` with explicit in/out shardings over one mesh (t3_jax.parallel).

Checkpoints: Orbax CheckpointManager under workdir/checkpoints/<step>/ (async,
keep-N): the train state, the grain iterator's position and a JSON of the run
(t3_jax.training.workdir). Saved every `checkpoint.every` steps, at the end and on
preemption (SIGTERM): with several processes all of them stop at the step that JAX's
preemption sync manager agrees on (`CheckpointManager.reached_preemption`, no collective of
ours per step). A run in a workdir that holds checkpoints resumes from the latest; its
metrics (metrics.jsonl, TensorBoard events) continue from that step, each step once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from t3_jax.core import schedule as schedule_lib
from t3_jax.diffusion import flow
from t3_jax.logs import log
from t3_jax.models import dit as dit_lib
from t3_jax.models import vae as vae_lib
from t3_jax.parallel import mesh as mesh_lib
from t3_jax.parallel.layout import Layout
from t3_jax.training import lora as lora_lib
from t3_jax.training import workdir as workdir_lib
from t3_jax.training.workdir import checkpoint_manager, load_trained_params  # noqa: F401  (the trainer's API)


# Dense bf16 peak FLOP/s per device, for the MFU estimate (matched on device_kind).
PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("H20", 148e12),
              ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
              ("TPU v6", 918e12), ("TPU v4", 275e12))


def _dtype(name):
  return jnp.dtype(name) if name is not None else None


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return flops
  return None


# ----------------------------------------------------------------------------- model

def dit_config(config) -> dit_lib.DiTConfig:
  """The DiT architecture: a preset name, with optional field overrides."""
  base = dit_lib.DiTConfig.preset(config.model.preset)
  overrides = dict(config.model.get("overrides", None) or {})
  return dit_lib.DiTConfig.from_dict({**base.to_dict(), **overrides}) if overrides else base


def latent_shape(config, dit_cfg: dit_lib.DiTConfig) -> tuple[int, int, int, int]:
  """[C, F, H, W] latents of a (frames, height, width) video through Wan's VAE."""
  vae_cfg = vae_lib.get_config(dit_cfg.family)  # the DiT family's VAE
  st, sh, sw = vae_cfg.temporal_stride, vae_cfg.spatial_stride, vae_cfg.spatial_stride
  d = config.data
  if (d.frames - 1) % st or d.height % sh or d.width % sw:
    raise ValueError(f"video {d.frames}x{d.height}x{d.width} doesn't fit the VAE stride {(st, sh, sw)}: "
                     f"frames = 1 + {st}k, height and width multiples of {sh}")
  return (dit_cfg.in_channels, (d.frames - 1) // st + 1, d.height // sh, d.width // sw)


TRAINING_GROUPS = ("total_steps", "batch_size", "data", "flow", "optimizer", "lora", "mesh", "checkpoint")


def validate(config) -> None:
  """Checks a training config's values in one place, before anything is built or read.

  Raises ValueError naming the field and the fix. What needs the devices (the mesh's sizes,
  the batch over the mesh and the processes) is checked where the mesh is built, and what needs
  files (init_checkpoint, data.path) where they are opened.
  """
  missing = [g for g in TRAINING_GROUPS if g not in config]
  if missing:
    raise ValueError(f"config variant {config.get('variant')!r} is not a training config (it has no "
                     f"{', '.join(missing)}): train with configs/t3_wan.py:stage1, :stage2 or :stage2_lora "
                     "(Wan2.1-T2V-1.3B), :5b_stage1, :5b_stage2 or :5b_stage2_lora (Wan2.2-TI2V-5B), or :tiny")
  m, d, opt, lora, ck = config.model, config.data, config.optimizer, config.lora, config.checkpoint
  fields = {f.name for f in dataclasses.fields(dit_lib.DiTConfig)}
  unknown = sorted(set(m.get("overrides", None) or {}) - fields)

  def positive_int(name, value, minimum=1):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
      raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

  positive_int("total_steps", config.total_steps)
  positive_int("batch_size", config.batch_size)
  positive_int("microbatches", config.microbatches, 0)  # 0: one example per batch shard per forward
  positive_int("log_every", config.log_every)
  positive_int("data.text_len", d.text_len)
  positive_int("data.prefetch", d.get("prefetch", 2), 0)
  positive_int("optimizer.warmup_steps", opt.warmup_steps, 0)
  positive_int("lora.rank", lora.rank, 0)
  positive_int("checkpoint.every", ck.every, 0)
  positive_int("checkpoint.keep", ck.keep)
  if not 0 <= int(config.seed) < 2**32:
    raise ValueError(f"seed must lie in [0, 2**32), got {config.seed}")
  if unknown:
    raise ValueError(f"model.overrides has unknown DiT fields {unknown}: use fields of t3_jax.models.dit.DiTConfig")
  if m.attention not in ("t3", "full"):
    raise ValueError(f"model.attention must be 't3' or 'full', got {m.attention!r}")
  if m.get("schedule") is not None:
    schedule_lib.parse_schedule(m.schedule)
  for name in ("dtype", "param_dtype"):
    try:
      jnp.dtype(m[name])
    except TypeError:
      raise ValueError(f"model.{name} {m[name]!r} is not a dtype: use e.g. 'bfloat16' or 'float32'") from None
  if m.remat not in dit_lib.REMAT_POLICIES:
    raise ValueError(f"model.remat must be one of {sorted(dit_lib.REMAT_POLICIES)}, got {m.remat!r}")
  latent_shape(config, dit_config(config))  # the preset exists and the video fits its VAE
  if d.kind not in ("synthetic", "latents"):
    raise ValueError(f"data.kind must be 'synthetic' or 'latents', got {d.kind!r}")
  if not config.flow.shift > 0:
    raise ValueError(f"flow.shift must be > 0, got {config.flow.shift}")
  if opt.schedule not in ("constant", "cosine"):
    raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {opt.schedule!r}")
  if not opt.lr > 0 or opt.weight_decay < 0 or opt.clip_norm < 0:
    raise ValueError(f"optimizer: lr must be > 0, weight_decay and clip_norm >= 0 (got {opt.lr}, "
                     f"{opt.weight_decay}, {opt.clip_norm})")
  if lora.rank:
    lora_lib.parse_targets(lora.targets)
    if not lora.alpha > 0:
      raise ValueError(f"lora.alpha must be > 0, got {lora.alpha}")


def build_model(config, abstract: bool = True, mesh: Mesh | None = None):
  """(WanDiT, DiTConfig): abstract (ShapeDtypeStruct parameters) unless abstract=False.
  With a mesh the DiT is laid out over it (Layout: examples over data x fsdp, tokens over
  sequence) and its attention kernel is chosen for the mesh's devices."""
  cfg = dit_config(config)
  m = config.model
  layout = None if mesh is None else Layout(mesh, relayout=config.mesh.get("relayout", "auto"),
                                            collective=config.mesh.get("collective", "auto"))

  def make(seed=0):
    return dit_lib.WanDiT(cfg, attention=m.attention, schedule=m.get("schedule"), dtype=_dtype(m.dtype),
                          param_dtype=_dtype(m.param_dtype), remat=m.remat,
                          implementation=m.get("implementation", None), layout=layout, rngs=nnx.Rngs(seed))

  return (nnx.eval_shape(make) if abstract else make(config.seed)), cfg


def model_flops_per_example(model, cfg: dit_lib.DiTConfig, lshape, text_len: int) -> float:
  """Forward + backward FLOPs of one example (3x the forward: the usual MFU convention,
  rematerialisation not counted), from the schedule's MAC count."""
  grid = model.token_grid((1, *lshape))
  macs = schedule_lib.model_macs(cfg, grid, model.layer_schedule(grid), text_len=text_len)["total"]
  return 3 * 2 * float(macs)


# ------------------------------------------------------------------------- optimizer

def learning_rate_schedule(opt, total_steps: int) -> optax.Schedule:
  warmup = int(opt.warmup_steps)
  if opt.schedule == "constant":
    main = optax.constant_schedule(opt.lr)
  elif opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(opt.lr, max(1, total_steps - warmup), alpha=opt.get("final_lr_ratio", 0.0))
  else:  # validate() allows only these two
    raise AssertionError(opt.schedule)
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup), main], [warmup])


def make_optimizer(opt, total_steps: int):
  schedule = learning_rate_schedule(opt, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(opt.clip_norm) if opt.clip_norm else optax.identity(),
      optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay))
  return tx, schedule


# ------------------------------------------------------------------------ shardings

def state_shardings(abstract_state, mesh: Mesh, tx=None, logical=None):
  """Params and optimizer moments sharded alike; the step counters and the RNG key replicated.

  logical: the params' logical axis names (`dit.param_logical_axes`; with `tx`, the optimizer
  moments follow them); None: the largest dimension that divides (LoRA adapters)."""
  replicated = mesh_lib.replicated(mesh)
  out = {k: jax.tree.map(lambda _: replicated, v) for k, v in abstract_state.items()}
  out["params"] = mesh_lib.param_shardings(abstract_state["params"], mesh, logical)
  if logical is None:
    out["opt_state"] = mesh_lib.param_shardings(abstract_state["opt_state"], mesh)
  else:
    out["opt_state"] = optax.tree_map_params(tx, lambda _, s: s, abstract_state["opt_state"], out["params"],
                                             transform_non_params=lambda _: replicated)
  return out


def _global_batch(local: dict, shardings: dict, rows=None, global_batch: int | None = None) -> dict:
  """This process's numpy batch -> global arrays on the mesh, each device given the rows it holds.

  local: arrays [len(rows), ...], rows `rows` of a global batch of `global_batch` (default:
  all rows of a batch of their length, one process)."""
  count = len(next(iter(local.values())))
  rows = tuple(range(count)) if rows is None else tuple(rows)
  global_batch = global_batch or count
  position = {r: i for i, r in enumerate(rows)}

  def global_array(x, sharding):
    def pick(index):  # the rows (and the rest of the index) one device holds
      picked = x[[position[r] for r in range(*index[0].indices(global_batch))]]
      return picked[(slice(None), *index[1:])]
    return jax.make_array_from_callback((global_batch, *x.shape[1:]), sharding, pick)

  return {k: global_array(local[k], shardings[k]) for k in shardings}


# ------------------------------------------------------------------------- the step

def make_train_step(graphdef, tx, schedule, config, mesh: Mesh | None, lora_alpha: float | None,
                    microbatches: int | None = None):
  """step(state, frozen, batch) -> (state, metrics).

  frozen: the base parameters when training LoRA adapters, else {}.
  batch: {"latents": [B, C, F, H, W], "context": [B, L, text_dim]}; B = microbatches * micro.
  microbatches: gradient accumulation steps (default config.microbatches).
  """
  accum = int(microbatches or config.microbatches)
  shift = float(config.flow.shift)
  round_bf16 = bool(config.flow.get("round_timesteps_to_bf16", False))

  def noisy_inputs(keys, latents):
    """One noise level and noise draw per example, from that example's key."""
    def one(key, x0):
      x_t, target, timestep, weight = flow.sample_training_batch(
          key, x0[None], shift=shift, round_timesteps_to_bf16=round_bf16)
      return x_t[0], target[0], timestep[0], weight[0]
    return jax.vmap(one)(keys, latents)

  def loss_fn(trainable, frozen, micro):
    params = lora_lib.apply_lora(frozen, trainable, lora_alpha) if lora_alpha is not None else trainable
    x_t, target, timestep, weight = noisy_inputs(micro["keys"], micro["latents"])
    model = nnx.merge(graphdef, params)
    pred = model(x_t, timestep, micro["context"])
    return flow.flow_matching_loss(pred, target, weight)

  grad_fn = jax.value_and_grad(loss_fn)

  def step(state, frozen, batch):
    # Example i of step s draws its noise from fold_in(fold_in(rng, s), i): the same numbers
    # whatever the mesh or the microbatch split, so both change nothing but rounding.
    rng = jax.random.fold_in(state["rng"], state["step"])
    batch = {"latents": batch["latents"], "context": batch["context"],
             "keys": jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch["latents"].shape[0]))}
    params = state["params"]
    if accum == 1:
      loss, grads = grad_fn(params, frozen, batch)
    else:
      # Example j*A + a goes to microbatch a: each device's rows split evenly, no reshuffle.
      micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, accum, *x.shape[1:]), 0, 1), batch)

      def body(carry, mb):
        loss, grads = grad_fn(params, frozen, mb)
        total, acc = carry
        return (total + loss, jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
      loss = loss / accum
      grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grads, params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    def keep(new, old):
      return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    applied = state["step"] - state["skipped"]  # optax's step count: skipped steps don't advance it
    new_state = {
        "step": state["step"] + 1,
        "params": keep(new_params, params),
        "opt_state": keep(opt_state, state["opt_state"]),
        "rng": state["rng"],
        "skipped": state["skipped"] + (~finite).astype(jnp.int32),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(applied),
               "skipped": new_state["skipped"], "finite": finite}
    return new_state, metrics

  return step


# ------------------------------------------------------------------------ the trainer

class _Preemption:
  """Whether to save and stop after a step, the same step on every process.

  With several processes, JAX's preemption sync manager (started by jax.distributed, with its
  own SIGTERM notifier) picks a step that every process reaches, and
  `CheckpointManager.reached_preemption` says when it is here: no collective of ours per step.
  A single process catches SIGTERM itself and stops after the step in flight.
  """

  def __init__(self, mngr: ocp.CheckpointManager):
    self.mngr = mngr
    self.requested = False
    self._previous = None
    self._synced = jax.process_count() > 1

  def __enter__(self):
    if self._synced:  # the sync manager's notifier holds SIGTERM: a handler here would replace it
      return self

    def handler(signum, frame):
      self.requested = True
      log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler (say so)
      log.warning("not in the main thread: SIGTERM will not save a checkpoint")
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    """True when the run should save `step` and stop (every process gets the same answer)."""
    return self.mngr.reached_preemption(step) if self._synced else self.requested


@dataclasses.dataclass
class TrainProgram:
  """The jitted train step and the abstract, sharded arguments it is compiled for: everything
  but weights and data (what `Trainer` runs, and what a compile-only fit check lowers)."""
  model: Any                 # the WanDiT, abstract
  dit_cfg: dit_lib.DiTConfig
  graphdef: Any
  tx: Any
  lr_schedule: Any
  lora_alpha: float | None
  latent_shape: tuple
  global_batch: int
  microbatches: int          # gradient accumulation steps, resolved (config 0: one example per batch shard)
  abstract_state: dict       # ShapeDtypeStructs carrying their shardings
  state_sharding: dict
  frozen_abstract: dict      # the frozen base parameters under LoRA (unsharded structs), else {}
  frozen_sharding: dict
  batch_sharding: dict
  batch_spec: dict           # {"latents": [B, C, F, H, W], "context": [B, L, text_dim]} with shardings
  step: Any                  # jitted (state, frozen, batch) -> (state, metrics)
  flops_per_step: float

  def lower(self):
    """The step lowered for its abstract arguments (no device memory is touched)."""
    frozen = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          self.frozen_abstract, self.frozen_sharding)
    return self.step.lower(self.abstract_state, frozen, self.batch_spec)


def train_program(config, mesh: Mesh) -> TrainProgram:
  """Builds the train step of `config` on `mesh` (its devices may be abstract: nothing is allocated)."""
  validate(config)
  model, dit_cfg = build_model(config, mesh=mesh)
  lshape = latent_shape(config, dit_cfg)
  graphdef, abstract_params = nnx.split(model)
  abstract_params = nnx.to_pure_dict(abstract_params)
  tx, lr_schedule = make_optimizer(config.optimizer, int(config.total_steps))

  lora = config.get("lora", None)
  lora_alpha = None
  if lora is not None and lora.rank:
    lora_alpha = float(lora.alpha)
    frozen_abstract = abstract_params
    trainable_abstract = jax.eval_shape(
        lambda: lora_lib.init_lora(jax.random.key(0), abstract_params, lora.rank, lora.targets))
  else:
    frozen_abstract = {}
    trainable_abstract = abstract_params

  key = jax.random.PRNGKey(config.seed)
  abstract_state = {
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "params": trainable_abstract,
      "opt_state": jax.eval_shape(tx.init, trainable_abstract),
      "rng": jax.ShapeDtypeStruct(key.shape, key.dtype),
      "skipped": jax.ShapeDtypeStruct((), jnp.int32),
  }
  logical = dit_lib.param_logical_axes(model)
  state_sharding = state_shardings(abstract_state, mesh, tx, None if lora_alpha is not None else logical)
  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, state_sharding)
  frozen_sharding = mesh_lib.param_shardings(frozen_abstract, mesh, logical if frozen_abstract else None)

  d = config.data
  global_batch = int(config.batch_size)
  per_device = mesh_lib.axis_size(mesh, "batch")
  # microbatches 0: one example per batch shard per forward (the 4K jobs: memory for one video).
  microbatches = int(config.microbatches) or max(1, global_batch // per_device)
  if global_batch % (microbatches * per_device) or global_batch % jax.process_count():
    raise ValueError(f"batch_size {global_batch} must split into {microbatches} microbatches, each "
                     f"divisible by the {per_device} batch shards (data x fsdp) and by {jax.process_count()} processes")
  batch_spec = {"latents": jax.ShapeDtypeStruct((global_batch, *lshape), jnp.float32),
                "context": jax.ShapeDtypeStruct((global_batch, d.text_len, dit_cfg.text_dim), jnp.float32)}
  batch_sharding = mesh_lib.batch_shardings(batch_spec, mesh)
  batch_spec = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), batch_spec, batch_sharding)

  step_fn = make_train_step(graphdef, tx, lr_schedule, config, mesh, lora_alpha, microbatches)
  step = jax.jit(step_fn, in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                 out_shardings=(state_sharding, mesh_lib.replicated(mesh)), donate_argnums=(0,))
  flops = global_batch * model_flops_per_example(model, dit_cfg, lshape, d.text_len)
  return TrainProgram(model=model, dit_cfg=dit_cfg, graphdef=graphdef, tx=tx, lr_schedule=lr_schedule,
                      lora_alpha=lora_alpha, latent_shape=lshape, global_batch=global_batch, microbatches=microbatches,
                      abstract_state=abstract_state, state_sharding=state_sharding,
                      frozen_abstract=frozen_abstract, frozen_sharding=frozen_sharding,
                      batch_sharding=batch_sharding, batch_spec=batch_spec, step=step, flops_per_step=flops)


class Trainer:
  """Builds the model, mesh, optimizer, data and checkpointing from a ConfigDict and trains.

    trainer = Trainer(config, workdir); trainer.train()
  """

  def __init__(self, config, workdir: str, mesh: Mesh | None = None, loader=None):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.mesh = mesh if mesh is not None else mesh_lib.mesh_from_config(config.mesh)
    program = train_program(config, self.mesh)
    self.program = program
    self.model, self.dit_cfg, self.latent_shape = program.model, program.dit_cfg, program.latent_shape
    self.graphdef, self.tx, self.lr_schedule = program.graphdef, program.tx, program.lr_schedule
    self.lora = config.get("lora", None)
    self.lora_alpha = program.lora_alpha
    self.frozen_abstract = program.frozen_abstract
    self.abstract_state, self.state_sharding = program.abstract_state, program.state_sharding
    self.frozen_sharding, self.batch_sharding = program.frozen_sharding, program.batch_sharding
    self.global_batch, self.flops_per_step = program.global_batch, program.flops_per_step
    self.train_step = program.step
    # The rows of every global batch this process's devices hold (all of them on one host).
    self.rows = mesh_lib.batch_rows(self.batch_sharding["latents"], self.global_batch)[jax.process_index()]
    self.loader = loader if loader is not None else self._make_loader()

  # -- setup

  def _make_loader(self):
    from t3_jax.training import data as data_lib
    d = self.config.data
    prefetch = int(d.get("prefetch", 2))
    rows = dict(rows=self.rows, global_batch_size=self.global_batch)
    if d.kind == "synthetic":
      return data_lib.SyntheticLoader(self.latent_shape, len(self.rows), seed=self.config.seed,
                                      text_len=d.text_len, text_dim=self.dit_cfg.text_dim, prefetch=prefetch, **rows)
    if not d.path:
      raise ValueError("config.data.path is empty: prepare a dataset with `python -m t3_jax.training.data prepare ...` "
                       "and pass --config.data.path=DIR (or --config.data.kind=synthetic for a smoke test)")
    loader = data_lib.LatentLoader(d.path, len(self.rows), seed=self.config.seed, text_len=d.text_len,
                                   prefetch=prefetch, **rows)
    if tuple(loader.latent_shape) != tuple(self.latent_shape):
      loader.close()
      raise ValueError(f"{d.path} holds latents {loader.latent_shape}, the config's video makes {self.latent_shape}: "
                       "set data.frames/height/width to the prepared size")
    return loader

  def _load_base_params(self, abstract: dict) -> dict:
    """Pretrained DiT parameters (model.init_checkpoint), or a random init, sharded as the
    step takes them (the frozen base under LoRA, else the trained params)."""
    path = self.config.model.get("init_checkpoint", None)
    shardings = self.frozen_sharding if self.lora_alpha is not None else self.state_sharding["params"]
    if path:
      from t3_jax.weights import engine
      target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
      params, stored = engine.restore_params(dit_lib.WEIGHTS, path, target)
      mismatch = {k: (stored.get(k), v) for k, v in self.dit_cfg.to_dict().items()
                  if k in stored and stored[k] != v}
      if mismatch:
        raise ValueError(f"{path} holds a different DiT ({mismatch}): set model.preset to match the checkpoint")
      return params
    log.warning("model.init_checkpoint is empty: training from a random initialisation")
    from t3_jax.weights import engine
    return engine.random_params(abstract, seed=self.config.seed, shardings=shardings)

  def initial_state(self) -> tuple[dict, dict]:
    """(train state, frozen params) of a fresh run."""
    abstract_params = nnx.to_pure_dict(nnx.split(self.model)[1])
    base = self._load_base_params(abstract_params)
    if self.lora_alpha is not None:
      frozen = base
      shard = self.state_sharding["params"]
      lora = jax.jit(lambda: lora_lib.init_lora(jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 1),
                                                abstract_params, self.lora.rank, self.lora.targets),
                     out_shardings=shard)()
      params = lora
    else:
      frozen, params = {}, base
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding["opt_state"])(params)
    put = jax.device_put
    state = {"step": put(jnp.int32(0), self.state_sharding["step"]), "params": params, "opt_state": opt_state,
             "rng": put(jax.random.PRNGKey(self.config.seed), self.state_sharding["rng"]),
             "skipped": put(jnp.int32(0), self.state_sharding["skipped"])}
    return state, frozen

  def _run_info(self) -> dict:
    lora = None
    if self.lora_alpha is not None:
      lora = {"rank": int(self.lora.rank), "alpha": self.lora_alpha, "targets": list(lora_lib.parse_targets(self.lora.targets)),
              "base": self.config.model.get("init_checkpoint", None)}
    return {"dit_config": {**self.dit_cfg.to_dict(), "kind": "dit"}, "lora": lora,
            "config": json.loads(self.config.to_json_best_effort()), "latent_shape": list(self.latent_shape)}

  # -- the loop

  def train(self) -> list[dict]:
    """Trains to config.total_steps (resuming from the workdir's latest checkpoint).
    Returns the metrics of the steps run here."""
    cfg = self.config
    # A fresh run loads its weights first: a bad init_checkpoint leaves no workdir behind.
    try:
      fresh = None if os.path.isdir(os.path.join(self.workdir, "checkpoints")) else self.initial_state()
    except BaseException:
      self.loader.close()
      raise
    os.makedirs(self.workdir, exist_ok=True)
    mngr = checkpoint_manager(self.workdir, cfg)
    try:
      latest = mngr.latest_step()
      if latest is None:
        state, frozen = fresh if fresh is not None else self.initial_state()
      else:
        restored = mngr.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(self.abstract_state), data=ocp.args.JsonRestore()))
        state = restored["state"]
        self.loader.set_state(restored["data"])
        frozen = self._load_base_params(self.frozen_abstract) if self.lora_alpha is not None else {}
        log.info("resumed from %s at step %d", mngr.directory, latest)
      start = int(jax.device_get(state["step"]))
      history = self._loop(state, frozen, mngr, start, int(cfg.total_steps))
      mngr.wait_until_finished()
      return history
    finally:
      mngr.close()
      self.loader.close()

  def _save(self, mngr, step: int, state, force: bool = False):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=ocp.args.JsonSave(self.loader.get_state()),
                                            run=ocp.args.JsonSave(self._run_info())), force=force)

  def _loop(self, state, frozen, mngr, start: int, total: int) -> list[dict]:
    cfg = self.config
    main = jax.process_index() == 0
    every = int(cfg.checkpoint.every)
    tokens_per_step = self.global_batch * math.prod(self.model.token_grid((1, *self.latent_shape)))
    peak = peak_flops(jax.devices()[0])
    history = []
    progress = metrics_out = None
    with _Preemption(mngr) as preemption:
      if main:  # opened once SIGTERM is handled
        from tqdm import tqdm
        metrics_out = workdir_lib.MetricsWriter(self.workdir, start)
        progress = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True,
                        disable=not cfg.get("progress", True))
      try:
        last, last_step = time.perf_counter(), start  # the previous log record
        for step in range(start, total):
          local = next(self.loader)
          batch = _global_batch(local, self.batch_sharding, self.rows, self.global_batch)
          state, metrics = self.train_step(state, frozen, batch)
          done = step + 1
          record = None
          if done % cfg.log_every == 0 or done == total:
            metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            seconds = (now - last) / (done - last_step)  # per step since the previous record
            last, last_step = now, done
            record = {"step": done, "loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                      "skipped_steps": int(metrics["skipped"]), "steps_per_s": 1.0 / seconds,
                      "tokens_per_s": tokens_per_step / seconds,
                      "mfu": (self.flops_per_step / seconds / (jax.device_count() * peak)) if peak else None}
            if not metrics["finite"]:
              log.warning("step %d: non-finite loss or gradient, update skipped", done)
            history.append(record)
            if main:
              metrics_out.write(record)
          if progress is not None:
            if record is not None:  # drawn by update(), with the count it shows: `done`
              progress.set_postfix_str(f"step {done} loss {record['loss']:.4f} skipped {record['skipped_steps']}",
                                       refresh=False)
            progress.update(1)
          stop = preemption.reached(done)
          if stop or (every and done % every == 0) or (done == total and cfg.checkpoint.get("final", True)):
            self._save(mngr, done, state, force=stop)
          if stop:
            mngr.wait_until_finished()
            log.warning("preempted: checkpoint of step %d saved in %s", done, mngr.directory)
            break
      finally:
        if progress is not None:
          progress.close()
        if metrics_out is not None:
          metrics_out.close()
    self.state = state
    return history


def export_params(workdir: str, output: str, step: int | None = None, overwrite: bool = False) -> str:
  """Saves a full fine-tune's trained DiT as a plain checkpoint (`dit.load_dit` loads it)."""
  from t3_jax.weights import checkpoint as checkpoint_lib
  checkpoint_lib.check_output_dir(output, overwrite)  # before loading anything
  params, run = load_trained_params(workdir, step)
  if run.get("lora"):
    raise ValueError(f"{workdir} trained LoRA adapters: merge them with `python -m t3_jax.training.lora merge`")
  return checkpoint_lib.save_checkpoint(output, params, run["dit_config"], overwrite=overwrite)
