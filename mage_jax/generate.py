"""The jitted block-diffusion decoding loop: prefill, then block by block fill, denoise, commit.

Layout of a request: a token buffer [batch, buffer_len] holding each prompt left-aligned, the
prompt lengths, and a cache of fixed capacity. Blocks are aligned to absolute positions
(multiples of block_size), as in training: prefill writes every *full* prompt block; the first
generated block holds the prompt's tail (kept fixed) and [MASK] tokens. Sequences of a batch
advance independently (ragged lengths), each at its own cache length.

Per block:
  1. fill: prompt tail + [MASK]; with token shift (Fast-dLLM v2) position 0 of a fresh block is
     decided at once from the previous block's last hidden state, as batch_sample does;
  2. the first denoising step (StepInfo.first=True: MAGE selects its indices here), then further
     steps until no [MASK] is left (fixed_steps: exactly steps_per_block steps);
  3. commit: the finished block runs once more, block-causally, writing its K/V to the cache; its
     last hidden state predicts the next block's first token.
Everything runs inside one jit: a while_loop over prefill chunks, a while_loop over blocks with a
while_loop over steps inside, so one compile serves every prompt of a (config, batch, capacity).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mage_jax import fused_layers, sampling, sharding
from mage_jax.attention import DenoiseCarry, WriteCarry, make_denoise_attend, make_write_attend
from mage_jax.config import ModelConfig
from mage_jax.kv_cache import KVCache, init_cache
from mage_jax.methods.base import AttentionMethod, StepInfo, check_state
from mage_jax.methods.exact import ExactAttention
from mage_jax.model import LAYER_KERNELS, Transformer
from pallas_kernels.dispatch import IMPLS, SETTINGS, resolve_impl, use_kernels


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """Static decoding configuration (hashed into the jit key).

  Attributes:
    policy: a name of mage_jax.sampling.POLICIES (fast_dllm_v2 | sdar | fixed_steps).
    threshold: confidence threshold of fast_dllm_v2 and sdar.
    sub_block_size: fast_dllm_v2's sub-block.
    steps_per_block: sdar's schedule length and fixed_steps' exact step count.
    temperature, top_p: 0 = greedy; otherwise temperature / nucleus sampling with explicit keys.
    prefill_chunk: tokens per prefill chunk (rounded to a multiple of the block size).
    kernels: the kernel setting of every attention call of the decode (one of
      pallas_kernels.dispatch.SETTINGS), resolved once by ``generate``.
    layer_kernels: how the layers outside attention run in the denoising steps and commits
      (mage_jax.model.LAYER_KERNELS): "xla", or "fused" (mage_jax.fused_layers, under
      ``kernels``; with greedy decoding also the LM head's fused argmax, no logits).
  """

  policy: str = "fast_dllm_v2"
  threshold: float = 0.9
  sub_block_size: int = 8
  steps_per_block: int = 32
  temperature: float = 0.0
  top_p: float = 1.0
  prefill_chunk: int = 2048
  kernels: str = "auto"
  layer_kernels: str = "xla"

  @classmethod
  def for_model(cls, cfg: ModelConfig, **overrides) -> "DecodeOptions":
    """The model family's decoding defaults (config.json's block_diffusion section)."""
    fields = dict(policy=cfg.decode_policy, threshold=cfg.confidence_threshold,
                  sub_block_size=cfg.sub_block_size, steps_per_block=cfg.steps_per_block)
    fields.update(overrides)
    return cls(**fields)

  def validate(self, cfg: ModelConfig) -> None:
    if self.policy not in sampling.POLICIES:
      raise ValueError(f"DecodeOptions.policy: unknown policy {self.policy!r}; one of "
                       f"{sorted(sampling.POLICIES)}")
    if cfg.block_size % self.sub_block_size:
      raise ValueError(f"DecodeOptions.sub_block_size={self.sub_block_size} does not divide "
                       f"block_size={cfg.block_size}")
    if self.steps_per_block < 1:
      raise ValueError(f"DecodeOptions.steps_per_block must be >= 1, got {self.steps_per_block}")
    if self.temperature < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"DecodeOptions: temperature must be >= 0 and top_p in (0, 1], got "
                       f"{self.temperature}, {self.top_p}")
    if self.prefill_chunk < 1:
      raise ValueError(f"DecodeOptions.prefill_chunk must be >= 1, got {self.prefill_chunk}")
    if self.kernels not in SETTINGS + IMPLS:
      raise ValueError(f"DecodeOptions.kernels: must be one of {SETTINGS}, got {self.kernels!r}")
    if self.layer_kernels not in LAYER_KERNELS:
      raise ValueError(f"DecodeOptions.layer_kernels: must be one of {LAYER_KERNELS}, got "
                       f"{self.layer_kernels!r}")


class GenerationResult(NamedTuple):
  tokens: list[list[int]]  # generated tokens per sequence (EOS and what follows removed)
  finished: np.ndarray  # bool [batch]: stopped at EOS
  num_blocks: int  # blocks decoded (max over the batch)
  num_steps: int  # denoising forward passes, commits excluded
  buffer: np.ndarray  # int32 [batch, buffer_len]: prompts and generated tokens
  method_state: Any  # the attention method's final state (e.g. a recall probe's totals)
  prefill_s: float = 0.0  # wall time of the prefill stage (the prompts' full blocks written)
  decode_s: float = 0.0  # wall time of the decode stage (every block's steps and commit)


# ---------------------------------------------------------------------------------------------
# Forward passes (pure functions of the model; used by the loop and usable on their own).


def forward_write(model: Transformer, tokens: jax.Array, positions: jax.Array, valid: jax.Array,
                  cache: KVCache, method: AttentionMethod, method_state: Any, *,
                  layer_kernels: str = "xla") -> tuple[jax.Array, KVCache, Any]:
  """Runs tokens [batch, seq] at ``positions`` block-causally against the cache, writing the
  valid rows' K/V. Returns (hidden [batch, seq, hidden], cache, method_state)."""
  ends = jnp.max(jnp.where(valid, positions + 1, 0), axis=1)
  cache = KVCache(layers=cache.layers, lengths=jnp.maximum(cache.lengths, ends).astype(jnp.int32))
  attend = make_write_attend(method, model.config.block_size)
  hidden, carry = model(tokens, positions, attend,
                        WriteCarry(cache, method_state, positions, valid),
                        layer_kernels=layer_kernels)
  return hidden, carry.cache, carry.method_state


