"""Mask keys and tile schedules of the TPU block-diffusion flash attention (plain jnp).

The mask (see pallas_kernels/flash_attention.py) is folded into two int32 keys per token, so
that a kernel decides a (query, key) pair with two compares:

  query i sees key j  iff  kv_clean_id[j] <= q_threshold[i]  or  kv_noisy_id[j] == q_noisy_id[i]

Keys are stored row-wise, ``[batch, 2, len]`` (row 0 / row 1 below), so a tile of them is a
(2, tile) block whose lanes run along the sequence, as Mosaic wants.

Per (query tile, key tile) pair, ``tile_visibility`` classifies the tiles from per-tile minima
and maxima as invisible, fully visible or partially visible (conservatively: it never drops a
visible pair; exact when block ids are nondecreasing within each noisy / clean segment, as in
prefill and in the doubled training sequence). ``tile_runs`` then describes each row of tiles
by at most ``max_runs`` runs of consecutive tiles, each fully visible (no masking needed) or
masked: a handful of scalars per row that fit the TPU's scalar memory at 64K tokens, where a
per-row list of every visible tile (the Triton kernel's schedule) would not.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import TokenBlocks

# Rows of the key arrays.
Q_THRESHOLD, Q_NOISY_ID = 0, 1  # block id (minus 1 for a noisy query); block id of a noisy query.
KV_CLEAN_ID, KV_NOISY_ID = 0, 1  # block id of an in-range clean / noisy key.
# Clean id of padding, of noisy keys and of keys past kv_lengths: above any real block id.
INVALID_ID = 2**30
# Noisy ids of tokens that are not noisy: negative and different for queries and keys.
NOT_NOISY_Q = -2
NOT_NOISY_KV = -3
# Fields of one run in ``tile_runs``.
RUN_START, RUN_LENGTH, RUN_MASKED = 0, 1, 2
RUN_FIELDS = 3
# Runs per row of tiles that the kernels' schedule holds: prefill rows need 2 (full tiles, then
# the diagonal), rows of noisy training queries 3 (their noisy block, full clean tiles, the
# clean diagonal), 4 where a tile straddles the noisy / clean boundary.
MAX_RUNS = 4

_EMPTY_MIN = 2**31 - 1
_EMPTY_MAX = -(2**31 - 1)


def encode_tokens(
    q_segments: TokenBlocks, kv_segments: TokenBlocks, kv_lengths: jax.Array,
    q_len_padded: int, kv_len_padded: int,
) -> tuple[jax.Array, jax.Array]:
  """The mask keys, padded: (q_keys int32 [batch, 2, q_len_padded], kv_keys int32 [batch, 2,
  kv_len_padded]). Padded queries see nothing; padded keys and keys at positions >=
  kv_lengths[b] are seen by nothing."""
  q_ids = q_segments.block_ids.astype(jnp.int32)
  kv_ids = kv_segments.block_ids.astype(jnp.int32)
  kv_len = kv_ids.shape[1]
  in_range = jnp.arange(kv_len)[None, :] < kv_lengths[:, None]
  pad = lambda x, length, fill: jnp.pad(x, ((0, 0), (0, length - x.shape[1])),
                                        constant_values=fill)
  q_keys = jnp.stack([
      pad(q_ids - q_segments.noisy.astype(jnp.int32), q_len_padded, -1),
      pad(jnp.where(q_segments.noisy, q_ids, NOT_NOISY_Q), q_len_padded, NOT_NOISY_Q),
  ], axis=1)
  kv_keys = jnp.stack([
      pad(jnp.where(in_range & ~kv_segments.noisy, kv_ids, INVALID_ID), kv_len_padded,
          INVALID_ID),
      pad(jnp.where(in_range & kv_segments.noisy, kv_ids, NOT_NOISY_KV), kv_len_padded,
          NOT_NOISY_KV),
  ], axis=1)
  return q_keys, kv_keys


def sees(q_threshold, q_noisy_id, kv_clean_id, kv_noisy_id):
  """The elementwise mask from broadcastable keys."""
  return (kv_clean_id <= q_threshold) | (kv_noisy_id == q_noisy_id)


def tile_visibility(q_keys: jax.Array, kv_keys: jax.Array, block_q: int, block_kv: int):
  """(visible, full), bool [batch, q_tiles, kv_tiles]: some / every pair of the tiles is
  attended (``full`` implies ``visible``)."""
  batch = q_keys.shape[0]
  tiles = lambda x, size: x.reshape(batch, -1, size)
  threshold = tiles(q_keys[:, Q_THRESHOLD], block_q)
  q_noisy_id = tiles(q_keys[:, Q_NOISY_ID], block_q)
  kv_clean_id = tiles(kv_keys[:, KV_CLEAN_ID], block_kv)
  kv_noisy_id = tiles(kv_keys[:, KV_NOISY_ID], block_kv)
  q_is_noisy = q_noisy_id >= 0
  kv_is_noisy = kv_noisy_id >= 0

  def masked_min(x, keep):
    return jnp.min(jnp.where(keep, x, _EMPTY_MIN), axis=-1)

  def masked_max(x, keep):
    return jnp.max(jnp.where(keep, x, _EMPTY_MAX), axis=-1)

  as_rows = lambda x: x[:, :, None]
  as_cols = lambda x: x[:, None, :]
  thr_max = as_rows(jnp.max(threshold, axis=-1))
  thr_min = as_rows(jnp.min(threshold, axis=-1))
  qn_min = as_rows(masked_min(q_noisy_id, q_is_noisy))
  qn_max = as_rows(masked_max(q_noisy_id, q_is_noisy))
  q_all_noisy = as_rows(jnp.all(q_is_noisy, axis=-1))
  kc_min = as_cols(masked_min(kv_clean_id, ~kv_is_noisy))
  kc_max = as_cols(masked_max(kv_clean_id, ~kv_is_noisy))
  kn_min = as_cols(masked_min(kv_noisy_id, kv_is_noisy))
  kn_max = as_cols(masked_max(kv_noisy_id, kv_is_noisy))
  kv_any_noisy = as_cols(jnp.any(kv_is_noisy, axis=-1))

  # Some clean key of the tile is below the largest threshold, or the noisy id ranges overlap.
  visible = (kc_min <= thr_max) | (jnp.maximum(qn_min, kn_min) <= jnp.minimum(qn_max, kn_max))
  # Every key is clean and below every threshold, or every query and key is noisy of one block.
  one_noisy_block = (qn_min == qn_max) & (kn_min == kn_max) & (qn_min == kn_min)
  full = (kc_max <= thr_min) & (~kv_any_noisy | (q_all_noisy & one_noisy_block))
  return visible, full & visible


def tile_runs(visible: jax.Array, full: jax.Array, max_runs: int) -> jax.Array:
  """Each row of tiles as at most ``max_runs`` runs of consecutive column tiles.

  Args:
    visible, full: bool [batch, rows, cols] (``full`` implies ``visible``).
    max_runs: runs per row; a row with more maximal runs (of equal kind: full or partial)
      gets its first max_runs - 1 exactly and a last, masked one from the start of the next
      to its last visible tile (invisible tiles inside it are computed, fully masked).

  Returns:
    int32 [batch, rows, max_runs, RUN_FIELDS]: (first tile, number of tiles, masked) per run,
    in column order; unused runs have 0 tiles. The runs cover every visible tile exactly once
    and a run is unmasked only if all its tiles are full.
  """
  kind = jnp.where(full, 2, jnp.where(visible, 1, 0)).astype(jnp.int32)
  cols = kind.shape[-1]
  before = jnp.pad(kind, ((0, 0), (0, 0), (1, 0)))[..., :-1]
  after = jnp.pad(kind, ((0, 0), (0, 0), (0, 1)))[..., 1:]
  opens = (kind != 0) & (kind != before)
  closes = (kind != 0) & (kind != after)
  run_ids = jnp.arange(max_runs)
  column = jnp.arange(cols)[:, None]
  # [batch, rows, cols, max_runs]: tile c opens / closes run r.
  opens_run = opens[..., None] & ((jnp.cumsum(opens, axis=-1) - 1)[..., None] == run_ids)
  closes_run = closes[..., None] & ((jnp.cumsum(closes, axis=-1) - 1)[..., None] == run_ids)
  first = jnp.sum(jnp.where(opens_run, column, 0), axis=-2)
  last = jnp.sum(jnp.where(closes_run, column, 0), axis=-2)
  masked = jnp.sum(jnp.where(opens_run, kind[..., None], 0), axis=-2) == 1
  count = jnp.sum(opens, axis=-1)
  # The last run absorbs all later ones.
  merged = count > max_runs
  last_visible = jnp.max(jnp.where(kind != 0, jnp.arange(cols), -1), axis=-1)
  last = last.at[..., -1].set(jnp.where(merged, last_visible, last[..., -1]))
  masked = masked.at[..., -1].set(masked[..., -1] | merged)
  length = jnp.where(run_ids < count[..., None], last - first + 1, 0)
  return jnp.stack([first, length, masked.astype(jnp.int32)], axis=-1).astype(jnp.int32)
