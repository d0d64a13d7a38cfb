"""Streaming conversion of PyTorch checkpoints into t3-jax (Orbax) checkpoints.

  python convert_torch_weights.py SOURCE OUTPUT_DIR [--kind dit|vae|umt5] [--dtype bf16|fp32|fp16]
                                  [--model PRESET] [--num_heads N] [--overwrite] [--quiet]

SOURCE: a .safetensors file, a sharded `*.safetensors.index.json`, a folder holding
either, or a .pth/.pt pickle (t3_jax.weights.sources). The architecture comes from the
source's config.json when there is one (a diffusers export, a Wan release), else from the
tensor shapes; a DiT's head count, which no shape shows, from config.json, --num_heads or
a preset whose shapes match. Every key and shape is checked before a tensor is read; the
tensors are then read one at a time into the param tree (t3_jax.weights.engine), which is
written atomically (t3_jax.weights.checkpoint). --dtype defaults to the stored dtype.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

import ml_dtypes
import numpy as np

from t3_jax import cli
from t3_jax.weights import engine
from t3_jax.weights.sources import WeightsError, open_source
from t3_jax.logs import log

ConversionError = WeightsError  # the converter's user errors (one line, names the fix)


# The model kinds: each module declares its WEIGHTS (an engine.ModelWeights).
KINDS = {"dit": "t3_jax.models.dit", "vae": "t3_jax.models.vae", "umt5": "t3_jax.models.umt5"}

DTYPES = {"bf16": ml_dtypes.bfloat16, "fp32": np.float32, "fp16": np.float16}


def weights_of(kind: str) -> engine.ModelWeights:
  return importlib.import_module(KINDS[kind]).WEIGHTS


def _looks_like(shapes, kind: str) -> str:
  """'; it looks like a vae checkpoint (use --kind vae)' when another kind fits better."""
  scores = {k: engine.layout_score(weights_of(k), shapes)[1] for k in KINDS}
  guess = max(scores, key=scores.get)
  return f"; it looks like a {guess} checkpoint (use --kind {guess})" if scores[guess] and guess != kind else ""


def convert(source: str, output_dir: str, kind: str = "dit", dtype: str | None = None,
            model: str | None = None, num_heads: int | None = None, overwrite: bool = False,
            progress: bool = True) -> str:
  """Converts `source` to a t3-jax checkpoint at `output_dir`; returns its path.

  dtype: "bf16", "fp32", "fp16" or None (the dtype the source stores)."""
  from t3_jax.weights import checkpoint

  if kind not in KINDS:
    raise WeightsError(f"unknown --kind {kind!r}: choose one of {', '.join(KINDS)}")
  if dtype is not None and dtype not in DTYPES:
    raise WeightsError(f"unknown --dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
  spec = weights_of(kind)
  overrides = {}
  if num_heads is not None:
    if "num_heads" not in spec.unseen:
      raise WeightsError(f"--num_heads is for --kind dit (a {spec.name} checkpoint shows its sizes): drop it")
    if num_heads < 1:
      raise WeightsError(f"--num_heads must be a positive head count, got {num_heads}")
    overrides["num_heads"] = num_heads
  checkpoint.check_output_dir(output_dir, overwrite)  # before reading anything

  with open_source(source) as src:
    try:
      params, detected = engine.convert_source(
          spec, src, dtype=None if dtype is None else DTYPES[dtype], preset=model, overrides=overrides,
          progress=progress)
    except engine.NotThisKind as e:
      raise WeightsError(f"{e}{_looks_like(engine.strip_prefixes(src.shapes), kind)}") from None
  if detected.from_json:
    log.info("architecture from the source's config.json")
  stored = np.dtype(next(iter(engine.flatten(params).values())).dtype)
  config = {"kind": kind, **spec.checkpoint_config(detected.config), "preset": detected.preset,
            "source_layout": detected.layout, "dtype": stored.name,
            "source": os.path.basename(os.path.normpath(source))}
  return checkpoint.save_checkpoint(output_dir, params, config, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="convert_torch_weights.py",
      description="Convert a PyTorch checkpoint (Wan's own or diffusers/transformers layout) of a Wan DiT, "
                  "the Wan VAE or the umT5 encoder into a t3-jax checkpoint (Orbax params + config.json). "
                  "The architecture is read from the source's config.json when it has one, else from the "
                  "tensor shapes.")
  parser.add_argument("source", help=".safetensors file, *.safetensors.index.json, a folder with them "
                                     "(and its config.json), or .pth/.pt")
  parser.add_argument("output_dir", help="new checkpoint directory (Orbax params + config.json)")
  parser.add_argument("--kind", default="dit", choices=list(KINDS), help="model kind (default: dit)")
  parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                      help="stored dtype (default: the source's own, e.g. bf16 stays bf16)")
  parser.add_argument("--model", default=None,
                      help="preset name, checked against the source (default: none; the source decides)")
  parser.add_argument("--num_heads", type=int, default=None,
                      help="attention heads of a DiT whose sizes match no preset and whose source has no "
                           "config.json (the weights do not show it)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  try:
    out = convert(args.source, args.output_dir, kind=args.kind, dtype=args.dtype, model=args.model,
                  num_heads=args.num_heads, overwrite=args.overwrite, progress=not args.quiet)
  except (WeightsError, OSError) as e:
    cli.error(e)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
