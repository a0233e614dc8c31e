"""Dense attention of a block of queries over a KV cache, and MAGE's mask-step statistics.

A block-diffusion step attends B block tokens (all query heads of a KV group at once) over the
cache rows [0, cache_length) and over the block's own keys. On the GPU this is the split-KV
(flash-decoding) kernel of `_triton_utils`: the G*B queries of one KV head form one query tile,
so each K/V row is read from memory once per step, and the cache rows are shared out over many
programs whose partial softmax results are merged afterwards.

`mask_step_attention` also returns MAGE's selection statistic alpha (the block-and-group-average
attention probability of every cache row). alpha needs each query's final normaliser, which is
known only after all rows were seen, so it takes a second pass: the attention pass stores every
query's log-sum-exp, and a lighter pass re-reads only K to turn scores into probabilities and sum
them over the queries (benchmarks/results/decode_kernels.md has the measured cost).
"""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _triton_utils as tu
from pallas_kernels.dispatch import resolve_impl

_ATTENTION_TUNING = ("block_k", "num_splits", "num_warps", "num_stages")
_ALPHA_TUNING = ("alpha_block_k", "alpha_num_splits", "alpha_num_warps", "alpha_num_stages")


def _attention_kernel(lengths_ref, q_ref, k_ref, v_ref, k_block_ref, v_block_ref,
                      out_ref, lse_ref, *, num_splits: int, block_k: int, block_tokens: int,
                      qk_scale: float):
  """One (batch, KV head, split) program; split == num_splits attends the block's own keys."""
  split = pl.program_id(2)
  capacity, head_dim = k_ref.shape
  q = q_ref[...]
  state = tu.initial_state(q.shape[0], head_dim)

  def attend_block():
    return tu.attend_block_keys(state, q, k_block_ref, v_block_ref, block_tokens, qk_scale)

  def attend_cache():
    length = jnp.minimum(lengths_ref[0], capacity)
    start, num_rows = tu.split_range(split, num_splits, length, block_k)

    def load_tile(first, valid):
      rows = pl.ds(start + first, block_k)
      if valid is None:
        return k_ref[rows, :], v_ref[rows, :]
      mask = valid[:, None]
      return (plt.load(k_ref.at[rows, :], mask=mask, other=0.0),
              plt.load(v_ref.at[rows, :], mask=mask, other=0.0))

    return tu.attend_rows(state, q, num_rows, block_k, load_tile, qk_scale)

  state = lax.cond(split == num_splits, attend_block, attend_cache)
  tu.store_partial(state, out_ref, lse_ref)


def _alpha_kernel(lengths_ref, q_ref, k_ref, lse_ref, alpha_ref, *, num_splits: int,
                  block_k: int, query_rows: int, qk_scale: float):
  """Column sums of the final probabilities over the real query rows, for this split's rows."""
  split = pl.program_id(2)
  capacity = k_ref.shape[0]
  q = q_ref[...]
  lse = lse_ref[...]
  # Padded query rows get weight 0; real ones 1/(G*B), so alpha is the group-and-block mean.
  row_weight = jnp.where(jnp.arange(q.shape[0]) < query_rows, 1.0 / query_rows, 0.0)
  length = jnp.minimum(lengths_ref[0], capacity)
  start, num_rows = tu.split_range(split, num_splits, length, block_k)

  def column_mass(k):
    scores = tu.scores_of(q, k) * qk_scale
    probs = jnp.exp2(scores - lse[:, None])
    return jnp.sum(probs * row_weight[:, None], axis=0)

  def full_tile(i, carry):
    rows = pl.ds(start + i * block_k, block_k)
    alpha_ref[rows] = column_mass(k_ref[rows, :])
    return carry

  def last_tile(i, carry):
    rows = pl.ds(start + i * block_k, block_k)
    valid = i * block_k + jnp.arange(block_k) < num_rows
    k = plt.load(k_ref.at[rows, :], mask=valid[:, None], other=0.0)
    plt.store(alpha_ref.at[rows], column_mass(k), mask=valid)
    return carry

  full_tiles = num_rows // block_k
  lax.fori_loop(0, full_tiles, full_tile, 0)
  lax.fori_loop(full_tiles, pl.cdiv(num_rows, block_k), last_tile, 0)


def _default_warps(tile_rows: int) -> int:
  return 8 if tile_rows >= 256 else 4


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "block_k", "num_splits",
                                             "num_warps", "num_stages"))
