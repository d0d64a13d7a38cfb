"""Train T3 on a Wan DiT (flow matching; full fine-tune or LoRA).

  python train.py --config=configs/t3_wan.py:tiny --workdir=/tmp/t3_tiny --config.total_steps=20
  python train.py --config=configs/t3_wan.py:5b_stage1 --workdir=runs/5b_stage1 --config.data.path=DATA

The variant names the model it trains (configs/t3_wan.py: stage1/stage2/stage2_lora train
Wan2.1-T2V-1.3B, 5b_stage1/5b_stage2/5b_stage2_lora Wan2.2-TI2V-5B, tiny a tiny random DiT);
without --config, stage1. Any field can be set with --config.FIELD=VALUE.

Rerunning with the same workdir resumes from its latest checkpoint (params, optimizer, step,
data position, RNG); SIGTERM saves a checkpoint and stops. Metrics go to WORKDIR/metrics.jsonl
and TensorBoard event files in WORKDIR (`tensorboard --logdir WORKDIR`).

Multi-host: pass --distributed on every host (jax.distributed.initialize(): cluster
auto-detection, or --coordinator_address/--num_processes/--process_id, or the
JAX_COORDINATOR_ADDRESS environment variable).

After training: --export=DIR writes a full fine-tune's DiT as a plain checkpoint;
LoRA adapters merge with `python -m t3_jax.training.lora merge --ckpt BASE --lora WORKDIR --output DIR`.

Bad input (an unknown config field or variant, a bad value, a workdir that is a file, a
missing checkpoint or dataset) prints one line `error: ...`, exits with status 2 and creates
nothing; a step that does not fit device memory exits with status 3.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from t3_jax import cli

DEFAULT_CONFIG = "configs/t3_wan.py:stage1"
try:  # without --config, the default config is loaded and overridden here, as the flag is defined
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "training config: file[:variant] (configs/t3_wan.py)")
except Exception as e:
  cli.fail(cli.explain_flag_error(e, sys.argv, DEFAULT_CONFIG))
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, TensorBoard events (required)")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed)")
flags.DEFINE_integer("num_processes", None, "number of processes (with --distributed)")
flags.DEFINE_integer("process_id", None, "this process's index (with --distributed)")
flags.DEFINE_string("export", None, "instead of training: save the workdir's trained DiT to this directory")
FLAGS = flags.FLAGS


def describe(config) -> str:
  """What the run trains, in one line."""
  d = config.data
  what = f"LoRA rank {config.lora.rank} on" if config.lora.rank else "full fine-tune of"
  init = config.model.init_checkpoint or "a random init"
  return (f"variant {config.get('variant')}: {what} {config.model.preset} from {init}, "
          f"{d.frames}x{d.height}x{d.width} {d.kind} data, {config.total_steps} steps of batch {config.batch_size}")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {' '.join(argv[1:])}: flags are --name=value")
  # The project's INFO lines (the resume line) print; the libraries' stay at WARNING.
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("t3_jax").setLevel(logging.INFO)
  from t3_jax.training import trainer, workdir

  try:
    workdir_path = workdir.check_workdir(FLAGS.workdir)
    if FLAGS.export:
      print(f"exported to {trainer.export_params(workdir_path, FLAGS.export)}")
      return
    config = FLAGS.config
    trainer.validate(config)  # before any device, file or model is touched
  except cli.USER_ERRORS as e:
    cli.fail(e)

  import jax

  if FLAGS.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if jax.process_index() == 0:
    print(f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s); "
          f"{describe(config)}; workdir {workdir_path}")
  try:
    history = trainer.Trainer(config, workdir_path).train()
  except cli.USER_ERRORS as e:  # a bad mesh, a missing checkpoint or dataset
    cli.fail(e)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # Device out of memory (at the first step's compile or run): the fixes, not a traceback.
    # Checkpoints already in the workdir are kept.
    cli.fail(f"the train step does not fit device memory ({' '.join(str(e).split())[:160]}): put more "
             "devices on --config.mesh.sequence, lower --config.batch_size, keep --config.model.remat=full, or let "
             "XLA take more of each GPU (XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 ran 4K on 4 x 80 GB; docs/TRAINING.md)",
             status=3)
  if history and jax.process_index() == 0:
    print(f"last step {history[-1]['step']}: loss {history[-1]['loss']:.5f}")


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: cli.parse_flags(FLAGS, argv, DEFAULT_CONFIG))
