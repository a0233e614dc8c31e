"""Do the fused decode layers of pallas_kernels/decode_gemm.py beat XLA? One GPU call decides.

  python benchmarks/decode_gemm.py --mode=check,sweep,table --out=$OUT

For the weight reads of a decoder layer and the LM head at the Fast-dLLM v2 1.5B and 7B shapes
and 32 / 256 rows (one 32-token block at batch 1 / 8), each as mage_jax/model.py's
layer_kernels="fused" path calls it:
  * qkv:     rmsnorm(x) * g @ q, k, v + their biases, then RoPE on q and k: three weights in
             one launch (norm_qkv_rope; N = (q_heads + 2 kv_heads) * 128 in all)
  * swiglu:  silu(h @ gate) * (h @ up), h = rmsnorm(x) * g (norm_swiglu over the model's
             [K, 2, intermediate] gate_up kernel; N = intermediate outputs, 2 x N weight columns)
  * o_proj:  residual + attn @ o              (matmul_residual, K = q_heads * 128)
  * down:    residual + act @ down            (matmul_residual, K = intermediate)
  * head:    the greedy proposal (argmax token and its softmax probability, [MASK] excluded)
             of hidden @ the LM head (greedy_head; 1.5B: tied embeddings [V, K], 7B: [K, V])
it times the Triton kernel against XLA's jitted equivalent, written as the model's "xla" path
computes it (RMSNorm in float32 rounded to bf16, bf16 dots, the bias / residual added in bf16,
RoPE in float32, SiLU x up in bf16; for the head float32 logits, [MASK] set to -inf, softmax,
argmax and the pick, as the generate loop), and against the floor max(bytes moved / copy
bandwidth, FLOPs / matmul rate) with both rates measured in the same run
(decode_kernels.measure_ceilings).

* check: kernel (default tuning) vs its float32 reference on the GPU, and XLA's model path vs
  the same reference for scale, at every shape and at 96 rows (batch 3: padded rows); the head
  compares tokens (all equal for ok) and confidences.
* sweep: the kernel's tuning grid (--grid: "small", "full" or a JSON list of tuning dicts),
  variants that resolve to the same launch timed once (the head takes no split_k), each
  timed launch checked against the reference as in check (only a correct one is the best).
* table: per shape XLA, the kernel's defaults and the sweep's best against the floor, the
  per-layer sums (qkv + swiglu + o_proj + down), and the device kernels each timed program
  launches (profiler trace).

Timing (as decode_kernels.py): --reps calls inside one jitted program, each on its own x (and
residual), cycling through enough weight copies to pass the 50 MB L2; the median of --timings
programs / calls ("wall", which includes the harness's own per-call cost, reported as
harness_us). Every case's harness, XLA and default-kernel timings run first, then the sweep,
batch 1 first, until --budget_s seconds from the start. Results are rewritten under --out
(decode_gemm.json / .md, log in decode_gemm.log) after every step, so a run cut short keeps
what it measured.
--toy runs tiny shapes through the interpret-mode kernel (the CPU test).
"""

import argparse
import collections
import dataclasses
import datetime
import itertools
import json
import math
import os
import sys
import time

import jax
from jax import lax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pallas_kernels import decode_gemm  # noqa: E402
from bench_common import median_seconds, run_log, trace_kernels  # noqa: E402
from decode_kernels import attempt, measure_ceilings, relative_error  # noqa: E402

