"""Dense attention of a block of queries over a KV cache, and MAGE's mask-step statistics, for
TPU (Mosaic). Same arguments, outputs and references as `pallas_kernels.decode_attention`.

One program per (sequence, KV head) pair and split: the pair's G*B queries form one query tile
(`_mosaic_utils.group_query_tile`), and the program streams its share of the cache rows
[0, length) from HBM in tiles of ``block_k`` rows through a double-buffered DMA loop, so each K/V
row is read once per step and nothing past the length is read at all. The grid runs in order on
one TensorCore, so splits buy no parallelism there; they only let a megacore chip (v4, v5p)
share out a grid with fewer pairs than cores. Every model has >= 2 KV heads, so the default is
one split, whose program writes the final output (no merge). With more splits each writes a
normalised partial and its base-2 log-sum-exp, and `merge_splits_reference` (XLA) merges them.
The last split also attends the block's own keys.

`mask_step_attention` adds alpha, MAGE's per-row attention mass. It needs each query's final
log-sum-exp, known only after every row was seen, so a second kernel re-reads K (not V) with
the queries and their log-sum-exp, turns the scores into probabilities and sums them over the
G*B real queries: alpha is [1, block_k] per tile, lane-dense, written into a VMEM-resident
[1, capacity] row that is zero past the length.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _triton_utils as tu
from pallas_kernels import merge_splits
from pallas_kernels.decode_attention import (_check_lengths, _resolve_scale,
                                             exact_block_attention_reference,
                                             mask_step_attention_reference)
from pallas_kernels.tpu import _mosaic_utils as mu

# Cache rows per DMA tile: 1024 rows of K and V at head_dim 128 in bf16 are 512 KB per tile, long
# enough that a tile's fixed cost (DMA issue and wait, loop step) is small next to its transfer
# (0.6 us on v5e's 0.82 TB/s), while the [rows, 1024] float32 scores of a 224-row query tile
# stay under 1 MB of VMEM. See docs/tpu.md.
DEFAULT_BLOCK_K = 1024
_ATTENTION_TUNING = ("block_k", "num_splits")
_ALPHA_TUNING = ("alpha_block_k",)


def _attention_kernel(lengths_ref, q_ref, k_block_ref, v_block_ref, k_hbm, v_hbm, out_ref, *refs,
                      kv_heads: int, num_splits: int, block_k: int, block_tokens: int,
                      qk_scale: float, lse_all: bool, lse_cache: bool):
  """One (pair, split) program. Outputs: the normalised output of its rows [rows, D] and, if
  asked, the base-2 log-sum-exp over everything it attended (``lse_all``: the merge of several
  splits needs it) and over its cache rows alone (``lse_cache``), [rows, 128] each, replicated
  over the lanes."""
  if lse_all:
    lse_all_ref, *refs = refs
  if lse_cache:
    lse_cache_ref, *refs = refs
  k_buf, v_buf, sems, acc_ref, max_ref, sum_ref = refs
  pair, split = pl.program_id(0), pl.program_id(1)
  batch_index, kv_head = mu.pair_coordinates(pair, kv_heads)
  capacity = k_hbm.shape[2]
  length = jnp.clip(lengths_ref[batch_index], 0, capacity)
  first_tile, num_tiles = mu.split_range(split, num_splits, mu.cdiv(length, block_k))
  mu.init_softmax(acc_ref, max_ref, sum_ref)

  def copies(t, slot):
    rows = pl.ds(pl.multiple_of((first_tile + t) * block_k, block_k), block_k)
    return [pltpu.make_async_copy(hbm.at[batch_index, kv_head, rows], buf.at[slot],
                                  sems.at[i, slot])
            for i, (hbm, buf) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf)))]

  def compute(t, slot, last: bool):
    k, v = k_buf[slot], v_buf[slot]
    key_valid = None
    if last:  # The only tile that can reach past the length.
      first = (first_tile + t) * block_k
      key_valid = mu.row_mask(first, block_k, length, axis=1)
      v = mu.zero_invalid_rows(v, mu.row_mask(first, block_k, length, axis=0))
    mu.attend_tile(q_ref[...], k, v, acc_ref, max_ref, sum_ref, qk_scale, key_valid)

  mu.pipelined_tiles(num_tiles, lambda t, slot: [c.start() for c in copies(t, slot)],
                     lambda t, slot: [c.wait() for c in copies(t, slot)], compute)
  if lse_cache:
    lse_cache_ref[...] = mu.log_sum_exp2(max_ref, sum_ref)

  @pl.when(split == num_splits - 1)
  def _():
    block_valid = mu.row_mask(0, k_block_ref.shape[0], block_tokens, axis=1)
    mu.attend_tile(q_ref[...], k_block_ref[...], v_block_ref[...], acc_ref, max_ref, sum_ref,
                   qk_scale, block_valid)

  out_ref[...] = mu.normalised_output(acc_ref, sum_ref).astype(out_ref.dtype)
  if lse_all:
    lse_all_ref[...] = mu.log_sum_exp2(max_ref, sum_ref)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "block_k", "num_splits",
                                             "with_lse"))
def _split_kv_attention(q, k_cache, v_cache, cache_lengths, k_block, v_block, *, sm_scale: float,
                        interpret: bool, block_k: int, num_splits: int, with_lse: bool):
  """Returns the output [batch, B, Hq, D] and, with ``with_lse``, the float32 base-2 log-sum-exp
  of every query row of every pair over all its keys and over its cache rows alone, each
  [pairs, rows, 128] (-inf where no key was seen)."""
  batch, block, q_heads, head_dim = q.shape
  kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
  q_tile = mu.group_query_tile(q, kv_heads)
  k_rows, v_rows = mu.group_block_keys(k_block), mu.group_block_keys(v_block)
  block_k = mu.fit_row_tile(block_k, capacity, "block_k")
  out_dtype = q.dtype if num_splits == 1 else jnp.float32
  lse_all = with_lse or num_splits > 1
  lse_outputs = int(lse_all) + int(with_lse)
  kernel = functools.partial(_attention_kernel, kv_heads=kv_heads, num_splits=num_splits,
                             block_k=block_k, block_tokens=block,
                             qk_scale=sm_scale * mu.LOG2_E, lse_all=lse_all, lse_cache=with_lse)
  results = mu.block_attention_call(
      kernel, cache_lengths.astype(jnp.int32), q_tile, k_rows, v_rows, k_cache, v_cache,
      block_k=block_k, num_splits=num_splits, out_dtype=out_dtype, lse_outputs=lse_outputs,
      name="tpu_block_split_kv_attention", interpret=interpret)
  partial_out, *partial_lse = results
  if num_splits == 1:
    out = partial_out[:, 0]
    lse = [x[:, 0] for x in partial_lse]
  else:
    out = merge_splits.merge_splits_reference(partial_out, partial_lse[0][..., 0],
                                              out_dtype=q.dtype)
    lse = [jnp.broadcast_to(tu.combine_lse(x[..., 0])[..., None], x.shape[:1] + x.shape[2:])
           for x in partial_lse]
  out = mu.ungroup_query_tile(out, batch, block, q_heads)
  return (out, *lse) if with_lse else out


def _alpha_kernel(lengths_ref, q_ref, lse_ref, k_hbm, alpha_ref, k_buf, sems, *, kv_heads: int,
                  real_rows: int, block_k: int, qk_scale: float):
  """One pair's alpha row [1, capacity]: column sums over the real query rows of the final
  probabilities 2^(s * qk_scale - lse), divided by the G*B real rows; 0 past the length."""
  pair = pl.program_id(0)
  batch_index, kv_head = mu.pair_coordinates(pair, kv_heads)
  capacity = k_hbm.shape[2]
  length = jnp.clip(lengths_ref[batch_index], 0, capacity)
  num_tiles = mu.cdiv(length, block_k)
  # +inf for the zero padding rows of the query tile: their probabilities 2^(s - inf) are 0.
  real = mu.row_mask(0, q_ref.shape[0], real_rows, axis=0)

  def copy(t, slot):
    rows = pl.ds(pl.multiple_of(t * block_k, block_k), block_k)
    return pltpu.make_async_copy(k_hbm.at[batch_index, kv_head, rows], k_buf.at[slot],
                                 sems.at[slot])

  def compute(t, slot, last: bool):
    lse = jnp.where(real, lse_ref[...][:, :1], jnp.inf)
    probs = jnp.exp2(mu.scores_of(q_ref[...], k_buf[slot]) * qk_scale - lse)
    mass = jnp.sum(probs, axis=0, keepdims=True) * (1.0 / real_rows)
    if last:  # rows past the length hold stale (or, interpreted, NaN) keys
      mass = jnp.where(mu.row_mask(t * block_k, block_k, length, axis=1), mass, 0.0)
    alpha_ref[:, pl.ds(pl.multiple_of(t * block_k, block_k), block_k)] = mass

  mu.pipelined_tiles(num_tiles, lambda t, slot: copy(t, slot).start(),
                     lambda t, slot: copy(t, slot).wait(), compute)

  def zero_tile(t, carry):
    alpha_ref[:, pl.ds(pl.multiple_of(t * block_k, block_k), block_k)] = jnp.zeros(
        (1, block_k), jnp.float32)
    return carry

  lax.fori_loop(num_tiles, capacity // block_k, zero_tile, 0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "alpha_includes_block", "interpret",
                                             "block_k", "num_splits", "alpha_block_k"))
def _mask_step(q, k_cache, v_cache, cache_lengths, k_block, v_block, *, sm_scale: float,
               alpha_includes_block: bool, interpret: bool, block_k: int, num_splits: int,
               alpha_block_k: int):
  batch, block, q_heads, head_dim = q.shape
  kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
  pairs = batch * kv_heads
  out, lse_all, lse_cache = _split_kv_attention(
      q, k_cache, v_cache, cache_lengths, k_block, v_block, sm_scale=sm_scale,
      interpret=interpret, block_k=block_k, num_splits=num_splits, with_lse=True)
  lse = lse_all if alpha_includes_block else lse_cache
  q_tile = mu.group_query_tile(q, kv_heads)
  rows = q_tile.shape[1]
  alpha_block_k = mu.fit_row_tile(alpha_block_k, capacity, "alpha_block_k")
  kernel = functools.partial(_alpha_kernel, kv_heads=kv_heads,
                             real_rows=block * (q_heads // kv_heads), block_k=alpha_block_k,
                             qk_scale=sm_scale * mu.LOG2_E)
  per_pair = lambda p, lengths: (p, 0, 0)
  k_item = jnp.dtype(k_cache.dtype).itemsize
  # The alpha row is counted at 8 sublanes per row, in case Mosaic tiles [1, capacity] as (8, 128).
  vmem = (2 * alpha_block_k * head_dim * k_item + 2 * rows * head_dim * q.dtype.itemsize
          + 2 * rows * mu.LANES * 4 + 2 * 8 * capacity * 4 + 3 * rows * alpha_block_k * 4)
  alpha = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(pairs,),
          in_specs=[
              pl.BlockSpec((None, rows, head_dim), per_pair),
              pl.BlockSpec((None, rows, mu.LANES), per_pair),
              pl.BlockSpec(memory_space=pl.ANY),  # k_cache stays in HBM
          ],
          out_specs=pl.BlockSpec((None, 1, capacity), per_pair),
          scratch_shapes=[pltpu.VMEM((2, alpha_block_k, head_dim), k_cache.dtype),
                          pltpu.SemaphoreType.DMA((2,))]),
      out_shape=jax.ShapeDtypeStruct((pairs, 1, capacity), jnp.float32),
      compiler_params=mu.compiler_params(("parallel",), mu.vmem_limit(vmem)),
      interpret=mu.interpret_params(interpret),
      name="tpu_block_attention_alpha",
  )(cache_lengths.astype(jnp.int32), q_tile, lse, k_cache)
  return out, alpha.reshape(batch, kv_heads, capacity)


def exact_block_attention(q, k_cache, v_cache, cache_lengths, k_block, v_block, *,
                          sm_scale: float | None = None, interpret: bool = False, **tuning):
  """Dense attention of a block over its cache rows [0, length) and over the block itself.

  Args:
    q: [batch, block, q_heads, head_dim]; query head h*G + g uses KV head h.
    k_cache, v_cache: [batch, kv_heads, capacity, head_dim].
    cache_lengths: int32 [batch], valid cache rows per sequence (0..capacity).
    k_block, v_block: [batch, block, kv_heads, head_dim], always attended.
    sm_scale: logit scale, default 1/sqrt(head_dim).
    interpret: run the kernel in Pallas' TPU interpreter (CPU) instead of lowering with Mosaic.
    **tuning: block_k (cache rows per DMA tile, default DEFAULT_BLOCK_K; fitted to a divisor of
      the capacity), num_splits (programs per (sequence, KV head), default 1; more only helps
      a megacore chip with fewer pairs than cores).

  Returns:
    [batch, block, q_heads, head_dim] in q.dtype (softmax in float32).
  """
  batch, _, _, _, head_dim = tu.check_block_attention_inputs(q, k_cache, v_cache, k_block,
                                                             v_block, "k_cache")
  _check_lengths(cache_lengths, batch)
  tu.check_tuning(tuning, _ATTENTION_TUNING, "exact_block_attention")
  num_splits = tuning.get("num_splits", 1)
  mu.check_num_splits(num_splits)
  return _split_kv_attention(
      q, k_cache, v_cache, cache_lengths, k_block, v_block,
      sm_scale=_resolve_scale(sm_scale, head_dim), interpret=bool(interpret),
      block_k=tuning.get("block_k", DEFAULT_BLOCK_K), num_splits=num_splits, with_lse=False)


def mask_step_attention(q, k_cache, v_cache, cache_lengths, k_block, v_block, *,
                        sm_scale: float | None = None, alpha_includes_block: bool = True,
                        interpret: bool = False, **tuning):
  """`exact_block_attention` plus MAGE's per-row attention mass alpha.

  alpha[b, h, j] = 1/(G*B) * sum over the G query heads of KV head h and the B block queries of
  p[query, j]. p normalises over the cache rows and the block's keys when alpha_includes_block,
  else over the cache rows only (alpha then sums to 1 per (b, h) when the length is > 0). The
  output always uses the full softmax.

  Args:
    q, k_cache, v_cache, cache_lengths, k_block, v_block, sm_scale, interpret: as for
      `exact_block_attention`.
    alpha_includes_block: whether the block's own keys enter alpha's normaliser.
    **tuning: the keywords of `exact_block_attention`, and alpha_block_k (cache rows per tile of
      the alpha pass, default DEFAULT_BLOCK_K).

  Returns:
    (out [batch, block, q_heads, head_dim] in q.dtype, alpha float32 [batch, kv_heads,
    capacity], exactly 0 at rows >= cache_lengths).
  """
  batch, _, _, _, head_dim = tu.check_block_attention_inputs(q, k_cache, v_cache, k_block,
                                                             v_block, "k_cache")
  _check_lengths(cache_lengths, batch)
  tu.check_tuning(tuning, _ATTENTION_TUNING + _ALPHA_TUNING, "mask_step_attention")
  num_splits = tuning.get("num_splits", 1)
  mu.check_num_splits(num_splits)
  return _mask_step(
      q, k_cache, v_cache, cache_lengths, k_block, v_block,
      sm_scale=_resolve_scale(sm_scale, head_dim),
      alpha_includes_block=bool(alpha_includes_block), interpret=bool(interpret),
      block_k=tuning.get("block_k", DEFAULT_BLOCK_K), num_splits=num_splits,
      alpha_block_k=tuning.get("alpha_block_k", DEFAULT_BLOCK_K))


__all__ = ["exact_block_attention", "mask_step_attention", "exact_block_attention_reference",
           "mask_step_attention_reference"]
