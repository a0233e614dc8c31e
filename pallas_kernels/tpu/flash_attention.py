"""Block-diffusion flash attention for TPU (Pallas / Mosaic): forward and backward.

Same mask and contract as pallas_kernels/flash_attention.py (clean queries see clean keys of
blocks <= theirs, noisy queries the noisy keys of their block and clean keys of earlier blocks,
nothing at positions >= kv_lengths[b]; a query that sees no key outputs 0 with lse = -inf).

Why not jax's splash attention (jax.experimental.pallas.ops.tpu.splash_attention): its mask
is a host-side numpy table (or a function of absolute positions) fixed at trace time and shared
by the whole batch; only its segment ids are runtime arrays, and they express equality alone.
Our prefill mask is a function of runtime, per-sequence positions (a ragged batch writes each
sequence at its own cache length, inside a lax.while_loop over chunks) and of runtime
kv_lengths, so it cannot be a static table; a dynamic splash mask is a dense [q_len, kv_len]
array shared by the batch (4 GiB of bools at 64K). Splash could express the static training
layout (the doubled [x_t | x_0] sequence), but not our contract for a query that sees no key
(0 and lse = -inf: the first noisy block against the clean half, in MAGE-FT), and one kernel
for both keeps one contract. So this module has its own kernels, built on the structure of
splash's and of jax's TPU flash attention:

* Forward: grid (batch, q head, query tile, step); the step axis is "arbitrary" and walks the
  query tile's visible key tiles, the online softmax state (max, sum, accumulator) living in
  VMEM scratch. Which key tile a step reads comes from a scalar-prefetched schedule of a few
  runs of consecutive tiles per query tile (block_mask.tile_runs): fully visible runs skip the
  mask, invisible tiles are never fetched nor computed. The step count is a runtime grid bound,
  the most tiles any query tile sees; a query tile that sees fewer idles through the rest (its
  last tile is re-read, so no DMA, and nothing computed). The lse is saved for the backward.
* Backward: a dq kernel on the forward's grid, and a dk/dv kernel with grid (batch, kv head,
  key tile, group head, step) that walks the query tiles of every query head of its group,
  in the transposed [keys, queries] orientation so that the per-query statistics (lse, delta)
  and mask keys are rows, as stored, and nothing is transposed per step.

Layout: q, k, v enter as [batch, len, heads, head_dim] (the Triton kernel's) and are swapped to
head-major [batch, heads, len, head_dim] so a tile is a (rows, head_dim) block; head_dim is
padded to a multiple of 128 and lengths to the tile grid. Per-token arrays (mask keys, lse,
delta) are rows [batch, (heads,) 1 or 2, len] whose tiles are (1 or 2, tile) blocks. Tiles are
powers of 2 and multiples of 128 (the lane width). Lowering is tested on CPU at the real model
shapes; Mosaic's final compile (and any VMEM or scalar-memory overflow it finds) happens only
on a TPU, and nothing here has been timed on one.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels._triton_utils import next_power_of_two
from pallas_kernels.flash_attention import TokenBlocks, _validate
from pallas_kernels.tpu import _mosaic_utils as mu
from pallas_kernels.tpu import block_mask as bm

# Scoped VMEM asked of Mosaic. The default tiles (512 x 512) need ~9 MiB at head_dim 128
# (vmem_bytes_estimate); 32 MiB leaves room for larger tiles, is above v5e's 16 MiB default
# scope and well within every TPU's VMEM (v5e / v6e 128 MiB, v5p 95 MiB).
_VMEM_LIMIT_BYTES = 32 * 2**20
# The scalar-prefetched schedules live in scalar memory (1 MiB on v4-v6e, shared with Mosaic's
# own use): a quarter of it at most. 8 x 64K tokens in 512-row tiles take 48 KiB.
_SMEM_LIMIT_BYTES = 256 * 2**10




@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Tile lengths (rows of queries / keys) of the three kernels; powers of 2, >= 128.

  Untuned: 512 x 512 is what splash attention is commonly run with on v5e-v6e (the matrix unit
  is 128 x 128 on v5e, 256 x 256 on v6e); no TPU was available to sweep them.
  """

  block_q: int = 512
  block_kv: int = 512
  dq_block_q: int = 512
  dq_block_kv: int = 512
  dkv_block_q: int = 512
  dkv_block_kv: int = 512

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value < mu.LANES or value & (value - 1):
        raise ValueError(
            f"tuning {field.name} must be a power of 2 >= {mu.LANES} (tiles of per-token rows "
            f"are lane-aligned), got {value}")

  def fit(self, q_len: int, kv_len: int) -> "TileConfig":
    """Shrinks tiles longer than the (power-of-2 rounded) sequence lengths."""
    q_cap = next_power_of_two(q_len, mu.LANES)
    kv_cap = next_power_of_two(kv_len, mu.LANES)
    changes = {}
    for field in dataclasses.fields(self):
      cap = q_cap if field.name.endswith("block_q") else kv_cap
      changes[field.name] = min(getattr(self, field.name), cap)
    return dataclasses.replace(self, **changes)

  def padded_lengths(self, q_len: int, kv_len: int) -> tuple[int, int]:
    """Query and key lengths padded to whole tiles of every kernel."""
    return (mu.round_up(q_len, max(self.block_q, self.dq_block_q, self.dkv_block_q)),
            mu.round_up(kv_len, max(self.block_kv, self.dq_block_kv, self.dkv_block_kv)))


