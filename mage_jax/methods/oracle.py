"""Oracle: the exact top-k rows of every step (the recall reference; not a practical method,
since finding them costs a full attention pass per step)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mage_jax.methods import common


@dataclasses.dataclass(frozen=True)
class OracleAttention(common.SparseMethod):
  """At every step and sparse layer: exact alpha, its top ``budget`` rows per KV head, then
  sparse attention over them (so the output shows what the best budget-row set gives).

  Attributes:
    budget, dense_layers: as for every sparse method (common.SparseMethod).
    alpha_includes_block: alpha's normaliser, as in MageAttention (default True).
  """

  name: ClassVar[str] = "oracle"
  alpha_includes_block: bool = True

  def attend_sparse(self, i, q, k_block, v_block, cache, state, step):
    del step
    _, alpha = common.exact_with_alpha(q, k_block, v_block, cache, self.alpha_includes_block)
    rows = common.top_rows(alpha, cache.lengths, state.indices.shape[-1])
    out = common.attend_selected(q, k_block, v_block, cache, rows)
    return out, state.set(i, rows), None
