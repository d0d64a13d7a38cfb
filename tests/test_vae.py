"""t3_jax.models.vae against diffusers' AutoencoderKLWan (Wan2.1 and Wan2.2 structure, tiny widths, fp32).

- parity of encode (mean and log-variance) and decode, for 1, 5 and 9 frames;
- Wan's original checkpoint layout: a state dict written by an independent key mapping loads to the
  same parameters as the diffusers one; config detection on the full-size Wan2.1/Wan2.2 key sets;
- tiled decode/encode against DiffSynth's blending (the T3 release's) of per-tile diffusers outputs,
  and tiled vs untiled decode.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.models.autoencoders import autoencoder_kl_wan as dwan  # noqa: E402

from t3_jax.models import vae as V  # noqa: E402
from t3_jax.weights import engine  # noqa: E402


def convert(state_dict):
  """Our nested params of a torch state dict, through the weights engine."""
  return engine.convert_state_dict(V.WEIGHTS, state_dict)[0]

TINY = ["tiny-wan2.1", "tiny-wan2.2"]
TOL = 1e-5  # max |ours - reference| / max |reference|


def diffusers_kwargs(cfg: V.VAEConfig) -> dict:
  return dict(
      base_dim=cfg.base_dim, decoder_base_dim=cfg.decoder_base_dim, z_dim=cfg.z_dim,
      dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
      temperal_downsample=list(cfg.temporal_downsample), is_residual=cfg.is_residual,
      in_channels=cfg.in_channels, out_channels=cfg.in_channels,
      patch_size=cfg.patch_size if cfg.patch_size > 1 else None, scale_factor_spatial=cfg.spatial_stride,
      latents_mean=list(cfg.latents_mean) or [0.0] * cfg.z_dim,
      latents_std=list(cfg.latents_std) or [1.0] * cfg.z_dim)


_MODELS = {}


def models(name: str):
  """(diffusers model with every weight perturbed, our model loaded from its state dict), cached."""
  if name not in _MODELS:
    cfg = V.get_config(name)
    torch_model = AutoencoderKLWan(**diffusers_kwargs(cfg)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move every tensor (gammas 1, biases 0) off its init, at its own scale
      for p in torch_model.parameters():
        scale = p.std() if p.ndim > 1 else 0.1
        p.add_(torch.randn(p.shape, generator=g) * scale)
    params = convert(torch_model.state_dict())
    _MODELS[name] = torch_model, engine.from_params(V.WEIGHTS, cfg, params)
  return _MODELS[name]


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def torch_decode_unclamped(torch_model, z: np.ndarray) -> np.ndarray:
  """diffusers' `_decode` loop without its final clamp (tiles are blended before clamping)."""
  with torch.no_grad():
    torch_model.clear_cache()
    x = torch_model.post_quant_conv(torch.from_numpy(z))
    frames = []
    for i in range(x.shape[2]):
      torch_model._conv_idx = [0]
      frames.append(torch_model.decoder(x[:, :, i:i + 1], feat_cache=torch_model._feat_map,
                                        feat_idx=torch_model._conv_idx, first_chunk=i == 0))
    out = torch.cat(frames, 2)
    if torch_model.config.patch_size is not None:
      out = dwan.unpatchify(out, torch_model.config.patch_size)
    torch_model.clear_cache()
    return out.numpy()


# ------------------------------------------------------------------------------------------------
# Parity with diffusers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_encode_decode_match_diffusers(name):
  torch_model, vae = models(name)
  cfg = vae.config
  s = cfg.spatial_stride
  rng = np.random.default_rng(0)

  # Encode 9 frames once; causality makes the prefixes the encodings of the 1- and 5-frame clips.
  video = rng.uniform(-1, 1, (1, 3, 9, 2 * s, 3 * s)).astype(np.float32)
  mean, logvar = vae.encode(jnp.asarray(video), return_logvar=True)
  for frames in (1, 5, 9):
    with torch.no_grad():
      dist = torch_model.encode(torch.from_numpy(video[:, :, :frames])).latent_dist
    n = 1 + (frames - 1) // 4
    assert rel_err(mean[:, :, :n], dist.mean) < TOL, frames
    assert rel_err(logvar[:, :, :n], dist.logvar) < TOL, frames

  # Decode 3 latent frames (9 video frames) once; compare with diffusers on 1, 2 and 3 latent frames.
  z = rng.standard_normal((1, cfg.z_dim, 3, 2, 3)).astype(np.float32)
  decoded = vae.decode(jnp.asarray(z), tiled=False)
  assert decoded.shape == (1, 3, 9, 2 * s, 3 * s)
  for n in (1, 2, 3):
    with torch.no_grad():
      ref = torch_model.decode(torch.from_numpy(z[:, :, :n])).sample.numpy()
    assert rel_err(decoded[:, :, :1 + 4 * (n - 1)], ref) < TOL, n


