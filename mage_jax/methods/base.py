"""The interface between the model and the attention methods (exact, MAGE, baselines).

During a denoising step the model hands each layer's block queries, the block's own keys and
values, and the layer's cache to ``AttentionMethod.attend``; the method decides which cache rows
are attended and returns the output, its updated state and what the step measured. Methods are
frozen dataclasses: their fields are static configuration, hashed into the jit cache key, so
each distinct configuration compiles once. The kernels they call follow the kernel setting
(pallas_kernels.dispatch), not a field.

The contract of a method's state and statistics:
  * the state is a pytree of arrays that the decoding loop carries (selected indices and counts,
    page summaries, ...). ``attend``, ``after_step`` and ``after_write`` return a state with the
    structure, shapes and dtypes of ``init_state``'s: the loop carries it through
    ``lax.while_loop``, whose carry cannot change type. ``check_state`` enforces it at trace
    time, naming the method and the hook that broke it;
  * what one step measures and only the step's end consumes (MAGE's first-step alpha) is not
    state: ``attend`` returns it as the layer's *stats*, the loop collects them into a dict
    {layer: stats} (layers that returned None left out) and hands it to ``after_step(state,
    stats)``, which folds it into the state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, NamedTuple

import jax
import jax.numpy as jnp

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
             cache: LayerCache, state: Any, step: StepInfo) -> tuple[jax.Array, Any, Any]:
    """Attention of the block's queries over (a subset of) the cache plus the block itself.

    q: [batch, block, q_heads, head_dim]; k_block, v_block: [batch, block, kv_heads, head_dim].
    Returns (out [batch, block, q_heads, head_dim], new state, stats): stats is what this layer
    measured for ``after_step`` (None: nothing).
    """
    raise NotImplementedError(f"{type(self).__name__} does not define attend")

  def selection(self, layer: int, state: Any, step: StepInfo) -> Selection | None:
    """The rows ``layer`` attended at ``step``, read from the state its ``attend`` returned;
    None where the layer attended the whole cache by construction (exact, dense layers, MAGE's
    first step).

    Lets a recall probe compare a method's choice with the oracle's, whatever the method."""
    del layer, state, step
    return None

  def after_step(self, state: Any, stats: Mapping[int, Any]) -> Any:
    """Called once after every denoising forward, when all layers have run, with the stats of
    the layers that returned some (e.g. per-layer statistics of the first step, turned into
    selections or budgets that depend on every layer)."""
    del stats
    return state

  def after_write(self, layer: int, cache: LayerCache, state: Any,
                  written: WrittenRows | None = None) -> Any:
    """Called after a prefill chunk or a committed block was written to ``cache``; ``written``
    says where (None: anywhere, e.g. a cache filled outside the decoding loop)."""
    del layer, cache, written
    return state


def check_state(method: AttentionMethod, hook: str, before: Any, after: Any) -> None:
  """Raises ValueError naming ``method`` and ``hook`` unless ``after`` has ``before``'s pytree
  structure, shapes and dtypes (the contract above; checked while tracing, free at run time)."""
  signature = lambda tree: (jax.tree.structure(tree),
                            [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)])
  if signature(before) != signature(after):
    raise ValueError(
        f"{type(method).__name__}.{hook} changed its state's structure (a method's state keeps "
        f"init_state's pytree structure, shapes and dtypes: mage_jax/methods/base.py): "
        f"{jax.tree.structure(before)} -> {jax.tree.structure(after)}")
