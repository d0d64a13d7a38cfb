"""umT5-XXL text encoder (Wan's text encoder) in Flax NNX, its tokenizer and its torch key tables.

Wan encodes a prompt as follows (wan/modules/t5.py, diffusers' WanPipeline._get_t5_prompt_embeds):
  1. clean the prompt: ftfy.fix_text, html.unescape twice, collapse whitespace, strip;
  2. tokenize with umT5's sentencepiece vocabulary, append EOS (id 1), truncate to 512 tokens,
     pad with id 0 to 512; attention mask = 1 on real tokens (EOS included);
  3. run the umT5 encoder with that mask;
  4. zero the output past each prompt's length -> context [batch, 512, 4096].

The encoder, a T5 v1.1 encoder with umT5's per-layer position bias:
  x = token_embedding(ids)
  per layer:  x += Attention(RMSNorm(x))     no 1/sqrt(d) scaling; each layer has its own
                                             relative position bias (32 bidirectional buckets,
                                             max distance 128), added to the logits
              x += FFN(RMSNorm(x))           wo(gelu_tanh(wi_0 x) * wi_1 x)
  out = RMSNorm(x)                           RMSNorm = T5LayerNorm: no mean, no bias, eps 1e-6

The layers are one module with a leading layer axis, run by jax.lax.scan.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3_jax.weights import engine
from t3_jax.logs import warn_once


PAD_ID = 0
EOS_ID = 1
TEXT_LENGTH = 512  # Wan's text_len: every prompt is padded to 512 tokens


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  """Sizes of a umT5 encoder. Defaults are umT5-XXL as Wan uses it."""
  vocab_size: int = 256384
  d_model: int = 4096
  d_kv: int = 64  # head dim
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  num_buckets: int = 32  # relative position buckets (half per direction)
  max_distance: int = 128  # distances beyond this share the last bucket
  eps: float = 1e-6

  @classmethod
  def umt5_xxl(cls) -> "UMT5Config":
    return cls()

  @classmethod
  def tiny(cls) -> "UMT5Config":
    """For tests: a few thousand parameters per layer."""
    return cls(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "UMT5Config":
    """Reads the fields it knows; other keys (e.g. a checkpoint's "kind") are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


UMT5_PRESETS = {"umt5-xxl": UMT5Config.umt5_xxl()}


# ----------------------------------------------------------------------------- modules


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int = 32,
                              max_distance: int = 128) -> np.ndarray:
  """Bidirectional T5 bucket of (key position - query position), [query_length, key_length] int32.

  Half the buckets per direction; within one direction half of them are exact distances
  (0 .. max_exact-1), the rest logarithmic up to max_distance. Computed in float32 like the
  torch references so that bucket boundaries agree exactly. A trace-time constant.
  """
  relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  num_buckets //= 2
  buckets = (relative > 0).astype(np.int32) * num_buckets
  distance = np.abs(relative)
  max_exact = num_buckets // 2
  # The log branch is only used where distance >= max_exact; clamp to avoid log(0).
  ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)
  log_ratio = np.log(ratio) / np.float32(math.log(max_distance / max_exact))
  large = max_exact + (log_ratio * np.float32(num_buckets - max_exact)).astype(np.int32)
  large = np.minimum(large, num_buckets - 1)
  return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class RMSNorm(nnx.Module):
  """T5LayerNorm: x / sqrt(mean(x^2) + eps) * scale, no mean subtraction, computed in float32."""

  def __init__(self, dim: int, eps: float = 1e-6, *, dtype=jnp.float32, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Attention(nnx.Module):
  """T5 self-attention with this layer's relative position bias; logits are not scaled."""

  def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    inner = config.num_heads * config.d_kv
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = linear(config.d_model, inner)
    self.k = linear(config.d_model, inner)
    self.v = linear(config.d_model, inner)
    self.o = linear(inner, config.d_model)
    # [num_buckets, heads]: umT5 gives every layer its own table (T5 shares layer 0's).
    self.relative_attention_bias = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (config.num_buckets, config.num_heads), param_dtype))
    self.num_heads = config.num_heads
    self.dtype = dtype

  def __call__(self, x, mask, buckets):
    """x: [batch, tokens, d_model]; mask: [batch, tokens] bool (False = padding);
    buckets: [tokens, tokens] int32 relative position buckets."""
    b, n, _ = x.shape
    split_heads = lambda y: y.reshape(b, n, self.num_heads, -1)  # [batch, tokens, heads, head_dim]
    q, k, v = split_heads(self.q(x)), split_heads(self.k(x)), split_heads(self.v(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    position_bias = jnp.take(self.relative_attention_bias[...].astype(jnp.float32), buckets, axis=0)
    logits = logits + position_bias.transpose(2, 0, 1)[None]  # [1, heads, tokens, tokens]
    # Padded keys are masked out (Wan: masked_fill with the dtype's min); padded queries still
    # attend to the real keys and are zeroed by encode_tokens.
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, -1)
    return self.o(out)


class GatedGeluFFN(nnx.Module):
  """wo(gelu_tanh(wi_0 x) * wi_1 x) (T5 v1.1 "gated-gelu"; Wan: fc2(fc1(x) * gelu(gate(x))))."""

  def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wi_0 = linear(config.d_model, config.d_ff)
    self.wi_1 = linear(config.d_model, config.d_ff)
    self.wo = linear(config.d_ff, config.d_model)

  def __call__(self, x):
    return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class Block(nnx.Module):
  """One encoder layer: pre-norm self-attention then pre-norm gated-GELU FFN, both residual."""

  def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.d_model, config.eps, dtype=dtype, param_dtype=param_dtype)
    self.attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ffn_norm = RMSNorm(config.d_model, config.eps, dtype=dtype, param_dtype=param_dtype)
    self.ffn = GatedGeluFFN(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, mask, buckets):
    # The residual stream stays float32 whatever the compute dtype.
    x = x + self.attn(self.attn_norm(x), mask, buckets).astype(jnp.float32)
    return x + self.ffn(self.ffn_norm(x)).astype(jnp.float32)