def vmem_bytes_estimate(rows: int, cols: int, head_dim: int, itemsize: int) -> int:
  """Upper estimate of one kernel's VMEM: double-buffered blocks of 4 row tiles and 2 column
  tiles (or the reverse), f32 accumulators and ~6 live f32 (rows, cols) intermediates."""
  tile_bytes = 2 * (4 * rows + 2 * cols) * head_dim * itemsize
  scratch = 4 * (2 * max(rows, cols) * head_dim + 4 * max(rows, cols) * mu.LANES)
  return tile_bytes + scratch + 6 * 4 * rows * cols


@dataclasses.dataclass(frozen=True)
class _Static:
  sm_scale: float
  groups: int
  config: TileConfig
  interpret: bool


def _locate(runs_ref, row, step):
  """(tile, masked, active) of a grid step from the scalar-prefetched runs (1-D, rows of
  bm.MAX_RUNS x RUN_FIELDS). Steps past the last run keep that run's last tile (no new DMA)."""
  base = row * (bm.MAX_RUNS * bm.RUN_FIELDS)
  tile, masked, offset = 0, 0, step
  for run in range(bm.MAX_RUNS):
    field = lambda f: runs_ref[base + run * bm.RUN_FIELDS + f]
    start, length = field(bm.RUN_START), field(bm.RUN_LENGTH)
    inside = (offset >= 0) & (offset < length)
    passed = (offset >= length) & (length > 0)
    tile = jnp.where(inside, start + offset, jnp.where(passed, start + length - 1, tile))
    masked = jnp.where(inside, field(bm.RUN_MASKED), masked)
    offset = offset - length
  return tile, masked != 0, offset < 0


# Per-row values (softmax statistics, a query's mask keys) are held lane-replicated, as (n, 128)
# arrays, and widened by tiling, as jax's TPU flash and splash attention kernels do.


def _as_column(row):
  """A (1, n) row as an (n, 128) lane-replicated column, by one aligned transpose."""
  return jnp.broadcast_to(row, (mu.LANES, row.shape[1])).T


def _as_row(column):
  """An (n, 128) lane-replicated column as a (1, n) row, by one aligned transpose."""
  return column.T[:1, :]