def denoise_hidden(model: Transformer, block_tokens: jax.Array, cache: KVCache,
                   method: AttentionMethod, method_state: Any, step: StepInfo, *,
                   layer_kernels: str = "xla") -> tuple[jax.Array, Any]:
  """One denoising step of the block starting at each sequence's cache length (no write); the
  layers' stats go to ``method.after_step``.

  Returns (final hidden states [batch, block, hidden], method_state)."""
  block = block_tokens.shape[1]
  positions = cache.lengths[:, None] + jnp.arange(block, dtype=jnp.int32)[None, :]
  hidden, carry = model(block_tokens, positions, make_denoise_attend(method, step),
                        DenoiseCarry(cache, method_state, {}), layer_kernels=layer_kernels)
  state = method.after_step(carry.method_state, carry.stats)
  check_state(method, "after_step", method_state, state)
  return hidden, state


def forward_denoise(model: Transformer, block_tokens: jax.Array, cache: KVCache,
                    method: AttentionMethod, method_state: Any, step: StepInfo, *,
                    layer_kernels: str = "xla") -> tuple[jax.Array, Any]:
  """`denoise_hidden` and the LM head: (logits [batch, block, vocab] float32, method_state)."""
  hidden, state = denoise_hidden(model, block_tokens, cache, method, method_state, step,
                                 layer_kernels=layer_kernels)
  return model.logits(hidden), state


