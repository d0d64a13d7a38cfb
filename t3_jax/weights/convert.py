"""Streaming conversion of PyTorch checkpoints into t3-jax (Orbax) checkpoints.

  python convert_torch_weights.py SOURCE OUTPUT_DIR [--kind dit|vae|umt5] [--dtype bf16|fp32]
                                  [--model PRESET] [--overwrite]

SOURCE: a .safetensors file, a sharded `*.safetensors.index.json`, a folder holding
either, or a .pth/.pt pickle. Tensors are read one at a time (safetensors `safe_open`,
`torch.load(mmap=True)`) into preallocated arrays of the target tree, so a checkpoint is
never held twice.

Each model kind is one entry of `KINDS` (None: planned, not yet supported), a `Kind` of
three functions,
  detect(shapes, preset)          -> Detected: layout, config, preset name
  table(detected)                 -> [Rule(torch key, param path, transform), ...]
  target(detected, dtype)         -> nested dict of jax.ShapeDtypeStruct (the param tree)
A Rule's torch key may hold "{i}": the param then has a leading layer axis and layer i
is filled from that key. Keys, shapes and coverage are checked before any tensor is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import math
import os
import re
import sys
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes  # registers bfloat16 with numpy (safetensors' numpy reader needs it)
import numpy as np

from t3_jax import cli

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


class ConversionError(ValueError):
  """A user error: bad source, wrong model, unusable output. One line, names the fix."""


# ----------------------------------------------------------------------- transforms
# Each maps a torch tensor to our layout; written with .T / .reshape only, so that they
# also run on shapes (jax.eval_shape) to check a checkpoint before reading it.

def same(w):
  return w


def linear(w):
  """torch Linear weight (out, in) -> kernel (in, out)."""
  return w.T


# Inverses on shapes, where simple: they let errors name the shape a tensor should have.
same.source_shape = lambda shape: shape
linear.source_shape = lambda shape: shape[::-1]


def conv_as_linear(w):
  """Conv3d weight (out, in, kt, kh, kw) with kernel == stride -> kernel (in*kt*kh*kw, out)."""
  return w.reshape(w.shape[0], -1).T


@dataclasses.dataclass(frozen=True)
class Rule:
  key: str            # torch key, may hold "{i}" (layer index)
  path: str           # "/"-separated path in the param tree
  transform: Callable = same


def dense(key: str, path: str) -> list[Rule]:
  """A torch Linear `key.{weight,bias}` -> flax Linear `path/{kernel,bias}`."""
  return [Rule(f"{key}.weight", f"{path}/kernel", linear), Rule(f"{key}.bias", f"{path}/bias")]


@dataclasses.dataclass(frozen=True)
class Detected:
  layout: str                 # e.g. "original" / "diffusers"
  config: dict                # saved into config.json (JSON-able)
  preset: str | None = None   # a named preset the shapes match
  model: object = None        # kind-specific config object (e.g. DiTConfig)


@dataclasses.dataclass(frozen=True)
class Kind:
  detect: Callable[[Mapping[str, Shape], str | None], Detected]
  table: Callable[[Detected], list[Rule]]
  target: Callable[[Detected, np.dtype], dict]
  # Keys a checkpoint may hold that this model does not use (e.g. the decoder of a
  # full T5); they are skipped, and said so, instead of being "unexpected".
  ignored: Callable[[Detected], Sequence[str]] = lambda detected: ()


# ------------------------------------------------------------------------- DiT kind

DIT_LAYOUTS: dict[str, list[Rule]] = {
    # Wan-AI releases, DiffSynth, the T3-Video release.
    "original": [
        Rule("patch_embedding.weight", "patch_embedding/kernel", conv_as_linear),
        Rule("patch_embedding.bias", "patch_embedding/bias"),
        *dense("text_embedding.0", "text_embedding/fc1"),
        *dense("text_embedding.2", "text_embedding/fc2"),
        *dense("time_embedding.0", "time_embedding/fc1"),
        *dense("time_embedding.2", "time_embedding/fc2"),
        *dense("time_projection.1", "time_projection"),
        *[rule for attn in ("self_attn", "cross_attn") for rule in [
            *[r for n in "qkvo" for r in dense(f"blocks.{{i}}.{attn}.{n}", f"blocks/{attn}/{n}")],
            Rule(f"blocks.{{i}}.{attn}.norm_q.weight", f"blocks/{attn}/norm_q/scale"),
            Rule(f"blocks.{{i}}.{attn}.norm_k.weight", f"blocks/{attn}/norm_k/scale")]],
        Rule("blocks.{i}.norm3.weight", "blocks/norm3/scale"),
        Rule("blocks.{i}.norm3.bias", "blocks/norm3/bias"),
        *dense("blocks.{i}.ffn.0", "blocks/ffn/fc1"),
        *dense("blocks.{i}.ffn.2", "blocks/ffn/fc2"),
        Rule("blocks.{i}.modulation", "blocks/modulation"),
        *dense("head.head", "head/linear"),
        Rule("head.modulation", "head/modulation"),
    ],
    # diffusers WanTransformer3DModel.
    "diffusers": [
        Rule("patch_embedding.weight", "patch_embedding/kernel", conv_as_linear),
        Rule("patch_embedding.bias", "patch_embedding/bias"),
        *dense("condition_embedder.text_embedder.linear_1", "text_embedding/fc1"),
        *dense("condition_embedder.text_embedder.linear_2", "text_embedding/fc2"),
        *dense("condition_embedder.time_embedder.linear_1", "time_embedding/fc1"),
        *dense("condition_embedder.time_embedder.linear_2", "time_embedding/fc2"),
        *dense("condition_embedder.time_proj", "time_projection"),
        *[rule for attn, ours in (("attn1", "self_attn"), ("attn2", "cross_attn")) for rule in [
            *[r for theirs, n in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))
              for r in dense(f"blocks.{{i}}.{attn}.{theirs}", f"blocks/{ours}/{n}")],
            Rule(f"blocks.{{i}}.{attn}.norm_q.weight", f"blocks/{ours}/norm_q/scale"),
            Rule(f"blocks.{{i}}.{attn}.norm_k.weight", f"blocks/{ours}/norm_k/scale")]],
        Rule("blocks.{i}.norm2.weight", "blocks/norm3/scale"),
        Rule("blocks.{i}.norm2.bias", "blocks/norm3/bias"),
        *dense("blocks.{i}.ffn.net.0.proj", "blocks/ffn/fc1"),
        *dense("blocks.{i}.ffn.net.2", "blocks/ffn/fc2"),
        Rule("blocks.{i}.scale_shift_table", "blocks/modulation"),
        *dense("proj_out", "head/linear"),
        Rule("scale_shift_table", "head/modulation"),
    ],
}

# Per layout, the tensors whose shapes give the architecture.
_DIT_PROBES = {
    "original": dict(patch="patch_embedding.weight", text="text_embedding.0.weight",
                     time="time_embedding.0.weight", ffn="blocks.0.ffn.0.weight", head="head.head.weight"),
    "diffusers": dict(patch="patch_embedding.weight", text="condition_embedder.text_embedder.linear_1.weight",
                      time="condition_embedder.time_embedder.linear_1.weight",
                      ffn="blocks.0.ffn.net.0.proj.weight", head="proj_out.weight"),
}

# Key fragments of other model kinds, only to say what a wrong file looks like.
_KIND_HINTS = {
    "vae": ("encoder.conv1.", "decoder.conv1.", "encoder.conv_in.", "decoder.conv_in.", "encoder.downsamples.",
            "decoder.upsamples.", "quant_conv."),
    "umt5": ("token_embedding.", "shared.weight", "encoder.block.", "relative_attention_bias"),
    "dit": ("blocks.0.self_attn.", "blocks.0.attn1.", "patch_embedding.", "head.head."),
}


def _guess_kind(keys: Iterable[str]) -> str | None:
  keys = list(keys)
  scores = {kind: sum(any(h in k for h in hints) for k in keys) for kind, hints in _KIND_HINTS.items()}
  kind = max(scores, key=scores.get)
  return kind if scores[kind] else None


def _layout_of(shapes: Mapping[str, Shape], layouts: Mapping[str, list[Rule]]) -> str | None:
  """The layout with most of its (layer-0 / global) keys present, or None."""
  hits = {name: sum(r.key.format(i=0) in shapes for r in rules) for name, rules in layouts.items()}
  best = max(hits, key=hits.get)
  return best if hits[best] else None


def detect_dit(shapes: Mapping[str, Shape], preset: str | None = None) -> Detected:
  from t3_jax.models.dit import PRESETS, DiTConfig

  layout = _layout_of(shapes, DIT_LAYOUTS)
  if layout is None:
    raise _not_this_kind(shapes, "dit", "Wan DiT", f"none of its {len(shapes)} tensors (e.g. "
                         f"{', '.join(sorted(shapes)[:3])}) has a Wan DiT name")
  probes = _DIT_PROBES[layout]
  missing = [k for k in probes.values() if k not in shapes or not shapes[k]]
  if missing:
    raise ConversionError(f"Wan DiT checkpoint ({layout} layout) lacks {', '.join(missing)}: "
                          "it is incomplete (a missing shard?)")
  patch = shapes[probes["patch"]]
  if len(patch) != 5:
    raise ConversionError(f"{probes['patch']} has shape {patch}, expected a Conv3d weight (out, in, kt, kh, kw)")
  dim, in_channels, patch_size = patch[0], patch[1], tuple(patch[2:])
  layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
  found = dict(dim=dim, in_channels=in_channels, patch_size=patch_size,
               ffn_dim=shapes[probes["ffn"]][0], text_dim=shapes[probes["text"]][-1],
               freq_dim=shapes[probes["time"]][-1], num_layers=max(layers) + 1 if layers else 0,
               out_channels=shapes[probes["head"]][0] // math.prod(patch_size))

  def mismatches(config):
    return {k: (getattr(config, k), v) for k, v in found.items() if getattr(config, k) != v}

  if preset is not None:
    if preset not in PRESETS:
      raise ConversionError(f"unknown --model {preset!r}: choose one of {', '.join(PRESETS)}")
    config = PRESETS[preset]
    if diff := mismatches(config):
      raise ConversionError(f"the checkpoint is not {preset}: " + ", ".join(
          f"{k} {theirs} (preset {ours})" for k, (ours, theirs) in diff.items()))
  else:
    preset = next((name for name, c in PRESETS.items() if not mismatches(c)), None)
    if preset is not None:
      config = PRESETS[preset]
    elif dim % 128 == 0:  # every released Wan DiT has heads of 128
      family = "wan2.2" if in_channels == 48 else "wan2.1"
      config = DiTConfig(**found, num_heads=dim // 128, family=family, per_token_timesteps=family == "wan2.2")
      log.warning("shapes match no preset: assuming %d heads of 128 (%s)", dim // 128, found)
    else:
      raise ConversionError(f"shapes {found} match no preset and dim {dim} is not a multiple of 128: "
                            f"pass --model PRESET (one of {', '.join(PRESETS)})")
  return Detected(layout=layout, config=config.to_dict(), preset=preset, model=config)


def dit_table(detected: Detected) -> list[Rule]:
  return DIT_LAYOUTS[detected.layout]


def dit_target(detected: Detected, dtype) -> dict:
  from flax import nnx
  from t3_jax.models.dit import WanDiT

  model = nnx.eval_shape(lambda: WanDiT(detected.model, attention="full", param_dtype=dtype,
                                        rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _not_this_kind(shapes: Mapping[str, Shape], kind: str, name: str, error: Exception | str) -> ConversionError:
  guess = _guess_kind(shapes)
  hint = f"; it looks like a {guess} checkpoint (use --kind {guess})" if guess not in (None, kind) else ""
  return ConversionError(f"not a {name} checkpoint: {error}{hint}")


# ------------------------------------------------------------------------ VAE kind
# The tables live beside the model (t3_jax.models.vae.VAE_TORCH_TABLES); layouts "wan"
# (Wan2.1_VAE.pth, Wan2.2_VAE.pth) and "diffusers" (AutoencoderKLWan).

def detect_vae(shapes: Mapping[str, Shape], preset: str | None = None) -> Detected:
  from t3_jax.models import vae

  try:
    layout = vae.detect_layout(shapes)
    config = vae.vae_config_from_shapes(shapes)
  except (ValueError, KeyError) as e:
    raise _not_this_kind(shapes, "vae", "Wan VAE", e) from None
  name = next((n for n, c in vae.PRESETS.items() if c == config), None)
  if preset is not None and preset != name:
    raise ConversionError(f"the checkpoint is not the {preset!r} VAE (its shapes match {name or 'no preset'})")
  return Detected(layout=layout, config=vae.checkpoint_config(config), preset=name, model=config)


def vae_table(detected: Detected) -> list[Rule]:
  from t3_jax.models import vae

  table = vae.VAE_TORCH_TABLES[detected.layout](detected.model)
  return [Rule(key, "/".join(map(str, path)), vae.TORCH_TRANSFORMS[t]) for key, (path, t) in table.items()]


def vae_target(detected: Detected, dtype) -> dict:
  from flax import nnx
  from t3_jax.models import vae

  model = nnx.eval_shape(lambda: vae.WanVAE(detected.model, param_dtype=dtype, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# ----------------------------------------------------------------------- umT5 kind
# Tables beside the model (t3_jax.models.umt5.UMT5_TORCH_TABLES); layouts "wan"
# (models_t5_umt5-xxl-enc-bf16.pth) and "hf" (transformers' UMT5EncoderModel).

def detect_umt5(shapes: Mapping[str, Shape], preset: str | None = None) -> Detected:
  from t3_jax.models import umt5

  try:
    layout = umt5.detect_umt5_layout(shapes)
    config = umt5.umt5_config_from_shapes(shapes, layout)
    rules, ignored = umt5.resolve_umt5_table(shapes, layout)
  except (ValueError, KeyError) as e:
    raise _not_this_kind(shapes, "umt5", "umT5 encoder", e) from None
  name = next((n for n, c in umt5.UMT5_PRESETS.items() if c == config), None)
  if preset is not None and preset != name:
    raise ConversionError(f"the checkpoint is not {preset!r} (its shapes match {name or 'no preset'})")
  return Detected(layout=layout, config=config.to_dict(), preset=name, model=(config, rules, ignored))


def umt5_table(detected: Detected) -> list[Rule]:
  from t3_jax.models import umt5

  return [Rule(key, path, umt5.UMT5_TRANSFORMS[t]) for key, path, t in detected.model[1]]


def umt5_target(detected: Detected, dtype) -> dict:
  from t3_jax.models import umt5

  return umt5.umt5_param_structs(detected.model[0], dtype)


# The registry: one entry per model kind.
KINDS: dict[str, Kind | None] = {
    "dit": Kind(detect=detect_dit, table=dit_table, target=dit_target),
    "vae": Kind(detect=detect_vae, table=vae_table, target=vae_target),
    "umt5": Kind(detect=detect_umt5, table=umt5_table, target=umt5_target,
                 ignored=lambda detected: detected.model[2]),
}


# -------------------------------------------------------------------------- sources

# Wrappers some trainers/exporters put in front of every key.
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "module.", "transformer.", "_orig_mod.")


def strip_prefixes(keys: Iterable[str]) -> dict[str, str]:
  """{clean key: original key}, dropping prefixes that every key shares."""
  mapping = {k: k for k in keys}
  changed = True
  while changed and mapping:
    changed = False
    for prefix in _PREFIXES:
      if all(k.startswith(prefix) for k in mapping):
        mapping = {k[len(prefix):]: v for k, v in mapping.items()}
        changed = True
  return mapping


def _brief(error: BaseException) -> str:
  """The first sentence of a library's error message."""
  text = " ".join(str(error).split()) or type(error).__name__
  return re.split(r"(?<=[a-z)])\. ", text, maxsplit=1)[0][:300]