def _widen(column, width):
  """An (n, 128) lane-replicated column as (n, width), width a multiple of 128."""
  return column if width == mu.LANES else jnp.tile(column, (1, width // mu.LANES))


def _dot_nt(a, b):
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _schedule(q_keys, kv_keys, block_q, block_kv):
  """The runs of key tiles per query tile (flattened for scalar memory) and the grid's step
  count: the most key tiles any query tile sees, a runtime value (a dynamic grid bound), so a
  prefill chunk near the start of a long cache walks its few visible tiles, not the cache."""
  runs = bm.tile_runs(*bm.tile_visibility(q_keys, kv_keys, block_q, block_kv), bm.MAX_RUNS)
  steps = jnp.maximum(1, jnp.max(jnp.sum(runs[..., bm.RUN_LENGTH], axis=-1)))
  return runs.reshape(-1), steps


class _QueryTileSpecs(NamedTuple):
  """Block specs of the kernels whose grid is (batch, q head, query tile, step): the forward
  and dq kernels. A step's key tile comes from the scalar-prefetched runs."""

  q_keys: pl.BlockSpec  # The query tile's mask keys, (2, bq).
  kv_keys: pl.BlockSpec  # The step's key tile's mask keys, (2, bkv).
  rows: pl.BlockSpec  # A (bq, head_dim) tile of q / out / d_out / dq.
  kv: pl.BlockSpec  # The step's (bkv, head_dim) tile of k / v, of the head's KV head.
  stats: pl.BlockSpec  # A (1, bq) row of lse / delta.


def _query_tile_specs(bq, bkv, head_dim, groups, q_tiles) -> _QueryTileSpecs:
  def kv_tile(b, i, step, runs_ref):
    return _locate(runs_ref, b * q_tiles + i, step)[0]

  return _QueryTileSpecs(
      q_keys=pl.BlockSpec((None, 2, bq), lambda b, h, i, s, runs: (b, 0, i)),
      kv_keys=pl.BlockSpec((None, 2, bkv),
                           lambda b, h, i, s, runs: (b, 0, kv_tile(b, i, s, runs))),
      rows=pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, s, runs: (b, h, i, 0)),
      kv=pl.BlockSpec(
          (None, None, bkv, head_dim),
          lambda b, h, i, s, runs: (b, jax.lax.div(h, groups), kv_tile(b, i, s, runs), 0)),
      stats=pl.BlockSpec((None, None, 1, bq), lambda b, h, i, s, runs: (b, h, 0, i)),
  )


# ---------------------------------------------------------------------------------------------
# Forward


def _forward_kernel(runs_ref, q_keys_ref, kv_keys_ref, q_ref, k_ref, v_ref, out_ref, lse_ref,
                    max_ref, sum_ref, acc_ref, threshold_ref, noisy_id_ref,
                    *, sm_scale, q_tiles):
  """One query tile of one head: online softmax over its visible key tiles."""
  b, i, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  _, masked, active = _locate(runs_ref, b * q_tiles + i, step)

  @pl.when(step == 0)
  def _init():
    max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
    sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    threshold_ref[...] = _as_column(q_keys_ref[bm.Q_THRESHOLD:bm.Q_THRESHOLD + 1, :])
    noisy_id_ref[...] = _as_column(q_keys_ref[bm.Q_NOISY_ID:bm.Q_NOISY_ID + 1, :])

  def accumulate(apply_mask: bool):
    logits = _dot_nt(q_ref[...], k_ref[...]) * sm_scale
    block_kv = logits.shape[1]
    if apply_mask:
      sees = bm.sees(_widen(threshold_ref[...], block_kv), _widen(noisy_id_ref[...], block_kv),
                     kv_keys_ref[bm.KV_CLEAN_ID:bm.KV_CLEAN_ID + 1, :],
                     kv_keys_ref[bm.KV_NOISY_ID:bm.KV_NOISY_ID + 1, :])
      logits = jnp.where(sees, logits, -jnp.inf)
    old_max = max_ref[...]
    new_max = jnp.maximum(old_max, jnp.max(logits, axis=1, keepdims=True))
    # A row that has seen nothing keeps max -inf; shift it by 0 so exp gives zeros, not NaN.
    shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    rescale = jnp.exp(old_max - shift)
    p = jnp.exp(logits - _widen(shift, block_kv))
    max_ref[...] = new_max
    sum_ref[...] = rescale * sum_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_ref[...] = (_widen(rescale, acc_ref.shape[1]) * acc_ref[...]
                    + _dot(p.astype(v.dtype), v))

  pl.when(active & ~masked)(lambda: accumulate(False))
  pl.when(active & masked)(lambda: accumulate(True))

  @pl.when(step == pl.num_programs(3) - 1)
  def _finish():
    total = sum_ref[...]
    seen = total > 0
    safe_total = jnp.where(seen, total, 1.0)
    out_ref[...] = (acc_ref[...] / _widen(safe_total, acc_ref.shape[1])).astype(out_ref.dtype)
    lse_ref[...] = _as_row(jnp.where(seen, max_ref[...] + jnp.log(safe_total), -jnp.inf))


def _forward_call(static: _Static, q, k, v, q_keys, kv_keys):
  """q [b, H, Lq, d], k / v [b, Hkv, Lkv, d] (padded) -> out [b, H, Lq, d], lse [b, H, 1, Lq]."""
  batch, q_heads, q_len, head_dim = q.shape
  bq, bkv = static.config.block_q, static.config.block_kv
  q_tiles = q_len // bq
  runs, steps = _schedule(q_keys, kv_keys, bq, bkv)
  specs = _query_tile_specs(bq, bkv, head_dim, static.groups, q_tiles)
  kernel = functools.partial(_forward_kernel, sm_scale=static.sm_scale, q_tiles=q_tiles)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(batch, q_heads, q_tiles, steps),
      in_specs=[specs.q_keys, specs.kv_keys, specs.rows, specs.kv, specs.kv],
      out_specs=[specs.rows, specs.stats],
      scratch_shapes=[
          pltpu.VMEM((bq, mu.LANES), jnp.float32),
          pltpu.VMEM((bq, mu.LANES), jnp.float32),
          pltpu.VMEM((bq, head_dim), jnp.float32),
          pltpu.VMEM((bq, mu.LANES), jnp.int32),
          pltpu.VMEM((bq, mu.LANES), jnp.int32),
      ],
  )
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[
          jax.ShapeDtypeStruct(q.shape, q.dtype),
          jax.ShapeDtypeStruct((batch, q_heads, 1, q_len), jnp.float32),
      ],
      compiler_params=mu.compiler_params(("parallel", "parallel", "parallel", "arbitrary"),
                                         _VMEM_LIMIT_BYTES),
      interpret=mu.interpret_params(static.interpret),
      name="block_diffusion_attention_fwd_tpu",
  )(runs, q_keys, kv_keys, q, k, v)


