"""benchmarks/retrofit_demo.py: the ablation attentions against a NumPy definition of the
windows, and a 2-step smoke run of the whole experiment on a tiny setting."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import retrofit_demo  # noqa: E402

from t3_jax.core import attention  # noqa: E402


def _numpy_window_attention(q, k, v, grid, blocks, remote):
  """Softmax attention where a query sees the keys of its own window, by the definition:
  along an axis of length G cut into n windows of w = G / n tokens, index i belongs to
  close window i // w, or to remote window i % n. q, k, v: [B, N, h, d] float64."""
  coords = np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), -1)   # [N, 3]
  n = np.array(blocks)
  w = np.array(grid) // n
  window = coords % n if remote else coords // w
  same = np.all(window[:, None] == window[None, :], -1)                          # [N, N]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(same[None, None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("blocks", [(2, 2, 3), (1, 3, 2), (2, 1, 1)])
def test_single_partition_attention_matches_numpy(blocks):
  grid = (4, 6, 6)
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, int(np.prod(grid)), 2, 8)) for _ in range(3))
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
  close = np.asarray(retrofit_demo.close_only_attention(*args, grid, blocks))
  remote = np.asarray(retrofit_demo.remote_only_attention(*args, grid, blocks))
  np.testing.assert_allclose(close, _numpy_window_attention(q, k, v, grid, blocks, False), atol=2e-5)
  np.testing.assert_allclose(remote, _numpy_window_attention(q, k, v, grid, blocks, True), atol=2e-5)
  # T3 is their mean, and the two ablations really differ where windows are real.
  t3 = np.asarray(attention.t3_attention(*args, grid, blocks))
  np.testing.assert_allclose(t3, (close + remote) / 2, atol=2e-5)
  assert np.abs(close - remote).max() > 1e-2


def test_ablation_rejects_padded_blocks():
  q = jnp.zeros((1, 4 * 5 * 5, 2, 8))
  with pytest.raises(ValueError, match="divide"):
    retrofit_demo.close_only_attention(q, q, q, (4, 5, 5), (1, 2, 2))


def test_smoke_run(tmp_path):
  out = tmp_path / "demo.json"
  # Phase B for two variants keeps it under 20 s (each variant's train step compiles once).
  result = retrofit_demo.main(["--tiny", "--seeds", "0", "--variants", "t3,full", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["settings"]["steps_a"] == 2 and saved["settings"]["steps_b"] == 2
  record = result["records"][0]
  assert set(record["zero_shot"]) == set(record["phase_b"]) == {"t3", "full"}
  assert [p["step"] for p in record["phase_b"]["t3"]["curve"]] == [0, 2]
  table = result["summary"]["table"]
  assert set(table) == {"full attention after phase A", "T3 zero-shot (the switch)", "T3 after fine-tune",
                        "full attention continued"}
  assert all(np.isfinite(row["mean"]) for row in table.values())
  gap = result["summary"]["phase_b_gap_to_full"]["t3"]["gap_to_full_mean"]
  assert gap[0] == pytest.approx(record["zero_shot"]["t3"]["loss"] - record["zero_shot"]["full"]["loss"])
  # Every phase-B run starts from the phase-A weights: its step-0 eval is the zero-shot one.
  for v in ("t3", "full"):
    assert record["phase_b"][v]["curve"][0]["loss"] == pytest.approx(record["zero_shot"][v]["loss"], rel=1e-6)
  assert record["zero_shot"]["full"]["loss"] == pytest.approx(record["phase_a"]["curve"][-1]["loss"], rel=1e-6)


def test_videos_are_deterministic_and_paired():
  s = retrofit_demo.Settings(**retrofit_demo.TINY)
  make = jax.jit(retrofit_demo.make_videos, static_argnums=(1, 2))
  (x0, ctx), (x1, ctx1) = (make(jax.random.key(3), 4, s) for _ in range(2))
  np.testing.assert_array_equal(np.asarray(x0), np.asarray(x1))
  assert x0.shape == (4, *s.latent_shape) and ctx.shape == (4, s.text_len, s.text_dim)
  assert np.all(np.isfinite(np.asarray(x0)))
