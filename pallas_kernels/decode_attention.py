"""Dense attention of a block of queries over a KV cache, and MAGE's mask-step statistics.

A block-diffusion step attends B block tokens (all query heads of a KV group at once) over the
cache rows [0, cache_length) and over the block's own keys. On the GPU this is the split-KV
(flash-decoding) kernel of `_triton_utils`: the G*B queries of one KV head form one query tile
(or a few 64-row tiles whose programs run side by side and share each K/V tile through L2), so
each K/V row is read from memory once per step, and the cache rows are shared out over many
programs whose partial softmax results are merged afterwards.

`mask_step_attention` also returns MAGE's selection statistic alpha (the block-and-group-average
attention probability of every cache row). alpha needs each query's final normaliser, which is
known only after all rows were seen, so it takes a second pass: the split merge that combines the
attention pass's partial results also writes every query's log-sum-exp (over the cache rows alone
if the block's keys stay out of alpha), and a lighter pass re-reads only K to turn scores into
probabilities, sum them over the queries and write alpha = 0 past the length. That pass does
exactly half the attention pass's useful matmul work (one score per query and key) and one 2^x
per score, so the mask step takes 1 + 0.5 x (attention's matmul rate / alpha's) of the exact
step: 1.55x at batch 1 and 1.39x at batch 8 on the H100, where both kernels are latency-bound
(benchmarks/results/decode_kernels.md, sessions 10-11, has the measured rates and counters).
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

# Tuning keywords and their defaults (None: chosen from the shapes; see the entry points).
_ATTENTION_TUNING = dict(block_k=64, block_q=None, num_splits=None, num_warps=None, num_stages=3,
                         merge="auto")
_ALPHA_TUNING = dict(alpha_block_k=64, alpha_num_splits=None, alpha_num_warps=4,
                     alpha_num_stages=3)


def _attention_kernel(lengths_ref, q_ref, k_ref, v_ref, k_block_ref, v_block_ref,
                      out_ref, lse_ref, *, kv_heads: int, group: int, block_tokens: int,
                      block_q: int, num_splits: int, block_k: int, qk_scale: float, exp2):
  """One (query tile, batch, KV head, split) program; split == num_splits attends the block's
  own keys."""
  kv_head, split = pl.program_id(2), pl.program_id(3)
  capacity, head_dim = k_ref.shape
  rows = tu.query_rows(kv_head, kv_heads, group, block_tokens, block_q,
                       first=pl.program_id(0) * block_q)
  q = q_ref[rows, :]
  state = tu.initial_state(block_q, head_dim)

  def attend_block():
    return tu.attend_block_keys(state, q, k_block_ref, v_block_ref, kv_head, kv_heads,
                                block_tokens, qk_scale, exp2=exp2)

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

    return tu.attend_rows(state, q, num_rows, block_k, load_tile, qk_scale, exp2=exp2)

  state = lax.cond(split == num_splits, attend_block, attend_cache)
  tu.store_partial(state, out_ref, lse_ref, rows)


def _alpha_kernel(lengths_ref, q_ref, k_ref, lse_ref, alpha_ref, *, kv_heads: int, group: int,
                  block_tokens: int, num_splits: int, block_k: int, qk_scale: float, exp2):
  """Column sums of the final probabilities over the real query rows, for this split's rows."""
  kv_head, split = pl.program_id(1), pl.program_id(2)
  capacity = k_ref.shape[0]
  # Per piece of the query rows: the queries and their log-sum-exp, +inf for the repeats past
  # G*B (whose probabilities 2^(s - inf) are then 0), so every real query has the same weight
  # 1/(G*B), applied once per key instead of once per score.
  pieces = []
  for first, size in tu.query_parts(group * block_tokens):
    rows = tu.query_rows(kv_head, kv_heads, group, block_tokens, size, first)
    lse = jnp.where(tu.real_query_mask(group, block_tokens, size, first), lse_ref[rows],
                    jnp.inf)
    pieces.append((q_ref[rows, :], lse))
  length = jnp.minimum(lengths_ref[0], capacity)
  start, num_rows = tu.split_range(split, num_splits, length, block_k)

  def column_mass(k):
    # Keys on the rows of the score tile: the sum over queries then stays inside each warp
    # (the rows of a dot's result are spread over warps, its columns over a warp's lanes).
    mass = jnp.zeros((k.shape[0],), jnp.float32)
    for q, lse in pieces:
      mass += jnp.sum(exp2(tu.scores_of(k, q) * qk_scale - lse[None, :]), axis=1)
    return mass * (1.0 / (group * block_tokens))

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

  # Rows [length, rows of alpha) get alpha = 0, shared out over the splits like the cache rows,
  # so that no XLA pass over the whole capacity has to mask them afterwards.
  tail = alpha_ref.shape[0] - length
  tail_start, tail_rows = tu.split_range(split, num_splits, tail, block_k)

  def zero_tile(i, carry):
    first = i * block_k
    rows = pl.ds(length + tail_start + first, block_k)
    valid = first + jnp.arange(block_k) < tail_rows
    plt.store(alpha_ref.at[rows], jnp.zeros((block_k,), jnp.float32), mask=valid)
    return carry

  lax.fori_loop(0, pl.cdiv(tail_rows, block_k), zero_tile, 0)