class TensorSource:
  """Tensors of a checkpoint, read one at a time. `shapes`: {key: shape}."""
  shapes: dict[str, Shape]

  def read(self, key: str) -> np.ndarray:
    raise NotImplementedError

  def close(self):
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class SafetensorsSource(TensorSource):
  def __init__(self, files: Sequence[str], expected: Mapping[str, str] | None = None):
    from safetensors import safe_open

    self._handles, self._file_of, self.shapes = [], {}, {}
    try:
      for path in files:
        try:
          handle = safe_open(path, framework="numpy")
        except Exception as e:  # SafetensorError, OSError
          raise ConversionError(f"cannot read {path}: {_brief(e)} (truncated or not a safetensors file?)") from None
        self._handles.append(handle)
        for key in handle.keys():
          if key in self._file_of:
            raise ConversionError(f"tensor {key} is in both {self._file_of[key][0]} and {path}")
          self._file_of[key] = (path, handle)
          self.shapes[key] = tuple(handle.get_slice(key).get_shape())
      if expected is not None:  # a sharded index: its weight map must match the shards
        lost = sorted(k for k in expected if k not in self._file_of)
        if lost:
          raise ConversionError(f"the index lists {len(lost)} tensors its shards lack (e.g. {', '.join(lost[:3])}): "
                                "a shard is incomplete or from another checkpoint")
    except BaseException:
      self.close()
      raise

  def read(self, key):
    path, handle = self._file_of[key]
    try:
      return handle.get_tensor(key)
    except Exception as e:
      raise ConversionError(f"cannot read {key} from {path}: {_brief(e)} (corrupt file?)") from None

  def close(self):
    for handle in self._handles:
      if hasattr(handle, "__exit__"):
        handle.__exit__(None, None, None)
    self._handles = []


