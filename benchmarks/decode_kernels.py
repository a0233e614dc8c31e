"""Builds, checks and times the decode-time kernels of pallas_kernels on one GPU, in one call.

  python benchmarks/decode_kernels.py --mode check,profile,sweep,table --out $OUT

* check: every kernel against its plain-JAX reference on the GPU (bf16, ragged lengths).
* profile: device time of every kernel launched by each entry point (jax.profiler trace), at the
  1.5B shape, batch 1, 16K and 128K: which launches a step is made of, and what the harness adds.
* sweep: the split merge (Pallas kernel vs XLA ops) at the 1.5B shape, 32K (batch 1 and 8) and
  128K (batch 1); tuning variants at the 1.5B shape, 128K cache, batch 1.
* sweep_exact: the exact kernel's tuning grid (exact_tunings) at the 1.5B shape over --batches x
  --caches, judged on device time over four K/V sets (past the L2).
* sweep_mask: the same for the mask step's alpha pass (mask_tunings), with every kernel's share.
* table: Fast-dLLM v2 1.5B (12 q / 2 KV heads) and 7B (28 / 4), hd 128, 32-token block, caches
  16K..128K, batch 1 and 8: exact split-KV, mask step (attention + alpha), sparse k=512, index
  selection (one layer's rows, and every sparse layer's rows in one call, as MAGE runs it),
  against XLA's dot_product_attention and lax.top_k, next to the floor
  max(K+V bytes / copy bandwidth, FLOPs / matmul rate) measured in the same run.

Timing: each timed call runs `REPS` kernel calls inside one jitted program, every call on its own
query (and index list) and cycling through enough K/V sets to exceed the 50 MB L2; the median of
several such programs, divided by `REPS`, is reported ("wall"; it includes the scan's own
per-call cost, reported as "harness"). "dev" is the sum of the durations of the GPU kernels one
call launches, from a jax.profiler trace (launch gaps excluded). Results go to OUT/NAME.json and
OUT/NAME.md; the table is printed last.
"""

import argparse
import collections
import datetime
import itertools
import json
import math
import os
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels import decode_attention  # pylint: disable=g-import-not-at-top
from pallas_kernels import sparse_attention
from pallas_kernels import topk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import median_seconds, run_log, trace_kernels  # noqa: E402

MODELS = {"1.5B": (12, 2), "7B": (28, 4)}
HEAD_DIM = 128
BLOCK = 32
CACHES = (16384, 32768, 65536, 131072)
BATCHES = (1, 8)
SPARSE_K = 512
# Both models have 28 layers; MAGE keeps the first 2 exact and selects for the other 26.
SPARSE_LAYERS = 26
REPS = 20
TIMINGS = 7
L2_BYTES = 50e6
# The H100 leads of shared/docs/gpu.md (device copy, bf16 matmul); the floors use these, and the
# run's own, lower, host-timed measurements are reported beside them.
COPY_BYTES_PER_S = 3.0e12
MATMUL_FLOPS_PER_S = 7.0e14


def time_per_call(call, per_call_args: tuple, shared_sets: list) -> float:
  """Median seconds of one `call(*per_call_args[i], *shared_sets[i % len(shared_sets)])`.

  ``per_call_args`` holds arrays stacked along a leading axis of length REPS. A scan runs the
  calls back to back on the device; each scan step makes one call per K/V set (unrolled, as a
  conditional would cost a device-to-host sync per call), so successive calls read different
  sets.
  """
  num_sets = len(shared_sets)
  steps = REPS // num_sets

  def program(per_call, sets):
    def body(total, args):
      for j, shared in enumerate(sets):
        mine = jax.tree_util.tree_map(lambda x, j=j: x[j], args)
        # The barrier keeps every output (alpha too) alive and unsliced.
        result = lax.optimization_barrier(call(*mine, *shared))
        for leaf in jax.tree_util.tree_leaves(result):
          total = total + leaf.reshape(-1)[0].astype(jnp.float32)
      return total, None
    grouped = jax.tree_util.tree_map(
        lambda x: x[:steps * num_sets].reshape(steps, num_sets, *x.shape[1:]), per_call)
    total, _ = lax.scan(body, jnp.float32(0), grouped)
    return total
  run = jax.jit(program)
  return median_seconds(lambda: run(per_call_args, shared_sets), TIMINGS) / (steps * num_sets)


