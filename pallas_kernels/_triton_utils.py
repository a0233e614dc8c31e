"""Pieces shared by the split-KV attention kernels of this package.

The decode kernels all attend one block of B query tokens over a set of cache rows plus the
block's own keys. They share one layout trick and one reduction:

* Query tiles gathered in the kernel: the G query heads that share a KV head and the B block
  tokens form one query tile (row r = t*G + g), padded to a power of two as Triton requires. The
  kernels read these rows straight out of q's own [B*Hq, D] layout with an index vector (and the
  block's keys out of [B*kv_heads, D]), and store results back the same way, so no XLA
  transpose or pad runs around them. Padding rows repeat the last real query: their loads need
  no mask, and their stores write the very bits the real row writes.
* Split-KV (flash-decoding): programs along a grid axis each cover a part of the rows, write a
  normalised partial output and its base-2 log-sum-exp in the final [B*Hq] row order, and
  `merge_splits` merges them in one kernel (`combine_partials` is the XLA definition). In the
  dense kernels the last split holds the block's own keys alone, so that statistics over the
  cache alone stay available (mask step with ``alpha_includes_block=False``).

Scores are kept in base 2 (``qk_scale = sm_scale * log2(e)``, ``exp2``), which saves a multiply
per score inside the kernels.
"""

import functools
import math
from typing import Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

LOG2_E = math.log2(math.e)
# Finite start for the running maximum: a row whose scores are all masked then keeps l = 0 and
# never computes inf - inf.
_RUNNING_MAX_START = -1e30
# Programs to aim for when choosing the number of splits on a 132-SM H100: one wave of 64-row
# query tiles (4 warps, two programs per SM).
TARGET_PROGRAMS = 264
# One wave of 8-warp programs over 256 query rows, of which one fits an SM: for short splits
# (few sequences x KV heads; see decode_attention.default_attention_splits).
TARGET_PROGRAMS_FULL_TILE = 132
# Fewest key tiles per split: each split writes a [rows, D] partial, as many bytes as rows/2 keys
# and values, so short splits would move more partial bytes than cache bytes.
MIN_SPLIT_TILES = 4


def next_power_of_two(n: int, minimum: int = 16) -> int:
  """Smallest power of two >= max(n, minimum); Triton tiles need power-of-two extents."""
  return max(minimum, 1 << max(0, (n - 1).bit_length()))


def fit_block_k(block_k: int, rows: int) -> int:
  """Tile size no larger than the rows it tiles (so every tile's full-size access is in
  bounds), kept a power of two >= 16; callers pad arrays of fewer than 16 rows."""
  largest_fitting = 1 << max(4, rows.bit_length() - 1)
  return min(next_power_of_two(block_k), largest_fitting)


def pad_rows(x: jax.Array, axis: int, minimum: int = 16) -> jax.Array:
  """Zero-pads ``axis`` up to ``minimum`` (only tiny arrays are ever this short)."""
  if x.shape[axis] >= minimum:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, minimum - x.shape[axis])
  return jnp.pad(x, widths)