# (sequence, KV head) pairs from which one full query tile per pair beats 64-row tiles.
FULL_TILE_MIN_PAIRS = 16


def _default_block_q(query_rows: int, pairs: int) -> int:
  """Query rows per program for ``pairs`` = batch x KV heads.

  Few pairs (batch 1-2): 64-row tiles where they cover the G*B rows with fewer padded rows than
  one power-of-two tile (1.5B: 192 = 3 x 64 instead of 256; 30 vs 46 us at 32K, 79 vs 98 us at
  128K, batch 1), else one tile: extra tiles then only re-read K/V (7B: 224 rows as 4 x 64
  measured 218 vs 180 us wall). From FULL_TILE_MIN_PAIRS pairs on, the grid is full without
  query tiles and reading K/V once per split wins: 1.5B batch 8, one 256-row tile, 173 vs 181 us
  at 32K and 590 vs 676 us at 128K (H100, benchmarks/decode_kernels.py --mode=sweep_exact).
  Batches 3-7 are not measured and keep the 64-row tiles."""
  tile_rows = tu.next_power_of_two(query_rows)
  if pairs >= FULL_TILE_MIN_PAIRS:
    return tile_rows
  return 64 if pl.cdiv(query_rows, 64) * 64 < tile_rows else tile_rows


def default_attention_splits(pairs: int, q_tiles: int, block_q: int, capacity: int,
                             block_k: int) -> int:
  """Splits of the attention kernel for ``pairs`` = batch x KV heads.

  A grid of about two programs per SM (TARGET_PROGRAMS), except for 256-row query tiles with
  few pairs (the full tile chosen because 64-row tiles would not pad less, 7B at batch 1-3): one
  wave (TARGET_PROGRAMS_FULL_TILE; an 8-warp 256-row program fills an SM), since each split is
  then short and a second wave adds its tail. H100, device us of the exact call (kernel + merge;
  benchmarks/results/decode_kernels.md, session 9): 7B b1 16K / 32K / 64K / 128K 32.0 / 49.5 /
  85.3 / 158.3 with one wave (33 splits) against 43.6 / 61.2 / 96.9 / 167.5 (65 splits). From
  FULL_TILE_MIN_PAIRS pairs on the splits are long and one wave was slower: 7B b8 198 / 380 /
  768 / 1492 against 185 / 340 / 652 / 1261 us."""
  one_wave = block_q >= 256 and pairs < FULL_TILE_MIN_PAIRS
  target = tu.TARGET_PROGRAMS_FULL_TILE if one_wave else tu.TARGET_PROGRAMS
  return tu.default_num_splits(pairs * q_tiles, capacity, block_k, target=target)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "block_k", "block_q",
                                             "num_splits", "num_warps", "num_stages", "merge",
                                             "lse_of"))
