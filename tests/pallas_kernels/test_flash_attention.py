"""Block-diffusion flash attention: interpreted kernels vs the reference."""

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention as fa

SMALL_TILES = dict(
    block_q=16, block_kv=32, dq_block_q=32, dq_block_kv=16, dkv_block_q=16,
    dkv_block_kv=32,
)


def _inputs(seed, batch, q_len, kv_len, q_heads, kv_heads, head_dim,
            dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (batch, q_len, q_heads, head_dim), dtype)
  k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), dtype)
  v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), dtype)
  return q, k, v


def _loss(attention):
  """A loss that weights every output and every finite lse differently."""

  def loss(q, k, v):
    out, lse = attention(q, k, v)
    w_out = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    w_lse = jnp.sin(jnp.arange(lse.size, dtype=jnp.float32)).reshape(lse.shape)
    return jnp.sum(out * w_out) + jnp.sum(
        jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0)
    )

  return loss


def _check(q, k, v, q_seg, kv_seg, kv_lengths, *, grads=True, atol=2e-5,
           **tuning):
  kernel = lambda q, k, v: fa.block_diffusion_attention(
      q, k, v, q_seg, kv_seg, kv_lengths, return_lse=True, impl="interpret",
      **tuning)
  reference = lambda q, k, v: fa.block_diffusion_attention_reference(
      q, k, v, q_seg, kv_seg, kv_lengths, return_lse=True)
  out, lse = kernel(q, k, v)
  ref_out, ref_lse = reference(q, k, v)
  assert out.dtype == q.dtype and out.shape == q.shape
  assert lse.dtype == jnp.float32
  assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
  np.testing.assert_allclose(out, ref_out, atol=atol, rtol=atol)
  np.testing.assert_array_equal(lse == -np.inf, ref_lse == -np.inf)
  finite = np.isfinite(ref_lse)
  np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=atol,
                             rtol=atol)
  if grads:
    got = jax.grad(_loss(kernel), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(_loss(reference), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
      assert g.shape == w.shape, name
      np.testing.assert_allclose(g, w, atol=10 * atol, rtol=10 * atol,
                                 err_msg=f"d{name}")
  return out, lse


def test_mask_of_two_block_doubled_sequence():
  # Block size 2, 2 blocks: noisy tokens n0 n0 n1 n1, then clean c0 c0 c1 c1.
  seg = fa.training_token_blocks(1, 4, 2)
  expected = np.array(
      [
          [1, 1, 0, 0, 0, 0, 0, 0],
          [1, 1, 0, 0, 0, 0, 0, 0],
          [0, 0, 1, 1, 1, 1, 0, 0],
          [0, 0, 1, 1, 1, 1, 0, 0],
          [0, 0, 0, 0, 1, 1, 0, 0],
          [0, 0, 0, 0, 1, 1, 0, 0],
          [0, 0, 0, 0, 1, 1, 1, 1],
          [0, 0, 0, 0, 1, 1, 1, 1],
      ],
      dtype=bool,
  )
  mask = fa.block_diffusion_mask(seg, seg, jnp.array([8]))
  np.testing.assert_array_equal(mask[0], expected)
  truncated = fa.block_diffusion_mask(seg, seg, jnp.array([7]))
  expected[:, 7] = False
  np.testing.assert_array_equal(truncated[0], expected)


def test_mask_of_prefill_chunk_is_block_causal_over_cache():
  q_seg = fa.prefill_token_blocks(1, 3, block_size=2, start=3)
  kv_seg = fa.prefill_token_blocks(1, 6, block_size=2)
  mask = fa.block_diffusion_mask(q_seg, kv_seg, jnp.array([6]))
  expected = np.array(
      [
          [1, 1, 1, 1, 0, 0],  # position 3, block 1
          [1, 1, 1, 1, 1, 1],  # position 4, block 2
          [1, 1, 1, 1, 1, 1],  # position 5, block 2
      ],
      dtype=bool,
  )
  np.testing.assert_array_equal(mask[0], expected)


@pytest.mark.parametrize(
    "block_size, length, q_heads, kv_heads, head_dim",
    [
        (4, 50, 2, 2, 16),
        (8, 70, 6, 2, 32),
        (16, 45, 7, 1, 16),
        (64, 100, 8, 1, 16),
    ],
)
def test_prefill(block_size, length, q_heads, kv_heads, head_dim):
  q, k, v = _inputs(block_size, 1, length, length, q_heads, kv_heads, head_dim)
  seg = fa.prefill_token_blocks(1, length, block_size)
  _check(q, k, v, seg, seg, jnp.array([length], jnp.int32), **SMALL_TILES)


def test_prefill_chunk_against_longer_cache_with_ragged_lengths():
  # Queries are positions 40..63 of sequences whose caches hold 64 and 53
  # valid keys out of 77 slots.
  q, k, v = _inputs(1, 2, 24, 77, 4, 2, 16)
  q_seg = fa.prefill_token_blocks(2, 24, 16, start=40)
  kv_seg = fa.prefill_token_blocks(2, 77, 16)
  _check(q, k, v, q_seg, kv_seg, jnp.array([64, 53], jnp.int32),
         **SMALL_TILES)


@pytest.mark.parametrize(
    "block_size, seq_len, q_heads, kv_heads",
    [(4, 37, 4, 1), (32, 70, 8, 2)],
)
def test_doubled_training_sequence(block_size, seq_len, q_heads, kv_heads):
  q, k, v = _inputs(seq_len, 2, 2 * seq_len, 2 * seq_len, q_heads, kv_heads,
                    16)
  seg = fa.training_token_blocks(2, seq_len, block_size)
  lengths = jnp.array([2 * seq_len, 2 * seq_len - 5], jnp.int32)
  _check(q, k, v, seg, seg, lengths, **SMALL_TILES)


def test_rows_without_visible_keys_output_zero():
  # Batch 0 has no valid key at all. In batch 1 only the noisy half is in
  # range, so clean queries of block 0 and every noisy query outside block 0
  # still see keys, but clean queries see none.
  seq_len = 20
  q, k, v = _inputs(3, 2, 2 * seq_len, 2 * seq_len, 2, 1, 16)
  seg = fa.training_token_blocks(2, seq_len, 8)
  lengths = jnp.array([0, seq_len], jnp.int32)
  out, lse = _check(q, k, v, seg, seg, lengths, **SMALL_TILES)
  assert not np.isnan(out).any()
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_array_equal(lse[0], -np.inf)
  np.testing.assert_array_equal(out[1, seq_len:], 0.0)
  assert np.isfinite(lse[1, :, :seq_len]).all()


def test_default_tiles_and_unaligned_head_dim():
  # Default (GPU-sized) tiles shrink to the sequence; head_dim 24 is padded.
  q, k, v = _inputs(4, 1, 2 * 33, 2 * 33, 4, 2, 24)
  seg = fa.training_token_blocks(1, 33, 8)
  _check(q, k, v, seg, seg, jnp.array([66], jnp.int32))


def test_bfloat16_forward():
  q, k, v = _inputs(5, 1, 60, 60, 4, 2, 32, jnp.bfloat16)
  seg = fa.prefill_token_blocks(1, 60, 8)
  _check(q, k, v, seg, seg, jnp.array([60], jnp.int32), grads=False,
         atol=2e-2, **SMALL_TILES)


def test_custom_scale():
  q, k, v = _inputs(6, 1, 40, 40, 2, 1, 16)
  seg = fa.prefill_token_blocks(1, 40, 8)
  lengths = jnp.array([40], jnp.int32)
  out = fa.block_diffusion_attention(q, k, v, seg, seg, lengths, sm_scale=0.7,
                                     impl="interpret", **SMALL_TILES)
  want = fa.block_diffusion_attention_reference(q, k, v, seg, seg, lengths,
                                                sm_scale=0.7)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_reference_gradients_match_finite_differences():
  q, k, v = _inputs(7, 1, 12, 12, 2, 1, 4)
  seg = fa.training_token_blocks(1, 6, 3)
  lengths = jnp.array([11], jnp.int32)
  reference = lambda q, k, v: fa.block_diffusion_attention_reference(
      q, k, v, seg, seg, lengths, return_lse=True)
  jtu.check_grads(_loss(reference), (q, k, v), order=1, modes=["rev"],
                  atol=2e-2, rtol=2e-2, eps=1e-2)


@pytest.mark.parametrize(
    "seg, block_q, block_kv",
    [
        (fa.prefill_token_blocks(2, 100, 8), 16, 32),
        (fa.prefill_token_blocks(2, 100, 32), 32, 16),
        (fa.training_token_blocks(2, 90, 16), 16, 16),
        (fa.training_token_blocks(2, 90, 8), 32, 16),
    ],
)
def test_tile_schedule_is_exact(seg, block_q, block_kv):
  # A tile pair is walked iff some pair in it is attended, and walked without
  # a mask iff every pair is.
  length = seg.block_ids.shape[1]
  lengths = jnp.array([length, length - 23], jnp.int32)
  pad = fa._round_up(length, 32)
  tokens = fa._encode_tokens(seg, seg, lengths, pad, pad)
  visible, full = fa._tile_visibility(tokens, block_q, block_kv)
  mask = np.zeros((2, pad, pad), bool)
  mask[:, :length, :length] = fa.block_diffusion_mask(seg, seg, lengths)
  tiles = mask.reshape(2, pad // block_q, block_q, pad // block_kv, block_kv)
  np.testing.assert_array_equal(visible, tiles.any(axis=(2, 4)))
  np.testing.assert_array_equal(full, tiles.all(axis=(2, 4)))
  order, counts = fa._schedule(visible, full)
  for b in range(2):
    for i in range(visible.shape[1]):
      n_full, n_visible = counts[b, i]
      np.testing.assert_array_equal(
          np.sort(order[b, i, :n_full]), np.flatnonzero(full[b, i]))
      np.testing.assert_array_equal(
          np.sort(order[b, i, :n_visible]), np.flatnonzero(visible[b, i]))


def test_prefill_walks_only_the_block_causal_tiles():
  # Block 8, tiles 16: query tile i sees key tiles 0..i, all full but i.
  seg = fa.prefill_token_blocks(1, 128, 8)
  tokens = fa._encode_tokens(seg, seg, jnp.array([128]), 128, 128)
  _, counts = fa._schedule(*fa._tile_visibility(tokens, 16, 16))
  tiles = np.arange(8)
  np.testing.assert_array_equal(counts[0, :, 0], tiles)
  np.testing.assert_array_equal(counts[0, :, 1], tiles + 1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "q": a["q"][0]}, "q must be"),
        (lambda a: {**a, "k": a["k"][..., :8], "v": a["v"][..., :8]},
         "k must match"),
        (lambda a: {**a, "v": a["v"][:, :5]}, "k and v"),
        (lambda a: {**a, "k": a["k"][:, :, :1].repeat(3, 2),
                    "v": a["v"][:, :, :1].repeat(3, 2)}, "multiple"),
        (lambda a: {**a, "q": a["q"].astype(jnp.float16)}, "q must be float32"),
        (lambda a: {**a, "v": a["v"].astype(jnp.bfloat16)}, "share a dtype"),
        (lambda a: {**a, "kv_segments": fa.prefill_token_blocks(1, 9, 4)},
         "kv_segments.block_ids"),
        (lambda a: {**a, "q_segments": fa.TokenBlocks(
            a["q_segments"].block_ids, a["q_segments"].block_ids)},
         "q_segments.noisy"),
        (lambda a: {**a, "kv_lengths": jnp.array([1.0])}, "kv_lengths"),
    ],
)
def test_bad_input_raises(change, message):
  q, k, v = _inputs(8, 1, 16, 16, 4, 2, 16)
  seg = fa.prefill_token_blocks(1, 16, 4)
  args = dict(q=q, k=k, v=v, q_segments=seg, kv_segments=seg,
              kv_lengths=jnp.array([16], jnp.int32))
  with pytest.raises(ValueError, match=message):
    fa.block_diffusion_attention(**change(args), impl="interpret")