def prefill(model: Transformer, tokens: jax.Array, lengths: jax.Array, cache: KVCache,
            method: AttentionMethod, method_state: Any, *,
            chunk: int) -> tuple[KVCache, Any, jax.Array]:
  """Writes positions [0, lengths) of ``tokens`` [batch, buffer_len] into an empty cache, in
  chunks of ``chunk`` tokens (a lax loop: one compile whatever the prompt lengths).

  ``buffer_len`` must be a multiple of ``chunk``, and ``chunk`` of the block size. Returns the
  cache, the method state and the float32 logits [batch, vocab] at position lengths - 1 (zeros
  where lengths is 0)."""
  batch, buffer_len = tokens.shape
  if buffer_len % chunk or chunk % model.config.block_size:
    raise ValueError(f"prefill: buffer length {buffer_len} must be a multiple of chunk {chunk}, "
                     f"itself a multiple of block_size {model.config.block_size}")
  hidden_size = model.config.hidden_size
  dtype = model.embed_tokens.embedding.dtype

  def body(carry):
    c, cache, state, last_hidden = carry
    start = c * chunk
    chunk_tokens = jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1)
    positions = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))
    valid = positions < lengths[:, None]
    hidden, cache, state = forward_write(model, chunk_tokens, positions, valid, cache, method,
                                         state)
    offset = lengths - 1 - start
    inside = (offset >= 0) & (offset < chunk)
    row = jnp.take_along_axis(hidden, jnp.clip(offset, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
    return c + 1, cache, state, jnp.where(inside[:, None], row, last_hidden)

  init = (jnp.int32(0), cache, method_state, jnp.zeros((batch, hidden_size), dtype))
  _, cache, method_state, last_hidden = jax.lax.while_loop(
      lambda carry: carry[0] * chunk < jnp.max(lengths), body, init)
  return cache, method_state, model.logits(last_hidden)


# ---------------------------------------------------------------------------------------------
# Proposals: what a denoising step offers each position.


def propose_from_logits(cfg: ModelConfig, logits: jax.Array, key: jax.Array,
                        options: DecodeOptions) -> tuple[jax.Array, jax.Array]:
  """(tokens, confidences) from logits [..., vocab] under ``options``' sampling. A decoded
  position must hold a real token: [MASK] is never proposed (a random or barely trained model
  can rank it first, and the position would then stay masked in the output)."""
  logits = logits.at[..., cfg.mask_token_id].set(sampling.NEG_INF)
  greedy = options.temperature == 0.0
  return sampling.propose_tokens(logits, None if greedy else key, options.temperature,
                                 options.top_p)


def block_proposals(model: Transformer, hidden: jax.Array, prev_logits: jax.Array,
                    key: jax.Array, options: DecodeOptions) -> tuple[jax.Array, jax.Array]:
  """(tokens, confidences) [batch, block] of a denoising step from its final hidden states
  [batch, block, hidden]. With token shift (Fast-dLLM v2) position i is proposed from hidden
  state i - 1 and position 0 from ``prev_logits`` [batch, vocab] (the last committed
  position's). Greedy decoding with ``layer_kernels="fused"`` runs the fused head
  (fused_layers.greedy_proposals: no [batch, block, vocab] logits)."""
  cfg = model.config
  if options.temperature == 0.0 and options.layer_kernels == "fused":
    tokens, confidence = fused_layers.greedy_proposals(
        model, hidden[:, :-1] if cfg.token_shift else hidden, cfg.mask_token_id)
    if not cfg.token_shift:
      return tokens, confidence
    first_token, first_confidence = propose_from_logits(cfg, prev_logits, key, options)
    return (jnp.concatenate([first_token[:, None], tokens], axis=1),
            jnp.concatenate([first_confidence[:, None], confidence], axis=1))
  logits = model.logits(hidden)
  if cfg.token_shift:
    logits = jnp.concatenate([prev_logits[:, None], logits[:, :-1]], axis=1)
  return propose_from_logits(cfg, logits, key, options)


# ---------------------------------------------------------------------------------------------
# The decoding loop.


class _Blocks(NamedTuple):
  """Carry of the loop over blocks."""

  buffer: jax.Array  # int32 [batch, buffer_len]
  cache: KVCache
  method_state: Any
  prev_logits: jax.Array  # float32 [batch, vocab]: logits of the last committed position
  done: jax.Array  # bool [batch]
  generated: jax.Array  # int32 [batch]: tokens generated so far (prompt tails excluded)
  num_blocks: jax.Array  # int32 scalar
  num_steps: jax.Array  # int32 scalar
  rng: jax.Array


class _Steps(NamedTuple):
  """Carry of the loop over the denoising steps of one block."""

  tokens: jax.Array  # int32 [batch, block]
  masked: jax.Array  # bool [batch, block]: still [MASK]
  method_state: Any
  step: jax.Array  # int32 scalar


def _decode(model: Transformer, buffer, prompt_lengths, max_new_tokens, cache, method_state,
            prev_logits, rng, *, method: AttentionMethod, options: DecodeOptions):
  """Stage 2: block by block fill, denoise, commit, from the state ``_prefill_jit`` left."""
  cfg = model.config
  bs = cfg.block_size
  batch = buffer.shape[0]
  arange_block = jnp.arange(bs, dtype=jnp.int32)
  eos = jnp.asarray(cfg.eos_token_ids, jnp.int32)
  policy = sampling.POLICIES[options.policy]

  def denoise(blocks: _Blocks, active, num_masked_at_start, steps: _Steps, first):
    key = jax.random.fold_in(jax.random.fold_in(blocks.rng, 0), blocks.num_steps + steps.step)
    hidden, state = denoise_hidden(model, steps.tokens, blocks.cache, method,
                                   steps.method_state, StepInfo(first, steps.step),
                                   layer_kernels=options.layer_kernels)
    proposal, confidence = block_proposals(model, hidden, blocks.prev_logits, key, options)
    masked = steps.masked & active[:, None]
    count = sampling.scheduled_count(num_masked_at_start, options.steps_per_block, steps.step)
    transfer = policy.transfer(confidence, masked, count, options.threshold,
                               options.sub_block_size)
    return _Steps(jnp.where(transfer, proposal, steps.tokens), steps.masked & ~transfer, state,
                  steps.step + 1)

  def block_body(blocks: _Blocks) -> _Blocks:
    active = ~blocks.done
    start = blocks.cache.lengths
    positions = start[:, None] + arange_block[None, :]
    from_prompt = positions < prompt_lengths[:, None]
    prompt_tail = jnp.take_along_axis(blocks.buffer, positions, axis=1)
    tokens = jnp.where(from_prompt, prompt_tail, cfg.mask_token_id)
    masked = ~from_prompt
    if cfg.token_shift:
      key = jax.random.fold_in(jax.random.fold_in(blocks.rng, 1), blocks.num_blocks)
      first_token, _ = propose_from_logits(model.config, blocks.prev_logits, key, options)
      tokens = tokens.at[:, 0].set(jnp.where(masked[:, 0], first_token, tokens[:, 0]))
      masked = masked.at[:, 0].set(False)
    num_masked_at_start = jnp.sum(masked, axis=1).astype(jnp.int32)

    steps = _Steps(tokens, masked, blocks.method_state, jnp.int32(0))
    steps = denoise(blocks, active, num_masked_at_start, steps, first=True)

    def step_cond(steps: _Steps):
      if policy.fixed_steps:
        return steps.step < options.steps_per_block
      return jnp.any(steps.masked & active[:, None]) & (steps.step < bs)

    steps = jax.lax.while_loop(
        step_cond,
        lambda s: denoise(blocks, active, num_masked_at_start, s, first=False), steps)
    tokens = steps.tokens
    valid = jnp.broadcast_to(active[:, None], positions.shape)
    hidden, cache, state = forward_write(model, tokens, positions, valid, blocks.cache, method,
                                         steps.method_state, layer_kernels=options.layer_kernels)
    last_logits = model.logits(hidden[:, -1])
    rows = jnp.where(valid, positions, blocks.buffer.shape[1])
    buffer = jax.vmap(lambda b, r, t: b.at[r].set(t, mode="drop"))(blocks.buffer, rows, tokens)
    new = ~from_prompt & active[:, None]
    hit_eos = jnp.any(new & jnp.isin(tokens, eos), axis=1)
    generated = blocks.generated + jnp.sum(new, axis=1).astype(jnp.int32)
    done = blocks.done | hit_eos | (generated >= max_new_tokens)
    return _Blocks(buffer, cache, state, jnp.where(active[:, None], last_logits, blocks.prev_logits),
                   done, generated, blocks.num_blocks + 1, blocks.num_steps + steps.step, blocks.rng)

  init = _Blocks(buffer, cache, method_state, prev_logits, jnp.zeros((batch,), bool),
                 jnp.zeros((batch,), jnp.int32), jnp.int32(0), jnp.int32(0), rng)
  out = jax.lax.while_loop(lambda b: ~jnp.all(b.done), block_body, init)
  return out.buffer, out.generated, out.num_blocks, out.num_steps, out.method_state, out.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "options", "chunk"),
                   donate_argnames=("cache",))
