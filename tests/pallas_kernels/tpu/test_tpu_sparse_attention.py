"""pallas_kernels.tpu.sparse_attention in TPU interpret mode against the plain-JAX reference.

One compile per case (seconds on a CPU): ragged counts including 0 and the full budget, partial
last tiles, budgets larger than the cache (repeated rows), splits, GQA groups 1, 3 and 8, and
cache rows that were not selected set to NaN, so reading or weighting any of them fails."""

import numpy as np
import pytest

import jax.numpy as jnp

from pallas_kernels import sparse_attention as reference
from pallas_kernels.tpu import sparse_attention

# (batch, block, q_heads, kv_heads, head_dim, capacity, budget, counts, dtype, tuning)
CASES = [
    # G = 3, 16-row gather tiles, 2 splits; counts 0, full, and partial tiles.
    (2, 8, 6, 2, 64, 90, 40, [[0, 40], [17, 33]], jnp.float32, dict(block_k=16, num_splits=2)),
    # G = 8, bf16, a budget larger than the 24-row cache (rows repeat), default tile.
    (1, 4, 8, 1, 128, 24, 40, [[37]], jnp.bfloat16, {}),
    # G = 1, 5 query rows padded to 8.
    (2, 5, 2, 2, 64, 50, 9, [[9, 1], [4, 0]], jnp.float32, dict(block_k=8)),
]


@pytest.mark.parametrize(
    "batch,block,q_heads,kv_heads,head_dim,capacity,budget,counts,dtype,tuning", CASES)
def test_kernel_matches_reference(batch, block, q_heads, kv_heads, head_dim, capacity, budget,
                                  counts, dtype, tuning):
  rng = np.random.default_rng(capacity + budget)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  q = jnp.asarray(normal(batch, block, q_heads, head_dim), dtype)
  k_cache, v_cache = (normal(batch, kv_heads, capacity, head_dim) for _ in range(2))
  k_block, v_block = (jnp.asarray(normal(batch, block, kv_heads, head_dim), dtype)
                      for _ in range(2))
  indices = rng.integers(0, capacity, size=(batch, kv_heads, budget))
  counts = np.asarray(counts, np.int32)
  want = reference.sparse_block_attention_reference(
      q, jnp.asarray(k_cache, dtype), jnp.asarray(v_cache, dtype),
      jnp.asarray(indices, jnp.int32), jnp.asarray(counts), k_block, v_block)

  selected = np.zeros((batch, kv_heads, capacity), bool)
  for b in range(batch):
    for h in range(kv_heads):
      selected[b, h, indices[b, h, :counts[b, h]]] = True
  poisoned = [jnp.asarray(np.where(selected[..., None], x, np.nan), dtype)
              for x in (k_cache, v_cache)]
  # Padding slots hold ids of poisoned rows: they must be neither gathered nor attended.
  used = np.arange(budget)[None, None, :] < counts[..., None]
  padded = np.where(used, indices, rng.integers(0, capacity, size=indices.shape))
  got = sparse_attention.sparse_block_attention(
      q, *poisoned, jnp.asarray(padded, jnp.int32), jnp.asarray(counts), k_block, v_block,
      interpret=True, **tuning)
  assert got.shape == q.shape and got.dtype == q.dtype
  atol = 2e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=atol, rtol=atol)


def test_bad_inputs_raise():
  q = jnp.zeros((2, 4, 6, 16))
  cache = jnp.zeros((2, 2, 20, 16))
  block = jnp.zeros((2, 4, 2, 16))
  indices = jnp.zeros((2, 2, 8), jnp.int32)
  counts = jnp.full((2, 2), 8, jnp.int32)
  call = sparse_attention.sparse_block_attention
  with pytest.raises(ValueError, match="indices must have shape"):
    call(q, cache, cache, indices[0], counts, block, block)
  with pytest.raises(ValueError, match="counts must have shape"):
    call(q, cache, cache, indices, counts[0], block, block)
  with pytest.raises(ValueError, match="unknown tuning"):
    call(q, cache, cache, indices, counts, block, block, block_q=16)
  with pytest.raises(ValueError, match="block_k=4 must be a positive multiple of 8"):
    call(q, cache, cache, indices, counts, block, block, block_k=4)
