"""Training: resume after SIGTERM, two processes, LoRA, skipped non-finite steps, configs,
metrics (metrics.jsonl, TensorBoard) and the command lines' errors and --help.

Runs of train.py are subprocesses that share one XLA compilation cache, so each distinct
step program compiles once per session.
"""

import glob
import json
import os
import signal
import struct
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


def _tensorboard_losses(workdir):
  """{step: loss} of train/loss as TensorBoard shows it: the event files read in order (a
  TFRecord of Event protos), a file's purge step hiding the earlier files' events from it on."""
  from tensorboardX.proto import event_pb2

  shown = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")), key=os.path.getmtime):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4  # length, its crc, the record, its crc
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = {k: v for k, v in shown.items() if k < event.step}
      for value in event.summary.value:
        if value.tag == "train/loss":
          shown[event.step] = value.simple_value
  return shown


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

  proc = _train(workdir, env)  # resumes from the SIGTERM checkpoint
  assert f"resumed from {workdir / 'checkpoints'} at step {stopped[-1]}" in proc.stderr  # INFO, shown by default
  steps, losses = _losses(workdir)
  assert steps == list(range(1, STEPS + 1))
  np.testing.assert_allclose(losses, reference, rtol=1e-6)


def test_resume_from_an_older_checkpoint_logs_each_step_once(reference_run, tmp_path, env):
  """A run that logged steps past its last checkpoint (a crash, a kill) resumes from that
  checkpoint: metrics.jsonl and TensorBoard show each step once, with the resumed losses,
  which equal the uninterrupted run's exactly."""
  _, reference = _losses(reference_run)
  workdir = tmp_path / "run"
  _train(workdir, env, ["--config.total_steps=5", "--config.checkpoint.every=2", "--config.checkpoint.final=False"])
  assert _losses(workdir)[0] == [1, 2, 3, 4, 5]
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [2, 4]
  proc = _train(workdir, env)  # resumes at step 4: step 5 runs again
  assert "at step 4" in proc.stderr
  steps, losses = _losses(workdir)
  assert steps == list(range(1, STEPS + 1))
  np.testing.assert_allclose(losses, reference, rtol=1e-6)
  shown = _tensorboard_losses(workdir)
  assert sorted(shown) == steps
  np.testing.assert_allclose([shown[s] for s in steps], losses, rtol=1e-6)  # float32 in the events
  assert "tensorflow" not in sys.modules


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