# ---------------------------------------------------------------------------------------------
# Backward


def _dq_kernel(runs_ref, q_keys_ref, kv_keys_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref,
               delta_ref, dq_ref, acc_ref, lse_col_ref, delta_col_ref, threshold_ref,
               noisy_id_ref, *, sm_scale, q_tiles):
  """dq of one query tile of one head: p recomputed from the lse over its visible key tiles."""
  b, i, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  _, masked, active = _locate(runs_ref, b * q_tiles + i, step)

  @pl.when(step == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    lse_col_ref[...] = _as_column(lse_ref[...])
    delta_col_ref[...] = _as_column(delta_ref[...])
    threshold_ref[...] = _as_column(q_keys_ref[bm.Q_THRESHOLD:bm.Q_THRESHOLD + 1, :])
    noisy_id_ref[...] = _as_column(q_keys_ref[bm.Q_NOISY_ID:bm.Q_NOISY_ID + 1, :])

  def accumulate(apply_mask: bool):
    k = k_ref[...]
    logits = _dot_nt(q_ref[...], k) * sm_scale
    block_kv = logits.shape[1]
    if apply_mask:
      sees = bm.sees(_widen(threshold_ref[...], block_kv), _widen(noisy_id_ref[...], block_kv),
                     kv_keys_ref[bm.KV_CLEAN_ID:bm.KV_CLEAN_ID + 1, :],
                     kv_keys_ref[bm.KV_NOISY_ID:bm.KV_NOISY_ID + 1, :])
      logits = jnp.where(sees, logits, -jnp.inf)
    p = jnp.exp(logits - _widen(lse_col_ref[...], block_kv))
    ds = p * (_dot_nt(d_out_ref[...], v_ref[...]) - _widen(delta_col_ref[...], block_kv))
    acc_ref[...] += _dot(ds.astype(k.dtype), k)

  pl.when(active & ~masked)(lambda: accumulate(False))
  pl.when(active & masked)(lambda: accumulate(True))

  @pl.when(step == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * sm_scale).astype(dq_ref.dtype)


def _dq_call(static: _Static, q, k, v, q_keys, kv_keys, d_out, lse, delta):
  batch, q_heads, q_len, head_dim = q.shape
  bq, bkv = static.config.dq_block_q, static.config.dq_block_kv
  q_tiles = q_len // bq
  runs, steps = _schedule(q_keys, kv_keys, bq, bkv)
  specs = _query_tile_specs(bq, bkv, head_dim, static.groups, q_tiles)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(batch, q_heads, q_tiles, steps),
      in_specs=[specs.q_keys, specs.kv_keys, specs.rows, specs.kv, specs.kv, specs.rows,
                specs.stats, specs.stats],
      out_specs=specs.rows,
      scratch_shapes=[
          pltpu.VMEM((bq, head_dim), jnp.float32),
          pltpu.VMEM((bq, mu.LANES), jnp.float32),
          pltpu.VMEM((bq, mu.LANES), jnp.float32),
          pltpu.VMEM((bq, mu.LANES), jnp.int32),
          pltpu.VMEM((bq, mu.LANES), jnp.int32),
      ],
  )
  kernel = functools.partial(_dq_kernel, sm_scale=static.sm_scale, q_tiles=q_tiles)
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=mu.compiler_params(("parallel", "parallel", "parallel", "arbitrary"),
                                         _VMEM_LIMIT_BYTES),
      interpret=mu.interpret_params(static.interpret),
      name="block_diffusion_attention_dq_tpu",
  )(runs, q_keys, kv_keys, q, k, v, d_out, lse, delta)


