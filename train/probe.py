"""Retrieval probes: does a model copy, and does it find needles? Watch these, not the loss.

A model learning retrieval from scratch sits on a loss plateau long before its answer tokens
move, and answer tokens are a few percent of the loss, so the total loss says little. These
probes read the training view (the ``[x_t | x_0]`` forward of train.objective) on fresh
documents and score masked tokens only:

- copy: ``repeat`` documents (a passage of random words, then the same passage): accuracy on
  masked tokens of the first copy (no help from copying) and of the second (copying gives 100%);
  a model with induction heads shows a gap.
- needles: ``niah_drill`` documents: accuracy on the answer digits, masked all at once (the
  first denoising step of an answer block) and every other one (the neighbours shown).

    python -m train.probe --checkpoint=models/default --context=512
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from mage_jax.model import Transformer
from mage_jax.tasks import haystack, niah
from pallas_kernels.dispatch import active_impl, use_kernels
from train import attention, objective

# Probe documents draw seeds here: apart from eval seeds (< 10**6) and training seeds.
PROBE_SEED = "probe"


def _pad(rows: Sequence[Sequence[int]], masks: Sequence[np.ndarray], multiple: int):
  length = -(-max(map(len, rows)) // multiple) * multiple
  tokens = np.zeros((len(rows), length), np.int32)
  scored = np.zeros((len(rows), length), bool)
  for r, (ids, mask) in enumerate(zip(rows, masks)):
    tokens[r, :len(ids)] = ids
    scored[r, :len(mask)] = mask
  return jnp.asarray(tokens), jnp.asarray(scored)


def masked_predictions(model: Transformer, tokens: jax.Array, masked: jax.Array) -> jax.Array:
  """The training view's argmax at every position, ``masked`` tokens replaced by the mask id
  (tokens, masked: [batch, L], L a multiple of the block size). Compiled once per shape and
  kernel setting; the probe documents are fixed, so a run compiles it once per probe."""
  return _masked_predictions(model, tokens, masked, impl=active_impl())


@functools.partial(nnx.jit, static_argnames="impl")
def _masked_predictions(model: Transformer, tokens: jax.Array, masked: jax.Array, *,
                        impl: str) -> jax.Array:
  cfg = model.config
  noisy = jnp.where(masked, cfg.mask_token_id, tokens)
  with use_kernels(impl):
    h_noisy, h_clean, _ = objective.doubled_forward(
        model, noisy, tokens, attention.make_training_attend(cfg.block_size), None)
  hidden, _ = objective.predicting_hidden(h_noisy, h_clean, cfg.block_size, cfg.token_shift)
  return jnp.argmax(model.logits(hidden), axis=-1)


def _accuracy(predictions: jax.Array, tokens: jax.Array, scored: jax.Array) -> float:
  right = (predictions == tokens) & scored
  return float(jnp.sum(right) / jnp.maximum(jnp.sum(scored), 1))


def masked_accuracy(model: Transformer, tokens: jax.Array, masked: jax.Array,
                    scored: jax.Array) -> float:
  """Accuracy of the training view's argmax on ``scored`` tokens, ``masked`` ones replaced by
  the mask id."""
  return _accuracy(masked_predictions(model, tokens, masked), tokens, scored)


def _token_counter(tokenizer: tokenizers.Tokenizer):
  return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def copy_documents(tokenizer: tokenizers.Tokenizer, *, context: int, docs: int,
                   multiple: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``repeat`` documents as (tokens, first, second) [docs, L]: the token ids (L padded to a
  multiple of ``multiple``), and the positions scored in the first copy and in the repetition
  (whose tokens equal the first copy's, shifted)."""
  count = _token_counter(tokenizer)
  rows, first_masks, second_masks = [], [], []
  for i in range(docs):
    text = haystack.repeated_passage(context, seed=PROBE_SEED, index=i, count_tokens=count)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    half = count(text.split("\n\n")[0])
    positions = np.arange(len(ids))
    # The first token of each copy is spelled differently ("▁w" vs "w" after the newline).
    first_masks.append((positions >= 1) & (positions < half))
    second_masks.append(positions >= half + 2)
    rows.append(ids)
  tokens, first = _pad(rows, first_masks, multiple)
  _, second = _pad(rows, second_masks, multiple)
  return tokens, first, second


