"""T3 core against a plain NumPy reference written from the semantics (T3_REFERENCE.md s.1).

The reference never builds windows by reshaping: it gives every token its window id
(close: coordinate // w per axis; remote: coordinate % n per axis, i.e. i = b*n + a)
and lets a query attend to the real keys that share its id.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t3_jax
from t3_jax.core import attention
from t3_jax.core import schedule
from t3_jax.core import windows


def window_ids(grid, blocks):
  """(close_id, remote_id) per token, [T*H*W] each, from the index formulas."""
  coords = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)
  w = np.array([-(-g // n) for g, n in zip(grid, blocks)])
  n = np.array(blocks)
  close = coords // w
  remote = coords % n
  flatten = lambda ids: np.ravel_multi_index(tuple(ids.T), tuple(n))
  return flatten(close), flatten(remote)


def reference_attention(q, k, v, same_window):
  """float64 softmax attention, query i attends to keys j with same_window[i, j]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  logits = np.where(same_window[None, None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def reference_t3(q, k, v, grid, blocks):
  close, remote = window_ids(grid, blocks)
  return 0.5 * (reference_attention(q, k, v, close[:, None] == close[None])
                + reference_attention(q, k, v, remote[:, None] == remote[None]))


def random_qkv(rng, batch, tokens, heads, head_dim, dtype=np.float32):
  return [rng.standard_normal((batch, tokens, heads, head_dim)).astype(dtype) for _ in range(3)]


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def random_case(rng, pad):
  grid = tuple(int(rng.integers(1, 7)) for _ in range(3))
  blocks = []
  for g in grid:
    divisors = [n for n in range(1, g + 1) if g % n == 0]
    others = [n for n in range(1, g + 1) if g % n]
    blocks.append(int(rng.choice(others if pad and others else divisors)))
  return grid, tuple(blocks)


# --- windows ---

@pytest.mark.parametrize("remote", [False, True])
def test_partition_matches_index_formulas(remote):
  rng = np.random.default_rng(0)
  for _ in range(30):
    grid, blocks = random_case(rng, pad=False)
    tokens = np.arange(math.prod(grid)).reshape(1, -1)
    part = (windows.remote_windows if remote else windows.close_windows)(tokens, grid, blocks)[0]
    close, remote_id = window_ids(grid, blocks)
    ids = remote_id if remote else close
    assert part.shape == (windows.num_windows(blocks), math.prod(grid) // windows.num_windows(blocks))
    for a in range(part.shape[0]):  # every window holds exactly the tokens with its id, in token order
      np.testing.assert_array_equal(part[a], np.flatnonzero(ids == a))
    merge = windows.merge_remote_windows if remote else windows.merge_close_windows
    np.testing.assert_array_equal(merge(part[None], grid, blocks)[0], tokens[0])


@pytest.mark.parametrize("family", sorted(schedule.PUBLISHED))
def test_published_partitions_exact_at_4k(family):
  """Every published pattern on its exact 4K grid: window membership from the formulas."""
  ref = schedule.PUBLISHED[family]
  grid = ref["grid"]
  tokens = np.arange(math.prod(grid)).reshape(1, -1)
  for blocks in ref["pattern"]:
    close, remote = window_ids(grid, blocks)
    for fn, ids in ((windows.close_windows, close), (windows.remote_windows, remote)):
      part = fn(tokens, grid, blocks)[0]
      expected = np.argsort(ids, kind="stable").reshape(part.shape)
      np.testing.assert_array_equal(part, expected)


def test_window_indices_real_tokens_first_and_complete():
  rng = np.random.default_rng(1)
  for _ in range(30):
    grid, blocks = random_case(rng, pad=True)
    n = math.prod(grid)
    for remote in (False, True):
      index, lengths = windows.window_indices(grid, blocks, remote)
      assert index.shape == (windows.num_windows(blocks), math.prod(windows.window_shape(grid, blocks)))
      real = index[index < n]
      np.testing.assert_array_equal(np.sort(real), np.arange(n))  # every token exactly once
      for row, length in zip(index, lengths):
        assert np.all(row[:length] < n) and np.all(row[length:] == n)
      ids = window_ids(grid, blocks)[int(remote)]
      for a, (row, length) in enumerate(zip(index, lengths)):
        np.testing.assert_array_equal(np.sort(row[:length]), np.flatnonzero(ids == a))


def test_coincide_rule():
  assert windows.partitions_coincide((21, 136, 240), (21, 1, 1))
  assert not windows.partitions_coincide((21, 136, 240), (1, 17, 30))
  assert windows.partitions_coincide((4, 6, 6), (4, 6, 1))
  rng = np.random.default_rng(2)
  for _ in range(40):
    grid, blocks = random_case(rng, pad=False)
    close, remote = window_ids(grid, blocks)
    tokens = np.arange(math.prod(grid)).reshape(1, -1)
    same = np.array_equal(windows.close_windows(tokens, grid, blocks), windows.remote_windows(tokens, grid, blocks))
    assert windows.partitions_coincide(grid, blocks) == same


def test_bad_blocks_raise():
  with pytest.raises(ValueError, match="n_h=0"):
    windows.check_blocks((3, 4, 5), (1, 0, 1))
  with pytest.raises(ValueError, match="n_w=6"):
    windows.check_blocks((3, 4, 5), (1, 1, 6))


# --- attention ---

def test_t3_attention_matches_reference_random():
  rng = np.random.default_rng(3)
  for i in range(12):
    grid, blocks = random_case(rng, pad=bool(i % 2))
    batch, heads, head_dim = int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.choice([4, 8, 16]))
    q, k, v = random_qkv(rng, batch, math.prod(grid), heads, head_dim)
    out = t3_jax.t3_attention(q, k, v, grid, blocks)
    assert out.shape == q.shape and out.dtype == q.dtype
    err = rel_err(out, reference_t3(q, k, v, grid, blocks))
    assert err < 2e-6, (grid, blocks, err)


@pytest.mark.parametrize("fuse", [True, False])
def test_padded_schedule_matches_padded_reference(fuse):
  rng = np.random.default_rng(4)
  for grid, blocks in [((3, 5, 7), (2, 2, 3)), ((5, 9, 8), (2, 4, 3)), ((2, 7, 11), (1, 3, 4))]:
    q, k, v = random_qkv(rng, 2, math.prod(grid), 2, 8)
    out = attention.t3_attention(q, k, v, grid, blocks, fuse_partitions=fuse)
    assert rel_err(out, reference_t3(q, k, v, grid, blocks)) < 2e-6


def test_coinciding_partitions_computed_once_equal_two_branch_mean():
  rng = np.random.default_rng(5)
  grid, blocks = (4, 6, 6), (4, 1, 1)  # one frame per window, like published pattern 0
  q, k, v = random_qkv(rng, 1, math.prod(grid), 2, 8)
  once = t3_jax.t3_attention(q, k, v, grid, blocks)
  close = windows.close_windows
  two = []
  for part, merge in ((close, windows.merge_close_windows), (windows.remote_windows, windows.merge_remote_windows)):
    w = [part(jnp.asarray(x), grid, blocks) for x in (q, k, v)]
    o = jax.nn.dot_product_attention(*(x.reshape(-1, *x.shape[2:]) for x in w))
    two.append(merge(o.reshape(w[0].shape), grid, blocks))
  np.testing.assert_allclose(once, (two[0] + two[1]) / 2, rtol=1e-6, atol=1e-6)
  # and it really runs one attention: a single dot-product attention in the jaxpr
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: t3_jax.t3_attention(q, k, v, grid, blocks))(q, k, v))
  assert jaxpr.count("exp") == 1


