"""Attention of a block over a selected subset of cache rows (MAGE's steps 2..T).

Each (batch, KV head) has its own list of cache row ids (the top-k of the mask step), shared by
the G query heads of the group and the B block tokens, plus the block's own keys. The kernel is
the split-KV kernel of `decode_attention` with the contiguous row loads replaced by a gather of
rows through the index list (`ref[indices, :]`, as in jax's paged attention).

At k = 512 the whole step moves ~0.5 MB, so it is bound by latency (the chain of gather, dot,
softmax, dot per tile) and launches, not bytes. Both the query tile (block_q rows per program;
the K/V rows gathered again by the other query tiles come from L2) and the index list (one tile
or more per split) are shared out over programs, so each program's chain is short; the last
split also attends the block's own keys, and XLA merges the splits' partial results (with one
split, the kernel's rows are final and the step is this one launch).
"""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _triton_utils as tu
from pallas_kernels import merge_splits
from pallas_kernels.dispatch import MOSAIC, PLAIN_JAX, resolve_impl

# Tuning keywords and their defaults (None: chosen from the shapes).
_TUNING = dict(block_k=64, block_q=64, num_splits=None, num_warps=None, num_stages=2, merge="auto")


def _sparse_kernel(counts_ref, indices_ref, q_ref, k_ref, v_ref, k_block_ref, v_block_ref,
                   out_ref, lse_ref, *, kv_heads: int, group: int, block_tokens: int,
                   block_q: int, num_splits: int, block_k: int, qk_scale: float, exp2):
  """One (query tile, batch, KV head, split) program; the last split also attends the block's
  own keys."""
  kv_head, split = pl.program_id(2), pl.program_id(3)
  capacity, head_dim = k_ref.shape
  rows = tu.query_rows(kv_head, kv_heads, group, block_tokens, block_q,
                       first=pl.program_id(0) * block_q)
  q = q_ref[rows, :]
  count = jnp.minimum(counts_ref[0], indices_ref.shape[0])
  start, num_slots = tu.split_range(split, num_splits, count, block_k)

  def load_tile(first, valid):
    slots = pl.ds(start + first, block_k)
    if valid is None:
      ids = indices_ref[slots]
    else:
      ids = plt.load(indices_ref.at[slots], mask=valid, other=0)
    # Padding slots past the count hold arbitrary ids; clipping keeps every gather in bounds.
    ids = jnp.clip(ids, 0, capacity - 1)
    return k_ref[ids, :], v_ref[ids, :]

  state = tu.attend_rows(tu.initial_state(block_q, head_dim), q, num_slots, block_k, load_tile,
                         qk_scale, exp2=exp2)
  state = lax.cond(
      split == num_splits - 1,
      lambda: tu.attend_block_keys(state, q, k_block_ref, v_block_ref, kv_head, kv_heads,
                                   block_tokens, qk_scale, exp2=exp2),
      lambda: state)
  tu.store_partial(state, out_ref, lse_ref, rows)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "block_k", "block_q",
                                             "num_splits", "num_warps", "num_stages", "merge"))