def profile_launches(fn, args, iterations: int = 5) -> dict[str, float]:
  """Mean device microseconds per call of each GPU kernel that ``fn(*args)`` launches."""
  totals = collections.Counter()
  for name, _, duration_ns in trace_kernels(lambda: fn(*args), iterations):
    totals[name[:60]] += duration_ns / 1e3 / iterations
  return dict(totals.most_common())


def measure_ceilings() -> dict:
  """Device-to-device copy bandwidth (read + written) and bf16 matmul rate."""
  x = jax.random.normal(jax.random.key(0), (512 * 1024 * 1024,), jnp.bfloat16)
  copy = jax.jit(lambda a: a * 2)
  copy_s = median_seconds(lambda: copy(x), TIMINGS)
  del x
  a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(2), (8192, 8192), jnp.bfloat16)
  matmul = jax.jit(jnp.matmul)
  matmul_s = median_seconds(lambda: matmul(a, b), TIMINGS)
  return {"copy_bytes_per_s": 2 * 2 * 512 * 1024 * 1024 / copy_s,
          "matmul_flops_per_s": 2 * 8192**3 / matmul_s}


class Problem:
  """Random bf16 inputs of one shape; K/V sets enough to defeat the L2."""

  def __init__(self, batch, q_heads, kv_heads, capacity, seed=0, lengths=None):
    self.shape = (batch, q_heads, kv_heads, capacity)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    normal = lambda shape: jax.random.normal(next(keys), shape, jnp.bfloat16)
    kv_bytes = 2 * batch * kv_heads * capacity * HEAD_DIM * 2
    num_sets = max(1, min(4, math.ceil(2 * L2_BYTES / kv_bytes)))
    self.kv_sets = [(normal((batch, kv_heads, capacity, HEAD_DIM)),
                     normal((batch, kv_heads, capacity, HEAD_DIM))) for _ in range(num_sets)]
    self.queries = normal((REPS, batch, BLOCK, q_heads, HEAD_DIM))
    self.k_block = normal((batch, BLOCK, kv_heads, HEAD_DIM))
    self.v_block = normal((batch, BLOCK, kv_heads, HEAD_DIM))
    self.lengths = (jnp.full((batch,), capacity, jnp.int32) if lengths is None
                    else jnp.asarray(lengths, jnp.int32))
    rng = np.random.default_rng(seed)
    self.index_lists = jnp.asarray(np.sort(np.stack([
        rng.choice(capacity, size=min(SPARSE_K, capacity), replace=False)
        for _ in range(REPS * batch * kv_heads)]).reshape(REPS, batch, kv_heads, -1), axis=-1),
                                   jnp.int32)
    self.counts = jnp.full((batch, kv_heads), min(SPARSE_K, capacity), jnp.int32)

  def floor_seconds(self) -> tuple[float, float]:
    batch, q_heads, kv_heads, capacity = self.shape
    kv_bytes = 2 * batch * kv_heads * capacity * HEAD_DIM * 2
    flops = 4 * batch * q_heads * BLOCK * capacity * HEAD_DIM
    return kv_bytes / COPY_BYTES_PER_S, flops / MATMUL_FLOPS_PER_S

  def time_exact(self, **tuning):
    call = lambda q, k, v: decode_attention.exact_block_attention(
        q, k, v, self.lengths, self.k_block, self.v_block, impl="pallas", **tuning)
    return time_per_call(call, (self.queries,), self.kv_sets)

  def time_mask_step(self, **tuning):
    call = lambda q, k, v: decode_attention.mask_step_attention(
        q, k, v, self.lengths, self.k_block, self.v_block, impl="pallas", **tuning)
    return time_per_call(call, (self.queries,), self.kv_sets)

  def time_sparse(self, **tuning):
    call = lambda q, idx, k, v: sparse_attention.sparse_block_attention(
        q, k, v, idx, self.counts, self.k_block, self.v_block, impl="pallas", **tuning)
    return time_per_call(call, (self.queries, self.index_lists), self.kv_sets)

  def time_harness(self):
    """The scan's own cost per call (slicing a query, the barrier, the running sum)."""
    return time_per_call(lambda q, k, v: q, (self.queries,), self.kv_sets)

  def entry_points(self) -> dict:
    """name -> (fn, args) for one call of each kernel entry point, for profiling."""
    q, (k, v) = self.queries[0], self.kv_sets[0]
    common = (self.lengths, self.k_block, self.v_block)
    return {
        "exact": (jax.jit(lambda q, k, v: decode_attention.exact_block_attention(
            q, k, v, *common, impl="pallas")), (q, k, v)),
        "mask_step": (jax.jit(lambda q, k, v: decode_attention.mask_step_attention(
            q, k, v, *common, impl="pallas")), (q, k, v)),
        "sparse": (jax.jit(lambda q, k, v, idx: sparse_attention.sparse_block_attention(
            q, k, v, idx, self.counts, self.k_block, self.v_block, impl="pallas")),
                   (q, k, v, self.index_lists[0])),
        "select": (jax.jit(lambda s: topk.select_kv_indices(s, self.lengths[:, None], SPARSE_K,
                                                            impl="pallas")),
                   self.alpha_sets()[0]),
        # MAGE selects every sparse layer's rows in one call after its first step; profiled
        # per call, reported per layer.
        "select_layers": (jax.jit(lambda s: topk.select_kv_indices(
            s, self.lengths[None, :, None], SPARSE_K, impl="pallas")),
                          (jax.random.uniform(jax.random.key(99),
                                              (SPARSE_LAYERS,) + self.alpha_sets()[0][0].shape),)),
    }

  def time_xla(self):
    """XLA's attention over the cache in its preferred [batch, seq, heads, dim] layout."""
    sets = [(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) for k, v in self.kv_sets]
    call = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=self.lengths, implementation="xla")
    return time_per_call(call, (self.queries,), sets)

  def alpha_sets(self):
    batch, _, kv_heads, capacity = self.shape
    return [(jax.random.uniform(jax.random.key(100 + i), (batch, kv_heads, capacity)),)
            for i in range(4)]

  def time_select(self, impl, **tuning):
    call = lambda _, scores: topk.select_kv_indices(scores, self.lengths[:, None], SPARSE_K,
                                                 impl=impl, **tuning)
    return time_per_call(call, (jnp.zeros((REPS,)),), self.alpha_sets())


