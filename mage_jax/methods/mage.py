"""MAGE: select each block's KV subset from the exact attention of its All-[MASK] first step.

Fixed budget (v2, eq. 5): at the first step every sparse layer runs exact attention through the
mask-step kernel, which also returns alpha (the block-and-group mean attention probability of
each cache row); the top ``budget`` rows of alpha per KV head are stored and every later step of
the block attends only them (plus the block itself). The selection runs once for all layers,
after the step (``after_step``, from the alphas the layers returned as stats): one call over
layers x batch x KV heads rows keeps the GPU busy where one layer's few rows (2 at batch 1)
leave it launch-bound, and the result is the same.

Layer-adaptive budget (v1, Algorithm 1), ``adaptive=True``: at the first step each layer also
measures, per KV head, the union U_h of its queries' local top-K' rows and the layer score
s_l = max_h |U_h| (1 - log p_h), p_h = sum of alpha over U_h (alpha is already the mean over the
G*B queries, so this is the v1 coverage). After the step (``after_step``), when every layer's
score is known, layer l gets K_l = max(K_min, floor(s_l / sum(s) * K * L')) rows, the best of U_h
by vote score, padded with the most recent rows when |U_h| < K_l.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from mage_jax.methods import common
from mage_jax.methods.base import Selection


class FirstStepAlpha(NamedTuple):
  """A sparse layer's stats at the first step (fixed budget): its alpha and the cache lengths
  it covers."""

  alpha: jax.Array  # float32 [batch, kv_heads, capacity]
  lengths: jax.Array  # int32 [batch]


class Candidates(NamedTuple):
  """A sparse layer's stats at the first step (adaptive budget): its best ``slots`` rows by
  vote score (ascending), their scores, and the layer score; ``after_step`` narrows them to
  each layer's budget once every layer's score is known."""

  rows: Selection
  scores: jax.Array  # float32 [batch, kv_heads, slots]
  layer_score: jax.Array  # float32 [batch]: s_l


def adaptive_budgets(layer_scores: jax.Array, budget: int, min_budget: int,
                     max_budget: int) -> jax.Array:
  """K_l = clip(max(K_min, floor(s_l / sum(s) * K * L')), max_budget) per layer and sequence.

  layer_scores: [layers, batch]. Flooring leaves sum(K_l) up to L' below K * L'; K_min can raise
  it and the static cap lower it. A sequence whose scores are all 0 (empty cache) gets K."""
  layers = layer_scores.shape[0]
  total = jnp.sum(layer_scores, axis=0, keepdims=True)
  share = layer_scores / jnp.where(total > 0, total, 1.0)
  budgets = jnp.floor(share * (budget * layers)).astype(jnp.int32)
  budgets = jnp.where(total > 0, jnp.maximum(budgets, min_budget), budget)
  return jnp.minimum(budgets, max_budget)


@dataclasses.dataclass(frozen=True)
class MageAttention(common.SparseMethod):
  """MAGE, fixed or layer-adaptive budget.

  Attributes:
    budget: K, rows per (sequence, layer, KV head); with ``adaptive`` the average over the sparse
      layers. A budget above the context selects every row.
    dense_layers: the first layers always run exact attention (2 in the paper).
    alpha_includes_block: whether alpha's softmax normaliser includes the block's own keys.
      Default True: the paper's "everything the query attends to", so a query that mostly
      attends inside its block weighs less in alpha; False normalises each query over the cache
      rows only (every query weighs the same). Not published; the ranking differs only through
      that per-query weighting.
    adaptive: v1's layer-adaptive budgets instead of a fixed K per layer.
    query_budget: K', each query's local top-K' in the adaptive union; default K (the per-query
      analogue of the shared budget: not published).
    min_budget: K_min of the adaptive budgets; default K // 4 (not published).
    max_budget_factor: adaptive K_l are capped at this many times K, the static number of
      index slots (memory and sparse-kernel work scale with it).
  """

  name: ClassVar[str] = "mage"
  alpha_includes_block: bool = True
  adaptive: bool = False
  query_budget: int | None = None
  min_budget: int | None = None
  max_budget_factor: int = 4

  def __post_init__(self):
    super().__post_init__()
    common.check_positive(self, "max_budget_factor")
    for field in ("query_budget", "min_budget"):
      if getattr(self, field) is not None:
        common.check_positive(self, field)
    common.require(self.k_min <= self.budget, self, "min_budget",
                   f"must be <= budget={self.budget}, got {self.k_min}")

  @property
  def k_query(self) -> int:
    return self.query_budget or self.budget

  @property
  def k_min(self) -> int:
    return self.min_budget if self.min_budget is not None else max(1, self.budget // 4)

  def slots(self, capacity: int) -> int:
    most = self.budget * self.max_budget_factor if self.adaptive else self.budget
    return min(most, capacity)

  def attend_sparse(self, i, q, k_block, v_block, cache, state, step):
    if not step.first:
      return common.attend_selected(q, k_block, v_block, cache, state.get(i)), state, None
    out, alpha = common.exact_with_alpha(q, k_block, v_block, cache, self.alpha_includes_block)
    if not self.adaptive:
      return out, state, FirstStepAlpha(alpha, cache.lengths)
    return out, state, self._candidates(q, cache, alpha, self.slots(cache.k.shape[2]))

  def _candidates(self, q, cache, alpha, slots) -> Candidates:
    """The first-step statistics of one layer."""
    batch, block, q_heads, head_dim = q.shape
    kv_heads, capacity = cache.k.shape[1], cache.k.shape[2]
    group = q_heads // kv_heads
    # A query's top-K' by probability is its top-K' by logit, whatever the normaliser.
    grouped = q.reshape(batch, block, kv_heads, group, head_dim)
    logits = jnp.einsum("bthgd,bhjd->bhgtj", grouped, cache.k, preferred_element_type=jnp.float32,
                        precision=lax.Precision.HIGHEST)
    logits = logits.reshape(batch, kv_heads, group * block, capacity)
    picked, picked_counts = common.top_k_per_head(logits, cache.lengths[:, None, None],
                                                  self.k_query)
    used = jnp.arange(self.k_query) < picked_counts[..., None]
    b = jnp.arange(batch)[:, None, None, None]
    h = jnp.arange(kv_heads)[None, :, None, None]
    votes = jnp.zeros((batch, kv_heads, capacity), jnp.int32).at[b, h, picked].add(
        used.astype(jnp.int32))
    union = votes > 0
    size = jnp.sum(union, axis=-1).astype(jnp.float32)
    coverage = jnp.sum(jnp.where(union, alpha, 0.0), axis=-1)
    head_scores = jnp.where(size > 0, size * (1.0 - jnp.log(jnp.maximum(coverage, 1e-30))), 0.0)
    # Vote score: votes first, ties by alpha (scaled into [0, 0.5), below one vote); rows outside
    # the union rank below every union row, the most recent first (the padding rule).
    peak = jnp.max(alpha, axis=-1, keepdims=True)
    tie = 0.5 * alpha / jnp.where(peak > 0, peak, 1.0)
    recency = (jnp.arange(capacity) - capacity).astype(jnp.float32)
    score = jnp.where(union, votes + tie, recency)
    candidates = common.top_rows(score, cache.lengths, slots)
    return Candidates(candidates, jnp.take_along_axis(score, candidates.indices, axis=-1),
                      jnp.max(head_scores, axis=-1))

  def after_step(self, state, stats):
    """Selects the rows of every sparse layer the first step ran, in one selection call."""
    if not stats:
      return state
    layers = sorted(stats)
    at = jnp.asarray([self.sparse_index(layer) for layer in layers])
    stack = lambda field: jnp.stack([getattr(stats[layer], field) for layer in layers])
    slots = state.indices.shape[-1]
    if not self.adaptive:  # every layer of a step sees the same cache lengths
      lengths = stats[layers[0]].lengths[None, :, None]
      indices, counts = common.top_k_per_head(stack("alpha"), lengths, slots, leading=("layers",))
    else:
      candidates = jnp.stack([stats[layer].rows.indices for layer in layers])
      candidate_counts = jnp.stack([stats[layer].rows.counts for layer in layers])
      budgets = adaptive_budgets(stack("layer_score"), self.budget, self.k_min, slots)
      # Candidates are ascending by row, so the chosen slots, ascending, stay ascending by row.
      chosen, counts = common.top_k_per_head(stack("scores"), candidate_counts, slots,
                                             budgets=budgets[..., None], leading=("layers",))
      indices = jnp.take_along_axis(candidates, chosen, axis=-1)
      indices = jnp.where(jnp.arange(slots) < counts[..., None], indices, 0)
    return common.LayerSelections(state.indices.at[at].set(indices),
                                  state.counts.at[at].set(counts))

  def selection(self, layer, state, step):
    if step.first:
      return None  # the first step attends exactly; after_step selects
    return super().selection(layer, state, step)
