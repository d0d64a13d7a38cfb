"""A training run's directory: its checkpoints and its metrics.

  WORKDIR/checkpoints/<step>/{state,data,run}   Orbax CheckpointManager items: the train state,
                                                the grain iterator's state (JSON), the run (JSON)
  WORKDIR/metrics.jsonl                         one record per logged step, each step once
  WORKDIR/events.out.tfevents.*                 the same scalars for TensorBoard (tensorboardX,
                                                no TensorFlow)

The trainer writes it; `load_trained_params` reads it back (export, LoRA merge). Neither the
trainer nor lora is imported here, so both can use it.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "run")
METRICS_FILE = "metrics.jsonl"
# metrics.jsonl fields also written to TensorBoard, under train/<name>.
SCALARS = ("loss", "lr", "grad_norm", "skipped_steps", "steps_per_s", "tokens_per_s", "mfu")


def check_workdir(workdir: str | None) -> str:
  """The absolute workdir, if it can hold a run (it is created later, by the trainer)."""
  if not workdir:
    raise ValueError("--workdir is missing: pass --workdir=DIR, the run's directory (checkpoints, metrics; "
                     "an existing one resumes)")
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if existing == path and not os.path.isdir(path):
    raise NotADirectoryError(f"--workdir {workdir} exists and is not a directory: pass a new or a run's directory")
  if existing != path and not os.path.isdir(existing):
    raise NotADirectoryError(f"--workdir {workdir}: {existing} is not a directory")
  if not os.access(existing, os.W_OK):
    raise PermissionError(f"cannot write to {existing}: choose a writable --workdir")
  return path


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  """The run's CheckpointManager (created on first save), from config.checkpoint."""
  ck = config.checkpoint
  options = ocp.CheckpointManagerOptions(max_to_keep=ck.keep, enable_async_checkpointing=ck.get("async_save", True),
                                         create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
                               item_names=ITEMS)


def _checkpoint_dir(path: str) -> str:
  path = os.path.abspath(path)
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def load_trained_params(workdir: str, step: int | None = None) -> tuple[dict, dict]:
  """(trained params as numpy, run JSON) of a training workdir's checkpoint (latest by default).

  For a full fine-tune the params are a whole DiT; for LoRA, the adapters.
  """
  directory = _checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints under {workdir}: pass the --workdir of a training run")
  mngr = ocp.CheckpointManager(directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory} holds no checkpoint steps")
  run = mngr.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  return jax.tree.map(np.asarray, state["params"]), run


class MetricsWriter:
  """metrics.jsonl and TensorBoard events of process 0, continuing from `start_step`.

  A run resumes from its latest checkpoint, which may be older than its last logged step (a
  crash, a kill): the records past `start_step` are dropped from metrics.jsonl (rewritten
  atomically) and purged from TensorBoard's view, so each step appears once.
  """

  def __init__(self, workdir: str, start_step: int):
    from tensorboardX import SummaryWriter

    self.path = os.path.join(workdir, METRICS_FILE)
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    self._jsonl = open(self.path, "a")
    # purge_step: TensorBoard hides events at or past it from earlier files of this run.
    self._events = SummaryWriter(workdir, purge_step=start_step + 1 if start_step else None, flush_secs=30)

  def write(self, record: dict) -> None:
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name in SCALARS:
      if record.get(name) is not None:
        self._events.add_scalar(f"train/{name}", record[name], record["step"])

  def close(self) -> None:
    self._jsonl.close()
    self._events.close()
