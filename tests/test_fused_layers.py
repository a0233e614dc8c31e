"""layer_kernels="fused": the decoder layers and the greedy head through
pallas_kernels.decode_gemm (interpret mode) give the XLA path's outputs, layer by layer and in
a whole generate."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mage_jax import DecodeOptions, ModelConfig, build_model, generate, lora, sampling
from mage_jax import fused_layers
from pallas_kernels.dispatch import use_kernels


def _attend(layer, q, k, v, carry):
  """Plain-JAX attention of the tokens over each other (GQA), recording its inputs: the
  layers' code around it is what the fused path replaces."""
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
  probs = jax.nn.softmax(scores / np.sqrt(q.shape[-1]), axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))
  return out.astype(q.dtype), carry + ((q, k, v),)


def _run(model, tokens, layer_kernels):
  positions = 40 + jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return model(tokens, positions, _attend, (), layer_kernels=layer_kernels)


def _assert_greedy_proposals_match(model, hidden, reference_hidden):
  """fused_layers.greedy_proposals of ``hidden`` equals sampling.propose_tokens on the model's
  logits of ``reference_hidden`` with [MASK] excluded (the generate loop's greedy proposal)."""
  mask_id = model.config.mask_token_id
  tokens, conf = fused_layers.greedy_proposals(model, hidden, mask_id)
  logits = model.logits(reference_hidden).at[..., mask_id].set(-jnp.inf)
  want_tokens, want_conf = sampling.propose_tokens(logits, None, 0.0, 1.0)
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_allclose(conf, want_conf, rtol=1e-4, atol=1e-6)


def _assert_close(got, want, tolerance):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, atol=tolerance * np.max(np.abs(want)), rtol=0)


# Qwen3 (q/k norms, no bias) in float32 (the same math in another order) with heads of 32, so
# norms and RoPE run in the q/k/v kernel's epilogue; Qwen2.5 (q/k/v biases, tied head) in
# bfloat16 (the kernels round x * g where XLA rounds the normalised x, and add the residuals
# in float32 before rounding) with the preset's heads of 16, too small for the kernel's rotary
# pairs: q/k/v fused, RoPE by XLA.
@pytest.mark.parametrize("preset,dtype,head_dim,tolerance", [
    ("tiny_qwen3", "float32", 32, 1e-5), ("tiny_qwen2", "bfloat16", 16, 3e-2)])
def test_fused_layers_and_head_match_xla(preset, dtype, head_dim, tolerance):
  cfg = ModelConfig.preset(preset, dtype=dtype, head_dim=head_dim)
  model = build_model(cfg, seed=1)
  tokens = jax.random.randint(jax.random.key(0), (3, cfg.block_size), 0, cfg.vocab_size,
                              jnp.int32)
  with use_kernels("interpret"):
    want, want_heads = _run(model, tokens, "xla")
    got, got_heads = _run(model, tokens, "fused")
    # Every layer's q (after norm and RoPE), k, v, and the final hidden states.
    for got_layer, want_layer in zip(got_heads, want_heads):
      for a, b in zip(got_layer, want_layer):
        _assert_close(a, b, tolerance)
    _assert_close(got, want, tolerance)
    _assert_greedy_proposals_match(model, got, got)


@pytest.mark.parametrize("kernel_ops", [("o_proj", "down"), ("qkv", "swiglu", "head")])
def test_ops_turned_off_run_their_xla_code(monkeypatch, kernel_ops):
  """fused_layers.FUSED_OP_ROWS turns single ops of the fused path back to XLA's code (where the
  benchmark finds XLA faster): the two complementary mixes give the XLA path's outputs."""
  monkeypatch.setattr(fused_layers, "FUSED_OP_ROWS",
                      {op: 256 if op in kernel_ops else 0 for op in fused_layers.FUSED_OP_ROWS})
  cfg = ModelConfig.preset("tiny_qwen2", head_dim=32)
  model = build_model(cfg, seed=1)
  tokens = jax.random.randint(jax.random.key(1), (2, cfg.block_size), 0, cfg.vocab_size,
                              jnp.int32)
  with use_kernels("interpret"):
    want, _ = _run(model, tokens, "xla")
    got, _ = _run(model, tokens, "fused")
    _assert_close(got, want, 1e-5)
    _assert_greedy_proposals_match(model, got, want)


def test_fused_generate_equals_xla():
  """A whole greedy generate with token shift (the first proposal from the last commit's
  logits), ragged prompts (16 new tokens in two blocks, or three with a prompt tail): the
  fused layers and head (interpret mode) decode the same tokens in the same number of
  steps."""
  cfg = ModelConfig.preset("tiny_qwen2", head_dim=32)  # RoPE in the q/k/v kernel
  model = build_model(cfg, seed=1)
  # Weights x 5: a random tiny model then proposes varied tokens (at init scale every position
  # proposes its prompt's last token, which would hide a shifted or reordered proposal).
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x * 5 if x.ndim > 1 else x, params))
  prompts = [list(range(5, 8)), list(range(5, 22))]
  options = DecodeOptions.for_model(cfg, kernels="xla")
  want = generate(model, prompts, max_new_tokens=2 * cfg.block_size, options=options)
  got = generate(model, prompts, max_new_tokens=2 * cfg.block_size,
                 options=dataclasses.replace(options, kernels="interpret",
                                             layer_kernels="fused"))
  assert cfg.token_shift and want.num_blocks == 3
  assert len(set(want.tokens[0] + want.tokens[1])) > 8
  assert got.tokens == want.tokens
  assert got.num_steps == want.num_steps


def test_calls_beyond_the_kernel_rows_run_the_xla_path():
  """More tokens than decode_gemm.MAX_KERNEL_ROWS (a prefill chunk): the XLA program."""
  cfg = ModelConfig.preset("tiny_qwen3")
  model = build_model(cfg, seed=1)
  tokens = jnp.arange(264, dtype=jnp.int32)[None] % cfg.vocab_size
  with use_kernels("interpret"):
    np.testing.assert_array_equal(_run(model, tokens, "fused")[0], _run(model, tokens, "xla")[0])


def test_bad_layer_kernels_fail_with_a_message():
  cfg = ModelConfig.preset("tiny_qwen2")
  model = build_model(cfg, seed=1)
  tokens = jnp.zeros((1, cfg.block_size), jnp.int32)
  with pytest.raises(ValueError, match="layer_kernels must be one of"):
    _run(model, tokens, "cublas")
  with pytest.raises(ValueError, match="DecodeOptions.layer_kernels: must be one of"):
    DecodeOptions(layer_kernels="triton").validate(cfg)
  with pytest.raises(ValueError, match="runs inference on one device"):
    model(tokens, jnp.zeros_like(tokens), _attend, (), remat=True, layer_kernels="fused")
  with use_kernels("mosaic_interpret"), pytest.raises(ValueError, match="Triton .* kernels only"):
    _run(model, tokens, "fused")
  lora.attach(model, lora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj",)))
  with pytest.raises(ValueError, match="merge LoRA adapters"):
    _run(model, tokens, "fused")
