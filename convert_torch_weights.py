#!/usr/bin/env python
"""Convert a PyTorch checkpoint into a t3-jax checkpoint (Orbax params + config.json).

  python convert_torch_weights.py SOURCE OUTPUT_DIR [--kind dit|vae|umt5] [--dtype bf16|fp32|fp16]
                                  [--model PRESET] [--num_heads N] [--overwrite] [--quiet]

SOURCE: a .safetensors file, a sharded *.safetensors.index.json, a folder holding them,
or a .pth/.pt file; Wan's original and diffusers key layouts are detected, and a folder's
config.json (diffusers export, Wan release) gives the architecture. --dtype defaults to
what the source stores. See t3_jax/weights/convert.py.
"""

import sys

from t3_jax.weights.convert import main

if __name__ == "__main__":
  sys.exit(main())
