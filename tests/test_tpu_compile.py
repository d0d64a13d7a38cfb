"""`--compile_for=SLICE`: train.py and sample.py compiled by the real TPU compiler (libtpu), no TPU.

Each command runs in its own process (libtpu is loaded once per process; several may load it
at once with ALLOW_MULTIPLE_LIBTPU_LOAD=1). The tiny training config and the demo sampling
config compile in seconds; the VAE decode is left out of the sampling runs (--nocompile_vae)
because the TPU compiler takes minutes over it on 2 CPU cores.
"""

import json
import os
import subprocess
import sys

import pytest

from t3_jax import compile_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _run(script: str, *args: str, timeout: int = 600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=env, capture_output=True,
                        text=True, timeout=timeout, cwd=ROOT, check=False)


def _report(directory) -> dict:
  with open(os.path.join(directory, "compile_report.json")) as f:
    return json.load(f)


def _check_program(program: dict, hbm: int) -> None:
  """Compiled, per-chip memory reported, fits, Mosaic kernels (not the interpreter) for attention."""
  assert program["fits"], program
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "peak_bytes"):
    assert isinstance(program[key], int) and program[key] >= 0, (key, program)
  assert program["total_bytes"] > 0 and 0 < program["peak_bytes"] <= hbm
  assert program["total_bytes"] == (program["argument_bytes"] + program["output_bytes"] - program["alias_bytes"]
                                    + program["temp_bytes"])
  assert program["hbm_bytes"] == hbm and program["headroom_bytes"] == hbm - program["peak_bytes"]
  assert program["attention_kernel"] == "pallas"
  assert program["mosaic_kernels"] > 0, "attention compiled without Mosaic kernels (interpret mode or XLA)"
  assert program["model_flops_per_chip"] > 0 and program["estimated_seconds_per_step"] > 0
  assert program["compile_s"] > 0


@pytest.mark.parametrize("slice_name, chips, hosts, extra", [
    ("v5p-8", 4, 1, ["--config.batch_size=4"]),                          # fsdp 4
    ("v5p-16", 8, 2, ["--config.batch_size=8", "--config.mesh.data=2"]),  # data 2 (across hosts) x fsdp 4
])
def test_train_step_compiles_for_tpu(tmp_path, slice_name, chips, hosts, extra):
  proc = _run("train.py", "--config=configs/t3_wan.py:tiny", f"--workdir={tmp_path}", f"--compile_for={slice_name}",
              *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"train --compile_for={slice_name}" in proc.stdout and "train step" in proc.stdout
  report = _report(tmp_path)
  assert (report["slice"], report["chips"], report["hosts"], report["device_kind"]) == (slice_name, chips, hosts,
                                                                                        "TPU v5")
  assert report["fits"] and report["hbm_bytes_per_chip"] == 95 * 2**30
  assert report["mesh"]["data"] * report["mesh"]["fsdp"] * report["mesh"]["sequence"] == chips
  (program,) = report["programs"]
  _check_program(program, 95 * 2**30)
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))  # compiled, not trained


@pytest.mark.parametrize("slice_name, hosts, extra", [
    ("v5p-8", 1, []),                                     # one chip
    ("v5p-16", 2, ["--config.sample.sequence=2"]),        # one host's 2 chips, tokens split over them
])
def test_sampling_loop_compiles_for_tpu(tmp_path, slice_name, hosts, extra):
  proc = _run("sample.py", "--config=configs/t3_wan.py:demo", f"--output_dir={tmp_path}",
              f"--compile_for={slice_name}", "--nocompile_vae", "--steps=2", *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = _report(tmp_path)
  assert (report["slice"], report["hosts"]) == (slice_name, hosts)
  assert report["guided"] and report["steps"] == 2 and report["fits"]
  (program,) = report["programs"]
  assert program["program"].startswith("denoise loop")
  _check_program(program, 95 * 2**30)
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".mp4")]


@pytest.mark.parametrize("script, args", [
    ("train.py", ["--config=configs/t3_wan.py:tiny", "--workdir={tmp}"]),
    ("sample.py", ["--config=configs/t3_wan.py:demo", "--output_dir={tmp}"]),
])
@pytest.mark.parametrize("name", ["v5p-7", "v9-8", "tpu", "v5e-12"])
def test_bad_slice_names_are_one_line_errors(tmp_path, script, args, name):
  proc = _run(script, *[a.format(tmp=tmp_path) for a in args], f"--compile_for={name}", timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, "compile_report.json"))


