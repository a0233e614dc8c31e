"""Exact top-k selection of cache rows from MAGE's per-row scores.

`lax.top_k` sorts, which at 128K positions costs more than the attention it serves. Selection
only needs the *set* of the k largest scores (the kernels want it sorted by position, not by
score), so the fast path finds the k-th largest score exactly and then keeps every position
above it:

1. Scores become unsigned 32-bit keys whose integer order is the float order.
2. Radix threshold search: the threshold T is built `radix_bits` bits at a time, most
   significant first. With prefix P fixed, the next digit is the largest d such that at least
   `count` valid keys are >= P | d << shift. Counting `key >= candidate` for the 2**radix_bits - 1
   candidates of a step is one fused compare-and-sum over the row. By induction, after the last
   step T is the largest value with count(key >= T) >= count, i.e. exactly the count-th largest
   key (ties included).
3. Keys > T are all selected; of the keys == T, the lowest positions fill the remaining slots
   (the tie rule of `lax.top_k`). One prefix sum over both masks gives each selected position
   its slot, so the output comes out sorted by position.

Everything is fused XLA (compares, reductions, two prefix sums, one scatter): no sort, and it
runs on every backend, so "pallas" and "interpret" both mean this path. Counts and prefix sums
work on rows cut into chunks, so that a few long rows still spread over the whole GPU.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels.dispatch import PLAIN_JAX, resolve_impl


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
  try:
    return jnp.broadcast_shapes(shape, target) == target
  except ValueError:
    return False


def _check_inputs(scores, lengths, k: int, budgets) -> None:
  if scores.ndim < 1:
    raise ValueError(f"scores must have rank >= 1, got shape {scores.shape}")
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be an int >= 1, got {k!r}")
  for name, array in (("lengths", lengths), ("budgets", budgets)):
    if array is not None and not _broadcasts_to(jnp.shape(array), scores.shape[:-1]):
      raise ValueError(f"{name} of shape {jnp.shape(array)} does not broadcast to scores' "
                       f"leading shape {scores.shape[:-1]}")


def _row_counts(lengths, budgets, rows_shape, capacity: int, k: int):
  """Per-row (clipped length, number to select = min(budget, length))."""
  lengths = jnp.clip(jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), rows_shape), 0, capacity)
  budgets = k if budgets is None else jnp.broadcast_to(jnp.asarray(budgets, jnp.int32),
                                                       rows_shape)
  return lengths, jnp.clip(jnp.minimum(budgets, lengths), 0, k)


def _order_preserving_keys(scores: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (negative floats are bit-flipped, positive get the
  sign bit set)."""
  bits = lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _count(mask: jax.Array) -> jax.Array:
  """Sum over the last two axes [..., chunks, chunk_size] in two reductions: one per chunk,
  then over chunks, which keeps thousands of rows reducing in parallel instead of a few long
  ones."""
  return jnp.sum(jnp.sum(mask, axis=-1, dtype=jnp.int32), axis=-1)


def _inclusive_prefix_count(mask: jax.Array) -> jax.Array:
  """Running count of True along the flattened last two axes [..., chunks, chunk_size]:
  short prefix sums inside chunks plus an exclusive prefix sum of the chunk totals."""
  within = jnp.cumsum(mask, axis=-1, dtype=jnp.int32)
  before = jnp.cumsum(within[..., -1], axis=-1) - within[..., -1]
  return within + before[..., None]


def _kth_largest_key(keys, valid, counts, radix_bits: int):
  """Exact counts-th largest valid key per row (all ones when counts == 0); keys and valid are
  [..., chunks, chunk_size]."""
  digits = jnp.arange(1, 2**radix_bits, dtype=jnp.uint32)
  threshold = jnp.zeros(keys.shape[:-2], jnp.uint32)
  for shift in range(32 - radix_bits, -1, -radix_bits):
    candidates = (threshold[..., None] | (digits << shift))[..., None, None]
    at_least = _count(valid[..., None, :, :] & (keys[..., None, :, :] >= candidates))
    digit = jnp.sum(at_least >= counts[..., None], axis=-1, dtype=jnp.uint32)
    threshold = threshold | (digit << shift)
  return threshold