def _prefill_jit(graphdef, params, buffer, prompt_lengths, cache, *, method, options, chunk):
  """Stage 1 (its own jit, so its time is measured apart): the prompts' full blocks into the
  cache. Returns (cache, method_state, logits [batch, vocab] at the last written position)."""
  model = nnx.merge(graphdef, params)
  bs = model.config.block_size
  with use_kernels(options.kernels):  # resolved by generate: part of the jit key
    # Created inside the jit: without the pin XLA may replicate the selections on every device.
    method_state = sharding.constrain_state(
        method.init_state(model.config, buffer.shape[0], cache.capacity))
    return prefill(model, buffer, prompt_lengths // bs * bs, cache, method, method_state,
                   chunk=chunk)


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "options"),
                   donate_argnames=("cache", "method_state"))
def _decode_jit(graphdef, params, buffer, prompt_lengths, max_new_tokens, cache, method_state,
                prev_logits, rng, *, method, options):
  with use_kernels(options.kernels):  # resolved by generate: part of the jit key
    return _decode(nnx.merge(graphdef, params), buffer, prompt_lengths, max_new_tokens, cache,
                   method_state, prev_logits, rng, method=method, options=options)


class RequestPlan(NamedTuple):
  """The static sizes of a request (one compile per distinct plan)."""

  capacity: int  # KV cache rows per sequence
  chunk: int  # tokens per prefill chunk: a multiple of the block size, at most the capacity
  buffer_len: int  # token buffer length: the capacity rounded up to whole chunks


