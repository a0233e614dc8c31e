"""The unmasking rules on hand-built confidences: each case states the expected transfer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax import sampling


def _bools(rows):
  return jnp.asarray(np.array(rows, dtype=bool))


def test_fast_dllm_v2_threshold_inside_first_open_sub_block():
  # Block of 8, sub-blocks of 4. Sub-block 0 fully decoded, so sub-block 1 is current.
  conf = jnp.asarray([[0.99, 0.99, 0.99, 0.99, 0.95, 0.5, 0.92, 0.3]])
  masked = _bools([[0, 0, 0, 0, 1, 1, 1, 1]])
  got = sampling.fast_dllm_v2_transfer(conf, masked, 0.9, 4)
  np.testing.assert_array_equal(got, _bools([[0, 0, 0, 0, 1, 0, 1, 0]]))


def test_fast_dllm_v2_at_least_one_and_never_beyond_current_sub_block():
  # Nothing above threshold in sub-block 0; sub-block 1 is confident but not current.
  conf = jnp.asarray([[0.2, 0.4, 0.3, 0.1, 0.99, 0.99, 0.99, 0.99]])
  masked = _bools([[1, 1, 1, 1, 1, 1, 1, 1]])
  got = sampling.fast_dllm_v2_transfer(conf, masked, 0.9, 4)
  np.testing.assert_array_equal(got, _bools([[0, 1, 0, 0, 0, 0, 0, 0]]))


def test_fast_dllm_v2_ignores_unmasked_positions_and_finished_rows():
  conf = jnp.asarray([[0.99, 0.1, 0.2, 0.3], [0.5, 0.5, 0.5, 0.5]])
  masked = _bools([[0, 1, 1, 1], [0, 0, 0, 0]])
  got = sampling.fast_dllm_v2_transfer(conf, masked, 0.9, 4)
  np.testing.assert_array_equal(got, _bools([[0, 0, 0, 1], [0, 0, 0, 0]]))


def test_sdar_dynamic_takes_all_confident_when_enough():
  conf = jnp.asarray([[0.95, 0.97, 0.2, 0.99]])
  masked = _bools([[1, 1, 1, 1]])
  got = sampling.sdar_transfer(conf, masked, 0.9, jnp.asarray([2]))
  np.testing.assert_array_equal(got, _bools([[1, 1, 0, 1]]))


def test_sdar_dynamic_falls_back_to_scheduled_count():
  conf = jnp.asarray([[0.95, 0.5, 0.2, 0.6]])
  masked = _bools([[1, 1, 1, 1]])
  got = sampling.sdar_transfer(conf, masked, 0.9, jnp.asarray([2]))
  np.testing.assert_array_equal(got, _bools([[1, 0, 0, 1]]))


def test_fixed_transfer_exact_count_and_masked_only():
  conf = jnp.asarray([[0.9, 0.8, 0.7, 0.99], [0.1, 0.2, 0.3, 0.4]])
  masked = _bools([[1, 1, 1, 0], [1, 1, 1, 1]])
  got = sampling.fixed_transfer(conf, masked, jnp.asarray([2, 3]))
  np.testing.assert_array_equal(got, _bools([[1, 1, 0, 0], [0, 1, 1, 1]]))


@pytest.mark.parametrize("n,steps,expected", [(32, 32, [1] * 32), (10, 4, [3, 3, 2, 2]),
                                              (3, 4, [1, 1, 1, 0]), (7, 7, [1] * 7)])
def test_schedule_spreads_masked_count(n, steps, expected):
  got = [int(sampling.scheduled_count(jnp.asarray([n]), steps, jnp.int32(i))[0])
         for i in range(steps)]
  assert got == expected and sum(got) == n


def test_propose_greedy_confidence_is_softmax_of_argmax():
  logits = jnp.log(jnp.asarray([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
  tokens, conf = sampling.propose_tokens(logits, None, 0.0, 1.0)
  np.testing.assert_array_equal(tokens, [1, 0])
  np.testing.assert_allclose(conf, [0.6, 0.5], rtol=1e-6)


def test_propose_top_p_only_samples_from_nucleus():
  probs = jnp.asarray([0.5, 0.3, 0.15, 0.05])
  logits = jnp.broadcast_to(jnp.log(probs), (4000, 4))
  tokens, conf = sampling.propose_tokens(logits, jax.random.key(1), 1.0, 0.7)
  tokens, conf = np.asarray(tokens), np.asarray(conf)
  assert set(tokens.tolist()) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: nucleus {0, 1}
  np.testing.assert_allclose(conf[tokens == 0], 0.5 / 0.8, rtol=1e-5)
  assert abs((tokens == 0).mean() - 0.625) < 0.03
  again, _ = sampling.propose_tokens(logits, jax.random.key(1), 1.0, 0.7)
  np.testing.assert_array_equal(tokens, again)  # explicit keys: reproducible
