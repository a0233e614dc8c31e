"""Merging the partial results of a split-KV (flash-decoding) attention call in one kernel.

Each split of a split-KV call writes, per query row, a normalised partial output o_s and its
base-2 log-sum-exp l_s. The merged row is sum_s 2^(l_s - m) o_s / sum_s 2^(l_s - m), m = max_s l_s.
As XLA ops that is a max over the splits, then a weighted sum, then a division: three kernels
per attention call, which at batch 1 took 8.4 us of a 30.5 us exact call (1.5B shape, 32K cache;
WORKSPACE_NOTES.md). Here one program per (sequence, query row) loads the row's partials of up
to MAX_CHUNK splits at a time as one [splits, D] tile and merges them online (running max and
sum, as flash attention merges key tiles), so the whole merge is one launch over as many
programs as query rows.

`merge_splits_reference` (the XLA merge, `_triton_utils.combine_partials`) is the definition.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _triton_utils as tu

# Splits merged per loop iteration: a [64, D] tile of partials (64 x 128 float32 in registers
# over 4 warps) keeps every program to one or a few loads while its registers stay bounded.
MAX_CHUNK = 64


def _add_exp2(total, maximum, values):
  """Adds sum(2^values) to an online (sum of 2^(x - max), max) pair. Returns the new pair, the
  factor that rescaled the old sum, and the values' own terms 2^(values - new max). While
  everything seen is -inf the max stays -inf and 2^(-inf - 0) = 0 keeps the sum 0."""
  new_max = jnp.maximum(maximum, jnp.max(values))
  finite_max = jnp.where(new_max > -jnp.inf, new_max, 0.0)
  rescale = jnp.exp2(maximum - finite_max)
  terms = jnp.exp2(values - finite_max)
  return total * rescale + jnp.sum(terms), new_max, rescale, terms


def _merge_kernel(lse_ref, partial_ref, out_ref, *lse_out_ref, num_splits: int, chunk: int,
                  lse_splits: int | None):
  """One (sequence, query row) program: lse_ref [splits], partial_ref [splits, D] -> [D], and
  with ``lse_splits`` also the row's log-sum-exp over the first ``lse_splits`` splits."""
  head_dim = partial_ref.shape[1]
  # The log-sum-exp of fewer splits than the merge needs a sum of its own, with its own maximum
  # so that it stays exact however much larger the excluded splits' mass is.
  leading_only = lse_splits is not None and lse_splits != num_splits

  def merge_chunk(i: int, carry):
    acc, total, running_max, lead_total, lead_max = carry
    # Every tile lies inside the splits: the last one starts early and masks the splits the
    # previous tile already merged.
    start = min(i * chunk, num_splits - chunk)
    splits = pl.ds(start, chunk)
    valid = start + jnp.arange(chunk) >= i * chunk
    lse = plt.load(lse_ref.at[splits], mask=valid, other=-jnp.inf)
    partial = plt.load(partial_ref.at[splits, :], mask=valid[:, None], other=0.0)
    total, running_max, rescale, weights = _add_exp2(total, running_max, lse)
    acc = acc * rescale + jnp.sum(weights[:, None] * partial.astype(jnp.float32), axis=0)
    if leading_only:
      lead = jnp.where(start + jnp.arange(chunk) < lse_splits, lse, -jnp.inf)
      lead_total, lead_max, _, _ = _add_exp2(lead_total, lead_max, lead)
    return acc, total, running_max, lead_total, lead_max

  zero, minus_inf = jnp.float32(0.0), jnp.float32(-jnp.inf)
  carry = (jnp.zeros((head_dim,), jnp.float32), zero, minus_inf, zero, minus_inf)
  # Unrolled (the chunk count is static): no chunk's loads wait for the previous chunk's
  # arithmetic, so the program pays one memory latency, not one per chunk.
  for i in range(pl.cdiv(num_splits, chunk)):
    carry = merge_chunk(i, carry)
  acc, total, running_max, lead_total, lead_max = carry
  out_ref[...] = (acc / jnp.where(total > 0, total, 1.0)).astype(out_ref.dtype)
  if lse_splits is not None:
    lse = (tu.log_sum_exp2(lead_max, lead_total) if leading_only
           else tu.log_sum_exp2(running_max, total))
    lse_out_ref[0][...] = lse[None]  # a [1] block: one value per program


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "num_warps",
                                             "lse_splits"))