class TorchSource(TensorSource):
  def __init__(self, path: str):
    try:
      import torch
    except ImportError:
      raise ConversionError(f"reading {path} needs PyTorch (pip install torch), or convert it to .safetensors") from None
    try:
      state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise ConversionError(f"cannot read {path}: {_brief(e)} (truncated or corrupt?)") from None
      log.warning("%s is in the legacy torch format, which can't be memory-mapped: loading it whole", path)
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zips give OSError / RuntimeError / pickle errors
      raise ConversionError(f"cannot read {path}: {_brief(e)} (truncated or corrupt?)") from None
    # Unwrap {"state_dict": {...}} and the like.
    while isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
      state = next(iter(state.values()))
    if not isinstance(state, dict):
      raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict")
    self._torch = torch
    self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

  def read(self, key):
    t = self._tensors[key].detach()
    if t.dtype == self._torch.bfloat16:  # numpy has no bf16: reinterpret the bits
      return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def open_source(path: str) -> TensorSource:
  """A TensorSource for a file, a sharded index, or a folder holding one of them."""
  if not os.path.exists(path):
    raise ConversionError(f"{path} does not exist")
  if os.path.isdir(path):
    indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    pickles = sorted(glob.glob(os.path.join(path, "*.pth")) + glob.glob(os.path.join(path, "*.pt")))
    for candidates in (indexes, files, pickles):
      if len(candidates) == 1:
        return open_source(candidates[0])
      if len(candidates) > 1:
        names = ", ".join(os.path.basename(c) for c in candidates)
        raise ConversionError(f"{path} holds several checkpoints ({names}) and no single "
                              "*.safetensors.index.json: pass the file or the index")
    raise ConversionError(f"{path} holds no *.safetensors.index.json, *.safetensors, .pth or .pt file")
  if path.endswith(".index.json"):
    try:
      with open(path) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ConversionError(f"cannot read the index {path}: {e!r}: expected JSON with a 'weight_map'") from None
    folder = os.path.dirname(path)
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if absent:
      raise ConversionError(f"the index {path} names missing shards: {', '.join(absent)}")
    return SafetensorsSource([os.path.join(folder, s) for s in shards], expected=weight_map)
  if path.endswith(".safetensors"):
    return SafetensorsSource([path])
  if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    return TorchSource(path)
  raise ConversionError(f"don't know how to read {path}: expected .safetensors, .safetensors.index.json, .pth or .pt")


