"""Decode-shaped matmuls with their neighbours fused: RMSNorm before; bias, residual, SwiGLU or
a greedy token pick after.

A denoising step multiplies 32-256 rows (one 32-token block per sequence) by each weight, so
reading the weight once is the whole cost, and XLA's code around the GEMMs (the norm, the bias,
the residual add, SiLU x up, the logits' softmax: one small fusion each, 2-3.5 us, the logits'
several passes over [rows, vocab] float32) is latency and traffic on top of it (issue 28).

* ``norm_matmul(x, norm_weight, w, bias)``: (rmsnorm(x) * norm_weight) @ w + bias, the input
  norm and the q/k/v projection of a decoder layer in one kernel; ``w`` (and ``bias``) may be
  a tuple of weights sharing the input (q, k, v as the model stores them: one launch, each
  weight read once, no concatenated copy).
* ``norm_qkv_rope(x, norm_weight, (w_q, w_k, w_v), biases, rope_cos, rope_sin, head_norms)``:
  the same q / k / v projection with the per-head q / k RMS norms (Qwen3) and RoPE in the
  epilogue: each program holds rotary pairs of columns of one head ([c, c + n) and
  [c + head_dim / 2, ...)), so the rotation needs no exchange between programs.
* ``norm_swiglu(x, norm_weight, w_gate_up)``: silu(h @ w_gate) * (h @ w_up) with h =
  rmsnorm(x) * norm_weight, w_gate_up [features, 2, intermediate] (the model's gate_up_proj):
  the post-attention norm, the gate / up projection and the activation in one kernel.
* ``matmul_residual(x, w, residual)``: residual + x @ w, o_proj / down_proj and the residual
  add in one kernel.
* ``greedy_head(hidden, w, layout, excluded_token)``: the LM head's greedy proposal, argmax of
  hidden @ w and its softmax probability, without writing the [rows, vocab] logits: each
  program keeps its vocabulary tile's max, first argmax and sum of exponentials, and one XLA
  fusion merges the tiles.

The Triton kernels (grid: N tiles x K splits): every program holds all M rows (padded to a
power of two, the padding masked) and streams its [K range, block_n] slice of the weight(s)
once, in block_k tiles; x's tiles come from L2 (x is tiny, w is big). The norm needs no
prologue pass: rmsnorm(x) * g @ w = rstd * ((x * g) @ w) row by row, so the kernel multiplies
x * g tile by tile (rounded to w's dtype for the tensor cores, as the model rounds the
normalised activations), accumulates each row's sum of squares from the same tiles, and
scales the rows by rstd = rsqrt(mean(x^2) + eps) in the epilogue. With one K split the
epilogue also adds the bias (or the residual, or applies SiLU x up) and stores the output;
with several (few N tiles would leave the H100's 132 SMs idle) each split stores float32
partial products and sums of squares, and either one XLA fusion sums them and finishes
(finish="xla"), or the last program of each N tile to count itself in (an atomic add after a
barrier) does, in the same launch (finish="kernel").

The references compute the same definitions in float32 without intermediate rounding. Entry
points dispatch through `pallas_kernels.dispatch` ("pallas" / "interpret": the Triton kernel,
compiled or interpreted; every other setting: the reference, as there is no TPU kernel).
"""

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _triton_utils as tu
from pallas_kernels.dispatch import resolve_impl

# All rows live in one program: its float32 accumulator is [rows, block_n].
MAX_KERNEL_ROWS = 256
# The launch model that picks the default K splits (`default_split_k`): an H100's 132 SMs,
# each with an even share of ~3 TB/s of HBM bandwidth and of a ~600 TFLOP/s bf16 GEMM ceiling
# (../shared/docs/gpu.md, measured here).
NUM_SMS = 132
HBM_BYTES_PER_S = 3.0e12
GEMM_FLOPS_PER_S = 600e12
# Fewest K tiles per split (shorter splits spend their time in the pipeline's ramp).
MIN_SPLIT_TILES = 2
# Tuning keywords and their defaults (None: chosen from the shapes; see `kernel_tuning`).
_TUNING = dict(block_n=64, block_k=None, split_k=None, num_warps=None, num_stages=3,
               finish="xla")
FINISHES = ("xla", "kernel")  # who sums several K splits: one XLA fusion after, or the kernel
# The greedy head never splits K (its vocabulary gives thousands of N tiles).
_HEAD_TUNING = dict(block_n=128, block_k=None, num_warps=None, num_stages=3)
_DTYPES = (jnp.bfloat16, jnp.float32)
HEAD_LAYOUTS = ("ev", "ve")  # w [hidden, vocab] (an lm_head kernel) or [vocab, hidden] (tied)


def launch_seconds(rows: int, k: int, n: int, n_tiles: int, split_k: int,
                   weight_bytes: int) -> float:
  """Modelled time of one launch: the larger of its FLOPs over the busy SMs' share of the GEMM
  ceiling and its bytes (w once, plus with several splits the float32 partials written and
  read back) over their share of the bandwidth; a program keeps one SM busy."""
  busy = min(n_tiles * split_k, NUM_SMS) / NUM_SMS
  flops = 2 * tu.next_power_of_two(rows) * k * n  # the padded rows are multiplied too
  data = k * n * weight_bytes + (split_k > 1) * split_k * rows * n * 8
  return max(flops / (busy * GEMM_FLOPS_PER_S), data / (busy * HBM_BYTES_PER_S))


