"""Recall against the per-step oracle: reference points and a case checked by hand."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax import ModelConfig, build_model
from mage_jax.kv_cache import LayerCache
from mage_jax.methods import (AttentionMethod, ExactAttention, MageAttention, OracleAttention,
                              Selection, StepInfo)
from mage_jax.recall import RecallProbe, RecallReport, measure_recall


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig.preset("tiny_qwen2", num_layers=3, dtype="float32", eos_token_ids=(1,))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(5, cfg.vocab_size, n).tolist() for n in (30, 21)]
  return build_model(cfg, seed=4), prompts


def test_oracle_against_itself_has_recall_one(tiny):
  model, prompts = tiny
  report = measure_recall(model, prompts, OracleAttention(budget=5, dense_layers=1), budget=5,
                          max_new_tokens=16)
  assert report.dense.tolist() == [True, False, False]
  assert np.all(report.samples[1:] > 0)
  np.testing.assert_allclose(report.index_recall, 1.0)
  assert report.overall_index_recall == pytest.approx(1.0)
  # 5 of 16..48 rows of a random model's nearly flat attention: far from all of the mass.
  assert np.all(report.mass_recall[1:] < 0.9)


def test_full_budget_and_exact_have_recall_one(tiny):
  model, prompts = tiny
  mage = measure_recall(model, prompts, MageAttention(budget=64, dense_layers=1), budget=64,
                        max_new_tokens=16)
  np.testing.assert_allclose(mage.index_recall, 1.0)
  np.testing.assert_allclose(mage.mass_recall, 1.0, rtol=1e-5)
  assert np.all(mage.samples[1:] > 0)
  exact = measure_recall(model, prompts, ExactAttention(), budget=4, max_new_tokens=16)
  assert exact.dense.all() and exact.overall_index_recall == exact.overall_mass_recall == 1.0


def test_small_budget_mage_loses_recall_where_the_oracle_does_not(tiny):
  model, prompts = tiny
  report = measure_recall(model, prompts, MageAttention(budget=5, dense_layers=1), budget=5,
                          max_new_tokens=16)
  assert 0.0 < report.overall_index_recall < 1.0


@dataclasses.dataclass(frozen=True)
class _FixedRows(AttentionMethod):
  """Claims to have attended rows ``rows`` of every sequence and head (its output, the queries
  themselves, is not looked at)."""

  rows: tuple[int, ...] = (1, 3)

  def init_state(self, cfg, batch, capacity):
    indices = jnp.broadcast_to(jnp.asarray(self.rows, jnp.int32),
                               (batch, cfg.num_kv_heads, len(self.rows)))
    return Selection(indices, jnp.full((batch, cfg.num_kv_heads), len(self.rows), jnp.int32))

  def attend(self, layer, q, k_block, v_block, cache, state, step):
    return q, state, None

  def selection(self, layer, state, step):
    return state


def test_hand_checked_recall():
  """One query whose cache logits are log 4, log 3, log 2, log 1 (the block key is negligible):
  alpha = 0.4, 0.3, 0.2, 0.1. The oracle top-2 is {0, 1}; the method used {1, 3}: index recall
  1/2, mass recall 0.3 + 0.1 = 0.4. The second sequence has an empty cache and is not counted."""
  cfg = ModelConfig.preset("tiny_qwen2", num_layers=1, num_heads=1, num_kv_heads=1, head_dim=4,
                           dtype="float32")
  probe = RecallProbe(_FixedRows(), budget=2)
  keys = np.zeros((2, 1, 6, 4), np.float32)
  keys[0, 0, :4, 0] = np.log([4, 3, 2, 1])
  q = np.zeros((2, 1, 1, 4), np.float32)
  q[..., 0] = 2.0  # times the 1/sqrt(4) scale: logits = keys[..., 0]
  k_block = np.zeros((2, 1, 1, 4), np.float32)
  k_block[..., 0] = -50.0
  cache = LayerCache(jnp.asarray(keys), jnp.asarray(keys), jnp.asarray([4, 0], jnp.int32))
  state = probe.init_state(cfg, 2, 6)
  args = (jnp.asarray(q), jnp.asarray(k_block), jnp.asarray(k_block), cache)
  _, state, _ = probe.attend(0, *args, state, StepInfo(True, jnp.int32(0)))  # first: skipped
  assert float(state[1].samples[0]) == 0
  for step in (1, 2):
    _, state, _ = probe.attend(0, *args, state, StepInfo(False, jnp.int32(step)))
  report = RecallReport.from_totals(state[1])
  assert report.samples.tolist() == [2]
  assert report.index_recall[0] == pytest.approx(0.5)
  assert report.mass_recall[0] == pytest.approx(0.4, abs=1e-6)
  assert math.isclose(report.overall_mass_recall, 0.4, abs_tol=1e-6)
