"""The model's layers through fused decode kernels: ``layer_kernels="fused"`` (issue 28).

A denoising step or a commit multiplies 32-256 rows (batch x one block) by every weight, so
reading each weight once is its cost and XLA's small fusions around the GEMMs (norms, biases,
RoPE, residual adds, SiLU x up, the logits' passes) are latency and traffic on top of it. Here
a decoder layer (mage_jax.model.DecoderLayer, same parameters) runs as four kernels of
pallas_kernels.decode_gemm around the unchanged attend call:

  * input norm + q/k/v (+ biases) + q/k norms + RoPE   norm_qkv_rope
  * o_proj + residual                                  matmul_residual
  * post-attention norm + gate/up + SiLU x up          norm_swiglu
  * down_proj + residual                               matmul_residual

and the greedy proposal of a step (argmax token and its probability) comes from the LM head
without materialising the logits (greedy_head). ``FUSED_OP_ROWS`` sets, per op, up to how many
rows its kernel runs; above that (and for an op at 0) the op runs the model's own XLA code.
The kernels run under the active kernel setting (pallas_kernels.dispatch): the Triton kernels
on a GPU, their float32 references off it (the TPU settings are refused: no Mosaic kernels).
Same weights, same outputs to bf16 rounding (tests/test_fused_layers.py).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from mage_jax import sampling
from pallas_kernels import decode_gemm
from pallas_kernels.dispatch import MOSAIC, active_impl

# Per op of the fused path, the most rows (batch x block tokens) at which it runs its kernel; a
# call with more rows runs XLA's code for that op, and 0 turns the op's kernel off. Every op is
# on up to the kernels' limit until benchmarks/decode_gemm.py and decode_e2e.py
# --layer_kernels=xla,fused measure where each beats XLA (issue 28): set the measured rows here.
FUSED_OP_ROWS = {"qkv": decode_gemm.MAX_KERNEL_ROWS, "o_proj": decode_gemm.MAX_KERNEL_ROWS,
                 "swiglu": decode_gemm.MAX_KERNEL_ROWS, "down": decode_gemm.MAX_KERNEL_ROWS,
                 "head": decode_gemm.MAX_KERNEL_ROWS}
LAYER_OPS = ("qkv", "o_proj", "swiglu", "down")


def applies(rows: int) -> bool:
  """Whether a forward of ``rows`` tokens runs any layer op through its kernel."""
  return rows <= max(FUSED_OP_ROWS[op] for op in LAYER_OPS)


def check_context(remat: bool) -> None:
  """The fused kernels are inference kernels of one GPU: no gradient (remat is training), no
  mesh of several devices (a kernel call is not partitioned), no TPU kernels."""
  if remat or jax.sharding.get_abstract_mesh().size > 1:
    raise ValueError("layer_kernels='fused' runs inference on one device (no remat, no "
                     "mesh of several devices)")
  if active_impl() in MOSAIC:
    raise ValueError("layer_kernels='fused' has Triton (GPU) kernels only; on a TPU use "
                     "layer_kernels='xla'")


def decoder_layer(layer, x: jax.Array, positions: jax.Array, index: int, attend, carry: Any,
                  rope: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, Any]:
  """``layer`` (a DecoderLayer) on x [batch, seq, hidden] as ``layer(x, positions, index,
  attend, carry)`` computes it, each op through its kernel where FUSED_OP_ROWS allows.
  ``rope``: decode_gemm.rope_tables of the flattened positions, computed once for all layers.
  """
  attn, mlp = layer.self_attn, layer.mlp
  projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
  if not all(type(p) is nnx.Einsum for p in projections):
    raise ValueError("layer_kernels='fused' needs the plain projections; merge LoRA adapters "
                     "into the weights first (mage_jax.lora)")
  impl = active_impl()
  batch, seq, embed = x.shape
  fused = lambda op: batch * seq <= FUSED_OP_ROWS[op]
  flat = lambda a: a.reshape(batch * seq, -1)
  heads = lambda a, proj: a.reshape(batch, seq, *proj.kernel.shape[1:])
  norm = layer.input_layernorm
  head_dim = attn.q_proj.kernel.shape[-1]

  if not fused("qkv"):
    h = norm(x)
    out, carry = attn.attend_heads(attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), positions,
                                   index, attend, carry)
  else:
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    kernels = tuple(p.kernel[...].reshape(embed, -1) for p in qkv)
    biases = None if attn.q_proj.bias is None else tuple(p.bias[...].reshape(-1) for p in qkv)
    if impl in ("pallas", "interpret") and not decode_gemm.rope_kernel_supports(head_dim):
      # A head too small for the kernel's rotary pairs: the projection fused, the q/k norms
      # and RoPE by XLA.
      q, k, v = decode_gemm.norm_matmul(flat(x), norm.scale[...], kernels, biases,
                                        eps=norm.eps, impl=impl)
      out, carry = attn.attend_heads(heads(q, attn.q_proj), heads(k, attn.k_proj),
                                     heads(v, attn.v_proj), positions, index, attend, carry)
    else:
      head_norms = None if attn.q_norm is None else (attn.q_norm.scale[...],
                                                     attn.k_norm.scale[...])
      q, k, v = decode_gemm.norm_qkv_rope(flat(x), norm.scale[...], kernels, biases,
                                          rope_cos=rope[0], rope_sin=rope[1],
                                          head_norms=head_norms, eps=norm.eps, impl=impl)
      out, carry = attend(index, heads(q, attn.q_proj), heads(k, attn.k_proj),
                          heads(v, attn.v_proj), carry)
  out = out.astype(x.dtype)

  if fused("o_proj"):
    x = decode_gemm.matmul_residual(flat(out), attn.o_proj.kernel[...].reshape(-1, embed),
                                    flat(x), impl=impl).reshape(x.shape)
  else:
    x = x + attn.o_proj(out)
  post_norm = layer.post_attention_layernorm
  if fused("swiglu"):
    act = decode_gemm.norm_swiglu(flat(x), post_norm.scale[...], mlp.gate_up_proj.kernel[...],
                                  eps=post_norm.eps, impl=impl)
  else:
    act = flat(mlp.activation(post_norm(x)))
  if fused("down"):
    x = decode_gemm.matmul_residual(act, mlp.down_proj.kernel[...], flat(x),
                                    impl=impl).reshape(x.shape)
  else:
    x = x + mlp.down_proj(act).reshape(x.shape)
  return x, carry


def greedy_proposals(model, hidden: jax.Array,
                     excluded_token: int | None) -> tuple[jax.Array, jax.Array]:
  """The greedy proposal of every position of hidden [..., hidden] (final-norm output of
  ``model``, a Transformer): (argmax token int32, its softmax probability float32),
  ``excluded_token`` never proposed: what sampling.propose_tokens computes at temperature 0
  from ``model.logits``. Up to FUSED_OP_ROWS["head"] rows go through decode_gemm.greedy_head
  (no [rows, vocab] logits), more through the logits."""
  if model.lm_head is None:
    w, layout = model.embed_tokens.embedding[...], "ve"
  else:
    w, layout = model.lm_head.kernel[...], "ev"
  lead, features = hidden.shape[:-1], hidden.shape[-1]
  rows = hidden.reshape(-1, features).astype(w.dtype)
  if rows.shape[0] > FUSED_OP_ROWS["head"]:
    logits = model.logits(rows)
    if excluded_token is not None:
      logits = logits.at[:, excluded_token].set(sampling.NEG_INF)
    tokens, confidence = sampling.propose_tokens(logits, None, 0.0, 1.0)
  else:
    tokens, confidence = decode_gemm.greedy_head(rows, w, layout=layout,
                                                 excluded_token=excluded_token,
                                                 impl=active_impl())
  return tokens.reshape(lead), confidence.reshape(lead)