# ----------------------------------------------------------------------- conversion

def _flatten(tree, prefix=""):
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict):
      yield from _flatten(v, path + "/")
    else:
      yield path, v


def _unflatten(flat: Mapping[str, object]) -> dict:
  tree = {}
  for path, v in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def _shape_after(transform, shape: Shape) -> Shape | None:
  try:
    return tuple(jax.eval_shape(transform, jax.ShapeDtypeStruct(shape, jnp.float32)).shape)
  except Exception:
    return None


def _list(items: Sequence[str], limit: int = 8) -> str:
  more = f" and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


@dataclasses.dataclass(frozen=True)
class Slot:
  path: str
  layer: int | None   # index along the stacked layer axis, or None
  transform: Callable
  shape: Shape        # the slot's shape (without the layer axis)


def plan(rules: Sequence[Rule], target: Mapping[str, jax.ShapeDtypeStruct],
         shapes: Mapping[str, Shape], what: str) -> dict[str, Slot]:
  """{torch key: Slot}; raises one ConversionError naming every missing, unexpected and
  mis-shaped tensor. `target`: {param path: ShapeDtypeStruct}."""
  slots: dict[str, Slot] = {}
  covered = set()
  for rule in rules:
    leaf = target[rule.path]
    covered.add(rule.path)
    if "{i}" in rule.key:
      for i in range(leaf.shape[0]):
        slots[rule.key.format(i=i)] = Slot(rule.path, i, rule.transform, tuple(leaf.shape[1:]))
    else:
      slots[rule.key] = Slot(rule.path, None, rule.transform, tuple(leaf.shape))
  assert covered == set(target), f"key table leaves params unfilled: {sorted(set(target) - covered)}"

  missing = sorted(k for k in slots if k not in shapes)
  unexpected = sorted(k for k in shapes if k not in slots)
  misshaped = []
  for key, slot in slots.items():
    if key in shapes and _shape_after(slot.transform, shapes[key]) != slot.shape:
      inverse = getattr(slot.transform, "source_shape", None)
      wanted = f"expected {inverse(slot.shape)}" if inverse else f"does not fit {slot.path} {slot.shape}"
      misshaped.append(f"{key} is {tuple(shapes[key])}, {wanted}")
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing: {_list(missing)}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected: {_list(unexpected)}")
  if misshaped:
    problems.append(f"{len(misshaped)} mis-shaped: {_list(misshaped)}")
  if problems:
    raise ConversionError(f"the checkpoint does not match {what}: " + "; ".join(problems))
  return slots


