"""Readers of torch checkpoints: tensors one at a time, with their shapes and dtypes.

A source is a .safetensors file, a sharded `*.safetensors.index.json`, a folder holding
one of them, a .pth/.pt pickle, or a state dict in memory (`StateDictSource`). Files are
read lazily (safetensors `safe_open`, `torch.load(mmap=True)`), so that a checkpoint is
never held twice. A folder's (or a file's folder's) `config.json` is the exporter's
description of the model, when there is one (`source_config`).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import ml_dtypes  # registers bfloat16 with numpy (safetensors' numpy reader needs it)
import numpy as np

from t3_jax.logs import log


Shape = tuple[int, ...]


class WeightsError(ValueError):
  """A user error: bad source, wrong model, unusable output. One line, names the fix."""


# Wrappers some trainers and exporters put in front of every key (DiffSynth's "model.",
# torch.compile's "_orig_mod.", DDP's "module.", ...).
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "module.", "transformer.", "vae.",
             "_orig_mod.")


def strip_prefixes(keys: Iterable[str]) -> dict[str, str]:
  """{clean key: original key}, dropping wrapper prefixes that every key shares."""
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


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _torch_bits(tensor) -> np.ndarray:
  """numpy view of a torch tensor; torch bfloat16 becomes ml_dtypes bfloat16, bit for bit."""
  import torch

  t = tensor.detach().cpu()
  if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


class TensorSource:
  """Tensors of a checkpoint, read one at a time. `shapes`: {key: shape}; `dtypes`: {key:
  numpy dtype name}; `config`: the exporter's config.json (a dict) or None."""
  shapes: dict[str, Shape]
  dtypes: dict[str, str]
  config: dict | None = None
  name: str = "state dict"

  def read(self, key: str) -> np.ndarray:
    raise NotImplementedError

  def close(self):
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class StateDictSource(TensorSource):
  """A state dict in memory ({key: torch tensor or array})."""

  def __init__(self, state_dict: Mapping[str, Any], config: dict | None = None):
    self._tensors = {k: v for k, v in state_dict.items() if hasattr(v, "shape")}
    self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
    self.dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in self._tensors.items()}
    self.config = config

  def read(self, key):
    value = self._tensors[key]
    return _torch_bits(value) if hasattr(value, "detach") else np.asarray(value)


class SafetensorsSource(TensorSource):
  def __init__(self, files: Sequence[str], expected: Mapping[str, str] | None = None):
    from safetensors import safe_open

    self.name = files[0] if len(files) == 1 else os.path.dirname(files[0])
    self._handles, self._file_of, self.shapes, self.dtypes = [], {}, {}, {}
    try:
      for path in files:
        try:
          handle = safe_open(path, framework="numpy")
        except Exception as e:  # SafetensorError, OSError
          raise WeightsError(f"cannot read {path}: {_brief(e)} (truncated or not a safetensors file?)") from None
        self._handles.append(handle)
        for key in handle.keys():
          if key in self._file_of:
            raise WeightsError(f"tensor {key} is in both {self._file_of[key][0]} and {path}")
          self._file_of[key] = (path, handle)
          view = handle.get_slice(key)
          self.shapes[key] = tuple(view.get_shape())
          self.dtypes[key] = _SAFETENSORS_DTYPES.get(view.get_dtype(), view.get_dtype().lower())
      if expected is not None:  # a sharded index: its weight map must match the shards
        lost = sorted(k for k in expected if k not in self._file_of)
        if lost:
          raise WeightsError(f"the index lists {len(lost)} tensors its shards lack (e.g. {', '.join(lost[:3])}): "
                             "a shard is incomplete or from another checkpoint")
    except BaseException:
      self.close()
      raise

  def read(self, key):
    path, handle = self._file_of[key]
    try:
      return handle.get_tensor(key)
    except Exception as e:
      raise WeightsError(f"cannot read {key} from {path}: {_brief(e)} (corrupt file?)") from None

  def close(self):
    for handle in self._handles:
      if hasattr(handle, "__exit__"):
        handle.__exit__(None, None, None)
    self._handles = []


class TorchSource(StateDictSource):
  def __init__(self, path: str):
    try:
      import torch
    except ImportError:
      raise WeightsError(f"reading {path} needs PyTorch (pip install torch), or convert it to .safetensors") from None
    try:
      state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise WeightsError(f"cannot read {path}: {_brief(e)} (truncated or corrupt?)") from None
      log.warning("%s is in the legacy torch format, which can't be memory-mapped: loading it whole", path)
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zips give OSError / RuntimeError / pickle errors
      raise WeightsError(f"cannot read {path}: {_brief(e)} (truncated or corrupt?)") from None
    # Unwrap {"state_dict": {...}}, {"model_state": {...}} and the like.
    while isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
      state = next(iter(state.values()))
    if not isinstance(state, dict):
      raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    super().__init__({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    self.name = path


def _read_config_json(folder: str) -> dict | None:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise WeightsError(f"cannot read {path}: {_brief(e)}: fix or remove it") from None
  if not isinstance(config, dict):
    raise WeightsError(f"{path} holds a {type(config).__name__}, not a JSON object: fix or remove it")
  return config


def open_source(path: str) -> TensorSource:
  """A TensorSource for a file, a sharded index, or a folder holding one of them; its
  `config` is the config.json beside the weights, if any."""
  source = _open_weights(path)
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  try:
    source.config = _read_config_json(folder)
  except BaseException:
    source.close()
    raise
  return source


def _open_weights(path: str) -> TensorSource:
  if not os.path.exists(path):
    raise WeightsError(f"{path} does not exist")
  if os.path.isdir(path):
    indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    pickles = sorted(glob.glob(os.path.join(path, "*.pth")) + glob.glob(os.path.join(path, "*.pt")))
    for candidates in (indexes, files, pickles):
      if len(candidates) == 1:
        return _open_weights(candidates[0])
      if len(candidates) > 1:
        names = ", ".join(os.path.basename(c) for c in candidates)
        raise WeightsError(f"{path} holds several checkpoints ({names}) and no single "
                           "*.safetensors.index.json: pass the file or the index")
    raise WeightsError(f"{path} holds no *.safetensors.index.json, *.safetensors, .pth or .pt file")
  if path.endswith(".index.json"):
    try:
      with open(path) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise WeightsError(f"cannot read the index {path}: {e!r}: expected JSON with a 'weight_map'") from None
    folder = os.path.dirname(path)
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if absent:
      raise WeightsError(f"the index {path} names missing shards: {', '.join(absent)}")
    return SafetensorsSource([os.path.join(folder, s) for s in shards], expected=weight_map)
  if path.endswith(".safetensors"):
    return SafetensorsSource([path])
  if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    return TorchSource(path)
  raise WeightsError(f"don't know how to read {path}: expected .safetensors, .safetensors.index.json, .pth or .pt")
