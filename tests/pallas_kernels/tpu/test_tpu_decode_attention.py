"""pallas_kernels.tpu.decode_attention in TPU interpret mode against the plain-JAX references.

Each case is one compile of the interpreted kernel (several seconds on a CPU), so the cases are
few and each covers several hard spots: ragged lengths that are not multiples of the tile
(0, partial last tile, == capacity), splits of the length with empty splits, GQA groups 1, 3 and
8, bf16 and float32, alpha with and without the block's keys. Cache rows at and past each length
are NaN: a kernel that reads or weights any of them fails."""

import numpy as np
import pytest

import jax.numpy as jnp

from pallas_kernels import decode_attention as reference
from pallas_kernels.tpu import _mosaic_utils
from pallas_kernels.tpu import decode_attention


def make_inputs(rng, batch, block, q_heads, kv_heads, head_dim, capacity, lengths, dtype):
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  q = normal(batch, block, q_heads, head_dim)
  k_cache, v_cache = (normal(batch, kv_heads, capacity, head_dim) for _ in range(2))
  k_block, v_block = (normal(batch, block, kv_heads, head_dim) for _ in range(2))
  clean = [jnp.asarray(x, dtype) for x in (q, k_cache, v_cache, k_block, v_block)]
  past_length = np.arange(capacity)[None, None, :, None] >= np.asarray(lengths)[:, None, None,
                                                                               None]
  poisoned = [jnp.asarray(np.where(past_length, np.nan, x), dtype) for x in (k_cache, v_cache)]
  return clean, poisoned


# (batch, block, q_heads, kv_heads, head_dim, capacity, lengths, dtype, alpha_includes_block,
#  tuning)
CASES = [
    # G = 3, 16-row tiles over 64 rows, 3 splits (empty ones for length 0 and 37 = 3 tiles).
    (3, 8, 6, 2, 64, 64, [0, 64, 37], jnp.float32, True,
     dict(block_k=16, num_splits=3, alpha_block_k=32)),
    # G = 8, bf16 (16-row sublane tiles), a 48-row cache in 16-row tiles.
    (2, 4, 8, 1, 128, 48, [48, 21], jnp.bfloat16, False, dict(block_k=16, alpha_block_k=16)),
    # G = 1 (5 query rows padded to 8); 36 rows have no multiple-of-8 divisor <= 16: tiles of
    # 12, and one alpha tile of the whole cache (default alpha_block_k).
    (2, 5, 4, 4, 64, 36, [9, 36], jnp.float32, True, dict(block_k=16)),
]


@pytest.mark.parametrize(
    "batch,block,q_heads,kv_heads,head_dim,capacity,lengths,dtype,includes,tuning", CASES)
def test_kernels_match_reference(batch, block, q_heads, kv_heads, head_dim, capacity, lengths,
                                 dtype, includes, tuning):
  rng = np.random.default_rng(capacity)
  (q, k_cache, v_cache, k_block, v_block), (k_poisoned, v_poisoned) = make_inputs(
      rng, batch, block, q_heads, kv_heads, head_dim, capacity, lengths, dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  atol = 2e-5 if dtype == jnp.float32 else 2e-2
  want_out, want_alpha = reference.mask_step_attention_reference(
      q, k_cache, v_cache, lengths, k_block, v_block, alpha_includes_block=includes)
  args = (q, k_poisoned, v_poisoned, lengths, k_block, v_block)

  out, alpha = decode_attention.mask_step_attention(*args, alpha_includes_block=includes,
                                                    interpret=True, **tuning)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32),
                             atol=atol, rtol=atol)
  assert alpha.shape == (batch, kv_heads, capacity) and alpha.dtype == jnp.float32
  np.testing.assert_allclose(alpha, want_alpha, atol=atol / 20, rtol=atol * 5)
  beyond = np.arange(capacity)[None, None, :] >= np.asarray(lengths)[:, None, None]
  assert np.all(np.asarray(alpha)[np.broadcast_to(beyond, alpha.shape)] == 0.0)
  if not includes:
    for b, length in enumerate(np.asarray(lengths)):
      np.testing.assert_allclose(np.asarray(alpha).sum(-1)[b], 1.0 if length else 0.0,
                                 atol=1e-3)

  exact_tuning = {key: value for key, value in tuning.items() if not key.startswith("alpha_")}
  exact = decode_attention.exact_block_attention(*args, interpret=True, **exact_tuning)
  np.testing.assert_array_equal(np.asarray(exact, np.float32), np.asarray(out, np.float32))


def test_bad_inputs_raise():
  rng = np.random.default_rng(2)
  (q, k_cache, v_cache, k_block, v_block), _ = make_inputs(rng, 2, 4, 6, 2, 16, 24, [3, 4],
                                                           jnp.float32)
  lengths = jnp.array([3, 4], jnp.int32)
  call = decode_attention.exact_block_attention
  with pytest.raises(ValueError, match="q must have rank 4"):
    call(q[0], k_cache, v_cache, lengths, k_block, v_block)
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    call(q[:, :, :5], k_cache, v_cache, lengths, k_block, v_block)
  with pytest.raises(ValueError, match="cache_lengths"):
    call(q, k_cache, v_cache, lengths[:1], k_block, v_block)
  with pytest.raises(ValueError, match="unknown tuning"):
    call(q, k_cache, v_cache, lengths, k_block, v_block, num_warps=4)
  with pytest.raises(ValueError, match="block_k=12 must be a positive multiple of 8"):
    call(q, k_cache, v_cache, lengths, k_block, v_block, block_k=12)
  with pytest.raises(ValueError, match="num_splits"):
    decode_attention.mask_step_attention(q, k_cache, v_cache, lengths, k_block, v_block,
                                         num_splits=0)


def test_row_tiles_divide_the_capacity():
  fit = lambda block_k, rows: _mosaic_utils.fit_row_tile(block_k, rows, "block_k")
  assert fit(1024, 131072) == 1024 and fit(1024, 33024) == 768  # 33024 = 2^8 * 3 * 43
  assert fit(1024, 700) == 700  # one tile
  assert fit(16, 36) == 12 and fit(16, 64) == 16
  assert fit(8, 13) == 1  # a prime capacity: correct, but single-row tiles
