"""Exact attention: every cache row plus the block (the dense baseline)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mage_jax.methods.base import AttentionMethod
from pallas_kernels.decode_attention import exact_block_attention


@dataclasses.dataclass(frozen=True)
class ExactAttention(AttentionMethod):
  """Dense attention through the split-KV decode kernel (reference off the GPU).

  Attributes:
    impl: kernel dispatch ("auto": Pallas on GPU, plain JAX elsewhere).
  """

  name: ClassVar[str] = "exact"
  impl: str = "auto"

  def attend(self, layer, q, k_block, v_block, cache, state, step):
    del layer, step
    out = exact_block_attention(q, cache.k, cache.v, cache.lengths, k_block, v_block,
                                impl=self.impl)
    return out, state