def _split_kv_attention(q, k_cache, v_cache, cache_lengths, k_block, v_block, *,
                        sm_scale: float, interpret: bool, block_k: int, block_q: int | None,
                        num_splits: int | None, num_warps: int | None, num_stages: int,
                        merge: str, lse_of: str | None = None):
  """Runs the attention kernel and the merge.

  Returns the output, and with ``lse_of`` ("all": the cache and the block's keys, "cache": the
  cache rows only) the pair (out, float32 [batch, block * q_heads] base-2 log-sum-exp of every
  query in the [B*Hq] row order, -inf where no key was seen), computed by the merge."""
  batch, block, q_heads, _ = q.shape
  kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
  rows, pairs = q_heads // kv_heads * block, batch * kv_heads
  block_q, q_tiles = tu.query_tiling(
      rows, _default_block_q(rows, pairs) if block_q is None else block_q)
  block_k = tu.fit_block_k(block_k, capacity)
  k_cache, v_cache = tu.pad_rows(k_cache, 2), tu.pad_rows(v_cache, 2)
  if num_splits is None:
    num_splits = default_attention_splits(pairs, q_tiles, block_q, k_cache.shape[2], block_k)
  splits = num_splits + 1
  lengths = cache_lengths.astype(jnp.int32).reshape(batch, 1)
  partial_out, partial_lse = tu.split_kv_call(
      _attention_kernel, [(lengths, pl.BlockSpec((None, 1), lambda t, b, h, s: (b, 0)))], q,
      k_cache, v_cache, k_block, v_block, block_q=block_q, block_k=block_k,
      num_splits=num_splits, grid_splits=splits, sm_scale=sm_scale, num_warps=num_warps,
      num_stages=num_stages, interpret=interpret, name="block_split_kv_attention")
  # The last split holds the block's keys: leaving it out gives the cache-only normaliser.
  lse_splits = {None: None, "all": splits, "cache": num_splits}[lse_of]
  merged = merge_splits.merge(partial_out, partial_lse, how=merge, interpret=interpret,
                              out_dtype=q.dtype, lse_splits=lse_splits)
  if lse_of is None:
    return merged.reshape(q.shape)
  out, lse = merged
  return out.reshape(q.shape), lse


def default_alpha_splits(pairs: int, capacity: int, block_k: int) -> int:
  """Splits of the alpha pass for ``pairs`` = batch x KV heads: the attention pass's grid of
  about two programs per SM, all of them over cache rows (it has no block program)."""
  return tu.default_num_splits(pairs, capacity, block_k) + 1


@functools.partial(jax.jit, static_argnames=("sm_scale", "alpha_includes_block", "interpret",
                                             "block_k", "block_q", "num_splits", "num_warps",
                                             "num_stages", "merge", "alpha_block_k",
                                             "alpha_num_splits", "alpha_num_warps",
                                             "alpha_num_stages"))
def _mask_step(q, k_cache, v_cache, cache_lengths, k_block, v_block, *, sm_scale: float,
               alpha_includes_block: bool, interpret: bool, block_k: int, block_q: int | None,
               num_splits: int | None, num_warps: int | None, num_stages: int, merge: str,
               alpha_block_k: int, alpha_num_splits: int | None,
               alpha_num_warps: int, alpha_num_stages: int):
  batch, block, q_heads, head_dim = q.shape
  kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
  group = q_heads // kv_heads
  # lse is -inf only for a sequence with no cache row, for which the alpha pass computes nothing.
  out, lse = _split_kv_attention(
      q, k_cache, v_cache, cache_lengths, k_block, v_block, sm_scale=sm_scale,
      interpret=interpret, block_k=block_k, block_q=block_q, num_splits=num_splits,
      num_warps=num_warps, num_stages=num_stages, merge=merge,
      lse_of="all" if alpha_includes_block else "cache")
  alpha_block_k = tu.fit_block_k(alpha_block_k, capacity)
  padded_capacity = max(capacity, 16)
  if alpha_num_splits is None:
    alpha_num_splits = default_alpha_splits(batch * kv_heads, capacity, alpha_block_k)
  kernel = functools.partial(_alpha_kernel, kv_heads=kv_heads, group=group, block_tokens=block,
                             num_splits=alpha_num_splits, block_k=alpha_block_k,
                             qk_scale=sm_scale * tu.LOG2_E, exp2=tu.kernel_exp2(interpret))
  alpha = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, alpha_num_splits),
      in_specs=[
          pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),
          pl.BlockSpec((None, block * q_heads, head_dim), lambda b, h, s: (b, 0, 0)),
          pl.BlockSpec((None, None, padded_capacity, head_dim), lambda b, h, s: (b, h, 0, 0)),
          pl.BlockSpec((None, block * q_heads), lambda b, h, s: (b, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, padded_capacity), lambda b, h, s: (b, h, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, kv_heads, padded_capacity), jnp.float32),
      compiler_params=tu.compiler_params(alpha_num_warps, alpha_num_stages),
      interpret=interpret,
      name="block_attention_alpha",
  )(cache_lengths.astype(jnp.int32).reshape(batch, 1),
    q.reshape(batch, block * q_heads, head_dim), tu.pad_rows(k_cache, 2), lse)
  # The kernel wrote every row, zeros at and past the length; a cache of < 16 rows was padded.
  return out, alpha[:, :, :capacity]


