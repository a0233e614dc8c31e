"""topk: the exact radix selection against lax.top_k, and lax.top_k's wrapper against numpy."""

import numpy as np
import pytest

import jax.numpy as jnp

from pallas_kernels import topk


def numpy_select(scores, lengths, k, budgets):
  """Stable descending sort (ties: lowest position first), first min(budget, length), sorted."""
  scores = np.asarray(scores, np.float64)
  rows = scores.reshape(-1, scores.shape[-1])
  lengths = np.broadcast_to(lengths, scores.shape[:-1]).reshape(-1)
  budgets = np.broadcast_to(k if budgets is None else budgets, scores.shape[:-1]).reshape(-1)
  indices = np.zeros((rows.shape[0], k), np.int32)
  counts = np.minimum(budgets, lengths)
  for r, row in enumerate(rows):
    order = np.argsort(-row[:lengths[r]], kind="stable")[:counts[r]]
    indices[r, :counts[r]] = np.sort(order)
  return indices.reshape(*scores.shape[:-1], k), counts.reshape(scores.shape[:-1])


def random_scores(rng, shape, ties):
  scores = rng.normal(size=shape)
  if ties:
    scores = np.round(scores, 1)  # Many equal values, also at the selection threshold.
  return jnp.asarray(scores, jnp.float32)


CASES = [
    # (scores shape, lengths, k, budgets, ties)
    ((2, 3, 100), [[0, 100, 57], [99, 1, 64]], 8, None, False),
    ((2, 3, 100), [[0, 100, 57], [99, 1, 64]], 20, None, True),
    ((3, 2, 2, 77), [[[77, 5]], [[40, 41]], [[0, 76]]], 30, [[[30]], [[4]], [[17]]], True),
    ((2, 50), [50, 33], 64, None, False),
    ((2, 50), [50, 33], 120, [120, 7], True),
    ((4, 1000), [1000, 999, 500, 3], 300, None, True),
]


@pytest.mark.parametrize("shape,lengths,k,budgets,ties", CASES)
def test_reference_matches_numpy(shape, lengths, k, budgets, ties):
  scores = random_scores(np.random.default_rng(len(shape) + k), shape, ties)
  lengths = np.asarray(lengths, np.int32)
  budgets = None if budgets is None else np.asarray(budgets, np.int32)
  want, want_counts = numpy_select(scores, lengths, k, budgets)
  got, counts = topk.select_kv_indices_reference(
      scores, jnp.asarray(lengths), k, budgets=None if budgets is None else jnp.asarray(budgets))
  np.testing.assert_array_equal(counts, want_counts)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("radix_bits,chunk_size", [(1, 16), (2, 1024), (4, 33), (8, 64)])
@pytest.mark.parametrize("shape,lengths,k,budgets,ties", CASES)
def test_radix_select_matches_reference(shape, lengths, k, budgets, ties, radix_bits,
                                        chunk_size):
  scores = random_scores(np.random.default_rng(k + radix_bits), shape, ties)
  lengths = jnp.asarray(lengths, jnp.int32)
  budgets = None if budgets is None else jnp.asarray(budgets, jnp.int32)
  want, want_counts = topk.select_kv_indices(scores, lengths, k, budgets=budgets,
                                             impl="reference")
  got, counts = topk.select_kv_indices(scores, lengths, k, budgets=budgets, impl="interpret",
                                       radix_bits=radix_bits, chunk_size=chunk_size)
  assert got.shape == (*shape[:-1], k) and got.dtype == jnp.int32
  np.testing.assert_array_equal(counts, want_counts)
  np.testing.assert_array_equal(got, want)


def test_extreme_values_and_negative_scores():
  scores = jnp.asarray([[-np.inf, -3.0, -0.0, 0.0, 1e-38, -1e-38, np.inf, 3e38, -3e38, 5.0]],
                       jnp.float32)
  for k in range(1, 11):
    want, _ = topk.select_kv_indices(scores, 10, k, impl="reference")
    got, _ = topk.select_kv_indices(scores, 10, k, impl="interpret")
    np.testing.assert_array_equal(got, want)


def test_output_is_ascending_with_zero_padding():
  scores = random_scores(np.random.default_rng(5), (3, 200), False)
  indices, counts = topk.select_kv_indices(scores, jnp.array([200, 10, 0]), 16,
                                           impl="interpret")
  np.testing.assert_array_equal(counts, [16, 10, 0])
  for row, count in zip(np.asarray(indices), np.asarray(counts)):
    assert np.all(np.diff(row[:count]) > 0)
    assert np.all(row[count:] == 0)


def test_bad_inputs_raise():
  scores = jnp.zeros((2, 3, 10))
  with pytest.raises(ValueError, match="k must be"):
    topk.select_kv_indices(scores, 10, 0)
  with pytest.raises(ValueError, match="lengths"):
    topk.select_kv_indices(scores, jnp.ones((4,), jnp.int32), 3)
  with pytest.raises(ValueError, match="budgets"):
    topk.select_kv_indices(scores, 10, 3, budgets=jnp.ones((2, 2), jnp.int32))
  with pytest.raises(ValueError, match="radix_bits"):
    topk.select_kv_indices(scores, 10, 3, radix_bits=3)
  with pytest.raises(ValueError, match="scores"):
    topk.select_kv_indices(jnp.float32(1.0), 10, 3)