def default_split_k(n_tiles: int, k_tiles: int, rows: int, k: int, n: int,
                    weight_bytes: int) -> int:
  """The K splits (each at least MIN_SPLIT_TILES tiles long) with the least `launch_seconds`,
  the fewest on a tie: at 32 rows (weight-bound) about one wave of programs; at 256 rows
  (near the H100's ridge point) as many as the SMs' compute needs, where the partials cost
  less than idle SMs. A model until the GPU sweep (benchmarks/decode_gemm.py) measures it."""
  candidates = range(1, max(1, k_tiles // MIN_SPLIT_TILES) + 1)
  return min(candidates,
             key=lambda s: (launch_seconds(rows, k, n, n_tiles, s, weight_bytes), s))


def _largest_dividing_power_of_two(value: int, ceiling: int) -> int:
  """The largest power of two <= ceiling that divides ``value``."""
  block = 1
  while block * 2 <= ceiling and value % (block * 2) == 0:
    block *= 2
  return block


def kernel_tuning(rows: int, k: int, n: int, weight_bytes: int, *,
                  group_widths: Sequence[int] = (), **tuning) -> dict:
  """The launch parameters for x [rows, k] @ w [k, n]: ``tuning`` over the defaults, with the
  tiles fitted to the array (powers of two >= 16, no larger than the dimension they tile).
  With ``group_widths`` (the widths of several weights laid side by side, summing to n) an N
  tile never straddles two weights: block_n also divides every width."""
  t = {**_TUNING, **tuning}
  block_m = tu.next_power_of_two(rows)
  # Shared memory of a pipeline stage: an x tile [block_m, block_k] and a w tile; 128 columns
  # of 256 rows in 3 stages would exceed the H100's 227 KB.
  block_k = t["block_k"] or (128 if block_m <= 64 else 64)
  for name, value in (("block_n", t["block_n"]), ("block_k", block_k)):
    if value < 16 or value & (value - 1):
      raise ValueError(f"{name}={value} must be a power of two >= 16")
  for name in ("split_k", "num_warps"):
    if t.get(name) is not None and t[name] < 1:
      raise ValueError(f"{name}={t[name]} must be >= 1 (or None: chosen from the shapes)")
  if t.get("finish", "xla") not in FINISHES:
    raise ValueError(f"finish={t['finish']!r} must be one of {FINISHES}")
  block_k = tu.fit_block_k(block_k, k)
  block_n = tu.fit_block_k(t["block_n"], n)
  if len(group_widths) > 1:
    block_n = _largest_dividing_power_of_two(math.gcd(*group_widths), block_n)
    if block_n < 16:
      raise ValueError(f"grouped weights of widths {tuple(group_widths)}: every width must be "
                       "a multiple of 16")
  n_tiles, k_tiles = pl.cdiv(n, block_n), pl.cdiv(k, block_k)
  split_k = t.get("split_k") or default_split_k(n_tiles, k_tiles, rows, k, n, weight_bytes)
  split_k = min(split_k, k_tiles)
  # Tiles per split, then the splits that get any tile at all.
  split_tiles = pl.cdiv(k_tiles, split_k)
  split_k = pl.cdiv(k_tiles, split_tiles)
  num_warps = t["num_warps"] or (8 if block_m * block_n >= 128 * 64 else 4)
  return dict(block_m=block_m, block_k=block_k, block_n=block_n, split_k=split_k,
              split_tiles=split_tiles, n_tiles=n_tiles, num_warps=num_warps,
              num_stages=t["num_stages"], finish=t.get("finish", "xla") if split_k > 1 else "xla")


def head_tuning(rows: int, k: int, vocab: int, weight_bytes: int, **tuning) -> dict:
  """The greedy head's launch parameters: its own defaults (block_n 128), never a K split."""
  return kernel_tuning(rows, k, vocab, weight_bytes, **{**_HEAD_TUNING, **tuning, "split_k": 1})


def _masked(ref_view, mask):
  """A tile of ``ref_view``; with ``mask``, masked-out elements read 0."""
  if mask is None:
    return ref_view[...]
  return plt.load(ref_view, mask=mask, other=0)


def _both(a, b):
  if a is None:
    return b
  return a if b is None else a & b


def _all_rows(block_m: int):
  """The slice of every row a program holds, starting at a traced 0 (taken at the kernel's
  top level): a slice past the array's rows is then bounded by the row mask, where a static
  one would be rejected when tracing."""
  return pl.ds(pl.program_id(0) * 0, block_m)


def _row_mask(rows: int, block_m: int):
  """[block_m, 1] mask of the real rows, or None when no row is padding (static)."""
  return (jnp.arange(block_m) < rows)[:, None] if rows < block_m else None


def _accumulate(x_ref, g_ref, load_w, num_acc: int, *, all_rows, rows: int, k: int,
                block_m: int, block_k: int, block_n: int, k_start, k_len,
                transposed: bool = False):
  """The K loop of one program: accumulators acc_i = (x [* g]) @ w_i over the K range
  [k_start, k_start + k_len), ``load_w(k0, k_valid)`` giving the num_acc weight tiles
  ([block_k, block_n], or [block_n, block_k] if ``transposed``), and with ``g_ref`` the rows'
  sums of squares of x (``all_rows``: see `_all_rows`). Full tiles run unmasked, the last one
  with its K mask."""
  row_mask = _row_mask(rows, block_m)
  dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))

  def tile(i, carry, k_valid):
    accs, ssq = carry
    k0 = k_start + i * block_k
    x = _masked(x_ref.at[all_rows, pl.ds(k0, block_k)],
                _both(row_mask, None if k_valid is None else k_valid[None, :]))
    x = x.astype(jnp.float32)
    if g_ref is not None:
      ssq = ssq + jnp.sum(x * x, axis=1)
      g = _masked(g_ref.at[pl.ds(k0, block_k)], k_valid).astype(jnp.float32)
      x = x * g[None, :]
    tiles = load_w(k0, k_valid)
    x = x.astype(tiles[0].dtype)
    accs = tuple(acc + lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
                 for acc, w in zip(accs, tiles))
    return accs, ssq

  full_tiles = k_len // block_k
  carry = (tuple(jnp.zeros((block_m, block_n), jnp.float32) for _ in range(num_acc)),
           jnp.zeros((block_m,), jnp.float32))
  carry = lax.fori_loop(0, full_tiles, lambda i, c: tile(i, c, None), carry)
  return lax.fori_loop(
      full_tiles, pl.cdiv(k_len, block_k),
      lambda i, c: tile(i, c, i * block_k + jnp.arange(block_k) < k_len), carry)


def _weight_tile(w_ref, n0, col_mask, block_k: int, block_n: int):
  """load_w for a [K, N] weight: the [block_k, block_n] tile at (k0, n0), masked."""
  def load(k0, k_valid):
    mask = _both(None if k_valid is None else k_valid[:, None], col_mask)
    return (_masked(w_ref.at[pl.ds(k0, block_k), pl.ds(n0, block_n)], mask),)
  return load


class _Splits(NamedTuple):
  """How a program's K split ends (static, and the refs it needs).

  split_k == 1: the program runs the epilogue. Several splits: each stores its float32
  partial products into ``partials`` [split_k, rows, N] and its rows' sums of squares into
  ``ssq`` [split_k, n_tiles, rows] (when normalising); then with ``in_kernel`` the last of an
  N tile's split_k programs to count itself in on ``counters`` [n_tiles] (an atomic add, acq_rel
  at GPU scope, after a barrier over the program's threads) sums them and runs the epilogue
  (no second launch; the counters return to 0), else XLA finishes after the kernel."""

  split_k: int
  in_kernel: bool
  interpret: bool
  partials: Any = None
  ssq: Any = None
  counters: Any = None


def _end_split(splits: _Splits, accs, ssq, cols, masks, epilogue, *, split, n_tile, all_rows,
               row_mask) -> None:
  """The end of one program: ``epilogue(accs, ssq)`` now (one split) or, with several, the
  partials stored and (in_kernel) the epilogue of the tile's last program over their sums.
  ``cols`` / ``masks``: where each accumulator's columns go in the [rows, N] layout."""
  if splits.split_k == 1:
    epilogue(accs, ssq)
    return
  rows_mask = None if row_mask is None else row_mask[:, 0]
  for acc, col, mask in zip(accs, cols, masks):
    plt.store(splits.partials.at[split, all_rows, col], acc, mask=mask)
  if splits.ssq is not None:
    plt.store(splits.ssq.at[split, n_tile, all_rows], ssq, mask=rows_mask)
  if not splits.in_kernel:
    return
  if not splits.interpret:  # (the interpreter runs programs one by one, and has no barrier)
    plt.debug_barrier()  # every thread's partial stored before the count releases them
  arrived = plt.atomic_add(splits.counters, n_tile, jnp.int32(1))

  @pl.when(arrived == splits.split_k - 1)
  def _():
    if not splits.interpret:
      plt.debug_barrier()
    # Volatile loads: the partials were written by other programs, never through this SM's L1.
    part = lambda ref, mask: (plt.load(ref, volatile=True) if mask is None else
                              plt.load(ref, mask=mask, other=0, volatile=True))
    ids = [jnp.int32(s) for s in range(splits.split_k)]  # (a traced index: interpret mode)
    totals = [sum(part(splits.partials.at[s, all_rows, col], mask) for s in ids)
              for col, mask in zip(cols, masks)]
    total_ssq = None if splits.ssq is None else sum(
        part(splits.ssq.at[s, n_tile, all_rows], rows_mask) for s in ids)
    epilogue(totals, total_ssq)
    plt.atomic_add(splits.counters, n_tile, jnp.int32(-splits.split_k))


