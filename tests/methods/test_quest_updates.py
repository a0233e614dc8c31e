"""Quest's page summaries refreshed on the written pages equal a full recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax import ModelConfig, build_model, generate
from mage_jax.kv_cache import write_rows
from mage_jax.methods import QuestAttention, WrittenRows
from mage_jax.methods.quest import page_summaries, update_page_summaries


@pytest.mark.parametrize("page_size,capacity", [(4, 37), (5, 40), (16, 50)])
def test_incremental_page_summaries_equal_full_recomputation(page_size, capacity):
  batch, heads, dim = 3, 2, 8
  rng = np.random.default_rng(page_size)
  k = jnp.zeros((batch, heads, capacity, dim))
  v = jnp.zeros_like(k)
  pages = -(-capacity // page_size)
  kmin = kmax = jnp.zeros((batch, heads, pages, dim))
  lengths = jnp.zeros((batch,), jnp.int32)
  # A padded prefill chunk (ragged valid lengths), then commits at each sequence's own length,
  # one sequence finished (its rows dropped), one write running past the capacity.
  writes = [(jnp.zeros(batch, jnp.int32), 12, np.array([12, 7, 0])),
            (jnp.asarray([12, 7, 0], jnp.int32), 6, np.array([6, 6, 0])),
            (jnp.asarray([18, 13, 0], jnp.int32), 9, np.array([9, 9, 9])),
            (jnp.asarray([27, 22, 9], jnp.int32), 13, np.array([13, 0, 13]))]
  for start, rows, valid_rows in writes:
    positions = start[:, None] + jnp.arange(rows, dtype=jnp.int32)[None, :]
    valid = (jnp.arange(rows)[None, :] < valid_rows[:, None]) & (positions < capacity)
    new = jnp.asarray(rng.normal(size=(batch, rows, heads, dim)), jnp.float32)
    k, v = write_rows(k, v, new, new, positions, valid)
    lengths = jnp.maximum(lengths, jnp.max(jnp.where(valid, positions + 1, 0), axis=1))
    kmin, kmax = update_page_summaries(kmin, kmax, k, lengths, WrittenRows(start, rows), page_size)
    want_min, want_max = page_summaries(k, lengths, page_size)
    np.testing.assert_array_equal(kmin, want_min)
    np.testing.assert_array_equal(kmax, want_max)


def test_quest_decoding_unchanged_by_incremental_updates():
  """generate() (incremental updates inside the loop) equals a run whose page summaries are
  recomputed from the whole cache after every write."""

  class FullRecompute(QuestAttention):
    def after_write(self, layer, cache, state, written=None):
      return super().after_write(layer, cache, state, None)

  cfg = ModelConfig.preset("tiny_qwen2", num_layers=3, eos_token_ids=(1,))
  model = build_model(cfg, seed=3)
  prompts = [list(range(5, 5 + n)) for n in (21, 9)]
  options = dict(max_new_tokens=24, capacity=64)
  fast = generate(model, prompts, method=QuestAttention(budget=8, page_size=4, dense_layers=2),
                  **options)
  slow = generate(model, prompts, method=FullRecompute(budget=8, page_size=4, dense_layers=2),
                  **options)
  assert fast.tokens == slow.tokens
  for a, b in zip(jax.tree.leaves(fast.method_state), jax.tree.leaves(slow.method_state)):
    np.testing.assert_array_equal(a, b)
