"""The training attention: mask, MAGE-FT selection statistics and sparse student attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import use_kernels
from pallas_kernels.flash_attention import block_diffusion_mask, training_token_blocks
from train import attention

BLOCK = 2
SEQ = 4


@pytest.fixture(autouse=True)
def _reference_kernels():
  with use_kernels("reference"):
    yield


def _qkv(key, seq, q_heads=4, kv_heads=2, dim=8):
  kq, kk, kv = jax.random.split(jax.random.key(key), 3)
  return (jax.random.normal(kq, (1, seq, q_heads, dim)),
          jax.random.normal(kk, (1, seq, kv_heads, dim)),
          jax.random.normal(kv, (1, seq, kv_heads, dim)))


def _dense_attention(q, k, v, mask):
  """Masked softmax attention in float64-free plain numpy, GQA by repeating kv heads."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  logits = np.where(mask[:, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", probs, v), probs


# [x_t | x_0] with L = 4, B = 2: rows are queries n0 n1 n2 n3 c0 c1 c2 c3 (noisy, then clean),
# columns the same keys. Noisy block 0 (n0 n1) sees itself; noisy block 1 (n2 n3) sees itself
# and clean block 0; clean tokens see clean blocks up to their own.
HAND_MASK = np.array([
    # n0 n1 n2 n3 c0 c1 c2 c3
    [1, 1, 0, 0, 0, 0, 0, 0],  # n0
    [1, 1, 0, 0, 0, 0, 0, 0],  # n1
    [0, 0, 1, 1, 1, 1, 0, 0],  # n2
    [0, 0, 1, 1, 1, 1, 0, 0],  # n3
    [0, 0, 0, 0, 1, 1, 0, 0],  # c0
    [0, 0, 0, 0, 1, 1, 0, 0],  # c1
    [0, 0, 0, 0, 1, 1, 1, 1],  # c2
    [0, 0, 0, 0, 1, 1, 1, 1],  # c3
], bool)


def test_training_mask_equals_hand_built_reference():
  segments = training_token_blocks(1, SEQ, BLOCK)
  mask = block_diffusion_mask(segments, segments, jnp.array([2 * SEQ]))
  np.testing.assert_array_equal(np.asarray(mask[0]), HAND_MASK)


def test_training_attend_applies_that_mask():
  q, k, v = _qkv(0, 2 * SEQ)
  out, carry = attention.make_training_attend(BLOCK)(0, q, k, v, "carry")
  expected, _ = _dense_attention(q, k, v, HAND_MASK[None])
  assert carry == "carry"
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


