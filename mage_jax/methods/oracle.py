"""Oracle: the exact top-k rows of every step (the recall reference; not a practical method,
since finding them costs a full attention pass per step)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mage_jax.methods import common
from mage_jax.methods.base import AttentionMethod


@dataclasses.dataclass(frozen=True)
class OracleAttention(AttentionMethod):
  """At every step and sparse layer: exact alpha, its top ``budget`` rows per KV head, then
  sparse attention over them (so the output shows what the best budget-row set gives).

  Attributes:
    budget: rows per (sequence, layer, KV head).
    dense_layers: the first layers run exact attention.
    alpha_includes_block: alpha's normaliser, as in MageAttention (default True).
    impl: kernel dispatch.
  """

  name: ClassVar[str] = "oracle"
  budget: int = 512
  dense_layers: int = 2
  alpha_includes_block: bool = True
  impl: str = "auto"

  def __post_init__(self):
    common.check_positive(self, "budget")

  def init_state(self, cfg, batch, capacity):
    common.check_dense_layers(self, cfg)
    return common.LayerSelections.empty(cfg.num_layers - self.dense_layers, batch,
                                        cfg.num_kv_heads, min(self.budget, capacity))

  def attend(self, layer, q, k_block, v_block, cache, state, step):
    del step
    if layer < self.dense_layers:
      return common.exact(q, k_block, v_block, cache, self.impl), state
    _, alpha = common.exact_with_alpha(q, k_block, v_block, cache, self.alpha_includes_block,
                                       self.impl)
    rows = common.top_rows(alpha, cache.lengths, state.indices.shape[-1], self.impl)
    out = common.attend_selected(q, k_block, v_block, cache, rows, self.impl)
    return out, state.set(layer - self.dense_layers, rows)

  def selection(self, layer, state):
    if layer < self.dense_layers:
      return None
    return state.get(layer - self.dense_layers)
