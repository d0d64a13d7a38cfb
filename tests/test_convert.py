"""The torch -> t3-jax converter (t3_jax.weights.convert, convert_torch_weights.py).

Layouts (diffusers sharded, Wan original .pth) are checked end to end against
diffusers' WanTransformer3DModel output; bad inputs must fail with one clear line,
exit code 2, and leave nothing behind.
"""

import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

import t3_jax
from t3_jax.weights import checkpoint
from t3_jax.weights import convert
from t3_jax.models import dit


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5

# diffusers -> Wan original key names (docs/T3.md section 6), written independently
# of the converter's tables.
DIFFUSERS_TO_ORIGINAL = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."),
    (r"\.attn1\.norm_([qk])\.", r".self_attn.norm_\1."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
    (r"\.attn2\.norm_([qk])\.", r".cross_attn.norm_\1."),
    (r"\.norm2\.", ".norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]


def to_original(state_dict):
  out = {}
  for key, value in state_dict.items():
    for pattern, repl in DIFFUSERS_TO_ORIGINAL:
      key = re.sub(pattern, repl, key)
    out[key] = value
  return out


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, latents, timesteps, context):
  return nnx.merge(graphdef, state)(latents, timesteps, context)


def forward(model, latents, timesteps, context):
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, *(jnp.asarray(a.numpy()) for a in (latents, timesteps, context))))


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
  """Tiny diffusers Wan2.1 DiT, all weights perturbed; inputs; its output; its state dict."""
  from test_dit import diffusers_wan

  model = diffusers_wan("tiny-wan2.1", seed=2)
  inputs = (torch.randn(1, 16, 2, 4, 6), torch.tensor([777.0]), torch.randn(1, 6, 32))
  with torch.no_grad():
    ref = model(*inputs, return_dict=False)[0].numpy()
  state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  tmp = tmp_path_factory.mktemp("wan")
  save_file(state, tmp / "model.safetensors")
  return dict(model=model, inputs=inputs, ref=ref, state=state, tmp=tmp)


def run_main(argv, capsys):
  rc = convert.main([str(a) for a in argv] + ["--quiet"])
  out, err = capsys.readouterr()
  return rc, out, err


def test_sharded_diffusers_folder_matches_diffusers(wan, tmp_path, capsys):
  wan["model"].save_pretrained(tmp_path / "hf", max_shard_size="100KB")
  shards = [f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]
  assert len(shards) >= 2 and any(f.endswith(".safetensors.index.json") for f in os.listdir(tmp_path / "hf"))

  rc, out, err = run_main([tmp_path / "hf", tmp_path / "ckpt", "--dtype", "fp32"], capsys)
  assert rc == 0, err
  config = checkpoint.read_config(tmp_path / "ckpt", kind="dit")
  assert config["source_layout"] == "diffusers" and config["preset"] == "tiny-wan2.1"
  assert config["dtype"] == "float32"
  model = dit.load_dit(str(tmp_path / "ckpt"), attention="full", dtype=jnp.float32)
  assert rel_err(forward(model, *wan["inputs"]), wan["ref"]) < TOL


def test_original_layout_pth_matches_diffusers(wan, tmp_path, capsys):
  # Wan's names, behind a "model." prefix as some trainers save them.
  state = {f"model.{k}": v for k, v in to_original(wan["state"]).items()}
  torch.save(state, tmp_path / "wan.pth")
  rc, out, err = run_main([tmp_path / "wan.pth", tmp_path / "ckpt", "--dtype", "fp32",
                           "--model", "tiny-wan2.1"], capsys)
  assert rc == 0, err
  assert checkpoint.read_config(tmp_path / "ckpt")["source_layout"] == "original"
  model = t3_jax.load_dit(str(tmp_path / "ckpt"), attention="full", dtype=jnp.float32)  # the public entry
  assert rel_err(forward(model, *wan["inputs"]), wan["ref"]) < TOL


def test_bf16_sources_and_outputs(wan, tmp_path, capsys):
  """bf16 tensors (safetensors and .pth) read exactly; --dtype bf16 rounds like ml_dtypes."""
  assert run_main([wan["tmp"] / "model.safetensors", tmp_path / "fp32", "--dtype", "fp32"], capsys)[0] == 0
  reference, _ = checkpoint.load_checkpoint(str(tmp_path / "fp32"))
  rounded = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), reference)

  bf16_state = {k: v.to(torch.bfloat16) for k, v in wan["state"].items()}
  save_file(bf16_state, tmp_path / "bf16.safetensors")
  torch.save(to_original(bf16_state), tmp_path / "bf16.pth")
  for source in ("bf16.safetensors", "bf16.pth"):
    rc, _, err = run_main([tmp_path / source, tmp_path / f"from_{source}", "--dtype", "fp32"], capsys)
    assert rc == 0, err
    params, _ = checkpoint.load_checkpoint(str(tmp_path / f"from_{source}"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(np.float32)),
                 params, rounded)
  rc, _, err = run_main([wan["tmp"] / "model.safetensors", tmp_path / "bf16", "--dtype", "bf16"], capsys)
  assert rc == 0, err
  params, config = checkpoint.load_checkpoint(str(tmp_path / "bf16"))
  assert config["dtype"] == "bfloat16"
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, rounded)


