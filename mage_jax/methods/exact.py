"""Exact attention: every cache row plus the block (the dense baseline)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mage_jax.methods import common
from mage_jax.methods.base import AttentionMethod


@dataclasses.dataclass(frozen=True)
class ExactAttention(AttentionMethod):
  """Dense attention through the split-KV decode kernel (reference off the GPU)."""

  name: ClassVar[str] = "exact"

  def attend(self, layer, q, k_block, v_block, cache, state, step):
    del layer, step
    return common.exact(q, k_block, v_block, cache), state, None
