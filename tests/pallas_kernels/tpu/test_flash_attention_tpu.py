"""TPU block-diffusion flash attention: TPU interpret mode on CPU vs the reference, the tile
schedule, and lowering for TPU at the real model shapes.

Interpret mode costs a compile of ~5-10 s per shape and dtype: cases share shapes (the mask is
runtime data) and each jitted call returns the outputs and the gradients together.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention as fa
from pallas_kernels.tpu import block_mask as bm
from pallas_kernels.tpu import flash_attention as tfa

# The smallest tiles (one lane width), so short sequences span several tiles.
SMALL_TILES = dict(block_q=128, block_kv=128, dq_block_q=128, dq_block_kv=128,
                   dkv_block_q=128, dkv_block_kv=128)


def _inputs(seed, batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (batch, q_len, q_heads, head_dim), dtype)
  k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), dtype)
  v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), dtype)
  return q, k, v


def _loss_and_outputs(attention, q, k, v, q_seg, kv_seg, kv_lengths):
  """A loss weighting every output and every finite lse differently, and (out, lse)."""
  out, lse = attention(q, k, v, q_seg, kv_seg, kv_lengths)
  w_out = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
  w_lse = jnp.sin(jnp.arange(lse.size, dtype=jnp.float32)).reshape(lse.shape)
  loss = jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(
      jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0))
  return loss, (out, lse)


def _kernel(q, k, v, q_seg, kv_seg, kv_lengths):
  return tfa.block_diffusion_attention(q, k, v, q_seg, kv_seg, kv_lengths, return_lse=True,
                                       interpret=True, **SMALL_TILES)


def _reference(q, k, v, q_seg, kv_seg, kv_lengths):
  return fa.block_diffusion_attention_reference(q, k, v, q_seg, kv_seg, kv_lengths,
                                                return_lse=True)


def _grads_and_outputs(attention):
  return jax.jit(jax.grad(functools.partial(_loss_and_outputs, attention), argnums=(0, 1, 2),
                          has_aux=True))


# One compile per shape and dtype, shared by every test.
_kernel_run = _grads_and_outputs(_kernel)
_reference_run = _grads_and_outputs(_reference)


def _check(q, k, v, q_seg, kv_seg, kv_lengths, *, atol):
  grads, (out, lse) = _kernel_run(q, k, v, q_seg, kv_seg, kv_lengths)
  # The reference in float32 (a bf16 reference would round its own logits).
  f32 = lambda x: x.astype(jnp.float32)
  ref_grads, (ref_out, ref_lse) = _reference_run(f32(q), f32(k), f32(v), q_seg, kv_seg,
                                                 kv_lengths)
  assert out.dtype == q.dtype and out.shape == q.shape
  assert lse.dtype == jnp.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
  np.testing.assert_allclose(f32(out), ref_out, atol=atol, rtol=atol)
  np.testing.assert_array_equal(lse == -np.inf, ref_lse == -np.inf)
  finite = np.isfinite(ref_lse)
  np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=atol, rtol=atol)
  for name, got, want in zip("qkv", grads, ref_grads):
    assert got.shape == want.shape and got.dtype == q.dtype, name
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(f32(got), want, atol=10 * atol * scale, rtol=10 * atol,
                               err_msg=f"d{name}")
  return out, lse


# Shapes shared by several tests. Training: a doubled sequence of 2 x 100 tokens (2 tiles of
# 128, the second partly padding), groups of 3 query heads, head_dim 64 (padded to 128).
TRAIN_SHAPE = dict(batch=2, q_len=200, kv_len=200, q_heads=3, kv_heads=1, head_dim=64)


def _train_inputs(seed):
  return _inputs(seed, *TRAIN_SHAPE.values())


def _per_sequence(*segments):
  """One batch of the segments' sequences (each of batch 1): the mask is runtime data."""
  return fa.TokenBlocks(*(jnp.concatenate(x) for x in zip(*segments)))


def test_training_mask_block_sizes_4_and_32_with_ragged_lengths():
  q, k, v = _train_inputs(0)
  seg = _per_sequence(fa.training_token_blocks(1, 100, 4), fa.training_token_blocks(1, 100, 32))
  _check(q, k, v, seg, seg, jnp.array([200, 163], jnp.int32), atol=2e-5)


def test_arbitrary_block_layout():
  # Random block ids and noisy flags: the tile classification is conservative there.
  q, k, v = _train_inputs(7)
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 200), 0, 12)
  noisy = jax.random.bernoulli(jax.random.PRNGKey(2), 0.5, (2, 200))
  seg = fa.TokenBlocks(ids, noisy)
  _check(q, k, v, seg, seg, jnp.array([200, 190], jnp.int32), atol=2e-5)