def _sparse_attention(q, k_cache, v_cache, indices, counts, k_block, v_block, *,
                      sm_scale: float, interpret: bool, block_k: int, block_q: int,
                      num_splits: int | None, num_warps: int | None, num_stages: int,
                      merge: str):
  batch, block, q_heads, _ = q.shape
  kv_heads = k_cache.shape[1]
  block_q, q_tiles = tu.query_tiling(q_heads // kv_heads * block, block_q)
  block_k = tu.fit_block_k(block_k, indices.shape[2])
  indices = tu.pad_rows(indices.astype(jnp.int32), 2)
  k_cache, v_cache = tu.pad_rows(k_cache, 2), tu.pad_rows(v_cache, 2)
  budget = indices.shape[2]
  if num_splits is None:
    # One tile per split, as long as the grid stays within TARGET_PROGRAMS.
    num_splits = max(1, min(pl.cdiv(budget, block_k),
                            tu.TARGET_PROGRAMS // (batch * kv_heads * q_tiles)))
  per_head = lambda t, b, h, s: (b, h, 0)
  leading = [(counts.astype(jnp.int32).reshape(batch, kv_heads, 1),
              pl.BlockSpec((None, None, 1), per_head)),
             (indices, pl.BlockSpec((None, None, budget), per_head))]
  partial_out, partial_lse = tu.split_kv_call(
      _sparse_kernel, leading, q, k_cache, v_cache, k_block, v_block, block_q=block_q,
      block_k=block_k, num_splits=num_splits, grid_splits=num_splits, sm_scale=sm_scale,
      num_warps=num_warps, num_stages=num_stages, interpret=interpret,
      name="block_sparse_attention")
  if num_splits == 1:
    return partial_out.reshape(q.shape)
  return merge_splits.merge(partial_out, partial_lse, how=merge, interpret=interpret,
                            out_dtype=q.dtype).reshape(q.shape)


def _check_selection(indices, counts, batch: int, kv_heads: int) -> None:
  if indices.ndim != 3 or indices.shape[:2] != (batch, kv_heads):
    raise ValueError(f"indices must have shape ({batch}, {kv_heads}, K), got {indices.shape}")
  if indices.shape[2] < 1:
    raise ValueError("indices must have K >= 1 slots")
  if counts.shape != (batch, kv_heads):
    raise ValueError(f"counts must have shape ({batch}, {kv_heads}), got {counts.shape}")


def sparse_block_attention(q, k_cache, v_cache, indices, counts, k_block, v_block, *,
                           sm_scale: float | None = None, impl: str = "auto", **tuning):
  """Attention of a block over the selected cache rows of each KV head plus the block itself.

  Args:
    q, k_cache, v_cache, k_block, v_block, sm_scale, impl: as for `exact_block_attention`.
    indices: int32 [batch, kv_heads, K] cache row ids; only the first counts[b, h] are used.
    counts: int32 [batch, kv_heads], 0..K.
    **tuning: block_k (rows gathered per tile, default 64), block_q (query rows per program,
      default 64), num_splits (parts of the index list, default one tile each within ~264
      programs), num_warps, num_stages, merge ("auto", "pallas" or "xla", as
      for `exact_block_attention`).

  Returns:
    [batch, block, q_heads, head_dim] in q.dtype.
  """
  impl = resolve_impl(impl)
  if impl in MOSAIC:
    from pallas_kernels.tpu import sparse_attention as tpu  # imports this module
    return tpu.sparse_block_attention(q, k_cache, v_cache, indices, counts, k_block, v_block,
                                      sm_scale=sm_scale, interpret=impl == "mosaic_interpret",
                                      **tuning)
  batch, _, _, kv_heads, head_dim = tu.check_block_attention_inputs(q, k_cache, v_cache,
                                                                    k_block, v_block, "k_cache")
  _check_selection(indices, counts, batch, kv_heads)
  tu.check_tuning(tuning, _TUNING, "sparse_block_attention")
  sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(head_dim)
  if impl in PLAIN_JAX:
    return sparse_block_attention_reference(q, k_cache, v_cache, indices, counts, k_block,
                                            v_block, sm_scale=sm_scale)
  tu.check_kernel_head_dim(head_dim)
  return _sparse_attention(q, k_cache, v_cache, indices, counts, k_block, v_block,
                           sm_scale=sm_scale, interpret=impl == "interpret",
                           **{**_TUNING, **tuning})


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def sparse_block_attention_reference(q, k_cache, v_cache, indices, counts, k_block, v_block, *,
                                     sm_scale: float | None = None):
  """Plain-JAX gather-then-attend: the definition `sparse_block_attention` must match."""
  batch, block, q_heads, head_dim = q.shape
  kv_heads = k_cache.shape[1]
  sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
  gather = jax.vmap(jax.vmap(lambda rows, ids: rows[ids]))
  keys = jnp.concatenate([gather(k_cache, indices), k_block.transpose(0, 2, 1, 3)], axis=2)
  values = jnp.concatenate([gather(v_cache, indices), v_block.transpose(0, 2, 1, 3)], axis=2)
  grouped_q = q.reshape(batch, block, kv_heads, q_heads // kv_heads, head_dim)
  logits = jnp.einsum("bthgd,bhjd->bhgtj", grouped_q, keys, preferred_element_type=jnp.float32,
                      precision=lax.Precision.HIGHEST) * sm_scale
  budget = indices.shape[2]
  slots = jnp.arange(budget + block)
  used = (slots[None, None, :] < counts[:, :, None]) | (slots >= budget)
  probs = jax.nn.softmax(jnp.where(used[:, :, None, None], logits, -jnp.inf), axis=-1)
  out = jnp.einsum("bhgtj,bhjd->bthgd", probs, values.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
  return out.reshape(batch, block, q_heads, head_dim).astype(q.dtype)
