"""decode_attention: references against float64 numpy, Pallas kernels (interpreted) against
the references, on ragged batches and GQA shapes scaled down from the Fast-dLLM v2 models."""

import numpy as np
import pytest

import jax.numpy as jnp

from pallas_kernels import decode_attention
from pallas_kernels import _triton_utils as tu


def make_inputs(rng, batch, block, q_heads, kv_heads, head_dim, capacity):
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return (normal(batch, block, q_heads, head_dim),
          normal(batch, kv_heads, capacity, head_dim),
          normal(batch, kv_heads, capacity, head_dim),
          normal(batch, block, kv_heads, head_dim),
          normal(batch, block, kv_heads, head_dim))


def numpy_attention(q, k_cache, v_cache, lengths, k_block, v_block, sm_scale,
                    alpha_includes_block):
  """float64 loops over (batch, query head, block token): the definition, spelled out."""
  q, k_cache, v_cache, k_block, v_block = (np.asarray(x, np.float64)
                                           for x in (q, k_cache, v_cache, k_block, v_block))
  batch, block, q_heads, head_dim = q.shape
  kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
  group = q_heads // kv_heads
  out = np.zeros_like(q)
  alpha = np.zeros((batch, kv_heads, capacity))
  for b in range(batch):
    n = int(lengths[b])
    for head in range(q_heads):
      h = head // group
      keys = np.concatenate([k_cache[b, h, :n], k_block[b, :, h]])
      values = np.concatenate([v_cache[b, h, :n], v_block[b, :, h]])
      for t in range(block):
        logits = keys @ q[b, t, head] * sm_scale
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[b, t, head] = p @ values
        if alpha_includes_block:
          alpha[b, h, :n] += p[:n] / (group * block)
        elif n:
          cache_p = np.exp(logits[:n] - logits[:n].max())
          alpha[b, h, :n] += cache_p / cache_p.sum() / (group * block)
  return out, alpha


@pytest.mark.parametrize("alpha_includes_block", [True, False])
def test_references_match_float64_numpy(alpha_includes_block):
  rng = np.random.default_rng(0)
  inputs = make_inputs(rng, 3, 4, 6, 2, 16, 11)
  lengths = np.array([0, 11, 7], np.int32)
  q, k_cache, v_cache, k_block, v_block = inputs
  args = (q, k_cache, v_cache, jnp.asarray(lengths), k_block, v_block)
  want_out, want_alpha = numpy_attention(q, k_cache, v_cache, lengths, k_block, v_block, 0.3,
                                         alpha_includes_block)
  exact = decode_attention.exact_block_attention_reference(*args, sm_scale=0.3)
  out, alpha = decode_attention.mask_step_attention_reference(
      *args, sm_scale=0.3, alpha_includes_block=alpha_includes_block)
  np.testing.assert_allclose(exact, want_out, atol=2e-5)
  np.testing.assert_allclose(out, want_out, atol=2e-5)
  np.testing.assert_allclose(alpha, want_alpha, atol=2e-6)


# (batch, block, q_heads, kv_heads, head_dim, capacity, lengths, tuning): G = 1, 2, 3, 4, 6, 7,
# 8; lengths ragged, 0 and == capacity; tiles and splits small enough to cover partial tiles,
# empty splits and splits of several tiles; query tiles (block_q) that split G*B, one of them
# with repeated padding rows.
KERNEL_CASES = [
    (3, 8, 6, 2, 64, 70, [0, 70, 37], dict(block_k=16, num_splits=3, block_q=16)),
    (2, 4, 8, 8, 128, 45, [45, 1], dict(block_k=16, num_splits=2)),
    (2, 32, 6, 3, 64, 50, [17, 50], dict(block_k=32, num_splits=1)),
    (1, 16, 12, 2, 64, 100, [93], dict(block_k=16, num_splits=5, block_q=32)),
    (2, 8, 28, 4, 64, 33, [33, 0], {}),
    (1, 6, 8, 1, 64, 29, [20], dict(block_k=16, num_splits=4)),
    (2, 5, 16, 4, 128, 10, [3, 10], {}),
    (1, 32, 12, 2, 64, 40, [40], {}),
]


@pytest.mark.parametrize("batch,block,q_heads,kv_heads,head_dim,capacity,lengths,tuning",
                         KERNEL_CASES)
