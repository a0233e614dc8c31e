"""Block-diffusion flash attention: Pallas (Triton) forward and backward.

Block-diffusion models attend causally across blocks of tokens and
bidirectionally inside a block. Training feeds the doubled sequence
``[x_t | x_0]`` (noisy half, clean half); prefill feeds clean tokens only. Both
are described per token by a block id and a noisy flag (``TokenBlocks``):

* a clean query sees clean keys with ``kv_block <= q_block``;
* a noisy query sees noisy keys of its own block and clean keys with
  ``kv_block < q_block``;
* keys at positions ``>= kv_lengths[b]`` are never attended; a query that sees
  no key outputs 0 with ``lse = -inf``.

The kernels never look at positions: the mask comes from the ids alone, so a
prefill chunk can attend to a longer cache. Work is skipped at tile level: in
XLA, each (query tile, key tile) pair is classified from per-tile min/max ids as
invisible, fully visible or partially visible, and the kernels walk a per-tile
list of visible tiles, the fully visible ones first and without any masking.
The classification is conservative for any layout (it never drops a visible
pair); it is exact when block ids are nondecreasing within each noisy/clean
segment, as in prefill and in the doubled training sequence, so there nothing
masked is ever computed beyond the partial tiles on block boundaries.

Block ids must lie in ``[0, 2**30)``; larger values are reserved for padding.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import _triton_utils as tu
from pallas_kernels import dispatch

_LN2 = math.log(2.0)
# Clean-key id of padding and of keys past kv_lengths: above any real block id,
# so `kv_block <= threshold` never holds for them.
_INVALID_ID = 2**30
# Noisy ids of tokens that are not noisy: negative and different for queries
# and keys, so `kv_noisy_id == q_noisy_id` never holds for them.
_NOT_NOISY_Q = -2
_NOT_NOISY_KV = -3
_EMPTY_MIN = 2**31 - 1
_EMPTY_MAX = -(2**31 - 1)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


class TokenBlocks(NamedTuple):
  """Per-token block structure of a sequence.

  Attributes:
    block_ids: int32 [batch, len], the diffusion block each token belongs to,
      in ``[0, 2**30)``.
    noisy: bool [batch, len], True for a noisy (x_t) token, False for a clean
      (x_0) one.
  """

  block_ids: jax.Array
  noisy: jax.Array


def prefill_token_blocks(batch: int, length: int, block_size: int, start: int = 0) -> TokenBlocks:
  """Clean tokens at positions ``start .. start + length - 1``."""
  ids = (start + jnp.arange(length, dtype=jnp.int32)) // block_size
  ids = jnp.broadcast_to(ids, (batch, length))
  return TokenBlocks(ids, jnp.zeros((batch, length), jnp.bool_))


def training_token_blocks(batch: int, seq_len: int, block_size: int) -> TokenBlocks:
  """The doubled training sequence: ``seq_len`` noisy, then clean tokens."""
  ids = jnp.arange(seq_len, dtype=jnp.int32) // block_size
  ids = jnp.broadcast_to(jnp.concatenate([ids, ids]), (batch, 2 * seq_len))
  noisy = jnp.arange(2 * seq_len) < seq_len
  return TokenBlocks(ids, jnp.broadcast_to(noisy, (batch, 2 * seq_len)))


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Tile shapes and Triton launch settings of the three kernels.

  The forward and dq kernels walk key tiles for a query tile; the dk/dv kernel
  walks query tiles (of every query head of its group) for a key tile. The
  defaults won a sweep at head_dim 128, 32K tokens on an H100 (see
  benchmarks/flash_attention.py --sweep and benchmarks/results/).
  """

  block_q: int = 128
  block_kv: int = 64
  num_warps: int = 4
  num_stages: int = 3
  dq_block_q: int = 64
  dq_block_kv: int = 64
  dq_num_warps: int = 4
  dq_num_stages: int = 3
  dkv_block_q: int = 64
  dkv_block_kv: int = 128
  dkv_num_warps: int = 8
  dkv_num_stages: int = 2

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name.endswith(("block_q", "block_kv")):
        if value < 16 or value & (value - 1):
          raise ValueError(f"tuning {field.name} must be a power of 2 >= 16 (Triton dots need "
                           f"dims >= 16), got {value}")
      elif value < 1:
        raise ValueError(f"tuning {field.name} must be positive, got {value}")

  def fit(self, q_len: int, kv_len: int) -> "TileConfig":
    """Shrinks tiles larger than the (power-of-2 rounded) sequence lengths."""
    q_cap, kv_cap = tu.next_power_of_two(q_len), tu.next_power_of_two(kv_len)
    changes = {}
    for field in dataclasses.fields(self):
      if field.name.endswith("block_q"):
        changes[field.name] = min(getattr(self, field.name), q_cap)
      elif field.name.endswith("block_kv"):
        changes[field.name] = min(getattr(self, field.name), kv_cap)
    return dataclasses.replace(self, **changes)