def attempt(log, label: str, fn):
  """Runs fn(); a failure is logged and returns None, so one broken variant spares the rest."""
  try:
    return fn()
  except Exception as error:  # pylint: disable=broad-except
    log(f"{label} failed: {type(error).__name__}: {error}"[:600])
    return None


def relative_error(out, ref) -> float:
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  if not np.all(np.isfinite(out)):
    return float("inf")
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def run_checks(log) -> list[dict]:
  """Kernel vs reference on the GPU, bf16 inputs; selection compared as sets."""
  rows = []
  for model, (q_heads, kv_heads) in MODELS.items():
    for batch, capacity, lengths in ((3, 5000, [0, 5000, 3333]), (1, 131072, [131072])):
      row = attempt(log, f"check {model} {batch} {capacity}",
                    lambda: check_one(q_heads, kv_heads, batch, capacity, lengths))
      if row is not None:
        rows.append({"model": model, **row})
        log(json.dumps(rows[-1]))
  return rows


def check_one(q_heads, kv_heads, batch, capacity, lengths) -> dict:
  """Relative errors of every kernel against its reference on one random bf16 problem."""
  problem = Problem(batch, q_heads, kv_heads, capacity, seed=7, lengths=lengths)
  q = problem.queries[0]
  k, v = problem.kv_sets[0]
  args = (q, k, v, problem.lengths, problem.k_block, problem.v_block)
  ref = decode_attention.exact_block_attention(*args, impl="reference")
  out = decode_attention.exact_block_attention(*args, impl="pallas")
  row = {"batch": batch, "capacity": capacity, "exact_rel_err": relative_error(out, ref)}
  for includes in (True, False):
    ref_out, ref_alpha = decode_attention.mask_step_attention(
        *args, impl="reference", alpha_includes_block=includes)
    out, alpha = decode_attention.mask_step_attention(
        *args, impl="pallas", alpha_includes_block=includes)
    suffix = "with_block" if includes else "cache_only"
    row[f"mask_out_rel_err_{suffix}"] = relative_error(out, ref_out)
    row[f"alpha_rel_err_{suffix}"] = relative_error(alpha, ref_alpha)
  sparse_args = (q, k, v, problem.index_lists[0], problem.counts // 2 + 1,
                 problem.k_block, problem.v_block)
  row["sparse_rel_err"] = relative_error(
      sparse_attention.sparse_block_attention(*sparse_args, impl="pallas"),
      sparse_attention.sparse_block_attention(*sparse_args, impl="reference"))
  scores = ref_alpha
  fast, fast_counts = topk.select_kv_indices(scores, problem.lengths[:, None], SPARSE_K,
                                             impl="pallas")
  slow, slow_counts = topk.select_kv_indices(scores, problem.lengths[:, None], SPARSE_K,
                                             impl="reference")
  row["select_equal"] = bool(jnp.all(fast == slow) and jnp.all(fast_counts == slow_counts))
  return row