class UMT5Encoder(nnx.Module):
  """umT5 encoder. Params: token_embedding, blocks (leading layer axis), final_norm.

  dtype: compute dtype of the matmuls (bfloat16 for real use); norms, logits, softmax and the
  residual stream are float32. param_dtype: storage dtype of the parameters.
  """

  def __init__(self, config: UMT5Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.token_embedding = nnx.Embed(config.vocab_size, config.d_model, dtype=param_dtype,
                                     param_dtype=param_dtype,
                                     embedding_init=nnx.initializers.normal(1.0), rngs=rngs)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(config.d_model, config.eps, dtype=jnp.float32, param_dtype=param_dtype)

  def __call__(self, input_ids, attention_mask):
    """input_ids, attention_mask: [batch, tokens] -> hidden states [batch, tokens, d_model] float32.

    Like HF's last_hidden_state, padded positions are not zeroed here (see encode_tokens).
    """
    n = input_ids.shape[1]
    mask = attention_mask.astype(bool)
    buckets = relative_position_buckets(n, n, self.config.num_buckets, self.config.max_distance)
    x = self.token_embedding(input_ids).astype(jnp.float32)

    graphdef, stacked = nnx.split(self.blocks)

    def layer(x, layer_state):
      return nnx.merge(graphdef, layer_state)(x, mask, buckets), None

    x, _ = jax.lax.scan(layer, x, stacked)
    return self.final_norm(x)


# ----------------------------------------------------------------------------- tokenizer


class UMT5Tokenizer:
  """umT5's sentencepiece tokenizer, as HF's T5TokenizerFast uses it for Wan.

  __call__ gives ids with EOS (1) appended, truncated to max_length, padded with 0, and the
  attention mask (1 on real tokens and EOS).
  """

  def __init__(self, processor):
    self.processor = processor

  @classmethod
  def from_dir(cls, path: str) -> "UMT5Tokenizer":
    """Reads `path/spiece.model` (the `google/umt5-xxl/` folder of a Wan release)."""
    if not os.path.isdir(path):
      raise FileNotFoundError(f"tokenizer folder {path} not found: pass the google/umt5-xxl/ folder "
                              "that ships with the Wan weights")
    model_file = os.path.join(path, "spiece.model")
    if not os.path.isfile(model_file):
      raise FileNotFoundError(f"{path} has no spiece.model: copy spiece.model from the Wan release's "
                              "google/umt5-xxl/ folder (or huggingface.co/google/umt5-xxl) into it")
    import sentencepiece  # imported here: only tokenizing needs it
    return cls(sentencepiece.SentencePieceProcessor(model_file=model_file))

  def __call__(self, prompts: Sequence[str], max_length: int = TEXT_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """prompts -> (input_ids, attention_mask), both [len(prompts), max_length] int32."""
    if isinstance(prompts, str):
      raise ValueError("prompts must be a list of strings, not one string: wrap it as [prompt]")
    ids = np.full((len(prompts), max_length), PAD_ID, np.int32)
    mask = np.zeros((len(prompts), max_length), np.int32)
    for row, pieces in enumerate(self.processor.encode(list(prompts))):
      tokens = pieces[:max_length - 1] + [EOS_ID]  # truncation keeps room for EOS, like HF
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask


def clean_prompt(text: str) -> str:
  """Wan's prompt cleaning: ftfy.fix_text, html.unescape twice, collapse whitespace, strip."""
  try:
    import ftfy
    text = ftfy.fix_text(text)
  except ImportError:
    warn_once("ftfy is not installed: prompts are cleaned without ftfy.fix_text (html unescape and "
              "whitespace only); `pip install ftfy` to match Wan exactly on mis-encoded text")
  text = html.unescape(html.unescape(text)).strip()
  return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------- encoding


@nnx.jit
def encode_tokens(model: UMT5Encoder, input_ids, attention_mask):
  """[batch, tokens] ids and mask -> context [batch, tokens, d_model] float32, zero past each length."""
  hidden = model(input_ids, attention_mask)
  return jnp.where(attention_mask.astype(bool)[..., None], hidden, 0.0)


def encode_text(model: UMT5Encoder, tokenizer: UMT5Tokenizer, prompts: Sequence[str],
                max_length: int = TEXT_LENGTH) -> jax.Array:
  """Prompts -> Wan's text context [len(prompts), max_length, d_model] float32, padding zeroed."""
  ids, mask = tokenizer([clean_prompt(p) for p in prompts], max_length)
  return encode_tokens(model, jnp.asarray(ids), jnp.asarray(mask))


# ----------------------------------------------------------------------------- torch checkpoints

# Transforms: "identity"; "transpose" for torch Linear weights (out, in) -> our kernels (in, out).
_WAN_RULES = [
    # Wan's own layout (wan/modules/t5.py T5Encoder; models_t5_umt5-xxl-enc-bf16.pth, diffsynth).
    ("token_embedding.weight", "token_embedding/embedding", "identity"),
    ("blocks.{i}.norm1.weight", "blocks/attn_norm/scale", "identity"),
    ("blocks.{i}.attn.q.weight", "blocks/attn/q/kernel", "transpose"),
    ("blocks.{i}.attn.k.weight", "blocks/attn/k/kernel", "transpose"),
    ("blocks.{i}.attn.v.weight", "blocks/attn/v/kernel", "transpose"),
    ("blocks.{i}.attn.o.weight", "blocks/attn/o/kernel", "transpose"),
    ("blocks.{i}.pos_embedding.embedding.weight", "blocks/attn/relative_attention_bias", "identity"),
    ("blocks.{i}.norm2.weight", "blocks/ffn_norm/scale", "identity"),
    ("blocks.{i}.ffn.gate.0.weight", "blocks/ffn/wi_0/kernel", "transpose"),  # the GELU branch
    ("blocks.{i}.ffn.fc1.weight", "blocks/ffn/wi_1/kernel", "transpose"),
    ("blocks.{i}.ffn.fc2.weight", "blocks/ffn/wo/kernel", "transpose"),
    ("norm.weight", "final_norm/scale", "identity"),
]

_HF_RULES = [
    # Hugging Face UMT5EncoderModel (also the encoder half of UMT5Model/UMT5ForConditionalGeneration);
    # encoder.embed_tokens is a tied copy of shared.
    ("shared.weight|encoder.embed_tokens.weight", "token_embedding/embedding", "identity"),
    ("encoder.block.{i}.layer.0.layer_norm.weight", "blocks/attn_norm/scale", "identity"),
    ("encoder.block.{i}.layer.0.SelfAttention.q.weight", "blocks/attn/q/kernel", "transpose"),
    ("encoder.block.{i}.layer.0.SelfAttention.k.weight", "blocks/attn/k/kernel", "transpose"),
    ("encoder.block.{i}.layer.0.SelfAttention.v.weight", "blocks/attn/v/kernel", "transpose"),
    ("encoder.block.{i}.layer.0.SelfAttention.o.weight", "blocks/attn/o/kernel", "transpose"),
    ("encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
     "blocks/attn/relative_attention_bias", "identity"),
    ("encoder.block.{i}.layer.1.layer_norm.weight", "blocks/ffn_norm/scale", "identity"),
    ("encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight", "blocks/ffn/wi_0/kernel", "transpose"),
    ("encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight", "blocks/ffn/wi_1/kernel", "transpose"),
    ("encoder.block.{i}.layer.1.DenseReluDense.wo.weight", "blocks/ffn/wo/kernel", "transpose"),
    ("encoder.final_layer_norm.weight", "final_norm/scale", "identity"),
]


def _fields_from_shapes(shapes: Mapping[str, tuple], layout: str) -> dict:
  """Config fields from {torch key: shape}. max_distance and eps are not stored in
  checkpoints and keep umT5's values (128, 1e-6)."""
  rules, _ = engine.resolve_rules(WEIGHTS, layout, None, shapes)
  key = {path: pattern for pattern, path, _ in rules}
  shape = lambda path, i=0: tuple(shapes[key[path].format(i=i)])
  num_layers = 0
  while key["blocks/attn/q/kernel"].format(i=num_layers) in shapes:
    num_layers += 1
  if not num_layers:
    raise ValueError(f"it has no {key['blocks/attn/q/kernel'].format(i=0)}")
  if key["blocks/attn/relative_attention_bias"].format(i=num_layers - 1) not in shapes:
    raise ValueError("the checkpoint has no relative position bias in its last layer: it is a T5 (one shared "
                     "bias), not a umT5 encoder; pass a umT5 checkpoint")
  vocab_size, d_model = shape("token_embedding/embedding")
  num_buckets, num_heads = shape("blocks/attn/relative_attention_bias")
  inner, _ = shape("blocks/attn/q/kernel")
  d_ff, _ = shape("blocks/ffn/wi_1/kernel")
  return dict(vocab_size=vocab_size, d_model=d_model, d_kv=inner // num_heads, d_ff=d_ff,
              num_layers=num_layers, num_heads=num_heads, num_buckets=num_buckets)


# transformers' UMT5Config names -> ours.
_HF_CONFIG = {"vocab_size": "vocab_size", "d_model": "d_model", "d_kv": "d_kv", "d_ff": "d_ff",
              "num_layers": "num_layers", "num_heads": "num_heads",
              "relative_attention_num_buckets": "num_buckets",
              "relative_attention_max_distance": "max_distance", "layer_norm_epsilon": "eps"}


def _fields_from_json(config: Mapping[str, Any]) -> dict | None:
  """A transformers UMT5Config's config.json (model_type "umt5"); None for anything else."""
  if config.get("model_type") != "umt5":
    return None
  return {ours: config[theirs] for theirs, ours in _HF_CONFIG.items() if config.get(theirs) is not None}


def _build(config: UMT5Config, *, param_dtype, rngs, dtype=jnp.float32) -> "UMT5Encoder":
  return UMT5Encoder(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


WEIGHTS = engine.ModelWeights(
    kind="umt5", name="umT5 encoder", config_type=UMT5Config, build=_build,
    layouts={
        "wan": engine.Layout(_WAN_RULES, signature=("token_embedding.weight", "blocks.0.attn.q.weight",
                                                     "blocks.0.pos_embedding.embedding.weight")),
        # A full HF model's decoder and LM head are not the encoder's.
        "hf": engine.Layout(_HF_RULES, signature=("encoder.block.0.layer.0.SelfAttention.q.weight",
                                                   "shared.weight", "encoder.final_layer_norm.weight"),
                            ignored=("decoder.", "lm_head.")),
    },
    fields_from_shapes=_fields_from_shapes, from_fields=UMT5Config.from_dict, fields_from_json=_fields_from_json,
    presets=UMT5_PRESETS, make_hint="run: python convert_torch_weights.py SOURCE DIR --kind umt5")


def load_umt5(ckpt_dir: str, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16) -> UMT5Encoder:
  """Loads an Orbax umT5 checkpoint written by the converter (kind "umt5")."""
  return engine.load(WEIGHTS, ckpt_dir, param_dtype=param_dtype, dtype=dtype)
