"""The interface between the model and the attention methods (exact, MAGE, baselines).

During a denoising step the model hands each layer's block queries, the block's own keys and
values, and the layer's cache to ``AttentionMethod.attend``; the method decides which cache rows
are attended and returns the output and its updated state. The state is a pytree that the
decoding loop carries (selected indices and valid counts, page summaries, ...), with static
shapes. Methods are frozen dataclasses: their fields are static configuration, hashed into the
jit cache key, so each distinct configuration compiles once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax

from mage_jax.config import ModelConfig
from mage_jax.kv_cache import LayerCache


class Selection(NamedTuple):
  """The cache rows one layer attends, per (sequence, KV head): shared by the block's queries
  and the G query heads of the group."""

  indices: jax.Array  # int32 [batch, kv_heads, K]: row ids, ascending in the first counts slots
  counts: jax.Array  # int32 [batch, kv_heads]: valid slots
  # bool scalar: this step attended the whole cache instead (SparseD's dense steps)
  whole_cache: jax.Array | bool = False


class WrittenRows(NamedTuple):
  """Where a write put its rows: ``rows`` (static) consecutive positions from ``start`` [batch]
  per sequence (prefill chunks and commits both write contiguous runs; padded or finished
  sequences' rows are dropped, leaving those positions as they were)."""

  start: jax.Array  # int32 [batch]
  rows: int


class StepInfo(NamedTuple):
  """Where a denoising step sits inside its block."""

  first: bool  # static: the block's first (All-[MASK]) step
  step: jax.Array  # int32 scalar: index of this step within the block (0 for the first)


@dataclasses.dataclass(frozen=True)
class AttentionMethod:
  """Base class: no state and no-op hooks; every method defines ``attend``."""

  name: ClassVar[str] = "base"

  def init_state(self, cfg: ModelConfig, batch: int, capacity: int) -> Any:
    """The method's state for a fresh cache (a pytree of arrays with static shapes)."""
    del cfg, batch, capacity
    return ()

  def attend(self, layer: int, q: jax.Array, k_block: jax.Array, v_block: jax.Array,
             cache: LayerCache, state: Any, step: StepInfo) -> tuple[jax.Array, Any]:
    """Attention of the block's queries over (a subset of) the cache plus the block itself.

    q: [batch, block, q_heads, head_dim]; k_block, v_block: [batch, block, kv_heads, head_dim].
    Returns (out [batch, block, q_heads, head_dim], new state).
    """
    raise NotImplementedError(f"{type(self).__name__} does not define attend")

  def selection(self, layer: int, state: Any) -> Selection | None:
    """The rows ``layer`` attended at its latest ``attend`` call, read from the state it
    returned; None where the layer always attends the whole cache (exact, dense layers).

    Lets a recall probe compare a method's choice with the oracle's, whatever the method."""
    del layer, state
    return None

  def after_step(self, state: Any, step: StepInfo) -> Any:
    """Called once after every denoising forward, when all layers have run (e.g. to turn
    per-layer statistics of the first step into budgets that depend on every layer)."""
    del step
    return state

  def after_write(self, layer: int, cache: LayerCache, state: Any,
                  written: WrittenRows | None = None) -> Any:
    """Called after a prefill chunk or a committed block was written to ``cache``; ``written``
    says where (None: anywhere, e.g. a cache filled outside the decoding loop)."""
    del layer, cache, written
    return state
