"""The block-diffusion transformer (Qwen2.5 and Qwen3 layouts) in Flax NNX.

The model computes projections, norms, RoPE and MLPs; it never decides what a query attends
to. Every attention call goes through an ``AttendFn`` handed in by the caller:

    attend(layer, q, k, v, carry) -> (out, carry)

q is [batch, seq, q_heads, head_dim] after q-norm and RoPE, k and v are the current tokens'
[batch, seq, kv_heads, head_dim]; ``carry`` is whatever pytree the caller threads through the
layers (the KV cache, a sparse method's selections). Prefill, the denoising step, the commit
step and training are all the same forward with different attend functions (mage_jax.attention).

Weights keep their head structure (q: [embed, heads, head_dim], o: [heads, head_dim, embed]);
the Hugging Face name map lives in mage_jax.checkpoint.

``layer_kernels`` picks how the layers outside attention run: "xla" (the modules below) or
"fused" (mage_jax.fused_layers: the same layers through pallas_kernels.decode_gemm's fused
kernels, for the 1..256 rows of a denoising step or a commit; larger calls run "xla").
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mage_jax import fused_layers
from mage_jax.config import ModelConfig
from pallas_kernels import decode_gemm

LAYER_KERNELS = ("xla", "fused")

AttendFn = Callable[[int, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def _dtype(cfg: ModelConfig):
  return jnp.dtype(cfg.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, returned in the input dtype (as Qwen does)."""

  def __init__(self, dim: int, eps: float, *, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, half-rotation convention (HF ``rotate_half``), in float32.

  x: [batch, seq, heads, head_dim]; positions: int [batch, seq].
  """
  cos, sin = decode_gemm.rope_tables(positions, theta, x.shape[-1])  # [b, s, d/2]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class Attention(nnx.Module):
  """GQA projections with q/k/v bias (Qwen2.5) or per-head q/k RMSNorm before RoPE (Qwen3)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = _dtype(cfg)
    e, hq, hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = nnx.initializers.normal(0.02)

    def proj(einsum, kernel_shape, bias_shape):
      return nnx.Einsum(einsum, kernel_shape, bias_shape if cfg.attention_bias else None,
                        dtype=dt, param_dtype=dt, kernel_init=init, rngs=rngs)

    self.q_proj = proj("bse,ehd->bshd", (e, hq, d), (hq, d))
    self.k_proj = proj("bse,ehd->bshd", (e, hkv, d), (hkv, d))
    self.v_proj = proj("bse,ehd->bshd", (e, hkv, d), (hkv, d))
    self.o_proj = nnx.Einsum("bshd,hde->bse", (hq, d, e), None, dtype=dt, param_dtype=dt,
                             kernel_init=init, rngs=rngs)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=dt)
      self.k_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=dt)
    else:
      self.q_norm = self.k_norm = None
    self.rope_theta = cfg.rope_theta

  def __call__(self, x, positions, layer: int, attend: AttendFn, carry):
    out, carry = self.attend_heads(self.q_proj(x), self.k_proj(x), self.v_proj(x), positions,
                                   layer, attend, carry)
    return self.o_proj(out.astype(x.dtype)), carry

  def attend_heads(self, q, k, v, positions, layer: int, attend: AttendFn, carry):
    """q/k norm, RoPE and the attend call on projected heads [batch, seq, heads, head_dim]."""
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)
    return attend(layer, q, k, v, carry)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)).

  The gate and up projections are one parameter, ``gate_up_proj.kernel`` [embed, 2,
  intermediate] (gate at index 0, up at 1; the Hugging Face import / export splits and joins
  them), so a step reads them with one matmul whatever XLA does. Kept as two weights, XLA merges
  the two dots over a concatenation it fuses into a Triton GEMM, which cannot use cuBLAS: at 256
  rows (batch 8 x 32 tokens, 1.5B shape) that dot took 56 us per layer against 35 us for the
  fused weight (H100, benchmarks/results/gemm_layouts.md); at 32 rows both take 26 us.
  The middle axis keeps tensor parallelism on the intermediate axis: each device holds the
  gate and up columns of the same slice.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = _dtype(cfg)
    init = nnx.initializers.normal(0.02)
    e, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_up_proj = nnx.Einsum("bse,eki->bski", (e, 2, f), None, dtype=dt, param_dtype=dt,
                                   kernel_init=init, rngs=rngs)
    self.down_proj = nnx.Linear(f, e, use_bias=False, dtype=dt, param_dtype=dt,
                                kernel_init=init, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(self.activation(x))

  def activation(self, x):
    """silu(gate(x)) * up(x): the input of down_proj."""
    gate_up = self.gate_up_proj(x)
    return jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = _dtype(cfg)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=dt)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=dt)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, layer: int, attend: AttendFn, carry):
    h, carry = self.self_attn(self.input_layernorm(x), positions, layer, attend, carry)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, carry


