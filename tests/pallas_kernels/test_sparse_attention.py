"""sparse_attention: reference against float64 numpy, the Pallas kernel (interpreted) against
the reference, with ragged counts and garbage in the padding slots."""

import numpy as np
import pytest

import jax.numpy as jnp

from pallas_kernels import decode_attention
from pallas_kernels import sparse_attention


def make_inputs(rng, batch, block, q_heads, kv_heads, head_dim, capacity, budget):
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  indices = jnp.asarray(rng.integers(0, capacity, size=(batch, kv_heads, budget)), jnp.int32)
  return (normal(batch, block, q_heads, head_dim), normal(batch, kv_heads, capacity, head_dim),
          normal(batch, kv_heads, capacity, head_dim), indices,
          normal(batch, block, kv_heads, head_dim), normal(batch, block, kv_heads, head_dim))


def numpy_sparse_attention(q, k_cache, v_cache, indices, counts, k_block, v_block, sm_scale):
  q, k_cache, v_cache, k_block, v_block = (np.asarray(x, np.float64)
                                           for x in (q, k_cache, v_cache, k_block, v_block))
  batch, block, q_heads, _ = q.shape
  group = q_heads // k_cache.shape[1]
  out = np.zeros_like(q)
  for b in range(batch):
    for head in range(q_heads):
      h = head // group
      rows = np.asarray(indices[b, h, :int(counts[b, h])])
      keys = np.concatenate([k_cache[b, h, rows], k_block[b, :, h]])
      values = np.concatenate([v_cache[b, h, rows], v_block[b, :, h]])
      for t in range(block):
        logits = keys @ q[b, t, head] * sm_scale
        p = np.exp(logits - logits.max())
        out[b, t, head] = p @ values / p.sum()
  return out


def test_reference_matches_float64_numpy():
  rng = np.random.default_rng(0)
  q, k_cache, v_cache, indices, k_block, v_block = make_inputs(rng, 2, 4, 6, 2, 16, 30, 9)
  counts = jnp.array([[0, 9], [4, 1]], jnp.int32)
  want = numpy_sparse_attention(q, k_cache, v_cache, indices, counts, k_block, v_block, 0.2)
  got = sparse_attention.sparse_block_attention_reference(
      q, k_cache, v_cache, indices, counts, k_block, v_block, sm_scale=0.2)
  np.testing.assert_allclose(got, want, atol=2e-5)


# (batch, block, q_heads, kv_heads, head_dim, capacity, budget, tuning); counts are drawn per
# case to include 0 and the full budget.
KERNEL_CASES = [
    (2, 8, 6, 2, 64, 90, 40, dict(block_k=16, num_splits=2, block_q=16)),
    (2, 4, 8, 8, 128, 50, 16, dict(block_k=16, num_splits=1)),
    (1, 32, 12, 2, 64, 120, 70, dict(block_k=32, num_splits=3)),
    (2, 16, 28, 4, 64, 40, 20, {}),
    (2, 16, 28, 4, 64, 40, 20, dict(block_q=128, num_splits=2)),
    (1, 6, 3, 1, 64, 12, 5, {}),
]


@pytest.mark.parametrize("batch,block,q_heads,kv_heads,head_dim,capacity,budget,tuning",
                         KERNEL_CASES)
def test_kernel_matches_reference(batch, block, q_heads, kv_heads, head_dim, capacity, budget,
                                  tuning):
  rng = np.random.default_rng(capacity + budget)
  q, k_cache, v_cache, indices, k_block, v_block = make_inputs(
      rng, batch, block, q_heads, kv_heads, head_dim, capacity, budget)
  counts = rng.integers(0, budget + 1, size=(batch, kv_heads))
  counts.flat[0], counts.flat[-1] = 0, budget
  args = (q, k_cache, v_cache, indices, jnp.asarray(counts, jnp.int32), k_block, v_block)
  want = sparse_attention.sparse_block_attention(*args, impl="reference")
  got = sparse_attention.sparse_block_attention(*args, impl="interpret", **tuning)
  assert got.shape == q.shape and got.dtype == q.dtype
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  # Padding slots must not matter: rewrite them and get the same output.
  slots = np.arange(budget)[None, None, :]
  other_padding = np.where(slots < counts[..., None], np.asarray(indices),
                           rng.integers(0, capacity, size=indices.shape))
  again = sparse_attention.sparse_block_attention(
      q, k_cache, v_cache, jnp.asarray(other_padding, jnp.int32), args[4], k_block, v_block,
      impl="interpret", **tuning)
  np.testing.assert_array_equal(again, got)


def test_selecting_every_valid_row_is_exact_attention():
  rng = np.random.default_rng(3)
  q, k_cache, v_cache, _, k_block, v_block = make_inputs(rng, 2, 8, 12, 2, 64, 50, 1)
  lengths = np.array([50, 23])
  indices = np.broadcast_to(np.arange(64)[None, None, :] % 50, (2, 2, 64))
  counts = np.broadcast_to(lengths[:, None], (2, 2))
  sparse = sparse_attention.sparse_block_attention(
      q, k_cache, v_cache, jnp.asarray(indices, jnp.int32), jnp.asarray(counts, jnp.int32),
      k_block, v_block, impl="interpret", block_k=16)
  exact = decode_attention.exact_block_attention_reference(
      q, k_cache, v_cache, jnp.asarray(lengths, jnp.int32), k_block, v_block)
  np.testing.assert_allclose(sparse, exact, atol=2e-5)


def test_bad_inputs_raise():
  rng = np.random.default_rng(4)
  q, k_cache, v_cache, indices, k_block, v_block = make_inputs(rng, 2, 4, 6, 2, 16, 20, 8)
  counts = jnp.full((2, 2), 8, jnp.int32)
  call = sparse_attention.sparse_block_attention
  with pytest.raises(ValueError, match="indices must have shape"):
    call(q, k_cache, v_cache, indices[0], counts, k_block, v_block)
  with pytest.raises(ValueError, match="indices must have K >= 1"):
    call(q, k_cache, v_cache, indices[..., :0], counts, k_block, v_block)
  with pytest.raises(ValueError, match="counts must have shape"):
    call(q, k_cache, v_cache, indices, counts[0], k_block, v_block)
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    call(q[:, :, :5], k_cache, v_cache, indices, counts, k_block, v_block)
  with pytest.raises(ValueError, match="unknown tuning"):
    call(q, k_cache, v_cache, indices, counts, k_block, v_block, impl="interpret", splits=2)
