"""Hardware counters of the decode kernels (Nsight Compute), one device call.

  python benchmarks/ncu_kernels.py --entries=exact,mask_step --shapes=1.5B:1:32768,7B:1:32768

For each (entry point, model, batch, cache) it runs this script again under
`ncu --clock-control none --set full` (the clocks as the timed runs leave them), profiling the
Pallas kernels of the second call only (the first compiles and warms up), and writes
OUT/ncu_<entry>_<model>_b<batch>_<cache>.txt: ncu's details page for each kernel (duration,
throughput, L2 hit rate, occupancy and what limits it, registers, warp stall reasons). A summary
of the lines that decide where a kernel's time goes is printed last.

Each (entry point, shape) takes 1.5-2 minutes under ncu (38 replay passes per kernel, with
device memory saved and restored, plus JAX's start-up): five fit in one 10-minute device call.

`--cache_control=none` keeps the L2 as the previous kernel left it (ncu flushes it before every
kernel by default), e.g. to see whether the alpha pass finds K in L2 after the attention pass.
"""

import argparse
import os
import re
import subprocess
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from decode_kernels import MODELS, Problem  # noqa: E402  pylint: disable=g-import-not-at-top

# The kernels' pallas_call names; XLA's own kernels (input generation, reshapes) are left out.
KERNELS = "regex:block_split_kv_attention|block_attention_alpha|merge_splits|block_sparse_attention"
LAUNCHES = {"exact": 2, "mask_step": 3, "sparse": 2}
SUMMARY_KEYS = ("Duration", "DRAM Throughput", "Memory Throughput", "L2 Hit Rate",
                "L1/TEX Hit Rate", "Compute (SM) Throughput", "Registers Per Thread",
                "Achieved Occupancy", "Theoretical Occupancy", "Block Limit Registers",
                "Block Limit Shared Mem", "Dynamic Shared Memory Per Block", "Grid Size",
                "Waves Per SM", "Executed Ipc Active")


def parse_shape(text: str) -> tuple[str, int, int]:
  try:
    model, batch, cache = text.split(":")
    batch, cache = int(batch), int(cache)
  except ValueError:
    raise ValueError(f"--shapes entries are MODEL:BATCH:CACHE, got {text!r}") from None
  if model not in MODELS or batch < 1 or cache < 1:
    raise ValueError(f"--shapes: {text!r} needs a model of {sorted(MODELS)}, batch >= 1, "
                     "cache >= 1")
  return model, batch, cache


def child(entry: str, shape: tuple[str, int, int]) -> None:
  """Two calls of one entry point (the first warms up); ncu profiles the second's kernels."""
  model, batch, cache = shape
  problem = Problem(batch, *MODELS[model], cache)
  fn, args = problem.entry_points()[entry]
  for _ in range(2):
    jax.block_until_ready(fn(*args))


def summarise(text: str) -> list[str]:
  lines = []
  for line in text.splitlines():
    stripped = line.strip()
    if re.match(r"^\S.*\(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)", stripped):  # a kernel's heading
      lines.append(stripped[:110])
    elif stripped.startswith(SUMMARY_KEYS):
      lines.append("    " + re.sub(r"\s{2,}", "  ", stripped))
    elif stripped.startswith(("One or More Eligible", "No Eligible", "Active Warps Per Scheduler",
                              "Eligible Warps Per Scheduler", "Warp Cycles Per Issued")):
      lines.append("    " + re.sub(r"\s{2,}", "  ", stripped))
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--entries", default="exact,mask_step")
  parser.add_argument("--shapes", default="1.5B:1:32768,1.5B:1:131072,7B:1:32768")
  parser.add_argument("--cache_control", default="all", choices=("all", "none"))
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--ncu", default="ncu")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  entries = [e for e in args.entries.split(",") if e]
  for entry in entries:
    if entry not in LAUNCHES:
      raise ValueError(f"--entries: unknown entry point {entry!r}, expected {sorted(LAUNCHES)}")
  shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
  if args.child:
    entry, shape = args.child.split("@")
    child(entry, parse_shape(shape))
    return
  os.makedirs(args.out, exist_ok=True)
  summary = []
  for entry in entries:
    for model, batch, cache in shapes:
      warm = "_l2warm" if args.cache_control == "none" else ""
      name = f"ncu_{entry}_{model}_b{batch}_{cache}{warm}"
      command = [args.ncu, "--clock-control", "none", "--cache-control", args.cache_control,
                 "--set", "full", "--kernel-name", KERNELS,
                 "--launch-skip", str(LAUNCHES[entry]), "--launch-count", str(LAUNCHES[entry]),
                 sys.executable, os.path.abspath(__file__),
                 f"--child={entry}@{model}:{batch}:{cache}"]
      run = subprocess.run(command, capture_output=True, text=True, check=False)
      text = run.stdout + ("\n--- stderr ---\n" + run.stderr[-4000:] if run.returncode else "")
      with open(os.path.join(args.out, name + ".txt"), "w") as f:
        f.write(text)
      summary.append(f"== {name} (rc {run.returncode})")
      summary.extend(summarise(text) or [text[-1500:]])
  print("\n".join(summary))


if __name__ == "__main__":
  main()