def _validate(q, k, v, q_segments, kv_segments, kv_lengths) -> None:
  """Raises ValueError naming the offending tensor."""
  if q.ndim != 4:
    raise ValueError(f"q must be [batch, q_len, q_heads, head_dim], got {q.shape}")
  for name, x in (("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, kv_len, kv_heads, head_dim], got {x.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have one shape, got {k.shape} and {v.shape}")
  batch, q_len, q_heads, head_dim = q.shape
  _, kv_len, kv_heads, _ = k.shape
  if k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(f"k must match q in batch and head_dim, got k {k.shape}, q {q.shape}")
  if q_heads % kv_heads:
    raise ValueError(f"q_heads ({q_heads}) must be a multiple of the kv_heads of k ({kv_heads})")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in (jnp.float32, jnp.bfloat16):
      raise ValueError(f"{name} must be float32 or bfloat16, got {x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  for name, seg, length in (("q_segments", q_segments, q_len),
                            ("kv_segments", kv_segments, kv_len)):
    if not isinstance(seg, TokenBlocks):
      raise ValueError(f"{name} must be a TokenBlocks, got {type(seg)}")
    if seg.block_ids.shape != (batch, length):
      raise ValueError(f"{name}.block_ids must be [{batch}, {length}], got "
                       f"{seg.block_ids.shape}")
    if not jnp.issubdtype(seg.block_ids.dtype, jnp.integer):
      raise ValueError(f"{name}.block_ids must be integer, got {seg.block_ids.dtype}")
    if seg.noisy.shape != (batch, length) or seg.noisy.dtype != jnp.bool_:
      raise ValueError(f"{name}.noisy must be bool [{batch}, {length}], got "
                       f"{seg.noisy.dtype} {seg.noisy.shape}")
  if kv_lengths.shape != (batch,) or not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
    raise ValueError(f"kv_lengths must be integer [{batch}], got {kv_lengths.dtype} "
                     f"{kv_lengths.shape}")


def block_diffusion_mask(q_segments: TokenBlocks, kv_segments: TokenBlocks,
                         kv_lengths: jax.Array) -> jax.Array:
  """The attention mask, bool [batch, q_len, kv_len] (True = attended)."""
  q_ids = q_segments.block_ids[:, :, None]
  q_noisy = q_segments.noisy[:, :, None]
  kv_ids = kv_segments.block_ids[:, None, :]
  kv_noisy = kv_segments.noisy[:, None, :]
  clean_query = ~q_noisy & ~kv_noisy & (kv_ids <= q_ids)
  noisy_query = q_noisy & ((kv_noisy & (kv_ids == q_ids)) | (~kv_noisy & (kv_ids < q_ids)))
  kv_len = kv_segments.block_ids.shape[1]
  in_range = jnp.arange(kv_len)[None, None, :] < kv_lengths[:, None, None]
  return (clean_query | noisy_query) & in_range


def block_diffusion_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, q_segments: TokenBlocks, kv_segments: TokenBlocks,
    kv_lengths: jax.Array, *, sm_scale: float | None = None,
    return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Dense masked attention in float32; same contract as the kernel."""
  _validate(q, k, v, q_segments, kv_segments, kv_lengths)
  batch, q_len, q_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  groups = q_heads // kv_heads
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(head_dim)
  qg = q.astype(jnp.float32).reshape(batch, q_len, kv_heads, groups, head_dim)
  logits = sm_scale * jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32),
                                 precision=lax.Precision.HIGHEST)
  mask = block_diffusion_mask(q_segments, kv_segments, kv_lengths)
  logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  # Rows that see no key: shift by 0 so exp gives exact zeros, not NaN.
  row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights = jnp.exp(logits - row_max)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  seen = total > 0
  safe_total = jnp.where(seen, total, 1.0)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", weights / safe_total, v.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
  out = out.reshape(q.shape).astype(q.dtype)
  if not return_lse:
    return out
  lse = jnp.where(seen, jnp.log(safe_total) + row_max, -jnp.inf)
  return out, lse.reshape(batch, q_heads, q_len)


def _blockwise_forward(q, k, v, q_segments, kv_segments, kv_lengths, sm_scale,
                       q_tile, kv_tile):
  """Online softmax over key tiles, per query tile, up to the last tile it may see."""
  batch, q_len, q_heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  groups = q_heads // kv_heads
  q_tile, kv_tile = min(q_tile, q_len), min(kv_tile, kv_len)
  q_tiles, kv_tiles = -(-q_len // q_tile), -(-kv_len // kv_tile)
  q_pad, kv_pad = q_tiles * q_tile - q_len, kv_tiles * kv_tile - kv_len
  pad_seq = lambda x, n, value=0: jnp.pad(
      x, ((0, 0), (0, n)) + ((0, 0),) * (x.ndim - 2), constant_values=value)
  # Padded queries are clean with block id -1: they see nothing and are cut below. Padded keys
  # lie beyond every kv_length.
  q_ids, q_noisy = pad_seq(q_segments.block_ids, q_pad, -1), pad_seq(q_segments.noisy, q_pad)
  kv_ids, kv_noisy = pad_seq(kv_segments.block_ids, kv_pad), pad_seq(kv_segments.noisy, kv_pad)
  qg = (pad_seq(q, q_pad).astype(jnp.float32) * sm_scale).reshape(
      batch, q_tiles, q_tile, kv_heads, groups, head_dim)
  k, v = pad_seq(k, kv_pad), pad_seq(v, kv_pad)
  in_range = jnp.arange(kv_tiles * kv_tile)[None] < kv_lengths[:, None]

  def one_q_tile(i):
    ids = lax.dynamic_slice_in_dim(q_ids, i * q_tile, q_tile, axis=1)
    noisy = lax.dynamic_slice_in_dim(q_noisy, i * q_tile, q_tile, axis=1)
    q_blocks = TokenBlocks(ids, noisy)
    # A visible key is in range and has a block id <= the largest query block id (clean keys:
    # <=, noisy keys: ==): the keys after the last such one are never needed.
    maybe = in_range & (kv_ids <= jnp.max(ids, axis=1, keepdims=True))
    last = jnp.max(jnp.where(maybe, jnp.arange(kv_tiles * kv_tile) + 1, 0))
    qi = qg[:, i]

    def step(j, carry):
      row_max, total, acc = carry
      start = j * kv_tile
      kj = lax.dynamic_slice_in_dim(k, start, kv_tile, axis=1).astype(jnp.float32)
      vj = lax.dynamic_slice_in_dim(v, start, kv_tile, axis=1).astype(jnp.float32)
      kv_blocks = TokenBlocks(lax.dynamic_slice_in_dim(kv_ids, start, kv_tile, axis=1),
                              lax.dynamic_slice_in_dim(kv_noisy, start, kv_tile, axis=1))
      mask = block_diffusion_mask(q_blocks, kv_blocks, kv_lengths - start)
      logits = jnp.einsum("bqhgd,bkhd->bhgqk", qi, kj, precision=lax.Precision.HIGHEST)
      logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
      new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
      shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
      weights = jnp.exp(logits - shift[..., None])
      rescale = jnp.exp(row_max - shift)
      total = total * rescale + jnp.sum(weights, axis=-1)
      acc = acc * rescale[..., None] + jnp.einsum(
          "bhgqk,bkhd->bhgqd", weights, vj, precision=lax.Precision.HIGHEST)
      return new_max, total, acc

    stats = jnp.full((batch, kv_heads, groups, q_tile), -jnp.inf, jnp.float32)
    init = (stats, jnp.zeros_like(stats),
            jnp.zeros((batch, kv_heads, groups, q_tile, head_dim), jnp.float32))
    return lax.fori_loop(0, -(-last // kv_tile), step, init)

  row_max, total, acc = lax.map(one_q_tile, jnp.arange(q_tiles))
  seen = total > 0
  out = acc / jnp.where(seen, total, 1.0)[..., None]  # [q_tiles, b, h, g, q_tile, d]
  out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(batch, -1, q_heads, head_dim)
  lse = jnp.where(seen, jnp.log(jnp.where(seen, total, 1.0)) + row_max, -jnp.inf)
  lse = jnp.transpose(lse, (1, 2, 3, 0, 4)).reshape(batch, q_heads, -1)
  return out[:, :q_len].astype(q.dtype), lse[:, :, :q_len]


_blockwise = jax.custom_vjp(_blockwise_forward, nondiff_argnums=(6, 7, 8))


def _blockwise_fwd(q, k, v, q_segments, kv_segments, kv_lengths, sm_scale, q_tile, kv_tile):
  outputs = _blockwise_forward(q, k, v, q_segments, kv_segments, kv_lengths, sm_scale, q_tile,
                               kv_tile)
  return outputs, (q, k, v, q_segments, kv_segments, kv_lengths)


def _blockwise_bwd(sm_scale, q_tile, kv_tile, residuals, cotangents):
  del q_tile, kv_tile
  q, k, v, q_segments, kv_segments, kv_lengths = residuals
  _, vjp = jax.vjp(
      lambda q, k, v: block_diffusion_attention_reference(
          q, k, v, q_segments, kv_segments, kv_lengths, sm_scale=sm_scale, return_lse=True),
      q, k, v)
  return (*vjp(cotangents), None, None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def block_diffusion_attention_blockwise(
    q: jax.Array, k: jax.Array, v: jax.Array, q_segments: TokenBlocks, kv_segments: TokenBlocks,
    kv_lengths: jax.Array, *, sm_scale: float | None = None, return_lse: bool = False,
    q_tile: int = 128, kv_tile: int = 512) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The portable path ("xla": "auto" off the GPU): plain-JAX flash attention.

  Same contract as the reference, without its [q_len, kv_len] score matrix: per query tile an
  online softmax runs over key tiles, and stops after the last tile that the tile's largest
  block id allows (prefill chunks skip the empty rest of the cache and the causal upper
  triangle). On a CPU, a 2048-token prefill chunk over an 8K cache runs several times faster
  than the reference. Gradients are the reference's (recomputed in the backward pass).
  """
  _validate(q, k, v, q_segments, kv_segments, kv_lengths)
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
  out, lse = _blockwise(q, k, v, q_segments, kv_segments, kv_lengths, float(sm_scale),
                        q_tile, kv_tile)
  return (out, lse) if return_lse else out


class _Tokens(NamedTuple):
  """Per-token mask keys, padded to the tile grid (all int32 [batch, len]).

  Query i sees key j iff ``kv_clean_id[j] <= q_threshold[i]`` or
  ``kv_noisy_id[j] == q_noisy_id[i]``: two compares per pair in the kernels.
  """

  q_threshold: jax.Array  # block id, minus 1 for a noisy query.
  q_noisy_id: jax.Array  # block id of a noisy query, else _NOT_NOISY_Q.
  kv_clean_id: jax.Array  # block id of an in-range clean key, else _INVALID_ID.
  kv_noisy_id: jax.Array  # block id of an in-range noisy key, else _NOT_NOISY_KV.


def _encode_tokens(q_segments, kv_segments, kv_lengths, q_pad, kv_pad):
  """Folds noisy flags, kv_lengths and padding into the mask keys."""
  q_ids = q_segments.block_ids.astype(jnp.int32)
  q_noisy = q_segments.noisy
  kv_ids = kv_segments.block_ids.astype(jnp.int32)
  kv_len = kv_ids.shape[1]
  in_range = jnp.arange(kv_len)[None, :] < kv_lengths[:, None]
  kv_noisy = kv_segments.noisy
  pad_q = lambda x, fill: jnp.pad(x, ((0, 0), (0, q_pad - x.shape[1])), constant_values=fill)
  pad_kv = lambda x, fill: jnp.pad(x, ((0, 0), (0, kv_pad - x.shape[1])), constant_values=fill)
  return _Tokens(
      q_threshold=pad_q(q_ids - q_noisy.astype(jnp.int32), -1),
      q_noisy_id=pad_q(jnp.where(q_noisy, q_ids, _NOT_NOISY_Q), _NOT_NOISY_Q),
      kv_clean_id=pad_kv(jnp.where(in_range & ~kv_noisy, kv_ids, _INVALID_ID), _INVALID_ID),
      kv_noisy_id=pad_kv(jnp.where(in_range & kv_noisy, kv_ids, _NOT_NOISY_KV), _NOT_NOISY_KV))


def _tile_visibility(tokens: _Tokens, block_q: int, block_kv: int):
  """Classifies every (query tile, key tile) pair.

  Returns:
    (visible, full), bool [batch, q_tiles, kv_tiles]: some pair of the tiles is
    attended / every pair is. ``visible`` uses an interval test on the noisy
    ids, exact when they are nondecreasing within the tiles' noisy segments.
  """
  batch = tokens.q_threshold.shape[0]
  tiles = lambda x, size: x.reshape(batch, -1, size)
  threshold = tiles(tokens.q_threshold, block_q)
  q_nid = tiles(tokens.q_noisy_id, block_q)
  kv_cid = tiles(tokens.kv_clean_id, block_kv)
  kv_nid = tiles(tokens.kv_noisy_id, block_kv)
  q_is_noisy = q_nid >= 0
  kv_is_noisy = kv_nid >= 0

  def masked_min(x, keep):
    return jnp.min(jnp.where(keep, x, _EMPTY_MIN), axis=-1)

  def masked_max(x, keep):
    return jnp.max(jnp.where(keep, x, _EMPTY_MAX), axis=-1)

  thr_max = jnp.max(threshold, axis=-1)[:, :, None]
  thr_min = jnp.min(threshold, axis=-1)[:, :, None]
  qn_min = masked_min(q_nid, q_is_noisy)[:, :, None]
  qn_max = masked_max(q_nid, q_is_noisy)[:, :, None]
  q_all_noisy = jnp.all(q_is_noisy, axis=-1)[:, :, None]
  kc_min = masked_min(kv_cid, ~kv_is_noisy)[:, None, :]
  kc_max = masked_max(kv_cid, ~kv_is_noisy)[:, None, :]
  kn_min = masked_min(kv_nid, kv_is_noisy)[:, None, :]
  kn_max = masked_max(kv_nid, kv_is_noisy)[:, None, :]
  kv_any_noisy = jnp.any(kv_is_noisy, axis=-1)[:, None, :]

  visible = (kc_min <= thr_max) | (jnp.maximum(qn_min, kn_min) <= jnp.minimum(qn_max, kn_max))
  one_noisy_block = (qn_min == qn_max) & (kn_min == kn_max) & (qn_min == kn_min)
  full = (kc_max <= thr_min) & (~kv_any_noisy | (q_all_noisy & one_noisy_block))
  return visible, full & visible


def _schedule(visible, full):
  """Per row of tiles: visible column tiles, fully visible ones first.

  Returns:
    order int32 [batch, rows, cols] (the first ``counts[..., 1]`` entries are
    the visible tiles, of which the first ``counts[..., 0]`` are full), and
    counts int32 [batch, rows, 2].
  """
  kind = jnp.where(full, 0, jnp.where(visible, 1, 2)).astype(jnp.int32)
  order = jnp.argsort(kind, axis=-1, stable=True).astype(jnp.int32)
  counts = jnp.stack([jnp.sum(full, axis=-1), jnp.sum(visible, axis=-1)], axis=-1)
  counts = counts.astype(jnp.int32)
  return order, counts


def _dot(a, b):
  return lax.dot_general(
      a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
  )


def _sees(threshold, q_noisy_id, kv_clean_id, kv_noisy_id):
  """Elementwise mask from broadcastable per-token keys (see _Tokens)."""
  return (kv_clean_id <= threshold) | (kv_noisy_id == q_noisy_id)


def _walk(counts_ref, step, carry):
  """Runs ``step(masked, j, carry)`` over the full, then the partial tiles."""
  n_full, n_visible = counts_ref[0], counts_ref[1]
  carry = lax.fori_loop(0, n_full, functools.partial(step, False), carry)
  return lax.fori_loop(n_full, n_visible, functools.partial(step, True), carry)


def _forward_kernel(
    order_ref, counts_ref, thr_ref, qnid_ref, kcid_ref, knid_ref,
    q_ref, k_ref, v_ref, out_ref, lse_ref, *, scale_log2, block_kv,
):
  """One query tile of one head: online softmax over its visible key tiles."""
  q = q_ref[...]
  block_q, head_dim = q.shape
  threshold = thr_ref[...][:, None]
  q_noisy_id = qnid_ref[...][:, None]

  def step(masked, j, carry):
    acc, row_max, total = carry
    keys = pl.ds(pl.multiple_of(order_ref[j] * block_kv, block_kv), block_kv)
    logits = tu.scores_of(q, k_ref[keys, :]) * scale_log2
    if masked:
      sees = _sees(threshold, q_noisy_id, kcid_ref[keys][None, :],
                   knid_ref[keys][None, :])
      logits = jnp.where(sees, logits, -jnp.inf)
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
    # A row with nothing seen yet keeps max -inf; shift it by 0 instead.
    shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    rescale = jnp.exp2(row_max - shift)
    p = jnp.exp2(logits - shift[:, None])
    v = v_ref[keys, :]
    acc = rescale[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, new_max, rescale * total + jnp.sum(p, axis=1)

  carry = (
      jnp.zeros((block_q, head_dim), jnp.float32),
      jnp.full((block_q,), -jnp.inf, jnp.float32),
      jnp.zeros((block_q,), jnp.float32),
  )
  acc, row_max, total = _walk(counts_ref, step, carry)
  seen = total > 0
  safe_total = jnp.where(seen, total, 1.0)
  out_ref[...] = (acc / safe_total[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(seen, (row_max + jnp.log2(safe_total)) * _LN2,
                           -jnp.inf)


def _dq_kernel(
    order_ref, counts_ref, thr_ref, qnid_ref, kcid_ref, knid_ref,
    q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, dq_ref,
    *, scale_log2, sm_scale, block_kv,
):
  """dq of one query tile of one head, recomputing p from the lse."""
  q = q_ref[...]
  do = do_ref[...]
  lse2 = lse2_ref[...][:, None]
  delta = delta_ref[...][:, None]
  threshold = thr_ref[...][:, None]
  q_noisy_id = qnid_ref[...][:, None]

  def step(masked, j, dq):
    keys = pl.ds(pl.multiple_of(order_ref[j] * block_kv, block_kv), block_kv)
    k = k_ref[keys, :]
    logits = tu.scores_of(q, k) * scale_log2
    if masked:
      sees = _sees(threshold, q_noisy_id, kcid_ref[keys][None, :],
                   knid_ref[keys][None, :])
      logits = jnp.where(sees, logits, -jnp.inf)
    p = jnp.exp2(logits - lse2)
    ds = p * (tu.scores_of(do, v_ref[keys, :]) - delta)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _walk(counts_ref, step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(
    order_ref, counts_ref, thr_ref, qnid_ref, kcid_ref, knid_ref,
    q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, dk_ref, dv_ref,
    *, scale_log2, sm_scale, block_q, groups,
):
  """dk, dv of one key tile, summed over the query heads of its group.

  Works in the transposed orientation ([keys, queries]) so that no
  probability tile is transposed before the dk/dv products.
  """
  k = k_ref[...]
  v = v_ref[...]
  kv_clean_id = kcid_ref[...][:, None]
  kv_noisy_id = knid_ref[...][:, None]

  def step(group, masked, j, carry):
    dk, dv = carry
    rows = pl.ds(pl.multiple_of(order_ref[j] * block_q, block_q), block_q)
    q = q_ref[rows, group, :]
    do = do_ref[rows, group, :]
    logits_t = tu.scores_of(k, q) * scale_log2
    if masked:
      sees = _sees(thr_ref[rows][None, :], qnid_ref[rows][None, :],
                   kv_clean_id, kv_noisy_id)
      logits_t = jnp.where(sees, logits_t, -jnp.inf)
    p_t = jnp.exp2(logits_t - lse2_ref[group, rows][None, :])
    dv = dv + _dot(p_t.astype(do.dtype), do)
    ds_t = p_t * (tu.scores_of(v, do) - delta_ref[group, rows][None, :])
    return dk + _dot(ds_t.astype(q.dtype), q), dv

  def over_group(group, carry):
    return _walk(counts_ref, functools.partial(step, group), carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, groups, over_group, (zeros, zeros))
  dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything about a call that is fixed at trace time."""

  sm_scale: float
  config: TileConfig
  interpret: bool


def _query_tile_launch(q, k, tokens: _Tokens, bq: int, bkv: int):
  """The grid, schedule and block specs of the kernels whose grid walks query tiles (forward and
  dq): a program reads its query tile's schedule (order, counts), token keys and rows
  (``q_spec``; ``row_spec`` for per-query rows [batch, heads, q_len]), every key token's keys,
  and the K and V of its KV head (``kv_spec``). The heaviest (last) query tiles launch first, to
  shorten the tail. Returns (grid, schedule, schedule_and_token_specs, q_spec, kv_spec,
  row_spec)."""
  batch, q_len, q_heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  groups = q_heads // kv_heads
  q_tiles, kv_tiles = q_len // bq, kv_len // bkv
  rev = lambda i: q_tiles - 1 - i
  schedule_and_token_specs = [
      pl.BlockSpec((None, None, kv_tiles), lambda i, b, h: (b, rev(i), 0)),
      pl.BlockSpec((None, None, 2), lambda i, b, h: (b, rev(i), 0)),
      pl.BlockSpec((None, bq), lambda i, b, h: (b, rev(i))),
      pl.BlockSpec((None, bq), lambda i, b, h: (b, rev(i))),
      pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
      pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
  ]
  return ((q_tiles, batch, q_heads), _schedule(*_tile_visibility(tokens, bq, bkv)),
          schedule_and_token_specs,
          pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, rev(i), h, 0)),
          pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0)),
          pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, rev(i))))


def _forward_call(static: _Static, q, k, v, tokens: _Tokens):
  cfg = static.config
  grid, schedule, token_specs, q_spec, kv_spec, row_spec = _query_tile_launch(
      q, k, tokens, cfg.block_q, cfg.block_kv)
  kernel = functools.partial(_forward_kernel, scale_log2=static.sm_scale * tu.LOG2_E,
                             block_kv=cfg.block_kv)
  batch, q_len, q_heads, _ = q.shape
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[*token_specs, q_spec, kv_spec, kv_spec],
      out_specs=[q_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, q_heads, q_len), jnp.float32)],
      compiler_params=tu.compiler_params(cfg.num_warps, cfg.num_stages),
      interpret=static.interpret,
      name="block_diffusion_attention_fwd",
  )(*schedule, *tokens, q, k, v)


def _dq_call(static: _Static, q, k, v, tokens, d_out, lse2, delta):
  cfg = static.config
  grid, schedule, token_specs, q_spec, kv_spec, row_spec = _query_tile_launch(
      q, k, tokens, cfg.dq_block_q, cfg.dq_block_kv)
  kernel = functools.partial(_dq_kernel, scale_log2=static.sm_scale * tu.LOG2_E,
                             sm_scale=static.sm_scale, block_kv=cfg.dq_block_kv)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[*token_specs, q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=tu.compiler_params(cfg.dq_num_warps, cfg.dq_num_stages),
      interpret=static.interpret,
      name="block_diffusion_attention_dq",
  )(*schedule, *tokens, q, k, v, d_out, lse2, delta)


def _dkv_call(static: _Static, q, k, v, tokens, d_out, lse2, delta):
  cfg = static.config
  batch, q_len, q_heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  groups = q_heads // kv_heads
  bq, bkv = cfg.dkv_block_q, cfg.dkv_block_kv
  q_tiles, kv_tiles = q_len // bq, kv_len // bkv
  visible, full = _tile_visibility(tokens, bq, bkv)
  order, counts = _schedule(jnp.swapaxes(visible, 1, 2), jnp.swapaxes(full, 1, 2))
  # Blocks of `groups` heads: block h holds query heads h*G .. h*G+G-1.
  group_q_spec = pl.BlockSpec((None, q_len, groups, head_dim), lambda j, b, h: (b, 0, h, 0))
  group_row_spec = pl.BlockSpec((None, groups, q_len), lambda j, b, h: (b, h, 0))
  kv_spec = pl.BlockSpec((None, bkv, None, head_dim), lambda j, b, h: (b, j, h, 0))
  kernel = functools.partial(_dkv_kernel, scale_log2=static.sm_scale * tu.LOG2_E,
                             sm_scale=static.sm_scale, block_q=bq, groups=groups)
  return pl.pallas_call(
      kernel,
      grid=(kv_tiles, batch, kv_heads),
      in_specs=[
          pl.BlockSpec((None, None, q_tiles), lambda j, b, h: (b, j, 0)),
          pl.BlockSpec((None, None, 2), lambda j, b, h: (b, j, 0)),
          pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0)),
          pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0)),
          pl.BlockSpec((None, bkv), lambda j, b, h: (b, j)),
          pl.BlockSpec((None, bkv), lambda j, b, h: (b, j)),
          group_q_spec, kv_spec, kv_spec, group_q_spec, group_row_spec, group_row_spec,
      ],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=tu.compiler_params(cfg.dkv_num_warps, cfg.dkv_num_stages),
      interpret=static.interpret,
      name="block_diffusion_attention_dkv",
  )(order, counts, *tokens, q, k, v, d_out, lse2, delta)


_flash = jax.custom_vjp(_forward_call, nondiff_argnums=(0,))


def _flash_fwd(static: _Static, q, k, v, tokens: _Tokens):
  out, lse = _forward_call(static, q, k, v, tokens)
  return (out, lse), (q, k, v, tokens, out, lse)


def _flash_bwd(static: _Static, residuals, cotangents):
  q, k, v, tokens, out, lse = residuals
  d_out, d_lse = cotangents
  # d lse_i / d logit_ij = p_ij, so an lse cotangent only shifts delta.
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32),
                     d_out.astype(jnp.float32)) - d_lse
  # Rows that saw no key: p = exp2(-inf - inf) = 0 instead of NaN.
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse) * tu.LOG2_E
  dq = _dq_call(static, q, k, v, tokens, d_out, lse2, delta)
  dk, dv = _dkv_call(static, q, k, v, tokens, d_out, lse2, delta)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("sm_scale", "return_lse", "interpret", "config"))
def _kernel_attention(q, k, v, q_segments, kv_segments, kv_lengths, *, sm_scale, return_lse,
                      interpret, config):
  """Pads to the tile grid (and head_dim to a power of 2), runs the kernels."""
  _, q_len, _, head_dim = q.shape
  kv_len = k.shape[1]
  cfg = config.fit(q_len, kv_len)
  q_pad = _round_up(q_len, max(cfg.block_q, cfg.dq_block_q, cfg.dkv_block_q))
  kv_pad = _round_up(kv_len, max(cfg.block_kv, cfg.dq_block_kv, cfg.dkv_block_kv))
  dim_pad = tu.next_power_of_two(head_dim)
  pad = lambda x, length: jnp.pad(
      x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dim_pad - head_dim)))
  tokens = _encode_tokens(q_segments, kv_segments, kv_lengths, q_pad, kv_pad)
  static = _Static(sm_scale=sm_scale, config=cfg, interpret=interpret)
  out, lse = _flash(static, pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad), tokens)
  out = out[:, :q_len, :, :head_dim]
  return (out, lse[:, :, :q_len]) if return_lse else out


def block_diffusion_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, q_segments: TokenBlocks, kv_segments: TokenBlocks,
    kv_lengths: jax.Array, *, sm_scale: float | None = None, return_lse: bool = False,
    impl: str = "auto", **tuning: int) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Block-diffusion attention (mask in the module docstring), differentiable.

  Args:
    q: [batch, q_len, q_heads, head_dim], float32 or bfloat16.
    k: [batch, kv_len, kv_heads, head_dim]; query head i uses key head
      ``i // (q_heads // kv_heads)``.
    v: like k.
    q_segments: block ids and noisy flags of the queries.
    kv_segments: block ids and noisy flags of the keys.
    kv_lengths: int32 [batch]; keys at positions >= kv_lengths[b] are ignored.
    sm_scale: logit scale, 1/sqrt(head_dim) by default.
    return_lse: also return the natural-log log-sum-exp of the scaled logits,
      float32 [batch, q_heads, q_len] (-inf for rows that see no key).
    impl: a resolved implementation or a setting (see dispatch); "xla" ("auto"
      off the GPU and TPU) runs ``block_diffusion_attention_blockwise``, "mosaic" /
      "mosaic_interpret" the TPU kernel (pallas_kernels.tpu.flash_attention).
    **tuning: fields of TileConfig overriding its defaults (Triton kernels only), or the TPU
      kernel's tile sizes.

  Returns:
    out in q.dtype, [batch, q_len, q_heads, head_dim]; or (out, lse).
  """
  impl = dispatch.resolve_impl(impl)
  if impl in dispatch.MOSAIC:
    from pallas_kernels.tpu import flash_attention as tpu  # imports this module
    return tpu.block_diffusion_attention(
        q, k, v, q_segments, kv_segments, kv_lengths, sm_scale=sm_scale, return_lse=return_lse,
        interpret=impl == "mosaic_interpret", **tuning)
  _validate(q, k, v, q_segments, kv_segments, kv_lengths)
  tu.check_tuning(tuning, {f.name: f.default for f in dataclasses.fields(TileConfig)},
                  "block_diffusion_attention")
  config = TileConfig(**tuning)
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
  if impl in dispatch.PLAIN_JAX:  # "xla" ("auto" off the GPU) is the faster portable path
    portable = {"xla": block_diffusion_attention_blockwise,
                "reference": block_diffusion_attention_reference}[impl]
    return portable(q, k, v, q_segments, kv_segments, kv_lengths, sm_scale=sm_scale,
                    return_lse=return_lse)
  return _kernel_attention(q, k, v, q_segments, kv_segments, kv_lengths,
                           sm_scale=float(sm_scale), return_lse=return_lse,
                           interpret=impl == "interpret", config=config)