# --------------------------------------------------------------------- bad inputs

def _truncated(src, dst, fraction=0.6):
  data = open(src, "rb").read()
  with open(dst, "wb") as f:
    f.write(data[:int(len(data) * fraction)])
  return dst


def _bad_truncated_safetensors(wan, tmp):
  return [_truncated(wan["tmp"] / "model.safetensors", tmp / "cut.safetensors")], r"cannot read .*truncated"


def _bad_truncated_pth(wan, tmp):
  torch.save(wan["state"], tmp / "full.pth")
  return [_truncated(tmp / "full.pth", tmp / "cut.pth")], r"cannot read .*cut\.pth.*truncated or corrupt"


def _bad_wrong_model(wan, tmp):
  vae = {"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3), "decoder.conv1.weight": torch.zeros(4, 4, 3, 3, 3),
         "encoder.conv1.bias": torch.zeros(4)}
  save_file(vae, tmp / "vae.safetensors")
  return [tmp / "vae.safetensors"], r"not a Wan DiT checkpoint.*looks like a vae checkpoint \(use --kind vae\)"


def _bad_missing_keys(wan, tmp):
  state = dict(wan["state"])
  del state["blocks.1.ffn.net.2.weight"], state["blocks.0.attn2.norm_k.weight"]
  save_file(state, tmp / "partial.safetensors")
  return [tmp / "partial.safetensors"], (r"2 missing: blocks\.0\.attn2\.norm_k\.weight, "
                                         r"blocks\.1\.ffn\.net\.2\.weight")


def _bad_unexpected_and_misshaped(wan, tmp):
  state = dict(wan["state"])
  state["blocks.0.attn1.add_k_proj.weight"] = torch.zeros(48, 48)
  state["blocks.1.attn1.to_q.weight"] = torch.zeros(48, 40)
  save_file(state, tmp / "odd.safetensors")
  return [tmp / "odd.safetensors"], (r"1 unexpected: blocks\.0\.attn1\.add_k_proj\.weight; "
                                     r"1 mis-shaped: blocks\.1\.attn1\.to_q\.weight is \(48, 40\), expected \(48, 48\)")


def _bad_folder_without_checkpoint(wan, tmp):
  os.makedirs(tmp / "empty")
  (tmp / "empty" / "README.md").write_text("no weights here")
  return [tmp / "empty"], r"holds no \*\.safetensors\.index\.json, \*\.safetensors, \.pth or \.pt"


def _bad_folder_with_shards_but_no_index(wan, tmp):
  os.makedirs(tmp / "shards")
  keys = sorted(wan["state"])
  save_file({k: wan["state"][k] for k in keys[::2]}, tmp / "shards" / "a.safetensors")
  save_file({k: wan["state"][k] for k in keys[1::2]}, tmp / "shards" / "b.safetensors")
  return [tmp / "shards"], r"several checkpoints \(a\.safetensors, b\.safetensors\).*pass the file or the index"


def _bad_output_parent_is_a_file(wan, tmp):
  (tmp / "file").write_text("")
  return [wan["tmp"] / "model.safetensors"], r"cannot create .*/file/ckpt: .*/file is not a directory", \
      tmp / "file" / "ckpt"


def _bad_dit_given_as_vae(wan, tmp):
  return [wan["tmp"] / "model.safetensors", "--kind", "vae"], (
      r"not a Wan VAE checkpoint: .*looks like a dit checkpoint \(use --kind dit\)")


def _bad_wrong_preset(wan, tmp):
  return [wan["tmp"] / "model.safetensors", "--model", "tiny-wan2.2"], (
      r"the checkpoint is not tiny-wan2\.2: dim 48 \(preset 96\)")


BAD_INPUTS = [_bad_truncated_safetensors, _bad_truncated_pth, _bad_wrong_model, _bad_missing_keys,
              _bad_unexpected_and_misshaped, _bad_folder_without_checkpoint,
              _bad_folder_with_shards_but_no_index, _bad_output_parent_is_a_file, _bad_dit_given_as_vae,
              _bad_wrong_preset]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda f: f.__name__[5:])
def test_bad_input_fails_cleanly(case, wan, tmp_path, capsys):
  os.makedirs(tmp_path / "inputs")
  os.makedirs(tmp_path / "outputs")
  argv, pattern, *out = case(wan, tmp_path / "inputs")
  out = out[0] if out else tmp_path / "outputs" / "ckpt"
  _expect_error([argv[0], out, *argv[1:]], pattern, out, capsys)