def _layer_call(index: int, positions: jax.Array, attend: AttendFn):
  """A layer call for nnx.remat with the layer index closed over, so it stays a Python int
  (remat traces every argument, defaults included)."""

  def call(layer: DecoderLayer, x, carry):
    return layer(x, positions, index, attend, carry)

  return call


class Transformer(nnx.Module):
  """Decoder-only transformer; ``__call__`` returns final hidden states, ``logits`` the head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = _dtype(cfg)
    self.config = cfg
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=dt,
                                  embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=dt)
    if cfg.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dt,
                                param_dtype=dt, kernel_init=nnx.initializers.normal(0.02),
                                rngs=rngs)

  def __call__(self, tokens: jax.Array, positions: jax.Array, attend: AttendFn, carry,
               *, remat: bool = False, layer_kernels: str = "xla"):
    """tokens, positions: int32 [batch, seq]. Returns (hidden [batch, seq, hidden], carry).

    ``layer_kernels``: "xla" or "fused" (mage_jax.fused_layers; inference only: the fused
    kernels have no gradient, and calls with more tokens than fused_layers.FUSED_OP_ROWS
    allows run "xla")."""
    if layer_kernels not in LAYER_KERNELS:
      raise ValueError(f"layer_kernels must be one of {LAYER_KERNELS}, got {layer_kernels!r}")
    fused = layer_kernels == "fused" and fused_layers.applies(tokens.size)
    if fused:
      fused_layers.check_context(remat)
    x = self.embed_tokens(tokens)
    if fused:
      rope = decode_gemm.rope_tables(positions.reshape(-1), self.config.rope_theta,
                                     self.config.head_dim)
    for i, layer in enumerate(self.layers):
      if remat:
        x, carry = nnx.remat(_layer_call(i, positions, attend))(layer, x, carry)
      elif fused:
        x, carry = fused_layers.decoder_layer(layer, x, positions, i, attend, carry, rope)
      else:
        x, carry = layer(x, positions, i, attend, carry)
    return self.norm(x), carry

  def logits(self, hidden: jax.Array) -> jax.Array:
    """LM head with float32 accumulation and output (logits feed softmax confidences and the
    CE / KL losses); the weights are read in their own dtype, never up-cast in memory."""
    if self.lm_head is None:
      w, spec = self.embed_tokens.embedding[...], "...e,ve->...v"
    else:
      w, spec = self.lm_head.kernel[...], "...e,ev->...v"
    return jnp.einsum(spec, hidden.astype(w.dtype), w, preferred_element_type=jnp.float32)


def build_model(cfg: ModelConfig, seed: int = 0, *,
                scaled_residual_init: bool = False) -> Transformer:
  """A model with random weights (normal(0.02), norms at 1).

  With ``scaled_residual_init`` the projections that write into the residual stream (o_proj,
  down_proj) start at 0.02 / sqrt(2 * num_layers), as GPT-2 initialises them, so the residual
  stream's scale does not grow with depth. Measured here: an 8-layer model trained from scratch
  formed copying heads by step ~400 with it and not within 500 steps without (2 layers: ~300).
  """
  model = Transformer(cfg, rngs=nnx.Rngs(params=seed))
  if scaled_residual_init:
    factor = 1.0 / math.sqrt(2 * cfg.num_layers)
    for layer in model.layers:
      for kernel in (layer.self_attn.o_proj.kernel, layer.mlp.down_proj.kernel):
        value = kernel.get_value()
        kernel.set_value((value.astype(jnp.float32) * factor).astype(value.dtype))
  return model
