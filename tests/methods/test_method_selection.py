"""Each method's selection against a slow, direct numpy implementation of its rule, on random
queries and caches (ragged lengths, partial last pages / tiles)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax import ModelConfig
from mage_jax.kv_cache import LayerCache
from mage_jax.methods import (MageAttention, OracleAttention, QuestAttention, SparseDAttention,
                              StepInfo, TidalAttention)
from pallas_kernels.dispatch import use_kernels

BATCH, BLOCK, CAPACITY = 2, 4, 45
LENGTHS = (37, 19)
FIRST = StepInfo(True, jnp.int32(0))
LATER = StepInfo(False, jnp.int32(1))

# The plain-JAX references and the Pallas kernels (interpreted) with the radix top-k.
IMPLS = pytest.mark.parametrize("impl", ["reference", "interpret"], indirect=True)


@pytest.fixture
def impl(request):
  """Runs the test under the kernel setting ``request.param``."""
  with use_kernels(request.param) as resolved:
    yield resolved


def _cfg(num_layers):
  # 4 query heads over 2 KV heads (G = 2), head_dim 16.
  return ModelConfig.preset("tiny_qwen2", num_layers=num_layers, dtype="float32")


def _inputs(seed, cfg, lengths=LENGTHS):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q = normal(BATCH, BLOCK, cfg.num_heads, cfg.head_dim)
  k_block = normal(BATCH, BLOCK, cfg.num_kv_heads, cfg.head_dim)
  v_block = normal(BATCH, BLOCK, cfg.num_kv_heads, cfg.head_dim)
  shape = (BATCH, cfg.num_kv_heads, CAPACITY, cfg.head_dim)
  cache = LayerCache(normal(*shape), normal(*shape), jnp.asarray(lengths, jnp.int32))
  return q, k_block, v_block, cache


# ---------------------------------------------------------------------------------------------
# The rules, written out loop by loop in float64.


def _queries(q, b, h, group):
  """The G*B query vectors of KV head h in sequence b."""
  return [np.asarray(q[b, t, h * group + g], np.float64) for g in range(group)
          for t in range(q.shape[1])]


def _np_alpha(q, k_block, cache, b, h, includes_block=True):
  group = q.shape[2] // cache.k.shape[1]
  length = int(cache.lengths[b])
  keys = np.asarray(cache.k[b, h, :length], np.float64)
  block_keys = np.asarray(k_block[b, :, h], np.float64)
  scale = 1 / math.sqrt(q.shape[-1])
  alpha = np.zeros(length)
  queries = _queries(q, b, h, group)
  for query in queries:
    logits = keys @ query * scale
    normaliser = logits
    if includes_block:
      normaliser = np.concatenate([logits, block_keys @ query * scale])
    top = normaliser.max()
    alpha += np.exp(logits - top) / np.exp(normaliser - top).sum()
  return alpha / len(queries)


def _np_top(scores, k):
  """Positions of the k largest scores (ties: lower position), ascending."""
  order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
  return sorted(order[:k])


def _check(selection, expected):
  """expected[b][h]: list of rows."""
  indices, counts = np.asarray(selection.indices), np.asarray(selection.counts)
  for b, per_head in enumerate(expected):
    for h, rows in enumerate(per_head):
      assert counts[b, h] == len(rows), (b, h)
      assert indices[b, h, :counts[b, h]].tolist() == rows, (b, h)


def _check_output(out, q, k_block, v_block, cache, expected):
  """out == attention of each query over the cache rows expected[b][h] plus the block."""
  group = q.shape[2] // cache.k.shape[1]
  scale = 1 / math.sqrt(q.shape[-1])
  for b, per_head in enumerate(expected):
    for h, rows in enumerate(per_head):
      keys = np.concatenate([np.asarray(cache.k[b, h, rows]).reshape(len(rows), -1),
                             np.asarray(k_block[b, :, h])]).astype(np.float64)
      values = np.concatenate([np.asarray(cache.v[b, h, rows]).reshape(len(rows), -1),
                               np.asarray(v_block[b, :, h])]).astype(np.float64)
      for g in range(group):
        for t in range(q.shape[1]):
          logits = keys @ np.asarray(q[b, t, h * group + g], np.float64) * scale
          probs = np.exp(logits - logits.max())
          np.testing.assert_allclose(out[b, t, h * group + g], probs @ values / probs.sum(),
                                     atol=1e-5, rtol=1e-5)


def _np_top_alpha(q, k_block, cache, budget, includes_block=True):
  return [[_np_top(_np_alpha(q, k_block, cache, b, h, includes_block), budget)
           for h in range(cache.k.shape[1])] for b in range(BATCH)]


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [5, 19, 64])
@pytest.mark.parametrize("includes_block", [True, False])
@IMPLS
def test_mage_selects_top_alpha_at_the_first_step(budget, includes_block, impl):
  cfg = _cfg(3)
  method = MageAttention(budget=budget, dense_layers=1, alpha_includes_block=includes_block)
  q, kb, vb, cache = _inputs(0, cfg)
  state = method.init_state(cfg, BATCH, CAPACITY)
  assert method.selection(0, state, FIRST) is None
  _, state, stats = method.attend(2, q, kb, vb, cache, state, FIRST)
  assert method.selection(2, state, FIRST) is None  # selected after the step, all layers at once
  state = method.after_step(state, {2: stats})
  _check(method.selection(2, state, LATER), _np_top_alpha(q, kb, cache, budget, includes_block))
  # Later steps keep the first step's selection, whatever their queries.
  expected = _np_top_alpha(q, kb, cache, budget, includes_block)
  q2 = q[:, ::-1]
  out, later, _ = method.attend(2, q2, kb, vb, cache, state, StepInfo(False, jnp.int32(3)))
  _check(method.selection(2, later, LATER), expected)
  _check_output(out, q2, kb, vb, cache, expected)


@IMPLS
def test_mage_selects_every_layer_after_the_first_step(impl):
  # Each sparse layer its own inputs (and cache lengths): one selection call over all layers
  # must give each layer its own top alpha, and leave a layer the step did not run untouched.
  cfg = _cfg(5)
  method = MageAttention(budget=7, dense_layers=1)
  state = method.init_state(cfg, BATCH, CAPACITY)
  first = method.init_state(cfg, BATCH, CAPACITY)
  layer_inputs = {layer: _inputs(20 + layer, cfg) for layer in (1, 2, 4)}
  stats = {}
  for layer, (q, kb, vb, cache) in layer_inputs.items():
    _, state, stats[layer] = method.attend(layer, q, kb, vb, cache, state, FIRST)
  state = method.after_step(state, stats)
  for layer, (q, kb, vb, cache) in layer_inputs.items():
    _check(method.selection(layer, state, LATER), _np_top_alpha(q, kb, cache, 7))
  untouched = method.selection(3, state, LATER)
  np.testing.assert_array_equal(untouched.indices, first.get(2).indices)
  np.testing.assert_array_equal(untouched.counts, first.get(2).counts)


def _np_adaptive(layer_inputs, budget, query_budget, min_budget, max_budget):
  """v1 Algorithm 1 for each sparse layer's (q, k_block, cache): rows per [layer][b][h]."""
  scores = np.zeros((len(layer_inputs), BATCH))
  ranked = []  # [layer][b][h]: (union rows by vote score, other rows most recent first)
  for l, (q, kb, _, cache) in enumerate(layer_inputs):
    group = q.shape[2] // cache.k.shape[1]
    per_b = []
    for b in range(BATCH):
      length = int(cache.lengths[b])
      per_h = []
      for h in range(cache.k.shape[1]):
        keys = np.asarray(cache.k[b, h, :length], np.float64)
        votes = np.zeros(length, int)
        for query in _queries(q, b, h, group):
          votes[_np_top(keys @ query, query_budget)] += 1
        alpha = _np_alpha(q, kb, cache, b, h)
        union = [j for j in range(length) if votes[j] > 0]
        coverage = alpha[union].sum()
        scores[l, b] = max(scores[l, b], len(union) * (1 - math.log(coverage)))
        by_vote = sorted(union, key=lambda j: (-votes[j], -alpha[j], j))
        recent = [j for j in range(length - 1, -1, -1) if votes[j] == 0]
        per_h.append(by_vote + recent)
      per_b.append(per_h)
    ranked.append(per_b)
  layers = len(layer_inputs)
  expected = []
  for l in range(layers):
    per_b = []
    for b in range(BATCH):
      k_l = max(min_budget, math.floor(scores[l, b] / scores[:, b].sum() * budget * layers))
      k_l = min(k_l, max_budget)
      per_b.append([sorted(order[:k_l]) for order in ranked[l][b]])
    expected.append(per_b)
  return expected


