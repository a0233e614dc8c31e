"""The retrieval probes score the tokens they claim to score."""

import re

import numpy as np
import pytest

from mage_jax import ModelConfig
from mage_jax.model import build_model
from mage_jax.tasks import niah
from train import config as config_lib
from train import data as data_lib
from train import probe


def _tokenizer(model_cfg, digits_per_token=1):
  sources = (config_lib.SourceConfig(kind="niah_drill", context_tokens=400),
             config_lib.SourceConfig(kind="repeat", context_tokens=400))
  texts = data_lib._vocabulary_texts(config_lib.DataConfig(sources=sources), 512)
  return data_lib.build_word_tokenizer(model_cfg, texts, digits_per_token)


def test_copy_documents_score_the_repetition_against_the_first_copy():
  model_cfg = ModelConfig.preset("tiny_qwen2", vocab_size=512)
  tokenizer = _tokenizer(model_cfg)
  tokens, first, second = probe.copy_documents(tokenizer, context=150, docs=3, multiple=8)
  tokens, first, second = map(np.asarray, (tokens, first, second))
  assert tokens.shape[1] % 8 == 0
  for row, f, s in zip(tokens, first, second):
    half = int(np.max(np.nonzero(f))) + 1
    repeated = np.nonzero(s)[0]
    assert len(repeated) == half - 1  # every token of the copy but its first
    np.testing.assert_array_equal(row[repeated], row[repeated - (half + 1)])
    assert not np.any(f & s)


@pytest.mark.parametrize("digits_per_token", [1, 3])
def test_needle_documents_score_exactly_the_answer_digits(digits_per_token):
  model_cfg = ModelConfig.preset("tiny_qwen2", vocab_size=1664)
  tokenizer = _tokenizer(model_cfg, digits_per_token)
  tokens, answers = probe.needle_documents(tokenizer, context=300, needles=3, docs=2,
                                           multiple=8)
  for d, (row, mask) in enumerate(zip(np.asarray(tokens), np.asarray(answers))):
    text = niah.recall_drill_text(
        300, 3, seed=probe.PROBE_SEED, index=d,
        count_tokens=lambda t: len(tokenizer.encode(t, add_special_tokens=False).ids))
    values = re.findall(r"mentioned in the text is (\d{7})", text)
    assert len(values) == 3
    groups = [tokenizer.id_to_token(int(t)) for t in row[mask]]
    assert "".join(groups) == "".join(values)
    assert len(groups) == 3 * (7 if digits_per_token == 1 else 3)  # 7 digits: 3 + 3 + 1


def test_probes_run_on_a_model_and_report_fractions():
  model_cfg = ModelConfig.preset("tiny_qwen2", vocab_size=512)
  tokenizer = _tokenizer(model_cfg)
  model = build_model(model_cfg)
  result = {**probe.copy_probe(model, tokenizer, context=120, docs=2),
            **probe.needle_probe(model, tokenizer, context=300, needles=2, docs=2)}
  assert set(result) == {"copy_first_half", "copy_second_half", "needle_digits_all_masked",
                         "needle_digits_alternate"}
  assert all(0.0 <= v <= 1.0 for v in result.values())
