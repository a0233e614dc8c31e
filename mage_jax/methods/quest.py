"""Quest under the per-block constraint: pages ranked by an upper bound of their logits.

Each page of ``page_size`` cache rows keeps per-channel min and max keys. For a query q the page's
bound sum_d max(q_d * kmax_d, q_d * kmin_d) is >= q . k for every key k of the page. Quest ranks
pages per query head; a block shares one page set per KV head, so the bounds of the block's B
queries and the group's G heads are aggregated (max by default) before the top pages are kept.
The selection is recomputed at every denoising step, the first included.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from mage_jax.methods import common
from mage_jax.methods.base import WrittenRows

AGGREGATES = ("max", "mean")


class QuestState(NamedTuple):
  key_min: jax.Array  # [sparse_layers, batch, kv_heads, pages, head_dim], 0 on empty pages
  key_max: jax.Array  # same
  selections: common.LayerSelections  # the rows of the latest step, per sparse layer


def page_summaries(k_cache: jax.Array, lengths: jax.Array,
                   page_size: int) -> tuple[jax.Array, jax.Array]:
  """Per-page per-channel (min, max) of k_cache [batch, kv_heads, capacity, head_dim] over the
  rows < length: [batch, kv_heads, pages, head_dim] each, 0 on pages without a valid row."""
  key_min = jnp.min(common.tile_rows(k_cache, lengths, page_size, jnp.inf), axis=3)
  key_max = jnp.max(common.tile_rows(k_cache, lengths, page_size, -jnp.inf), axis=3)
  pages = key_min.shape[2]
  filled = (jnp.arange(pages) < common.num_tiles(lengths, page_size)[:, None])[:, None, :, None]
  return jnp.where(filled, key_min, 0), jnp.where(filled, key_max, 0)


def update_page_summaries(key_min: jax.Array, key_max: jax.Array, k_cache: jax.Array,
                          lengths: jax.Array, written: WrittenRows,
                          page_size: int) -> tuple[jax.Array, jax.Array]:
  """``page_summaries`` recomputed only on the pages a write touched.

  A write of ``written.rows`` rows from ``start`` touches at most ceil(rows / page_size) + 1
  pages from page start // page_size; every other page (rows and validity) is unchanged, so
  refreshing that static span gives the full recomputation at a cost proportional to the write,
  not to the cache (a 128K prefill in 4K chunks would otherwise re-read K 32 times per layer).
  """
  pages = key_min.shape[2]
  span = min(-(-written.rows // page_size) + 1, pages)
  first = jnp.clip(written.start // page_size, 0, pages - span)  # [batch]
  capacity = k_cache.shape[2]
  offsets = jnp.arange(span * page_size, dtype=jnp.int32)

  def one(k, length, first, kmin, kmax):  # k [h, c, d]; kmin/kmax [h, pages, d]
    rows = first * page_size + offsets
    valid = (rows < length) & (rows < capacity)
    gathered = jnp.take(k, jnp.minimum(rows, capacity - 1), axis=1).astype(jnp.float32)
    shape = (k.shape[0], span, page_size, k.shape[2])
    mask = valid[None, :, None]
    new_min = jnp.min(jnp.where(mask, gathered, jnp.inf).reshape(shape), axis=2)
    new_max = jnp.max(jnp.where(mask, gathered, -jnp.inf).reshape(shape), axis=2)
    filled = jnp.any(valid.reshape(span, page_size), axis=1)[None, :, None]
    new_min = jnp.where(filled, new_min, 0).astype(kmin.dtype)
    new_max = jnp.where(filled, new_max, 0).astype(kmax.dtype)
    return (lax.dynamic_update_slice(kmin, new_min, (0, first, 0)),
            lax.dynamic_update_slice(kmax, new_max, (0, first, 0)))

  return jax.vmap(one)(k_cache, lengths, first, key_min, key_max)


def page_bounds(q: jax.Array, key_min: jax.Array, key_max: jax.Array) -> jax.Array:
  """sum_d max(q_d kmax_d, q_d kmin_d) for q [batch, block, q_heads, head_dim] and summaries
  [batch, kv_heads, pages, head_dim]: float32 [batch, kv_heads, group, block, pages] (unscaled
  logits). Written as q+ . kmax + q- . kmin, two matmuls."""
  batch, block, q_heads, head_dim = q.shape
  kv_heads = key_min.shape[1]
  grouped = q.reshape(batch, block, kv_heads, q_heads // kv_heads, head_dim).astype(jnp.float32)
  dot = lambda a, b: jnp.einsum("bthgd,bhpd->bhgtp", a, b.astype(jnp.float32),
                                precision=lax.Precision.HIGHEST)
  return dot(jnp.maximum(grouped, 0), key_max) + dot(jnp.minimum(grouped, 0), key_min)


@dataclasses.dataclass(frozen=True)
class QuestAttention(common.SparseMethod):
  """Quest (page top-k by key bounds), one page set per (sequence, layer, KV head).

  Attributes:
    budget: token budget; max(3, budget // page_size) pages are kept, as in Quest.
    page_size: rows per page (16 in Quest).
    dense_layers: the first layers run exact attention (2 in Quest).
    aggregate: how the bounds of the block's queries and the group's heads combine into one page
      score: "max" (default: a page any query may need is kept, and the result is still a bound
      on every query's logits) or "mean".

  Page summaries are refreshed after every write (prefill chunk or committed block) on the
  pages the write touched (``update_page_summaries``); a write of unknown extent recomputes them
  from the whole layer cache.
  """

  name: ClassVar[str] = "quest"
  page_size: int = 16
  aggregate: str = "max"

  def __post_init__(self):
    super().__post_init__()
    common.check_positive(self, "page_size")
    common.require(self.aggregate in AGGREGATES, self, "aggregate",
                   f"must be one of {AGGREGATES}, got {self.aggregate!r}")

  def pages_kept(self, capacity: int) -> int:
    return min(max(3, self.budget // self.page_size), -(-capacity // self.page_size))

  def slots(self, capacity):
    return self.pages_kept(capacity) * self.page_size

  def init_state(self, cfg, batch, capacity):
    selections = super().init_state(cfg, batch, capacity)
    pages = -(-capacity // self.page_size)
    summary = jnp.zeros((selections.indices.shape[0], batch, cfg.num_kv_heads, pages,
                         cfg.head_dim), cfg.dtype)
    return QuestState(summary, summary, selections)

  def stored_selections(self, state):
    return state.selections

  def after_write(self, layer, cache, state, written=None):
    i = self.sparse_index(layer)
    if i is None:
      return state
    if written is None:
      key_min, key_max = page_summaries(cache.k, cache.lengths, self.page_size)
    else:
      key_min, key_max = update_page_summaries(state.key_min[i], state.key_max[i], cache.k,
                                               cache.lengths, written, self.page_size)
    return state._replace(key_min=state.key_min.at[i].set(key_min.astype(state.key_min.dtype)),
                          key_max=state.key_max.at[i].set(key_max.astype(state.key_max.dtype)))

  def attend_sparse(self, i, q, k_block, v_block, cache, state, step):
    del step
    bounds = page_bounds(q, state.key_min[i], state.key_max[i])
    scores = jnp.max(bounds, axis=(2, 3)) if self.aggregate == "max" else jnp.mean(bounds, (2, 3))
    pages = common.top_rows(scores, common.num_tiles(cache.lengths, self.page_size),
                            self.pages_kept(cache.k.shape[2]))
    rows = common.expand_tiles(pages, self.page_size, cache.lengths)
    out = common.attend_selected(q, k_block, v_block, cache, rows)
    return out, state._replace(selections=state.selections.set(i, rows)), None