def _split_refs(refs: list, split_k: int, in_kernel: bool, normalize: bool,
                interpret: bool) -> tuple[Any, _Splits]:
  """Pops a launch's output refs (see `_split_io`): (out or None, _Splits)."""
  if split_k > 1 and in_kernel:
    refs.pop(0)  # the counters' input: aliased to the counters output, used through that
  out_ref = refs.pop(0) if split_k == 1 or in_kernel else None
  partials = refs.pop(0) if split_k > 1 else None
  ssq = refs.pop(0) if split_k > 1 and normalize else None
  counters = refs.pop(0) if split_k > 1 and in_kernel else None
  assert not refs, refs
  return out_ref, _Splits(split_k, in_kernel, interpret, partials, ssq, counters)


def _gemm_kernel(*refs, rows: int, k: int, widths: tuple[int, ...], block_m: int,
                 block_k: int, block_n: int, split_k: int, split_tiles: int, normalize: bool,
                 epilogue: str | None, eps: float, in_kernel: bool, interpret: bool):
  """One (N tile, K split) program of x [* g] @ [w_0 | w_1 | ...]: its tile lies in one
  weight (widths: their output widths, each a multiple of block_n when there are several).

  refs: x, [norm weight], w_0.., [bias_0.. or residual, when the kernel runs the epilogue],
  then the outputs of `_split_io`."""
  refs = list(refs)
  x_ref = refs.pop(0)
  g_ref = refs.pop(0) if normalize else None
  w_refs = [refs.pop(0) for _ in widths]
  extra_refs = []
  if split_k == 1 or in_kernel:
    extra_refs = ([refs.pop(0) for _ in widths] if epilogue == "bias" else
                  [refs.pop(0)] if epilogue == "residual" else [])
  out_ref, splits = _split_refs(refs, split_k, in_kernel, normalize, interpret)

  n_tile, split = pl.program_id(0), pl.program_id(1)
  all_rows, row_mask = _all_rows(block_m), _row_mask(rows, block_m)
  k_start = split * (split_tiles * block_k)
  k_len = jnp.minimum(k - k_start, split_tiles * block_k)
  total = sum(widths)
  out_cols = pl.ds(n_tile * block_n, block_n)
  out_col_mask = (n_tile * block_n + jnp.arange(block_n) < total)[None, :] \
      if total % block_n else None
  out_mask = _both(row_mask, out_col_mask)

  def group(index: int, first_tile: int):
    n0 = (n_tile - first_tile) * block_n  # the tile's first column inside its weight
    col_mask = (n0 + jnp.arange(block_n) < widths[index])[None, :] \
        if widths[index] % block_n else None
    (acc,), ssq = _accumulate(
        x_ref, g_ref, _weight_tile(w_refs[index], n0, col_mask, block_k, block_n), 1,
        all_rows=all_rows, rows=rows, k=k, block_m=block_m, block_k=block_k, block_n=block_n,
        k_start=k_start, k_len=k_len)

    def finish(accs, ssq):
      (acc,) = accs
      if normalize:
        acc = acc * lax.rsqrt(ssq / k + eps)[:, None]
      if epilogue == "bias":
        bias = _masked(extra_refs[index].at[pl.ds(n0, block_n)],
                       None if col_mask is None else col_mask[0])
        acc = acc + bias.astype(jnp.float32)[None, :]
      elif epilogue == "residual":
        residual = extra_refs[0].at[all_rows, out_cols]
        acc = acc + _masked(residual, out_mask).astype(jnp.float32)
      plt.store(out_ref.at[all_rows, out_cols], acc.astype(out_ref.dtype), mask=out_mask)

    _end_split(splits, (acc,), ssq, (out_cols,), (out_mask,), finish, split=split,
               n_tile=n_tile, all_rows=all_rows, row_mask=row_mask)

  if len(widths) == 1:
    group(0, 0)
    return
  first = 0
  for index, width in enumerate(widths):
    tiles = width // block_n
    pl.when((n_tile >= first) & (n_tile < first + tiles))(
        functools.partial(group, index, first))
    first += tiles