def _split_kv_attention(q, k_cache, v_cache, cache_lengths, k_block, v_block, *,
                        sm_scale: float, interpret: bool, block_k: int, num_splits: int | None,
                        num_warps: int | None, num_stages: int):
  """Runs the attention kernel; returns (out, packed queries, per-split out and lse)."""
  batch, block, q_heads, head_dim = q.shape
  kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
  group = q_heads // kv_heads
  tile_rows = tu.next_power_of_two(group * block)
  block_rows = tu.next_power_of_two(block)
  block_k = tu.fit_block_k(block_k, capacity)
  k_cache, v_cache = tu.pad_rows(k_cache, 2), tu.pad_rows(v_cache, 2)
  capacity = k_cache.shape[2]
  if num_splits is None:
    num_splits = tu.default_num_splits(batch * kv_heads, capacity, block_k)
  packed_q = tu.pack_queries(q, kv_heads, tile_rows)
  kernel = functools.partial(_attention_kernel, num_splits=num_splits, block_k=block_k,
                             block_tokens=block, qk_scale=sm_scale * tu.LOG2_E)
  per_head = lambda b, h, s: (b, h, 0, 0)
  partial_out, partial_lse = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, num_splits + 1),
      in_specs=[
          pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),
          pl.BlockSpec((None, None, tile_rows, head_dim), per_head),
          pl.BlockSpec((None, None, capacity, head_dim), per_head),
          pl.BlockSpec((None, None, capacity, head_dim), per_head),
          pl.BlockSpec((None, None, block_rows, head_dim), per_head),
          pl.BlockSpec((None, None, block_rows, head_dim), per_head),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, tile_rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, tile_rows), lambda b, h, s: (b, h, s, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, kv_heads, num_splits + 1, tile_rows, head_dim), q.dtype),
          jax.ShapeDtypeStruct((batch, kv_heads, num_splits + 1, tile_rows), jnp.float32),
      ],
      compiler_params=tu.compiler_params(num_warps or _default_warps(tile_rows), num_stages),
      interpret=interpret,
      name="block_split_kv_attention",
  )(cache_lengths.astype(jnp.int32).reshape(batch, 1), packed_q, k_cache, v_cache,
    tu.pack_block_keys(k_block, block_rows), tu.pack_block_keys(v_block, block_rows))
  out, lse = tu.combine_partials(partial_out, partial_lse)
  out = tu.unpack_queries(out, block, group).astype(q.dtype)
  return out, packed_q, partial_out, partial_lse, lse


@functools.partial(jax.jit, static_argnames=("sm_scale", "alpha_includes_block", "interpret",
                                             "block_k", "num_splits", "num_warps", "num_stages",
                                             "alpha_block_k", "alpha_num_splits",
                                             "alpha_num_warps", "alpha_num_stages"))
def _mask_step(q, k_cache, v_cache, cache_lengths, k_block, v_block, *, sm_scale: float,
               alpha_includes_block: bool, interpret: bool, block_k: int,
               num_splits: int | None, num_warps: int | None, num_stages: int,
               alpha_block_k: int, alpha_num_splits: int | None,
               alpha_num_warps: int | None, alpha_num_stages: int):
  batch, block, q_heads, head_dim = q.shape
  kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
  out, packed_q, partial_out, partial_lse, lse = _split_kv_attention(
      q, k_cache, v_cache, cache_lengths, k_block, v_block, sm_scale=sm_scale,
      interpret=interpret, block_k=block_k, num_splits=num_splits, num_warps=num_warps,
      num_stages=num_stages)
  if not alpha_includes_block:
    # The last split holds the block's keys: dropping it leaves the cache-only normaliser.
    _, lse = tu.combine_partials(partial_out[:, :, :-1], partial_lse[:, :, :-1])
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  tile_rows = packed_q.shape[2]
  alpha_block_k = tu.fit_block_k(alpha_block_k, capacity)
  padded_capacity = max(capacity, 16)
  if alpha_num_splits is None:
    alpha_num_splits = tu.default_num_splits(batch * kv_heads, capacity, alpha_block_k)
  kernel = functools.partial(_alpha_kernel, num_splits=alpha_num_splits, block_k=alpha_block_k,
                             query_rows=(q_heads // kv_heads) * block,
                             qk_scale=sm_scale * tu.LOG2_E)
  per_head = lambda b, h, s: (b, h, 0, 0)
  alpha = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, alpha_num_splits),
      in_specs=[
          pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),
          pl.BlockSpec((None, None, tile_rows, head_dim), per_head),
          pl.BlockSpec((None, None, padded_capacity, head_dim), per_head),
          pl.BlockSpec((None, None, tile_rows), lambda b, h, s: (b, h, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, padded_capacity), lambda b, h, s: (b, h, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, kv_heads, padded_capacity), jnp.float32),
      compiler_params=tu.compiler_params(alpha_num_warps or _default_warps(tile_rows),
                                         alpha_num_stages),
      interpret=interpret,
      name="block_attention_alpha",
  )(cache_lengths.astype(jnp.int32).reshape(batch, 1), packed_q, tu.pad_rows(k_cache, 2), lse)
  # Rows at or past the length were never written by the kernel.
  valid = jnp.arange(capacity)[None, None, :] < cache_lengths[:, None, None]
  return out, jnp.where(valid, alpha[:, :, :capacity], 0.0)


