"""umT5 encoder, tokenizer and key tables against transformers' UMT5EncoderModel / T5Tokenizer."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from t3_jax.models import umt5
from t3_jax.weights import engine

W = umt5.WEIGHTS


def convert(sd, **kwargs):
  """Our nested params of a torch state dict, through the weights engine."""
  return engine.convert_state_dict(W, sd, **kwargs)[0]


def config_from_shapes(shapes):
  return engine.detect(W, shapes).config


def from_params(config, params, **kwargs):
  return engine.from_params(W, config, params, **kwargs)

SEQ = 140  # > max_distance (128): exercises every kind of position bucket
LENGTHS = (SEQ, 57, 9)  # a full row and two padded ones


@pytest.fixture(autouse=True)
def float32_matmuls():
  """GPUs run float32 matmuls as TF32 by default; parity at 1e-5 needs true float32."""
  with jax.default_matmul_precision("highest"):
    yield


def tiny_config():
  return umt5.UMT5Config.tiny()


@pytest.fixture(scope="module")
def hf_model():
  """A tiny HF UMT5EncoderModel with every weight perturbed (norms start at 1)."""
  c = tiny_config()
  torch.manual_seed(0)
  config = transformers.UMT5Config(
      vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
      num_heads=c.num_heads, relative_attention_num_buckets=c.num_buckets,
      relative_attention_max_distance=c.max_distance, feed_forward_proj="gated-gelu", dropout_rate=0.0,
      attn_implementation="eager")
  model = transformers.UMT5EncoderModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  ids = np.zeros((len(LENGTHS), SEQ), np.int32)
  mask = np.zeros((len(LENGTHS), SEQ), np.int32)
  for row, n in enumerate(LENGTHS):
    ids[row, :n - 1] = rng.integers(2, tiny_config().vocab_size, n - 1)
    ids[row, n - 1] = umt5.EOS_ID
    mask[row, :n] = 1
  return ids, mask


@pytest.fixture(scope="module")
def hf_output(hf_model, batch):
  ids, mask = batch
  with torch.no_grad():
    out = hf_model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  return out.last_hidden_state.numpy()


def state_dict(model):
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


def relative_error(ours, reference):
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def hf_to_wan(sd):
  """HF UMT5EncoderModel keys -> Wan's T5Encoder keys, written from wan/modules/t5.py."""
  per_layer = {
      "0.layer_norm.weight": "norm1.weight",
      "0.SelfAttention.q.weight": "attn.q.weight",
      "0.SelfAttention.k.weight": "attn.k.weight",
      "0.SelfAttention.v.weight": "attn.v.weight",
      "0.SelfAttention.o.weight": "attn.o.weight",
      "0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
      "1.layer_norm.weight": "norm2.weight",
      "1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",  # gate = Sequential(Linear, GELU)
      "1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
      "1.DenseReluDense.wo.weight": "ffn.fc2.weight",
  }
  out = {"token_embedding.weight": sd["shared.weight"], "norm.weight": sd["encoder.final_layer_norm.weight"]}
  for key, value in sd.items():
    m = re.fullmatch(r"encoder\.block\.(\d+)\.layer\.(.+)", key)
    if m:
      out[f"blocks.{m.group(1)}.{per_layer[m.group(2)]}"] = value
  return out


def test_relative_position_buckets_match_transformers(hf_model):
  attention = hf_model.encoder.block[0].layer[0].SelfAttention
  ours = umt5.relative_position_buckets(700, 700)
  offsets = torch.arange(-699, 700)
  theirs = attention._relative_position_bucket(offsets).numpy()
  # ours[q, k] depends on k - q only: row 699 covers offsets -699 .. 0, column 699 covers 0 .. 699.
  np.testing.assert_array_equal(np.concatenate([ours[699, :], ours[:699, 699][::-1]]), theirs)


def test_encoder_matches_transformers_with_padding(hf_model, batch, hf_output):
  ids, mask = batch
  config = config_from_shapes({k: tuple(v.shape) for k, v in hf_model.state_dict().items()})
  assert config == tiny_config()
  model = from_params(config, convert(state_dict(hf_model)),
                                dtype=jnp.float32, param_dtype=jnp.float32)
  context = np.asarray(umt5.encode_tokens(model, jnp.asarray(ids), jnp.asarray(mask)))
  assert context.shape == (len(LENGTHS), SEQ, config.d_model) and context.dtype == np.float32
  real = mask.astype(bool)
  assert relative_error(context[real], hf_output[real]) < 1e-5
  assert np.all(context[~real] == 0)
  # Before zeroing, padded positions are HF's last_hidden_state too (the same computation).
  hidden = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  assert relative_error(hidden, hf_output) < 1e-5