def test_two_processes_sigterm_on_one_stops_both_at_one_step(tmp_path, env):
  """SIGTERM to one of two processes: JAX's preemption sync manager picks one step, both save it
  (Orbax's reached_preemption; no collective of the trainer's per step) and exit 0."""
  port = 20000 + (os.getpid() + 7) % 20000
  workdir = tmp_path / "two"
  procs = []
  for i in range(2):
    cmd = ["timeout", "-s", "KILL", "400", sys.executable, "train.py", f"--workdir={workdir}", *TRAIN_ARGS,
           "--config.total_steps=3000", "--config.checkpoint.every=1000", "--config.mesh.fsdp=2", "--distributed",
           f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 330
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  os.kill(procs[1].pid, signal.SIGTERM)  # `timeout` passes it on to its child
  outs = [p.communicate(timeout=360) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  steps, _ = _losses(workdir)
  assert 3 <= steps[-1] < 3000 and steps == list(range(1, steps[-1] + 1))
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [steps[-1]]
  for _, err in outs:
    assert f"preempted: checkpoint of step {steps[-1]} saved" in err


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
    # Each variant holds the groups of its jobs only, and its values pass its job's checks.
    assert ("optimizer" in config) == (variant in t3_wan.TRAIN_VARIANTS)
    assert ("sample" in config) == (variant in t3_wan.SAMPLE_VARIANTS)
    if variant in t3_wan.TRAIN_VARIANTS:
      trainer.validate(config)
      assert config.optimizer.lr > 0
    else:
      with pytest.raises(ValueError, match="not a training config"):
        trainer.validate(config)
    if variant in t3_wan.SAMPLE_VARIANTS:
      assert config.sample.steps > 0
      # The DiT's fields are the model's, not repeated in the sampling job.
      assert not {"attention", "schedule", "implementation", "dtype"} & set(config.sample)
  for variant in ("5b_stage1", "5b_stage2", "5b_stage2_lora"):  # they train the 5B
    c = t3_wan.get_config(variant)
    assert c.model.preset == "wan2.2-ti2v-5b" and trainer.dit_config(c).in_channels == 48
    assert c.model.init_checkpoint in (t3_wan.WAN22_5B, t3_wan.STAGE1_5B)
  c = t3_wan.get_config("stage2")
  assert trainer.latent_shape(c, trainer.dit_config(c)) == (16, 21, 272, 480)
  assert (c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.clip_norm) == (2e-5, 1e-2, 1.0)
  c = t3_wan.get_config("5b_stage2_lora")
  assert trainer.latent_shape(c, trainer.dit_config(c)) == (48, 21, 136, 240) and c.lora.rank == 64
  with pytest.raises(ValueError, match="variant"):
    t3_wan.get_config("nope")
  for field, value, message in (("total_steps", 0, "total_steps"), ("optimizer.schedule", "linear", "constant"),
                                ("model.remat", "some", "remat"), ("data.kind", "video", "data.kind"),
                                ("checkpoint.every", -1, "checkpoint.every"), ("model.dtype", "fp7", "dtype"),
                                ("model.overrides.heads", 3, "unknown DiT fields"), ("data.height", 60, "VAE stride")):
    with pytest.raises(ValueError, match=message):
      trainer.validate(_tiny_config(**{field: value}))


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
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--config=configs/t3_wan.py:tiny", "--config.nope=1"], "unknown config field 'nope'"),
    (["--config=configs/t3_wan.py:tiny", "--config.optimizer.nope=1"], "unknown config field 'optimizer.nope'"),
    (["--config=configs/t3_wan.py:bad"], "unknown config variant 'bad'"),
    (["--config=configs/t3_wan.py:5b"], ":5b_stage1"),  # sampling only: names the variants that train the 5B
    (["--config=configs/t3_wan.py:tiny", "--config.total_steps=0"], "total_steps must be an integer >= 1"),
    (["--config=configs/t3_wan.py:tiny", "--config.total_steps=-1"], "total_steps must be an integer >= 1"),
    (["--config=configs/t3_wan.py:tiny", "--workdir={file}"], "exists and is not a directory"),
    (["--config=configs/t3_wan.py:tiny", "--workdir="], "--workdir is missing"),
    (["--config=configs/t3_wan.py:tiny"], "--workdir is missing"),
])
def test_train_cli_errors_create_nothing(tmp_path, env, args, message):
  """Each bad command line: one `error:` line naming the fix, exit 2, no traceback, nothing written."""
  regular_file = tmp_path / "a_file"
  regular_file.write_text("not a workdir")
  workdir = tmp_path / "w"
  args = [a.format(file=regular_file) for a in args]
  if not any(a.startswith("--workdir") for a in args) and message != "--workdir is missing":
    args.append(f"--workdir={workdir}")
  proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert sorted(os.listdir(tmp_path)) == ["a_file"] and regular_file.read_text() == "not a workdir"


@pytest.mark.parametrize("command", [
    ["train.py"], ["sample.py"], ["convert_torch_weights.py"], ["-m", "t3_jax.training.data", "prepare"],
    ["-m", "t3_jax.training.lora", "merge"],
])
def test_help_exits_0(command, env):
  proc = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "usage" in proc.stdout.lower() or "flags:" in proc.stdout.lower(), proc.stdout[-2000:]
  assert "Traceback" not in proc.stderr


def test_lora_imports_no_trainer():
  """trainer imports lora; lora (and its merge command) must not import the trainer back."""
  proc = subprocess.run([sys.executable, "-c", "import sys, t3_jax.training.lora; "
                         "print('t3_jax.training.trainer' in sys.modules)"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]


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
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 3 and len(errors) == 1, proc.stderr[-2000:]
  assert "55.26GiB" in errors[0] and "mesh.sequence" in errors[0] and "XLA_PYTHON_CLIENT_MEM_FRACTION" in errors[0]
  assert "Traceback" not in proc.stderr


def test_lora_merge_bad_input_one_line_error(tmp_path, env):
  """`python -m t3_jax.training.lora merge` with a missing base checkpoint: exit 2, one `error:` line
  naming it, no traceback, no output folder."""
  proc = subprocess.run([sys.executable, "-m", "t3_jax.training.lora", "merge", "--ckpt", str(tmp_path / "nope"),
                         "--lora", str(tmp_path / "work"), "--output", str(tmp_path / "merged")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1 and "nope" in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and not (tmp_path / "merged").exists()