def test_latent_normalization():
  z = np.random.default_rng(1).standard_normal((2, 16, 3, 4, 5)).astype(np.float32)
  mean = np.asarray(V.WAN21_LATENTS_MEAN, np.float32).reshape(1, 16, 1, 1, 1)
  std = np.asarray(V.WAN21_LATENTS_STD, np.float32).reshape(1, 16, 1, 1, 1)
  normalized = V.normalize_latents(jnp.asarray(z), "wan2.1")
  np.testing.assert_allclose(normalized, (z - mean) / std, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(V.denormalize_latents(normalized, "wan2.1"), z, rtol=1e-5, atol=1e-5)
  assert len(V.PRESETS["wan2.2"].latents_mean) == len(V.PRESETS["wan2.2"].latents_std) == 48


def test_bad_inputs_raise():
  _, vae = models("tiny-wan2.1")
  with pytest.raises(ValueError, match="1 \\+ 4n"):
    vae.encode(jnp.zeros((1, 3, 4, 16, 16)))
  with pytest.raises(ValueError, match="multiples of 8"):
    vae.encode(jnp.zeros((1, 3, 5, 12, 16)))
  with pytest.raises(ValueError, match="latents must be"):
    vae.decode(jnp.zeros((1, 5, 2, 2, 2)))
  with pytest.raises(ValueError, match="stride"):
    V.tile_starts(10, 4, 5)


# ------------------------------------------------------------------------------------------------
# Checkpoint layouts
# ------------------------------------------------------------------------------------------------


def diffusers_key_to_wan(key: str, cfg: V.VAEConfig) -> str:
  """Wan's original key for a diffusers key: the inverse of diffusers' convert_vae / convert_vae_22,
  written independently of t3_jax.models.vae's tables."""
  nrb = cfg.num_res_blocks
  rules = [  # inside residual blocks first, while conv1/conv2 can only mean theirs
      (r"\.norm1\.gamma$", ".residual.0.gamma"), (r"\.conv1\.(weight|bias)$", r".residual.2.\1"),
      (r"\.norm2\.gamma$", ".residual.3.gamma"), (r"\.conv2\.(weight|bias)$", r".residual.6.\1"),
      (r"\.conv_shortcut\.", ".shortcut."),
      (r"^quant_conv\.", "conv1."), (r"^post_quant_conv\.", "conv2."),
      (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
      (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."), (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
      (r"\.mid_block\.resnets\.0\.", ".middle.0."), (r"\.mid_block\.attentions\.0\.", ".middle.1."),
      (r"\.mid_block\.resnets\.1\.", ".middle.2."),
  ]
  if cfg.is_residual:
    rules += [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.downsamples.\1.downsamples."),
        (r"^encoder\.down_blocks\.(\d+)\.downsampler\.", rf"encoder.downsamples.\1.downsamples.{nrb}."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", r"decoder.upsamples.\1.upsamples."),
        (r"^decoder\.up_blocks\.(\d+)\.upsampler\.", rf"decoder.upsamples.\1.upsamples.{nrb + 1}."),
    ]
  else:  # Wan2.1: flat lists; a decoder stage is nrb + 1 residual blocks then one upsampler
    per_stage = nrb + 2
    rules += [
        (r"^encoder\.down_blocks\.", "encoder.downsamples."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"decoder.upsamples.{int(m[1]) * per_stage + int(m[2])}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda m: f"decoder.upsamples.{int(m[1]) * per_stage + nrb + 1}."),
    ]
  for pattern, repl in rules:
    key = re.sub(pattern, repl, key)
  return key


def assert_trees_equal(a, b):
  flat_a, flat_b = nnx.traversals.flatten_mapping(a), nnx.traversals.flatten_mapping(b)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=str(k))


@pytest.mark.parametrize("name", TINY)
def test_wan_layout_round_trip(name):
  torch_model, _ = models(name)
  cfg = V.get_config(name)
  diffusers_sd = torch_model.state_dict()
  wan_sd = {diffusers_key_to_wan(k, cfg): v for k, v in diffusers_sd.items()}
  assert len(wan_sd) == len(diffusers_sd)
  assert engine.layout_score(V.WEIGHTS, wan_sd)[0] == "wan"
  assert engine.layout_score(V.WEIGHTS, diffusers_sd)[0] == "diffusers"
  assert engine.detect(V.WEIGHTS, {k: v.shape for k, v in wan_sd.items()}).config == cfg
  assert_trees_equal(convert(wan_sd), convert(diffusers_sd))
  # DiffSynth wraps the original checkpoint as {"model.<key>": ...}; that loads the same.
  wrapped = {f"model.{k}": v for k, v in wan_sd.items()}
  assert_trees_equal(convert(wrapped), convert(wan_sd))


@pytest.mark.parametrize("name", ["wan2.1", "wan2.2"])
def test_full_size_tables_and_config_detection(name):
  """The real Wan2.1/Wan2.2 key sets (diffusers modules on the meta device, and their Wan-layout names)
  are covered exactly by the tables, with shapes that fit our model, and give back the preset."""
  cfg = V.PRESETS[name]
  with torch.device("meta"):
    torch_model = AutoencoderKLWan(**diffusers_kwargs(cfg))
  diffusers_shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
  wan_shapes = {diffusers_key_to_wan(k, cfg): s for k, s in diffusers_shapes.items()}
  expected = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: V.WanVAE(cfg)), nnx.Param))
  leaves = {engine.path_name(path): leaf for path, leaf in engine.flatten(expected).items()}
  for layout, shapes in (("diffusers", diffusers_shapes), ("wan", wan_shapes)):
    assert engine.detect(V.WEIGHTS, shapes).config == cfg
    rules = V.torch_rules(cfg, layout)
    assert len(rules) == len(shapes) and {key for key, _, _ in rules} == shapes.keys()
    covered = set()
    for key, path, transform in rules:
      converted = engine.TRANSFORMS[transform](np.broadcast_to(np.float32(0), shapes[key]))
      leaf = leaves[path]
      assert converted.shape == leaf.shape, key
      covered.add(path)
    assert len(covered) == len(nnx.traversals.flatten_mapping(expected))


# ------------------------------------------------------------------------------------------------
# Tiling
# ------------------------------------------------------------------------------------------------


def diffsynth_mask(h, w, is_bound, border):
  """DiffSynth's WanVideoVAE.build_mask (linear ramps on inner edges, min of the row and column ramps)."""
  def ramp(length, left_bound, right_bound, width):
    x = np.ones(length, np.float32)
    if not left_bound:
      x[:width] = (np.arange(width) + 1) / width
    if not right_bound:
      x[-width:] = np.flip((np.arange(width) + 1) / width)
    return x
  rows = ramp(h, is_bound[0], is_bound[1], border[0])
  cols = ramp(w, is_bound[2], is_bound[3], border[1])
  return np.minimum(rows[:, None], cols[None, :])


def reference_tiled(run_tile, inputs, size_hw, tile, stride, scale, out_shape):
  """DiffSynth's tiled_decode/tiled_encode accumulation (values += tile * mask; values / weight), over
  tiles every `stride` with the last one moved back to end at the border (t3_jax.models.vae's tile grid)."""
  def starts(size, t, s):
    out = list(range(0, size - t + 1, s))
    return out if out[-1] + t >= size else out + [size - t]
  (H, W), (th, tw) = size_hw, tile
  values, weight = np.zeros(out_shape, np.float32), np.zeros(out_shape[-2:], np.float32)
  border = ((tile[0] - stride[0]) * scale, (tile[1] - stride[1]) * scale)
  for h in starts(H, th, stride[0]):
    for w in starts(W, tw, stride[1]):
      out = run_tile(inputs, h, w)
      mask = diffsynth_mask(th * scale, tw * scale, (h == 0, h + th >= H, w == 0, w + tw >= W), border)
      values[..., h * scale:(h + th) * scale, w * scale:(w + tw) * scale] += out * mask
      weight[h * scale:(h + th) * scale, w * scale:(w + tw) * scale] += mask
  return values / weight


def test_tile_grid_matches_diffsynth_when_aligned():
  # DiffSynth's task list: every stride, skipping tiles whose predecessor already reached the border.
  def diffsynth_starts(size, t, s):
    return [h for h in range(0, size, s) if not (h - s >= 0 and h - s + t >= size)]
  assert V.tile_starts(272, 30, 15) == diffsynth_starts(272, 30, 15)[:-1] + [242]  # 4K Wan2.1 rows
  for size, t, s in [(6, 4, 2), (480, 52, 26), (136, 30, 15), (30, 30, 15)]:
    if (size - t) % s == 0:
      assert V.tile_starts(size, t, s) == diffsynth_starts(size, t, s)
  assert V.tile_starts(7, 4, 2) == [0, 2, 3] and V.tile_starts(3, 4, 2) == [0]


@pytest.mark.parametrize("name", TINY)
def test_tiled_decode_matches_reference_blend(name):
  torch_model, vae = models(name)
  cfg, s = vae.config, vae.config.spatial_stride
  z = np.random.default_rng(2).standard_normal((1, cfg.z_dim, 2, 6, 7)).astype(np.float32)
  tile, stride = (4, 4), (2, 2)  # rows at 0, 2; columns at 0, 2, 3 (the last one moved back)
  ours = vae.decode(jnp.asarray(z), tiled=True, tile=tile, stride=stride)
  ref = reference_tiled(
      lambda x, h, w: torch_decode_unclamped(torch_model, np.ascontiguousarray(x[..., h:h + 4, w:w + 4])),
      z, (6, 7), tile, stride, s, (1, 3, 5, 6 * s, 7 * s))
  assert rel_err(ours, np.clip(ref, -1, 1)) < TOL


def test_tiled_encode_matches_reference_blend():
  torch_model, vae = models("tiny-wan2.1")
  s = vae.config.spatial_stride
  video = np.random.default_rng(3).uniform(-1, 1, (1, 3, 5, 6 * s, 7 * s)).astype(np.float32)
  tile, stride = (4, 4), (2, 2)
  ours = vae.encode(jnp.asarray(video), tiled=True, tile=tile, stride=stride)

  def encode_tile(x, h, w):
    with torch.no_grad():
      x = torch.from_numpy(np.ascontiguousarray(x[..., h * s:(h + 4) * s, w * s:(w + 4) * s]))
      return torch_model.encode(x).latent_dist.mean.numpy()
  ref = reference_tiled(encode_tile, video, (6, 7), tile, stride, 1, (1, vae.config.z_dim, 2, 6, 7))
  assert rel_err(ours, ref) < TOL


def test_tiled_decode_vs_untiled():
  """Tiled vs untiled decode of one model (tiny Wan2.1, one latent frame, tiles along the rows).

  Bound asserted: equality (1e-5) wherever only one tile has weight and that pixel is farther than the
  decoder's receptive field from the tile's inner edge. The mid-block attention sees a whole tile, so
  it is switched off (proj = 0 makes it the identity) to give the decoder a finite receptive field,
  in latent pixels: conv_in 1 + mid block 4 + stage convs 4 + 2 + 1 + 0.5 (at 1, 2, 4, 8x) + resample
  convs 0.5 + 0.25 + 0.125 + conv_out 0.125 = 13.5 (< 15 with nearest-upsampling rounding); the
  single-tile rows below are >= 18 latent pixels from the other tile's edge.
  Inside the blend bands nothing tighter holds for random weights (the blend itself is checked
  exactly above); and a tile covering the whole latent must give the untiled result.
  """
  _, vae = models("tiny-wan2.1")
  params = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(vae, nnx.Param)))
  for leaf in params["decoder"]["mid_block"]["attention"]["proj"].values():
    leaf[...] = 0
  local = engine.from_params(V.WEIGHTS, vae.config, params)
  s = vae.config.spatial_stride
  z = jnp.asarray(np.random.default_rng(4).standard_normal((1, vae.config.z_dim, 1, 54, 2)), jnp.float32)

  untiled = np.asarray(local.decode(z, tiled=False))
  tiled = np.asarray(local.decode(z, tiled=True, tile=(36, 2), stride=(18, 2)))  # rows [0, 36), [18, 54)
  single_tile_rows = np.r_[0:18 * s, 36 * s:54 * s]
  np.testing.assert_allclose(tiled[..., single_tile_rows, :], untiled[..., single_tile_rows, :], atol=1e-5)
  assert np.abs(tiled - untiled).max() > 1e-3  # the overlap band does differ: the test can see tiling

  whole = np.asarray(local.decode(z, tiled=True, tile=(64, 64), stride=(32, 32)))
  np.testing.assert_allclose(whole, untiled, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Orbax checkpoint
# ------------------------------------------------------------------------------------------------


def test_save_and_load_vae(tmp_path):
  from t3_jax.weights import checkpoint
  _, vae = models("tiny-wan2.2")
  V.save_vae(str(tmp_path / "vae"), vae)
  assert checkpoint.read_config(str(tmp_path / "vae"))["kind"] == "vae"
  loaded = V.load_vae(str(tmp_path / "vae"), dtype=jnp.float32)
  assert loaded.config == vae.config
  assert_trees_equal(nnx.to_pure_dict(nnx.state(loaded, nnx.Param)), nnx.to_pure_dict(nnx.state(vae, nnx.Param)))