def _resolve_scale(sm_scale: float | None, head_dim: int) -> float:
  return float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(head_dim)


def _check_lengths(cache_lengths, batch: int) -> None:
  if cache_lengths.shape != (batch,):
    raise ValueError(f"cache_lengths must have shape ({batch},), got {cache_lengths.shape}")


def _dispatch(entry_point: str, defaults: dict, kernel, reference, args: tuple, sm_scale, impl,
              tuning: dict, **options):
  """Runs ``entry_point`` (exact or mask step; ``args``: its six arrays, ``options``: its own
  keywords) as ``impl`` says: the TPU kernel of the same name, ``reference`` off the GPU, else
  the Triton ``kernel`` with the tuning ``defaults`` overridden by ``tuning``."""
  impl = resolve_impl(impl)
  if impl in MOSAIC:
    from pallas_kernels.tpu import decode_attention as tpu  # imports this module
    return getattr(tpu, entry_point)(*args, sm_scale=sm_scale,
                                     interpret=impl == "mosaic_interpret", **options, **tuning)
  q, k_cache, v_cache, cache_lengths, k_block, v_block = args
  batch, _, _, _, head_dim = tu.check_block_attention_inputs(q, k_cache, v_cache, k_block,
                                                             v_block, "k_cache")
  _check_lengths(cache_lengths, batch)
  tu.check_tuning(tuning, defaults, entry_point)
  sm_scale = _resolve_scale(sm_scale, head_dim)
  if impl in PLAIN_JAX:
    return reference(*args, sm_scale=sm_scale, **options)
  tu.check_kernel_head_dim(head_dim)
  return kernel(*args, sm_scale=sm_scale, interpret=impl == "interpret", **options,
                **{**defaults, **tuning})


def exact_block_attention(q, k_cache, v_cache, cache_lengths, k_block, v_block, *,
                          sm_scale: float | None = None, impl: str = "auto", **tuning):
  """Dense attention of a block over its cache rows [0, length) and over the block itself.

  Args:
    q: [batch, block, q_heads, head_dim]; query head h*G + g uses KV head h.
    k_cache, v_cache: [batch, kv_heads, capacity, head_dim].
    cache_lengths: int32 [batch], valid cache rows per sequence (0..capacity).
    k_block, v_block: [batch, block, kv_heads, head_dim], always attended.
    sm_scale: logit scale, default 1/sqrt(head_dim).
    impl: a resolved implementation or a setting (see `pallas_kernels.dispatch`); "mosaic" /
      "mosaic_interpret" run pallas_kernels.tpu.decode_attention, whose tuning keywords differ.
    **tuning: block_k (keys per tile, default 64), block_q (query rows per program, default
      `_default_block_q`), num_splits (programs per KV head and query tile, default
      `default_attention_splits`), num_warps (default 8 for tiles of >= 256 query rows, else
      4), num_stages (default 3), merge (how the splits' partial results are merged: "pallas",
      one kernel, "xla", three ops, or "auto", the default: the kernel for at most
      merge_splits.PALLAS_MAX_ROWS query rows). benchmarks/results/decode_kernels.md has the
      sweeps.

  Returns:
    [batch, block, q_heads, head_dim] in q.dtype (softmax in float32).
  """
  args = (q, k_cache, v_cache, cache_lengths, k_block, v_block)
  return _dispatch("exact_block_attention", _ATTENTION_TUNING, _split_kv_attention,
                   exact_block_attention_reference, args, sm_scale, impl, tuning)


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
      alpha_num_splits, alpha_num_warps (default 4), alpha_num_stages (default 3) for the alpha
      pass.

  Returns:
    (out [batch, block, q_heads, head_dim] in q.dtype, alpha float32 [batch, kv_heads,
    capacity], exactly 0 at rows >= cache_lengths).
  """
  args = (q, k_cache, v_cache, cache_lengths, k_block, v_block)
  return _dispatch("mask_step_attention", {**_ATTENTION_TUNING, **_ALPHA_TUNING}, _mask_step,
                   mask_step_attention_reference, args, sm_scale, impl, tuning,
                   alpha_includes_block=alpha_includes_block)


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