def test_full_attention_blocks():
  rng = np.random.default_rng(6)
  grid = (2, 3, 4)
  q, k, v = random_qkv(rng, 2, 24, 2, 8)
  out = t3_jax.t3_attention(q, k, v, grid, (1, 1, 1))
  full = reference_attention(q, k, v, np.ones((24, 24), bool))
  assert rel_err(out, full) < 2e-6


def test_xla_chunked_windows_match(monkeypatch):
  rng = np.random.default_rng(7)
  grid, blocks = (4, 8, 8), (2, 4, 2)
  q, k, v = random_qkv(rng, 1, math.prod(grid), 2, 8)
  monkeypatch.setattr(attention, "XLA_MAX_LOGITS", 600)  # forces chunks of a few windows
  out = t3_jax.t3_attention(q, k, v, grid, blocks)
  assert rel_err(out, reference_t3(q, k, v, grid, blocks)) < 2e-6


def test_gradients_flow_and_match_reference():
  rng = np.random.default_rng(8)
  grid, blocks = (2, 4, 6), (1, 2, 3)
  q, k, v = random_qkv(rng, 1, math.prod(grid), 2, 8)
  cot = rng.standard_normal(q.shape)
  ours = jax.grad(lambda q: jnp.sum(t3_jax.t3_attention(q, k, v, grid, blocks) * cot))(q)
  eps = 1e-3
  direction = rng.standard_normal(q.shape)
  f = lambda q: np.sum(reference_t3(q, k, v, grid, blocks) * cot)
  numeric = (f(q + eps * direction) - f(q - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(np.sum(ours * direction), numeric, rtol=1e-3)


@pytest.mark.parametrize("padded", [False, True])
def test_pallas_splash_interpret_matches_reference(padded):
  rng = np.random.default_rng(9)
  grid, blocks = ((3, 5, 7), (2, 2, 3)) if padded else ((2, 4, 6), (2, 2, 3))
  q, k, v = random_qkv(rng, 1, math.prod(grid), 2, 8)
  out = t3_jax.t3_attention(q, k, v, grid, blocks, implementation="pallas_interpret")
  assert rel_err(out, reference_t3(q, k, v, grid, blocks)) < 1e-5


def test_kernel_choice():
  assert attention.choose_implementation(None, jnp.bfloat16, 128, attention.Target("gpu")) == "cudnn"
  assert attention.choose_implementation(None, jnp.float32, 128, attention.Target("gpu")) == "xla"
  assert attention.choose_implementation(None, jnp.bfloat16, 128, attention.Target("tpu")) == "pallas"
  assert attention.choose_implementation(None, jnp.float32, 128, attention.Target("cpu")) == "xla"
  with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
    attention.choose_implementation("cudnn", jnp.bfloat16, 128, attention.Target("cpu"))
  with pytest.raises(ValueError, match="bf16 or fp16"):
    attention.choose_implementation("cudnn", jnp.float32, 128, attention.Target("gpu"))
  with pytest.raises(ValueError, match="TPU splash"):
    attention.choose_implementation("pallas", jnp.bfloat16, 128, attention.Target("gpu"))
  with pytest.raises(ValueError, match="pallas_interpret"):  # never the interpreter unasked
    attention.choose_implementation("pallas", jnp.bfloat16, 128, attention.Target("cpu"))
  assert attention.choose_implementation("pallas_interpret", jnp.float32, 8, attention.Target("cpu")) == "pallas_interpret"
  with pytest.raises(ValueError, match="implementation must be"):
    attention.choose_implementation("flash", jnp.bfloat16, 128, attention.Target("gpu"))


def sampled_reference(q, k, v, grid, blocks, queries):
  """Reference output at a few query tokens only (for grids too large for N x N)."""
  close, remote = window_ids(grid, blocks)
  out = []
  for i in queries:
    parts = []
    for ids in (close, remote):
      keys = np.flatnonzero(ids == ids[i])
      parts.append(reference_attention(q[:, i:i + 1], k[:, keys], v[:, keys], np.ones((1, keys.size), bool)))
    out.append(0.5 * (parts[0] + parts[1]))
  return np.concatenate(out, axis=1)


@pytest.mark.parametrize("pattern_index", [1, 2, 3, 4])
def test_published_wan22_schedule_at_4k(pattern_index):
  """The exact published Wan2.2 4K patterns on the exact grid (head_dim reduced to 4)."""
  ref = schedule.PUBLISHED["wan2.2-4k"]
  grid, blocks = ref["grid"], ref["pattern"][pattern_index]
  rng = np.random.default_rng(10 + pattern_index)
  q, k, v = random_qkv(rng, 1, math.prod(grid), 1, 4)
  out = np.asarray(t3_jax.t3_attention(q, k, v, grid, blocks))
  queries = rng.choice(math.prod(grid), 64, replace=False)
  assert rel_err(out[:, queries], sampled_reference(q, k, v, grid, blocks, queries)) < 2e-6


# --- schedules and cost ---

def test_published_schedules_reproduced():
  for family, ref in schedule.PUBLISHED.items():
    assert schedule.schedule_for_grid(ref["grid"], family) == ref["pattern"]
    per_layer = schedule.resolve_schedule("t3", family, ref["grid"], 30)
    assert per_layer[7] == ref["pattern"][2] and schedule.cycle(per_layer) == ref["pattern"]
  assert schedule.resolve_schedule("full", None, (21, 136, 240), 30) == ((1, 1, 1),) * 30


def test_derived_schedules_any_grid():
  for grid in [(21, 88, 160), (21, 135, 240), (21, 240, 136), (11, 60, 104), (1, 30, 52), (21, 68, 120)]:
    pattern = schedule.schedule_for_grid(grid)
    assert len(pattern) == 5 and pattern[0] == (grid[0], 1, 1)  # one frame per window
    assert pattern[1][0] == 1 and pattern[2][0] == 1  # whole time axis kept
    for blocks, published in zip(pattern[1:], schedule.PUBLISHED["wan2.1-4k"]["pattern"][1:]):
      w = windows.window_shape(grid, blocks)
      pw = windows.window_shape((21, 136, 240), published)
      for axis in (1, 2):  # spatial windows within a factor 1.5 of the published ones
        assert 1 / 1.5 <= w[axis] / pw[axis] <= 1.5 or blocks[axis] in (1, grid[axis]), (grid, blocks)
      padded = math.prod(windows.padded_grid(grid, blocks))
      assert padded / math.prod(grid) < 1.12  # padding costs little (11 frames: one padded frame is 9 %)
  # 2160 rows -> 135 latent rows: 8 and 17 don't divide it, so those layers pad one row
  assert windows.padded_grid((21, 135, 240), (1, 17, 30)) == (21, 136, 240)


def test_explicit_schedule_and_errors():
  grid = (4, 8, 8)
  assert schedule.resolve_schedule("t3", [(1, 2, 2), (4, 1, 1)], grid, 5) == ((1, 2, 2), (4, 1, 1)) * 2 + ((1, 2, 2),)
  assert schedule.resolve_schedule("t3", "1,2,2;4,1,1", grid, 2) == ((1, 2, 2), (4, 1, 1))
  with pytest.raises(ValueError, match="triples"):
    schedule.resolve_schedule("t3", [(1, 2)], grid, 2)
  with pytest.raises(ValueError, match="n_t=5"):
    schedule.resolve_schedule("t3", [(5, 1, 1)], grid, 2)
  with pytest.raises(ValueError, match="is for grid"):
    schedule.resolve_schedule("t3", "wan2.1-4k", grid, 2)
  with pytest.raises(ValueError, match="'t3' or 'full'"):
    schedule.resolve_schedule("window", None, grid, 2)


class Wan21:
  dim, ffn_dim, num_layers, in_channels, out_channels = 1536, 8960, 30, 16, 16
  patch_size, text_dim, freq_dim = (1, 2, 2), 4096, 256


def test_macs_reproduce_paper():
  grid = schedule.PUBLISHED["wan2.1-4k"]["grid"]
  full = schedule.model_macs(Wan21, grid, schedule.resolve_schedule("full", None, grid, 30))
  t3_released = schedule.model_macs(Wan21, grid, schedule.resolve_schedule("t3", None, grid, 30), dedup=False)
  t3_once = schedule.model_macs(Wan21, grid, schedule.resolve_schedule("t3", None, grid, 30), dedup=True)
  T = 1e12
  assert round(full["self_attention"] / T) == 43299
  assert round(t3_released["self_attention"] / T) == 1007
  assert round(t3_once["self_attention"] / T) == 594 or round(t3_once["self_attention"] / T) == 595
  assert round(full["total_paper"] / T) == 44156  # the paper: 44,157 T
  assert abs(t3_released["total_paper"] / T - 1865) < 1.5  # the paper: 1,865 T
  assert full["total"] > full["total_paper"]  # cross-attention etc. counted in "total"


def test_padding_windows_with_masked_slots_changes_nothing():
  """The cuDNN path pads odd padded windows by one masked slot: same outputs (checked with XLA)."""
  rng = np.random.default_rng(11)
  q, k, v = (jnp.asarray(x) for x in random_qkv(rng, 6, 7, 2, 8))  # 6 windows of 7 tokens
  lengths = np.array([7, 5, 1, 3, 7, 6], np.int32)
  plain = attention.attend(q, k, v, lengths=lengths, implementation="xla")
  padded = attention.attend(*(attention._pad_windows(x, 8) for x in (q, k, v)), lengths=lengths,
                            implementation="xla")[:, :7]
  np.testing.assert_allclose(padded, plain, rtol=1e-6, atol=1e-6)
