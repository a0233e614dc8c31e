"""The functional KV cache: per-layer (k, v) pairs with preallocated capacity.

A cache is a pytree; writing returns a new cache and nothing mutates behind a jit, so it works
under jit, scan and while_loop and is donated by the decoding loop (XLA then updates it in place).
Layout per layer: [batch, kv_heads, capacity, head_dim], head-major so that a KV head's rows are
contiguous for the decode kernels and for gathering selected rows.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mage_jax.config import ModelConfig


class LayerCache(NamedTuple):
  """One layer's view of the cache, as handed to an attention method."""

  k: jax.Array  # [batch, kv_heads, capacity, head_dim]
  v: jax.Array  # [batch, kv_heads, capacity, head_dim]
  lengths: jax.Array  # int32 [batch]: valid rows per sequence


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  layers: tuple[tuple[jax.Array, jax.Array], ...]
  lengths: jax.Array  # int32 [batch]

  @property
  def capacity(self) -> int:
    return self.layers[0][0].shape[2]

  def layer(self, i: int) -> LayerCache:
    k, v = self.layers[i]
    return LayerCache(k, v, self.lengths)


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=None) -> KVCache:
  """An empty cache (zeros, lengths 0). Zeros, never uninitialised memory: masked rows still
  flow through matmuls, and NaN garbage times a zero weight is NaN."""
  if batch < 1 or capacity < 1:
    raise ValueError(f"init_cache: batch and capacity must be >= 1, got {batch}, {capacity}")
  if capacity > cfg.max_position_embeddings:
    raise ValueError(f"init_cache: capacity {capacity} exceeds the model's "
                     f"max_position_embeddings={cfg.max_position_embeddings}")
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
  layers = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))
  return KVCache(layers=layers, lengths=jnp.zeros((batch,), jnp.int32))


def write_rows(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array,
               positions: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes new rows k, v [batch, seq, kv_heads, head_dim] at ``positions`` [batch, seq].

  Rows with ``valid`` False are dropped (sent out of range), so padded prompt rows and finished
  sequences never touch the cache; a clamped dynamic_update_slice would overwrite valid rows.
  """
  capacity = cache_k.shape[2]
  rows = jnp.where(valid, positions, capacity)

  def one(cache, new, rows):  # cache [h, c, d], new [s, h, d], rows [s]
    return cache.at[:, rows, :].set(jnp.swapaxes(new, 0, 1).astype(cache.dtype), mode="drop")

  return jax.vmap(one)(cache_k, k, rows), jax.vmap(one)(cache_v, v, rows)