def test_non_writable_output_dir(wan, tmp_path, capsys, monkeypatch):
  os.makedirs(tmp_path / "locked")
  os.chmod(tmp_path / "locked", 0o500)
  if os.geteuid() == 0:  # root may write anywhere: let os.access answer by the mode bits, as for a user
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and not (
        mode & os.W_OK and not os.stat(path).st_mode & 0o200))
  try:
    _expect_error([wan["tmp"] / "model.safetensors", tmp_path / "locked" / "ckpt"],
                  r"cannot write to .*locked", tmp_path / "locked" / "ckpt", capsys)
  finally:
    os.chmod(tmp_path / "locked", 0o700)


def test_refuses_a_non_empty_output_unless_overwrite(wan, tmp_path, capsys):
  out = tmp_path / "ckpt"
  os.makedirs(out)
  (out / "keep.txt").write_text("precious")
  rc, _, err = run_main([wan["tmp"] / "model.safetensors", out], capsys)
  assert rc == 2 and "not empty" in err and "--overwrite" in err
  assert os.listdir(out) == ["keep.txt"]
  rc, _, err = run_main([wan["tmp"] / "model.safetensors", out, "--overwrite"], capsys)
  assert rc == 0, err
  assert sorted(os.listdir(out)) == ["config.json", "params"]
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_cli_exit_code_and_one_line_error(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "convert_torch_weights.py"), str(tmp_path / "nothing.safetensors"),
       str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == f"error: {tmp_path / 'nothing.safetensors'} does not exist"
  assert not os.path.exists(tmp_path / "out")


def _expect_error(argv, pattern, out_dir, capsys):
  """Exit code 2, one `error: ...` line matching `pattern`, and nothing left on disk."""
  watched = os.path.dirname(out_dir)
  while not os.path.isdir(watched):
    watched = os.path.dirname(watched)
  before = sorted(os.listdir(watched))
  rc, out, err = run_main(argv, capsys)
  assert rc == 2, (out, err)
  lines = err.strip().splitlines()
  assert "Traceback" not in err and lines[-1].startswith("error: "), err
  assert re.search(pattern, lines[-1]), lines[-1]
  assert not os.path.exists(out_dir)
  assert sorted(os.listdir(watched)) == before  # no temp dir left behind


# ------------------------------------------------------- config.json, heads, dtype, mode

def _diffusers_dit(seed=3, **sizes):
  """A diffusers WanTransformer3DModel of any sizes (tiny defaults), every weight perturbed."""
  import diffusers

  kwargs = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16,
                out_channels=16, text_dim=32, freq_dim=64, ffn_dim=80, num_layers=3)
  torch.manual_seed(seed)
  model = diffusers.WanTransformer3DModel(**{**kwargs, **sizes}).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _torch_reference(model, channels=16):
  torch.manual_seed(5)
  inputs = (torch.randn(1, channels, 2, 4, 6), torch.tensor([321.0]), torch.randn(1, 6, 32))
  with torch.no_grad():
    return inputs, model(*inputs, return_dict=False)[0].numpy()


@pytest.mark.parametrize("heads, head_dim", [(2, 24), (2, 64)], ids=["2x24", "2x64"])
def test_diffusers_folder_config_json_gives_the_heads(heads, head_dim, tmp_path, capsys):
  """A diffusers export folder (weights + config.json) whose sizes match no preset: the heads come
  from config.json (2 of 64 is not 1 of 128), and the converted model equals diffusers' forward."""
  model = _diffusers_dit(num_attention_heads=heads, attention_head_dim=head_dim)
  model.save_pretrained(tmp_path / "hf")
  assert os.path.isfile(tmp_path / "hf" / "config.json")
  rc, _, err = run_main([tmp_path / "hf", tmp_path / "ckpt"], capsys)
  assert rc == 0, err
  config = checkpoint.read_config(tmp_path / "ckpt", kind="dit")
  assert (config["num_heads"], config["dim"], config["preset"]) == (heads, heads * head_dim, None)
  assert config["num_layers"] == 3 and config["ffn_dim"] == 80
  assert config["dtype"] == "float32"  # what the folder stores
  inputs, ref = _torch_reference(model)
  ours = forward(dit.load_dit(str(tmp_path / "ckpt"), attention="full", dtype=jnp.float32), *inputs)
  assert rel_err(ours, ref) < TOL


