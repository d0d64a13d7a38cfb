"""LoRA for the Wan DiT, as a reparametrisation of its parameter tree.

For every target kernel W (stacked [num_layers, in, out] in the DiT's blocks) the
adapted kernel is

  W' = W + (alpha / rank) * A @ B,     A [num_layers, in, rank], B [num_layers, rank, out]

with A drawn as peft draws it (uniform, +-1/sqrt(in)) and B = 0, so training starts
from the base model. Only A and B are trained; W stays frozen. Because the adapted
model *is* the DiT evaluated at W', `merge_lora` returns exactly the parameters the
training step used, and the merged checkpoint loads with `dit.load_dit`.

Targets use Wan's module names (the T3-Video trainer's defaults): q, k, v, o (both
self- and cross-attention, as peft matches name suffixes), ffn.0 and ffn.2.

Command line:
  python -m t3_jax.training.lora merge --ckpt BASE_DIT_DIR --lora TRAIN_WORKDIR_OR_STEP_DIR --output DIR
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t3_jax import cli

DEFAULT_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")

# Wan module name -> the DiT's parameter path(s) under "blocks" (ending in "kernel").
_TARGET_PATHS = {
    "q": (("self_attn", "q"), ("cross_attn", "q")),
    "k": (("self_attn", "k"), ("cross_attn", "k")),
    "v": (("self_attn", "v"), ("cross_attn", "v")),
    "o": (("self_attn", "o"), ("cross_attn", "o")),
    "self_attn.q": (("self_attn", "q"),), "self_attn.k": (("self_attn", "k"),),
    "self_attn.v": (("self_attn", "v"),), "self_attn.o": (("self_attn", "o"),),
    "cross_attn.q": (("cross_attn", "q"),), "cross_attn.k": (("cross_attn", "k"),),
    "cross_attn.v": (("cross_attn", "v"),), "cross_attn.o": (("cross_attn", "o"),),
    "ffn.0": (("ffn", "fc1"),),
    "ffn.2": (("ffn", "fc2"),),
}


def parse_targets(targets) -> tuple[str, ...]:
  if isinstance(targets, str):
    targets = [t for t in targets.replace(" ", "").split(",") if t]
  targets = tuple(targets)
  unknown = [t for t in targets if t not in _TARGET_PATHS]
  if unknown or not targets:
    raise ValueError(f"unknown LoRA targets {unknown or targets}: choose from {sorted(_TARGET_PATHS)}")
  return targets


def target_paths(params: dict, targets=DEFAULT_TARGETS) -> list[tuple[str, ...]]:
  """Paths (tuples of keys) of the kernels LoRA adapts, e.g. ("blocks", "self_attn", "q")."""
  paths = []
  for target in parse_targets(targets):
    for sub in _TARGET_PATHS[target]:
      path = ("blocks",) + sub
      node = params
      for key in path:
        if not isinstance(node, dict) or key not in node:
          raise ValueError(f"LoRA target {target!r}: the parameter tree has no {'.'.join(path)}")
        node = node[key]
      if "kernel" not in node:
        raise ValueError(f"LoRA target {target!r}: {'.'.join(path)} has no kernel")
      if path not in paths:
        paths.append(path)
  return paths


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def init_lora(rng: jax.Array, params: dict, rank: int, targets=DEFAULT_TARGETS,
              dtype=jnp.float32) -> dict:
  """Adapters {"blocks": {"self_attn": {"q": {"a": [L, in, r], "b": [L, r, out]}}, ...}}.

  Works on arrays or ShapeDtypeStructs (then returns ShapeDtypeStructs).
  """
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  lora: dict = {}
  paths = target_paths(params, targets)
  for i, path in enumerate(paths):
    kernel = _get(params, path)["kernel"]
    *lead, fan_in, fan_out = kernel.shape
    bound = 1.0 / math.sqrt(fan_in)  # peft: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in))
    a = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, fan_in, rank), jnp.float32, -bound, bound)
    node = lora
    for key in path:
      node = node.setdefault(key, {})
    node["a"] = a.astype(dtype)
    node["b"] = jnp.zeros((*lead, rank, fan_out), dtype)
  return lora


def _lora_leaves(lora: dict, prefix=()):
  for key, value in lora.items():
    if isinstance(value, dict) and "a" in value and "b" in value:
      yield prefix + (key,), value
    elif isinstance(value, dict):
      yield from _lora_leaves(value, prefix + (key,))


def lora_rank(lora: dict) -> int:
  ranks = {value["a"].shape[-1] for _, value in _lora_leaves(lora)}
  if len(ranks) != 1:
    raise ValueError(f"LoRA adapters must share one rank, found {sorted(ranks)}")
  return ranks.pop()


def apply_lora(params: dict, lora: dict, alpha: float) -> dict:
  """The adapted parameters: every adapted kernel W + (alpha / rank) * A @ B (in W's dtype,
  the product in float32). Other leaves are the base's, unchanged."""
  scale = float(alpha) / lora_rank(lora)
  out = jax.tree.map(lambda x: x, params)  # a new dict tree, same leaves
  for path, ab in _lora_leaves(lora):
    node = _get(out, path)
    kernel = node["kernel"]
    delta = jnp.einsum("...ir,...ro->...io", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
    node["kernel"] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  return out


def merge_lora(params: dict, lora: dict, alpha: float) -> dict:
  """Plain DiT parameters with the adapters folded in (what `apply_lora` computes), on the host."""
  merged = jax.jit(apply_lora, static_argnums=2)(params, lora, float(alpha))
  return jax.tree.map(np.asarray, merged)


def merge_checkpoint(ckpt: str, lora_dir: str, output: str, step: int | None = None,
                     overwrite: bool = False) -> str:
  """Merges a training run's LoRA adapters into a base DiT checkpoint and saves a plain one.

  ckpt: the base DiT checkpoint (t3_jax.weights.checkpoint layout). lora_dir: a training workdir
  (its latest step, or `step`) whose run trained LoRA adapters.
  """
  from t3_jax.training import workdir as workdir_lib
  from t3_jax.weights import checkpoint as checkpoint_lib

  checkpoint_lib.check_output_dir(output, overwrite)  # before loading anything
  params, config = checkpoint_lib.load_checkpoint(ckpt, kind="dit")
  adapters, meta = workdir_lib.load_trained_params(lora_dir, step)
  lora_meta = meta.get("lora") or {}
  if not lora_meta.get("rank"):
    raise ValueError(f"{lora_dir} holds a full fine-tune, not LoRA adapters: its params are already a DiT "
                     "(export them with `python train.py --export`)")
  merged = merge_lora(params, adapters, lora_meta["alpha"])
  config = dict(config, merged_lora={"rank": lora_meta["rank"], "alpha": lora_meta["alpha"],
                                     "targets": lora_meta.get("targets"), "source": os.path.abspath(lora_dir)})
  return checkpoint_lib.save_checkpoint(output, merged, config, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m t3_jax.training.lora", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  merge = sub.add_parser("merge", help="fold trained LoRA adapters into a plain DiT checkpoint")
  merge.add_argument("--ckpt", required=True, help="base DiT checkpoint directory")
  merge.add_argument("--lora", required=True, help="training workdir (or its checkpoints/ folder)")
  merge.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  merge.add_argument("--output", required=True, help="directory for the merged checkpoint")
  merge.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  try:
    out = merge_checkpoint(args.ckpt, args.lora, args.output, args.step, args.overwrite)
  except cli.USER_ERRORS as e:  # a missing checkpoint or workdir, an existing output
    cli.fail(e)
  print(f"merged checkpoint written to {out}")


if __name__ == "__main__":
  main()