@pytest.mark.parametrize("budget,min_budget", [(6, None), (10, 8), (40, None)])
@IMPLS
def test_adaptive_mage_follows_algorithm_1(budget, min_budget, impl):
  cfg = _cfg(4)
  method = MageAttention(budget=budget, dense_layers=1, adaptive=True, min_budget=min_budget)
  layer_inputs = [_inputs(seed, cfg) for seed in (1, 2, 3)]
  state = method.init_state(cfg, BATCH, CAPACITY)
  stats = {}
  for layer, (q, kb, vb, cache) in enumerate(layer_inputs, start=1):
    _, state, stats[layer] = method.attend(layer, q, kb, vb, cache, state, FIRST)
  state = method.after_step(state, stats)
  expected = _np_adaptive(layer_inputs, budget, budget, method.k_min, min(4 * budget, CAPACITY))
  for layer in (1, 2, 3):
    _check(method.selection(layer, state, LATER), expected[layer - 1])


def _np_quest(q, cache, budget, page_size, aggregate):
  group = q.shape[2] // cache.k.shape[1]
  expected = []
  for b in range(BATCH):
    length = int(cache.lengths[b])
    per_h = []
    for h in range(cache.k.shape[1]):
      pages = -(-length // page_size)
      page_scores = []
      for p in range(pages):
        keys = np.asarray(cache.k[b, h, p * page_size:min((p + 1) * page_size, length)],
                          np.float64)
        lo, hi = keys.min(axis=0), keys.max(axis=0)
        bounds = [np.maximum(x * hi, x * lo).sum() for x in _queries(q, b, h, group)]
        page_scores.append(max(bounds) if aggregate == "max" else np.mean(bounds))
      kept = _np_top(page_scores, max(3, budget // page_size))
      per_h.append([j for p in kept for j in range(p * page_size, (p + 1) * page_size)
                    if j < length])
    expected.append(per_h)
  return expected


@pytest.mark.parametrize("budget,page_size", [(16, 4), (20, 8), (2, 5), (400, 4)])
@pytest.mark.parametrize("aggregate", ["max", "mean"])
@IMPLS
def test_quest_keeps_the_pages_with_the_best_bounds(budget, page_size, aggregate, impl):
  cfg = _cfg(2)
  method = QuestAttention(budget=budget, page_size=page_size, dense_layers=1, aggregate=aggregate)
  q, kb, vb, cache = _inputs(4, cfg)
  state = method.init_state(cfg, BATCH, CAPACITY)
  state = method.after_write(1, cache, state)
  expected = _np_quest(q, cache, budget, page_size, aggregate)
  for step in (FIRST, StepInfo(False, jnp.int32(2))):  # recomputed at every step
    out, state, _ = method.attend(1, q, kb, vb, cache, state, step)
    _check(method.selection(1, state, step), expected)
    _check_output(out, q, kb, vb, cache, expected)


@IMPLS
def test_tidal_reuses_the_latest_selection_or_correction_layer(impl):
  cfg = _cfg(8)  # correction layer floor(13 * 8 / 28 + 1/2) = 4
  method = TidalAttention(budget=7, dense_layers=1, selection_layer=2)
  state = method.init_state(cfg, BATCH, CAPACITY)
  assert state.correction_layer == 4
  latest = None
  for layer in range(cfg.num_layers):
    q, kb, vb, cache = _inputs(10 + layer, cfg)
    out, state, _ = method.attend(layer, q, kb, vb, cache, state, LATER)
    if layer in (2, 4):
      assert method.selection(layer, state, LATER) is None  # full attention here
      latest = _np_top_alpha(q, kb, cache, 7)
    elif layer < 2:
      assert method.selection(layer, state, LATER) is None
    else:
      _check(method.selection(layer, state, LATER), latest)
      _check_output(out, q, kb, vb, cache, latest)


def _np_sparsed(q, kb, cache, tile_size, keep):
  """keep(num_valid_tiles) -> tiles kept."""
  expected = []
  for b in range(BATCH):
    length = int(cache.lengths[b])
    per_h = []
    for h in range(cache.k.shape[1]):
      alpha = _np_alpha(q, kb, cache, b, h)
      tiles = -(-length // tile_size)
      means = [alpha[t * tile_size:(t + 1) * tile_size].mean() for t in range(tiles)]
      kept = _np_top(means, keep(tiles))
      per_h.append([j for t in kept for j in range(t * tile_size, (t + 1) * tile_size)
                    if j < length])
    expected.append(per_h)
  return expected


# Interpreted once only: lax.switch traces all three branches on every eager call.
@pytest.mark.parametrize("budget,impl", [(None, "reference"), (12, "reference"),
                                         (1000, "reference"), (None, "interpret")],
                         indirect=["impl"])
def test_sparsed_keeps_top_tiles_from_its_last_dense_step(budget, impl):
  cfg = _cfg(2)
  method = SparseDAttention(dense_fraction=0.2, nominal_steps=10, tile_size=4,
                            keep_fraction=0.3, budget=budget, dense_layers=1)
  assert method.dense_steps == 2
  q, kb, vb, cache = _inputs(5, cfg)
  state = method.init_state(cfg, BATCH, CAPACITY)
  _, state, _ = method.attend(1, q, kb, vb, cache, state, FIRST)
  assert bool(method.selection(1, state, FIRST).whole_cache)
  _, state, _ = method.attend(1, q, kb, vb, cache, state, LATER)
  assert bool(method.selection(1, state, LATER).whole_cache)
  # 0.3 * 10 tiles keeps 3 (decimal ceil), 0.3 * 5 keeps 2.
  keep = (lambda n: math.ceil(round(0.3 * n, 9))) if budget is None else (lambda n: budget // 4)
  expected = _np_sparsed(q, kb, cache, 4, keep)
  _check(method.selection(1, state, LATER), expected)
  step = StepInfo(False, jnp.int32(5))
  out, state, _ = method.attend(1, q[:, ::-1], kb, vb, cache, state, step)
  assert not bool(method.selection(1, state, step).whole_cache)
  _check(method.selection(1, state, step), expected)
  _check_output(out, q[:, ::-1], kb, vb, cache, expected)


@IMPLS
def test_oracle_selects_top_alpha_at_every_step(impl):
  cfg = _cfg(2)
  method = OracleAttention(budget=9, dense_layers=1)
  state = method.init_state(cfg, BATCH, CAPACITY)
  for seed, step in ((6, FIRST), (7, StepInfo(False, jnp.int32(4)))):
    q, kb, vb, cache = _inputs(seed, cfg)
    out, state, _ = method.attend(1, q, kb, vb, cache, state, step)
    expected = _np_top_alpha(q, kb, cache, 9)
    _check(method.selection(1, state, step), expected)
    _check_output(out, q, kb, vb, cache, expected)


def test_empty_cache_selects_nothing_and_attends_the_block():
  cfg = _cfg(2)
  q, kb, vb, cache = _inputs(8, cfg, lengths=(0, 0))
  for method in (MageAttention(budget=4, dense_layers=1), OracleAttention(budget=4, dense_layers=1),
                 QuestAttention(budget=4, page_size=4, dense_layers=1)):
    state = method.init_state(cfg, BATCH, CAPACITY)
    state = method.after_write(1, cache, state)
    out, state, stats = method.attend(1, q, kb, vb, cache, state, FIRST)
    state = method.after_step(state, {} if stats is None else {1: stats})
    _, state, _ = method.attend(1, q, kb, vb, cache, state, LATER)
    assert np.all(np.asarray(method.selection(1, state, LATER).counts) == 0)
    assert np.all(np.isfinite(np.asarray(out)))
