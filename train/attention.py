"""Training attention over the doubled sequence [x_t | x_0]: the exact training forward,
MAGE-FT's selection pass, its sparse student forward and its selection loss's passes (attend
functions for mage_jax.model.Transformer, as mage_jax.attention's are for decoding).

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


# The logit of a key a query does not see, where a log-probability is needed: exp gives exactly
# 0, and unlike -inf it keeps logsumexp and its gradient finite when a query sees no key.
_UNSEEN = -1e30


class NoisyKeys(NamedTuple):
  """What one sparse layer's alpha is made of in a training forward (MAGE-FT's selection loss).

  Attributes:
    q_noisy: [batch, L, q_heads, head_dim], the noisy half's queries.
    k_noisy: [batch, L, kv_heads, head_dim], the noisy half's keys (each block's own keys).
    k_clean: [batch, L, kv_heads, head_dim], the clean half's keys.
  """

  q_noisy: jax.Array
  k_noisy: jax.Array
  k_clean: jax.Array


def _grouped_queries(q_noisy: jax.Array, kv_heads: int, block_size: int) -> jax.Array:
  """[batch, L, q_heads, d] -> [batch, blocks, B, kv_heads, groups, d]."""
  batch, seq, q_heads, head_dim = q_noisy.shape
  return q_noisy.reshape(batch, seq // block_size, block_size, kv_heads, q_heads // kv_heads,
                         head_dim)


def _grouped_lse(lse: jax.Array, kv_heads: int, block_size: int) -> jax.Array:
  """[batch, q_heads, L] -> [batch, blocks, kv_heads, groups, B]."""
  batch, q_heads, seq = lse.shape
  return lse.reshape(batch, kv_heads, q_heads // kv_heads, seq // block_size,
                     block_size).transpose(0, 3, 1, 2, 4)


def _key_chunks(k_clean: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """(start of each chunk, the clean keys as [chunks, batch, chunk, kv_heads, d]) in chunks of
  at most L keys, zero-padded to whole chunks: a padded key sits at or after position L, later
  than every block, so no noisy block sees it."""
  batch, seq, kv_heads, head_dim = k_clean.shape
  chunk = min(chunk, seq)
  padded = -(-seq // chunk) * chunk
  k = k_clean if padded == seq else jnp.pad(k_clean, ((0, 0), (0, padded - seq), (0, 0), (0, 0)))
  return (jnp.arange(0, padded, chunk),
          k.reshape(batch, padded // chunk, chunk, kv_heads, head_dim).swapaxes(0, 1))


def _chunk_logits(q: jax.Array, k: jax.Array, start: jax.Array,
                  block_size: int) -> tuple[jax.Array, jax.Array]:
  """Scaled float32 logits [batch, blocks, kv_heads, groups, B, chunk] of grouped noisy queries
  over one chunk of clean keys starting at ``start``, and where each block sees the key
  (bool, broadcastable to the logits: the key lies in an earlier block)."""
  blocks, head_dim = q.shape[1], q.shape[-1]
  logits = jnp.einsum("bnthgd,bchd->bnhgtc", q, k,
                      preferred_element_type=jnp.float32) / math.sqrt(head_dim)
  earlier = (start + jnp.arange(k.shape[1]))[None, :] // block_size < jnp.arange(blocks)[:, None]
  return logits, earlier[None, :, None, None, None, :]


def noisy_block_scores(q_noisy: jax.Array, k_clean: jax.Array, lse: jax.Array, block_size: int,
                       chunk: int) -> jax.Array:
  """MAGE's alpha for every noisy block at once, without a [L, L] probability matrix.

  alpha[b, n, h, j] = 1/(G*B) * sum over the G query heads of KV head h and the B queries of
  noisy block n of exp(q . k_j * scale - lse), for clean keys j of blocks before n (0 for the
  others). ``lse`` is each query's log-normaliser from the exact pass, so the probabilities are
  those of the softmax the exact pass used. The clean keys are walked in chunks of ``chunk``:
  the largest intermediate is [batch, L, q_heads, chunk].

  Args:
    q_noisy: [batch, L, q_heads, head_dim].
    k_clean: [batch, L, kv_heads, head_dim].
    lse: float32 [batch, q_heads, L], natural log.
    block_size: B; L must be a multiple of it.
    chunk: clean keys per step.

  Returns:
    float32 [batch, L // B, kv_heads, L].
  """
  seq, kv_heads = q_noisy.shape[1], k_clean.shape[2]
  q = _grouped_queries(q_noisy, kv_heads, block_size)
  lse = _grouped_lse(lse, kv_heads, block_size)
  lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # a query that saw nothing has p = 0

  def chunk_scores(args):
    logits, seen = _chunk_logits(q, args[1], args[0], block_size)
    return jnp.mean(jnp.exp(jnp.where(seen, logits - lse[..., None], _UNSEEN)), axis=(3, 4))

  scores = jax.lax.map(chunk_scores, _key_chunks(k_clean, chunk))  # [chunks, b, n, h, c]
  scores = jnp.moveaxis(scores, 0, 3)
  scores = scores.reshape(scores.shape[:3] + (-1,))
  return scores if scores.shape[-1] == seq else scores[..., :seq]


def noisy_query_lse(keys: NoisyKeys, block_size: int, chunk: int,
                    include_block: bool) -> jax.Array:
  """Each noisy query's log-normaliser for alpha, differentiable, in chunks of clean keys.

  Over the clean keys of earlier blocks, plus the block's own noisy keys when
  ``include_block`` (MAGE's alpha_includes_block: then it is the exact pass's lse). A query
  that sees no key (the first block, without its own keys) gets _UNSEEN, not -inf. Each chunk
  runs under jax.checkpoint, so the backward holds one chunk's logits at a time.

  Returns:
    float32 [batch, q_heads, L], natural log.
  """
  batch, seq, q_heads, _ = keys.q_noisy.shape
  kv_heads = keys.k_clean.shape[2]
  q = _grouped_queries(keys.q_noisy, kv_heads, block_size)

  @jax.checkpoint
  def add_chunk(lse, args):
    logits, seen = _chunk_logits(q, args[1], args[0], block_size)
    return jnp.logaddexp(lse, jax.nn.logsumexp(jnp.where(seen, logits, _UNSEEN), axis=-1)), None

  lse = jnp.full(q.shape[:2] + (kv_heads, q_heads // kv_heads, block_size), _UNSEEN,
                 jnp.float32)
  lse, _ = jax.lax.scan(add_chunk, lse, _key_chunks(keys.k_clean, chunk))
  if include_block:
    own = keys.k_noisy.reshape(batch, seq // block_size, block_size, kv_heads, -1)
    own_logits = jnp.einsum("bnthgd,bnshd->bnhgts", q, own,
                            preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    lse = jnp.logaddexp(lse, jax.nn.logsumexp(own_logits, axis=-1))
  return lse.transpose(0, 2, 3, 1, 4).reshape(batch, q_heads, seq)


def selection_divergence(student: NoisyKeys, target: NoisyKeys, *, block_size: int, chunk: int,
                         include_block: bool) -> jax.Array:
  """KL(target || student) of every noisy block's alpha, normalised over its clean keys.

  alpha is MAGE's selection statistic (noisy_block_scores; the mask-step kernel's alpha at
  inference) made a distribution: per noisy block and KV head, alpha over the clean keys of
  earlier blocks divided by its sum. The KL runs in one pass over chunks of ``chunk`` clean
  keys (after noisy_query_lse's pass for each side), accumulating per (row, block, KV head) the
  log-sums of both alphas and the target-weighted log-ratio, rescaled as the target's
  normaliser grows: KL = sum_j a_j (log a_j - log s_j) / T - log T + log S for target alpha a
  (sum T) and student alpha s (sum S). Nothing larger than one chunk's logits
  ([rows, L, q_heads, chunk]) exists, in the backward too (jax.checkpoint per chunk). Gradients
  reach the student's queries and keys; the target is held fixed (stop_gradient).

  Args:
    student, target: one layer's NoisyKeys; the target's rows are views of the student's (target
      row r belongs to student row r % student rows, as noise_views stacks them).
    block_size: B.
    chunk: clean keys per step (any size; the last chunk is padded).
    include_block: alpha_includes_block, for both sides.

  Returns:
    float32 [target rows, L // B, kv_heads]: 0 for the first block, which sees no clean key.
  """
  target = jax.lax.stop_gradient(target)
  batch, seq, q_heads, _ = student.q_noisy.shape
  kv_heads = student.k_clean.shape[2]
  views = target.q_noisy.shape[0] // batch
  scale_log = math.log(q_heads // kv_heads * block_size)

  def side(keys):
    lse = noisy_query_lse(keys, block_size, chunk, include_block)
    return (_grouped_queries(keys.q_noisy, kv_heads, block_size),
            _grouped_lse(lse, kv_heads, block_size), _key_chunks(keys.k_clean, chunk)[1])

  (q_s, lse_s, k_s), (q_t, lse_t, k_t) = side(student), side(target)
  starts = _key_chunks(student.k_clean, chunk)[0]

  def log_alpha(q, lse, k, start):
    logits, seen = _chunk_logits(q, k, start, block_size)
    log_probs = jnp.where(seen, logits - lse[..., None], _UNSEEN)
    return jax.nn.logsumexp(log_probs, axis=(3, 4)) - scale_log, seen[0, :, :, 0, 0]  # [n, 1, c]

  @jax.checkpoint
  def add_chunk(carry, args):
    log_sum_s, log_sum_t, ratio = carry
    start, chunk_s, chunk_t = args
    log_s, seen = log_alpha(q_s, lse_s, chunk_s, start)
    log_t, _ = log_alpha(q_t, lse_t, chunk_t, start)
    log_sum_s = jnp.logaddexp(log_sum_s, jax.nn.logsumexp(log_s, axis=-1))
    new_sum_t = jnp.logaddexp(log_sum_t, jax.nn.logsumexp(log_t, axis=-1))
    log_s = jnp.concatenate([log_s] * views)
    terms = jnp.exp(log_t - new_sum_t[..., None]) * (log_t - log_s)
    ratio = ratio * jnp.exp(log_sum_t - new_sum_t) + jnp.sum(jnp.where(seen, terms, 0.0), -1)
    return (log_sum_s, new_sum_t, ratio), None

  blocks = seq // block_size
  unseen = lambda rows: jnp.full((rows, blocks, kv_heads), _UNSEEN, jnp.float32)
  carry = (unseen(batch), unseen(views * batch), jnp.zeros((views * batch, blocks, kv_heads)))
  (log_sum_s, log_sum_t, ratio), _ = jax.lax.scan(add_chunk, carry, (starts, k_s, k_t))
  divergence = ratio - log_sum_t + jnp.concatenate([log_sum_s] * views)
  return jnp.where(jnp.arange(blocks)[None, :, None] > 0, divergence, 0.0)


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


def make_capture_attend(block_size: int, dense_layers: int):
  """Exact attention (as make_training_attend) that also hands out every sparse layer's
  NoisyKeys: the teacher's pass for MAGE-FT's selection loss. The carry is a tuple that grows
  by one entry per layer, None for the first ``dense_layers`` layers, else that layer's
  NoisyKeys."""

  def attend(layer, q, k, v, carry):
    out = _training_attention(q, k, v, block_size)
    if layer < dense_layers:
      return out, carry + (None,)
    (q_noisy, _), (k_noisy, k_clean) = _split_halves(q), _split_halves(k)
    return out, carry + (NoisyKeys(q_noisy, k_noisy, k_clean),)

  return attend


def make_selection_loss_attend(block_size: int, budget: int, targets: tuple, *,
                               include_block: bool, chunk: int):
  """Exact attention that adds, at every layer with a target (the teacher's NoisyKeys of that
  layer; None for dense layers), the selection_divergence of this pass's alpha from the
  target's, summed over rows, KV heads and the noisy blocks that see more than ``budget`` clean
  keys (for the others top-k keeps every key), to the carry (a float32 scalar). It runs inside
  the layer, so under remat nothing of it outlives the layer: the backward recomputes it."""

  def attend(layer, q, k, v, carry):
    out = _training_attention(q, k, v, block_size)
    if targets[layer] is None:
      return out, carry
    (q_noisy, _), (k_noisy, k_clean) = _split_halves(q), _split_halves(k)
    divergence = selection_divergence(NoisyKeys(q_noisy, k_noisy, k_clean), targets[layer],
                                      block_size=block_size, chunk=chunk,
                                      include_block=include_block)
    counted = (jnp.arange(divergence.shape[1]) * block_size > budget)[None, :, None]
    return out, carry + jnp.sum(jnp.where(counted, divergence, 0.0))

  return attend
