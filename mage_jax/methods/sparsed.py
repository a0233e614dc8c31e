"""SparseD under the per-block constraint: dense early steps, then a fixed set of key tiles.

The first ceil(dense_fraction * nominal_steps) steps of a block run exact attention. The last of
them also computes, per KV head, the mean alpha of every key tile and keeps the best tiles; the
remaining steps of the block attend only their rows. The step index is traced, so the three
cases (dense, dense + select, sparse) are branches of one lax.switch: one compile for all steps.
The state is the stored tile rows; whether a step attended them follows from its index.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jax import lax
import jax.numpy as jnp
import numpy as np

from mage_jax.methods import common
from mage_jax.methods.base import Selection


@dataclasses.dataclass(frozen=True)
class SparseDAttention(common.SparseMethod):
  """SparseD (dense warm-up steps, then the top key tiles by mean attention).

  Attributes:
    dense_fraction: share of nominal_steps run dense; ceil(dense_fraction * nominal_steps) steps
      (on the decimal value: 0.2 * 32 gives 7), at least 1 since the selection needs alpha.
    nominal_steps: the step count the fraction refers to (the policy's steps per block; blocks
      that finish early simply never reach the sparse steps).
    tile_size: key rows per tile; the last tile's mean is over its valid rows only.
    keep_fraction: share of the valid tiles kept, ceil(keep_fraction * tiles) (decimal value).
    budget: when set, keep budget // tile_size tiles instead (like-for-like with the token
      budgets of the other methods); must be >= tile_size.
    dense_layers: the first layers always run exact (SparseD has none: default 0; 2 matches the
      other methods).
    alpha_includes_block: alpha's normaliser, as in MageAttention (default True).
  """

  name: ClassVar[str] = "sparsed"
  budget: int | None = None
  dense_layers: int = 0
  dense_fraction: float = 0.2
  nominal_steps: int = 32
  tile_size: int = 64
  keep_fraction: float = 0.3
  alpha_includes_block: bool = True

  def __post_init__(self):
    super().__post_init__()
    common.check_positive(self, "nominal_steps", "tile_size")
    common.require(0 < self.dense_fraction <= 1, self, "dense_fraction",
                   f"must be in (0, 1], got {self.dense_fraction!r}")
    common.require(0 < self.keep_fraction <= 1, self, "keep_fraction",
                   f"must be in (0, 1], got {self.keep_fraction!r}")
    if self.budget is not None:
      common.require(self.budget >= self.tile_size, self, "budget",
                     f"must be >= tile_size={self.tile_size} (at least one tile), got "
                     f"{self.budget}")

  @property
  def dense_steps(self) -> int:
    return max(1, common.ceil_fraction(self.dense_fraction, self.nominal_steps))

  def tiles_kept(self, tiles: int) -> int:
    """Static tile slots for a cache of ``tiles`` tiles."""
    if self.budget is not None:
      return min(self.budget // self.tile_size, tiles)
    return common.ceil_fraction(self.keep_fraction, tiles)

  def slots(self, capacity):
    return self.tiles_kept(-(-capacity // self.tile_size)) * self.tile_size

  def _select_tiles(self, alpha, lengths) -> Selection:
    tiles = common.tile_rows(alpha, lengths, self.tile_size, 0.0)
    valid_rows = jnp.clip(lengths[:, None] - jnp.arange(tiles.shape[2]) * self.tile_size, 0,
                          self.tile_size)
    means = jnp.sum(tiles, axis=-1) / jnp.maximum(valid_rows, 1)[:, None, :]
    valid_tiles = common.num_tiles(lengths, self.tile_size)
    k = self.tiles_kept(tiles.shape[2])
    budgets = None
    if self.budget is None:
      table = np.array([common.ceil_fraction(self.keep_fraction, n)
                        for n in range(tiles.shape[2] + 1)], np.int32)
      budgets = jnp.asarray(table)[valid_tiles][:, None]
    chosen = common.top_rows(means, valid_tiles, k, budgets=budgets)
    return common.expand_tiles(chosen, self.tile_size, lengths)

  def attend_sparse(self, i, q, k_block, v_block, cache, state, step):

    def dense():
      return common.exact(q, k_block, v_block, cache), state

    def dense_and_select():
      out, alpha = common.exact_with_alpha(q, k_block, v_block, cache, self.alpha_includes_block)
      return out, state.set(i, self._select_tiles(alpha, cache.lengths))

    def sparse():
      return common.attend_selected(q, k_block, v_block, cache, state.get(i)), state

    last_dense = self.dense_steps - 1
    if step.first:  # step 0, known statically
      out, state = dense_and_select() if last_dense == 0 else dense()
      return out, state, None
    branch = jnp.where(step.step < last_dense, 0, jnp.where(step.step == last_dense, 1, 2))
    out, state = lax.switch(branch, [dense, dense_and_select, sparse])
    return out, state, None

  def selection(self, layer, state, step):
    rows = super().selection(layer, state, step)
    if rows is None:
      return None
    return rows._replace(whole_cache=jnp.asarray(step.step) < self.dense_steps)
