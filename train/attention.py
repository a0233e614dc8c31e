"""Training attention over the doubled sequence [x_t | x_0]: the exact training forward,
MAGE-FT's selection pass and its sparse student forward (attend functions for
mage_jax.model.Transformer, as mage_jax.attention's are for decoding).

Block-diffusion training runs the noisy sequence x_t and the clean sequence x_0 of length L
side by side in one forward of length 2L (positions 0..L-1 twice). A noisy query sees the
noisy keys of its own block and the clean keys of earlier blocks, exactly what a denoising
step sees at inference (its block plus the cache); a clean query sees clean keys block-
causally, exactly what prefill writes into the cache. MAGE-FT replaces the noisy queries'
view of the clean keys by a selected subset, as the sparse denoising steps do. Kernels run as
the kernel setting says (pallas_kernels.dispatch).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mage_jax import sharding
from mage_jax.attention import flash_attention
from pallas_kernels.dispatch import active_impl
from pallas_kernels.flash_attention import (TokenBlocks, prefill_token_blocks,
                                            training_token_blocks)
from pallas_kernels.topk import select_kv_indices


class BlockSelection(NamedTuple):
  """The clean keys each noisy block of one layer attends to, per KV head.

  Attributes:
    indices: int32 [batch, num_blocks, kv_heads, budget], positions into the clean half,
      ascending in the first ``counts`` slots.
    counts: int32 [batch, num_blocks, kv_heads] = min(budget, block start).
  """

  indices: jax.Array
  counts: jax.Array


def _split_halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  half = x.shape[1] // 2
  return x[:, :half], x[:, half:]


def _training_attention(q, k, v, block_size: int, *, return_lse: bool = False):
  batch, seq = q.shape[0], q.shape[1] // 2
  segments = training_token_blocks(batch, seq, block_size)
  lengths = jnp.full((batch,), 2 * seq, jnp.int32)
  return flash_attention(q, k, v, segments, segments, lengths, return_lse=return_lse)


def make_training_attend(block_size: int):
  """Exact attention of the doubled training sequence under the block-diffusion training mask.

  The carry passes through untouched, so the same function serves the pretraining forward and
  the MAGE-FT teacher.
  """

  def attend(layer, q, k, v, carry):
    del layer
    return _training_attention(q, k, v, block_size), carry

  return attend


def noisy_block_scores(q_noisy: jax.Array, k_clean: jax.Array, lse: jax.Array, block_size: int,
                       chunk: int) -> jax.Array:
  """MAGE's alpha for every noisy block at once, without a [L, L] probability matrix.

  alpha[b, n, h, j] = 1/(G*B) * sum over the G query heads of KV head h and the B queries of
  noisy block n of exp(q . k_j * scale - lse), for clean keys j of blocks before n (0 for the
  others). ``lse`` is each query's log-normaliser from the exact pass, so the probabilities are
  those of the softmax the exact pass used. The clean keys are walked in chunks of ``chunk``
  (a divisor of L): the largest intermediate is [batch, L, q_heads, chunk].

  Args:
    q_noisy: [batch, L, q_heads, head_dim].
    k_clean: [batch, L, kv_heads, head_dim].
    lse: float32 [batch, q_heads, L], natural log.
    block_size: B; L must be a multiple of it.
    chunk: clean keys per step.

  Returns:
    float32 [batch, L // B, kv_heads, L].
  """
  batch, seq, q_heads, head_dim = q_noisy.shape
  kv_heads = k_clean.shape[2]
  groups, blocks = q_heads // kv_heads, seq // block_size
  scale = 1.0 / math.sqrt(head_dim)
  q = q_noisy.reshape(batch, blocks, block_size, kv_heads, groups, head_dim)
  lse = lse.reshape(batch, kv_heads, groups, blocks, block_size).transpose(0, 3, 1, 2, 4)
  lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # a query that saw nothing has p = 0
  k_chunks = k_clean.reshape(batch, seq // chunk, chunk, kv_heads, head_dim).swapaxes(0, 1)
  block_of_query = jnp.arange(blocks)[:, None]

  def chunk_scores(args):
    start, k = args
    logits = jnp.einsum("bnthgd,bchd->bnhgtc", q, k,
                        preferred_element_type=jnp.float32) * scale
    probs = jnp.exp(logits - lse[..., None])
    earlier = (start + jnp.arange(chunk))[None, :] // block_size < block_of_query  # [n, c]
    return jnp.where(earlier[None, :, None, :], jnp.mean(probs, axis=(3, 4)), 0.0)

  starts = jnp.arange(0, seq, chunk)
  scores = jax.lax.map(chunk_scores, (starts, k_chunks))  # [chunks, b, n, h, c]
  return jnp.moveaxis(scores, 0, 3).reshape(batch, blocks, kv_heads, seq)


def select_block_keys(q_noisy, k_clean, lse, *, block_size: int, budget: int,
                      chunk: int) -> BlockSelection:
  """Top-``budget`` clean keys by alpha for every noisy block and KV head (one layer)."""
  scores = noisy_block_scores(q_noisy, k_clean, lse, block_size, chunk)
  blocks = scores.shape[1]
  starts = (jnp.arange(blocks, dtype=jnp.int32) * block_size)[None, :, None]
  rows = ("batch", None, "kv_heads")
  impl = active_impl()
  call = lambda scores, starts: select_kv_indices(scores, starts, budget, impl=impl)
  indices, counts = sharding.shard_kernel(call, (rows + (None,), (None, None, None)),
                                          (rows + ("slots",), rows))(scores, starts)
  return BlockSelection(indices, counts)


def sparse_noisy_attention(q_noisy, k_noisy, v_noisy, k_clean, v_clean,
                           selection: BlockSelection, block_size: int) -> jax.Array:
  """Attention of each noisy block over its selected clean keys plus its own noisy keys.

  A gather then a dense softmax over budget + B keys per (block, KV head): differentiable in
  q, k and v (the gather's transpose scatters the key gradients back), and O(L * budget)
  memory, never O(L^2). Matches the MAGE sparse denoising step (sparse_block_attention) applied
  to every block at once.

  Args:
    q_noisy: [batch, L, q_heads, head_dim].
    k_noisy, v_noisy, k_clean, v_clean: [batch, L, kv_heads, head_dim].
    selection: the layer's selected clean keys.
    block_size: B.

  Returns:
    [batch, L, q_heads, head_dim] in q's dtype.
  """
  batch, seq, q_heads, head_dim = q_noisy.shape
  kv_heads = k_clean.shape[2]
  groups, blocks = q_heads // kv_heads, seq // block_size
  budget = selection.indices.shape[-1]
  rows = selection.indices.transpose(0, 2, 1, 3).reshape(batch, kv_heads, blocks * budget)

  def keys(clean, noisy):
    picked = jnp.take_along_axis(clean.swapaxes(1, 2), rows[..., None], axis=2)
    picked = picked.reshape(batch, kv_heads, blocks, budget, head_dim)
    own = noisy.reshape(batch, blocks, block_size, kv_heads, head_dim).transpose(0, 3, 1, 2, 4)
    return jnp.concatenate([picked, own], axis=3)  # [b, h, n, budget + B, d]

  q = q_noisy.reshape(batch, blocks, block_size, kv_heads, groups, head_dim)
  logits = jnp.einsum("bnthgd,bhnjd->bnhgtj", q, keys(k_clean, k_noisy),
                      preferred_element_type=jnp.float32) / math.sqrt(head_dim)
  slots = jnp.arange(budget + block_size)
  used = (slots < selection.counts[..., None]) | (slots >= budget)  # [b, n, h, slots]
  probs = jax.nn.softmax(jnp.where(used[:, :, :, None, None], logits, -jnp.inf), axis=-1)
  values = keys(v_clean, v_noisy)
  out = jnp.einsum("bnhgtj,bhnjd->bnthgd", probs.astype(values.dtype), values,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, seq, q_heads, head_dim).astype(q_noisy.dtype)


def make_selection_attend(block_size: int, budget: int, dense_layers: int, *,
                          alpha_includes_block: bool = True, chunk: int = 256):
  """MAGE-FT step (1): exact attention that also selects every noisy block's keys.

  The carry is a tuple that grows by one entry per layer: None for the first ``dense_layers``
  layers (they stay dense), else that layer's BlockSelection. alpha's normaliser includes the
  block's own keys when ``alpha_includes_block`` (the lse of the exact pass), else only the
  clean keys (a second lse over the clean half), as mask_step_attention does at inference.
  """

  def attend(layer, q, k, v, carry):
    out, lse = _training_attention(q, k, v, block_size, return_lse=True)
    if layer < dense_layers:
      return out, carry + (None,)
    q_noisy, _ = _split_halves(q)
    _, k_clean = _split_halves(k)
    lse_noisy = lse[:, :, :q_noisy.shape[1]]
    if not alpha_includes_block:
      _, v_clean = _split_halves(v)
      batch, seq = q_noisy.shape[:2]
      halves = training_token_blocks(batch, seq, block_size)
      noisy_half = TokenBlocks(*(x[:, :seq] for x in halves))
      clean_half = TokenBlocks(*(x[:, seq:] for x in halves))
      _, lse_noisy = flash_attention(
          q_noisy, k_clean, v_clean, noisy_half, clean_half, jnp.full((batch,), seq, jnp.int32),
          return_lse=True)
    chunk_size = math.gcd(q_noisy.shape[1], chunk)
    selection = select_block_keys(q_noisy, k_clean, lse_noisy, block_size=block_size,
                                  budget=budget, chunk=chunk_size)
    return out, carry + (selection,)

  return attend


def make_sparse_training_attend(block_size: int):
  """MAGE-FT step (2): the student forward. The carry is the selection pass's tuple, one entry
  per layer: layers with None attend exactly; the others keep the clean half exact (it is the
  prefill that fills the cache) and give each noisy block only its selected clean keys plus
  itself."""

  def attend(layer, q, k, v, carry):
    selection = carry[layer]
    if selection is None:
      return _training_attention(q, k, v, block_size), carry
    (q_noisy, q_clean), (k_noisy, k_clean), (v_noisy, v_clean) = map(_split_halves, (q, k, v))
    batch, seq = q_clean.shape[:2]
    clean = prefill_token_blocks(batch, seq, block_size)
    out_clean = flash_attention(q_clean, k_clean, v_clean, clean, clean,
                                jnp.full((batch,), seq, jnp.int32))
    out_noisy = sparse_noisy_attention(q_noisy, k_noisy, v_noisy, k_clean, v_clean, selection,
                                       block_size)
    return jnp.concatenate([out_noisy, out_clean], axis=1), carry

  return attend
