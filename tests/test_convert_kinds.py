"""convert_torch_weights.py --kind vae / umt5: torch files -> Orbax -> load_vae / load_umt5.

The models' own parity with diffusers / transformers is in test_vae.py and test_umt5.py;
here the converter's registry, its streaming and its handling of extra keys are checked
end to end on files written in the released layouts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from safetensors.torch import save_file

from t3_jax.weights import convert
from t3_jax.weights import engine
from t3_jax.models import umt5
from t3_jax.models import vae

import diffusers  # noqa: E402  (requirements-test.txt)
import transformers  # noqa: E402


def leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v, np.float32) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def same_trees(a, b):
  a, b = leaves(a), leaves(b)
  # Orbax and the converter give list indices as strings ("0"); compare by value only.
  norm = lambda d: {k.replace("'", ""): v for k, v in d.items()}
  a, b = norm(a), norm(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_vae_diffusers_safetensors_and_wan_pth(tmp_path):
  from test_vae import diffusers_kwargs

  cfg = vae.get_config("tiny-wan2.1")
  torch.manual_seed(0)
  model = diffusers.AutoencoderKLWan(**diffusers_kwargs(cfg)).eval()
  state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  save_file(state, tmp_path / "vae.safetensors")
  assert convert.main([str(tmp_path / "vae.safetensors"), str(tmp_path / "ckpt"), "--kind", "vae",
                       "--dtype", "fp32", "--quiet"]) == 0
  loaded = vae.load_vae(str(tmp_path / "ckpt"), dtype=jnp.float32, param_dtype=jnp.float32)
  expected, _ = engine.convert_state_dict(vae.WEIGHTS, state)
  same_trees(nnx.to_pure_dict(nnx.state(loaded, nnx.Param)), expected)


def test_umt5_hf_checkpoint_with_extra_keys(tmp_path):
  c = umt5.UMT5Config.tiny()
  config = transformers.UMT5Config(
      vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
      num_heads=c.num_heads, relative_attention_num_buckets=c.num_buckets,
      relative_attention_max_distance=c.max_distance, feed_forward_proj="gated-gelu", dropout_rate=0.0,
      attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.UMT5EncoderModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  state["lm_head.weight"] = torch.zeros(4, c.d_model)  # a full T5 export: the encoder skips it
  save_file(state, tmp_path / "umt5.safetensors")
  assert convert.main([str(tmp_path / "umt5.safetensors"), str(tmp_path / "ckpt"), "--kind", "umt5",
                       "--dtype", "fp32", "--quiet"]) == 0
  encoder = umt5.load_umt5(str(tmp_path / "ckpt"), dtype=jnp.float32, param_dtype=jnp.float32)
  ids = np.array([[5, 9, 13, 1, 0, 0], [7, 3, 4, 8, 2, 1]], np.int32)
  mask = (np.arange(6)[None] < np.array([[4], [6]])).astype(np.int32)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(umt5.encode_tokens(encoder, ids, mask))
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
  ref = ref * mask[..., None]
  assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5


def test_wrong_kind_is_named(tmp_path, capsys):
  save_file({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3)}, tmp_path / "vae.safetensors")
  assert convert.main([str(tmp_path / "vae.safetensors"), str(tmp_path / "ckpt"), "--kind", "umt5", "--quiet"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: not a umT5 encoder checkpoint") and "use --kind vae" in err and "\n" not in err
  assert not (tmp_path / "ckpt").exists()