@functools.partial(jax.jit, static_argnames=("k", "radix_bits", "chunk_size"))
def _radix_select(scores, lengths, budgets, *, k: int, radix_bits: int, chunk_size: int):
  capacity = scores.shape[-1]
  rows_shape = scores.shape[:-1]
  lengths, counts = _row_counts(lengths, budgets, rows_shape, capacity, k)
  chunk_size = min(chunk_size, capacity)
  chunks = -(-capacity // chunk_size)
  padding = [(0, 0)] * len(rows_shape) + [(0, chunks * chunk_size - capacity)]
  keys = _order_preserving_keys(jnp.pad(scores, padding)).reshape(*rows_shape, chunks,
                                                                    chunk_size)
  positions = jnp.arange(chunks * chunk_size, dtype=jnp.int32).reshape(chunks, chunk_size)
  valid = positions < lengths[..., None, None]
  threshold = _kth_largest_key(keys, valid, counts, radix_bits)[..., None, None]
  above = valid & (keys > threshold)
  tied = valid & (keys == threshold)
  # One prefix count over both masks: the selected ties are the first `quota` in position
  # order, so a position's slot is (above so far) + min(ties so far, quota) - 1.
  above_before, tied_before = _inclusive_prefix_count(jnp.stack([above, tied]))
  quota = (counts - above_before[..., -1, -1])[..., None, None]
  selected = above | (tied & (tied_before <= quota))
  slot = above_before + jnp.minimum(tied_before, quota) - 1
  flat_slot = jnp.where(selected, slot, k).reshape(-1, chunks * chunk_size)
  rows = jnp.arange(flat_slot.shape[0])[:, None]
  indices = jnp.zeros((flat_slot.shape[0], k), jnp.int32).at[rows, flat_slot].set(
      jnp.broadcast_to(positions.reshape(-1), flat_slot.shape), mode="drop")
  return indices.reshape(*rows_shape, k), counts


def select_kv_indices(scores, lengths, k: int, *, budgets=None, impl: str = "auto",
                      radix_bits: int = 4, chunk_size: int = 1024):
  """Positions of the min(budget, length) largest scores per row, sorted ascending.

  Args:
    scores: float32 [..., capacity], e.g. alpha [batch, kv_heads, capacity] of one layer or
      [layers, batch, kv_heads, capacity] of all.
    lengths: int32 broadcastable to scores.shape[:-1]; positions >= length are never selected.
    k: static number of output slots (may exceed the capacity or the length).
    budgets: optional int32 broadcastable to scores.shape[:-1], values <= k (per-layer
      budgets); default k.
    impl: the plain-JAX paths ("reference", "xla") use `lax.top_k`; the others the exact radix
      threshold search.
    radix_bits: bits of the threshold fixed per pass of the radix search (1, 2, 4 or 8): more
      bits, fewer passes but more compares per pass (8 bits measured 2.4x slower than 4 at
      two rows of 128K, 4.4x at 16 rows: benchmarks/results/decode_kernels.md).
    chunk_size: positions per chunk of the two-level counts and prefix sums.

  Returns:
    (indices int32 [..., k]: selected positions ascending in the first `counts` slots, 0 in the
    rest; counts int32 scores.shape[:-1] = min(budget, length)).
  """
  _check_inputs(scores, lengths, k, budgets)
  if radix_bits not in (1, 2, 4, 8):
    raise ValueError(f"radix_bits must be 1, 2, 4 or 8, got {radix_bits}")
  if resolve_impl(impl) in PLAIN_JAX:
    return select_kv_indices_reference(scores, lengths, k, budgets=budgets)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  return _radix_select(scores, lengths, budgets, k=k, radix_bits=radix_bits,
                       chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("k",))
def select_kv_indices_reference(scores, lengths, k: int, *, budgets=None):
  """`lax.top_k` over the valid positions, then the first `counts` sorted by position."""
  capacity = scores.shape[-1]
  rows_shape = scores.shape[:-1]
  lengths, counts = _row_counts(lengths, budgets, rows_shape, capacity, k)
  valid = jnp.arange(capacity) < lengths[..., None]
  masked = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
  if k > capacity:
    masked = jnp.pad(masked, [(0, 0)] * len(rows_shape) + [(0, k - capacity)],
                     constant_values=-jnp.inf)
  _, top = lax.top_k(masked, k)
  used = jnp.arange(k) < counts[..., None]
  ascending = jnp.sort(jnp.where(used, top, jnp.iinfo(jnp.int32).max), axis=-1)
  return jnp.where(used, ascending, 0).astype(jnp.int32), counts
