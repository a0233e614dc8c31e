"""Recall of a sparse method's KV subsets against the per-step oracle, along a real trajectory.

`RecallProbe` wraps any method and is itself an `AttentionMethod`: it lets the inner method
attend (so decoding follows the inner method's own trajectory) and, at every step after a
block's first, computes the exact alpha of that step and layer, the oracle set (top ``budget``
rows of alpha per KV head) and compares it with the rows the inner method attended
(`AttentionMethod.selection`). Sums accumulate in the state, so everything stays inside the
jitted loop and `generate` hands the totals back in ``method_state``.

Per (sequence, KV head, step, layer), with S the method's rows and O the oracle's:
  index recall = |S ∩ O| / |O|;
  mass recall  = sum of alpha over S / sum of alpha over the cache (the share of the step's
                 cache attention mass that the method's rows carry).
Steps whose cache is empty (a sequence's first block without a full prompt block) have no O
and are not counted. Layers whose ``selection`` is None attend the whole cache: reported dense.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mage_jax.generate import DecodeOptions, generate, plan_request
from mage_jax.methods import common
from mage_jax.methods.base import AttentionMethod, Selection
from mage_jax.model import Transformer


class RecallTotals(NamedTuple):
  index: jax.Array  # float32 [layers]: sum of index recall over the measured samples
  mass: jax.Array  # float32 [layers]: sum of mass recall
  samples: jax.Array  # float32 [layers]: measured (sequence, KV head, step) triples


def membership(selection: Selection, lengths: jax.Array, capacity: int) -> jax.Array:
  """bool [batch, kv_heads, capacity]: the rows in ``selection`` (every row < length when
  ``whole_cache``)."""
  batch, kv_heads, slots = selection.indices.shape
  used = jnp.arange(slots) < selection.counts[..., None]
  rows = jnp.where(used, selection.indices, capacity)
  b = jnp.arange(batch)[:, None, None]
  h = jnp.arange(kv_heads)[None, :, None]
  member = jnp.zeros((batch, kv_heads, capacity), bool).at[b, h, rows].set(True, mode="drop")
  whole = (jnp.arange(capacity) < lengths[:, None, None]) & jnp.asarray(selection.whole_cache)
  return member | whole


@dataclasses.dataclass(frozen=True)
class RecallProbe(AttentionMethod):
  """Measures ``inner``'s recall against the per-step top-``budget`` oracle.

  Attributes:
    inner: the method whose trajectory and selections are measured.
    budget: the oracle's k.
    alpha_includes_block: the oracle's alpha normaliser (the MAGE default, True).
  """

  name: ClassVar[str] = "recall_probe"
  inner: AttentionMethod
  budget: int = 512
  alpha_includes_block: bool = True

  def __post_init__(self):
    common.check_positive(self, "budget")

  def init_state(self, cfg, batch, capacity):
    zeros = jnp.zeros((cfg.num_layers,), jnp.float32)
    return self.inner.init_state(cfg, batch, capacity), RecallTotals(zeros, zeros, zeros)

  def attend(self, layer, q, k_block, v_block, cache, state, step):
    inner_state, totals = state
    out, inner_state, stats = self.inner.attend(layer, q, k_block, v_block, cache, inner_state,
                                                step)
    chosen = self.inner.selection(layer, inner_state, step)
    if step.first or chosen is None:
      return out, (inner_state, totals), stats
    capacity = cache.k.shape[2]
    _, alpha = common.exact_with_alpha(q, k_block, v_block, cache, self.alpha_includes_block)
    oracle = common.top_rows(alpha, cache.lengths, min(self.budget, capacity))
    in_method = membership(chosen, cache.lengths, capacity)
    in_oracle = membership(oracle, cache.lengths, capacity)
    measured = jnp.broadcast_to(oracle.counts > 0, oracle.counts.shape)
    hits = jnp.sum(in_method & in_oracle, axis=-1)
    index = hits / jnp.maximum(oracle.counts, 1)
    total_mass = jnp.sum(alpha, axis=-1)
    mass = jnp.sum(jnp.where(in_method, alpha, 0.0), axis=-1) / jnp.where(total_mass > 0,
                                                                          total_mass, 1.0)
    add = lambda sums, x: sums.at[layer].add(jnp.sum(jnp.where(measured, x, 0.0)))
    totals = RecallTotals(add(totals.index, index), add(totals.mass, mass),
                          add(totals.samples, 1.0))
    return out, (inner_state, totals), stats

  def after_step(self, state, stats):
    inner_state, totals = state
    return self.inner.after_step(inner_state, stats), totals

  def after_write(self, layer, cache, state, written=None):
    inner_state, totals = state
    return self.inner.after_write(layer, cache, inner_state, written), totals


class RecallReport(NamedTuple):
  """Recall averaged over steps 2..T of every block, KV heads and sequences.

  Per-layer arrays have one entry per model layer; dense layers (no sample: they attended the
  whole cache at every measured step) report 1.0 and are flagged in ``dense``. The overall
  numbers average the sparse layers' samples (1.0 when every layer is dense)."""

  index_recall: np.ndarray  # float [layers]
  mass_recall: np.ndarray  # float [layers]
  dense: np.ndarray  # bool [layers]
  samples: np.ndarray  # int [layers]
  overall_index_recall: float
  overall_mass_recall: float

  @classmethod
  def from_totals(cls, totals: RecallTotals) -> "RecallReport":
    index, mass, samples = (np.asarray(x, np.float64) for x in totals)
    dense = samples == 0
    per = lambda sums: np.where(dense, 1.0, sums / np.maximum(samples, 1))
    count = samples.sum()
    overall = lambda sums: float(sums.sum() / count) if count else 1.0
    return cls(per(index), per(mass), dense, samples.astype(np.int64), overall(index),
               overall(mass))


def measure_recall(model: Transformer, prompts: Sequence[Sequence[int]], method: AttentionMethod,
                   *, budget: int, max_new_tokens: int, options: DecodeOptions | None = None,
                   capacity: int | None = None, mesh: jax.sharding.Mesh | None = None) -> RecallReport:
  """Decodes each prompt with ``method`` and reports its recall against the per-step oracle
  top-``budget``.

  Prompts run one at a time (batch 1, one compile for all: ``capacity`` defaults to the longest
  prompt plus ``max_new_tokens``, rounded up to a block): in a batch, sequences that finished
  early keep running the remaining steps of the others and would be counted. Under a ``mesh``
  its "data" axis must therefore be 1.
  """
  capacity = plan_request(model.config, [len(p) for p in prompts], max_new_tokens,
                          capacity=capacity).capacity
  probe = RecallProbe(method, budget)
  sums = None
  for prompt in prompts:
    result = generate(model, [prompt], max_new_tokens=max_new_tokens, method=probe,
                      options=options, capacity=capacity, mesh=mesh)
    totals = result.method_state[1]
    sums = totals if sums is None else jax.tree.map(jnp.add, sums, totals)
  return RecallReport.from_totals(sums)
