"""Orbax checkpoints of parameter trees, with a small JSON describing the model.

A checkpoint directory holds:
  params/       an Orbax (StandardCheckpointer) tree of arrays, nested dicts
  config.json   {"kind": "dit" | "vae" | "umt5", ...model config...}

Writes are atomic: everything goes to a temporary sibling directory that is renamed
into place only once complete, so an interrupted or failed write never leaves a
directory that looks valid.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def _to_saveable(tree):
  # Orbax rejects numpy scalars as leaves; 0-d arrays are fine.
  return jax.tree.map(lambda x: np.asarray(x) if np.ndim(x) == 0 else x, tree)


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def check_output_dir(directory: str, overwrite: bool = False) -> None:
  """Fails where a checkpoint could not be written to `directory`: call it before the work
  that makes the checkpoint (loading models, reading a source)."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    if not os.path.isdir(directory):
      raise NotADirectoryError(f"{directory} exists and is not a directory")
    if os.listdir(directory) and not overwrite:
      raise FileExistsError(f"{directory} exists and is not empty: choose a new output directory or pass --overwrite")
  ancestor = os.path.dirname(directory)
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise NotADirectoryError(f"cannot create {directory}: {ancestor} is not a directory")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise PermissionError(f"cannot write to {ancestor}: choose a writable output directory")


def save_checkpoint(directory: str, params: dict, config: dict, overwrite: bool = False) -> str:
  """Writes `params` (nested dict of arrays) and `config` atomically to `directory`."""
  directory = os.path.abspath(directory)
  check_output_dir(directory, overwrite)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
  try:
    # mkdtemp makes 0700; the checkpoint gets the mode of any new folder (umask applied).
    os.chmod(tmp, 0o777 & ~_umask())
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, PARAMS_DIR), _to_saveable(params))
    checkpointer.wait_until_finished()
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def read_config(directory: str, kind: str | None = None) -> dict:
  """Returns the config dict of a checkpoint; checks its kind when given."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint at {directory}: create it with `python convert_torch_weights.py SOURCE {directory}`")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: it is not a t3-jax checkpoint (create one with convert_torch_weights.py)")
  with open(path) as f:
    config = json.load(f)
  if kind is not None and config.get("kind") != kind:
    raise ValueError(f"{directory} holds a {config.get('kind')!r} checkpoint, not {kind!r}: pass the {kind} checkpoint directory")
  return config


def load_checkpoint(directory: str, abstract_params: Any = None, kind: str | None = None) -> tuple[dict, dict]:
  """Restores (params, config). `abstract_params` (ShapeDtypeStructs, possibly sharded) sets
  the target dtypes and shardings; without it arrays come back as saved."""
  config = read_config(directory, kind)
  params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"{directory} has no {PARAMS_DIR}/: the checkpoint is incomplete; convert it again")
  checkpointer = ocp.StandardCheckpointer()
  if abstract_params is None:
    params = checkpointer.restore(params_dir)
  else:
    params = checkpointer.restore(params_dir, abstract_params)
  return params, config