MODELS = {
    "1.5B": dict(hidden=1536, q_heads=12, kv_heads=2, intermediate=8960, vocab=151936,
                 tied=True),
    "7B": dict(hidden=3584, q_heads=28, kv_heads=4, intermediate=18944, vocab=152064,
               tied=False),
    "toy": dict(hidden=64, q_heads=2, kv_heads=1, intermediate=48, vocab=200, tied=True),
}
HEAD_DIM = {"toy": 32}  # 128 for the real models; norm_qkv_rope's kernel needs >= 32
LAYER_OPS = ("qkv", "swiglu", "o_proj", "down")  # a decoder layer's four weight reads
OPS = LAYER_OPS + ("head",)
EPS = 1e-6
L2_BYTES = 50e6
MAX_SETS = 16
GRIDS = {
    # finish="kernel": the splits summed by the tile's last program instead of an XLA fusion
    # (the same launch as "xla" at one split, so timed once).
    "small": [dict(block_n=bn, split_k=s, finish=f)
              for bn, s, f in itertools.product((32, 128), (1, 4), ("xla", "kernel"))],
    "full": [dict(block_n=bn, split_k=s, num_warps=w, num_stages=st, finish=f)
             for bn, s, w, st, f in itertools.product((16, 32, 64, 128), (1, 2, 4, 8), (4, 8),
                                                      (3, 4), ("xla", "kernel"))],
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One weight read: x [rows, k] against the op's weight(s), n its output columns (swiglu:
  the intermediate width, over 2 x n weight columns; head: the vocabulary)."""
  model: str
  op: str
  rows: int
  k: int
  n: int

  @property
  def normalize(self) -> bool:
    return self.op in ("qkv", "swiglu")

  @property
  def bias(self) -> bool:
    return self.op == "qkv"  # Qwen2.5: q/k/v have a bias, the rest none

  @property
  def weight_columns(self) -> int:
    return 2 * self.n if self.op == "swiglu" else self.n

  @property
  def widths(self) -> tuple[int, ...]:
    """qkv: the output widths of q, k and v."""
    m, hd = MODELS[self.model], HEAD_DIM.get(self.model, 128)
    return (m["q_heads"] * hd, m["kv_heads"] * hd, m["kv_heads"] * hd)

  def bytes_moved(self) -> int:
    """bf16 bytes the op must read and write: w, x, the output, and g / bias / residual (the
    head writes two numbers per row)."""
    weight = self.k * self.weight_columns
    if self.op == "head":
      return 2 * (weight + self.rows * self.k) + 8 * self.rows
    extra = self.k * self.normalize + self.n * self.bias + self.rows * self.n * (
        not self.normalize)
    return 2 * (weight + self.rows * self.k + self.rows * self.n + extra)

  def flops(self) -> int:
    return 2 * self.rows * self.k * self.weight_columns


def cases(models, rows_list, ops=OPS) -> list[Case]:
  out = []
  for model in models:
    m = MODELS[model]
    hd = HEAD_DIM.get(model, 128)
    shapes = {"qkv": (m["hidden"], (m["q_heads"] + 2 * m["kv_heads"]) * hd),
              "swiglu": (m["hidden"], m["intermediate"]),
              "o_proj": (m["q_heads"] * hd, m["hidden"]),
              "down": (m["intermediate"], m["hidden"]),
              "head": (m["hidden"], m["vocab"])}
    out += [Case(model, op, rows, *shapes[op]) for rows in rows_list for op in ops]
  return out


def _xla_norm(x, g):
  """mage_jax/model.py's RMSNorm: float32, rounded to x.dtype."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + EPS)
  return (x32 * g.astype(jnp.float32)).astype(x.dtype)


def xla_qkv_rope(x, g, ws, biases, cos, sin):
  """The model's xla path for q/k/v: the norm once, a bf16 dot per weight, the biases, RoPE
  on q and k in float32 (mage_jax.model.apply_rope's math on the same tables)."""
  h = _xla_norm(x, g)
  outs = [jnp.dot(h, w) for w in ws]
  if biases is not None:
    outs = [o + b for o, b in zip(outs, biases)]
  half = cos.shape[1]

  def rotate(a):
    heads = a.astype(jnp.float32).reshape(a.shape[0], -1, 2 * half)
    lo, hi = heads[..., :half], heads[..., half:]
    c, s = cos[:, None], sin[:, None]
    out = jnp.concatenate([lo * c - hi * s, hi * c + lo * s], axis=-1)
    return out.reshape(a.shape).astype(a.dtype)

  return rotate(outs[0]), rotate(outs[1]), outs[2]


