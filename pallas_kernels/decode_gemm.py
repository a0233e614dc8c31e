"""Decode-shaped matmuls with their neighbours fused: RMSNorm before, bias or residual after.

A denoising step multiplies 32-256 rows (one 32-token block per sequence) by each weight, so
reading the weight once is the whole cost, and XLA's code around the GEMMs (the norm, the bias,
the residual add: one small fusion each, 2-3.5 us) is launch latency on top of it (issue 28).

* ``norm_matmul(x, norm_weight, w, bias)``: (rmsnorm(x) * norm_weight) @ w + bias, the input
  norm and the fused q/k/v (or gate/up) projection of a decoder layer in one kernel.
* ``matmul_residual(x, w, residual)``: residual + x @ w, o_proj / down_proj and the residual
  add in one kernel.

The Triton kernel (grid: N tiles x K splits): every program holds all M rows (padded to a
power of two, the padding masked) and streams its [K range, block_n] slice of w once, in
block_k tiles; x's tiles come from L2 (x is tiny, w is big). The norm needs no prologue pass:
rmsnorm(x) * g @ w = rstd * ((x * g) @ w) row by row, so the kernel multiplies x * g tile by
tile (rounded to w's dtype for the tensor cores, as the model rounds the normalised
activations), accumulates each row's sum of squares from the same tiles, and scales the rows
by rstd = rsqrt(mean(x^2) + eps) in the epilogue. With one K split the epilogue also adds the
bias (or the residual) and stores the output; with several (few N tiles would leave the
H100's 132 SMs idle) each split stores float32 partial products and sums of squares, and one
XLA fusion sums them, scales and adds.

The references compute the same definition in float32 without any intermediate rounding.
Entry points dispatch through `pallas_kernels.dispatch` ("pallas" / "interpret": the Triton
kernel, compiled or interpreted; every other setting: the reference, as there is no TPU kernel).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _triton_utils as tu
from pallas_kernels.dispatch import resolve_impl

# All rows live in one program: its float32 accumulator is [rows, block_n].
MAX_KERNEL_ROWS = 256
# Programs to aim for: one wave on a 132-SM H100.
TARGET_PROGRAMS = 132
# Fewest K tiles per split (shorter splits spend their time in the pipeline's ramp).
MIN_SPLIT_TILES = 2
# Tuning keywords and their defaults (None: chosen from the shapes; see `kernel_tuning`).
_TUNING = dict(block_n=64, block_k=None, split_k=None, num_warps=None, num_stages=3)
_DTYPES = (jnp.bfloat16, jnp.float32)


def default_split_k(n_tiles: int, k_tiles: int, rows: int, k: int, weight_bytes: int) -> int:
  """K splits so that n_tiles x splits is about one wave of TARGET_PROGRAMS, each split at
  least MIN_SPLIT_TILES tiles long, and the float32 partials written and read back
  (splits x rows x N x 8 bytes) at most half of w's bytes (K x N x weight_bytes): a heuristic
  until the GPU sweep (benchmarks/decode_gemm.py) measures the choice."""
  wanted = max(1, round(TARGET_PROGRAMS / n_tiles))
  longest = max(1, k_tiles // MIN_SPLIT_TILES)
  cheap = max(1, (k * weight_bytes) // (16 * rows))
  return max(1, min(wanted, longest, cheap))


def kernel_tuning(rows: int, k: int, n: int, weight_bytes: int, **tuning) -> dict:
  """The launch parameters for x [rows, k] @ w [k, n]: ``tuning`` over the defaults, with the
  tiles fitted to the array (powers of two >= 16, no larger than the dimension they tile)."""
  t = {**_TUNING, **tuning}
  block_m = tu.next_power_of_two(rows)
  # Shared memory of a pipeline stage: an x tile [block_m, block_k] and a w tile; 128 columns
  # of 256 rows in 3 stages would exceed the H100's 227 KB.
  block_k = t["block_k"] or (128 if block_m <= 64 else 64)
  for name, value in (("block_n", t["block_n"]), ("block_k", block_k)):
    if value < 16 or value & (value - 1):
      raise ValueError(f"{name}={value} must be a power of two >= 16")
  for name in ("split_k", "num_warps"):
    if t[name] is not None and t[name] < 1:
      raise ValueError(f"{name}={t[name]} must be >= 1 (or None: chosen from the shapes)")
  block_k = tu.fit_block_k(block_k, k)
  block_n = tu.fit_block_k(t["block_n"], n)
  n_tiles, k_tiles = pl.cdiv(n, block_n), pl.cdiv(k, block_k)
  split_k = t["split_k"] or default_split_k(n_tiles, k_tiles, rows, k, weight_bytes)
  split_k = min(split_k, k_tiles)
  # Tiles per split, then the splits that get any tile at all.
  split_tiles = pl.cdiv(k_tiles, split_k)
  split_k = pl.cdiv(k_tiles, split_tiles)
  num_warps = t["num_warps"] or (8 if block_m * block_n >= 128 * 64 else 4)
  return dict(block_m=block_m, block_k=block_k, block_n=block_n, split_k=split_k,
              split_tiles=split_tiles, n_tiles=n_tiles, num_warps=num_warps,
              num_stages=t["num_stages"])


def _masked(ref_view, mask):
  """A tile of ``ref_view``; with ``mask``, masked-out elements read 0."""
  if mask is None:
    return ref_view[...]
  return plt.load(ref_view, mask=mask, other=0)


def _both(a, b):
  if a is None:
    return b
  return a if b is None else a & b


def _gemm_kernel(*refs, rows: int, k: int, n: int, block_m: int, block_k: int, block_n: int,
                 split_k: int, split_tiles: int, normalize: bool, epilogue: str | None,
                 eps: float):
  """One (N tile, K split) program: acc = (x [* g]) @ w over its K range, rows' sums of squares
  if ``normalize``; then the epilogue (one split) or the float32 partials (several).

  refs: x, [norm weight], w, [bias or residual], then outputs: out, or with several splits
  partial acc [split_k, rows, n] and, if normalize, partial sums of squares [split_k, rows]."""
  refs = list(refs)
  x_ref = refs.pop(0)
  g_ref = refs.pop(0) if normalize else None
  w_ref = refs.pop(0)
  extra_ref = refs.pop(0) if epilogue and split_k == 1 else None
  out_ref = refs.pop(0)
  ssq_ref = refs.pop(0) if normalize and split_k > 1 else None

  n_tile, split = pl.program_id(0), pl.program_id(1)
  n0 = n_tile * block_n
  cols = n0 + jnp.arange(block_n)
  # Static: which masks the shapes need at all (none for a 32-row block over 128-wide tiles).
  row_mask = (jnp.arange(block_m) < rows)[:, None] if rows < block_m else None
  col_mask = (cols < n)[None, :] if n % block_n else None
  # All rows from a traced 0: a slice past the array's rows is then bounded by the row mask
  # (a static one would be rejected when tracing).
  first_row = n_tile * 0
  k_start = split * (split_tiles * block_k)
  k_len = jnp.minimum(k - k_start, split_tiles * block_k)

  def tile(i, carry, k_valid):
    acc, ssq = carry
    k0 = k_start + i * block_k
    k_cols = None if k_valid is None else k_valid[None, :]
    k_rows = None if k_valid is None else k_valid[:, None]
    x = _masked(x_ref.at[pl.ds(first_row, block_m), pl.ds(k0, block_k)],
                _both(row_mask, k_cols)).astype(jnp.float32)
    w = _masked(w_ref.at[pl.ds(k0, block_k), pl.ds(n0, block_n)], _both(k_rows, col_mask))
    if normalize:
      ssq = ssq + jnp.sum(x * x, axis=1)
      g = _masked(g_ref.at[pl.ds(k0, block_k)], k_valid).astype(jnp.float32)
      x = x * g[None, :]
    acc = acc + jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return acc, ssq

  full_tiles = k_len // block_k

  def full_tile(i, carry):
    return tile(i, carry, None)

  def last_tile(i, carry):
    return tile(i, carry, i * block_k + jnp.arange(block_k) < k_len)

  carry = (jnp.zeros((block_m, block_n), jnp.float32), jnp.zeros((block_m,), jnp.float32))
  carry = lax.fori_loop(0, full_tiles, full_tile, carry)
  acc, ssq = lax.fori_loop(full_tiles, pl.cdiv(k_len, block_k), last_tile, carry)

  out_mask = _both(row_mask, col_mask)
  out_rows, out_cols = pl.ds(first_row, block_m), pl.ds(n0, block_n)
  if split_k > 1:
    plt.store(out_ref.at[split, out_rows, out_cols], acc, mask=out_mask)
    if normalize:
      @pl.when(n_tile == 0)
      def _():
        plt.store(ssq_ref.at[split, out_rows], ssq,
              mask=None if row_mask is None else row_mask[:, 0])
    return
  if normalize:
    acc = acc * lax.rsqrt(ssq / k + eps)[:, None]
  if epilogue == "bias":
    acc = acc + _masked(extra_ref.at[pl.ds(n0, block_n)],
                        None if col_mask is None else col_mask[0]).astype(jnp.float32)[None, :]
  elif epilogue == "residual":
    acc = acc + _masked(extra_ref.at[out_rows, out_cols], out_mask).astype(jnp.float32)
  plt.store(out_ref.at[out_rows, out_cols], acc.astype(out_ref.dtype), mask=out_mask)


@functools.partial(jax.jit, static_argnames=("normalize", "epilogue", "eps", "out_dtype",
                                             "interpret", "block_n", "block_k", "split_k",
                                             "num_warps", "num_stages"))
def _fused_gemm(x, g, w, extra, *, normalize: bool, epilogue: str | None, eps: float,
                out_dtype, interpret: bool, block_n: int, block_k: int | None,
                split_k: int | None, num_warps: int | None, num_stages: int):
  """The kernel launch and, with several K splits, the XLA fusion that finishes it."""
  rows, k = x.shape
  n = w.shape[1]
  t = kernel_tuning(rows, k, n, w.dtype.itemsize, block_n=block_n, block_k=block_k,
                    split_k=split_k, num_warps=num_warps, num_stages=num_stages)
  split = t["split_k"]
  kernel = functools.partial(
      _gemm_kernel, rows=rows, k=k, n=n, block_m=t["block_m"], block_k=t["block_k"],
      block_n=t["block_n"], split_k=split, split_tiles=t["split_tiles"], normalize=normalize,
      epilogue=epilogue, eps=eps)
  inputs = [x] + ([g] if normalize else []) + [w]
  if epilogue and split == 1:
    inputs.append(extra)
  if split == 1:
    out_shape = [jax.ShapeDtypeStruct((rows, n), out_dtype)]
  else:
    out_shape = [jax.ShapeDtypeStruct((split, rows, n), jnp.float32)]
    if normalize:
      out_shape.append(jax.ShapeDtypeStruct((split, rows), jnp.float32))
  whole = lambda a: pl.BlockSpec(a.shape, lambda i, j, nd=a.ndim: (0,) * nd)
  outs = pl.pallas_call(
      kernel,
      grid=(t["n_tiles"], split),
      in_specs=[whole(a) for a in inputs],
      out_specs=[whole(s) for s in out_shape],
      out_shape=out_shape,
      compiler_params=tu.compiler_params(t["num_warps"], t["num_stages"]),
      interpret=interpret,
      name="norm_matmul" if normalize else "matmul_residual",
  )(*inputs)
  if split == 1:
    return outs[0]
  acc = jnp.sum(outs[0], axis=0)
  if normalize:
    acc = acc * lax.rsqrt(jnp.sum(outs[1], axis=0) / k + eps)[:, None]
  if epilogue == "bias":
    acc = acc + extra.astype(jnp.float32)[None, :]
  elif epilogue == "residual":
    acc = acc + extra.astype(jnp.float32)
  return acc.astype(out_dtype)


def _check_dtype(name: str, array) -> None:
  if array.dtype not in _DTYPES:
    raise ValueError(f"{name} must be bfloat16 or float32, got {array.dtype}")


def _check_gemm(x, w, entry_point: str) -> tuple[int, int, int]:
  """(rows, k, n) of x [rows, k] @ w [k, n]; ValueError naming the tensor that does not fit."""
  if x.ndim != 2:
    raise ValueError(f"{entry_point}: x must have rank 2 [rows, features], got shape {x.shape}")
  if w.ndim != 2 or w.shape[0] != x.shape[1]:
    raise ValueError(f"{entry_point}: w must have shape [{x.shape[1]}, outputs] (x has "
                     f"{x.shape[1]} features), got {w.shape}")
  _check_dtype("x", x)
  _check_dtype("w", w)
  return x.shape[0], x.shape[1], w.shape[1]


def _run(entry_point: str, x, g, w, extra, *, normalize: bool, epilogue: str | None,
         eps: float, out_dtype, impl: str, tuning: dict, reference):
  impl = resolve_impl(impl)
  tu.check_tuning(tuning, _TUNING, entry_point)
  if impl not in ("pallas", "interpret"):
    return reference()
  rows, k, n = x.shape[0], x.shape[1], w.shape[1]
  if not 1 <= rows <= MAX_KERNEL_ROWS:
    raise ValueError(f"{entry_point}: x has {rows} rows; the kernel takes 1..{MAX_KERNEL_ROWS} "
                     "(split the rows, or use impl='reference')")
  if k < 16 or n < 16:
    raise ValueError(f"{entry_point}: x @ w is [{rows}, {k}] @ [{k}, {n}]; the kernel needs "
                     "features and outputs >= 16 (use impl='reference')")
  return _fused_gemm(x, g, w, extra, normalize=normalize, epilogue=epilogue, eps=float(eps),
                     out_dtype=jnp.dtype(out_dtype), interpret=impl == "interpret",
                     **{**_TUNING, **tuning})


def norm_matmul(x, norm_weight, w, bias=None, *, eps: float, impl: str = "auto", **tuning):
  """(rmsnorm(x) * norm_weight) @ w (+ bias): a decoder layer's input norm and projection.

  Args:
    x: [rows, features] bfloat16 or float32 (rows = batch x block tokens, 1..256 for the kernel).
    norm_weight: [features], the RMSNorm scale.
    w: [features, outputs] bfloat16 or float32 (e.g. q/k/v or gate/up concatenated).
    bias: optional [outputs].
    eps: the RMSNorm epsilon: rmsnorm(x) = x / sqrt(mean(x^2) + eps), per row, in float32.
    impl: a setting or resolved value of `pallas_kernels.dispatch`: "pallas" / "interpret" run
      the Triton kernel (compiled / interpreted), "auto" the kernel on a GPU; every other value
      runs `norm_matmul_reference`.
    **tuning: block_n (outputs per program, default 64), block_k (features per tile, default
      128 up to 64 rows, else 64), split_k (K splits, default `default_split_k`), num_warps
      (default 8 from 128 x 64 accumulator elements, else 4), num_stages (default 3).

  Returns:
    [rows, outputs] in x.dtype; float32 accumulation. The kernel rounds x * norm_weight to
    w.dtype before the tensor-core product (the model rounds the normalised activations).
  """
  _check_gemm(x, w, "norm_matmul")
  if norm_weight.shape != (x.shape[1],):
    raise ValueError(f"norm_matmul: norm_weight must have shape ({x.shape[1]},), got "
                     f"{norm_weight.shape}")
  if bias is not None and bias.shape != (w.shape[1],):
    raise ValueError(f"norm_matmul: bias must have shape ({w.shape[1]},), got {bias.shape}")
  return _run("norm_matmul", x, norm_weight, w, bias, normalize=True,
              epilogue=None if bias is None else "bias", eps=eps, out_dtype=x.dtype, impl=impl,
              tuning=tuning,
              reference=lambda: norm_matmul_reference(x, norm_weight, w, bias, eps=float(eps)))


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
  _check_gemm(x, w, "matmul_residual")
  if residual.shape != (x.shape[0], w.shape[1]):
    raise ValueError(f"matmul_residual: residual must have shape ({x.shape[0]}, {w.shape[1]}), "
                     f"got {residual.shape}")
  _check_dtype("residual", residual)
  return _run("matmul_residual", x, None, w, residual, normalize=False, epilogue="residual",
              eps=0.0, out_dtype=residual.dtype, impl=impl, tuning=tuning,
              reference=lambda: matmul_residual_reference(x, w, residual))


def _dot32(a, b):
  return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("eps",))
def norm_matmul_reference(x, norm_weight, w, bias=None, *, eps: float):
  """Plain-JAX definition of `norm_matmul`, all in float32."""
  x32 = x.astype(jnp.float32)
  normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  out = _dot32(normed * norm_weight.astype(jnp.float32), w)
  if bias is not None:
    out = out + bias.astype(jnp.float32)
  return out.astype(x.dtype)


@jax.jit
def matmul_residual_reference(x, w, residual):
  """Plain-JAX definition of `matmul_residual`, all in float32."""
  return (residual.astype(jnp.float32) + _dot32(x, w)).astype(residual.dtype)