def _dkv_kernel(runs_ref, q_keys_ref, kv_keys_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, clean_id_ref, noisy_id_ref,
                *, sm_scale, kv_tiles):
  """dk, dv of one key tile, summed over the query tiles of every query head of its group.

  Works on [keys, queries] tiles: lse, delta and the query mask keys are (1, queries) rows as
  stored, so only the key tile's own mask keys are transposed, once per program.
  """
  b, t, group, step = (pl.program_id(0), pl.program_id(2), pl.program_id(3),
                       pl.program_id(4))
  _, masked, active = _locate(runs_ref, b * kv_tiles + t, step)
  first = (group == 0) & (step == 0)
  last = (group == pl.num_programs(3) - 1) & (step == pl.num_programs(4) - 1)

  @pl.when(first)
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)
    clean_id_ref[...] = _as_column(kv_keys_ref[bm.KV_CLEAN_ID:bm.KV_CLEAN_ID + 1, :])
    noisy_id_ref[...] = _as_column(kv_keys_ref[bm.KV_NOISY_ID:bm.KV_NOISY_ID + 1, :])

  def accumulate(apply_mask: bool):
    q = q_ref[...]
    d_out = d_out_ref[...]
    logits_t = _dot_nt(k_ref[...], q) * sm_scale
    block_q = logits_t.shape[1]
    if apply_mask:
      sees = bm.sees(q_keys_ref[bm.Q_THRESHOLD:bm.Q_THRESHOLD + 1, :],
                     q_keys_ref[bm.Q_NOISY_ID:bm.Q_NOISY_ID + 1, :],
                     _widen(clean_id_ref[...], block_q), _widen(noisy_id_ref[...], block_q))
      logits_t = jnp.where(sees, logits_t, -jnp.inf)
    p_t = jnp.exp(logits_t - lse_ref[...])
    dv_acc_ref[...] += _dot(p_t.astype(d_out.dtype), d_out)
    ds_t = p_t * (_dot_nt(v_ref[...], d_out) - delta_ref[...])
    dk_acc_ref[...] += _dot(ds_t.astype(q.dtype), q)

  pl.when(active & ~masked)(lambda: accumulate(False))
  pl.when(active & masked)(lambda: accumulate(True))

  @pl.when(last)
  def _finish():
    dk_ref[...] = (dk_acc_ref[...] * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _dkv_call(static: _Static, q, k, v, q_keys, kv_keys, d_out, lse, delta):
  batch, q_heads, q_len, head_dim = q.shape
  kv_heads, kv_len = k.shape[1], k.shape[2]
  bq, bkv = static.config.dkv_block_q, static.config.dkv_block_kv
  q_tiles, kv_tiles = q_len // bq, kv_len // bkv
  visible, full = bm.tile_visibility(q_keys, kv_keys, bq, bkv)
  runs = bm.tile_runs(jnp.swapaxes(visible, 1, 2), jnp.swapaxes(full, 1, 2),
                      bm.MAX_RUNS).reshape(-1)
  groups = static.groups

  def q_tile(b, t, step, runs_ref):
    return _locate(runs_ref, b * kv_tiles + t, step)[0]

  row_block = pl.BlockSpec(
      (None, None, bq, head_dim),
      lambda b, h, t, g, s, runs: (b, h * groups + g, q_tile(b, t, s, runs), 0))
  stat_block = pl.BlockSpec(
      (None, None, 1, bq),
      lambda b, h, t, g, s, runs: (b, h * groups + g, 0, q_tile(b, t, s, runs)))
  kv_block = pl.BlockSpec((None, None, bkv, head_dim),
                          lambda b, h, t, g, s, runs: (b, h, t, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(batch, kv_heads, kv_tiles, groups, q_tiles),
      in_specs=[
          pl.BlockSpec((None, 2, bq),
                       lambda b, h, t, g, s, runs: (b, 0, q_tile(b, t, s, runs))),
          pl.BlockSpec((None, 2, bkv), lambda b, h, t, g, s, runs: (b, 0, t)),
          row_block, kv_block, kv_block, row_block, stat_block, stat_block,
      ],
      out_specs=[kv_block, kv_block],
      scratch_shapes=[
          pltpu.VMEM((bkv, head_dim), jnp.float32),
          pltpu.VMEM((bkv, head_dim), jnp.float32),
          pltpu.VMEM((bkv, mu.LANES), jnp.int32),
          pltpu.VMEM((bkv, mu.LANES), jnp.int32),
      ],
  )
  kernel = functools.partial(_dkv_kernel, sm_scale=static.sm_scale, kv_tiles=kv_tiles)
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=mu.compiler_params(
          ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"), _VMEM_LIMIT_BYTES),
      interpret=mu.interpret_params(static.interpret),
      name="block_diffusion_attention_dkv_tpu",
  )(runs, q_keys, kv_keys, q, k, v, d_out, lse, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static: _Static, q, k, v, q_keys, kv_keys):
  return _forward_call(static, q, k, v, q_keys, kv_keys)


def _flash_fwd(static: _Static, q, k, v, q_keys, kv_keys):
  out, lse = _forward_call(static, q, k, v, q_keys, kv_keys)
  return (out, lse), (q, k, v, q_keys, kv_keys, out, lse)


def _flash_bwd(static: _Static, residuals, cotangents):
  q, k, v, q_keys, kv_keys, out, lse = residuals
  d_out, d_lse = cotangents
  # d lse_i / d logit_ij = p_ij, so an lse cotangent only shifts delta.
  delta = jnp.einsum("bhqd,bhqd->bhq", out.astype(jnp.float32),
                     d_out.astype(jnp.float32))[:, :, None, :] - d_lse
  # Rows that saw no key: p = exp(-inf - inf) = 0 instead of NaN.
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
  dq = _dq_call(static, q, k, v, q_keys, kv_keys, d_out, lse, delta)
  dk, dv = _dkv_call(static, q, k, v, q_keys, kv_keys, d_out, lse, delta)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("sm_scale", "return_lse", "interpret", "config"))
def _kernel_attention(q, k, v, q_segments, kv_segments, kv_lengths, *, sm_scale, return_lse,
                      interpret, config):
  """Pads to the tile grid and head_dim to a multiple of 128, swaps to head-major, runs."""
  _, q_len, q_heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  q_pad, kv_pad = config.padded_lengths(q_len, kv_len)
  dim_pad = mu.round_up(head_dim, mu.LANES)
  head_major = lambda x, length: jnp.swapaxes(
      jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dim_pad - head_dim))), 1, 2)
  q_keys, kv_keys = bm.encode_tokens(q_segments, kv_segments, kv_lengths, q_pad, kv_pad)
  static = _Static(sm_scale=sm_scale, groups=q_heads // kv_heads, config=config,
                   interpret=interpret)
  out, lse = _flash(static, head_major(q, q_pad), head_major(k, kv_pad),
                    head_major(v, kv_pad), q_keys, kv_keys)
  out = jnp.swapaxes(out, 1, 2)[:, :q_len, :, :head_dim]
  return (out, lse[:, :, 0, :q_len]) if return_lse else out