def test_wan_release_config_json(tmp_path, capsys):
  """Wan's own layout beside a Wan release's config.json (dim, num_heads, in_dim, ...)."""
  model = _diffusers_dit(num_attention_heads=2, attention_head_dim=64)
  state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  os.makedirs(tmp_path / "release")
  save_file(to_original(state), tmp_path / "release" / "diffusion_pytorch_model.safetensors")
  with open(tmp_path / "release" / "config.json", "w") as f:
    f.write('{"_class_name": "WanModel", "dim": 128, "eps": 1e-06, "ffn_dim": 80, "freq_dim": 64, '
            '"in_dim": 16, "model_type": "t2v", "num_heads": 2, "num_layers": 3, "out_dim": 16, "text_len": 512}')
  rc, _, err = run_main([tmp_path / "release", tmp_path / "ckpt"], capsys)
  assert rc == 0, err
  config = checkpoint.read_config(tmp_path / "ckpt", kind="dit")
  assert config["num_heads"] == 2 and config["source_layout"] == "original" and config["family"] == "wan2.1"
  inputs, ref = _torch_reference(model)
  ours = forward(dit.load_dit(str(tmp_path / "ckpt"), attention="full", dtype=jnp.float32), *inputs)
  assert rel_err(ours, ref) < TOL


def test_unknown_sizes_without_config_need_num_heads(tmp_path, capsys):
  """No config.json and sizes that match no preset: no head count is guessed. One error line
  naming --num_heads, exit 2, nothing written; with --num_heads it converts."""
  model = _diffusers_dit(num_attention_heads=2, attention_head_dim=64)
  os.makedirs(tmp_path / "inputs")
  save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
            tmp_path / "inputs" / "model.safetensors")
  _expect_error([tmp_path / "inputs" / "model.safetensors", tmp_path / "ckpt"],
                r"match no Wan DiT preset.*pass --num_heads N", tmp_path / "ckpt", capsys)
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "convert_torch_weights.py"), str(tmp_path / "inputs" / "model.safetensors"),
       str(tmp_path / "cli")], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "--num_heads" in result.stderr
  assert not os.path.exists(tmp_path / "cli")

  rc, _, err = run_main([tmp_path / "inputs" / "model.safetensors", tmp_path / "ckpt", "--num_heads", "2"], capsys)
  assert rc == 0, err
  assert checkpoint.read_config(tmp_path / "ckpt")["num_heads"] == 2
  inputs, ref = _torch_reference(model)
  ours = forward(dit.load_dit(str(tmp_path / "ckpt"), attention="full", dtype=jnp.float32), *inputs)
  assert rel_err(ours, ref) < TOL


def test_num_heads_contradicting_config_json(tmp_path, capsys):
  model = _diffusers_dit(num_attention_heads=2, attention_head_dim=64)
  model.save_pretrained(tmp_path / "hf")
  _expect_error([tmp_path / "hf", tmp_path / "ckpt", "--num_heads", "4"],
                r"--num_heads 4 contradicts the source's config\.json \(num_heads 2\)", tmp_path / "ckpt", capsys)


def test_stored_dtype_is_kept_by_default(wan, tmp_path, capsys):
  bf16_state = {k: v.to(torch.bfloat16) for k, v in wan["state"].items()}
  save_file(bf16_state, tmp_path / "bf16.safetensors")
  for source, stored in ((wan["tmp"] / "model.safetensors", "float32"), (tmp_path / "bf16.safetensors", "bfloat16")):
    out = tmp_path / f"ckpt_{stored}"
    rc, _, err = run_main([source, out], capsys)
    assert rc == 0, err
    params, config = checkpoint.load_checkpoint(str(out))
    assert config["dtype"] == stored
    assert {np.asarray(leaf).dtype.name for leaf in jax.tree.leaves(params)} == {stored}
    assert dit.load_dit(str(out), attention="full").blocks.ffn.fc1.kernel[...].dtype == jnp.dtype(stored)
  params, _ = checkpoint.load_checkpoint(str(tmp_path / "ckpt_bfloat16"))
  np.testing.assert_array_equal(np.asarray(params["head"]["modulation"]).astype(np.float32),
                                bf16_state["scale_shift_table"].float().numpy())


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_output_mode_follows_umask(wan, tmp_path, capsys, umask, mode):
  old = os.umask(umask)
  try:
    rc, _, err = run_main([wan["tmp"] / "model.safetensors", tmp_path / "ckpt"], capsys)
  finally:
    os.umask(old)
  assert rc == 0, err
  assert os.stat(tmp_path / "ckpt").st_mode & 0o777 == mode
  assert os.stat(tmp_path / "ckpt" / "params").st_mode & 0o777 == mode
  assert os.stat(tmp_path / "ckpt" / "config.json").st_mode & 0o777 == mode & 0o666


def test_cli_help_exits_0():
  result = subprocess.run([sys.executable, os.path.join(REPO, "convert_torch_weights.py"), "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "--num_heads" in result.stdout and "--dtype" in result.stdout