def test_mesh_that_does_not_split_the_chips_is_exit_2(tmp_path):
  proc = _run("train.py", "--config=configs/t3_wan.py:tiny", f"--workdir={tmp_path}", "--compile_for=v5p-8",
              "--config.mesh.fsdp=3", timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(error) == 1 and "needs 3 devices, found 4" in error[0]


def test_each_host_reads_the_rows_its_chips_hold(tmp_path):
  """On 2 hosts, an fsdp axis laid over both hosts' chips in ring order hands each host
  interleaved rows, and a sequence axis across the hosts has both read the same rows: each
  host's loader reads what its chips hold (reported), and the step compiles."""
  proc = _run("train.py", "--config=configs/t3_wan.py:tiny", f"--workdir={tmp_path}", "--compile_for=v5p-16",
              "--config.batch_size=8", timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((tmp_path / "compile_report.json").read_text())
  rows = report["rows_per_host"]
  assert sorted(rows) == ["0", "1"] and rows["0"] != rows["1"], rows
  proc = _run("train.py", "--config=configs/t3_wan.py:tiny", f"--workdir={tmp_path}", "--compile_for=v5p-16",
              "--config.batch_size=2", "--config.mesh.fsdp=1", "--config.mesh.sequence=8",
              "--config.model.schedule=2,1,1", timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.loads((tmp_path / "compile_report.json").read_text())["rows_per_host"]
  assert rows == {"0": "0..1", "1": "0..1"}, rows


# -- the slice table (no compiler) --


@pytest.mark.parametrize("name, generation, chips, hosts, topology, hbm_gib", [
    ("v4-8", "v4", 4, 1, "2x2x1", 32), ("v4-32", "v4", 16, 4, "2x2x4", 32),
    ("v5p-8", "v5p", 4, 1, "2x2x1", 95), ("v5p-16", "v5p", 8, 2, "2x2x2", 95), ("v5p-64", "v5p", 32, 8, "2x4x4", 95),
    ("v5p-512", "v5p", 256, 64, "4x8x8", 95),
    ("v5e-1", "v5e", 1, 1, "1x1", 16), ("v5e-8", "v5e", 8, 1, "2x4", 16), ("v5litepod-16", "v5e", 16, 4, "4x4", 16),
    ("v5e-32", "v5e", 32, 8, "4x8", 16), ("v5e-256", "v5e", 256, 64, "16x16", 16),
    ("v6e-4", "v6e", 4, 1, "2x2", 32), ("v6e-8", "v6e", 8, 1, "2x4", 32), ("v6e-16", "v6e", 16, 4, "4x4", 32),
    ("v6e-256", "v6e", 256, 64, "16x16", 32),
])
def test_slice_table(name, generation, chips, hosts, topology, hbm_gib):
  s = compile_for.parse_slice(name)
  assert (s.generation.name, s.chips, s.hosts, s.topology, s.hbm_bytes) == (generation, chips, hosts, topology,
                                                                            hbm_gib * 2**30)
  assert s.chips_per_host * s.hosts == s.chips


def test_job_that_does_not_fit_is_exit_3(tmp_path):
  """XLA's dense attention over 1024x1024x81 videos, batch 16, on one 16 GiB v5e chip: refused."""
  proc = _run("train.py", "--config=configs/t3_wan.py:tiny", f"--workdir={tmp_path}", "--compile_for=v5e-1",
              "--config.data.height=1024", "--config.data.width=1024", "--config.data.frames=81",
              "--config.batch_size=16", "--config.model.implementation=xla", timeout=300)
  error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert proc.returncode == 3 and len(error) == 1, proc.stderr[-2000:]
  assert "does not fit" in error[0] and "mesh.sequence" in error[0] and "remat" in error[0] and "lora" in error[0]
  report = _report(tmp_path)
  (program,) = report["programs"]
  assert not report["fits"] and not program["fits"]
  assert program["used_bytes"] > program["limit_bytes"] > 15 * 2**30
  assert "NO" in proc.stdout


def test_refusal_numbers_are_parsed():
  message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
             "Used 16.32G of 15.75G hbm. Exceeded hbm capacity by 587.61M.")
  out = compile_for.parse_refusal(message)
  assert out["used_bytes"] == int(16.32 * 2**30) and out["limit_bytes"] == int(15.75 * 2**30)
  assert out["over_bytes"] == int(587.61 * 2**20)
  out = compile_for.parse_refusal("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                                  "temporaries (2.20T) exceeds available HBM (15.75G).")
  assert out["used_bytes"] == int(2.2 * 2**40) and out["limit_bytes"] == int(15.75 * 2**30)


@pytest.mark.parametrize("variant, preset, family, latent", [
    ("default", "wan2.1-t2v-1.3b", "wan2.1", (16, 21, 272, 480)),   # T3-Video-Wan2.1-T2V-1.3B at 4K
    ("5b", "wan2.2-ti2v-5b", "wan2.2", (48, 21, 136, 240)),         # T3-Video-Wan2.2-T2V-5B at 4K
])
def test_sampling_architecture_without_weights(variant, preset, family, latent):
  """sample.py --compile_for needs no checkpoint: the DiT's architecture from the size its path names."""
  import importlib.util

  import jax.numpy as jnp

  from t3_jax.models import dit as dit_lib

  spec = importlib.util.spec_from_file_location("t3_wan_config", os.path.join(ROOT, "configs", "t3_wan.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  s = config.sample
  assert not os.path.exists(os.path.join(ROOT, s.dit_checkpoint, "config.json"))
  dit_cfg, param_dtype, vae_config, _ = compile_for._sampling_models(s, config.model)
  assert dit_cfg == dit_lib.DiTConfig.preset(preset) and vae_config.z_dim == dit_cfg.in_channels
  assert jnp.dtype(param_dtype) == jnp.bfloat16  # what convert_torch_weights.py stores by default
  assert compile_for._video_shape(s, dit_cfg, vae_config)[0] == latent
  with s.unlocked():
    s.dit_checkpoint = "/nonexistent/my-dit"
  with pytest.raises(ValueError, match="architecture"):
    compile_for._sampling_models(s, config.model)


def test_layer_loop_trips():
  """The compiler counts the DiT's scanned cycle of layers once: the estimate is scaled back."""
  import dataclasses

  from flax import nnx

  from t3_jax.models import dit as dit_lib

  def trips(num_layers):
    cfg = dataclasses.replace(dit_lib.DiTConfig.preset("wan2.1-t2v-1.3b"), num_layers=num_layers)
    model = nnx.eval_shape(lambda: dit_lib.WanDiT(cfg, rngs=nnx.Rngs(0)))
    return compile_for.layer_loop_trips(model, (21, 136, 240))

  assert trips(30) == 6.0           # the published 4K schedule: a period of 5 layers, 6 cycles
  assert trips(7) == 1.0            # one cycle and 2 unrolled layers: all 7 counted
  assert trips(12) == 12 / 7        # 2 cycles of 5 (one counted) and 2 unrolled
