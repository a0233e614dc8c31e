"""eval accepts any context the checkpoint's positions hold, and refuses a longer one up front,
in one line naming the limit (not a traceback from the cache after the model loaded)."""

import pytest

from eval import runner
from mage_jax import ModelConfig
from mage_jax.tasks import niah, ruler
from mage_jax.tasks.sample import count_words

WORDS = runner.Tokenizer(encode=lambda text: text.split(), decode=" ".join)


def _config(max_positions: int) -> ModelConfig:
  return ModelConfig.preset("tiny_qwen2", block_size=32, sub_block_size=8,
                            max_position_embeddings=max_positions)


def test_8k_to_32k_prompts_fit_a_model_with_131072_positions():
  samples = []
  for length in (8192, 32768):
    samples += niah.niah_grid([length], [0.0, 1.0], num_samples=1, seed=0,
                              count_tokens=count_words)
    samples += ruler.ruler_samples("ruler_niah_multikey", [length], num_samples=1, seed=0,
                                   count_tokens=count_words)
    assert all(0.99 * length < count_words(s.prompt()) <= length for s in samples[-3:])
  runner.check_context_fits(_config(131072), WORDS, samples, "ckpt")


def test_a_prompt_fits_exactly_its_positions_and_one_fewer_is_refused():
  (sample,) = niah.niah_grid([8192], [0.5], num_samples=1, seed=0, count_tokens=count_words)
  # The prompt and its answer, rounded up to whole blocks of 32 (generate.plan_request).
  need = -(-(count_words(sample.prompt()) + sample.max_new_tokens) // 32) * 32
  runner.check_context_fits(_config(need), WORDS, [sample], "ckpt")
  with pytest.raises(ValueError, match=rf"^--context_lengths: 8192 needs {need} positions .* "
                                       rf"max_position_embeddings={need - 1} of ckpt$"):
    runner.check_context_fits(_config(need - 1), WORDS, [sample], "ckpt")
