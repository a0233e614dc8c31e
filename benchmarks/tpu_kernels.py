"""Checks and times the TPU (Mosaic) decode kernels of pallas_kernels.tpu on one TPU chip.

  python benchmarks/tpu_kernels.py --mode check,table --out $OUT

Written and tested on CPU machines without a TPU: nothing here has run on a TPU yet
(docs/tpu.md). The table is the one of benchmarks/decode_kernels.py (`format_table`, the same
columns), over the same shapes: Fast-dLLM v2 1.5B (12 q / 2 KV heads) and 7B (28 / 4), head
dim 128, blocks of 32, caches 16K..128K, batch 1 and 8; exact split-KV attention, the mask step
(attention + alpha), sparse attention over k = 512 selected rows, and index selection (one
layer's rows, and all 26 sparse layers' rows in one call).

* check: every TPU kernel against its plain-JAX reference on the TPU (bf16, ragged lengths).
* table: wall time per call (REPS calls in one jitted scan, as decode_kernels times them) and
  device time per call (the TPU ops of a jax.profiler trace), next to the floor
  max(K+V bytes / HBM bandwidth, FLOPs / bf16 matmul rate) at the chip's published numbers
  (CHIP_SPECS, docs/tpu.md); the run's own measured copy and matmul rates are saved beside them.

``--interpret`` runs the kernels in the TPU interpreter instead (any backend; a smoke run at
small --caches, its times mean nothing). Results go to OUT/NAME.json and OUT/NAME.md.
"""

import argparse
import collections
import dataclasses
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pallas_kernels.tpu import decode_attention  # noqa: E402  pylint: disable=g-import-not-at-top
from pallas_kernels.tpu import sparse_attention  # noqa: E402
from pallas_kernels.tpu import topk  # noqa: E402
import bench_common  # noqa: E402
import decode_kernels  # noqa: E402
from decode_kernels import (BATCHES, CACHES, MODELS, SPARSE_K, SPARSE_LAYERS,  # noqa: E402
                            attempt, format_table, measure_ceilings, relative_error,
                            time_per_call)

MODES = ("check", "table")
TUNED_KERNELS = ("exact", "mask_step", "sparse", "select")
# Published per-chip numbers (docs/tpu.md cites them): HBM bytes per second, bf16 FLOP/s.
CHIP_SPECS = {"v5e": (8.19e11, 1.97e14), "v5p": (2.765e12, 4.59e14), "v6e": (1.638e12, 9.18e14)}


def chip_of(device_kind: str) -> str | None:
  """'TPU v5 lite' -> 'v5e', 'TPU v5p' -> 'v5p', 'TPU v6 lite' / 'TPU v6e' -> 'v6e'."""
  kind = device_kind.lower()
  if "v5 lite" in kind or "v5e" in kind:
    return "v5e"
  if "v5p" in kind or kind.strip() == "tpu v5":
    return "v5p"
  if "v6" in kind:
    return "v6e"
  return None


def trace_device_ops(fn, calls: int) -> dict[str, float]:
  """Mean device microseconds per call of each TPU op that ``fn()`` runs (jax.profiler trace,
  the "XLA Ops" line of the TPU planes); empty if the trace holds no such line."""
  totals = collections.Counter()
  for line in bench_common.traced_device_lines(fn, calls, "TPU"):
    if line.name == "XLA Ops":
      for event in line.events:
        totals[event.name[:60]] += event.duration_ns / 1e3 / calls
  return dict(totals.most_common())


