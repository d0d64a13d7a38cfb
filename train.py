"""Train T3 on a Wan DiT (flow matching; full fine-tune or LoRA).

  python train.py --config=configs/t3_wan.py:tiny --workdir=/tmp/t3_tiny --config.total_steps=20

Rerunning with the same workdir resumes from its latest checkpoint (params, optimizer,
step, data position, RNG); SIGTERM saves a checkpoint and stops. Metrics go to
WORKDIR/metrics.jsonl.

Multi-host: pass --distributed on every host (jax.distributed.initialize(): cluster
auto-detection, or --coordinator_address/--num_processes/--process_id, or the
JAX_COORDINATOR_ADDRESS environment variable).

Before renting a TPU slice: --compile_for=v5p-16 compiles the exact step for that slice
here and writes WORKDIR/compile_report.json (per-chip memory, fit, compiler time estimate).

After training: --export=DIR writes a full fine-tune's DiT as a plain checkpoint;
LoRA adapters merge with `python -m t3_jax.training.lora merge --ckpt BASE --lora WORKDIR --output DIR`.
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/t3_wan.py", "training config (file[:variant]; bare: stage1)")
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl", required=True)
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed)")
flags.DEFINE_integer("num_processes", None, "number of processes (with --distributed)")
flags.DEFINE_integer("process_id", None, "this process's index (with --distributed)")
flags.DEFINE_string("export", None, "instead of training: save the workdir's trained DiT to this directory")
flags.DEFINE_string("compile_for", None, "instead of training: compile the train step for this Cloud TPU slice "
                    "(v5p-16, v6e-32, ...) on this machine and report its per-chip memory (docs/TPU.md)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.compile_for:  # no TPU, no weights, no data: the TPU compiler's verdict on the step
    from t3_jax import cli, compile_for
    try:
      status = compile_for.run("train", FLAGS.config, FLAGS.compile_for, FLAGS.workdir)
    except cli.USER_ERRORS as e:
      cli.fail(e)
    raise SystemExit(status)
  import jax

  if FLAGS.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.getLogger().setLevel(logging.WARNING)

  from t3_jax import cli
  from t3_jax.training import trainer

  if FLAGS.export:
    print(f"exported to {trainer.export_params(FLAGS.workdir, FLAGS.export)}")
    return
  config = FLAGS.config
  if jax.process_index() == 0:
    print(f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s); "
          f"variant {config.get('variant')}, workdir {FLAGS.workdir}")
  try:
    history = trainer.Trainer(config, FLAGS.workdir).train()
  except cli.USER_ERRORS as e:  # a bad config value, a missing checkpoint or dataset
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
  app.run(main)