def run_profile(log) -> list[dict]:
  rows = []
  for capacity in (16384, 131072):
    problem = Problem(1, *MODELS["1.5B"], capacity)
    for name, (fn, args) in problem.entry_points().items():
      launches = attempt(log, f"profile {name} {capacity}", lambda: profile_launches(fn, args))
      if launches is not None:
        rows.append({"kernel": name, "cache": capacity, "launches": launches,
                     "device_us": sum(launches.values())})
        log(json.dumps(rows[-1]))
    harness = problem.time_harness() * 1e6
    rows.append({"kernel": "harness", "cache": capacity, "us": harness})
    log(json.dumps(rows[-1]))
  return rows


def run_sweep(log) -> list[dict]:
  """Tuning variants at 128K, batch 1: the 1.5B shape for every kernel, 7B for the exact one."""
  rows = []

  def record(kernel, model, timer, tuning):
    seconds = attempt(log, f"{kernel} {model} {tuning}", lambda: timer(**tuning))
    if seconds is not None:
      rows.append({"kernel": kernel, "model": model, **tuning, "us": seconds * 1e6})
      log(json.dumps(rows[-1]))

  # The split merge: one Pallas kernel (default) or three XLA ops, where the merge weighs most
  # (short caches, many splits, batch 8's larger partials).
  for batch, capacity in ((1, 32768), (8, 32768), (1, 131072)):
    problem = Problem(batch, *MODELS["1.5B"], capacity)
    for kernel, timer in (("exact", problem.time_exact), ("mask_step", problem.time_mask_step),
                          ("sparse", problem.time_sparse)):
      for merge in ("pallas", "xla"):
        record(f"{kernel} b{batch} {capacity // 1024}K", "1.5B", timer, dict(merge=merge))
    del problem
  problem = Problem(1, *MODELS["1.5B"], 131072)
  for tuning in [{}, dict(block_q=256), dict(num_splits=21), dict(num_splits=64)]:
    record("exact", "1.5B", problem.time_exact, tuning)
  for tuning in [{}, dict(alpha_num_stages=2), dict(alpha_num_warps=8)]:
    record("mask_step", "1.5B", problem.time_mask_step, tuning)
  for tuning in [{}, dict(num_splits=1), dict(num_splits=4), dict(num_splits=8, block_q=256),
                 dict(num_stages=3), dict(block_k=32, num_splits=16)]:
    record("sparse", "1.5B", problem.time_sparse, tuning)
  return rows