def default_num_splits(programs_per_split: int, rows: int, block_k: int,
                       target: int = TARGET_PROGRAMS) -> int:
  """Splits so that the grid (one more program per ``programs_per_split`` for the block's own
  keys) has about ``target`` programs, with at least MIN_SPLIT_TILES tiles per split."""
  wanted = max(1, target // max(programs_per_split, 1) - 1)
  return max(1, min(wanted, rows // (MIN_SPLIT_TILES * block_k)))


def check_block_attention_inputs(q, k_rows, v_rows, k_block, v_block, rows_name: str):
  """Validates the shapes shared by the block-attention entry points: q [batch, block, q_heads,
  head_dim], k_rows and v_rows [batch, kv_heads, rows, head_dim] (the cache; ``rows_name`` names
  k_rows in messages), k_block and v_block [batch, block, kv_heads, head_dim].

  Returns (batch, block, q_heads, kv_heads, head_dim); raises ValueError naming the tensor whose
  rank or shape does not fit."""
  for name, array in (("q", q), (rows_name, k_rows), ("v_cache", v_rows),
                      ("k_block", k_block), ("v_block", v_block)):
    if array.ndim != 4:
      raise ValueError(f"{name} must have rank 4, got shape {array.shape}")
  batch, block, q_heads, head_dim = q.shape
  _, kv_heads, _, _ = k_rows.shape
  if v_rows.shape != k_rows.shape:
    raise ValueError(f"v_cache shape {v_rows.shape} differs from {rows_name} {k_rows.shape}")
  if k_rows.shape[0] != batch or k_rows.shape[3] != head_dim:
    raise ValueError(f"{rows_name} shape {k_rows.shape} does not match q {q.shape} "
                     "in batch or head_dim")
  if kv_heads < 1 or q_heads % kv_heads:
    raise ValueError(f"q_heads={q_heads} (q) must be a multiple of kv_heads={kv_heads} "
                     f"({rows_name})")
  expected_block = (batch, block, kv_heads, head_dim)
  for name, array in (("k_block", k_block), ("v_block", v_block)):
    if array.shape != expected_block:
      raise ValueError(f"{name} must have shape {expected_block}, got {array.shape}")
  return batch, block, q_heads, kv_heads, head_dim


def check_kernel_head_dim(head_dim: int) -> None:
  """Triton dots need power-of-two operand extents of at least 16."""
  if head_dim < 16 or head_dim & (head_dim - 1):
    raise ValueError(f"head_dim={head_dim} (q) must be a power of two >= 16 for the Pallas "
                     "kernels; use impl='reference'")


def query_rows(kv_head, kv_heads: int, group: int, block: int, tile_rows: int,
               first=0) -> jax.Array:
  """Rows of q's [B*Hq, D] layout for query-tile rows first .. first+tile_rows-1.

  Tile row r is block token r // G of query head kv_head*G + r % G; rows past G*B repeat the
  last real query (see the module docstring).
  """
  r = jnp.minimum(first + jnp.arange(tile_rows), group * block - 1)
  return (r // group) * (kv_heads * group) + kv_head * group + r % group


def query_parts(rows: int) -> list[tuple[int, int]]:
  """(first, size) pieces of power-of-two sizes >= 16, largest first, covering ``rows`` rounded
  up to 16: 192 -> 128 + 64, 224 -> 128 + 64 + 32. A kernel that needs all G*B queries in one
  program multiplies by each piece instead of one tile padded to a power of two (256 for 192),
  which would spend a quarter of its matmul and exp work on repeated rows."""
  remaining = -(-rows // 16) * 16
  parts, first = [], 0
  while remaining:
    size = 1 << (remaining.bit_length() - 1)
    parts.append((first, size))
    first, remaining = first + size, remaining - size
  return parts


def real_query_mask(group: int, block: int, tile_rows: int, first=0) -> jax.Array:
  """[tile_rows] bool: which tile rows are real queries rather than repeats."""
  return first + jnp.arange(tile_rows) < group * block


def block_key_rows(kv_head, kv_heads: int, block: int, block_rows: int) -> jax.Array:
  """Rows of k_block's [B*kv_heads, D] layout for the block's keys, repeats past B."""
  return jnp.minimum(jnp.arange(block_rows), block - 1) * kv_heads + kv_head


def kernel_exp2(interpret: bool) -> Callable[[jax.Array], jax.Array]:
  """2^x of a float32 array inside a kernel: on the GPU PTX ``ex2.approx.ftz.f32``, one MUFU
  instruction per element; in interpret mode jnp.exp2.

  jnp.exp2 lowers to libdevice's __nv_exp2f: the same approximation (2 ulp), compiled without
  flush-to-zero, i.e. with extra instructions that keep results below 2^-126 subnormal. Here
  those results are 0. Nothing these kernels compute can notice: every 2^x they take is a
  probability or a rescale factor summed with a term of about 1 (the row's maximum, or the
  query's whole mass) in float32. Measured with the scale folded into the exponent
  (`attend_tile`): the attention kernel 3-8% faster on the H100 (benchmarks/results/
  decode_kernels.md, session 10)."""
  if interpret:
    return jnp.exp2

  def exp2(x: jax.Array) -> jax.Array:
    [result] = plt.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;", args=[x.astype(jnp.float32)], constraints="=f,f",
        pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return result

  return exp2


def initial_state(tile_rows: int, head_dim: int):
  """(acc, running max, running sum) of the online softmax before any key."""
  return (jnp.zeros((tile_rows, head_dim), jnp.float32),
          jnp.full((tile_rows,), _RUNNING_MAX_START, jnp.float32),
          jnp.zeros((tile_rows,), jnp.float32))


def scores_of(q: jax.Array, k: jax.Array) -> jax.Array:
  """q @ k.T in float32, contracting the head dim of both (no explicit transpose)."""
  return lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def attend_tile(state, q, k, v, valid: jax.Array | None, qk_scale: float, *, exp2):
  """One online-softmax step of the query tile over a tile of keys.

  Args:
    state: (acc [M, D] f32, running max [M] f32, running sum [M] f32), base-2 units.
    q: [M, D] queries.
    k, v: [N, D] keys and values of the tile.
    valid: [N] bool, or None when every key of the tile is valid (the hot loop skips the mask).
    qk_scale: sm_scale * log2(e).
    exp2: the kernel's 2^x (`kernel_exp2`).

  Returns:
    The updated state.
  """
  acc, running_max, running_sum = state
  raw_scores = scores_of(q, k)
  if valid is not None:
    raw_scores = jnp.where(valid[None, :], raw_scores, -jnp.inf)
  # The scale is positive, so the maximum of the raw scores, scaled, is the scaled maximum
  # (rounding is monotonic); scaling inside the exponent then costs one fused multiply-add per
  # score instead of a multiply and a subtraction.
  new_max = jnp.maximum(running_max, jnp.max(raw_scores, axis=1) * qk_scale)
  correction = exp2(running_max - new_max)
  probs = exp2(raw_scores * qk_scale - new_max[:, None])
  running_sum = running_sum * correction + jnp.sum(probs, axis=1)
  acc = acc * correction[:, None] + jnp.dot(probs.astype(v.dtype), v,
                                            preferred_element_type=jnp.float32)
  return acc, new_max, running_sum


def attend_block_keys(state, q, k_block_ref, v_block_ref, kv_head, kv_heads: int,
                      block_tokens: int, qk_scale: float, *, exp2):
  """Attends the block's own keys, gathered from the [B*kv_heads, D] layout (repeated rows
  past ``block_tokens`` are masked out)."""
  block_rows = next_power_of_two(block_tokens)
  rows = block_key_rows(kv_head, kv_heads, block_tokens, block_rows)
  valid = jnp.arange(block_rows) < block_tokens
  return attend_tile(state, q, k_block_ref[rows, :], v_block_ref[rows, :], valid, qk_scale,
                     exp2=exp2)


def attend_rows(state, q, num_rows: jax.Array, block_k: int,
                load_tile: Callable[[jax.Array, jax.Array | None], tuple[jax.Array, jax.Array]],
                qk_scale: float, *, exp2):
  """Attends ``num_rows`` keys in tiles of ``block_k``; only the last, partial tile is masked.

  ``load_tile(first, valid)`` returns the (k, v) tile whose first key is ``first`` (an offset
  relative to this program's range); masked-out rows must load as finite values.
  """
  full_tiles = num_rows // block_k

  def full_tile(i, carry):
    k, v = load_tile(i * block_k, None)
    return attend_tile(carry, q, k, v, None, qk_scale, exp2=exp2)

  def last_tile(i, carry):
    valid = i * block_k + jnp.arange(block_k) < num_rows
    k, v = load_tile(i * block_k, valid)
    return attend_tile(carry, q, k, v, valid, qk_scale, exp2=exp2)

  state = lax.fori_loop(0, full_tiles, full_tile, state)
  return lax.fori_loop(full_tiles, pl.cdiv(num_rows, block_k), last_tile, state)


def split_range(split: jax.Array, num_splits: int, total: jax.Array, block_k: int):
  """[start, end) of ``split`` when ``total`` rows are shared out in whole tiles."""
  tiles = pl.cdiv(total, block_k)
  chunk = pl.cdiv(tiles, num_splits) * block_k
  start = split * chunk
  end = jnp.minimum(start + chunk, total)
  return start, jnp.maximum(end - start, 0)


def log_sum_exp2(maximum: jax.Array, total: jax.Array) -> jax.Array:
  """maximum + log2(total): the base-2 log-sum-exp of an online (max, sum of 2^(x - max)) pair;
  -inf where the sum is 0 (nothing seen)."""
  seen = total > 0
  return jnp.where(seen, maximum + jnp.log2(jnp.where(seen, total, 1.0)), -jnp.inf)


def store_partial(state, out_ref, lse_ref, rows: jax.Array) -> None:
  """Writes the normalised partial output and its base-2 log-sum-exp (-inf if nothing seen) to
  ``rows`` of the [B*Hq] layout."""
  acc, running_max, running_sum = state
  out = acc / jnp.where(running_sum > 0, running_sum, 1.0)[:, None]
  out_ref[rows, :] = out.astype(out_ref.dtype)
  lse_ref[rows] = log_sum_exp2(running_max, running_sum)


def _split_weights(partial_lse: jax.Array):
  """exp2(lse_s - max_s lse_s) per split (axis 1), their sum, and the max (0 if all -inf)."""
  lse_max = jnp.max(partial_lse, axis=1)
  finite_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
  weights = jnp.exp2(partial_lse - finite_max[:, None])
  return weights, jnp.sum(weights, axis=1), finite_max


def combine_lse(partial_lse: jax.Array) -> jax.Array:
  """Base-2 log-sum-exp over the splits (axis 1) of [batch, splits, rows]; -inf where every
  split was empty."""
  _, total, finite_max = _split_weights(partial_lse)
  return log_sum_exp2(finite_max, total)


def combine_partials(partial_out: jax.Array, partial_lse: jax.Array) -> jax.Array:
  """Merges [batch, splits, rows, D] normalised partial outputs (axis 1) into float32
  [batch, rows, D], weighting each split by its share of the total softmax mass."""
  weights, total, _ = _split_weights(partial_lse)
  # An elementwise product and a sum, which XLA fuses into one reduction (an einsum here would
  # become a batched matmul with a contraction of only `splits`).
  out = jnp.sum(weights[..., None] * partial_out.astype(jnp.float32), axis=1)
  return out / jnp.where(total > 0, total, 1.0)[..., None]


def query_tiling(query_rows: int, block_q: int) -> tuple[int, int]:
  """(rows per query tile, tiles) for ``query_rows`` = G*B rows in tiles of at most ``block_q``
  (rounded to a power of two, no larger than the rows' own power-of-two tile)."""
  block_q = min(next_power_of_two(block_q), next_power_of_two(query_rows))
  return block_q, pl.cdiv(query_rows, block_q)


def split_kv_call(kernel, leading: Sequence[tuple[jax.Array, pl.BlockSpec]], q, k_cache, v_cache,
                  k_block, v_block, *, block_q: int, block_k: int, num_splits: int,
                  grid_splits: int, sm_scale: float, num_warps: int | None, num_stages: int,
                  interpret: bool, name: str):
  """The launch of a split-KV block kernel over the grid (query tile, batch, KV head, split).

  ``kernel`` takes the keywords kv_heads, group, block_tokens, block_q, num_splits, block_k,
  qk_scale, exp2, and as inputs the ``leading`` (array, BlockSpec) pairs (lengths, or a
  selection's counts and indices; index maps of (t, b, h, s)), q as [batch, B*Hq, D], its KV
  head's whole K and V cache rows, and the block's K and V as [batch, B*kv_heads, D]. The grid
  has ``grid_splits`` splits: ``num_splits``, plus one where the block's keys have their own.
  Returns the partial outputs [batch, grid_splits, B*Hq, D] in q.dtype and their base-2
  log-sum-exp float32 [batch, grid_splits, B*Hq], for merge_splits."""
  batch, block, q_heads, head_dim = q.shape
  kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
  group = q_heads // kv_heads
  kernel = functools.partial(kernel, kv_heads=kv_heads, group=group, block_tokens=block,
                             block_q=block_q, num_splits=num_splits, block_k=block_k,
                             qk_scale=sm_scale * LOG2_E, exp2=kernel_exp2(interpret))
  per_batch = lambda t, b, h, s: (b, 0, 0)
  per_head = lambda t, b, h, s: (b, h, 0, 0)
  arrays, specs = zip(*leading)
  return pl.pallas_call(
      kernel,
      # Query tiles first: the Triton launch runs the leading grid axes fastest, so programs
      # reading the same K/V rows for different query tiles run together and share L2.
      grid=(pl.cdiv(group * block, block_q), batch, kv_heads, grid_splits),
      in_specs=[
          *specs,
          pl.BlockSpec((None, block * q_heads, head_dim), per_batch),
          pl.BlockSpec((None, None, capacity, head_dim), per_head),
          pl.BlockSpec((None, None, capacity, head_dim), per_head),
          pl.BlockSpec((None, block * kv_heads, head_dim), per_batch),
          pl.BlockSpec((None, block * kv_heads, head_dim), per_batch),
      ],
      out_specs=[
          pl.BlockSpec((None, None, block * q_heads, head_dim), lambda t, b, h, s: (b, s, 0, 0)),
          pl.BlockSpec((None, None, block * q_heads), lambda t, b, h, s: (b, s, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, grid_splits, block * q_heads, head_dim), q.dtype),
          jax.ShapeDtypeStruct((batch, grid_splits, block * q_heads), jnp.float32),
      ],
      compiler_params=compiler_params(num_warps or (8 if block_q >= 256 else 4), num_stages),
      interpret=interpret,
      name=name,
  )(*arrays, q.reshape(batch, block * q_heads, head_dim), k_cache, v_cache,
    k_block.reshape(batch, block * kv_heads, head_dim),
    v_block.reshape(batch, block * kv_heads, head_dim))


def compiler_params(num_warps: int, num_stages: int):
  """Triton compiler parameters; always passed so every jax version picks the Triton backend."""
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def check_tuning(tuning: dict, allowed: dict, entry_point: str) -> None:
  """Rejects misspelled tuning keywords instead of silently ignoring them (``allowed``: the
  keywords and their defaults)."""
  unknown = sorted(set(tuning) - set(allowed))
  if unknown:
    raise ValueError(f"{entry_point}: unknown tuning arguments {unknown}; allowed {allowed}")