def plan_request(cfg: ModelConfig, prompt_lengths: Sequence[int], max_new_tokens: int, *,
                 capacity: int | None = None, prefill_chunk: int = 2048) -> RequestPlan:
  """Validates a request and sizes it, before any work.

  ``capacity`` defaults to the longest prompt plus ``max_new_tokens``, rounded up to a block
  (generation fills whole blocks). Raises ValueError naming the limit a request breaks."""
  lengths = np.asarray(prompt_lengths)
  if lengths.ndim != 1 or lengths.size == 0:
    raise ValueError(f"prompt_lengths must be a non-empty 1-D array, got shape {lengths.shape}")
  if (lengths < 1).any():
    raise ValueError(f"every prompt needs at least one token; prompt_lengths={lengths.tolist()}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  bs = cfg.block_size
  # The last block ends at the next block boundary past the budget.
  needed = int(((lengths + max_new_tokens + bs - 1) // bs * bs).max())
  capacity = needed if capacity is None else capacity
  if needed > capacity:
    raise ValueError(
        f"KV cache capacity {capacity} is too small: prompt length {int(lengths.max())} + "
        f"max_new_tokens {max_new_tokens}, rounded up to blocks of {bs}, needs {needed} rows")
  if needed > cfg.max_position_embeddings:
    raise ValueError(
        f"request needs positions up to {needed}, beyond the model's "
        f"max_position_embeddings={cfg.max_position_embeddings}")
  chunk = min(max(bs, prefill_chunk // bs * bs), -(-capacity // bs) * bs)
  return RequestPlan(capacity, chunk, -(-capacity // chunk) * chunk)


def pack_prompts(prompts: Sequence[Sequence[int]], buffer_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-aligned int32 buffer [batch, buffer_len] and lengths [batch] from token lists."""
  buffer = np.zeros((len(prompts), buffer_len), np.int32)
  lengths = np.zeros((len(prompts),), np.int32)
  for i, p in enumerate(prompts):
    if len(p) > buffer_len:
      raise ValueError(f"prompt {i} has {len(p)} tokens, more than the cache capacity {buffer_len}")
    buffer[i, :len(p)] = p
    lengths[i] = len(p)
  return buffer, lengths


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             method: AttentionMethod | None = None, options: DecodeOptions | None = None,
             capacity: int | None = None, rng: jax.Array | None = None,
             mesh: jax.sharding.Mesh | None = None) -> GenerationResult:
  """Generates up to ``max_new_tokens`` tokens after each prompt (a list of token-id lists).

  ``capacity`` (default: the longest prompt plus the budget, rounded up to a block: see
  ``plan_request``) fixes the cache shape; keep it fixed across calls to reuse the compiled
  loop. With a ``mesh`` the model's parameters must already be on it (sharding.shard_model);
  the batch is split over its "data" axis and the KV heads over "model" (docs/sharding.md).
  """
  cfg = model.config
  method = method or ExactAttention()
  options = options or DecodeOptions.for_model(cfg)
  options.validate(cfg)
  options = dataclasses.replace(options, kernels=resolve_impl(options.kernels))
  capacity, chunk, buffer_len = plan_request(cfg, [len(p) for p in prompts], max_new_tokens,
                                             capacity=capacity,
                                             prefill_chunk=options.prefill_chunk)
  buffer, lengths = pack_prompts(prompts, buffer_len)
  rng = jax.random.key(0) if rng is None else rng
  graphdef, params = nnx.split(model)
  if mesh is None:
    buffer, lengths = jnp.asarray(buffer), jnp.asarray(lengths)
    cache = init_cache(cfg, len(prompts), capacity)
  else:
    cache = sharding.init_sharded_cache(cfg, len(prompts), capacity, mesh)
    put = lambda name, x: jax.device_put(x, sharding.batch_sharding(mesh, name, x.shape))
    buffer, lengths = put("prompt buffer", buffer), put("prompt lengths", lengths)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    # Two jitted stages, so prefill (time to the first block) and the per-step decode time are
    # measured apart; the wait between them is the only added synchronisation.
    start = time.perf_counter()
    cache, method_state, prev_logits = _prefill_jit(graphdef, params, buffer, lengths, cache,
                                                    method=method, options=options, chunk=chunk)
    jax.block_until_ready(prev_logits)
    prefilled = time.perf_counter()
    out = _decode_jit(graphdef, params, buffer, lengths, jnp.int32(max_new_tokens), cache,
                      method_state, prev_logits, rng, method=method, options=options)
    out_buffer, generated, num_blocks, num_steps, method_state, _ = out
    out_buffer = np.asarray(out_buffer)
    decoded = time.perf_counter()
  generated = np.asarray(generated)
  lengths = np.asarray(lengths)
  eos = set(cfg.eos_token_ids)
  tokens, finished = [], np.zeros(len(prompts), bool)
  for i, n in enumerate(lengths):
    seq = out_buffer[i, n:n + min(int(generated[i]), max_new_tokens)].tolist()
    end = next((j for j, t in enumerate(seq) if t in eos), None)
    finished[i] = end is not None
    tokens.append(seq[:end])
  return GenerationResult(tokens, finished, int(num_blocks), int(num_steps), out_buffer,
                          method_state, prefill_s=prefilled - start, decode_s=decoded - prefilled)