def _qkv_rope_kernel(*refs, rows: int, k: int, widths: tuple[int, ...], head_dim: int,
                     block_m: int, block_k: int, block_n: int, split_k: int, split_tiles: int,
                     has_bias: bool, head_norm: bool, eps: float, in_kernel: bool,
                     interpret: bool):
  """One (N tile, K split) program of norm_qkv_rope: in one head of q, k or v, the rotary
  pairs of block_n / 2 columns [c, c + block_n / 2) and [c + head_dim / 2, ...) (two
  accumulators), so that RoPE (and, with block_n = head_dim, the per-head q / k norm) happen
  in registers.

  refs: x, g, w_q, w_k, w_v, [when the kernel runs the epilogue: [b_q, b_k, b_v], [q norm
  weight, k norm weight], cos, sin ([rows, head_dim / 2] float32)], then the outputs of
  `_split_io` (out: [rows, sum(widths)], q | k | v)."""
  refs = list(refs)
  x_ref, g_ref = refs.pop(0), refs.pop(0)
  w_refs = [refs.pop(0) for _ in widths]
  bias_refs = norm_refs = cos_ref = sin_ref = None
  if split_k == 1 or in_kernel:
    bias_refs = [refs.pop(0) for _ in widths] if has_bias else None
    norm_refs = [refs.pop(0), refs.pop(0)] if head_norm else None
    cos_ref, sin_ref = refs.pop(0), refs.pop(0)
  out_ref, splits = _split_refs(refs, split_k, in_kernel, True, interpret)
  n_tile, split = pl.program_id(0), pl.program_id(1)
  all_rows, row_mask = _all_rows(block_m), _row_mask(rows, block_m)
  k_start = split * (split_tiles * block_k)
  k_len = jnp.minimum(k - k_start, split_tiles * block_k)
  half, pair = head_dim // 2, block_n // 2
  tiles_per_head = head_dim // block_n

  def group(index: int, first_tile: int, out_offset: int):
    tile = n_tile - first_tile
    chunk = tile % tiles_per_head  # which rotary pairs of the head
    lo = (tile // tiles_per_head) * head_dim + chunk * pair  # first column, inside the weight
    hi = lo + half

    def load(k0, k_valid):
      mask = None if k_valid is None else k_valid[:, None]
      return tuple(_masked(w_refs[index].at[pl.ds(k0, block_k), pl.ds(start, pair)], mask)
                   for start in (lo, hi))

    accs, ssq = _accumulate(x_ref, g_ref, load, 2, all_rows=all_rows, rows=rows, k=k,
                            block_m=block_m, block_k=block_k, block_n=pair, k_start=k_start,
                            k_len=k_len)
    cols = (pl.ds(out_offset + lo, pair), pl.ds(out_offset + hi, pair))

    def finish(accs, ssq):
      rstd = lax.rsqrt(ssq / k + eps)[:, None]
      acc_lo, acc_hi = accs[0] * rstd, accs[1] * rstd
      if has_bias:
        acc_lo += bias_refs[index][pl.ds(lo, pair)].astype(jnp.float32)[None, :]
        acc_hi += bias_refs[index][pl.ds(hi, pair)].astype(jnp.float32)[None, :]
      if index < 2:  # q and k: per-head norm (Qwen3), then RoPE
        if head_norm:
          head_rstd = lax.rsqrt((jnp.sum(acc_lo * acc_lo, axis=1)
                                 + jnp.sum(acc_hi * acc_hi, axis=1)) / head_dim + eps)[:, None]
          weight = norm_refs[index]
          acc_lo = acc_lo * head_rstd * weight[pl.ds(0, half)].astype(jnp.float32)[None, :]
          acc_hi = acc_hi * head_rstd * weight[pl.ds(half, half)].astype(jnp.float32)[None, :]
        table = (all_rows, pl.ds(chunk * pair, pair))
        cos = _masked(cos_ref.at[table], row_mask)
        sin = _masked(sin_ref.at[table], row_mask)
        acc_lo, acc_hi = acc_lo * cos - acc_hi * sin, acc_hi * cos + acc_lo * sin
      for col, acc in zip(cols, (acc_lo, acc_hi)):
        plt.store(out_ref.at[all_rows, col], acc.astype(out_ref.dtype), mask=row_mask)

    _end_split(splits, accs, ssq, cols, (row_mask, row_mask), finish, split=split,
               n_tile=n_tile, all_rows=all_rows, row_mask=row_mask)

  first = offset = 0
  for index, width in enumerate(widths):
    tiles = width // block_n
    pl.when((n_tile >= first) & (n_tile < first + tiles))(
        functools.partial(group, index, first, offset))
    first += tiles
    offset += width


def _swiglu_kernel(*refs, rows: int, k: int, width: int, block_m: int, block_k: int,
                   block_n: int, split_k: int, split_tiles: int, eps: float, in_kernel: bool,
                   interpret: bool):
  """One (N tile, K split) program of silu(h @ w_gate) * (h @ w_up), h = rmsnorm(x) * g, with
  w = [w_gate | w_up] ([K, 2 * width], the model's [K, 2, width] kernel reshaped): the gate
  and up tiles of the same columns, two accumulators (partials: gate columns, then up).

  refs: x, g, w, then the outputs of `_split_io` (out: [rows, width])."""
  refs = list(refs)
  x_ref, g_ref, w_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  out_ref, splits = _split_refs(refs, split_k, in_kernel, True, interpret)
  n_tile, split = pl.program_id(0), pl.program_id(1)
  all_rows, row_mask = _all_rows(block_m), _row_mask(rows, block_m)
  k_start = split * (split_tiles * block_k)
  k_len = jnp.minimum(k - k_start, split_tiles * block_k)
  n0 = n_tile * block_n
  col_mask = (n0 + jnp.arange(block_n) < width)[None, :] if width % block_n else None
  out_mask = _both(row_mask, col_mask)

  def load(k0, k_valid):
    mask = _both(None if k_valid is None else k_valid[:, None], col_mask)
    return tuple(_masked(w_ref.at[pl.ds(k0, block_k), pl.ds(start, block_n)], mask)
                 for start in (n0, width + n0))

  accs, ssq = _accumulate(x_ref, g_ref, load, 2, all_rows=all_rows, rows=rows, k=k,
                          block_m=block_m, block_k=block_k, block_n=block_n, k_start=k_start,
                          k_len=k_len)

  def finish(accs, ssq):
    rstd = lax.rsqrt(ssq / k + eps)[:, None]
    gate, up = accs[0] * rstd, accs[1] * rstd
    plt.store(out_ref.at[all_rows, pl.ds(n0, block_n)],
              (jax.nn.sigmoid(gate) * gate * up).astype(out_ref.dtype), mask=out_mask)

  _end_split(splits, accs, ssq, (pl.ds(n0, block_n), pl.ds(width + n0, block_n)),
             (out_mask, out_mask), finish, split=split, n_tile=n_tile, all_rows=all_rows,
             row_mask=row_mask)


def _head_kernel(x_ref, w_ref, max_ref, arg_ref, sum_ref, *, rows: int, k: int, vocab: int,
                 excluded: int, transposed: bool, block_m: int, block_k: int, block_n: int):
  """One vocabulary tile of the greedy head: logits = x @ w (w [K, V], or [V, K] if
  ``transposed``) for the tile's columns, then per row the tile's max logit, the first column
  holding it and sum(exp(logit - max)); padding columns and ``excluded`` read -inf."""
  n_tile = pl.program_id(0)
  all_rows, row_mask = _all_rows(block_m), _row_mask(rows, block_m)
  n0 = n_tile * block_n
  cols = n0 + jnp.arange(block_n)
  col_valid = (cols < vocab) if vocab % block_n else None

  def load(k0, k_valid):
    if transposed:
      mask = _both(None if col_valid is None else col_valid[:, None],
                   None if k_valid is None else k_valid[None, :])
      return (_masked(w_ref.at[pl.ds(n0, block_n), pl.ds(k0, block_k)], mask),)
    mask = _both(None if k_valid is None else k_valid[:, None],
                 None if col_valid is None else col_valid[None, :])
    return (_masked(w_ref.at[pl.ds(k0, block_k), pl.ds(n0, block_n)], mask),)

  (logits,), _ = _accumulate(x_ref, None, load, 1, all_rows=all_rows, rows=rows, k=k,
                             block_m=block_m, block_k=block_k, block_n=block_n, k_start=0,
                             k_len=k, transposed=transposed)
  keep = cols != excluded
  if col_valid is not None:
    keep = keep & col_valid
  logits = jnp.where(keep[None, :], logits, -jnp.inf)
  top = jnp.max(logits, axis=1)
  first = jnp.min(jnp.where(logits == top[:, None], cols[None, :], jnp.iinfo(jnp.int32).max),
                  axis=1)
  # A tile whose every column is excluded or padding has top = -inf: its sum is 0, not NaN.
  finite_top = jnp.where(top == -jnp.inf, 0.0, top)
  total = jnp.sum(jnp.exp(logits - finite_top[:, None]), axis=1)
  mask = None if row_mask is None else row_mask[:, 0]
  for ref, value in ((max_ref, top), (arg_ref, first), (sum_ref, total)):
    plt.store(ref.at[n_tile, all_rows], value.astype(ref.dtype), mask=mask)


def _whole(shape):
  return pl.BlockSpec(shape, lambda *_, nd=len(shape): (0,) * nd)


def _launch(kernel, name: str, inputs: list, out_shape: list, grid: tuple, t: dict,
            interpret: bool, aliases: dict | None = None):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=[_whole(a.shape) for a in inputs],
      out_specs=[_whole(s.shape) for s in out_shape], out_shape=out_shape,
      compiler_params=tu.compiler_params(t["num_warps"], t["num_stages"]),
      input_output_aliases=aliases or {}, interpret=interpret, name=name)(*inputs)


