"""pallas_kernels.tpu.topk (the exact radix select chosen for TPU) against lax.top_k's
reference: ties at the threshold, budgets larger than the length, lengths of 0."""

import numpy as np
import pytest

import jax.numpy as jnp

from pallas_kernels.tpu import topk


def test_selection_matches_reference():
  rng = np.random.default_rng(0)
  scores = jnp.asarray(np.round(rng.normal(size=(2, 3, 300)), 1), jnp.float32)  # many ties
  lengths = jnp.asarray([[300, 0, 45], [1, 299, 128]], jnp.int32)
  budgets = jnp.asarray([[64, 64, 64], [64, 7, 64]], jnp.int32)
  want = topk.select_kv_indices_reference(scores, lengths, 64, budgets=budgets)
  got = topk.select_kv_indices(scores, lengths, 64, budgets=budgets, interpret=True)
  for got_part, want_part in zip(got, want):
    np.testing.assert_array_equal(got_part, want_part)
  np.testing.assert_array_equal(got[1], [[64, 0, 45], [1, 7, 64]])


def test_bad_inputs_raise():
  scores = jnp.zeros((2, 10))
  with pytest.raises(ValueError, match="k must be"):
    topk.select_kv_indices(scores, 10, 0)
  with pytest.raises(ValueError, match="radix_bits"):
    topk.select_kv_indices(scores, 10, 3, radix_bits=3)