class TpuProblem(decode_kernels.Problem):
  """decode_kernels' random bf16 problem, timed through the TPU entry points."""

  def __init__(self, *args, interpret: bool, tuning: dict, **kwargs):
    super().__init__(*args, **kwargs)
    self.interpret = interpret
    self.tuning = tuning

  def _common(self, kernel: str) -> dict:
    return dict(interpret=self.interpret, **self.tuning.get(kernel, {}))

  def exact(self, q, k, v):
    return decode_attention.exact_block_attention(q, k, v, self.lengths, self.k_block,
                                                  self.v_block, **self._common("exact"))

  def mask_step(self, q, k, v):
    return decode_attention.mask_step_attention(q, k, v, self.lengths, self.k_block,
                                                self.v_block, **self._common("mask_step"))

  def sparse(self, q, k, v, indices):
    return sparse_attention.sparse_block_attention(q, k, v, indices, self.counts, self.k_block,
                                                   self.v_block, **self._common("sparse"))

  def select(self, scores, lengths):
    return topk.select_kv_indices(scores, lengths, SPARSE_K, **self._common("select"))

  def time_exact(self, **_):
    return time_per_call(self.exact, (self.queries,), self.kv_sets)

  def time_mask_step(self, **_):
    return time_per_call(self.mask_step, (self.queries,), self.kv_sets)

  def time_sparse(self, **_):
    return time_per_call(lambda q, idx, k, v: self.sparse(q, k, v, idx),
                         (self.queries, self.index_lists), self.kv_sets)

  def time_select(self, impl, **_):
    if impl == "reference":
      call = lambda _, s: topk.select_kv_indices_reference(s, self.lengths[:, None], SPARSE_K)
    else:
      call = lambda _, s: self.select(s, self.lengths[:, None])
    return time_per_call(call, (jnp.zeros((decode_kernels.REPS,)),), self.alpha_sets())

  def entry_points(self) -> dict:
    q, (k, v) = self.queries[0], self.kv_sets[0]
    layers = (jax.random.uniform(jax.random.key(99),
                                 (SPARSE_LAYERS,) + self.alpha_sets()[0][0].shape),)
    return {
        "exact": (jax.jit(self.exact), (q, k, v)),
        "mask_step": (jax.jit(self.mask_step), (q, k, v)),
        "sparse": (jax.jit(self.sparse), (q, k, v, self.index_lists[0])),
        "select": (jax.jit(lambda s: self.select(s, self.lengths[:, None])),
                   self.alpha_sets()[0]),
        "select_layers": (jax.jit(lambda s: self.select(s, self.lengths[None, :, None])),
                          layers),
    }


def check_one(q_heads, kv_heads, batch, capacity, lengths, interpret: bool) -> dict:
  """Relative errors of every TPU kernel against its reference on one random bf16 problem."""
  problem = TpuProblem(batch, q_heads, kv_heads, capacity, seed=7, lengths=lengths,
                       interpret=interpret, tuning={})
  q, (k, v) = problem.queries[0], problem.kv_sets[0]
  args = (q, k, v, problem.lengths, problem.k_block, problem.v_block)
  row = {"batch": batch, "capacity": capacity, "exact_rel_err": relative_error(
      problem.exact(q, k, v), decode_attention.exact_block_attention_reference(*args))}
  for includes in (True, False):
    want_out, want_alpha = decode_attention.mask_step_attention_reference(
        *args, alpha_includes_block=includes)
    out, alpha = decode_attention.mask_step_attention(*args, alpha_includes_block=includes,
                                                      interpret=interpret)
    suffix = "with_block" if includes else "cache_only"
    row[f"mask_out_rel_err_{suffix}"] = relative_error(out, want_out)
    row[f"alpha_rel_err_{suffix}"] = relative_error(alpha, want_alpha)
  counts = problem.counts // 2 + 1
  sparse_args = (q, k, v, problem.index_lists[0], counts, problem.k_block, problem.v_block)
  row["sparse_rel_err"] = relative_error(
      sparse_attention.sparse_block_attention(*sparse_args, interpret=interpret),
      sparse_attention.sparse_block_attention_reference(*sparse_args))
  got = problem.select(want_alpha, problem.lengths[:, None])
  want = topk.select_kv_indices_reference(want_alpha, problem.lengths[:, None], SPARSE_K)
  row["select_equal"] = all(bool(jnp.all(a == b)) for a, b in zip(got, want))
  return row


