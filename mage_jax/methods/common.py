"""Pieces the sparse methods share: config checks, per-layer selection storage, top-k over
tokens or tiles, and the attention calls, so every method selects and attends through the same
kernels (like-for-like comparisons)."""

from __future__ import annotations

import fractions
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mage_jax.config import ModelConfig
from mage_jax.kv_cache import LayerCache
from mage_jax.methods.base import Selection
from pallas_kernels.decode_attention import exact_block_attention, mask_step_attention
from pallas_kernels.sparse_attention import sparse_block_attention
from pallas_kernels.topk import select_kv_indices


def require(ok: bool, method: object, field: str, why: str) -> None:
  """Raises ValueError naming ``method``'s ``field`` unless ``ok``."""
  if not ok:
    raise ValueError(f"{type(method).__name__}.{field}: {why}")


def check_positive(method: object, *fields: str) -> None:
  for field in fields:
    value = getattr(method, field)
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, method, field,
            f"must be an int >= 1, got {value!r}")


def check_dense_layers(method: object, cfg: ModelConfig) -> None:
  dense = method.dense_layers
  require(isinstance(dense, int) and 0 <= dense <= cfg.num_layers, method, "dense_layers",
          f"must be in [0, num_layers={cfg.num_layers}], got {dense!r}")


def ceil_fraction(fraction: float, n: int) -> int:
  """ceil(fraction * n) on the decimal value of ``fraction`` (0.3 * 10 is 3, not 4)."""
  return math.ceil(fractions.Fraction(repr(fraction)) * n)


class LayerSelections(NamedTuple):
  """One selection per sparse layer, stacked: layer ``i`` of the stack is model layer
  ``dense_layers + i``."""

  indices: jax.Array  # int32 [sparse_layers, batch, kv_heads, K]
  counts: jax.Array  # int32 [sparse_layers, batch, kv_heads]

  @classmethod
  def empty(cls, layers: int, batch: int, kv_heads: int, slots: int) -> "LayerSelections":
    return cls(jnp.zeros((layers, batch, kv_heads, slots), jnp.int32),
               jnp.zeros((layers, batch, kv_heads), jnp.int32))

  def get(self, i: int) -> Selection:
    return Selection(self.indices[i], self.counts[i])

  def set(self, i: int, selection: Selection) -> "LayerSelections":
    return LayerSelections(self.indices.at[i].set(selection.indices),
                           self.counts.at[i].set(selection.counts))


def exact(q, k_block, v_block, cache: LayerCache, impl: str) -> jax.Array:
  return exact_block_attention(q, cache.k, cache.v, cache.lengths, k_block, v_block, impl=impl)


def exact_with_alpha(q, k_block, v_block, cache: LayerCache, alpha_includes_block: bool,
                     impl: str) -> tuple[jax.Array, jax.Array]:
  """(exact output, alpha [batch, kv_heads, capacity]) through the mask-step kernel."""
  return mask_step_attention(q, cache.k, cache.v, cache.lengths, k_block, v_block,
                             alpha_includes_block=alpha_includes_block, impl=impl)


def attend_selected(q, k_block, v_block, cache: LayerCache, selection: Selection,
                    impl: str) -> jax.Array:
  return sparse_block_attention(q, cache.k, cache.v, selection.indices, selection.counts,
                                k_block, v_block, impl=impl)


def top_rows(scores: jax.Array, lengths: jax.Array, k: int, impl: str,
             budgets: jax.Array | None = None) -> Selection:
  """The k (or ``budgets``) best of scores [batch, kv_heads, n] among the first lengths[b]."""
  indices, counts = select_kv_indices(scores, lengths[:, None], k, budgets=budgets, impl=impl)
  return Selection(indices, counts)


def num_tiles(lengths: jax.Array, tile_size: int) -> jax.Array:
  """Tiles (pages) holding at least one valid row."""
  return (lengths + tile_size - 1) // tile_size


def tile_rows(cache_rows: jax.Array, lengths: jax.Array, tile_size: int, fill: float):
  """cache_rows [batch, kv_heads, capacity, ...] padded to whole tiles and reshaped to
  [batch, kv_heads, tiles, tile_size, ...], rows >= length replaced by ``fill``."""
  batch, kv_heads, capacity = cache_rows.shape[:3]
  tiles = -(-capacity // tile_size)
  pad = [(0, 0), (0, 0), (0, tiles * tile_size - capacity)] + [(0, 0)] * (cache_rows.ndim - 3)
  rows = jnp.pad(cache_rows, pad)
  valid = jnp.arange(tiles * tile_size) < lengths[:, None]
  valid = valid.reshape((batch, 1, tiles * tile_size) + (1,) * (cache_rows.ndim - 3))
  rows = jnp.where(valid, rows, jnp.asarray(fill, rows.dtype))
  return rows.reshape((batch, kv_heads, tiles, tile_size) + cache_rows.shape[3:])


def expand_tiles(tiles: Selection, tile_size: int, lengths: jax.Array) -> Selection:
  """Token rows of the selected tiles (ascending), keeping rows < length.

  Only the last valid tile can be partial, and tiles come ascending, so the rows dropped sit at
  the end: the kept rows fill the first counts slots as the kernels require."""
  batch, kv_heads, k = tiles.indices.shape
  offsets = jnp.arange(tile_size, dtype=jnp.int32)
  rows = (tiles.indices[..., None] * tile_size + offsets).reshape(batch, kv_heads, k * tile_size)
  slot_tile = jnp.arange(k * tile_size, dtype=jnp.int32) // tile_size
  valid = (slot_tile < tiles.counts[..., None]) & (rows < lengths[:, None, None])
  return Selection(jnp.where(valid, rows, 0),
                   jnp.sum(valid, axis=-1, dtype=jnp.int32))