def test_wan_layout_round_trip(hf_model, batch, hf_output):
  ids, mask = batch
  wan_sd = hf_to_wan(state_dict(hf_model))
  assert engine.layout_score(W, wan_sd)[0] == "wan"
  config = config_from_shapes({k: tuple(v.shape) for k, v in wan_sd.items()})
  assert config == tiny_config()
  from_wan = convert(wan_sd)
  from_hf, detected = engine.convert_state_dict(W, state_dict(hf_model))
  assert detected.layout == "hf"
  jax.tree.map(np.testing.assert_array_equal, from_wan, from_hf)
  model = from_params(config, from_wan, dtype=jnp.float32, param_dtype=jnp.float32)
  context = np.asarray(umt5.encode_tokens(model, jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  assert relative_error(context[real], hf_output[real]) < 1e-5
  # bf16 checkpoints (Wan ships models_t5_umt5-xxl-enc-bf16.pth) keep their dtype.
  bf16 = convert({k: v.bfloat16() for k, v in wan_sd.items()})
  assert bf16["blocks"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(bf16["final_norm"]["scale"].astype(np.float32),
                                wan_sd["norm.weight"].bfloat16().float().numpy())


def test_state_dict_errors(hf_model):
  sd = hf_to_wan(state_dict(hf_model))
  with pytest.raises(ValueError, match="1 unexpected: extra.weight"):
    convert({**sd, "extra.weight": torch.zeros(1)})
  del sd["blocks.1.ffn.fc2.weight"]
  with pytest.raises(ValueError, match="1 missing: blocks.1.ffn.fc2.weight"):
    convert(sd)
  with pytest.raises(ValueError, match="not a umT5"):
    engine.detect(W, {"foo": (1,)})


def test_bf16_compute_is_close(hf_model, batch, hf_output):
  ids, mask = batch
  model = from_params(tiny_config(), convert(state_dict(hf_model)),
                                dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  context = np.asarray(umt5.encode_tokens(model, jnp.asarray(ids), jnp.asarray(mask)))
  assert context.dtype == np.float32
  real = mask.astype(bool)
  assert relative_error(context[real], hf_output[real]) < 5e-2


def test_xxl_preset_shapes():
  config = umt5.UMT5Config.umt5_xxl()
  model = engine.abstract_model(W, config, param_dtype=jnp.bfloat16)
  params = nnx.to_pure_dict(nnx.state(model))
  assert params["blocks"]["attn"]["q"]["kernel"].shape == (24, 4096, 4096)
  assert params["blocks"]["attn"]["relative_attention_bias"].shape == (24, 32, 64)
  assert params["blocks"]["ffn"]["wo"]["kernel"].shape == (24, 10240, 4096)
  assert params["token_embedding"]["embedding"].shape == (256384, 4096)
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(params))
  assert 5.6e9 < count < 5.8e9  # umT5-XXL encoder: about 5.7B parameters
  # Wan's checkpoint shapes give back the preset.
  wan_shapes = {"token_embedding.weight": (256384, 4096), "norm.weight": (4096,)}
  for i in range(24):
    wan_shapes.update({f"blocks.{i}.attn.{n}.weight": (4096, 4096) for n in "qkvo"})
    wan_shapes.update({f"blocks.{i}.norm1.weight": (4096,), f"blocks.{i}.norm2.weight": (4096,),
                       f"blocks.{i}.ffn.gate.0.weight": (10240, 4096), f"blocks.{i}.ffn.fc1.weight": (10240, 4096),
                       f"blocks.{i}.ffn.fc2.weight": (4096, 10240),
                       f"blocks.{i}.pos_embedding.embedding.weight": (32, 64)})
  assert config_from_shapes(wan_shapes) == config
  # The forward traces at full size (scan over layers), without allocating anything.
  graphdef, state = nnx.split(model)
  tokens = jax.ShapeDtypeStruct((2, 512), jnp.int32)
  out = jax.eval_shape(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask), state, tokens, tokens)
  assert out.shape == (2, 512, 4096) and out.dtype == jnp.float32


# ----------------------------------------------------------------------------- tokenizer

SENTENCES = [
    "A cat sits on the mat.",
    "Une vidéo d'un chat qui joue au soleil.",
    "一只猫在草地上奔跑。",
    "The quick brown fox jumps over the lazy dog 123 times!",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Cinematic 4K footage of waves crashing at sunset, slow motion.",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  import sentencepiece
  path = tmp_path_factory.mktemp("umt5-xxl")
  # umT5's special ids: pad 0, eos 1, unk 2, no bos.
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(SENTENCES * 20), model_prefix=str(path / "spiece"), vocab_size=120,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", character_coverage=1.0,
      hard_vocab_limit=False, minloglevel=2)
  return path


def test_tokenizer_matches_sentencepiece_and_transformers(tokenizer_dir):
  import sentencepiece
  ours = umt5.UMT5Tokenizer.from_dir(str(tokenizer_dir))
  processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "spiece.model"))
  hf = transformers.T5Tokenizer.from_pretrained(str(tokenizer_dir), extra_ids=0)
  prompts = SENTENCES + ["hello wörld ñ 42 zebra", "cat " * 40]  # unseen characters; one to truncate
  max_length = 24
  ids, mask = ours(prompts, max_length)
  expected = hf(prompts, padding="max_length", max_length=max_length, truncation=True,
                add_special_tokens=True, return_attention_mask=True)
  np.testing.assert_array_equal(ids, np.array(expected["input_ids"]))
  np.testing.assert_array_equal(mask, np.array(expected["attention_mask"]))
  for row, prompt in enumerate(prompts):  # sentencepiece's ids (truncated), EOS, padding
    tokens = processor.encode(prompt)[:max_length - 1] + [umt5.EOS_ID]
    np.testing.assert_array_equal(ids[row], tokens + [umt5.PAD_ID] * (max_length - len(tokens)))
  assert mask[-1].all() and not mask[0].all()  # one prompt truncated, one padded