def _split_io(inputs: list, t: dict, rows: int, n: int, out: jax.ShapeDtypeStruct,
              normalize: bool) -> tuple[list, list, dict]:
  """(inputs, output shapes, aliases) of a launch with t's K splits: the output alone (one
  split); float32 partials [split_k, rows, n] and, if ``normalize``, sums of squares
  [split_k, n_tiles, rows] (XLA finishes); with finish="kernel" the output first and the
  counters [n_tiles] last, zeros in and out (aliased)."""
  split, tiles = t["split_k"], t["n_tiles"]
  if split == 1:
    return inputs, [out], {}
  partials = [jax.ShapeDtypeStruct((split, rows, n), jnp.float32)]
  if normalize:
    partials.append(jax.ShapeDtypeStruct((split, tiles, rows), jnp.float32))
  if t["finish"] != "kernel":
    return inputs, partials, {}
  counters = jax.ShapeDtypeStruct((tiles,), jnp.int32)
  outs = [out, *partials, counters]
  return inputs + [jnp.zeros(counters.shape, counters.dtype)], outs, {len(inputs): len(outs) - 1}


def _xla_sums(outs: list, k: int, eps: float, normalize: bool) -> jax.Array:
  """The XLA finish's start: the partials summed, times each row's rstd if ``normalize``."""
  acc = jnp.sum(outs[0], axis=0)
  if normalize:
    acc = acc * lax.rsqrt(jnp.sum(outs[1][:, 0], axis=0) / k + eps)[:, None]
  return acc


def _split_columns(out: jax.Array, widths: tuple[int, ...]) -> tuple[jax.Array, ...]:
  ends = [sum(widths[:i + 1]) for i in range(len(widths))]
  return tuple(out[:, end - width:end] for end, width in zip(ends, widths))


@functools.partial(jax.jit, static_argnames=("normalize", "epilogue", "eps", "out_dtype",
                                             "interpret", "block_n", "block_k", "split_k",
                                             "num_warps", "num_stages", "finish"))
def _fused_gemm(x, g, ws, extras, *, normalize: bool, epilogue: str | None, eps: float,
                out_dtype, interpret: bool, block_n: int, block_k: int | None,
                split_k: int | None, num_warps: int | None, num_stages: int, finish: str):
  """norm_matmul / matmul_residual: the kernel launch and, with several K splits finished by
  XLA, the fusion that does it. ws: a tuple of weights; extras: their biases, or
  (residual,), or (). Returns a tuple of outputs, one per weight."""
  rows, k = x.shape
  widths = tuple(w.shape[1] for w in ws)
  n = sum(widths)
  t = kernel_tuning(rows, k, n, ws[0].dtype.itemsize, group_widths=widths, block_n=block_n,
                    block_k=block_k, split_k=split_k, num_warps=num_warps,
                    num_stages=num_stages, finish=finish)
  split, in_kernel = t["split_k"], t["finish"] == "kernel"
  kernel = functools.partial(
      _gemm_kernel, rows=rows, k=k, widths=widths, block_m=t["block_m"], block_k=t["block_k"],
      block_n=t["block_n"], split_k=split, split_tiles=t["split_tiles"], normalize=normalize,
      epilogue=epilogue, eps=eps, in_kernel=in_kernel, interpret=interpret)
  inputs = [x] + ([g] if normalize else []) + list(ws)
  if split == 1 or in_kernel:
    inputs += list(extras)
  inputs, out_shape, aliases = _split_io(inputs, t, rows, n,
                                         jax.ShapeDtypeStruct((rows, n), out_dtype), normalize)
  outs = _launch(kernel, "norm_matmul" if normalize else "matmul_residual", inputs, out_shape,
                 (t["n_tiles"], split), t, interpret, aliases)
  if split == 1 or in_kernel:
    return _split_columns(outs[0], widths)
  acc = _xla_sums(outs, k, eps, normalize)
  if epilogue == "bias":
    acc = acc + jnp.concatenate([b.astype(jnp.float32) for b in extras])[None, :]
  elif epilogue == "residual":
    acc = acc + extras[0].astype(jnp.float32)
  return _split_columns(acc.astype(out_dtype), widths)


def _finish_qkv(q, k, v, biases, head_norms, cos, sin, *, eps: float, out_dtype):
  """From float32 projections [rows, heads * head_dim] (input norm applied): the biases, the
  per-head q / k norms and RoPE, in float32; the XLA finish of norm_qkv_rope's K splits and
  (from the float32 references) its reference."""
  half = cos.shape[1]
  outs = []
  for index, out in enumerate((q, k, v)):
    if biases is not None:
      out = out + biases[index].astype(jnp.float32)
    if index < 2:
      heads = out.reshape(out.shape[0], -1, 2 * half)
      if head_norms is not None:
        heads = heads * lax.rsqrt(jnp.mean(heads * heads, axis=-1, keepdims=True) + eps)
        heads = heads * head_norms[index].astype(jnp.float32)
      lo, hi = heads[..., :half], heads[..., half:]
      c, s = cos[:, None, :], sin[:, None, :]
      out = jnp.concatenate([lo * c - hi * s, hi * c + lo * s], axis=-1).reshape(out.shape)
    outs.append(out.astype(out_dtype))
  return tuple(outs)


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "block_n", "block_k",
                                             "split_k", "num_warps", "num_stages", "finish"))
def _fused_qkv_rope(x, g, ws, biases, head_norms, cos, sin, *, eps: float, interpret: bool,
                    block_n: int, block_k: int | None, split_k: int | None,
                    num_warps: int | None, num_stages: int, finish: str):
  rows, k = x.shape
  head_dim = 2 * cos.shape[1]
  widths = tuple(w.shape[1] for w in ws)
  # Tiles inside one head (the whole head for the per-head norms), rotary pairs of >= 16
  # columns (a tensor-core dot's smallest N).
  if block_n < 32:
    raise ValueError(f"norm_qkv_rope: block_n={block_n}; the kernel's rotary pairs of block_n "
                     "/ 2 columns need block_n >= 32")
  block_n = head_dim if head_norms is not None else min(block_n, head_dim)
  t = kernel_tuning(rows, k, sum(widths), ws[0].dtype.itemsize,
                    group_widths=widths + (head_dim,), block_n=block_n, block_k=block_k,
                    split_k=split_k, num_warps=num_warps, num_stages=num_stages, finish=finish)
  if head_norms is not None and t["block_n"] != head_dim:
    raise ValueError(f"norm_qkv_rope: the per-head norms need one program per head: head_dim "
                     f"{head_dim} must be a power of two")
  split, in_kernel = t["split_k"], t["finish"] == "kernel"
  kernel = functools.partial(
      _qkv_rope_kernel, rows=rows, k=k, widths=widths, head_dim=head_dim,
      block_m=t["block_m"], block_k=t["block_k"], block_n=t["block_n"], split_k=split,
      split_tiles=t["split_tiles"], has_bias=biases is not None,
      head_norm=head_norms is not None, eps=eps, in_kernel=in_kernel, interpret=interpret)
  inputs = [x, g, *ws]
  if split == 1 or in_kernel:
    inputs += [*(biases or ()), *(head_norms or ()), cos, sin]
  n = sum(widths)
  inputs, out_shape, aliases = _split_io(inputs, t, rows, n,
                                         jax.ShapeDtypeStruct((rows, n), x.dtype), True)
  outs = _launch(kernel, "norm_qkv_rope", inputs, out_shape, (t["n_tiles"], split), t,
                 interpret, aliases)
  if split == 1 or in_kernel:
    return _split_columns(outs[0], widths)
  q, k_out, v = _split_columns(_xla_sums(outs, k, eps, True), widths)
  return _finish_qkv(q, k_out, v, biases, head_norms, cos, sin, eps=eps, out_dtype=x.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "block_n", "block_k",
                                             "split_k", "num_warps", "num_stages", "finish"))