def test_noisy_half_against_clean_half_has_rows_without_keys():
  # MAGE-FT's call: noisy queries against the clean half only. Block 0's noisy queries see no
  # key: out 0, lse -inf, zero gradients.
  q, k, v = _train_inputs(20)
  halves = fa.training_token_blocks(2, 200, 32)
  noisy_half = fa.TokenBlocks(*(x[:, :200] for x in halves))
  clean_half = fa.TokenBlocks(*(x[:, 200:] for x in halves))
  out, lse = _check(q, k, v, noisy_half, clean_half, jnp.array([200, 150], jnp.int32),
                    atol=2e-5)
  np.testing.assert_array_equal(out[:, :32], 0.0)
  np.testing.assert_array_equal(lse[:, :, :32], -np.inf)
  assert np.isfinite(lse[:, :, 32:]).all()


def test_prefill_chunks_at_ragged_offsets():
  # Each sequence writes 100 queries at its own cache length (0 and 77, not tile- or block-
  # aligned; block sizes 4 and 32) into a 300-slot cache; the second chunk's last 30 rows are
  # padding past its kv_length. 8 query heads share one KV head. No query sees the cache's
  # third tile, so the forward and dq grids walk 2 steps per query tile, not 3.
  q, k, v = _inputs(10, 2, 100, 300, 8, 1, 128)
  positions = jnp.array([[0], [77]], jnp.int32) + jnp.arange(100, dtype=jnp.int32)
  q_seg = fa.TokenBlocks(positions // jnp.array([[4], [32]]), jnp.zeros((2, 100), bool))
  kv_seg = _per_sequence(fa.prefill_token_blocks(1, 300, 4), fa.prefill_token_blocks(1, 300, 32))
  kv_lengths = jnp.array([100, 147], jnp.int32)
  keys = bm.encode_tokens(q_seg, kv_seg, kv_lengths, 128, 384)
  _, steps = tfa._schedule(*keys, 128, 128)
  assert int(steps) == 2
  _check(q, k, v, q_seg, kv_seg, kv_lengths, atol=2e-5)


def test_bfloat16_one_query_head_per_kv_head():
  q, k, v = _inputs(3, 2, 200, 200, 2, 2, 128, jnp.bfloat16)
  seg = _per_sequence(fa.training_token_blocks(1, 100, 4), fa.training_token_blocks(1, 100, 32))
  _check(q, k, v, seg, seg, jnp.array([200, 171], jnp.int32), atol=2e-2)


@functools.partial(jax.jit, static_argnames=("tile", "max_runs"))
def _schedule(seg, kv_lengths, *, tile, max_runs):
  padded = -(-seg.block_ids.shape[1] // tile) * tile
  keys = bm.encode_tokens(seg, seg, kv_lengths, padded, padded)
  visible, full = bm.tile_visibility(*keys, tile, tile)
  return visible, full, bm.tile_runs(visible, full, max_runs)


@pytest.mark.parametrize("layout", ["prefill", "training", "random"])
def test_tile_runs_cover_visible_tiles_once(layout):
  batch, length, tile = 2, 500, 16
  if layout == "prefill":
    seg = fa.prefill_token_blocks(batch, length, 4)
  elif layout == "training":  # 250 tokens per half: a tile straddles the halves.
    seg = fa.training_token_blocks(batch, length // 2, 32)
  else:
    seg = fa.TokenBlocks(jax.random.randint(jax.random.PRNGKey(0), (batch, length), 0, 40),
                         jax.random.bernoulli(jax.random.PRNGKey(1), 0.3, (batch, length)))
  kv_lengths = jnp.array([length, 350])
  mask = np.asarray(fa.block_diffusion_mask(seg, seg, kv_lengths))
  tiles = -(-length // tile)
  pad = tiles * tile - length
  mask = np.pad(mask, ((0, 0), (0, pad), (0, pad))).reshape(batch, tiles, tile, tiles, tile)
  for max_runs in (1, bm.MAX_RUNS, 64):
    visible, full, runs = map(np.asarray, _schedule(seg, kv_lengths, tile=tile,
                                                    max_runs=max_runs))
    np.testing.assert_array_equal(visible, mask.any(axis=(2, 4)))
    assert not (full & ~mask.all(axis=(2, 4))).any()
    if layout != "random":  # Exact where block ids are nondecreasing per segment.
      np.testing.assert_array_equal(full, mask.all(axis=(2, 4)))
    covered = np.zeros(visible.shape, int)
    unmasked = np.zeros(visible.shape, bool)
    for b, row, run in np.ndindex(runs.shape[:3]):
      start, run_length, masked = runs[b, row, run]
      covered[b, row, start:start + run_length] += 1
      unmasked[b, row, start:start + run_length] |= not masked
    assert (covered <= 1).all()
    assert (covered[visible] == 1).all()
    assert not (unmasked & ~full).any()
    if max_runs == 64:  # Every maximal run; the standard layouts need at most MAX_RUNS.
      np.testing.assert_array_equal(covered.astype(bool), visible)
      count = np.sum(runs[..., bm.RUN_LENGTH] > 0, axis=-1).max()
      assert layout == "random" or count <= bm.MAX_RUNS


def test_bad_tuning_is_refused():
  q = k = v = np.zeros((1, 8, 2, 128), np.float32)
  seg = fa.prefill_token_blocks(1, 8, 4)
  lengths = jnp.array([8], jnp.int32)
  with pytest.raises(ValueError, match="block_kv must be a power of 2 >= 128"):
    tfa.block_diffusion_attention(q, k, v, seg, seg, lengths, block_kv=64)
  with pytest.raises(ValueError, match="unknown tuning arguments"):
    tfa.block_diffusion_attention(q, k, v, seg, seg, lengths, num_warps=4)
  # Shapes only: the budgets are checked before anything is traced.
  def attend(length, batch, **tuning):
    x = jax.ShapeDtypeStruct((batch, length, 2, 128), jnp.bfloat16)
    seg = fa.TokenBlocks(jax.ShapeDtypeStruct((batch, length), jnp.int32),
                         jax.ShapeDtypeStruct((batch, length), jnp.bool_))
    return jax.eval_shape(lambda x, seg, lengths: tfa.block_diffusion_attention(
        x, x, x, seg, seg, lengths, **tuning), x, seg, jax.ShapeDtypeStruct((batch,), jnp.int32))

  with pytest.raises(ValueError, match="need ~.* MiB of VMEM"):
    attend(4096, 1, block_q=2048, block_kv=2048)
  with pytest.raises(ValueError, match="KiB of scalar memory"):
    attend(2**17, 8, **SMALL_TILES)


# Lowering for TPU (Mosaic) at the real shapes: (q heads, KV heads) of Fast-dLLM v2 1.5B / 7B
# and SDAR 4B-8B, head_dim 128, bf16.
MODELS = {"fast_dllm_1.5b": (12, 2), "fast_dllm_7b": (28, 4), "sdar_8b": (32, 8)}


def _export(f, *shapes):
  exported = jax.export.export(jax.jit(f), platforms=("tpu",))(*shapes)
  return exported.mlir_module()


@pytest.mark.parametrize("model, batch, chunk, capacity, block_size", [
    ("fast_dllm_1.5b", 8, 4096, 32768, 32),
    ("fast_dllm_7b", 1, 4096, 32768, 4),
    ("sdar_8b", 4, 4096, 16384, 4),
])
def test_prefill_lowers_for_tpu(model, batch, chunk, capacity, block_size):
  q_heads, kv_heads = MODELS[model]

  def prefill(q, k, v, positions, kv_lengths):
    q_seg = fa.TokenBlocks(positions // block_size, jnp.zeros(positions.shape, bool))
    kv_seg = fa.prefill_token_blocks(batch, capacity, block_size)
    return tfa.block_diffusion_attention(q, k, v, q_seg, kv_seg, kv_lengths)

  s = jax.ShapeDtypeStruct
  module = _export(prefill, s((batch, chunk, q_heads, 128), jnp.bfloat16),
                   *[s((batch, capacity, kv_heads, 128), jnp.bfloat16)] * 2,
                   s((batch, chunk), jnp.int32), s((batch,), jnp.int32))
  assert module.count("tpu_custom_call") == 1


@pytest.mark.parametrize("model, batch, seq_len, block_size", [
    ("fast_dllm_1.5b", 8, 4096, 32),
    ("fast_dllm_7b", 1, 32768, 4),
    ("sdar_8b", 2, 16384, 4),
])
def test_training_forward_and_backward_lower_for_tpu(model, batch, seq_len, block_size):
  q_heads, kv_heads = MODELS[model]

  def forward_and_vjp(q, k, v):
    seg = fa.training_token_blocks(batch, seq_len, block_size)
    lengths = jnp.full((batch,), 2 * seq_len, jnp.int32)
    attention = lambda q, k, v: tfa.block_diffusion_attention(q, k, v, seg, seg, lengths,
                                                              return_lse=True)
    (out, lse), vjp = jax.vjp(attention, q, k, v)
    return vjp((out, jnp.zeros_like(lse)))

  s = jax.ShapeDtypeStruct
  module = _export(forward_and_vjp, s((batch, 2 * seq_len, q_heads, 128), jnp.bfloat16),
                   *[s((batch, 2 * seq_len, kv_heads, 128), jnp.bfloat16)] * 2)
  # Forward, dq and dk/dv kernels.
  assert module.count("tpu_custom_call") == 3
