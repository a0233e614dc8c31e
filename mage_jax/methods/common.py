"""Pieces the sparse methods share: the sparse-method base (dense layers, per-layer selection
storage), config checks, top-k over tokens or tiles, and the attention calls, so every method
selects and attends through the same kernels (like-for-like comparisons). The kernels run as the
kernel setting says (pallas_kernels.dispatch)."""

from __future__ import annotations

import dataclasses
import fractions
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mage_jax import sharding
from mage_jax.config import ModelConfig
from mage_jax.kv_cache import LayerCache
from mage_jax.methods.base import AttentionMethod, Selection, StepInfo
from mage_jax.sharding import (CACHE_AXES, KV_AXES, PER_HEAD_AXES, Q_AXES, ROWS_AXES,
                               SELECTION_AXES)
from pallas_kernels.decode_attention import exact_block_attention, mask_step_attention
from pallas_kernels.dispatch import active_impl
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

  # Logical axes per field (mage_jax.sharding.constrain_state).
  AXES = (("layers",) + SELECTION_AXES, ("layers",) + PER_HEAD_AXES)

  def get(self, i: int) -> Selection:
    return Selection(self.indices[i], self.counts[i])

  def set(self, i: int, selection: Selection) -> "LayerSelections":
    return LayerSelections(self.indices.at[i].set(selection.indices),
                           self.counts.at[i].set(selection.counts))


@dataclasses.dataclass(frozen=True)
class SparseMethod(AttentionMethod):
  """Base of the methods that keep one selection per sparse layer (MAGE, Quest, SparseD, the
  oracle): the first ``dense_layers`` layers attend exactly; layer ``dense_layers + i`` is
  sparse layer i, whose latest rows are ``LayerSelections`` entry i of the state. A method
  defines only its rule: ``slots`` (static index slots) and ``attend_sparse``; one whose state
  holds more than the selections overrides ``init_state`` and ``stored_selections``.

  Attributes:
    budget: K, cache rows per (sequence, layer, KV head).
    dense_layers: the first layers always run exact attention (2 in the MAGE paper).
  """

  budget: int | None = 512
  dense_layers: int = 2

  def __post_init__(self):
    if self.budget is not None:
      check_positive(self, "budget")

  def slots(self, capacity: int) -> int:
    """Static index slots per (sparse layer, sequence, KV head)."""
    return min(self.budget, capacity)

  def sparse_index(self, layer: int) -> int | None:
    """Layer ``layer``'s index among the sparse layers (None for a dense layer)."""
    return layer - self.dense_layers if layer >= self.dense_layers else None

  def init_state(self, cfg, batch, capacity):
    check_dense_layers(self, cfg)
    per_head = (cfg.num_layers - self.dense_layers, batch, cfg.num_kv_heads)
    return LayerSelections(jnp.zeros(per_head + (self.slots(capacity),), jnp.int32),
                           jnp.zeros(per_head, jnp.int32))

  def stored_selections(self, state: Any) -> "LayerSelections":
    return state

  def attend(self, layer, q, k_block, v_block, cache, state, step):
    i = self.sparse_index(layer)
    if i is None:
      return exact(q, k_block, v_block, cache), state, None
    return self.attend_sparse(i, q, k_block, v_block, cache, state, step)

  def attend_sparse(self, i: int, q, k_block, v_block, cache: LayerCache, state: Any,
                    step: StepInfo) -> tuple[jax.Array, Any, Any]:
    """``attend`` of sparse layer ``i``: (out, state, stats)."""
    raise NotImplementedError(f"{type(self).__name__} does not define attend_sparse")

  def selection(self, layer, state, step):
    i = self.sparse_index(layer)
    return None if i is None else self.stored_selections(state).get(i)


# The kernel calls below run per (batch, KV head) shard under a mesh (sharding.shard_kernel).
_CACHE = LayerCache(CACHE_AXES, CACHE_AXES, ("batch",))


def exact(q, k_block, v_block, cache: LayerCache) -> jax.Array:
  def call(q, k_block, v_block, cache):
    return exact_block_attention(q, cache.k, cache.v, cache.lengths, k_block, v_block,
                                 impl=active_impl())

  return sharding.shard_kernel(call, (Q_AXES, KV_AXES, KV_AXES, _CACHE), Q_AXES)(
      q, k_block, v_block, cache)


def exact_with_alpha(q, k_block, v_block, cache: LayerCache,
                     alpha_includes_block: bool) -> tuple[jax.Array, jax.Array]:
  """(exact output, alpha [batch, kv_heads, capacity]) through the mask-step kernel."""

  def call(q, k_block, v_block, cache):
    return mask_step_attention(q, cache.k, cache.v, cache.lengths, k_block, v_block,
                               alpha_includes_block=alpha_includes_block, impl=active_impl())

  return sharding.shard_kernel(call, (Q_AXES, KV_AXES, KV_AXES, _CACHE), (Q_AXES, ROWS_AXES))(
      q, k_block, v_block, cache)


def attend_selected(q, k_block, v_block, cache: LayerCache, selection: Selection) -> jax.Array:
  def call(q, k_block, v_block, cache, indices, counts):
    return sparse_block_attention(q, cache.k, cache.v, indices, counts, k_block, v_block,
                                  impl=active_impl())

  in_axes = (Q_AXES, KV_AXES, KV_AXES, _CACHE, SELECTION_AXES, PER_HEAD_AXES)
  return sharding.shard_kernel(call, in_axes, Q_AXES)(q, k_block, v_block, cache,
                                                      selection.indices, selection.counts)


def top_k_per_head(scores: jax.Array, lengths: jax.Array, k: int,
                   budgets: jax.Array | None = None,
                   leading: tuple[str | None, ...] = ()) -> tuple[jax.Array, jax.Array]:
  """select_kv_indices over scores [*leading, batch, kv_heads, *rest, n], per shard.

  ``lengths`` and ``budgets`` broadcast to the rows; their dimensions of size 1 are broadcast
  dimensions and never split."""
  rows = leading + ("batch", "kv_heads") + (None,) * (scores.ndim - len(leading) - 3)
  broadcast = lambda x: tuple(a if n > 1 else None for a, n in zip(rows, jnp.shape(x)))
  args, in_axes = [scores, lengths], [rows + (None,), broadcast(lengths)]
  if budgets is not None:
    args.append(budgets)
    in_axes.append(broadcast(budgets))

  def call(scores, lengths, budgets=None):
    return select_kv_indices(scores, lengths, k, budgets=budgets, impl=active_impl())

  return sharding.shard_kernel(call, tuple(in_axes), (rows + ("slots",), rows))(*args)


def top_rows(scores: jax.Array, lengths: jax.Array, k: int,
             budgets: jax.Array | None = None) -> Selection:
  """The k (or ``budgets``) best of scores [batch, kv_heads, n] among the first lengths[b]."""
  return Selection(*top_k_per_head(scores, lengths[:, None], k, budgets))


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