def copy_probe(model: Transformer, tokenizer: tokenizers.Tokenizer, *, context: int,
               docs: int = 4, mask_rate: float = 0.3) -> dict[str, float]:
  """Masked-token accuracy in the first and the repeated half of ``repeat`` documents."""
  tokens, first, second = copy_documents(tokenizer, context=context, docs=docs,
                                         multiple=model.config.block_size)
  masked = jnp.asarray(np.random.default_rng(0).random(tokens.shape) < mask_rate)
  predictions = masked_predictions(model, tokens, masked)  # one forward, both halves
  return {"copy_first_half": _accuracy(predictions, tokens, masked & first),
          "copy_second_half": _accuracy(predictions, tokens, masked & second)}


def needle_documents(tokenizer: tokenizers.Tokenizer, *, context: int, needles: int, docs: int,
                     multiple: int) -> tuple[jax.Array, jax.Array]:
  """``niah_drill`` documents as (tokens, answer digits) [docs, L]."""
  count = _token_counter(tokenizer)
  rows, answer_masks = [], []
  for i in range(docs):
    text = niah.recall_drill_text(context, needles, seed=PROBE_SEED, index=i,
                                  count_tokens=count)
    answers_from = text.index(" mentioned in the text is")  # the first answer
    encoding = tokenizer.encode(text, add_special_tokens=False)
    in_answers = np.array([start >= answers_from for start, _ in encoding.offsets])
    is_digit = np.array([t.isdigit() for t in encoding.tokens])  # digit groups too
    rows.append(encoding.ids)
    answer_masks.append(in_answers & is_digit)
  return _pad(rows, answer_masks, multiple)


def needle_probe(model: Transformer, tokenizer: tokenizers.Tokenizer, *, context: int,
                 needles: int = 4, docs: int = 4) -> dict[str, float]:
  """Answer-digit accuracy on ``niah_drill`` documents (every needle asked after the prompt)."""
  tokens, answers = needle_documents(tokenizer, context=context, needles=needles, docs=docs,
                                     multiple=model.config.block_size)
  alternate = answers & (jnp.arange(tokens.shape[1]) % 2 == 0)
  return {"needle_digits_all_masked": masked_accuracy(model, tokens, answers, answers),
          "needle_digits_alternate": masked_accuracy(model, tokens, alternate, alternate)}


def run_probes(model: Transformer, tokenizer: tokenizers.Tokenizer, *, context: int,
               docs: int = 4) -> dict[str, float]:
  """Both probes on documents of ``context`` tokens (needles: one per 64 tokens, at most 4)."""
  needles = max(1, min(4, context // 64))
  return {**copy_probe(model, tokenizer, context=context, docs=docs),
          **needle_probe(model, tokenizer, context=context, needles=needles, docs=docs)}


def main(argv: Sequence[str]) -> None:
  from absl import flags

  from mage_jax import checkpoint as hf_checkpoint

  flags.DEFINE_string("checkpoint", "models/default", "Hugging Face checkpoint directory")
  flags.DEFINE_integer("context", 512, "document length in tokens")
  flags.DEFINE_integer("docs", 4, "documents per probe")
  flags.FLAGS(argv)
  f = flags.FLAGS
  model, _ = hf_checkpoint.load_pretrained(f.checkpoint)
  tokenizer = tokenizers.Tokenizer.from_file(f"{f.checkpoint}/tokenizer.json")
  result = {"checkpoint": f.checkpoint, "context": f.context,
            **run_probes(model, tokenizer, context=f.context, docs=f.docs)}
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv)
