"""Attention of a block over a selected subset of cache rows (MAGE's steps 2..T), for TPU
(Mosaic). Same arguments, outputs and reference as `pallas_kernels.sparse_attention`.

Each (sequence, KV head) pair has its own list of cache row ids, shared by the G query heads of
the group and the B block tokens. One program per pair (and split) gathers its rows from the
cache in HBM with one DMA per row and per K / V, ``block_k`` rows per tile into a VMEM buffer,
double-buffered as in jax's paged attention kernels (whose gathers are whole pages; MAGE selects
single rows). The program's index list is an SMEM block: the whole [batch, kv_heads, K] table
as a scalar prefetch would be 1 MiB at batch 8 x 8 KV heads x K = 4096, more than SMEM is meant
to hold, while one pair's list (16 KB at K = 4096) is pipelined into SMEM ahead of its program.
The counts are scalar-prefetched. Rows past a pair's count are neither copied nor attended.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _triton_utils as tu
from pallas_kernels import merge_splits
from pallas_kernels.decode_attention import _resolve_scale
from pallas_kernels.sparse_attention import _check_selection, sparse_block_attention_reference
from pallas_kernels.tpu import _mosaic_utils as mu

# Selected rows gathered per tile: 128 row DMAs each for K and V in flight while the previous
# tile is computed, and a lane-dense [rows, 128] score tile.
DEFAULT_BLOCK_K = 128
_TUNING = ("block_k", "num_splits")


def _sparse_kernel(counts_ref, indices_ref, q_ref, k_block_ref, v_block_ref, k_hbm, v_hbm,
                   out_ref, *refs, kv_heads: int, num_splits: int, block_k: int,
                   block_tokens: int, qk_scale: float):
  """One (pair, split) program: its share of the pair's first ``count`` selected rows, and the
  block's own keys in the last split. Writes the normalised output [rows, D] and, with several
  splits, the base-2 log-sum-exp [rows, 128]."""
  if num_splits > 1:
    lse_ref, *refs = refs
  k_buf, v_buf, sems, acc_ref, max_ref, sum_ref = refs
  pair, split = pl.program_id(0), pl.program_id(1)
  batch_index, kv_head = mu.pair_coordinates(pair, kv_heads)
  capacity = k_hbm.shape[2]
  count = jnp.clip(counts_ref[pair], 0, indices_ref.shape[1])
  first_tile, num_tiles = mu.split_range(split, num_splits, mu.cdiv(count, block_k))
  mu.init_softmax(acc_ref, max_ref, sum_ref)

  def first_slot(t):
    return (first_tile + t) * block_k

  def row_copies(t, slot, j):
    # Padding slots hold arbitrary ids; clipping keeps every DMA in bounds.
    row = jnp.clip(indices_ref[0, first_slot(t) + j], 0, capacity - 1)
    return [pltpu.make_async_copy(hbm.at[batch_index, kv_head, pl.ds(row, 1)],
                                  buf.at[slot, pl.ds(j, 1)], sems.at[i, slot])
            for i, (hbm, buf) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf)))]

  def for_each_row(t, slot, action):
    def body(j, carry):
      for copy in row_copies(t, slot, j):
        action(copy)
      return carry

    jax.lax.fori_loop(0, jnp.minimum(block_k, count - first_slot(t)), body, 0)

  def compute(t, slot, last: bool):
    k, v = k_buf[slot], v_buf[slot]
    key_valid = None
    if last:  # The only tile with unused slots: their buffer rows are stale or uninitialised.
      key_valid = mu.row_mask(first_slot(t), block_k, count, axis=1)
      v = mu.zero_invalid_rows(v, mu.row_mask(first_slot(t), block_k, count, axis=0))
    mu.attend_tile(q_ref[...], k, v, acc_ref, max_ref, sum_ref, qk_scale, key_valid)

  mu.pipelined_tiles(num_tiles, lambda t, slot: for_each_row(t, slot, lambda c: c.start()),
                     lambda t, slot: for_each_row(t, slot, lambda c: c.wait()), compute)

  @pl.when(split == num_splits - 1)
  def _():
    block_valid = mu.row_mask(0, k_block_ref.shape[0], block_tokens, axis=1)
    mu.attend_tile(q_ref[...], k_block_ref[...], v_block_ref[...], acc_ref, max_ref, sum_ref,
                   qk_scale, block_valid)

  out_ref[...] = mu.normalised_output(acc_ref, sum_ref).astype(out_ref.dtype)
  if num_splits > 1:
    lse_ref[...] = mu.log_sum_exp2(max_ref, sum_ref)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "block_k", "num_splits"))
def _sparse_attention(q, k_cache, v_cache, indices, counts, k_block, v_block, *, sm_scale: float,
                      interpret: bool, block_k: int, num_splits: int):
  batch, block, q_heads, head_dim = q.shape
  kv_heads = k_cache.shape[1]
  budget = indices.shape[2]
  pairs = batch * kv_heads
  q_tile = mu.group_query_tile(q, kv_heads)
  k_rows, v_rows = mu.group_block_keys(k_block), mu.group_block_keys(v_block)
  block_k = min(block_k, mu.round_up(budget, 8))
  out_dtype = q.dtype if num_splits == 1 else jnp.float32
  kernel = functools.partial(_sparse_kernel, kv_heads=kv_heads, num_splits=num_splits,
                             block_k=block_k, block_tokens=block, qk_scale=sm_scale * mu.LOG2_E)
  # The pair's index list, a pipelined SMEM block (a whole-table scalar prefetch would be
  # batch x kv_heads x K words of SMEM).
  index_list = (pl.BlockSpec((None, 1, budget), lambda p, s, counts: (p, 0, 0),
                             memory_space=pltpu.SMEM),
                indices.astype(jnp.int32).reshape(pairs, 1, budget))
  results = mu.block_attention_call(
      kernel, counts.astype(jnp.int32).reshape(pairs), q_tile, k_rows, v_rows, k_cache, v_cache,
      block_k=block_k, num_splits=num_splits, out_dtype=out_dtype,
      lse_outputs=int(num_splits > 1), name="tpu_block_sparse_attention", interpret=interpret,
      extra=[index_list])
  if num_splits == 1:
    out = results[0][:, 0]
  else:
    out = merge_splits.merge_splits_reference(results[0], results[1][..., 0], out_dtype=q.dtype)
  return mu.ungroup_query_tile(out, batch, block, q_heads)


def sparse_block_attention(q, k_cache, v_cache, indices, counts, k_block, v_block, *,
                           sm_scale: float | None = None, interpret: bool = False, **tuning):
  """Attention of a block over the selected cache rows of each KV head plus the block itself.

  Args:
    q: [batch, block, q_heads, head_dim]; query head h*G + g uses KV head h.
    k_cache, v_cache: [batch, kv_heads, capacity, head_dim].
    indices: int32 [batch, kv_heads, K] cache row ids; only the first counts[b, h] are used.
    counts: int32 [batch, kv_heads], 0..K.
    k_block, v_block: [batch, block, kv_heads, head_dim], always attended.
    sm_scale: logit scale, default 1/sqrt(head_dim).
    interpret: run the kernel in Pallas' TPU interpreter (CPU) instead of lowering with Mosaic.
    **tuning: block_k (rows gathered per tile, default DEFAULT_BLOCK_K), num_splits (programs
      per (sequence, KV head), default 1; more only helps a megacore chip with fewer pairs than
      cores).

  Returns:
    [batch, block, q_heads, head_dim] in q.dtype.
  """
  batch, _, _, kv_heads, head_dim = tu.check_block_attention_inputs(q, k_cache, v_cache,
                                                                    k_block, v_block, "k_cache")
  _check_selection(indices, counts, batch, kv_heads)
  tu.check_tuning(tuning, _TUNING, "sparse_block_attention")
  block_k, num_splits = tuning.get("block_k", DEFAULT_BLOCK_K), tuning.get("num_splits", 1)
  if isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < 8 or block_k % 8:
    raise ValueError(f"block_k={block_k!r} must be a positive multiple of 8")
  mu.check_num_splits(num_splits)
  return _sparse_attention(q, k_cache, v_cache, indices, counts, k_block, v_block,
                           sm_scale=_resolve_scale(sm_scale, head_dim),
                           interpret=bool(interpret), block_k=block_k, num_splits=num_splits)


__all__ = ["sparse_block_attention", "sparse_block_attention_reference"]