def xla_swiglu(x, g, w):
  gate_up = jnp.einsum("re,eki->rki", _xla_norm(x, g), w)
  return jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]


def xla_matmul_residual(x, w, residual):
  return residual + jnp.dot(x, w)


def xla_greedy_head(x, w, layout: str, excluded: int):
  """The generate loop's greedy proposal from the model's float32 logits."""
  spec = "re,ve->rv" if layout == "ve" else "re,ev->rv"
  logits = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
  logits = logits.at[:, excluded].set(-jnp.inf)
  tokens = jnp.argmax(logits, axis=-1)
  probs = jax.nn.softmax(logits, axis=-1)
  return tokens, jnp.take_along_axis(probs, tokens[:, None], -1)[:, 0]


def head_layout(case: Case) -> str:
  return "ve" if MODELS[case.model]["tied"] else "ev"


def excluded_token(case: Case) -> int:
  return case.n - 7  # a [MASK]-like id near the end of the vocabulary


class Problem:
  """Random bf16 inputs of one case: ``reps`` inputs and enough weight copies to pass L2."""

  def __init__(self, case: Case, reps: int, sets: int | None = None, seed: int = 0):
    self.case = case
    keys = iter(jax.random.split(jax.random.key(seed), 6 * MAX_SETS + 4))
    normal = lambda shape, scale=1.0: (jax.random.normal(next(keys), shape, jnp.float32)
                                       * scale).astype(jnp.bfloat16)
    weight_bytes = 2 * case.k * case.weight_columns
    if sets is None:
      sets = max(2, min(MAX_SETS, math.ceil(2 * L2_BYTES / weight_bytes)))
    self.per_call = (normal((reps, case.rows, case.k), 3.0),)
    if case.op in ("o_proj", "down"):
      self.per_call += (normal((reps, case.rows, case.n)),)
    scale = 1 / math.sqrt(case.k)
    self.sets = []
    for _ in range(sets):
      if case.op == "qkv":
        ws = tuple(normal((case.k, width), scale) for width in case.widths)
        biases = tuple(normal((width,)) for width in case.widths) if case.bias else None
        positions = jax.random.randint(next(keys), (case.rows,), 0, 131072)
        cos, sin = decode_gemm.rope_tables(positions, 1e6, HEAD_DIM.get(case.model, 128))
        self.sets.append((1.0 + normal((case.k,), 0.2), ws, biases, cos, sin))
      elif case.op == "swiglu":
        self.sets.append((1.0 + normal((case.k,), 0.2), normal((case.k, 2, case.n), scale)))
      elif case.op == "head":
        shape = (case.n, case.k) if head_layout(case) == "ve" else (case.k, case.n)
        self.sets.append((normal(shape, scale),))
      else:
        self.sets.append((normal((case.k, case.n), scale),))

  def kernel(self, impl: str, **tuning):
    op = self.case.op
    if op == "qkv":
      return lambda x, g, ws, bs, cos, sin: decode_gemm.norm_qkv_rope(
          x, g, ws, bs, rope_cos=cos, rope_sin=sin, eps=EPS, impl=impl, **tuning)
    if op == "swiglu":
      return lambda x, g, w: decode_gemm.norm_swiglu(x, g, w, eps=EPS, impl=impl, **tuning)
    if op == "head":
      layout, excluded = head_layout(self.case), excluded_token(self.case)
      return lambda x, w: decode_gemm.greedy_head(x, w, layout=layout, excluded_token=excluded,
                                                  impl=impl, **tuning)
    return lambda x, r, w: decode_gemm.matmul_residual(x, w, r, impl=impl, **tuning)

  def xla(self):
    op = self.case.op
    if op == "qkv":
      return xla_qkv_rope
    if op == "swiglu":
      return xla_swiglu
    if op == "head":
      layout, excluded = head_layout(self.case), excluded_token(self.case)
      return lambda x, w: xla_greedy_head(x, w, layout, excluded)
    return lambda x, r, w: xla_matmul_residual(x, w, r)

  def reference(self, args):
    """The op's float32 reference on one call's arguments."""
    op = self.case.op
    if op == "qkv":
      x, g, ws, bs, cos, sin = args
      return decode_gemm.norm_qkv_rope_reference(x, g, ws, bs, None, cos, sin, eps=EPS)
    if op == "swiglu":
      return decode_gemm.norm_swiglu_reference(*args, eps=EPS)
    if op == "head":
      return decode_gemm.greedy_head_reference(*args, layout=head_layout(self.case),
                                               excluded_token=excluded_token(self.case))
    x, r, w = args
    return decode_gemm.matmul_residual_reference(x, w, r)

  def harness(self):
    """The scan's own per-call work: an output of the right shape from the call's inputs."""
    n = 1 if self.case.op == "head" else self.case.n
    return lambda x, *rest: jnp.broadcast_to(x[:, :1], (x.shape[0], n))

  def one_call_args(self, rows: int | None = None):
    """Arguments of one call (the first input, the first weight set), rows cut or tiled."""
    args = tuple(a[0] for a in self.per_call) + self.sets[0]
    if rows is None:
      return args
    grow = lambda a: jnp.resize(a, (rows, a.shape[1]))
    args = tuple(grow(a) for a in args[:len(self.per_call)]) + args[len(self.per_call):]
    if self.case.op == "qkv":  # the RoPE tables have a row per x row
      args = args[:-2] + tuple(grow(a) for a in args[-2:])
    return args