def _fused_swiglu(x, g, w, *, eps: float, interpret: bool, block_n: int, block_k: int | None,
                  split_k: int | None, num_warps: int | None, num_stages: int, finish: str):
  rows, k = x.shape
  width = w.shape[2]
  w = w.reshape(k, 2 * width)  # [K, 2, F] -> [K, 2F]: gate columns, then up; no copy
  # Tiles over the intermediate columns; the split model's terms (FLOPs, weight and partial
  # bytes) all double for the two weights, so its choice is the same as for one.
  t = kernel_tuning(rows, k, width, w.dtype.itemsize, block_n=block_n, block_k=block_k,
                    split_k=split_k, num_warps=num_warps, num_stages=num_stages, finish=finish)
  split, in_kernel = t["split_k"], t["finish"] == "kernel"
  kernel = functools.partial(
      _swiglu_kernel, rows=rows, k=k, width=width, block_m=t["block_m"], block_k=t["block_k"],
      block_n=t["block_n"], split_k=split, split_tiles=t["split_tiles"], eps=eps,
      in_kernel=in_kernel, interpret=interpret)
  inputs, out_shape, aliases = _split_io([x, g, w], t, rows, 2 * width,
                                         jax.ShapeDtypeStruct((rows, width), x.dtype), True)
  outs = _launch(kernel, "norm_swiglu", inputs, out_shape, (t["n_tiles"], split), t,
                 interpret, aliases)
  if split == 1 or in_kernel:
    return outs[0]
  acc = _xla_sums(outs, k, eps, True)
  gate, up = acc[:, :width], acc[:, width:]
  return (jax.nn.silu(gate) * up).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("layout", "excluded", "interpret", "block_n",
                                             "block_k", "num_warps", "num_stages"))
def _fused_head(x, w, *, layout: str, excluded: int, interpret: bool, block_n: int,
                block_k: int | None, num_warps: int | None, num_stages: int):
  rows, k = x.shape
  vocab = w.shape[1] if layout == "ev" else w.shape[0]
  t = head_tuning(rows, k, vocab, w.dtype.itemsize, block_n=block_n, block_k=block_k,
                  num_warps=num_warps, num_stages=num_stages)
  kernel = functools.partial(
      _head_kernel, rows=rows, k=k, vocab=vocab, excluded=excluded, transposed=layout == "ve",
      block_m=t["block_m"], block_k=t["block_k"], block_n=t["block_n"])
  tiles = t["n_tiles"]
  out_shape = [jax.ShapeDtypeStruct((tiles, rows), dtype)
               for dtype in (jnp.float32, jnp.int32, jnp.float32)]
  top, first, total = _launch(kernel, "greedy_head", [x, w], out_shape, (tiles,), t,
                              interpret)
  best = jnp.max(top, axis=0)
  tile = jnp.argmax(top, axis=0)  # the first tile holding the max: the lowest column
  token = jnp.take_along_axis(first, tile[None], axis=0)[0]
  return token, 1.0 / jnp.sum(total * jnp.exp(top - best[None]), axis=0)


def _check_dtype(name: str, array) -> None:
  if array.dtype not in _DTYPES:
    raise ValueError(f"{name} must be bfloat16 or float32, got {array.dtype}")


def _check_x(x, entry_point: str) -> None:
  if x.ndim != 2:
    raise ValueError(f"{entry_point}: x must have rank 2 [rows, features], got shape {x.shape}")
  _check_dtype("x", x)


def _check_weight(w, features: int, entry_point: str, name: str = "w") -> None:
  if w.ndim != 2 or w.shape[0] != features:
    raise ValueError(f"{entry_point}: {name} must have shape [{features}, outputs] (x has "
                     f"{features} features), got {w.shape}")
  _check_dtype(name, w)


def _check_norm_weight(norm_weight, features: int, entry_point: str) -> None:
  if norm_weight.shape != (features,):
    raise ValueError(f"{entry_point}: norm_weight must have shape ({features},), got "
                     f"{norm_weight.shape}")


def _kernel_impl(impl: str, tuning: dict, allowed: dict, entry_point: str, rows: int,
                 k: int, n: int) -> str | None:
  """The resolved impl if it runs the Triton kernel (checking the kernel's limits), else
  None (the caller runs the reference)."""
  impl = resolve_impl(impl)
  tu.check_tuning(tuning, allowed, entry_point)
  if impl not in ("pallas", "interpret"):
    return None
  if not 1 <= rows <= MAX_KERNEL_ROWS:
    raise ValueError(f"{entry_point}: x has {rows} rows; the kernel takes 1..{MAX_KERNEL_ROWS} "
                     "(split the rows, or use impl='reference')")
  if k < 16 or n < 16:
    raise ValueError(f"{entry_point}: x @ w is [{rows}, {k}] @ [{k}, {n}]; the kernel needs "
                     "features and outputs >= 16 (use impl='reference')")
  return impl