def merge_splits(partial_out: jax.Array, partial_lse: jax.Array, *, out_dtype=None,
                 interpret: bool = False, num_warps: int = 4, lse_splits: int | None = None):
  """Merges split-KV partials in one Pallas kernel.

  Args:
    partial_out: [batch, splits, rows, D], each split's normalised output (any float dtype).
    partial_lse: float32 [batch, splits, rows], each split's base-2 log-sum-exp (-inf where the
      split saw no key).
    out_dtype: dtype of the result (default partial_out's).
    interpret: run the Pallas interpreter (CPU tests).
    num_warps: warps per program.
    lse_splits: if given (1..splits), also return each row's base-2 log-sum-exp over the first
      ``lse_splits`` splits (all of them: the merged row's normaliser), computed in the same
      programs, so that a caller needing it (the mask step's alpha pass) launches nothing more.

  Returns:
    [batch, rows, D]: the merged output, 0 for rows that no split saw a key for; with
    ``lse_splits`` the pair (output, float32 [batch, rows] log-sum-exp, -inf where those splits
    saw no key).
  """
  batch, num_splits, rows, head_dim = partial_out.shape
  if partial_lse.shape != (batch, num_splits, rows):
    raise ValueError(f"partial_lse must have shape {(batch, num_splits, rows)} to match "
                     f"partial_out {partial_out.shape}, got {partial_lse.shape}")
  _check_lse_splits(lse_splits, num_splits)
  chunk = min(1 << (num_splits.bit_length() - 1), MAX_CHUNK)  # a power of two <= num_splits
  kernel = functools.partial(_merge_kernel, num_splits=num_splits, chunk=chunk,
                             lse_splits=lse_splits)
  out_specs = [pl.BlockSpec((None, None, head_dim), lambda b, r: (b, r, 0))]
  out_shape = [jax.ShapeDtypeStruct((batch, rows, head_dim), out_dtype or partial_out.dtype)]
  if lse_splits is not None:
    out_specs.append(pl.BlockSpec((None, None, 1), lambda b, r: (b, r, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, rows, 1), jnp.float32))
  results = pl.pallas_call(
      kernel,
      grid=(batch, rows),
      in_specs=[
          pl.BlockSpec((None, num_splits, None), lambda b, r: (b, 0, r)),
          pl.BlockSpec((None, num_splits, None, head_dim), lambda b, r: (b, 0, r, 0)),
      ],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=tu.compiler_params(num_warps, 1),
      interpret=interpret,
      name="merge_splits",
  )(partial_lse.astype(jnp.float32), partial_out)
  if lse_splits is None:
    return results[0]
  return results[0], results[1][..., 0]


def _check_lse_splits(lse_splits: int | None, num_splits: int) -> None:
  if lse_splits is not None and not 1 <= lse_splits <= num_splits:
    raise ValueError(f"lse_splits must be in [1, {num_splits}] (the partials' splits), got "
                     f"{lse_splits}")


def merge_splits_reference(partial_out: jax.Array, partial_lse: jax.Array, *,
                           out_dtype=None, lse_splits: int | None = None):
  """The XLA merge (max, weighted sum, division), in float32, cast to ``out_dtype``; with
  ``lse_splits`` also the log-sum-exp over the first ``lse_splits`` splits."""
  _check_lse_splits(lse_splits, partial_out.shape[1])
  merged = tu.combine_partials(partial_out, partial_lse).astype(out_dtype or partial_out.dtype)
  if lse_splits is None:
    return merged
  return merged, tu.combine_lse(partial_lse[:, :lse_splits])


MERGES = ("auto", "pallas", "xla")
# Up to this many query rows (batch x block x q heads) the kernel wins; beyond, each of its
# one-row programs has too little to merge and XLA's fused reduction is as fast or faster. H100,
# 1.5B shape, wall us per call (benchmarks/results/decode_kernels.md, session 6): 384 rows (batch
# 1) exact 37.0 vs 45.9 (44 splits), sparse 17.4 vs 19.5 (8 splits); 3072 rows (batch 8) exact
# 197 vs 195 (16 splits), sparse 32.6 vs 29.7 (5 splits).
PALLAS_MAX_ROWS = 1024


def merge(partial_out: jax.Array, partial_lse: jax.Array, *, how: str, interpret: bool,
          out_dtype, lse_splits: int | None = None):
  """The split-KV kernels' merge: ``how`` "pallas" (this module's kernel), "xla" (the three-op
  merge) or "auto" (the kernel for at most PALLAS_MAX_ROWS query rows, else XLA). Returns the
  merged output, and with ``lse_splits`` (out, lse) as `merge_splits` does."""
  if how not in MERGES:
    raise ValueError(f"merge must be one of {MERGES}, got {how!r}")
  if how == "auto":
    batch, _, rows, _ = partial_out.shape
    how = "pallas" if batch * rows <= PALLAS_MAX_ROWS else "xla"
  if how == "xla":
    return merge_splits_reference(partial_out, partial_lse, out_dtype=out_dtype,
                                  lse_splits=lse_splits)
  return merge_splits(partial_out, partial_lse, out_dtype=out_dtype, interpret=interpret,
                      lse_splits=lse_splits)