def timed_program(call, per_call: tuple, sets: list):
  """(jitted program, calls per program): one ``call(*per_call[i], *sets[i % S])`` per input.
  A scan runs the calls back to back; each step makes one call per weight set (unrolled: a
  conditional would cost a host sync), so successive calls read different weights."""
  num_sets = len(sets)
  steps = per_call[0].shape[0] // num_sets

  def program(per_call, sets):
    def body(total, args):
      for j, shared in enumerate(sets):
        mine = tuple(a[j] for a in args)
        result = lax.optimization_barrier(call(*mine, *shared))
        for leaf in jax.tree.leaves(result):
          total = total + leaf.reshape(-1)[0].astype(jnp.float32)
      return total, None
    grouped = tuple(a[:steps * num_sets].reshape(steps, num_sets, *a.shape[1:])
                    for a in per_call)
    return lax.scan(body, jnp.float32(0), grouped)[0]

  run = jax.jit(program)
  return (lambda: run(per_call, sets)), steps * num_sets


def kernels_per_call(program, calls: int) -> dict[str, float]:
  """Device microseconds per call of each GPU kernel the program launches (profiler trace)."""
  totals = collections.Counter()
  for name, _, duration_ns in trace_kernels(program, 2):
    totals[name[:60]] += duration_ns / 1e3 / (2 * calls)
  return {name: round(us, 2) for name, us in totals.most_common(8)}


def resolved(case: Case, tuning: dict) -> tuple:
  """The launch a tuning resolves to (variants with the same launch are timed once)."""
  if case.op == "head":
    t = decode_gemm.head_tuning(case.rows, case.k, case.n, 2, **tuning)
    return tuple(sorted((k, v) for k, v in t.items()))
  widths = case.widths + (HEAD_DIM.get(case.model, 128),) if case.op == "qkv" else ()
  if case.op == "qkv":  # norm_qkv_rope's tiles lie inside one head
    tuning = {**tuning, "block_n": min(tuning.get("block_n", 64), widths[-1])}
  t = decode_gemm.kernel_tuning(case.rows, case.k, case.n, 2, group_widths=widths, **tuning)
  return tuple(sorted((k, v) for k, v in t.items()))


def kernel_grid(case: Case, grid: list[dict]) -> list[dict]:
  """The grid as the op's kernel takes it: the head has no K splits, norm_qkv_rope's rotary
  pairs need block_n >= 32."""
  if case.op == "qkv":
    return [t for t in grid if t.get("block_n", 64) >= 32]
  if case.op != "head":
    return grid
  return [{k: v for k, v in tuning.items() if k != "split_k"} for tuning in grid]