def norm_matmul(x, norm_weight, w, bias=None, *, eps: float, impl: str = "auto", **tuning):
  """(rmsnorm(x) * norm_weight) @ w (+ bias): a decoder layer's input norm and projection(s).

  Args:
    x: [rows, features] bfloat16 or float32 (rows = batch x block tokens, 1..256 for the kernel).
    norm_weight: [features], the RMSNorm scale.
    w: [features, outputs] bfloat16 or float32, or a tuple of such weights (e.g. q, k, v) read
      by one launch; with several, every output width must be a multiple of 16.
    bias: optional [outputs], or a tuple matching ``w`` (all weights with a bias, or none).
    eps: the RMSNorm epsilon: rmsnorm(x) = x / sqrt(mean(x^2) + eps), per row, in float32.
    impl: a setting or resolved value of `pallas_kernels.dispatch`: "pallas" / "interpret" run
      the Triton kernel (compiled / interpreted), "auto" the kernel on a GPU; every other value
      runs `norm_matmul_reference`.
    **tuning: block_n (outputs per program, default 64), block_k (features per tile, default
      128 up to 64 rows, else 64), split_k (K splits, default `default_split_k`), finish (who
      sums several splits: "xla", one fusion after the kernel, the default; or "kernel", the
      last program of each N tile, counted in with an atomic add: one launch), num_warps
      (default 8 from 128 x 64 accumulator elements, else 4), num_stages (default 3).

  Returns:
    [rows, outputs] in x.dtype (a tuple of them for a tuple ``w``); float32 accumulation. The
    kernel rounds x * norm_weight to w.dtype before the tensor-core product (the model rounds
    the normalised activations).
  """
  grouped = isinstance(w, (tuple, list))
  ws = tuple(w) if grouped else (w,)
  biases = None if bias is None else (tuple(bias) if grouped else (bias,))
  _check_x(x, "norm_matmul")
  _check_norm_weight(norm_weight, x.shape[1], "norm_matmul")
  if not ws:
    raise ValueError("norm_matmul: w is an empty tuple")
  for i, wi in enumerate(ws):
    _check_weight(wi, x.shape[1], "norm_matmul", f"w[{i}]" if grouped else "w")
  if len({wi.dtype for wi in ws}) > 1:
    raise ValueError(f"norm_matmul: the weights must share one dtype, got "
                     f"{[str(wi.dtype) for wi in ws]}")
  if biases is not None:
    if len(biases) != len(ws):
      raise ValueError(f"norm_matmul: {len(biases)} biases for {len(ws)} weights")
    for i, (bi, wi) in enumerate(zip(biases, ws)):
      if bi.shape != (wi.shape[1],):
        name = f"bias[{i}]" if grouped else "bias"
        raise ValueError(f"norm_matmul: {name} must have shape ({wi.shape[1]},), got "
                         f"{bi.shape}")
  n = sum(wi.shape[1] for wi in ws)
  kernel_impl = _kernel_impl(impl, tuning, _TUNING, "norm_matmul", x.shape[0], x.shape[1], n)
  if kernel_impl is None:
    outs = tuple(norm_matmul_reference(x, norm_weight, wi, None if biases is None else bi,
                                       eps=float(eps))
                 for wi, bi in zip(ws, biases or (None,) * len(ws)))
  else:
    if grouped and len(ws) > 1 and any(wi.shape[1] % 16 for wi in ws):
      raise ValueError(f"norm_matmul: grouped weights need output widths that are multiples "
                       f"of 16, got {[wi.shape[1] for wi in ws]}")
    outs = _fused_gemm(x, norm_weight, ws, biases or (), normalize=True,
                       epilogue=None if biases is None else "bias", eps=float(eps),
                       out_dtype=x.dtype, interpret=kernel_impl == "interpret",
                       **{**_TUNING, **tuning})
  return outs if grouped else outs[0]


def norm_qkv_rope(x, norm_weight, w, bias=None, *, rope_cos, rope_sin, head_norms=None,
                  eps: float, impl: str = "auto", **tuning):
  """A decoder layer's attention inputs: q, k, v = (rmsnorm(x) * norm_weight) @ (w_q, w_k,
  w_v) (+ biases), then per head of q and k the RMS norm (``head_norms``, Qwen3) and RoPE
  (half rotation, HF ``rotate_half``) with the given tables.

  Args:
    x: [rows, features] bfloat16 or float32 (1..256 rows for the kernel).
    norm_weight: [features], the input RMSNorm scale.
    w: (w_q, w_k, w_v), each [features, heads * head_dim].
    bias: None or (b_q, b_k, b_v), each [heads * head_dim] (Qwen2.5).
    rope_cos, rope_sin: [rows, head_dim / 2] float32, cos / sin of each row's position times
      the inverse frequencies (`rope_tables`).
    head_norms: None or (q norm weight, k norm weight), each [head_dim] (Qwen3).
    eps: the RMSNorm epsilon (input and head norms).
    impl, **tuning: as for `norm_matmul`; each program holds block_n / 2 rotary pairs of one
      head (the whole head with ``head_norms``), so block_n <= head_dim.

  Returns:
    (q, k, v), each [rows, heads * head_dim] in x.dtype; q and k normed and rotated.
  """
  entry = "norm_qkv_rope"
  _check_x(x, entry)
  _check_norm_weight(norm_weight, x.shape[1], entry)
  if not isinstance(w, (tuple, list)) or len(w) != 3:
    raise ValueError(f"{entry}: w must be the tuple (w_q, w_k, w_v)")
  for name, wi in zip(("w_q", "w_k", "w_v"), w):
    _check_weight(wi, x.shape[1], entry, name)
  rows = x.shape[0]
  if rope_cos.shape != rope_sin.shape or rope_cos.ndim != 2 or rope_cos.shape[0] != rows:
    raise ValueError(f"{entry}: rope_cos and rope_sin must both have shape [{rows}, "
                     f"head_dim / 2], got {rope_cos.shape} and {rope_sin.shape}")
  head_dim = 2 * rope_cos.shape[1]
  for name, wi in zip(("w_q", "w_k", "w_v"), w):
    if wi.shape[1] % head_dim:
      raise ValueError(f"{entry}: {name} has {wi.shape[1]} outputs, not a multiple of "
                       f"head_dim={head_dim} (from rope_cos)")
  if bias is not None:
    for name, bi, wi in zip(("b_q", "b_k", "b_v"), bias, w):
      if bi.shape != (wi.shape[1],):
        raise ValueError(f"{entry}: {name} must have shape ({wi.shape[1]},), got {bi.shape}")
  if head_norms is not None:
    for name, ni in zip(("q", "k"), head_norms):
      if ni.shape != (head_dim,):
        raise ValueError(f"{entry}: the {name} head norm must have shape ({head_dim},), got "
                         f"{ni.shape}")
  kernel_impl = _kernel_impl(impl, tuning, _TUNING, entry, rows, x.shape[1],
                             sum(wi.shape[1] for wi in w))
  bias = None if bias is None else tuple(bias)
  head_norms = None if head_norms is None else tuple(head_norms)
  cos, sin = rope_cos.astype(jnp.float32), rope_sin.astype(jnp.float32)
  if kernel_impl is None:
    return norm_qkv_rope_reference(x, norm_weight, tuple(w), bias, head_norms, cos, sin,
                                   eps=float(eps))
  if not rope_kernel_supports(head_dim):
    raise ValueError(f"{entry}: the kernel needs a power-of-two head_dim >= 32 (rotary pairs "
                     f"of >= 16 columns), got {head_dim} (use impl='reference')")
  return _fused_qkv_rope(x, norm_weight, tuple(w), bias, head_norms, cos, sin, eps=float(eps),
                         interpret=kernel_impl == "interpret", **{**_TUNING, **tuning})


def rope_kernel_supports(head_dim: int) -> bool:
  """Whether norm_qkv_rope's kernel takes this head size (a power of two >= 32)."""
  return head_dim >= 32 and not head_dim & (head_dim - 1)


