"""The weights engine: torch checkpoints to Orbax, loading, validation, random init.

  sources     readers of torch checkpoints (safetensors, sharded index, .pth, state dicts)
  engine      rules, config resolution, conversion, loading, random params (one for all models)
  checkpoint  atomic Orbax checkpoints with a config.json
  convert     the converter's command line (convert_torch_weights.py)
"""