def check_error(case: Case, out, ref) -> dict:
  """The kernel's (or XLA's) error against the reference: the largest relative error over the
  outputs; for the head the share of rows with the reference's token and the confidences'
  error."""
  if case.op == "head":
    return dict(token_match=float(jnp.mean(out[0] == ref[0])),
                rel_err=relative_error(out[1], ref[1]))
  outs, refs = jax.tree.leaves(out), jax.tree.leaves(ref)
  return dict(rel_err=max(relative_error(o, r) for o, r in zip(outs, refs)))


def check_call(problem: "Problem", impl: str, args, ref, tuning: dict | None = None) -> dict:
  """One kernel call (``tuning`` over the defaults) and XLA's model path on ``args``, each
  against the float32 reference ``ref``: their errors and ``ok`` (the kernel within twice
  XLA's error or 1e-2; for the head, no more tokens off the reference's than XLA's)."""
  case = problem.case
  kernel = check_error(case, problem.kernel(impl, **(tuning or {}))(*args), ref)
  xla = check_error(case, jax.jit(problem.xla())(*args), ref)
  row = dict(kernel_rel_err=kernel["rel_err"], xla_rel_err=xla["rel_err"])
  row["ok"] = row["kernel_rel_err"] <= max(2 * row["xla_rel_err"], 1e-2)
  if case.op == "head":
    row["kernel_token_match"], row["xla_token_match"] = (kernel["token_match"],
                                                         xla["token_match"])
    # Near-ties among ~150K random logits may order differently in any float32 sum: no
    # fewer tokens than XLA's own path may differ from the reference's.
    row["ok"] = row["ok"] and kernel["token_match"] >= xla["token_match"]
  return row


def run_checks(log, all_cases: list[Case], impl: str) -> list[dict]:
  """Kernel and XLA's model path, each against the float32 reference, bf16 inputs, at every
  row count of the run and at 96 rows (batch 3: padded rows)."""
  rows = []
  row_counts = sorted({c.rows for c in all_cases} | {96})
  for case in {(c.model, c.op): c for c in all_cases}.values():
    problem = Problem(case, reps=1, sets=1, seed=7)
    for rows_count in row_counts:
      args = problem.one_call_args(rows_count)
      row = dict(model=case.model, op=case.op, rows=rows_count, k=case.k, n=case.n)
      checked = attempt(log, f"check {row}",
                        lambda: check_call(problem, impl, args, problem.reference(args)))
      row.update(checked or dict(kernel_rel_err=None, ok=False))
      rows.append(row)
      log(json.dumps(row))
  return rows


class CaseTimer:
  """Times one case's programs on one Problem (built once, reused by the sweep)."""

  def __init__(self, log, case: Case, impl: str, reps: int, timings: int):
    self.log, self.case, self.impl, self.timings = log, case, impl, timings
    self.problem = Problem(case, reps, sets=2 if impl == "interpret" else None)

  def __call__(self, label: str, call, trace: bool = False):
    """(us per call or None if it failed, {kernel: device us per call} if ``trace``)."""
    program, calls = timed_program(call, self.problem.per_call, self.problem.sets)
    seconds = attempt(self.log, f"{self.case} {label}",
                      lambda: median_seconds(program, self.timings) / calls)
    if seconds is None or not trace:
      return (None if seconds is None else seconds * 1e6), {}
    launches = attempt(self.log, f"trace {label}", lambda: kernels_per_call(program, calls))
    return seconds * 1e6, launches or {}


