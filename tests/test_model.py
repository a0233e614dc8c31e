"""Model core: cached block-by-block decoding equals one block-causal forward, chunked prefill
equals one-shot prefill, jit equals eager, ragged batches equal single prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mage_jax import ModelConfig, build_model, forward_denoise, forward_write, init_cache, prefill
from mage_jax.methods import ExactAttention, StepInfo

METHOD = ExactAttention()


def _full_forward_logits(model, tokens):
  """One block-causal forward over whole sequences [batch, n] from an empty cache."""
  batch, n = tokens.shape
  cfg = model.config
  cache = init_cache(cfg, batch, n)
  positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
  hidden, _, _ = forward_write(model, tokens, positions, jnp.ones((batch, n), bool), cache,
                               METHOD, ())
  return model.logits(hidden)


def _cached_logits(model, tokens, num_prefill_blocks, capacity):
  """Prefill whole blocks, then each later block: a denoising step (its logits) and a commit."""
  cfg = model.config
  bs = cfg.block_size
  batch, n = tokens.shape
  cache = init_cache(cfg, batch, capacity)
  buffer = jnp.zeros((batch, -(-capacity // bs) * bs), jnp.int32).at[:, :n].set(tokens)
  lengths = jnp.full((batch,), num_prefill_blocks * bs, jnp.int32)
  cache, _, _ = prefill(model, buffer, lengths, cache, METHOD, (), chunk=bs)
  outs = []
  for start in range(num_prefill_blocks * bs, n, bs):
    block = tokens[:, start:start + bs]
    logits, _ = forward_denoise(model, block, cache, METHOD, (), StepInfo(False, jnp.int32(1)))
    outs.append(logits)
    positions = jnp.broadcast_to(start + jnp.arange(bs, dtype=jnp.int32), (batch, bs))
    _, cache, _ = forward_write(model, block, positions, jnp.ones((batch, bs), bool), cache,
                                METHOD, ())
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("preset", ["tiny_qwen2", "tiny_qwen3"])
def test_cached_block_decoding_equals_full_block_causal_forward(preset):
  cfg = ModelConfig.preset(preset)
  model = build_model(cfg, seed=1)
  bs = cfg.block_size
  n = 5 * bs
  tokens = jax.random.randint(jax.random.key(0), (2, n), 0, cfg.vocab_size, jnp.int32)
  full = _full_forward_logits(model, tokens)
  cached, cache = _cached_logits(model, tokens, num_prefill_blocks=2, capacity=n + 3)
  np.testing.assert_allclose(cached, full[:, 2 * bs:], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cache.lengths, [n, n])


def test_block_causal_mask_semantics():
  """Changing a later block never changes an earlier block's logits; changing a token inside a
  block changes the logits of every position of that block (bidirectional)."""
  cfg = ModelConfig.preset("tiny_qwen2")
  model = build_model(cfg, seed=2)
  bs = cfg.block_size
  tokens = jax.random.randint(jax.random.key(3), (1, 3 * bs), 0, cfg.vocab_size, jnp.int32)
  base = _full_forward_logits(model, tokens)
  later = _full_forward_logits(model, tokens.at[0, 2 * bs + 1].set((tokens[0, 2 * bs + 1] + 1) % 128))
  np.testing.assert_allclose(later[:, :2 * bs], base[:, :2 * bs], rtol=1e-6, atol=1e-6)
  inside = _full_forward_logits(model, tokens.at[0, bs + bs - 1].set((tokens[0, 2 * bs - 1] + 1) % 128))
  diff = jnp.max(jnp.abs(inside - base), axis=-1)[0]
  assert bool(jnp.all(diff[bs:2 * bs] > 1e-6)), "a block must see its own later tokens"
  np.testing.assert_allclose(inside[:, :bs], base[:, :bs], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_blocks", [1, 3])
def test_chunked_prefill_equals_one_shot(chunk_blocks):
  cfg = ModelConfig.preset("tiny_qwen3")
  model = build_model(cfg, seed=4)
  bs = cfg.block_size
  capacity = 12 * bs
  tokens = jax.random.randint(jax.random.key(5), (3, capacity), 0, cfg.vocab_size, jnp.int32)
  lengths = jnp.asarray([7 * bs, 12 * bs, 2 * bs], jnp.int32)  # ragged, one not chunk-aligned

  def run(chunk):
    cache = init_cache(cfg, 3, capacity)
    return prefill(model, tokens, lengths, cache, METHOD, (), chunk=chunk)

  one_cache, _, one_logits = run(capacity)
  chunk_cache, _, chunk_logits = run(chunk_blocks * bs)
  np.testing.assert_array_equal(chunk_cache.lengths, lengths)
  np.testing.assert_allclose(chunk_logits, one_logits, rtol=1e-5, atol=1e-5)
  for (k1, v1), (k2, v2) in zip(one_cache.layers, chunk_cache.layers):
    np.testing.assert_allclose(k2, k1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v2, v1, rtol=1e-5, atol=1e-5)
  # Rows past each sequence's length stay untouched (zeros).
  k = np.asarray(chunk_cache.layers[0][0])
  assert not k[2, :, 2 * bs:].any()


def test_jit_equals_eager():
  cfg = ModelConfig.preset("tiny_qwen2")
  model = build_model(cfg, seed=6)
  bs = cfg.block_size
  tokens = jax.random.randint(jax.random.key(7), (2, 3 * bs), 0, cfg.vocab_size, jnp.int32)
  cache = init_cache(cfg, 2, 4 * bs)
  cache, _, _ = prefill(model, jnp.pad(tokens, ((0, 0), (0, bs))), jnp.asarray([2 * bs, bs], jnp.int32),
                        cache, METHOD, (), chunk=bs)
  block = tokens[:, 2 * bs:]
  step = StepInfo(True, jnp.int32(0))
  eager, _ = forward_denoise(model, block, cache, METHOD, (), step)
  graphdef, params = nnx.split(model)

  @jax.jit
  def jitted(params, block, cache):
    return forward_denoise(nnx.merge(graphdef, params), block, cache, METHOD, (), step)[0]

  np.testing.assert_allclose(jitted(params, block, cache), eager, rtol=1e-5, atol=1e-5)


def test_ragged_batch_forward_equals_each_prompt_alone():
  cfg = ModelConfig.preset("tiny_qwen2")
  model = build_model(cfg, seed=8)
  bs = cfg.block_size
  capacity = 6 * bs
  lengths = [3 * bs, bs, 5 * bs]
  tokens = jax.random.randint(jax.random.key(9), (3, capacity), 0, cfg.vocab_size, jnp.int32)
  block = jax.random.randint(jax.random.key(10), (3, bs), 0, cfg.vocab_size, jnp.int32)

  def step_logits(rows):
    cache = init_cache(cfg, len(rows), capacity)
    lens = jnp.asarray([lengths[r] for r in rows], jnp.int32)
    cache, _, last = prefill(model, tokens[jnp.asarray(rows)], lens, cache, METHOD, (), chunk=2 * bs)
    logits, _ = forward_denoise(model, block[jnp.asarray(rows)], cache, METHOD, (),
                                StepInfo(True, jnp.int32(0)))
    return logits, last

  batch_logits, batch_last = step_logits([0, 1, 2])
  for r in range(3):
    alone, alone_last = step_logits([r])
    np.testing.assert_allclose(batch_logits[r], alone[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch_last[r], alone_last[0], rtol=1e-5, atol=1e-5)


def test_rope_rotates_pairs_half_apart():
  from mage_jax.model import apply_rope
  x = jax.random.normal(jax.random.key(11), (1, 3, 2, 8))
  pos = jnp.asarray([[0, 1, 5]], jnp.int32)
  out = apply_rope(x, pos, 10000.0)
  np.testing.assert_allclose(out[:, 0], x[:, 0], rtol=1e-6)  # position 0 is the identity
  inv = 1.0 / (10000.0 ** (np.arange(0, 8, 2) / 8))
  ang = 5 * inv
  x1, x2 = np.asarray(x[0, 2, :, :4]), np.asarray(x[0, 2, :, 4:])
  want = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
  np.testing.assert_allclose(out[0, 2], want, rtol=1e-5, atol=1e-6)
  # Rotations preserve norms.
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_scaled_residual_init_shrinks_only_the_residual_projections():
  import math

  cfg = ModelConfig.preset("tiny_qwen2", hidden_size=128, intermediate_size=256,
                           num_layers=8)
  plain = build_model(cfg, seed=3)
  scaled = build_model(cfg, seed=3, scaled_residual_init=True)
  factor = 1 / math.sqrt(2 * 8)
  for a, b in zip(plain.layers, scaled.layers):
    np.testing.assert_allclose(b.self_attn.o_proj.kernel.get_value(),
                               a.self_attn.o_proj.kernel.get_value() * factor, rtol=1e-6)
    np.testing.assert_allclose(b.mlp.down_proj.kernel.get_value(),
                               a.mlp.down_proj.kernel.get_value() * factor, rtol=1e-6)
    np.testing.assert_array_equal(b.self_attn.q_proj.kernel.get_value(),
                                  a.self_attn.q_proj.kernel.get_value())
    np.testing.assert_array_equal(b.mlp.gate_up_proj.kernel.get_value(),
                                  a.mlp.gate_up_proj.kernel.get_value())
  down = scaled.layers[0].mlp.down_proj.kernel.get_value()
  assert abs(float(np.std(down)) - 0.02 * factor) < 1e-3
