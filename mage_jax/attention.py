"""Attend functions: how the model's attention calls become cache writes and method calls.

Two paths, both threading a carry through the layers (see mage_jax.model.AttendFn):
  * ``write_attend``: a prefill chunk or a committed block. Its K/V are written into the cache
    first, then its queries attend block-causally (causal across blocks, bidirectional inside a
    block) over the cache, through the block-diffusion flash attention kernel. All methods share
    this path (sparse methods only change denoising steps); ``after_write`` lets a method refresh
    summaries of the new rows (Quest's page bounds).
  * ``denoise_attend``: a denoising step of the current block. Nothing is written; the method
    decides what the block attends to, and the layers' stats are collected for ``after_step``.
Kernels run as the kernel setting says (pallas_kernels.dispatch). Training's attend functions
are in train/attention.py.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mage_jax import sharding
from mage_jax.kv_cache import KVCache, write_rows
from mage_jax.methods.base import AttentionMethod, StepInfo, WrittenRows, check_state
from mage_jax.sharding import CACHE_AXES, KV_AXES, LSE_AXES, Q_AXES
from pallas_kernels.dispatch import active_impl
from pallas_kernels.flash_attention import TokenBlocks, block_diffusion_attention


class WriteCarry(NamedTuple):
  cache: KVCache  # lengths already hold the lengths after this write
  method_state: Any
  positions: jax.Array  # int32 [batch, seq]: absolute position of each new token
  valid: jax.Array  # bool [batch, seq]: False for padding and finished sequences


class DenoiseCarry(NamedTuple):
  cache: KVCache
  method_state: Any
  stats: dict[int, Any]  # per layer: what the method's attend measured (for after_step)


def flash_attention(q, k, v, q_blocks: TokenBlocks, kv_blocks: TokenBlocks, kv_lengths, *,
                    return_lse: bool = False):
  """block_diffusion_attention per (batch, KV head) shard under a mesh (one call otherwise)."""
  impl = active_impl()

  def call(q, k, v, q_blocks, kv_blocks, kv_lengths):
    return block_diffusion_attention(q, k, v, q_blocks, kv_blocks, kv_lengths, impl=impl,
                                     return_lse=return_lse)

  blocks = ("batch", "seq")
  out_axes = (Q_AXES, LSE_AXES) if return_lse else Q_AXES
  return sharding.shard_kernel(call, (Q_AXES, KV_AXES, KV_AXES, blocks, blocks, ("batch",)),
                               out_axes)(q, k, v, q_blocks, kv_blocks, kv_lengths)


def make_write_attend(method: AttentionMethod, block_size: int):
  """The attend function of a prefill chunk or a commit step."""

  def attend(layer, q, k, v, carry: WriteCarry):
    cache = carry.cache
    ck, cv = cache.layers[layer]
    ck, cv = write_rows(ck, cv, k, v, carry.positions, carry.valid)
    ck, cv = sharding.constrain(ck, CACHE_AXES), sharding.constrain(cv, CACHE_AXES)
    layers = cache.layers[:layer] + ((ck, cv),) + cache.layers[layer + 1:]
    cache = KVCache(layers=layers, lengths=cache.lengths)
    batch, capacity = ck.shape[0], ck.shape[2]
    q_blocks = TokenBlocks(block_ids=carry.positions // block_size,
                           noisy=jnp.zeros(carry.positions.shape, bool))
    kv_ids = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32) // block_size,
                              (batch, capacity))
    kv_blocks = TokenBlocks(block_ids=kv_ids, noisy=jnp.zeros((batch, capacity), bool))
    out = flash_attention(q, jnp.swapaxes(ck, 1, 2), jnp.swapaxes(cv, 1, 2), q_blocks, kv_blocks,
                          cache.lengths)
    written = WrittenRows(start=carry.positions[:, 0], rows=carry.positions.shape[1])
    state = method.after_write(layer, cache.layer(layer), carry.method_state, written)
    check_state(method, "after_write", carry.method_state, state)
    return out, carry._replace(cache=cache, method_state=state)

  return attend


def make_denoise_attend(method: AttentionMethod, step: StepInfo):
  """The attend function of one denoising step (no cache write)."""

  def attend(layer, q, k, v, carry: DenoiseCarry):
    out, state, stats = method.attend(layer, q, k, v, carry.cache.layer(layer),
                                      carry.method_state, step)
    check_state(method, "attend", carry.method_state, state)
    if stats is not None:
      carry = carry._replace(stats={**carry.stats, layer: stats})
    return out, carry._replace(method_state=state)

  return attend
