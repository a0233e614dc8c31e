"""Attend functions: how the model's attention calls become cache writes and method calls.

Two paths, both threading a carry through the layers (see mage_jax.model.AttendFn):
  * ``write_attend``: a prefill chunk or a committed block. Its K/V are written into the cache
    first, then its queries attend block-causally (causal across blocks, bidirectional inside a
    block) over the cache, through the block-diffusion flash attention kernel. All methods share
    this path (sparse methods only change denoising steps); ``after_write`` lets a method refresh
    summaries of the new rows (Quest's page bounds).
  * ``denoise_attend``: a denoising step of the current block. Nothing is written; the method
    decides what the block attends to.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mage_jax.kv_cache import KVCache, write_rows
from mage_jax.methods.base import AttentionMethod, StepInfo
from pallas_kernels.flash_attention import TokenBlocks, block_diffusion_attention


class WriteCarry(NamedTuple):
  cache: KVCache  # lengths already hold the lengths after this write
  method_state: Any
  positions: jax.Array  # int32 [batch, seq]: absolute position of each new token
  valid: jax.Array  # bool [batch, seq]: False for padding and finished sequences


class DenoiseCarry(NamedTuple):
  cache: KVCache
  method_state: Any


def make_write_attend(method: AttentionMethod, block_size: int, impl: str = "auto"):
  """The attend function of a prefill chunk or a commit step."""

  def attend(layer, q, k, v, carry: WriteCarry):
    cache = carry.cache
    ck, cv = cache.layers[layer]
    ck, cv = write_rows(ck, cv, k, v, carry.positions, carry.valid)
    layers = cache.layers[:layer] + ((ck, cv),) + cache.layers[layer + 1:]
    cache = KVCache(layers=layers, lengths=cache.lengths)
    batch, capacity = ck.shape[0], ck.shape[2]
    q_blocks = TokenBlocks(block_ids=carry.positions // block_size,
                           noisy=jnp.zeros(carry.positions.shape, bool))
    kv_ids = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32) // block_size,
                              (batch, capacity))
    kv_blocks = TokenBlocks(block_ids=kv_ids, noisy=jnp.zeros((batch, capacity), bool))
    out = block_diffusion_attention(q, jnp.swapaxes(ck, 1, 2), jnp.swapaxes(cv, 1, 2),
                                    q_blocks, kv_blocks, cache.lengths, impl=impl)
    state = method.after_write(layer, cache.layer(layer), carry.method_state)
    return out, carry._replace(cache=cache, method_state=state)

  return attend


def make_denoise_attend(method: AttentionMethod, step: StepInfo):
  """The attend function of one denoising step (no cache write)."""

  def attend(layer, q, k, v, carry: DenoiseCarry):
    out, state = method.attend(layer, q, k, v, carry.cache.layer(layer), carry.method_state, step)
    return out, carry._replace(method_state=state)

  return attend
