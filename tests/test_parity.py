"""Parity with transformers' Qwen2 / Qwen3 modeling code on committed golden logits.

The fixtures (tests/fixtures/parity/<name>/) are checkpoints written by transformers' own
save_pretrained and the logits its model computed (tests/make_golden_logits.py). Comparing
against them needs no torch, so CI checks the name map, RoPE, norms, biases and heads on every
run. Transformers models are causal; ours is block-causal, which is causal at block_size 1.
When torch and transformers are installed, two more checks run: the script still reproduces the
committed logits, and our export loads in transformers and gives the same logits.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.checkpoint import load_pretrained, save_pretrained
from mage_jax.generate import forward_write
from mage_jax.kv_cache import init_cache
from mage_jax.methods.exact import ExactAttention

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "parity")
NAMES = ("qwen2_tied", "qwen3_untied")
CAUSAL = {"block_size": 1, "sub_block_size": 1}
HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def _golden(name: str) -> tuple[np.ndarray, np.ndarray]:
  with np.load(os.path.join(FIXTURES, name, "golden_logits.npz")) as golden:
    return golden["tokens"], golden["logits"]


def _logits(model, cfg, tokens: np.ndarray) -> np.ndarray:
  """Logits of every position of ``tokens`` [batch, seq], written from an empty cache."""
  batch, seq = tokens.shape
  method = ExactAttention()
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  hidden, _, _ = forward_write(model, jnp.asarray(tokens), positions, jnp.ones((batch, seq), bool),
                               init_cache(cfg, batch, seq), method,
                               method.init_state(cfg, batch, seq))
  return np.asarray(model.logits(hidden))


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
  tokens, expected = _golden(name)
  model, cfg = load_pretrained(os.path.join(FIXTURES, name), config_overrides=CAUSAL)
  assert cfg.dtype == "float32" and cfg.rope_theta == 1e6 and cfg.mask_token_id == 3
  assert cfg.qk_norm == name.startswith("qwen3") and cfg.attention_bias == name.startswith("qwen2")
  assert cfg.tie_word_embeddings == name.endswith("_tied")
  np.testing.assert_allclose(_logits(model, cfg, tokens), expected, rtol=1e-5, atol=1e-5)


def test_golden_logits_are_not_trivial():
  """Near-uniform attention or near-zero logits would let layout mistakes pass unnoticed."""
  for name in NAMES:
    tokens, logits = _golden(name)
    assert tokens.shape == (2, 20) and logits.shape == (2, 20, 128)
    assert logits.std() > 0.5
    assert np.mean(np.argmax(logits[0], -1) == np.argmax(logits[1], -1)) < 0.5


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch and transformers")
def test_script_reproduces_committed_fixture(tmp_path):
  subprocess.run([sys.executable, os.path.join(HERE, "make_golden_logits.py"), "--out",
                  str(tmp_path)], check=True, capture_output=True)
  for name in NAMES:
    tokens, logits = _golden(name)
    with np.load(tmp_path / name / "golden_logits.npz") as fresh:
      np.testing.assert_array_equal(fresh["tokens"], tokens)
      np.testing.assert_allclose(fresh["logits"], logits, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch and transformers")
@pytest.mark.parametrize("name", NAMES)
def test_export_loads_in_transformers(name, tmp_path):
  import torch
  import transformers

  tokens, expected = _golden(name)
  model, _ = load_pretrained(os.path.join(FIXTURES, name))
  save_pretrained(model, tmp_path, max_shard_bytes=100_000)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  hf_model.eval()
  with torch.no_grad():
    logits = hf_model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
