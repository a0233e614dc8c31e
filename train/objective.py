"""The block-diffusion training objective and MAGE-FT self-distillation.

Noise: every block of every sequence draws a noise level t and masks each of its tokens
(replaces it with the mask id) with probability t. With complementary masking (Fast-dLLM v2)
each sequence is used twice, with mask m at level t and with the complement 1 - m at level
1 - t, so across the pair every token is masked exactly once and no token goes unsupervised.
t ~ U(eps, 1) alone, U(eps, 1 - eps) with the complement, so both levels stay >= eps.

Loss: CE on masked tokens weighted by 1/t (the masked-diffusion ELBO: a token masked with
probability t carries 1/t of the expected loss, so the sum is an unbiased estimate of the loss on
every token, and low-noise blocks, which mask few tokens, are not under-weighted), divided by
the number of predicted tokens (so it reads as nats per token whatever t was drawn).

Prediction position: with token shift (Fast-dLLM v2) token i is predicted from hidden state
i - 1: inside a block from the noisy stream, and for the first token of a block from the clean
stream's last hidden state of the previous block, which is what decoding uses (the commit of the
previous block predicts the next block's first token). Position 0 has no predictor and is never
scored. Without token shift, token i is predicted from its own noisy hidden state.

Self-distillation (MAGE-FT) per sequence: (1) select, from the exact attention of the masked
blocks with the current weights and no gradient, each noisy block's top-k clean keys per KV
head; (2) the student forward attends to those keys plus its own block and takes the gradient;
(3) the teacher (the frozen initial weights) runs the exact forward without gradient. Loss =
CE + lambda * KL(p_student || p_teacher), the KL averaged over the scored masked tokens.

Top-k passes no gradient, so that loss never trains which keys are selected. The selection
loss (mage.selection_weight > 0) does: per sparse layer, noisy block and KV head it pulls the
All-[MASK] pass's alpha (what step (1) and inference rank keys by; with gradient) toward the
teacher's alpha of the noisy view x_t (the attention the later denoising steps pay), as
KL(target || student) of the two normalised over the block's clean keys.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mage_jax.model import Transformer
from train import attention


class Views(NamedTuple):
  """The noised sequences of a micro-batch (views of one sequence are batch rows V*b apart).

  Attributes:
    noisy: int32 [V*b, L], x_t.
    clean: int32 [V*b, L], x_0.
    masked: bool [V*b, L], tokens replaced by the mask id.
    noise: float32 [V*b, L], the noise level t of each token's block.
  """

  noisy: jax.Array
  clean: jax.Array
  masked: jax.Array
  noise: jax.Array


def noise_views(key: jax.Array, tokens: jax.Array, *, block_size: int, mask_id: int, eps: float,
                complementary: bool) -> Views:
  """Masks every block of ``tokens`` [b, L] at its own level t (and the complement, if asked)."""
  batch, seq = tokens.shape
  level_key, token_key = jax.random.split(key)
  high = 1.0 - eps if complementary else 1.0
  t = jax.random.uniform(level_key, (batch, seq // block_size), minval=eps, maxval=high)
  t = jnp.repeat(t, block_size, axis=1)
  masked = jax.random.uniform(token_key, (batch, seq)) < t
  if complementary:
    masked = jnp.concatenate([masked, ~masked])
    t = jnp.concatenate([t, 1.0 - t])
    tokens = jnp.concatenate([tokens, tokens])
  noisy = jnp.where(masked, mask_id, tokens)
  return Views(noisy.astype(jnp.int32), tokens.astype(jnp.int32), masked, t)


def doubled_forward(model: Transformer, noisy: jax.Array, clean: jax.Array, attend, carry: Any,
                    *, remat: bool = False):
  """Runs [x_t | x_0] (both at positions 0..L-1). Returns (h_noisy, h_clean, carry)."""
  batch, seq = clean.shape
  positions = jnp.broadcast_to(jnp.tile(jnp.arange(seq, dtype=jnp.int32), 2), (batch, 2 * seq))
  hidden, carry = model(jnp.concatenate([noisy, clean], axis=1), positions, attend, carry,
                        remat=remat)
  return hidden[:, :seq], hidden[:, seq:], carry


def predicting_hidden(h_noisy: jax.Array, h_clean: jax.Array, block_size: int,
                      token_shift: bool) -> tuple[jax.Array, jax.Array]:
  """The hidden state that predicts each token, and whether the token is scored at all."""
  seq = h_noisy.shape[1]
  if not token_shift:
    return h_noisy, jnp.ones((seq,), bool)
  shift = lambda h: jnp.pad(h[:, :-1], ((0, 0), (1, 0), (0, 0)))
  first_of_block = (jnp.arange(seq) % block_size == 0)[None, :, None]
  return jnp.where(first_of_block, shift(h_clean), shift(h_noisy)), jnp.arange(seq) > 0


def chunked_losses(model: Transformer, hidden: jax.Array, targets: jax.Array,
                   ce_weights: jax.Array, *, chunk: int, teacher: Transformer | None = None,
                   teacher_hidden: jax.Array | None = None,
                   kl_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """sum(ce_weights * CE) and sum(kl_mask * KL(student || teacher)) over all tokens.

  The LM head runs ``chunk`` tokens at a time under jax.checkpoint, so neither the forward nor
  the backward ever holds [tokens, vocab] logits (20 GB in float32 at 32K x 152K).
  """
  width = hidden.shape[-1]
  n = targets.size
  padded = -(-n // chunk) * chunk

  def flat(x, trailing=()):
    x = x.reshape((n,) + trailing)
    return jnp.pad(x, ((0, padded - n),) + ((0, 0),) * len(trailing)).reshape(
        (padded // chunk, chunk) + trailing)

  distill = teacher is not None
  xs = (flat(hidden, (width,)), flat(targets), flat(ce_weights.astype(jnp.float32)))
  if distill:
    xs += (flat(jax.lax.stop_gradient(teacher_hidden), (width,)),
           flat(kl_mask.astype(jnp.float32)))

  @jax.checkpoint
  def chunk_losses(x):
    log_p = jax.nn.log_softmax(model.logits(x[0]), axis=-1)
    ce = -jnp.take_along_axis(log_p, x[1][:, None], axis=-1)[:, 0]
    ce_sum = jnp.sum(x[2] * ce)
    if not distill:
      return ce_sum, jnp.zeros((), jnp.float32)
    log_q = jax.lax.stop_gradient(jax.nn.log_softmax(teacher.logits(x[3]), axis=-1))
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return ce_sum, jnp.sum(x[4] * kl)

  def step(totals, x):
    ce, kl = chunk_losses(x)
    return (totals[0] + ce, totals[1] + kl), None

  zero = jnp.zeros((), jnp.float32)
  (ce_sum, kl_sum), _ = jax.lax.scan(step, (zero, zero), xs)
  return ce_sum, kl_sum


def _weights(views: Views, scored: jax.Array):
  """Per-token CE weights (masked / t), the KL mask and the number of scored tokens."""
  scored = jnp.broadcast_to(scored, views.masked.shape)
  kl_mask = views.masked & scored
  return jnp.where(kl_mask, 1.0 / views.noise, 0.0), kl_mask, jnp.sum(scored)


def pretrain_loss(model: Transformer, views: Views, *, chunk: int,
                  remat: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The block-diffusion loss of one micro-batch through the exact training attention."""
  cfg = model.config
  attend = attention.make_training_attend(cfg.block_size)
  h_noisy, h_clean, _ = doubled_forward(model, views.noisy, views.clean, attend, None,
                                        remat=remat)
  hidden, scored = predicting_hidden(h_noisy, h_clean, cfg.block_size, cfg.token_shift)
  ce_weights, _, count = _weights(views, scored)
  ce_sum, _ = chunked_losses(model, hidden, views.clean, ce_weights, chunk=chunk)
  ce = ce_sum / count
  return ce, {"loss": ce, "ce": ce, "kl": jnp.zeros_like(ce)}