def run_checks(log, models, caches: list[int], interpret: bool) -> list[dict]:
  """check_one at the smallest cache (batch 3, ragged lengths) and the largest (batch 1)."""
  rows = []
  for model in models:
    q_heads, kv_heads = MODELS[model]
    small, large = min(caches), max(caches)
    for batch, capacity, lengths in ((3, small, [0, small, small * 2 // 3 + 1]),
                                     (1, large, [large])):
      row = attempt(log, f"check {model} {batch} {capacity}",
                    lambda: check_one(q_heads, kv_heads, batch, capacity, lengths, interpret))
      if row is not None:
        rows.append({"model": model, **row})
        log(json.dumps(rows[-1]))
  return rows


def run_table(log, tuning: dict, batches, caches, models, spec: tuple[float, float],
              interpret: bool, baselines: bool) -> list[dict]:
  """Wall and device microseconds per call of every entry point, with the floor at ``spec``
  (HBM bytes/s, bf16 FLOP/s)."""
  bandwidth, matmul_rate = spec
  rows = []
  for batch in batches:
    for model in models:
      q_heads, kv_heads = MODELS[model]
      for capacity in caches:
        problem = TpuProblem(batch, q_heads, kv_heads, capacity, interpret=interpret,
                             tuning=tuning)
        kv_bytes = 2 * batch * kv_heads * capacity * decode_kernels.HEAD_DIM * 2
        flops = 4 * batch * q_heads * decode_kernels.BLOCK * capacity * decode_kernels.HEAD_DIM
        row = {"model": model, "batch": batch, "cache": capacity,
               "bytes_floor_us": kv_bytes / bandwidth * 1e6,
               "flops_floor_us": flops / matmul_rate * 1e6,
               "exact_us": problem.time_exact() * 1e6,
               "mask_step_us": problem.time_mask_step() * 1e6,
               "sparse_us": problem.time_sparse() * 1e6,
               "select_us": problem.time_select("mosaic") * 1e6,
               "harness_us": problem.time_harness() * 1e6}
        row["floor_us"] = max(row["bytes_floor_us"], row["flops_floor_us"])
        for name, (fn, args) in problem.entry_points().items():
          ops = trace_device_ops(lambda fn=fn, args=args: fn(*args), calls=5)
          # NaN where the trace holds no TPU op line (interpret mode, or another trace layout).
          row[f"{name}_device_us"] = sum(ops.values()) if ops else float("nan")
          row[f"{name}_launches"] = len(ops)
        if baselines:
          row["lax_top_k_us"] = problem.time_select("reference") * 1e6
          row["xla_us"] = attempt(log, f"xla {model} {batch} {capacity}",
                                  lambda: problem.time_xla() * 1e6)
        log(json.dumps(row))
        rows.append(row)
        del problem
  return rows


@dataclasses.dataclass(frozen=True)
class Flags:
  modes: tuple[str, ...]
  out: str
  tuning: dict
  batches: tuple[int, ...]
  caches: tuple[int, ...]
  models: tuple[str, ...]
  name: str
  baselines: bool
  interpret: bool
  chip: str | None


def _int_list(flag: str, text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(x) for x in text.split(","))
  except ValueError:
    values = ()
  if not values or min(values) < 1:
    raise ValueError(f"--{flag} must be a comma list of positive ints, got {text!r}")
  return values


def parse_flags(argv: list[str]) -> Flags:
  """The command line, checked before any device work: each bad value names its flag."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mode", default="check,table", help=f"comma list of {MODES}")
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--tuning", default="{}",
                      help=f"JSON: {{kernel: {{keyword: value}}}}, kernels {TUNED_KERNELS}")
  parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
  parser.add_argument("--caches", default=",".join(map(str, CACHES)))
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
  parser.add_argument("--name", default="tpu_kernels", help="OUT/NAME.json, OUT/NAME.md")
  parser.add_argument("--baselines", default=True, action=argparse.BooleanOptionalAction,
                      help="also time lax.top_k and XLA attention in the table")
  parser.add_argument("--interpret", default=False, action=argparse.BooleanOptionalAction,
                      help="run the kernels in the TPU interpreter (smoke runs off a TPU)")
  parser.add_argument("--chip", default=None, choices=sorted(CHIP_SPECS),
                      help="the chip whose published numbers give the floor (default: the "
                      "device's own)")
  args = parser.parse_args(argv)
  modes = tuple(args.mode.split(","))
  if not set(modes) <= set(MODES):
    raise ValueError(f"--mode: unknown {sorted(set(modes) - set(MODES))}, expected a comma "
                     f"list of {MODES}")
  models = tuple(args.models.split(","))
  if not set(models) <= set(MODELS):
    raise ValueError(f"--models: unknown {sorted(set(models) - set(MODELS))}, expected a "
                     f"comma list of {list(MODELS)}")
  try:
    tuning = json.loads(args.tuning)
  except json.JSONDecodeError:
    tuning = None
  if (not isinstance(tuning, dict) or not set(tuning) <= set(TUNED_KERNELS)
      or not all(isinstance(t, dict) for t in tuning.values())):
    raise ValueError(f"--tuning must be a JSON object {{kernel: {{keyword: value}}}} with "
                     f"kernels from {TUNED_KERNELS}, got {args.tuning!r}")
  caches = _int_list("caches", args.caches)
  if any(c % 8 for c in caches):
    raise ValueError(f"--caches must be multiples of 8 (the kernels' row tiles), got {caches}")
  return Flags(modes=modes, out=args.out, tuning=tuning,
               batches=_int_list("batches", args.batches), caches=caches, models=models,
               name=args.name, baselines=args.baselines, interpret=args.interpret,
               chip=args.chip)


def main(argv: list[str] | None = None) -> None:
  flags = parse_flags(sys.argv[1:] if argv is None else argv)
  device_kind = jax.devices()[0].device_kind
  chip = flags.chip or chip_of(device_kind)
  if not flags.interpret and jax.default_backend() != "tpu":
    raise SystemExit(f"tpu_kernels: the device is {device_kind!r}, not a TPU; pass "
                     "--interpret for a smoke run")
  if "table" in flags.modes and chip is None:
    raise SystemExit(f"tpu_kernels: no published numbers for {device_kind!r}; pass --chip")
  log_file = open(os.path.join(flags.out, f"{flags.name}.log"), "a")

  def log(message: str) -> None:
    print(message, flush=True)
    log_file.write(message + "\n")
    log_file.flush()

  report = {"device": device_kind, "chip": chip, "jax": jax.__version__,
            "interpret": flags.interpret, "tuning": flags.tuning,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  log(json.dumps(report))
  if not flags.interpret:
    report["ceilings"] = measure_ceilings()
    log(json.dumps(report["ceilings"]))
  if "check" in flags.modes:
    report["checks"] = run_checks(log, flags.models, list(flags.caches), flags.interpret)
  if "table" in flags.modes:
    report["table"] = run_table(log, flags.tuning, flags.batches, flags.caches, flags.models,
                                CHIP_SPECS[chip], flags.interpret, flags.baselines)
  with open(os.path.join(flags.out, f"{flags.name}.json"), "w") as f:
    json.dump(report, f, indent=1)
  if "table" in flags.modes:
    table = format_table(report["table"])
    with open(os.path.join(flags.out, f"{flags.name}.md"), "w") as f:
      f.write(f"Device: {device_kind} (floors at {chip}'s published numbers), "
              f"jax {report['jax']}, {report['date']}\n\n"
              f"Measured ceilings: {json.dumps(report.get('ceilings'))}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
  main()