def _check_memory(config: TileConfig, batch, q_len, kv_len, head_dim, itemsize) -> None:
  """Raises ValueError if a kernel's tiles or schedule exceed the VMEM / SMEM budgets."""
  q_pad, kv_pad = config.padded_lengths(q_len, kv_len)
  for rows, cols, rows_len in ((config.block_q, config.block_kv, q_pad),
                               (config.dq_block_q, config.dq_block_kv, q_pad),
                               (config.dkv_block_kv, config.dkv_block_q, kv_pad)):
    vmem = vmem_bytes_estimate(rows, cols, head_dim, itemsize)
    if vmem > _VMEM_LIMIT_BYTES:
      raise ValueError(
          f"tiles {rows} x {cols} at head_dim {head_dim} need ~{vmem >> 20} MiB of VMEM, over "
          f"the {_VMEM_LIMIT_BYTES >> 20} MiB limit; use smaller tuning block_* values")
    smem = batch * (rows_len // rows) * bm.MAX_RUNS * bm.RUN_FIELDS * 4
    if smem > _SMEM_LIMIT_BYTES:
      raise ValueError(
          f"the tile schedule of batch {batch} x {rows_len} rows in tiles of {rows} takes "
          f"{smem >> 10} KiB of scalar memory, over the {_SMEM_LIMIT_BYTES >> 10} KiB limit; "
          f"use larger tuning block_* values or split the batch")


def block_diffusion_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segments: TokenBlocks,
    kv_segments: TokenBlocks,
    kv_lengths: jax.Array,
    *,
    sm_scale: float | None = None,
    return_lse: bool = False,
    interpret: bool = False,
    **tuning: int,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Block-diffusion attention on a TPU (mask in the module docstring), differentiable.

  Arguments, outputs and conventions are those of
  `pallas_kernels.flash_attention.block_diffusion_attention`, with ``interpret`` (run the
  kernels in Pallas' TPU interpret mode, on any backend) in place of ``impl`` and the fields of
  this module's TileConfig as ``tuning``.
  """
  _validate(q, k, v, q_segments, kv_segments, kv_lengths)
  unknown = set(tuning) - {f.name for f in dataclasses.fields(TileConfig)}
  if unknown:
    raise ValueError(f"unknown tuning arguments {sorted(unknown)}")
  batch, q_len, _, head_dim = q.shape
  kv_len = k.shape[1]
  config = TileConfig(**tuning).fit(q_len, kv_len)
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(head_dim)
  _check_memory(config, batch, q_len, kv_len, mu.round_up(head_dim, mu.LANES), q.dtype.itemsize)
  return _kernel_attention(
      q, k, v, q_segments, kv_segments, kv_lengths, sm_scale=float(sm_scale),
      return_lse=return_lse, interpret=bool(interpret), config=config)