def measure_baseline(timer: CaseTimer, ceilings: dict, trace: bool) -> dict:
  """One table row before the sweep: floor, harness, XLA, the kernel's defaults."""
  case, problem = timer.case, timer.problem
  floor_s = max(case.bytes_moved() / ceilings["copy_bytes_per_s"],
                case.flops() / ceilings["matmul_flops_per_s"])
  row = dict(model=case.model, op=case.op, rows=case.rows, k=case.k, n=case.n,
             weight_sets=len(problem.sets), floor_us=floor_s * 1e6,
             floor_us_3tbs=max(case.bytes_moved() / 3.0e12,
                               case.flops() / ceilings["matmul_flops_per_s"]) * 1e6)
  row["harness_us"], _ = timer("harness", problem.harness())
  row["xla_us"], row["xla_kernels"] = timer("xla", problem.xla(), trace)
  row["kernel_us"], row["kernel_kernels"] = timer("kernel", problem.kernel(timer.impl), trace)
  row["kernel_tuning"] = dict(resolved(case, {}))
  row["sweep"], row["best_us"], row["best_tuning"] = [], row["kernel_us"], {}
  return row


def sweep_case(timer: CaseTimer, row: dict, grid: list[dict], deadline: float) -> None:
  """Times ``grid``'s launches not yet timed for this case into ``row`` (sweep, best_us,
  best_tuning) until ``deadline``; each timed launch is checked against the reference (its
  ``ok``), and only a correct one can be the best."""
  seen = {resolved(timer.case, {})}
  for tuning in kernel_grid(timer.case, grid):
    key = resolved(timer.case, tuning)
    if key in seen:
      continue
    if time.monotonic() > deadline:
      row["sweep_cut"] = True
      timer.log(f"{timer.case}: sweep stopped at --budget_s")
      return
    seen.add(key)
    us, _ = timer(json.dumps(tuning), timer.problem.kernel(timer.impl, **tuning))
    if us is None:
      continue
    # A launch the sweep may pick is checked too: a tiling that computes wrong never wins.
    args = timer.problem.one_call_args()
    checked = attempt(timer.log, f"{timer.case} check {json.dumps(tuning)}",
                      lambda: check_call(timer.problem, timer.impl, args,
                                         timer.problem.reference(args), tuning))
    ok = bool(checked and checked["ok"])
    row["sweep"].append({**tuning, "us": us, "ok": ok})
    if ok and (row["best_us"] is None or us < row["best_us"]):
      row["best_us"], row["best_tuning"] = us, tuning


