"""Shared test helpers."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_on_fake_devices():
  """run(script, devices) -> the JSON its `RESULT ` line prints, run in its own process with
  that many fake CPU devices (so the rest of the suite keeps one device)."""
  def run(script: str, devices: int, timeout: int = 600) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", script)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])
  return run
