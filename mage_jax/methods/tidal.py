"""TidalDecode under the per-block constraint: token top-k at two full-attention layers, reused
by the layers after them.

Layers below the selection layer run exact attention. The selection layer and the correction
layer run exact attention through the mask-step kernel and keep the top ``budget`` rows of alpha
per KV head; every other layer attends the most recent of those selections (the selection
layer's for the layers up to the correction layer, the correction layer's after it). Everything
is recomputed at every denoising step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from mage_jax.methods import common
from mage_jax.methods.base import AttentionMethod, Selection


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TidalState:
  indices: jax.Array  # int32 [batch, kv_heads, K]: the latest selection
  counts: jax.Array  # int32 [batch, kv_heads]
  # The correction layer for this model's depth: static, so attend can branch on it.
  correction_layer: int = dataclasses.field(metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class TidalAttention(AttentionMethod):
  """TidalDecode (selection + correction layer), one token set per (sequence, KV head).

  Attributes:
    budget: rows per KV head.
    dense_layers: the first layers run exact attention (layers 0-1 in TidalDecode); layers
      between dense_layers and selection_layer have no selection yet and also run exact.
    selection_layer: the first token-selection layer (2).
    correction_layer: the correction layer at ``reference_depth`` layers (13 of 28, Qwen2.5);
      a model with L layers uses floor(correction_layer * L / reference_depth + 1/2), which must
      fall strictly between selection_layer and L.
    reference_depth: the depth correction_layer was chosen for.
    alpha_includes_block: alpha's normaliser, as in MageAttention (default True).
  """

  name: ClassVar[str] = "tidal"
  budget: int = 512
  dense_layers: int = 2
  selection_layer: int = 2
  correction_layer: int = 13
  reference_depth: int = 28
  alpha_includes_block: bool = True

  def __post_init__(self):
    common.check_positive(self, "budget", "correction_layer", "reference_depth")
    common.require(isinstance(self.dense_layers, int) and
                   0 <= self.dense_layers <= self.selection_layer, self, "dense_layers",
                   f"must be in [0, selection_layer={self.selection_layer}], got "
                   f"{self.dense_layers!r}")

  def correction_for(self, num_layers: int) -> int:
    return math.floor(self.correction_layer * num_layers / self.reference_depth + 0.5)

  def init_state(self, cfg, batch, capacity):
    common.check_dense_layers(self, cfg)
    correction = self.correction_for(cfg.num_layers)
    common.require(self.selection_layer < correction < cfg.num_layers, self, "correction_layer",
                   f"scaled to {correction} for {cfg.num_layers} layers; it must lie in "
                   f"(selection_layer={self.selection_layer}, {cfg.num_layers})")
    slots = min(self.budget, capacity)
    return TidalState(jnp.zeros((batch, cfg.num_kv_heads, slots), jnp.int32),
                      jnp.zeros((batch, cfg.num_kv_heads), jnp.int32), correction)

  def attend(self, layer, q, k_block, v_block, cache, state, step):
    del step
    if layer < self.selection_layer:
      return common.exact(q, k_block, v_block, cache), state, None
    if layer in (self.selection_layer, state.correction_layer):
      out, alpha = common.exact_with_alpha(q, k_block, v_block, cache, self.alpha_includes_block)
      rows = common.top_rows(alpha, cache.lengths, state.indices.shape[-1])
      return out, dataclasses.replace(state, indices=rows.indices, counts=rows.counts), None
    rows = Selection(state.indices, state.counts)
    return common.attend_selected(q, k_block, v_block, cache, rows), state, None

  def selection(self, layer, state, step):
    del step
    if layer <= self.selection_layer or layer == state.correction_layer:
      return None
    return Selection(state.indices, state.counts)