def format_table(rows: list[dict], ceilings: dict) -> str:
  fmt = lambda v: "-" if v is None else f"{v:.1f}"
  ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}"
  lines = [
      f"Floor: max(bytes / {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, FLOPs / "
      f"{ceilings['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s), both measured in this run; "
      "times are us per call (wall in a jitted loop, harness included).",
      "",
      "| model | op | rows | K x N | floor | XLA | kernel (defaults) | kernel (best) | best tuning"
      " | XLA / floor | best / floor | XLA / best | harness |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['op']} | {r['rows']} | {r['k']} x {r['n']} | "
        f"{fmt(r['floor_us'])} | {fmt(r['xla_us'])} | {fmt(r['kernel_us'])} | "
        f"{fmt(r['best_us'])} | {json.dumps(r['best_tuning'])} | "
        f"{ratio(r['xla_us'], r['floor_us'])} | {ratio(r['best_us'], r['floor_us'])} | "
        f"{ratio(r['xla_us'], r['best_us'])} | {fmt(r['harness_us'])} |")
  layers = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0])
  for r in rows:
    if r["op"] in LAYER_OPS and r["xla_us"] is not None and r["best_us"] is not None:
      total = layers[(r["model"], r["rows"])]
      total[0] += r["floor_us"]
      total[1] += r["xla_us"]
      total[2] += r["best_us"]
      total[3] += 1
  layers = {key: total[:3] for key, total in layers.items() if total[3] == len(LAYER_OPS)}
  if layers:
    lines += ["", "Per layer (qkv + swiglu + o_proj + down; x 28 layers per step, plus one "
              "head):", "",
              "| model | rows | floor | XLA | kernels (best) | XLA / kernels |",
              "|---|---|---|---|---|---|"]
    for (model, rows_count), (floor, xla, best) in sorted(layers.items()):
      lines.append(f"| {model} | {rows_count} | {floor:.1f} | {xla:.1f} | {best:.1f} | "
                   f"{xla / best:.2f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", default="check,sweep,table",
                      help="comma list of check, sweep, table (sweep: tune inside the table)")
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--models", default="1.5B,7B", help=f"comma list of {sorted(MODELS)}")
  parser.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS}")
  parser.add_argument("--rows", default="32,256", help="rows per call (batch x 32 tokens)")
  parser.add_argument("--grid", default="small",
                      help=f"sweep grid: {sorted(GRIDS)} or a JSON list of tuning dicts")
  parser.add_argument("--reps", type=int, default=32, help="calls per timed program")
  parser.add_argument("--timings", type=int, default=7, help="timed programs (median)")
  parser.add_argument("--budget_s", type=float, default=200.0,
                      help="seconds from the start after which the sweep stops (the table's "
                      "baselines all run before it)")
  parser.add_argument("--trace", default=True, action=argparse.BooleanOptionalAction,
                      help="record each timed program's device kernels (profiler)")
  parser.add_argument("--toy", action="store_true",
                      help="the kernel in interpret mode, fixed ceilings (CPU test)")
  flags = parser.parse_args()
  started = time.monotonic()
  modes = flags.mode.split(",")
  models, ops = flags.models.split(","), flags.ops.split(",")
  unknown = (sorted(set(models) - set(MODELS)) + sorted(set(ops) - set(OPS))
             + sorted(set(modes) - {"check", "sweep", "table"}))
  if unknown:
    parser.error(f"unknown --models / --ops / --mode entries {unknown}")
  grid = GRIDS.get(flags.grid) if flags.grid in GRIDS else json.loads(flags.grid)
  impl = "interpret" if flags.toy else "pallas"
  os.makedirs(flags.out, exist_ok=True)
  log = run_log(os.path.join(flags.out, "decode_gemm.log"))

  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "args": vars(flags)}
  report["ceilings"] = (dict(copy_bytes_per_s=3.0e12, matmul_flops_per_s=7.0e14) if flags.toy
                        else measure_ceilings())
  log(json.dumps(report))
  all_cases = cases(models, [int(r) for r in flags.rows.split(",")], ops)

  def write():
    with open(os.path.join(flags.out, "decode_gemm.json"), "w") as f:
      json.dump(report, f, indent=1)
    if report.get("table"):
      with open(os.path.join(flags.out, "decode_gemm.md"), "w") as f:
        f.write(f"Device: {report['device']}, jax {report['jax']}, {report['date']}\n\n")
        f.write(format_table(report["table"], report["ceilings"]) + "\n")

  if "check" in modes:
    report["checks"] = run_checks(log, all_cases, impl)
    write()
  if "table" in modes:
    # Every case's baseline first, then the sweep, batch 1 (fewest rows) first, until
    # --budget_s: a short budget still leaves a whole table.
    report["table"], timers = [], []
    for case in all_cases:
      timers.append(CaseTimer(log, case, impl, flags.reps, flags.timings))
      report["table"].append(measure_baseline(timers[-1], report["ceilings"],
                                              flags.trace and not flags.toy))
      log(json.dumps(report["table"][-1]))
      write()
    if "sweep" in modes:
      deadline = started + flags.budget_s
      for timer, row in sorted(zip(timers, report["table"]), key=lambda tr: tr[0].case.rows):
        sweep_case(timer, row, grid, deadline)
        log(json.dumps({k: row[k] for k in ("model", "op", "rows", "sweep")}))
        write()
    print(format_table(report["table"], report["ceilings"]))
  report["seconds"] = time.monotonic() - started
  write()
  if "check" in modes:
    failed = [c for c in report["checks"] if not c["ok"]]
    print(f"checks: {len(report['checks']) - len(failed)} ok, {len(failed)} failed")


if __name__ == "__main__":
  main()