def test_tokenizer_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    umt5.UMT5Tokenizer.from_dir(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="spiece.model"):
    umt5.UMT5Tokenizer.from_dir(str(tmp_path))


def test_clean_prompt():
  assert umt5.clean_prompt("  A &amp;amp; B\n\t cat &lt;3  ") == "A & B cat <3"


def test_encode_text_zeroes_padding(hf_model, tokenizer_dir, hf_output):
  tokenizer = umt5.UMT5Tokenizer.from_dir(str(tokenizer_dir))
  config = tiny_config()
  model = from_params(config, convert(state_dict(hf_model)),
                                dtype=jnp.float32, param_dtype=jnp.float32)
  prompts = ["A cat  sits on\nthe mat.", "&lt;b&gt; waves"]
  context = np.asarray(umt5.encode_text(model, tokenizer, prompts, max_length=32))
  ids, mask = tokenizer([umt5.clean_prompt(p) for p in prompts], 32)
  assert context.shape == (2, 32, config.d_model)
  with torch.no_grad():
    expected = hf_model(input_ids=torch.from_numpy(ids).long(),
                        attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
  expected = expected * mask[..., None]  # what WanPipeline._get_t5_prompt_embeds returns
  assert relative_error(context, expected) < 1e-5
  assert np.all(context[mask == 0] == 0) and np.all(np.abs(context[mask == 1]).sum(-1) > 0)


# ----------------------------------------------------------------------------- checkpoint


def test_load_umt5_round_trip(hf_model, batch, hf_output, tmp_path):
  from t3_jax.weights import checkpoint
  ids, mask = batch
  config = tiny_config()
  params = convert(state_dict(hf_model))
  checkpoint.save_checkpoint(str(tmp_path / "umt5"), params, {"kind": "umt5", **config.to_dict()})
  model = umt5.load_umt5(str(tmp_path / "umt5"), dtype=jnp.float32, param_dtype=jnp.float32)
  assert model.config == config
  context = np.asarray(umt5.encode_tokens(model, jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  assert relative_error(context[real], hf_output[real]) < 1e-5
  bf16 = umt5.load_umt5(str(tmp_path / "umt5"))
  assert bf16.blocks.attn.q.kernel[...].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="'vae' checkpoint, not a umT5 encoder"):
    checkpoint.save_checkpoint(str(tmp_path / "vae"), {"w": np.zeros(2)}, {"kind": "vae"})
    umt5.load_umt5(str(tmp_path / "vae"))


def test_hf_full_model_keys_are_accepted(hf_model):
  """A UMT5ForConditionalGeneration-style dict: the decoder and lm_head are skipped; either
  embedding key works."""
  sd = state_dict(hf_model)
  reference = convert(sd)
  full = {**sd, "decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(32, 32),
          "lm_head.weight": torch.zeros(128, 32)}
  rules, ignored = engine.resolve_rules(W, "hf", None, full)
  assert ("shared.weight", "token_embedding/embedding", "identity") in rules
  assert ignored == ["decoder.block.0.layer.0.SelfAttention.q.weight", "encoder.embed_tokens.weight",
                     "lm_head.weight"]
  only_encoder_copy = {k: v for k, v in sd.items() if k != "shared.weight"}
  for variant in (full, only_encoder_copy):
    jax.tree.map(np.testing.assert_array_equal, convert(variant), reference)
  with pytest.raises(ValueError, match="do not fit"):
    from_params(umt5.UMT5Config.tiny(), {**reference, "final_norm": {"scale": np.ones(7)}})
