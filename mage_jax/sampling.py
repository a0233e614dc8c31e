"""Token proposals and unmasking rules of the decoding policies, as pure array functions.

Each denoising step proposes a token and a confidence for every position of the block, then a
policy decides which masked positions take their proposal ("transfer"):
  * fast_dllm_v2: the block is decoded sub-block by sub-block (left to right); in the current
    sub-block every masked position whose confidence exceeds the threshold is unmasked, and at
    least the most confident one (Fast-dLLM v2's batch_sample).
  * sdar (low_confidence_dynamic): all masked positions above the threshold if there are at least
    the scheduled number of them, else the scheduled number of most confident ones.
  * fixed_steps (low_confidence_static): exactly the scheduled number of most confident ones,
    so a block takes exactly ``steps_per_block`` steps (benchmarks).
The schedule spreads a block's n masked positions over T steps: n // T each, one more in the
first n % T steps (LLaDA / SDAR ``get_num_transfer_tokens``). ``POLICIES`` maps each name to its
rule; the model config, DecodeOptions' validation and the decoding loop all read it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def propose_tokens(logits: jax.Array, key: jax.Array | None, temperature: float,
                   top_p: float) -> tuple[jax.Array, jax.Array]:
  """Proposed tokens and their confidences from logits [..., vocab].

  Greedy (temperature 0): the argmax and its softmax probability. Otherwise the logits are
  divided by the temperature, restricted to the smallest top-p nucleus, renormalised and sampled
  with ``key``; the confidence is the sampled token's renormalised probability (as Fast-dLLM v2).
  """
  logits = logits.astype(jnp.float32)
  if temperature == 0.0:
    probs = jax.nn.softmax(logits, axis=-1)
    tokens = jnp.argmax(logits, axis=-1)
    return tokens.astype(jnp.int32), jnp.take_along_axis(probs, tokens[..., None], -1)[..., 0]
  if key is None:
    raise ValueError("sampling with temperature > 0 needs a PRNG key")
  probs = jax.nn.softmax(logits / temperature, axis=-1)
  if top_p < 1.0:
    sorted_probs = -jnp.sort(-probs, axis=-1)
    # Keep a token while the mass strictly before it is below top_p (the first always stays).
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = jnp.where(mass_before < top_p, sorted_probs, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    probs = jnp.where(probs >= cutoff, probs, 0.0)
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
  tokens = jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)
  return tokens, jnp.take_along_axis(probs, tokens[..., None], -1)[..., 0]


def scheduled_count(num_masked_at_start: jax.Array, steps: int, step: jax.Array) -> jax.Array:
  """How many positions step ``step`` (0-based) of ``steps`` unmasks, per sequence."""
  base = num_masked_at_start // steps
  extra = (step < num_masked_at_start % steps).astype(base.dtype)
  return jnp.where(step < steps, base + extra, num_masked_at_start)


def _most_confident(confidence: jax.Array, eligible: jax.Array, count: jax.Array) -> jax.Array:
  """The ``count`` [batch] most confident eligible positions (ties: lower position first)."""
  scores = jnp.where(eligible, confidence, NEG_INF)
  order = jnp.argsort(-scores, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1, stable=True)
  return eligible & (ranks < count[:, None])


def fast_dllm_v2_transfer(confidence: jax.Array, masked: jax.Array, threshold: float,
                          sub_block_size: int) -> jax.Array:
  """Fast-dLLM v2: threshold + at-least-one inside the first sub-block that still has masks."""
  block = confidence.shape[-1]
  sub_ids = jnp.arange(block) // sub_block_size
  sub_has_mask = jax.vmap(
      lambda m: jax.ops.segment_max(m.astype(jnp.int32), sub_ids, block // sub_block_size))(masked)
  current = jnp.argmax(sub_has_mask, axis=-1)
  eligible = masked & (sub_ids[None, :] == current[:, None])
  scores = jnp.where(eligible, confidence, NEG_INF)
  best = jax.nn.one_hot(jnp.argmax(scores, axis=-1), block, dtype=bool)
  return eligible & ((scores > threshold) | best)


def sdar_transfer(confidence: jax.Array, masked: jax.Array, threshold: float,
                  count: jax.Array) -> jax.Array:
  """SDAR low_confidence_dynamic: all above threshold if at least ``count`` of them, else the
  ``count`` most confident."""
  high = masked & (confidence > threshold)
  enough = jnp.sum(high, axis=-1) >= count
  return jnp.where(enough[:, None], high, _most_confident(confidence, masked, count))


def fixed_transfer(confidence: jax.Array, masked: jax.Array, count: jax.Array) -> jax.Array:
  """low_confidence_static: exactly the ``count`` most confident masked positions."""
  return _most_confident(confidence, masked, count)


class Policy(NamedTuple):
  """A decoding policy: ``transfer(confidence, masked, count, threshold, sub_block_size)`` ->
  bool [batch, block], with ``count`` the step's scheduled number; ``fixed_steps``: a block
  takes exactly steps_per_block steps (else steps run until no [MASK] is left)."""

  transfer: Callable[..., jax.Array]
  fixed_steps: bool = False


POLICIES: dict[str, Policy] = {
    "fast_dllm_v2": Policy(lambda confidence, masked, count, threshold, sub_block_size:
                           fast_dllm_v2_transfer(confidence, masked, threshold, sub_block_size)),
    "sdar": Policy(lambda confidence, masked, count, threshold, sub_block_size:
                   sdar_transfer(confidence, masked, threshold, count)),
    "fixed_steps": Policy(lambda confidence, masked, count, threshold, sub_block_size:
                          fixed_transfer(confidence, masked, count), fixed_steps=True),
}
