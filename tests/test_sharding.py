"""Sharding: the mesh, the rules, and sharded steps equal to single-device ones.

The multi-device checks run in a separate process with 8 fake CPU devices
(tests/sharded_check.py), so the rest of the suite keeps its single device.
"""

import jax
import numpy as np
import pytest

from t3_jax.parallel import mesh as mesh_lib
from t3_jax.core import sequence_parallel
from t3_jax.core import windows


@pytest.mark.parametrize("grid,blocks", [((5, 6, 8), (5, 1, 1)), ((5, 6, 8), (1, 3, 4)),
                                         ((5, 7, 9), (2, 3, 4)), ((4, 6, 8), (2, 2, 2))])
def test_token_window_slot_matches_window_tables(grid, blocks):
  """The arithmetic token -> (window, slot) map is the inverse of windows.window_indices."""
  token = np.arange(int(np.prod(grid)))
  for remote in (False, True):
    index, _ = windows.window_indices(grid, blocks, remote)
    window, slot = sequence_parallel.token_window_slot(token, grid, blocks, remote)
    np.testing.assert_array_equal(index[window, slot], token)


def test_relayout_plan_published_4k():
  """Every published 4K layer on 8..64 devices: few padded units, frames use head groups."""
  grid, pattern = (21, 136, 240), ((21, 1, 1), (1, 17, 30), (1, 8, 40), (3, 17, 8), (7, 8, 6))
  for devices in (8, 64):
    for blocks in pattern:
      for plan in sequence_parallel.describe_relayout(grid, blocks, devices, heads=12):
        units = plan["windows"] * plan["head_groups"]
        assert plan["padded_units"] <= 0.05 * units + devices // 8, (devices, blocks, plan)
  frames = sequence_parallel.describe_relayout(grid, (21, 1, 1), 64, heads=12)
  assert len(frames) == 1 and frames[0]["head_groups"] == 3  # 63 units on 64 devices
  assert frames[0]["collective"].startswith("ppermute")        # frames mostly stay where they are


def test_param_spec_largest_divisible_dim():
  mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
  assert mesh_lib.param_spec((30, 1536, 8960), mesh, stacked=True) == jax.sharding.PartitionSpec()
  abstract = jax.sharding.AbstractMesh((1, 4, 2), mesh_lib.MESH_AXES)
  spec = mesh_lib.param_spec((30, 1536, 8960), abstract, stacked=True)
  assert spec == jax.sharding.PartitionSpec(None, None, ("fsdp", "sequence"))
  assert mesh_lib.param_spec((30, 4, 1536, 64), abstract, stacked=True)[2] == ("fsdp", "sequence")
  assert mesh_lib.param_spec((30, 6, 1536), abstract, stacked=True) == jax.sharding.PartitionSpec()  # small
  assert mesh_lib.param_spec((3 * 65537,), abstract) == jax.sharding.PartitionSpec()  # nothing divides
  assert mesh_lib.logical_to_spec(abstract, ("batch", "tokens", None)) == jax.sharding.PartitionSpec("fsdp", "sequence", None)


def test_make_mesh_errors():
  with pytest.raises(ValueError, match="devices"):
    mesh_lib.make_mesh(fsdp=3, sequence=5)


def test_sharded_equals_single_device(run_on_fake_devices):
  """8 fake devices: sharded T3 attention and sharded train steps equal the single-device ones."""
  result = run_on_fake_devices("sharded_check.py", 8)
  for check in result["attention"]:
    assert check["out"] < 1e-5 and check["grad"] < 1e-5, check
    # Windows move by all-to-all / collective-permute; the sequence is never all-gathered.
    assert "all-gather" not in check["collectives"], check
    assert set(check["collectives"]) & {"all-to-all", "collective-permute"}, check
    if check["relayout"] != "windows":  # head groups: exactly two all-to-alls (in, out) per stage
      assert check["collectives"] == {"all-to-all": 2 * check["stages"]}, check
    elif check["collective"] != "auto":  # the exchange uses the collective asked for
      assert set(check["collectives"]) == {check["collective"].replace("ppermute", "collective-permute").replace("_", "-")}, check
  for run in result["train"]:
    np.testing.assert_allclose(run["loss"], run["ref_loss"], rtol=2e-6)
    np.testing.assert_allclose(run["grad_norm"], run["ref_grad_norm"], rtol=2e-6)
    assert run["params"] < 1e-6, run
    assert "all-to-all" in run["collectives"] or "collective-permute" in run["collectives"], run
  # The DiT with each block's token-wise work chunked per device (the TPU layout) on 8 devices.
  assert result["chunked_forward"]["out"] < 1e-5 * max(1.0, result["chunked_forward"]["scale"]), result["chunked_forward"]