def rope_tables(positions, theta: float, head_dim: int) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) [..., head_dim / 2] float32 of RoPE at int ``positions`` [...]: the angles
  position x theta^(-2i / head_dim), as Hugging Face's Qwen rotary embedding."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def norm_swiglu(x, norm_weight, w_gate_up, *, eps: float, impl: str = "auto", **tuning):
  """silu(h @ w_gate_up[:, 0]) * (h @ w_gate_up[:, 1]) with h = rmsnorm(x) * norm_weight: a
  decoder layer's post-attention norm, gate / up projection and SwiGLU activation.

  Args:
    x: [rows, features] bfloat16 or float32 (1..256 rows for the kernel).
    norm_weight: [features].
    w_gate_up: [features, 2, intermediate] (gate at index 0, up at 1: the model's
      ``gate_up_proj`` kernel).
    eps, impl, **tuning: as for `norm_matmul`; block_n counts intermediate columns (each
      program reads block_n gate and block_n up columns).

  Returns:
    [rows, intermediate] in x.dtype; the activation is computed in float32 from the float32
    accumulators.
  """
  _check_x(x, "norm_swiglu")
  _check_norm_weight(norm_weight, x.shape[1], "norm_swiglu")
  if w_gate_up.ndim != 3 or w_gate_up.shape[:2] != (x.shape[1], 2):
    raise ValueError(f"norm_swiglu: w_gate_up must have shape [{x.shape[1]}, 2, intermediate] "
                     f"(x has {x.shape[1]} features), got {w_gate_up.shape}")
  _check_dtype("w_gate_up", w_gate_up)
  kernel_impl = _kernel_impl(impl, tuning, _TUNING, "norm_swiglu", x.shape[0], x.shape[1],
                             w_gate_up.shape[2])
  if kernel_impl is None:
    return norm_swiglu_reference(x, norm_weight, w_gate_up, eps=float(eps))
  return _fused_swiglu(x, norm_weight, w_gate_up, eps=float(eps),
                       interpret=kernel_impl == "interpret", **{**_TUNING, **tuning})


def matmul_residual(x, w, residual, *, impl: str = "auto", **tuning):
  """residual + x @ w: o_proj / down_proj and the residual add.

  Args:
    x: [rows, features] bfloat16 or float32 (1..256 rows for the kernel).
    w: [features, outputs] bfloat16 or float32.
    residual: [rows, outputs], the output's dtype.
    impl, **tuning: as for `norm_matmul`.

  Returns:
    [rows, outputs] in residual.dtype; float32 accumulation.
  """
  _check_x(x, "matmul_residual")
  _check_weight(w, x.shape[1], "matmul_residual")
  if residual.shape != (x.shape[0], w.shape[1]):
    raise ValueError(f"matmul_residual: residual must have shape ({x.shape[0]}, {w.shape[1]}), "
                     f"got {residual.shape}")
  _check_dtype("residual", residual)
  kernel_impl = _kernel_impl(impl, tuning, _TUNING, "matmul_residual", x.shape[0], x.shape[1],
                             w.shape[1])
  if kernel_impl is None:
    return matmul_residual_reference(x, w, residual)
  return _fused_gemm(x, None, (w,), (residual,), normalize=False, epilogue="residual",
                     eps=0.0, out_dtype=residual.dtype, interpret=kernel_impl == "interpret",
                     **{**_TUNING, **tuning})[0]


def greedy_head(hidden, w, *, layout: str, excluded_token: int | None = None,
                impl: str = "auto", **tuning):
  """The LM head's greedy proposal: per row the argmax token of hidden @ w and its softmax
  probability, ``excluded_token`` (e.g. [MASK]) left out of both, without materialising the
  logits (what `mage_jax.sampling.propose_tokens` computes at temperature 0 from them).

  Args:
    hidden: [rows, hidden_size] bfloat16 or float32, the final-norm output.
    w: the head's weight: [hidden_size, vocab] with layout "ev" (an lm_head kernel) or
      [vocab, hidden_size] with layout "ve" (tied input embeddings).
    excluded_token: a column never proposed (its probability is 0), or None.
    impl: as for `norm_matmul`.
    **tuning: block_n (vocabulary columns per program, default 128), block_k, num_warps,
      num_stages.

  Returns:
    (tokens int32 [rows], confidence float32 [rows]); ties go to the lowest token id.
  """
  entry = "greedy_head"
  _check_x(hidden, entry)
  if layout not in HEAD_LAYOUTS:
    raise ValueError(f"{entry}: layout must be one of {HEAD_LAYOUTS}, got {layout!r}")
  _check_dtype("w", w)
  features = w.shape[0] if layout == "ev" else w.shape[-1]
  if w.ndim != 2 or features != hidden.shape[1]:
    want = "[hidden, vocab]" if layout == "ev" else "[vocab, hidden]"
    raise ValueError(f"{entry}: w with layout {layout!r} must have shape {want} with hidden = "
                     f"{hidden.shape[1]}, got {w.shape}")
  vocab = w.shape[1] if layout == "ev" else w.shape[0]
  excluded = -1 if excluded_token is None else int(excluded_token)
  if excluded_token is not None and not 0 <= excluded < vocab:
    raise ValueError(f"{entry}: excluded_token={excluded_token} is outside the vocabulary "
                     f"[0, {vocab})")
  kernel_impl = _kernel_impl(impl, tuning, _HEAD_TUNING, entry, hidden.shape[0],
                             hidden.shape[1], vocab)
  if kernel_impl is None:
    return greedy_head_reference(hidden, w, layout=layout, excluded_token=excluded_token)
  return _fused_head(hidden, w, layout=layout, excluded=excluded,
                     interpret=kernel_impl == "interpret", **{**_HEAD_TUNING, **tuning})


def _dot32(a, b):
  return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST)


def _rmsnorm32(x, norm_weight, eps: float):
  x32 = x.astype(jnp.float32)
  normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return normed * norm_weight.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("eps",))
def norm_matmul_reference(x, norm_weight, w, bias=None, *, eps: float):
  """Plain-JAX definition of `norm_matmul` (one weight), all in float32."""
  out = _dot32(_rmsnorm32(x, norm_weight, eps), w)
  if bias is not None:
    out = out + bias.astype(jnp.float32)
  return out.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("eps",))
def norm_qkv_rope_reference(x, norm_weight, w, bias, head_norms, rope_cos, rope_sin, *,
                            eps: float):
  """Plain-JAX definition of `norm_qkv_rope`, all in float32."""
  h = _rmsnorm32(x, norm_weight, eps)
  q, k, v = (_dot32(h, wi) for wi in w)
  return _finish_qkv(q, k, v, bias, head_norms, rope_cos.astype(jnp.float32),
                     rope_sin.astype(jnp.float32), eps=eps, out_dtype=x.dtype)


@functools.partial(jax.jit, static_argnames=("eps",))
def norm_swiglu_reference(x, norm_weight, w_gate_up, *, eps: float):
  """Plain-JAX definition of `norm_swiglu`, all in float32."""
  h = _rmsnorm32(x, norm_weight, eps)
  gate, up = _dot32(h, w_gate_up[:, 0]), _dot32(h, w_gate_up[:, 1])
  return (jax.nn.silu(gate) * up).astype(x.dtype)


@jax.jit
def matmul_residual_reference(x, w, residual):
  """Plain-JAX definition of `matmul_residual`, all in float32."""
  return (residual.astype(jnp.float32) + _dot32(x, w)).astype(residual.dtype)


@functools.partial(jax.jit, static_argnames=("layout", "excluded_token"))
def greedy_head_reference(hidden, w, *, layout: str, excluded_token: int | None = None):
  """Plain-JAX definition of `greedy_head`: float32 logits, the excluded column at -inf,
  argmax and its softmax probability."""
  logits = _dot32(hidden, w if layout == "ev" else w.T)
  if excluded_token is not None:
    logits = logits.at[:, excluded_token].set(-jnp.inf)
  tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  probs = jax.nn.softmax(logits, axis=-1)
  return tokens, jnp.take_along_axis(probs, tokens[:, None], axis=-1)[:, 0]
