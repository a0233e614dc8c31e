"""Properties: Quest's page bounds, adaptive budgets, and configuration errors."""

import math

from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax import ModelConfig
from mage_jax.methods import get_method
from mage_jax.methods.mage import adaptive_budgets
from mage_jax.methods.quest import page_bounds, page_summaries

# XLA flushes subnormals to zero; they are not what the bound is about.
_floats = st.floats(-8, 8, allow_nan=False, allow_subnormal=False, width=32)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), page_size=st.integers(1, 6), capacity=st.integers(1, 20),
       group=st.integers(1, 3), block=st.integers(1, 3))
def test_quest_page_bound_is_the_min_max_bound_and_covers_every_logit(data, page_size, capacity,
                                                                      group, block):
  kv_heads, head_dim = 2, 3
  keys = data.draw(hnp.arrays(np.float32, (1, kv_heads, capacity, head_dim), elements=_floats))
  q = data.draw(hnp.arrays(np.float32, (1, block, kv_heads * group, head_dim), elements=_floats))
  length = data.draw(st.integers(0, capacity))
  key_min, key_max = page_summaries(jnp.asarray(keys), jnp.asarray([length]), page_size)
  bounds = np.asarray(page_bounds(jnp.asarray(q), key_min, key_max))
  for h in range(kv_heads):
    for p in range(-(-length // page_size)):
      rows = keys[0, h, p * page_size:min((p + 1) * page_size, length)].astype(np.float64)
      np.testing.assert_array_equal(np.asarray(key_min[0, h, p]), rows.min(axis=0))
      np.testing.assert_array_equal(np.asarray(key_max[0, h, p]), rows.max(axis=0))
      for g in range(group):
        for t in range(block):
          query = q[0, t, h * group + g].astype(np.float64)
          assert bounds[0, h, g, t, p] >= (rows @ query).max() - 1e-4 * (1 + np.abs(query).sum())


@settings(max_examples=60, deadline=None)
@given(scores=hnp.arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 3)),
                         elements=st.floats(0.0625, 100, width=32)),
       budget=st.integers(4, 600), min_fraction=st.sampled_from([0.0, 0.25, 1.0]))
def test_adaptive_budgets_respect_k_min_and_sum_to_the_total(scores, budget, min_fraction):
  layers = scores.shape[0]
  min_budget = max(1, int(budget * min_fraction))
  cap = 4 * budget
  budgets = np.asarray(adaptive_budgets(jnp.asarray(scores), budget, min_budget, cap))
  assert np.all(budgets >= min_budget) and np.all(budgets <= cap)
  floors = np.floor(scores / scores.sum(0) * budget * layers)
  for b in range(scores.shape[1]):
    if np.all((floors[:, b] >= min_budget) & (floors[:, b] <= cap)):
      # Neither K_min nor the cap binds: only flooring separates the sum from K * L'.
      assert budget * layers - layers <= budgets[:, b].sum() <= budget * layers
    order = np.argsort(scores[:, b], kind="stable")
    assert np.all(np.diff(budgets[order, b]) >= 0)  # a higher score never gets fewer rows


def test_adaptive_budgets_give_k_to_an_empty_cache():
  budgets = adaptive_budgets(jnp.zeros((3, 1)), 16, 4, 64)
  assert np.asarray(budgets).tolist() == [[16], [16], [16]]


@pytest.mark.parametrize("name,options,field", [
    ("mage", dict(budget=0), "budget"),
    ("mage", dict(budget=8, min_budget=9), "min_budget"),
    ("mage", dict(max_budget_factor=0), "max_budget_factor"),
    ("quest", dict(aggregate="median"), "aggregate"),
    ("quest", dict(page_size=0), "page_size"),
    ("tidal", dict(dense_layers=3, selection_layer=2), "dense_layers"),
    ("sparsed", dict(keep_fraction=0.0), "keep_fraction"),
    ("sparsed", dict(dense_fraction=1.5), "dense_fraction"),
    ("sparsed", dict(budget=8, tile_size=16), "budget"),
    ("oracle", dict(budget=-1), "budget"),
])
def test_bad_config_raises_naming_the_field(name, options, field):
  with pytest.raises(ValueError, match=rf"\.{field}:"):
    get_method(name, **options)


@pytest.mark.parametrize("name,options,field", [
    ("mage", dict(dense_layers=3), "dense_layers"),
    ("quest", dict(dense_layers=5), "dense_layers"),
    ("oracle", dict(dense_layers=3), "dense_layers"),
    ("sparsed", dict(dense_layers=3), "dense_layers"),
    # floor(13 * 2 / 28 + 1/2) = 1 is not above the selection layer.
    ("tidal", dict(dense_layers=0, selection_layer=1), "correction_layer"),
])
def test_config_that_does_not_fit_the_model_raises_naming_the_field(name, options, field):
  cfg = ModelConfig.preset("tiny_qwen2")  # 2 layers
  with pytest.raises(ValueError, match=rf"\.{field}:"):
    get_method(name, **options).init_state(cfg, 1, 16)


def test_tidal_correction_layer_scales_with_depth():
  tidal = get_method("tidal")
  assert [tidal.correction_for(n) for n in (28, 36, 24, 14)] == [13, 17, 11, 7]
  assert math.floor(13 * 36 / 28 + 0.5) == 17