def _resolve_scale(sm_scale: float | None, head_dim: int) -> float:
  return float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(head_dim)


def _check_lengths(cache_lengths, batch: int) -> None:
  if cache_lengths.shape != (batch,):
    raise ValueError(f"cache_lengths must have shape ({batch},), got {cache_lengths.shape}")


def exact_block_attention(q, k_cache, v_cache, cache_lengths, k_block, v_block, *,
                          sm_scale: float | None = None, impl: str = "auto", **tuning):
  """Dense attention of a block over its cache rows [0, length) and over the block itself.

  Args:
    q: [batch, block, q_heads, head_dim]; query head h*G + g uses KV head h.
    k_cache, v_cache: [batch, kv_heads, capacity, head_dim].
    cache_lengths: int32 [batch], valid cache rows per sequence (0..capacity).
    k_block, v_block: [batch, block, kv_heads, head_dim], always attended.
    sm_scale: logit scale, default 1/sqrt(head_dim).
    impl: "auto", "pallas", "interpret" or "reference" (see `dispatch.resolve_impl`).
    **tuning: block_k (keys per tile, default 64), num_splits (programs per KV head, default
      enough for ~two waves), num_warps (default 8 for tiles of >= 256 query rows, else 4),
      num_stages (default 3: measured 107 vs 132 us at 128K, benchmarks/results).

  Returns:
    [batch, block, q_heads, head_dim] in q.dtype (softmax in float32).
  """
  batch, _, _, _, head_dim = tu.check_block_attention_inputs(q, k_cache, v_cache, k_block,
                                                             v_block, "k_cache")
  _check_lengths(cache_lengths, batch)
  tu.check_tuning(tuning, _ATTENTION_TUNING, "exact_block_attention")
  sm_scale = _resolve_scale(sm_scale, head_dim)
  impl = resolve_impl(impl)
  if impl == "reference":
    return exact_block_attention_reference(q, k_cache, v_cache, cache_lengths, k_block, v_block,
                                           sm_scale=sm_scale)
  tu.check_kernel_head_dim(head_dim)
  return _split_kv_attention(
      q, k_cache, v_cache, cache_lengths, k_block, v_block, sm_scale=sm_scale,
      interpret=impl == "interpret", block_k=tuning.get("block_k", 64),
      num_splits=tuning.get("num_splits"), num_warps=tuning.get("num_warps"),
      num_stages=tuning.get("num_stages", 3))[0]