def test_kernels_match_reference(batch, block, q_heads, kv_heads, head_dim, capacity, lengths,
                                 tuning):
  rng = np.random.default_rng(capacity)
  q, k_cache, v_cache, k_block, v_block = make_inputs(rng, batch, block, q_heads, kv_heads,
                                                      head_dim, capacity)
  args = (q, k_cache, v_cache, jnp.asarray(lengths, jnp.int32), k_block, v_block)
  want = decode_attention.exact_block_attention(*args, impl="reference")
  got = decode_attention.exact_block_attention(*args, impl="interpret", **tuning)
  assert got.shape == q.shape and got.dtype == q.dtype
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)

  alpha_tuning = {f"alpha_{key}": value for key, value in tuning.items()
                  if key in ("block_k", "num_splits")}
  for includes in (True, False):
    want_out, want_alpha = decode_attention.mask_step_attention(
        *args, impl="reference", alpha_includes_block=includes)
    out, alpha = decode_attention.mask_step_attention(
        *args, impl="interpret", alpha_includes_block=includes, **tuning, **alpha_tuning)
    np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5)
    assert alpha.shape == (batch, kv_heads, capacity) and alpha.dtype == jnp.float32
    np.testing.assert_allclose(alpha, want_alpha, atol=1e-6, rtol=1e-4)
    beyond = np.arange(capacity)[None, None, :] >= np.asarray(lengths)[:, None, None]
    assert np.all(np.asarray(alpha)[np.broadcast_to(beyond, alpha.shape)] == 0.0)
    if not includes:
      sums = np.asarray(alpha).sum(-1)
      for b, length in enumerate(lengths):
        np.testing.assert_allclose(sums[b], 1.0 if length else 0.0, atol=1e-5)


def test_custom_scale_and_auto_impl_on_cpu():
  rng = np.random.default_rng(1)
  q, k_cache, v_cache, k_block, v_block = make_inputs(rng, 1, 4, 4, 2, 32, 20)
  args = (q, k_cache, v_cache, jnp.array([13], jnp.int32), k_block, v_block)
  want = decode_attention.exact_block_attention_reference(*args, sm_scale=0.05)
  np.testing.assert_allclose(
      decode_attention.exact_block_attention(*args, sm_scale=0.05, impl="interpret"), want,
      atol=2e-5)
  np.testing.assert_array_equal(
      decode_attention.exact_block_attention(*args, sm_scale=0.05), want)


def test_bad_inputs_raise():
  rng = np.random.default_rng(2)
  q, k_cache, v_cache, k_block, v_block = make_inputs(rng, 2, 4, 6, 2, 16, 20)
  lengths = jnp.array([3, 4], jnp.int32)
  call = decode_attention.exact_block_attention
  with pytest.raises(ValueError, match="q must have rank 4"):
    call(q[0], k_cache, v_cache, lengths, k_block, v_block)
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    call(q[:, :, :5], k_cache, v_cache, lengths, k_block, v_block)
  with pytest.raises(ValueError, match="v_cache"):
    call(q, k_cache, v_cache[:, :, :5], lengths, k_block, v_block)
  with pytest.raises(ValueError, match="k_block"):
    call(q, k_cache, v_cache, lengths, k_block[:, :3], v_block)
  with pytest.raises(ValueError, match="cache_lengths"):
    call(q, k_cache, v_cache, lengths[:1], k_block, v_block)
  with pytest.raises(ValueError, match="unknown tuning"):
    call(q, k_cache, v_cache, lengths, k_block, v_block, impl="interpret", blockk=16)
  with pytest.raises(ValueError, match="head_dim"):
    call(q[..., :12], k_cache[..., :12], v_cache[..., :12], lengths, k_block[..., :12],
         v_block[..., :12], impl="interpret")
  with pytest.raises(ValueError, match="impl"):
    decode_attention.mask_step_attention(q, k_cache, v_cache, lengths, k_block, v_block,
                                         impl="triton")


def test_default_query_tile_follows_batch():
  """64-row tiles only where few (sequence, KV head) pairs leave the grid short and they save
  padded rows; one full tile otherwise (measured choices, see _default_block_q)."""
  rows_15b, rows_7b = 6 * 32, 7 * 32
  assert decode_attention._default_block_q(rows_15b, 2) == 64  # 1.5B, batch 1
  assert decode_attention._default_block_q(rows_15b, 16) == 256  # 1.5B, batch 8
  assert decode_attention._default_block_q(rows_7b, 4) == 256  # 7B: 4 x 64 saves nothing
  assert decode_attention._default_block_q(128, 2) == 128  # already a power of two


def test_default_splits_fill_one_wave_of_full_tiles_for_few_pairs():
  splits = decode_attention.default_attention_splits
  full, part = 256, 64
  # 7B at batch 1: 4 pairs, one 256-row tile: one program per SM (splits + the block's program).
  assert 4 * (splits(4, 1, full, 32768, 64) + 1) == tu.TARGET_PROGRAMS_FULL_TILE
  # Many pairs, or 64-row tiles: about two programs per SM.
  assert splits(32, 1, full, 32768, 64) == tu.TARGET_PROGRAMS // 32 - 1
  assert splits(2, 3, part, 32768, 64) == tu.TARGET_PROGRAMS // 6 - 1
  # Short caches keep at least MIN_SPLIT_TILES key tiles per split.
  assert splits(4, 1, full, 1000, 64) == 1000 // (tu.MIN_SPLIT_TILES * 64)
  assert splits(4, 1, full, 100, 64) == 1
