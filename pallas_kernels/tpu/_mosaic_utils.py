"""Pieces shared by the Mosaic (TPU) decode kernels of this package.

The decode kernels attend one block of B query tokens over rows of a KV cache
[batch, kv_heads, capacity, head_dim] that stays in HBM (`pl.ANY`), plus the block's own keys.
They share:

* Query tiles built in XLA: the G query heads of a KV head and the B block tokens form one tile
  of G*B rows (row r = t*G + g), zero-padded to the dtype's sublane multiple (8 rows for 32-bit,
  16 for bf16), one tile per (sequence, KV head) "pair". q is a few hundred KB, so the transpose
  costs next to nothing and the kernel sees a dense, aligned [rows, head_dim] block.
* A double-buffered DMA loop over row tiles (`pipelined_tiles`): the copies of tile t + 1 run
  while tile t is computed, inside one grid step. A per-tile grid step would cost its fixed
  overhead per tile, and tiles past a sequence's length would still be stepped over; the
  in-kernel loop stops at the length.
* The online softmax over tiles (`attend_tile`) in base 2 (``qk_scale = sm_scale * log2(e)``),
  with the running state in VMEM scratch: acc [rows, head_dim] and max / sum [rows, 128]
  (replicated over the lanes, the layout Mosaic stores without masks).
"""

import math
from typing import Callable

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
LOG2_E = math.log2(math.e)
MIB = 1 << 20
# Finite start for the running maximum: a row whose scores are all masked keeps sum = 0 and never
# computes inf - inf.
_RUNNING_MAX_START = -1e30
# Never ask for less VMEM than this: the smallest default scoped limit of the chips in
# docs/tpu.md, so a kernel that fits the estimate also leaves Mosaic its internal scratch.
MIN_VMEM_LIMIT = 16 * MIB


def check_num_splits(num_splits) -> None:
  """Rejects a ``num_splits`` tuning value that is not an int >= 1."""
  if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
    raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")


def interpret_params(interpret: bool):
  """pallas_call's ``interpret``: the TPU interpreter (runs on a CPU, simulating VMEM, SMEM,
  DMAs and semaphores), or False to lower with Mosaic."""
  return pltpu.InterpretParams() if interpret else False


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def sublane_multiple(dtype) -> int:
  """Rows of one (sublane x lane) tile: 8 for 32-bit types, 16 for bf16, 32 for 8-bit."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def group_query_tile(q: jax.Array, kv_heads: int) -> jax.Array:
  """[batch, B, q_heads, D] -> [batch * kv_heads, rows, D], row t*G + g holding block token t
  of query head h*G + g, zero rows up to a multiple of the sublane tile."""
  batch, block, q_heads, head_dim = q.shape
  group = q_heads // kv_heads
  tile = q.reshape(batch, block, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
  tile = tile.reshape(batch * kv_heads, block * group, head_dim)
  rows = round_up(block * group, sublane_multiple(q.dtype))
  return jnp.pad(tile, ((0, 0), (0, rows - block * group), (0, 0)))


def ungroup_query_tile(tile: jax.Array, batch: int, block: int, q_heads: int) -> jax.Array:
  """Inverse of `group_query_tile`: [batch * kv_heads, rows, D] -> [batch, B, q_heads, D]."""
  pairs, _, head_dim = tile.shape
  kv_heads = pairs // batch
  group = q_heads // kv_heads
  out = tile[:, :block * group].reshape(batch, kv_heads, block, group, head_dim)
  return out.transpose(0, 2, 1, 3, 4).reshape(batch, block, q_heads, head_dim)


def group_block_keys(x: jax.Array) -> jax.Array:
  """[batch, B, kv_heads, D] -> [batch * kv_heads, 128 * ceil(B / 128), D], zero rows past B:
  a lane-dense score tile [rows, 128] for the block's keys, and finite values in the padding."""
  batch, block, kv_heads, head_dim = x.shape
  keys = x.transpose(0, 2, 1, 3).reshape(batch * kv_heads, block, head_dim)
  return jnp.pad(keys, ((0, 0), (0, round_up(block, LANES) - block), (0, 0)))


def fit_row_tile(block_k: int, rows: int, name: str) -> int:
  """Rows per tile: all rows when they fit one tile, else the largest divisor of ``rows`` that
  is <= block_k, preferring multiples of 8 (aligned DMAs and score tiles), so that every tile is
  full and in bounds and no tile straddles the end of the cache. Capacities that are multiples
  of 128 (every model run) always get full-size tiles; an odd capacity gets small tiles."""
  if block_k < 8 or block_k % 8:
    raise ValueError(f"{name}={block_k} must be a positive multiple of 8")
  if rows <= block_k:
    return rows
  divisors = [tile for tile in range(block_k, 0, -1) if rows % tile == 0]
  aligned = [tile for tile in divisors if tile % 8 == 0]
  return (aligned or divisors)[0]


