"""Training: resume after SIGTERM, two processes, LoRA, skipped non-finite steps, configs.

Runs of train.py are subprocesses that share one XLA compilation cache, so each distinct
step program compiles once per session.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import t3_wan  # noqa: E402

from t3_jax.weights import checkpoint  # noqa: E402
from t3_jax.models import dit  # noqa: E402
from t3_jax.training import lora  # noqa: E402
from t3_jax.training import trainer  # noqa: E402

STEPS = 6
TRAIN_ARGS = ["--config=configs/t3_wan.py:tiny", f"--config.total_steps={STEPS}", "--config.progress=False",
              "--config.checkpoint.every=100"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("xla_cache")
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
              XLA_FLAGS="")


def _train(workdir, env, extra=(), timeout=300):
  cmd = [sys.executable, "train.py", f"--workdir={workdir}", *TRAIN_ARGS, *extra]
  proc = subprocess.run(["timeout", "-s", "KILL", str(timeout), *cmd], cwd=ROOT, env=env,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [r["step"] for r in records], np.array([r["loss"] for r in records])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, env):
  """An uninterrupted tiny run of STEPS steps."""
  workdir = tmp_path_factory.mktemp("reference")
  _train(workdir, env)
  return workdir


def test_sigterm_then_resume_matches_uninterrupted(reference_run, tmp_path, env):
  steps, reference = _losses(reference_run)
  assert steps == list(range(1, STEPS + 1)) and np.all(np.isfinite(reference))

  workdir = tmp_path / "run"
  cmd = [sys.executable, "train.py", f"--workdir={workdir}", *TRAIN_ARGS]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"  # opened once the SIGTERM handler is installed
  deadline = time.time() + 240
  while not metrics.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)  # lands while the first step compiles
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  stopped, _ = _losses(workdir)
  assert 1 <= len(stopped) < STEPS, "the run should have stopped early on SIGTERM"
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [stopped[-1]]

  _train(workdir, env)  # resumes from the SIGTERM checkpoint
  steps, losses = _losses(workdir)
  assert steps == list(range(1, STEPS + 1))
  np.testing.assert_allclose(losses, reference, rtol=1e-6)


def test_two_processes_jax_distributed(reference_run, tmp_path, env):
  """Two CPU processes (one device each) train the tiny model with fsdp over both."""
  port = 20000 + os.getpid() % 20000
  workdir = tmp_path / "two"
  procs = []
  for i in range(2):
    cmd = ["timeout", "-s", "KILL", "300", sys.executable, "train.py", f"--workdir={workdir}", *TRAIN_ARGS,
           "--config.total_steps=2", "--config.mesh.fsdp=2", "--distributed",
           f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=330) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  steps, losses = _losses(workdir)  # written by process 0
  _, reference = _losses(reference_run)
  assert steps == [1, 2]
  np.testing.assert_allclose(losses, reference[:2], rtol=1e-5)
  assert (workdir / "checkpoints" / "2").is_dir()


def _tiny_config(**changes):
  config = t3_wan.get_config("tiny")
  config.progress = False
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_lora_trains_adapters_and_merges(tmp_path):
  # A base checkpoint to adapt (random weights stand in for the stage-1 model).
  config = _tiny_config()
  model, cfg = trainer.build_model(config, abstract=False)
  base = nnx.to_pure_dict(nnx.split(model)[1])
  base_dir = checkpoint.save_checkpoint(str(tmp_path / "base"), base, {**cfg.to_dict(), "kind": "dit"})

  config = _tiny_config(**{"model.init_checkpoint": base_dir, "lora.rank": 4, "lora.alpha": 8.0,
                           "total_steps": 3, "checkpoint.every": 3, "optimizer.warmup_steps": 0})
  tr = trainer.Trainer(config, str(tmp_path / "work"))
  history = tr.train()
  assert [h["step"] for h in history] == [1, 2, 3] and history[-1]["skipped_steps"] == 0

  adapters, run = trainer.load_trained_params(str(tmp_path / "work"))
  paths = lora.target_paths(base)
  assert len(paths) == 10  # q, k, v, o of self- and cross-attention, ffn.0, ffn.2
  leaves = {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
  assert leaves == {p + (ab,) for p in paths for ab in ("a", "b")}  # only adapters were trained
  assert all(np.abs(lora._get(adapters, p)["b"]).max() > 0 for p in paths)  # and they moved
  assert run["lora"]["rank"] == 4

  # A non-finite batch: the step is skipped and counted, the adapters stay.
  state = tr.state
  before = jax.device_get(state["params"])
  frozen = tr._load_base_params(tr.frozen_abstract)
  bad = tr.loader.batch(0)
  bad["latents"][0, 0, 0, 0, 0] = np.nan
  state, metrics = tr.train_step(state, frozen, trainer._global_batch(bad, tr.batch_sharding))
  assert int(metrics["skipped"]) == 1 and not bool(metrics["finite"]) and int(state["step"]) == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), before)

  # The merged checkpoint loads as a plain DiT and computes the adapted model.
  merged_dir = lora.merge_checkpoint(base_dir, str(tmp_path / "work"), str(tmp_path / "merged"))
  merged_model = dit.load_dit(merged_dir, schedule=config.model.schedule, dtype=jnp.float32)
  graphdef = nnx.split(model)[0]
  adapted_model = nnx.merge(graphdef, lora.apply_lora(base, adapters, 8.0))
  rng = np.random.default_rng(1)
  latents = jnp.asarray(rng.normal(size=(1, *tr.latent_shape)), jnp.float32)
  context = jnp.asarray(rng.normal(size=(1, 8, cfg.text_dim)), jnp.float32)
  t = jnp.array([700.0])
  np.testing.assert_allclose(np.asarray(merged_model(latents, t, context)),
                             np.asarray(adapted_model(latents, t, context)), rtol=1e-5, atol=1e-5)
  # The adaptation is W + alpha/rank * A @ B, checked in NumPy on one kernel.
  q = lora._get(adapters, ("blocks", "self_attn", "q"))
  merged_params, _ = checkpoint.load_checkpoint(merged_dir)
  np.testing.assert_allclose(merged_params["blocks"]["self_attn"]["q"]["kernel"],
                             base["blocks"]["self_attn"]["q"]["kernel"] + 2.0 * np.einsum("lir,lro->lio", q["a"], q["b"]),
                             rtol=1e-5, atol=1e-6)


def test_configs():
  for variant in t3_wan.VARIANTS:
    config = t3_wan.get_config(variant)
    assert config.optimizer.lr > 0 and config.sample.steps > 0
  c = t3_wan.get_config("stage2")
  assert trainer.latent_shape(c, trainer.dit_config(c)) == (16, 21, 272, 480)
  assert (c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.clip_norm) == (2e-5, 1e-2, 1.0)
  c = t3_wan.get_config("5b_stage2_lora")
  assert trainer.latent_shape(c, trainer.dit_config(c)) == (48, 21, 136, 240) and c.lora.rank == 64
  with pytest.raises(ValueError, match="variant"):
    t3_wan.get_config("nope")


@pytest.mark.parametrize("overrides,message", [
    (["--config.data.kind=latents", "--config.data.path="], "config.data.path is empty"),
    (["--config.data.kind=synthetic", "--config.model.init_checkpoint=/nonexistent/dit"],
     "no checkpoint at /nonexistent/dit"),
    (["--config.mesh.sequence=3"], "mesh"),
])
def test_train_bad_input_one_line_error(tmp_path, overrides, message):
  """The bare config (stage 1) with bad values: exit 2, one `error:` line naming the fix."""
  proc = subprocess.run([sys.executable, "train.py", f"--workdir={tmp_path / 'w'}", *overrides], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_train_out_of_device_memory_one_line_error(tmp_path, env):
  """A device OOM in the step (as XLA raises it on a GPU): exit 3, one `error:` line naming
  the fixes (sequence axis, batch, remat, XLA's memory fraction), no traceback."""
  script = ("import runpy, sys, jax\n"
            "from t3_jax.training import trainer\n"
            "def loop(self, *a, **k):\n"
            "  raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
            "55.26GiB with allocator GPU_0_bfc on device 0.')\n"
            "trainer.Trainer._loop = loop\n"
            "sys.argv = ['train.py'] + sys.argv[1:]\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
  proc = subprocess.run([sys.executable, "-c", script, f"--workdir={tmp_path / 'w'}", *TRAIN_ARGS], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 3 and len(errors) == 1, proc.stderr[-2000:]
  assert "55.26GiB" in errors[0] and "mesh.sequence" in errors[0] and "XLA_PYTHON_CLIENT_MEM_FRACTION" in errors[0]
  assert "Traceback" not in proc.stderr


def test_lora_merge_bad_input_one_line_error(tmp_path, env):
  """`python -m t3_jax.training.lora merge` with a missing base checkpoint: exit 2, one `error:` line
  naming it, no traceback, no output folder."""
  proc = subprocess.run([sys.executable, "-m", "t3_jax.training.lora", "merge", "--ckpt", str(tmp_path / "nope"),
                         "--lora", str(tmp_path / "work"), "--output", str(tmp_path / "merged")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1 and "nope" in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and not (tmp_path / "merged").exists()