def mask_step_attention(q, k_cache, v_cache, cache_lengths, k_block, v_block, *,
                        sm_scale: float | None = None, alpha_includes_block: bool = True,
                        impl: str = "auto", **tuning):
  """`exact_block_attention` plus MAGE's per-row attention mass alpha.

  alpha[b, h, j] = 1/(G*B) * sum over the G query heads of KV head h and the B block queries of
  p[query, j]. p normalises over the cache rows and the block's keys when alpha_includes_block
  (MAGE's "everything the query attends to"), else over the cache rows only, so that alpha sums
  to 1 per (b, h) when the length is > 0. The output always uses the full softmax.

  Args:
    q, k_cache, v_cache, cache_lengths, k_block, v_block, sm_scale, impl: as for
      `exact_block_attention`.
    alpha_includes_block: whether the block's own keys enter alpha's normaliser.
    **tuning: the keywords of `exact_block_attention`, and alpha_block_k (default 64),
      alpha_num_splits, alpha_num_warps, alpha_num_stages for the alpha pass.

  Returns:
    (out [batch, block, q_heads, head_dim] in q.dtype, alpha float32 [batch, kv_heads,
    capacity], exactly 0 at rows >= cache_lengths).
  """
  batch, _, _, _, head_dim = tu.check_block_attention_inputs(q, k_cache, v_cache, k_block,
                                                             v_block, "k_cache")
  _check_lengths(cache_lengths, batch)
  tu.check_tuning(tuning, _ATTENTION_TUNING + _ALPHA_TUNING, "mask_step_attention")
  sm_scale = _resolve_scale(sm_scale, head_dim)
  impl = resolve_impl(impl)
  if impl == "reference":
    return mask_step_attention_reference(q, k_cache, v_cache, cache_lengths, k_block, v_block,
                                         sm_scale=sm_scale,
                                         alpha_includes_block=alpha_includes_block)
  tu.check_kernel_head_dim(head_dim)
  return _mask_step(
      q, k_cache, v_cache, cache_lengths, k_block, v_block, sm_scale=sm_scale,
      alpha_includes_block=alpha_includes_block, interpret=impl == "interpret",
      block_k=tuning.get("block_k", 64), num_splits=tuning.get("num_splits"),
      num_warps=tuning.get("num_warps"), num_stages=tuning.get("num_stages", 3),
      alpha_block_k=tuning.get("alpha_block_k", 64),
      alpha_num_splits=tuning.get("alpha_num_splits"),
      alpha_num_warps=tuning.get("alpha_num_warps"),
      alpha_num_stages=tuning.get("alpha_num_stages", 2))


def _reference_logits(q, k_cache, k_block, sm_scale: float):
  """float32 logits [batch, kv_heads, G, block, capacity + block]: cache keys, then the block."""
  batch, block, q_heads, head_dim = q.shape
  kv_heads = k_cache.shape[1]
  grouped_q = q.reshape(batch, block, kv_heads, q_heads // kv_heads, head_dim)
  keys = jnp.concatenate([k_cache, k_block.transpose(0, 2, 1, 3)], axis=2)
  return jnp.einsum("bthgd,bhjd->bhgtj", grouped_q, keys, preferred_element_type=jnp.float32,
                    precision=lax.Precision.HIGHEST) * sm_scale


def _reference_key_mask(cache_lengths, capacity: int, block: int):
  """[batch, capacity + block] bool: cache rows below the length, and every block key."""
  positions = jnp.arange(capacity + block)[None, :]
  return (positions < cache_lengths[:, None]) | (positions >= capacity)


def _reference_output(probs, v_cache, v_block, dtype):
  values = jnp.concatenate([v_cache, v_block.transpose(0, 2, 1, 3)], axis=2)
  out = jnp.einsum("bhgtj,bhjd->bthgd", probs, values.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
  batch, block, kv_heads, group, head_dim = out.shape
  return out.reshape(batch, block, kv_heads * group, head_dim).astype(dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def exact_block_attention_reference(q, k_cache, v_cache, cache_lengths, k_block, v_block, *,
                                    sm_scale: float | None = None):
  """Plain-JAX dense masked attention: the definition `exact_block_attention` must match."""
  sm_scale = _resolve_scale(sm_scale, q.shape[-1])
  logits = _reference_logits(q, k_cache, k_block, sm_scale)
  mask = _reference_key_mask(cache_lengths, k_cache.shape[2], q.shape[1])[:, None, None, None]
  probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
  return _reference_output(probs, v_cache, v_block, q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "alpha_includes_block"))
def mask_step_attention_reference(q, k_cache, v_cache, cache_lengths, k_block, v_block, *,
                                  sm_scale: float | None = None,
                                  alpha_includes_block: bool = True):
  """Plain-JAX (out, alpha) of `mask_step_attention`, from the dense probability matrix."""
  sm_scale = _resolve_scale(sm_scale, q.shape[-1])
  capacity = k_cache.shape[2]
  logits = _reference_logits(q, k_cache, k_block, sm_scale)
  mask = _reference_key_mask(cache_lengths, capacity, q.shape[1])[:, None, None, None]
  probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
  out = _reference_output(probs, v_cache, v_block, q.dtype)
  if alpha_includes_block:
    cache_probs = probs[..., :capacity]
  else:
    cache_mask = mask[..., :capacity]
    cache_probs = jax.nn.softmax(jnp.where(cache_mask, logits[..., :capacity], -jnp.inf), -1)
    # A sequence with an empty cache has no cache softmax (all -inf gives NaN): alpha is 0.
    cache_probs = jnp.where(cache_mask, cache_probs, 0.0)
  alpha = jnp.mean(cache_probs, axis=(2, 3))
  return out, alpha