@pytest.mark.parametrize("chunk", [2, 4, 8])
def test_noisy_block_scores_match_dense_probabilities(chunk):
  seq, block = 8, 2
  q, k, v = _qkv(1, 2 * seq)
  segments = training_token_blocks(1, seq, block)
  mask = np.asarray(block_diffusion_mask(segments, segments, jnp.array([2 * seq])))
  _, probs = _dense_attention(q, k, v, mask)  # [b, q_heads, 2L, 2L]
  _, lse = attention._training_attention(q, k, v, block, return_lse=True)
  scores = attention.noisy_block_scores(q[:, :seq], k[:, seq:], lse[:, :, :seq], block, chunk)
  # alpha[n, h, j]: mean over the block's queries and the 2 query heads of KV head h.
  clean_probs = probs[0, :, :seq, seq:].reshape(2, 2, seq // block, block, seq)
  expected = clean_probs.mean(axis=(1, 3)).transpose(1, 0, 2)
  np.testing.assert_allclose(np.asarray(scores[0]), expected, atol=1e-6)


def test_sparse_attention_with_every_key_selected_is_exact():
  seq, block = 8, 2
  q, k, v = _qkv(2, 2 * seq)
  _, lse = attention._training_attention(q, k, v, block, return_lse=True)
  selection = attention.select_block_keys(q[:, :seq], k[:, seq:], lse[:, :, :seq],
                                          block_size=block, budget=seq, chunk=4)
  np.testing.assert_array_equal(np.asarray(selection.counts[0, :, 0]), [0, 2, 4, 6])
  sparse = attention.sparse_noisy_attention(q[:, :seq], k[:, :seq], v[:, :seq], k[:, seq:],
                                            v[:, seq:], selection, block)
  exact = attention.make_training_attend(block)(0, q, k, v, None)[0]
  np.testing.assert_allclose(np.asarray(sparse), np.asarray(exact[:, :seq]), atol=1e-5)


def test_sparse_attention_attends_only_the_selected_keys():
  seq, block = 8, 2
  q, k, v = _qkv(3, 2 * seq)
  indices = jnp.zeros((1, seq // block, 2, 1), jnp.int32).at[:, 3].set(5)  # block 3: key 5
  counts = jnp.zeros((1, seq // block, 2), jnp.int32).at[:, 3].set(1)
  selection = attention.BlockSelection(indices, counts)
  out = attention.sparse_noisy_attention(q[:, :seq], k[:, :seq], v[:, :seq], k[:, seq:],
                                         v[:, seq:], selection, block)
  keys = [6, 7, seq + 5]  # own noisy block 3 (positions 6, 7) and clean key 5
  mask = np.zeros((1, seq, 2 * seq), bool)
  mask[0, 6:8, keys] = True
  expected, _ = _dense_attention(q[:, 6:8], k, v, mask[:, 6:8])
  np.testing.assert_allclose(np.asarray(out[:, 6:8]), expected, atol=1e-5)


def test_sparse_attention_gradients_reach_q_k_v():
  seq, block = 8, 2
  q, k, v = _qkv(4, 2 * seq)
  _, lse = attention._training_attention(q, k, v, block, return_lse=True)
  selection = attention.select_block_keys(q[:, :seq], k[:, seq:], lse[:, :, :seq],
                                          block_size=block, budget=2, chunk=8)
  loss = lambda q, k, v: jnp.sum(attention.sparse_noisy_attention(
      q[:, :seq], k[:, :seq], v[:, :seq], k[:, seq:], v[:, seq:], selection, block) ** 2)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)
  # Clean keys that no block selected get no gradient.
  picked = set(np.asarray(selection.indices)[selection.counts[..., None] >
                                              np.arange(2)].tolist())
  unpicked = [j for j in range(seq) if j not in picked]
  assert unpicked
  np.testing.assert_array_equal(np.asarray(grads[1][:, seq + np.array(unpicked)]), 0)


def _reference_alpha(keys, block, include_block):
  """[b, n, kv_heads, L] alpha of every noisy block from inference's dense mask-step reference
  (the block over a cache of its earlier clean keys); the first block's is 0."""
  from pallas_kernels.decode_attention import mask_step_attention_reference

  batch, seq = keys.q_noisy.shape[:2]
  cache = keys.k_clean.swapaxes(1, 2)
  alphas = [jnp.zeros((batch, cache.shape[1], seq))]
  for n in range(1, seq // block):
    rows = slice(n * block, (n + 1) * block)
    _, alpha = mask_step_attention_reference(
        keys.q_noisy[:, rows], cache, cache, jnp.full((batch,), n * block), keys.k_noisy[:, rows],
        keys.k_noisy[:, rows], alpha_includes_block=include_block)
    alphas.append(alpha)
  return jnp.stack(alphas, axis=1)


def _reference_divergence(student, target, block, include_block):
  """KL(target || student) of the normalised reference alphas, blocks >= 1, target rows as
  views of the student's."""
  normalise = lambda a: a[:, 1:] / jnp.sum(a[:, 1:], axis=-1, keepdims=True)
  s = normalise(_reference_alpha(student, block, include_block))
  t = normalise(_reference_alpha(target, block, include_block))
  s = jnp.concatenate([s] * (t.shape[0] // s.shape[0]))
  seen = t > 0
  log_ratio = jnp.log(jnp.where(seen, t, 1.0)) - jnp.log(jnp.where(seen, s, 1.0))
  return jnp.sum(jnp.where(seen, t * log_ratio, 0.0), axis=-1)


@pytest.mark.parametrize("include_block", [True, False])
def test_selection_statistics_match_the_mask_step_reference(include_block):
  # 4 blocks of 4 walked in chunks of 5 (the last padded); block 1 sees only 4 clean keys.
  seq, block, chunk = 16, 4, 5
  q, k_noisy, _ = _qkv(5, seq)
  student = attention.NoisyKeys(q, k_noisy, _qkv(6, seq)[1])
  q_t, k_t, _ = _qkv(7, seq)  # the target has two rows: two views of the student's one
  target = attention.NoisyKeys(jnp.concatenate([q_t, 2 * q_t]), jnp.concatenate([k_t, k_t]),
                               jnp.concatenate([_qkv(8, seq)[1]] * 2))
  def chunked(q, k_clean):
    divergence = attention.selection_divergence(
        student._replace(q_noisy=q, k_clean=k_clean), target, block_size=block, chunk=chunk,
        include_block=include_block)
    return jnp.sum(divergence), divergence

  def dense(q, k_clean):
    divergence = _reference_divergence(student._replace(q_noisy=q, k_clean=k_clean), target,
                                       block, include_block)
    return jnp.sum(divergence), divergence

  @jax.jit
  def both():  # one compilation
    lse = attention.noisy_query_lse(student, block, chunk, include_block)
    scores = attention.noisy_block_scores(student.q_noisy, student.k_clean, lse, block, chunk)
    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(student.q_noisy,
                                                                         student.k_clean)
    return scores, _reference_alpha(student, block, include_block), grad(chunked), grad(dense)

  scores, expected_scores, ((_, divergence), grads), ((_, expected), expected_grads) = both()
  np.testing.assert_allclose(np.asarray(scores), np.asarray(expected_scores), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(divergence[:, 0]), 0)  # block 0 sees no clean key
  assert np.all(np.asarray(divergence[:, 1:]) > 0)
  np.testing.assert_allclose(np.asarray(divergence[:, 1:]), np.asarray(expected), rtol=1e-4,
                             atol=1e-6)
  for got, want in zip(grads, expected_grads):
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