def exact_tunings(batch: int, q_heads: int, kv_heads: int, capacity: int) -> list[dict]:
  """The exact kernel's tuning grid around its defaults (splits halved and doubled, wider key
  tiles, query tiles of 32 / 64 rows or one full tile, pipeline depth, warps)."""
  group_rows = (q_heads // kv_heads) * BLOCK
  block_q = decode_attention._default_block_q(  # pylint: disable=protected-access
      group_rows, batch * kv_heads)
  q_tiles = math.ceil(group_rows / block_q)
  splits = decode_attention.default_attention_splits(batch * kv_heads, q_tiles, block_q,
                                                     capacity, 64)
  return [{}, dict(num_splits=max(1, splits // 2)), dict(num_splits=splits * 2),
          dict(block_k=128), dict(block_k=32), dict(block_q=32), dict(block_q=64),
          dict(block_q=128), dict(block_q=256),
          dict(num_stages=2),
          dict(num_stages=4), dict(num_warps=4), dict(num_warps=8)]


def mask_tunings(batch: int, q_heads: int, kv_heads: int, capacity: int) -> list[dict]:
  """The alpha pass's tuning grid around its defaults (splits halved and doubled, key tiles,
  warps, pipeline depth); the attention pass keeps the exact kernel's defaults."""
  splits = decode_attention.default_alpha_splits(batch * kv_heads, capacity, 64)
  return [{}, dict(alpha_num_splits=max(1, splits // 2)), dict(alpha_num_splits=splits * 2),
          dict(alpha_block_k=128), dict(alpha_block_k=32), dict(alpha_num_warps=8),
          dict(alpha_num_stages=2), dict(alpha_num_stages=4)]


SWEEPS = {  # mode: (entry point, tuning grid, name prefix of its main kernel)
    "sweep_exact": (decode_attention.exact_block_attention, exact_tunings, "block_split_kv"),
    "sweep_mask": (decode_attention.mask_step_attention, mask_tunings, "block_attention_alpha"),
}


def parse_grid(grid: str) -> list[dict] | None:
  """--grid as the tunings the sweep modes run: None for "full" (each mode's own grid), [{}]
  for "defaults", else the JSON list of tuning dicts it holds. Checked before any GPU work."""
  if grid == "full":
    return None
  if grid == "defaults":
    return [{}]
  try:
    chosen = json.loads(grid)
  except json.JSONDecodeError:
    chosen = None
  if not isinstance(chosen, list) or not all(isinstance(t, dict) for t in chosen):
    raise ValueError(f"--grid must be 'full', 'defaults' or a JSON list of dicts, got {grid!r}")
  return chosen


def run_sweep_kernel(log, mode: str, batches, caches, models,
                     grid: list[dict] | None = None) -> list[dict]:
  """Device time per call of one entry point (kernels + merge) for each tuning of ``grid``
  (`parse_grid`; None: the mode's own grid) and each of ``models`` (names of MODELS): four
  calls on four K/V sets in one program (as four layers would read them, past the L2),
  profiled, divided by four; kernel_us is the named kernel's share, launches the device us of
  every kernel the call launches."""
  entry, tunings, kernel_prefix = SWEEPS[mode]
  rows = []
  for model, batch, capacity in itertools.product(models, batches, caches):
    problem = Problem(batch, *MODELS[model], capacity)
    sets = (problem.kv_sets * 4)[:4]
    q = problem.queries[0]
    for tuning in grid if grid is not None else tunings(batch, *MODELS[model], capacity):
      def layers(q, sets, tuning=tuning):
        return [entry(q, k, v, problem.lengths, problem.k_block, problem.v_block,
                      impl="pallas", **tuning) for k, v in sets]
      launches = attempt(log, f"{mode} {model} {batch} {capacity} {tuning}",
                         lambda: profile_launches(jax.jit(layers), (q, sets)))
      if launches is not None:
        bytes_s, _ = problem.floor_seconds()
        rows.append({"model": model, "batch": batch, "cache": capacity, **tuning,
                     "device_us": sum(launches.values()) / 4,
                     "kernel_us": sum(v for k, v in launches.items()
                                      if k.startswith(kernel_prefix)) / 4,
                     "floor_us": bytes_s * 1e6,
                     "launches": {k: v / 4 for k, v in launches.items()}})
        log(json.dumps(rows[-1]))
    del problem
  return rows


def run_table(log, tuning: dict, batches, caches, baselines: bool) -> list[dict]:
  """Harness (wall) times and profiled device times per call of every entry point."""
  rows = []
  for batch in batches:
    for model, (q_heads, kv_heads) in MODELS.items():
      for capacity in caches:
        problem = Problem(batch, q_heads, kv_heads, capacity)
        bytes_s, flops_s = problem.floor_seconds()
        row = {"model": model, "batch": batch, "cache": capacity,
               "floor_us": max(bytes_s, flops_s) * 1e6, "bytes_floor_us": bytes_s * 1e6,
               "flops_floor_us": flops_s * 1e6,
               "exact_us": problem.time_exact(**tuning.get("exact", {})) * 1e6,
               "mask_step_us": problem.time_mask_step(**tuning.get("mask_step", {})) * 1e6,
               "sparse_us": problem.time_sparse(**tuning.get("sparse", {})) * 1e6,
               "select_us": problem.time_select("pallas", **tuning.get("select", {})) * 1e6,
               "harness_us": problem.time_harness() * 1e6}
        for name, (fn, args) in problem.entry_points().items():
          launches = profile_launches(fn, args)
          row[f"{name}_device_us"] = sum(launches.values())
          row[f"{name}_launches"] = len(launches)
        if baselines:
          row["lax_top_k_us"] = problem.time_select("reference") * 1e6
          try:
            row["xla_us"] = problem.time_xla() * 1e6
          except Exception as error:  # pylint: disable=broad-except
            log(f"xla {model} {batch} {capacity} failed: {type(error).__name__}: {error}"[:300])
            row["xla_us"] = float("nan")
        log(json.dumps(row))
        rows.append(row)
        del problem
  return rows


def format_table(rows: list[dict]) -> str:
  """Device times (sum of the profiled kernels per call) first, harness wall times after."""
  header = ("| model | batch | cache | floor us | exact dev us (x floor) | mask step dev us"
            " (x exact) | sparse k=512 dev us | select dev us (x mask) | select, all"
            f" {SPARSE_LAYERS} layers in one call: dev us per layer (x mask) |"
            " launches e/m/s/sel |"
            " wall us: exact / mask / sparse / select / harness |")
  lines = [header, "|" + "---|" * 11]
  per_layer = lambda r: r.get("select_layers_device_us", float("nan")) / SPARSE_LAYERS
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['batch']} | {r['cache'] // 1024}K | {r['floor_us']:.1f} | "
        f"{r['exact_device_us']:.1f} ({r['exact_device_us'] / r['floor_us']:.2f}) | "
        f"{r['mask_step_device_us']:.1f} ({r['mask_step_device_us'] / r['exact_device_us']:.2f})"
        f" | {r['sparse_device_us']:.1f} | {r['select_device_us']:.1f} "
        f"({r['select_device_us'] / r['mask_step_device_us']:.2f}) | {per_layer(r):.1f} "
        f"({per_layer(r) / r['mask_step_device_us']:.2f}) | {r['exact_launches']}/"
        f"{r['mask_step_launches']}/{r['sparse_launches']}/{r['select_launches']} | "
        f"{r['exact_us']:.1f} / {r['mask_step_us']:.1f} / {r['sparse_us']:.1f} / "
        f"{r['select_us']:.1f} / {r['harness_us']:.1f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--mode", default="check,table")
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--tuning", default="{}", help="JSON: {kernel: {keyword: value}}")
  parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
  parser.add_argument("--caches", default=",".join(map(str, CACHES)))
  parser.add_argument("--models", default="1.5B",
                      help=f"comma list of {sorted(MODELS)}: the shapes the sweep modes tune")
  parser.add_argument("--grid", default="full",
                      help="sweep modes: 'full' (each mode's tuning grid), 'defaults', or a "
                      "JSON list of tuning dicts")
  parser.add_argument("--name", default="decode_kernels", help="OUT/NAME.json, OUT/NAME.md")
  parser.add_argument("--baselines", default=True, action=argparse.BooleanOptionalAction,
                      help="also time lax.top_k and XLA attention in the table")
  flags = parser.parse_args()
  modes = flags.mode.split(",")
  grid = parse_grid(flags.grid)
  models = flags.models.split(",")
  if not set(models) <= set(MODELS):
    raise ValueError(f"--models: unknown {sorted(set(models) - set(MODELS))}, expected a "
                     f"comma list of {sorted(MODELS)}")
  log = run_log(os.path.join(flags.out, "decode_kernels.log"))

  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tuning": json.loads(flags.tuning)}
  log(json.dumps(report))
  report["ceilings"] = measure_ceilings()
  log(json.dumps(report["ceilings"]))
  if "check" in modes:
    report["checks"] = run_checks(log)
  if "profile" in modes:
    report["profile"] = run_profile(log)
  if "sweep" in modes:
    report["sweep"] = run_sweep(log)
  for mode in SWEEPS:
    if mode in modes:
      report[mode] = run_sweep_kernel(log, mode, [int(b) for b in flags.batches.split(",")],
                                      [int(c) for c in flags.caches.split(",")],
                                      models, grid)
  if "table" in modes:
    report["table"] = run_table(
        log, report["tuning"], [int(b) for b in flags.batches.split(",")],
        [int(c) for c in flags.caches.split(",")], flags.baselines)
  with open(os.path.join(flags.out, f"{flags.name}.json"), "w") as f:
    json.dump(report, f, indent=1)
  if "table" in modes:
    table = format_table(report["table"])
    with open(os.path.join(flags.out, f"{flags.name}.md"), "w") as f:
      f.write(f"Device: {report['device']}, jax {report['jax']}, {report['date']}\n\n")
      f.write(f"Ceilings: {json.dumps(report['ceilings'])}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
  main()
