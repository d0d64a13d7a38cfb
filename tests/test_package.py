"""pyproject.toml: the package installs, with all its subpackages, and imports from any folder."""

import os
import subprocess
import sys

from conftest import ROOT


def test_pip_install_then_import_from_elsewhere(tmp_path):
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                  "--target", str(target), ROOT], check=True, capture_output=True, timeout=300)
  subprocess.run(["rm", "-rf", os.path.join(ROOT, "build")], check=False)  # setuptools' scratch folder
  code = ("import t3_jax, t3_jax.core.attention, t3_jax.parallel.layout, t3_jax.models.dit, "
          "t3_jax.training.trainer, t3_jax.diffusion.pipeline, t3_jax.weights.checkpoint; "
          "print(t3_jax.__file__, callable(t3_jax.t3_attention))")
  env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith(str(target)) and out.stdout.strip().endswith("True"), out.stdout
