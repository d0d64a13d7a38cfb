"""Times `sample.py` end to end, stage by stage, and scales the denoising to 50 steps.

  python benchmarks/sample_stages.py --json OUT.json -- \
      --config=configs/t3_wan.py --config.sample.random_init=wan2.1-t2v-1.3b --steps=3 --output_dir=/tmp/s4k

Everything after `--` goes to sample.py unchanged. sample.py prints one line per stage (load,
text, compile, denoise, decode, write: seconds) and the peak memory; this reads them, adds the
process's wall time, and gives the 50-step figure:

  50-step = load + text + compile + denoise x 50 / steps + decode + write

The denoising loop is one compiled program whose body is one guided step (flow.sample's
fori_loop), so its compile time does not grow with the steps and its run time is steps x
one step; every other stage does not depend on the steps at all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("load", "text", "compile", "denoise", "decode", "write")


def parse_stats(stdout: str) -> dict:
  """{stage}_s and peak_memory_gib from sample.py's closing lines."""
  out = {}
  for line in stdout.splitlines():
    m = re.match(r"^(load|text|compile|denoise|decode|write): ([0-9.]+) s$", line.strip())
    if m:
      out[f"{m.group(1)}_s"] = float(m.group(2))
    m = re.match(r"^peak memory: ([0-9.]+) GiB \((.*)\)$", line.strip())
    if m:
      out["peak_memory_gib"], out["peak_memory_source"] = float(m.group(1)), m.group(2)
  return out


def scaled(stats: dict, steps: int, target: int = 50) -> dict:
  """The run's total and its `target`-step figure (denoising scaled linearly, the rest as run)."""
  total = sum(stats[f"{s}_s"] for s in STAGES)
  per_step = stats["denoise_s"] / steps
  return {"total_s": total, "per_step_s": per_step, f"steps{target}_denoise_s": per_step * target,
          f"steps{target}_total_s": total - stats["denoise_s"] + per_step * target}


def device_name() -> str | None:
  try:
    return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                          check=False, capture_output=True, text=True, timeout=30).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--json", default=None)
  args = p.parse_args(ours)
  steps = next((int(a.split("=", 1)[1]) for a in theirs if a.startswith(("--steps=", "--config.sample.steps="))), 50)

  command = [sys.executable, "sample.py", *theirs]
  print("$", " ".join(command), flush=True)
  start = time.perf_counter()
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    print(line, end="", flush=True)
    lines.append(line)
  rc = proc.wait()
  wall = time.perf_counter() - start
  stats = parse_stats("".join(lines))
  result = {"command": "python sample.py " + " ".join(theirs), "returncode": rc, "steps": steps,
            "process_wall_s": wall, "device": device_name(), "date": time.strftime("%Y-%m-%d"), **stats}
  if rc == 0 and all(f"{s}_s" in stats for s in STAGES):
    result.update(scaled(stats, steps))
    print("stages (s): " + ", ".join(f"{s} {stats[f'{s}_s']:.1f}" for s in STAGES)
          + f"; peak {stats.get('peak_memory_gib')} GiB; {steps} steps total {result['total_s']:.1f} s; "
          f"50 steps: denoise {result['steps50_denoise_s']:.0f} s, total {result['steps50_total_s']:.0f} s", flush=True)
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return rc


if __name__ == "__main__":
  sys.exit(main())