@pytest.mark.parametrize(
    "tuning, message",
    [({"block_q": 24}, "power of 2"), ({"num_warps": 0}, "positive"),
     ({"blockq": 16}, "unknown")],
)
def test_bad_tuning_raises(tuning, message):
  q, k, v = _inputs(9, 1, 16, 16, 2, 2, 16)
  seg = fa.prefill_token_blocks(1, 16, 4)
  with pytest.raises(ValueError, match=message):
    fa.block_diffusion_attention(q, k, v, seg, seg, jnp.array([16]),
                                 impl="interpret", **tuning)


# The portable blockwise path ("auto" off the GPU) against the dense reference.


def _check_blockwise(q, k, v, q_seg, kv_seg, kv_lengths, **tiles):
  blockwise = lambda q, k, v: fa.block_diffusion_attention_blockwise(
      q, k, v, q_seg, kv_seg, kv_lengths, return_lse=True, **tiles)
  reference = lambda q, k, v: fa.block_diffusion_attention_reference(
      q, k, v, q_seg, kv_seg, kv_lengths, return_lse=True)
  out, lse = jax.jit(blockwise)(q, k, v)
  ref_out, ref_lse = reference(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(lse == -np.inf, ref_lse == -np.inf)
  finite = np.isfinite(ref_lse)
  np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=2e-5, rtol=2e-5)
  got = jax.grad(_loss(blockwise), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(_loss(reference), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(g, w, atol=2e-4, rtol=2e-4, err_msg=f"d{name}")
  return out, lse


@pytest.mark.parametrize("q_tile, kv_tile", [(16, 32), (7, 13), (128, 512)])
def test_blockwise_prefill_chunk_over_longer_ragged_cache(q_tile, kv_tile):
  # Positions 40..89 of caches holding 90 and 61 valid keys out of 101 slots: the tiles do not
  # divide either length, and the second sequence's chunk runs past its length.
  q, k, v = _inputs(5, 2, 50, 101, 6, 2, 16)
  q_seg = fa.prefill_token_blocks(2, 50, 8, start=40)
  kv_seg = fa.prefill_token_blocks(2, 101, 8)
  _check_blockwise(q, k, v, q_seg, kv_seg, jnp.array([90, 61], jnp.int32),
                   q_tile=q_tile, kv_tile=kv_tile)


def test_blockwise_doubled_training_sequence_and_rows_that_see_nothing():
  seq_len = 37
  q, k, v = _inputs(6, 3, 2 * seq_len, 2 * seq_len, 4, 1, 16)
  seg = fa.training_token_blocks(3, seq_len, 4)
  lengths = jnp.array([2 * seq_len, seq_len, 0], jnp.int32)
  out, lse = _check_blockwise(q, k, v, seg, seg, lengths, q_tile=16, kv_tile=8)
  np.testing.assert_array_equal(out[2], 0.0)
  np.testing.assert_array_equal(lse[2], -np.inf)


def test_auto_runs_the_blockwise_path_off_the_gpu(monkeypatch):
  q, k, v = _inputs(7, 1, 40, 40, 2, 2, 16)
  seg = fa.prefill_token_blocks(1, 40, 8)
  lengths = jnp.array([40], jnp.int32)
  calls = []
  blockwise = fa.block_diffusion_attention_blockwise
  monkeypatch.setattr(fa, "block_diffusion_attention_blockwise",
                      lambda *a, **kw: calls.append(1) or blockwise(*a, **kw))
  if jax.default_backend() != "gpu":
    fa.block_diffusion_attention(q, k, v, seg, seg, lengths, impl="auto")
    assert calls == [1]
  fa.block_diffusion_attention(q, k, v, seg, seg, lengths, impl="reference")
  assert len(calls) <= 1