def div(a, b):
  """a // b for non-negative integers (traced or not). jnp's floor division lowers through
  sign(), which Mosaic lowers only when it knows the chip; truncation is the same here."""
  return lax.div(a, b)


def cdiv(a, b):
  """ceil(a / b) for non-negative integers, as `div`."""
  return lax.div(a + b - 1, b)


def pair_coordinates(pair, kv_heads: int):
  """(sequence, KV head) of a program over the flattened [batch * kv_heads] pairs."""
  return lax.div(pair, kv_heads), lax.rem(pair, kv_heads)


def split_range(split, num_splits: int, num_tiles):
  """(first tile, tile count) of ``split`` when ``num_tiles`` tiles are shared out in equal
  runs; the last splits may get fewer or none."""
  per_split = cdiv(num_tiles, num_splits)
  first = split * per_split
  return first, jnp.clip(num_tiles - first, 0, per_split)


def pipelined_tiles(num_tiles, start: Callable, wait: Callable, compute: Callable) -> None:
  """Runs ``compute(t, slot, last)`` for t in [0, num_tiles) with two buffers (slot = t % 2):
  ``start(t, slot)`` issues tile t's DMAs, which run while tile t - 1 is computed, and
  ``wait(t, slot)`` waits for them. Only the last tile gets ``last=True``: the one tile that
  may hold rows past the valid range and needs masks."""

  @pl.when(num_tiles > 0)
  def _():
    start(0, 0)

  def step(t, last: bool):
    slot = lax.rem(t, 2)
    if not last:
      start(t + 1, 1 - slot)  # t <= num_tiles - 2 here: the next tile exists.
    wait(t, slot)
    compute(t, slot, last)

  def body(t, carry):
    step(t, last=False)
    return carry

  lax.fori_loop(0, num_tiles - 1, body, 0)

  @pl.when(num_tiles > 0)
  def _():
    step(num_tiles - 1, last=True)


def init_softmax(acc_ref, max_ref, sum_ref) -> None:
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
  max_ref[...] = jnp.full(max_ref.shape, _RUNNING_MAX_START, jnp.float32)
  sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)


def scores_of(q: jax.Array, k: jax.Array) -> jax.Array:
  """q @ k.T in float32, contracting the head dim of both (the MXU takes k transposed)."""
  return lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def zero_invalid_rows(x: jax.Array, row_valid: jax.Array) -> jax.Array:
  """x [n, D] with the rows where row_valid [n, 1] is False set to 0, so that garbage in a
  tile's unused rows (NaN in interpret mode) cannot reach a matmul (0 * NaN = NaN). Selected in
  float32: bf16 has no VPU select on v5e."""
  return jnp.where(row_valid, x.astype(jnp.float32), 0.0).astype(x.dtype)


def attend_tile(q, k, v, acc_ref, max_ref, sum_ref, qk_scale: float,
                key_valid: jax.Array | None = None) -> None:
  """One online-softmax step of the query tile over a tile of keys.

  Args:
    q: [rows, D] queries.
    k, v: [n, D] keys and values (rows of v that are not valid must be finite).
    acc_ref, max_ref, sum_ref: VMEM scratch: float32 [rows, D], [rows, 128], [rows, 128]
      (max and sum in base-2 units, replicated over the lanes).
    qk_scale: sm_scale * log2(e).
    key_valid: [1, n] bool, or None when every key is valid (the hot loop skips the mask).
  """
  scores = scores_of(q, k)
  if key_valid is not None:
    scores = jnp.where(key_valid, scores, -jnp.inf)
  max_prev = max_ref[...][:, :1]
  # The scale is positive, so the maximum of the raw scores, scaled, is the scaled maximum.
  max_next = jnp.maximum(max_prev, jnp.max(scores, axis=1, keepdims=True) * qk_scale)
  correction = jnp.exp2(max_prev - max_next)
  probs = jnp.exp2(scores * qk_scale - max_next)
  sum_next = sum_ref[...][:, :1] * correction + jnp.sum(probs, axis=1, keepdims=True)
  acc_ref[...] = acc_ref[...] * correction + jnp.dot(probs.astype(v.dtype), v,
                                                     preferred_element_type=jnp.float32)
  max_ref[...] = jnp.broadcast_to(max_next, max_ref.shape)
  sum_ref[...] = jnp.broadcast_to(sum_next, sum_ref.shape)


def log_sum_exp2(max_ref, sum_ref) -> jax.Array:
  """[rows, 128] base-2 log-sum-exp of the online state; -inf where nothing was seen."""
  total = sum_ref[...]
  seen = total > 0
  return jnp.where(seen, max_ref[...] + jnp.log2(jnp.where(seen, total, 1.0)), -jnp.inf)


def normalised_output(acc_ref, sum_ref) -> jax.Array:
  """acc / sum in float32; 0 for rows that saw no key."""
  total = sum_ref[...][:, :1]
  return acc_ref[...] / jnp.where(total > 0, total, 1.0)


