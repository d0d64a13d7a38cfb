"""sample.py end to end: the no-weights demo writes a readable mp4; bad input fails cleanly."""

import json
import os
import subprocess
import sys

import imageio
import pytest

# The tests start sample.py with subprocess (fork + exec: safe), which JAX, imported by other
# test modules, warns about.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sample  # noqa: E402  (importing defines no flags and runs nothing)


def run_sample(*args, timeout=300):
  return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def mp4s(directory):
  return sorted(f for f in os.listdir(directory) if f.endswith(".mp4")) if os.path.isdir(directory) else []


def demo_config():
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import t3_wan
  return t3_wan.get_config("demo").sample


def test_demo_writes_a_readable_mp4(tmp_path):
  out_dir = tmp_path / "demo"
  result = run_sample("--config=configs/t3_wan.py:demo", f"--output_dir={out_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  files = os.listdir(out_dir)
  assert len(files) == 1 and files[0].endswith(".mp4"), files  # no temporary file left behind

  cfg = demo_config()
  reader = imageio.get_reader(str(out_dir / files[0]), format="FFMPEG")
  frames = [frame for frame in reader]
  meta = reader.get_meta_data()
  reader.close()
  assert len(frames) == cfg.frames
  assert frames[0].shape == (cfg.height, cfg.width, 3)
  assert meta["codec"] == "h264" and meta["fps"] == cfg.fps

  stdout = result.stdout
  assert "RANDOM" in stdout  # says plainly that the weights are random
  for stage in ("text:", "compile:", "denoise:", "decode:", "write:", "peak memory:"):
    assert any(line.startswith(stage) for line in stdout.splitlines()), (stage, stdout)


def test_tiny_variant_samples_with_random_models(tmp_path):
  """`tiny` configures both jobs: sample.py runs it on tiny random models (no weights)."""
  out_dir = tmp_path / "tiny"
  result = run_sample("--config=configs/t3_wan.py:tiny", f"--output_dir={out_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(mp4s(out_dir)) == 1 and "RANDOM" in result.stdout


def test_demo_on_several_devices(tmp_path):
  """Sequence x guidance parallel on 4 fake CPU devices: the demo still writes its mp4."""
  out_dir = tmp_path / "demo4"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "sample.py", "--config=configs/t3_wan.py:demo", f"--output_dir={out_dir}",
                           "--config.sample.sequence=2", "--config.sample.guidance_parallel=True"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "DiT on mesh" in result.stdout and len(mp4s(out_dir)) == 1, result.stdout


@pytest.mark.parametrize("args, expect", [
    (["--config=configs/t3_wan.py:demo", "--config.sample.frames=80"], "frames must be 4k+1"),
    (["--config=configs/t3_wan.py:demo", "--config.sample.nope=1"], "unknown config field 'sample.nope'"),
    (["--config.sample.nope=1"], "unknown config field 'sample.nope'"),  # the default config, overridden
    (["--config=configs/t3_wan.py:demo", "--config.sample.attention=full"], "unknown config field 'sample.attention'"),
    (["--config=configs/t3_wan.py:demo", "--config.model.attention=half"], "model.attention must be 't3' or 'full'"),
    (["--config=configs/t3_wan.py:stage1"], "not a sampling config"),
    (["--config=configs/t3_wan.py", "--config.sample.dit_checkpoint={tmp}/missing"],
     "python convert_torch_weights.py SOURCE {tmp}/missing --kind dit"),
    (["--config=configs/t3_wan.py:demo", "--prompts_file={tmp}/prompts.json"], "not valid JSON"),
    (["--config=configs/t3_wan.py:demo", "--config.sample.sequence=2"], "needs 2 devices, this process has 1"),
    (["--config=configs/t3_wan.py:demo", "--config.sample.guidance_parallel=True", "--config.sample.guidance=1"],
     "guidance_parallel needs guidance != 1"),
    (["--config=configs/t3_wan.py:demo", "--config.sample.random_init=wan2.1-1.3b"],
     "unknown random_init preset 'wan2.1-1.3b': use one of tiny-wan2.1, tiny-wan2.2, wan2.1-t2v-1.3b"),
    (["--config=configs/t3_wan.py:demo", "--config.sample.random_num_layers=-2"], "num_layers must be a positive"),
])
def test_bad_input_fails_with_one_line(args, expect, tmp_path):
  (tmp_path / "prompts.json").write_text("[{\"prompt_en\": ", encoding="utf-8")
  out_dir = tmp_path / "out"
  result = run_sample(*[a.format(tmp=tmp_path) for a in args], f"--output_dir={out_dir}", timeout=120)
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert expect.format(tmp=tmp_path) in lines[0]
  assert mp4s(out_dir) == []


def test_prompts_files_and_names(tmp_path):
  path = tmp_path / "prompts.json"
  path.write_text(json.dumps([{"data_file": "", "prompt_en": "A red fox."}, "Snow at dusk", {"prompt": "Rain"}]),
                  encoding="utf-8")
  assert sample.load_prompts(str(path)) == ["A red fox.", "Snow at dusk", "Rain"]
  for content, message in (("{}", "non-empty JSON list"), ("[{\"caption\": \"x\"}]", "entry 0 has no")):
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
      sample.load_prompts(str(path))
  with pytest.raises(FileNotFoundError):
    sample.load_prompts(str(tmp_path / "missing.json"))
  assert sample.slug("A drone shot: 4K, ultra-detailed!") == "a-drone-shot-4k-ultra-detailed"
  # A bare config path gives the file's "default" variant: 4K T3-Wan2.1-1.3B sampling.
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import t3_wan
  default = t3_wan.get_config().sample
  assert (default.height, default.width, default.frames, default.steps) == (2176, 3840, 81, 50)