DTYPES = {"bf16": ml_dtypes.bfloat16, "fp32": np.float32}


def convert(source: str, output_dir: str, kind: str = "dit", dtype: str = "bf16",
            model: str | None = None, overwrite: bool = False, progress: bool = True) -> str:
  """Converts `source` to a t3-jax checkpoint at `output_dir`; returns its path."""
  from t3_jax.weights import checkpoint

  if kind not in KINDS:
    raise ConversionError(f"unknown --kind {kind!r}: choose one of {', '.join(KINDS)}")
  if KINDS[kind] is None:
    supported = ", ".join(k for k, v in KINDS.items() if v is not None)
    raise ConversionError(f"--kind {kind} is not yet supported by this converter (supported: {supported})")
  if dtype not in DTYPES:
    raise ConversionError(f"unknown --dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
  spec, np_dtype = KINDS[kind], np.dtype(DTYPES[dtype])
  checkpoint.check_output_dir(output_dir, overwrite)  # before reading anything

  with open_source(source) as src:
    raw_key = strip_prefixes(src.shapes)
    shapes = {k: src.shapes[raw] for k, raw in raw_key.items()}
    detected = spec.detect(shapes, model)
    if ignored := set(spec.ignored(detected)):
      log.warning("skipping %d tensors the %s does not use (e.g. %s)", len(ignored), kind, sorted(ignored)[0])
      shapes = {k: v for k, v in shapes.items() if k not in ignored}
    target = dict(_flatten(spec.target(detected, np_dtype)))
    what = f"a {detected.preset or kind} ({detected.layout} layout)"
    slots = plan(spec.table(detected), target, shapes, what)

    arrays = {path: np.empty(leaf.shape, np_dtype) for path, leaf in target.items()}
    from tqdm import tqdm
    for key, slot in tqdm(sorted(slots.items()), desc=f"converting {kind}", unit="tensor",
                          disable=not progress, file=sys.stderr):
      value = slot.transform(src.read(raw_key[key]))
      if slot.layer is None:
        arrays[slot.path][...] = value
      else:
        arrays[slot.path][slot.layer] = value

  config = {"kind": kind, **detected.config, "preset": detected.preset, "source_layout": detected.layout,
            "dtype": np_dtype.name, "source": os.path.basename(os.path.normpath(source))}
  return checkpoint.save_checkpoint(output_dir, _unflatten(arrays), config, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="convert_torch_weights.py",
      description="Convert a PyTorch checkpoint (Wan original or diffusers layout) into a t3-jax checkpoint.")
  parser.add_argument("source", help=".safetensors file, *.safetensors.index.json, a folder with them, or .pth/.pt")
  parser.add_argument("output_dir", help="new checkpoint directory (Orbax params + config.json)")
  parser.add_argument("--kind", default="dit", choices=list(KINDS), help="model kind (default: dit)")
  parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="stored dtype (default: bf16)")
  parser.add_argument("--model", default=None,
                      help="preset name, checked against the shapes (default: detected from the shapes)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  try:
    out = convert(args.source, args.output_dir, kind=args.kind, dtype=args.dtype, model=args.model,
                  overwrite=args.overwrite, progress=not args.quiet)
  except (ConversionError, OSError) as e:
    cli.error(e)
    return 2
  print(f"wrote {out}")
  return 0