def select_keys(model: Transformer, views: Views, *, budget: int, dense_layers: int,
                selection_queries: str, alpha_includes_block: bool, score_chunk: int,
                num_views: int) -> tuple[Any, ...]:
  """MAGE-FT step (1): per layer, the BlockSelection of every noisy block (None if dense).

  With "all_mask" selection the noisy half is all mask tokens, so both views of a sequence
  select the same keys: the pass runs once per sequence and its result is repeated.
  """
  cfg = model.config
  attend = attention.make_selection_attend(
      cfg.block_size, budget, dense_layers, alpha_includes_block=alpha_includes_block,
      chunk=score_chunk)
  if selection_queries == "all_mask":
    clean = views.clean[:views.clean.shape[0] // num_views]
    _, _, selections = doubled_forward(model, jnp.full_like(clean, cfg.mask_token_id), clean,
                                       attend, ())
    repeat = lambda x: jnp.concatenate([x] * num_views)
    selections = jax.tree.map(repeat, selections)
  else:
    _, _, selections = doubled_forward(model, views.noisy, views.clean, attend, ())
  return jax.lax.stop_gradient(selections)


class TeacherStates(NamedTuple):
  """MAGE-FT step (3)'s outputs: what the student is compared with (no gradient).

  Attributes:
    hidden: the frozen teacher's exact predicting hidden states [V*b, L, width].
    keys: per layer, the exact x_t pass's NoisyKeys (None for dense layers): the selection
      loss's target; () when that loss is off.
  """

  hidden: jax.Array
  keys: tuple[Any, ...] = ()


def teacher_states(teacher: Transformer, views: Views, *,
                   selection_dense_layers: int | None = None) -> TeacherStates:
  """MAGE-FT step (3): the frozen teacher's exact forward, no gradient. With
  ``selection_dense_layers`` it also keeps the queries and keys of every layer from that one on
  (the selection loss's target: the attention of x_t's queries, i.e. of the later steps)."""
  cfg = teacher.config
  if selection_dense_layers is None:
    attend, carry = attention.make_training_attend(cfg.block_size), None
  else:
    attend, carry = attention.make_capture_attend(cfg.block_size, selection_dense_layers), ()
  h_noisy, h_clean, keys = doubled_forward(teacher, views.noisy, views.clean, attend, carry)
  hidden, _ = predicting_hidden(h_noisy, h_clean, cfg.block_size, cfg.token_shift)
  return jax.lax.stop_gradient(TeacherStates(hidden, keys or ()))


def selection_loss(model: Transformer, views: Views, budget: int, target_keys: tuple[Any, ...],
                   *, alpha_includes_block: bool, score_chunk: int, num_views: int,
                   remat: bool) -> jax.Array:
  """MAGE-FT's selection-aware term: KL(later steps' alpha || All-[MASK] step's alpha).

  The student's All-[MASK] pass (a fully masked noisy half over the clean sequence, exact
  attention, with gradient) gives, per sparse layer, noisy block and KV head, alpha over the
  block's earlier clean keys: the statistic MAGE's first step ranks them by. The target is the
  same alpha of the teacher's exact x_t pass (``target_keys``, from teacher_states), the
  attention the later denoising steps pay. Mean over sparse layers, rows, KV heads and the
  blocks that see more than ``budget`` clean keys (for the others top-k keeps every key, so the
  ranking does not matter); 0, and no pass, when there are none. The All-[MASK] pass runs once
  per sequence (the ``num_views`` views of a sequence share their clean tokens).
  """
  cfg = model.config
  sparse_layers = sum(keys is not None for keys in target_keys)
  blocks = views.clean.shape[1] // cfg.block_size
  counted_blocks = sum(n * cfg.block_size > budget for n in range(blocks))
  if not sparse_layers * counted_blocks:
    return jnp.zeros((), jnp.float32)
  clean = views.clean[:views.clean.shape[0] // num_views]
  attend = attention.make_selection_loss_attend(
      cfg.block_size, budget, target_keys, include_block=alpha_includes_block,
      chunk=score_chunk)
  _, _, total = doubled_forward(model, jnp.full_like(clean, cfg.mask_token_id), clean, attend,
                                jnp.zeros((), jnp.float32), remat=remat)
  return total / (sparse_layers * views.clean.shape[0] * cfg.num_kv_heads * counted_blocks)


def selfdistill_loss(model: Transformer, teacher: Transformer, views: Views,
                     selections: tuple[Any, ...], teacher_outputs: TeacherStates, *,
                     kl_weight: float, chunk: int, remat: bool, selection_weight: float = 0.0,
                     alpha_includes_block: bool = True, score_chunk: int = 256,
                     num_views: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MAGE-FT step (2) and the loss: the sparse student against the exact teacher.

  Loss = CE + kl_weight * KL, plus selection_weight * selection_loss when that is > 0 (then
  ``teacher_outputs`` must hold the teacher's keys; the metrics add "sel"). At 0 nothing of
  the selection loss is traced.
  """
  cfg = model.config
  if selection_weight > 0 and len(teacher_outputs.keys) != cfg.num_layers:
    raise ValueError("selection_weight > 0 needs the teacher's keys: teacher_states(..., "
                     "selection_dense_layers=...)")
  attend = attention.make_sparse_training_attend(cfg.block_size)
  h_noisy, h_clean, _ = doubled_forward(model, views.noisy, views.clean, attend, selections,
                                        remat=remat)
  hidden, scored = predicting_hidden(h_noisy, h_clean, cfg.block_size, cfg.token_shift)
  ce_weights, kl_mask, count = _weights(views, scored)
  ce_sum, kl_sum = chunked_losses(model, hidden, views.clean, ce_weights, chunk=chunk,
                                  teacher=teacher, teacher_hidden=teacher_outputs.hidden,
                                  kl_mask=kl_mask)
  ce = ce_sum / count
  kl = kl_sum / jnp.maximum(jnp.sum(kl_mask), 1)
  loss = ce + kl_weight * kl
  metrics = {"ce": ce, "kl": kl}
  if selection_weight > 0:
    budget = next((s.indices.shape[-1] for s in selections if s is not None), 0)
    sel = selection_loss(model, views, budget, teacher_outputs.keys,
                         alpha_includes_block=alpha_includes_block, score_chunk=score_chunk,
                         num_views=num_views, remat=remat)
    loss = loss + selection_weight * sel
    metrics["sel"] = sel
  return loss, {"loss": loss, **metrics}