def row_mask(first, size: int, limit, axis: int) -> jax.Array:
  """[1, size] (axis 1) or [size, 1] (axis 0) bool: first + i < limit."""
  shape = (1, size) if axis == 1 else (size, 1)
  return first + lax.broadcasted_iota(jnp.int32, shape, axis) < limit


def vmem_limit(estimate_bytes: int) -> int:
  """The scoped VMEM limit asked of Mosaic for a kernel whose buffers and temporaries take
  about ``estimate_bytes``: twice that (Mosaic's own temporaries, layout padding), rounded up to
  a MiB, at least MIN_VMEM_LIMIT."""
  return max(MIN_VMEM_LIMIT, round_up(2 * estimate_bytes, MIB))


def compiler_params(dimension_semantics: tuple[str, ...], vmem_limit_bytes: int):
  return pltpu.CompilerParams(dimension_semantics=dimension_semantics,
                              vmem_limit_bytes=vmem_limit_bytes)


def attention_vmem_bytes(rows: int, head_dim: int, block_k: int, block_rows: int, q_dtype,
                         kv_dtype, out_dtype, lse_outputs: int) -> int:
  """VMEM of one program of `block_attention_call`: the K/V tile buffers, the double-buffered
  blocks, the softmax scratch and the score temporaries."""
  kv_item, q_item = jnp.dtype(kv_dtype).itemsize, jnp.dtype(q_dtype).itemsize
  buffers = 2 * 2 * block_k * head_dim * kv_item  # K and V tiles, two slots each
  blocks = 2 * (rows * head_dim * q_item + 2 * block_rows * head_dim * kv_item
                + rows * head_dim * jnp.dtype(out_dtype).itemsize
                + lse_outputs * rows * LANES * 4)  # double-buffered blocks
  scratch = rows * (head_dim + 2 * LANES) * 4
  temporaries = 3 * rows * max(block_k, block_rows) * 4  # scores, probabilities, their cast
  return buffers + blocks + scratch + temporaries


def block_attention_call(kernel: Callable, prefetch: jax.Array, q_tile, k_rows, v_rows, k_cache,
                         v_cache, *, block_k: int, num_splits: int, out_dtype, lse_outputs: int,
                         name: str, interpret: bool, extra=()) -> list[jax.Array]:
  """Launches a decode attention kernel on the grid (pair, split).

  The kernel gets, in order: ``prefetch`` (scalar-prefetched into SMEM), each ``(spec, array)``
  of ``extra``, the pair's query tile [rows, head_dim] and block keys / values, K and V caches
  left in HBM, the outputs (out [rows, head_dim] in ``out_dtype``, then ``lse_outputs`` float32
  [rows, 128] rows), and the scratch: two K and two V tile buffers [2, block_k, head_dim], their
  DMA semaphores (2, 2), and the softmax state acc [rows, head_dim], max and sum [rows, 128].
  Returns the outputs with a split axis: [pairs, num_splits, ...]."""
  pairs, rows, head_dim = q_tile.shape
  block_rows = k_rows.shape[1]
  per_pair = lambda p, s, _: (p, 0, 0)
  per_program = lambda p, s, _: (p, s, 0, 0)
  out_specs = [pl.BlockSpec((None, None, rows, head_dim), per_program)]
  out_shape = [jax.ShapeDtypeStruct((pairs, num_splits, rows, head_dim), out_dtype)]
  out_specs += [pl.BlockSpec((None, None, rows, LANES), per_program)] * lse_outputs
  out_shape += [jax.ShapeDtypeStruct((pairs, num_splits, rows, LANES), jnp.float32)] * lse_outputs
  vmem = attention_vmem_bytes(rows, head_dim, block_k, block_rows, q_tile.dtype, k_cache.dtype,
                              out_dtype, lse_outputs)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(pairs, num_splits),
          in_specs=[
              *(spec for spec, _ in extra),
              pl.BlockSpec((None, rows, head_dim), per_pair),
              pl.BlockSpec((None, block_rows, head_dim), per_pair),
              pl.BlockSpec((None, block_rows, head_dim), per_pair),
              pl.BlockSpec(memory_space=pl.ANY),  # k_cache stays in HBM
              pl.BlockSpec(memory_space=pl.ANY),  # v_cache
          ],
          out_specs=out_specs,
          scratch_shapes=[
              pltpu.VMEM((2, block_k, head_dim), k_cache.dtype),
              pltpu.VMEM((2, block_k, head_dim), v_cache.dtype),
              pltpu.SemaphoreType.DMA((2, 2)),
              pltpu.VMEM((rows, head_dim), jnp.float32),
              pltpu.VMEM((rows, LANES), jnp.float32),
              pltpu.VMEM((rows, LANES), jnp.float32),
          ]),
      out_shape=out_shape,
      compiler_params=compiler_params(("parallel", "parallel"), vmem_limit(vmem)),
      interpret=interpret_params(interpret),
      name=name,
  )(prefetch, *(array for _, array in extra), q_tile, k_rows, v_rows, k_cache, v_cache)
