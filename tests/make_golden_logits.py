"""Writes the parity fixtures: tiny random Qwen2 / Qwen3 checkpoints and their transformers logits.

Run from the repository root (needs torch and transformers >= 4.51, which has Qwen3):

    python tests/make_golden_logits.py [--out tests/fixtures/parity]

Each fixture directory holds the checkpoint exactly as transformers' save_pretrained writes it
(config.json, safetensors; the Qwen3 one sharded with an index) and golden_logits.npz with
``tokens`` int32 [batch, seq] and transformers' float32 ``logits`` [batch, seq, vocab].
tests/test_parity.py checks mage_jax against these without torch, and reruns this script when
torch is installed to check the committed logits still come out of it.

Weights are drawn from numpy (not torch's generator) with a fixed seed, scaled by
1 / sqrt(fan in) so activations and logits stay O(1): with the usual 0.02 init a 64-wide model
has near-uniform attention and near-zero logits, which would hide RoPE, bias or norm mistakes.
Norm weights and biases are nonzero and non-trivial for the same reason. Two layouts cover both
head paths: Qwen2 with tied embeddings (as Fast-dLLM v2 1.5B) and Qwen3 with an untied lm_head
(as SDAR 8B).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import transformers

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "parity")
SEQ_LEN = 20
BATCH = 2
SEED = 0

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=64,
    eos_token_id=2,
    pad_token_id=0,
    mask_token_id=3,  # read by mage_jax; transformers keeps it as an extra config attribute
)

VARIANTS = {
    "qwen2_tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                   dict(tie_word_embeddings=True), None),
    "qwen3_untied": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                     dict(tie_word_embeddings=False, attention_bias=False), "150KB"),
}


def _randomize(model: torch.nn.Module, rng: np.random.Generator) -> None:
  """Overwrites every parameter (tied ones once) with O(1)-activation random values."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      shape = tuple(param.shape)
      if name.endswith("norm.weight"):
        value = 1.0 + 0.3 * rng.standard_normal(shape)
      elif name.endswith(".bias"):
        value = 0.5 * rng.standard_normal(shape)
      else:  # a Linear weight [out, in], or the embedding (also the tied head) [vocab, embed]
        value = rng.standard_normal(shape) / np.sqrt(shape[1])
      param.copy_(torch.from_numpy(value.astype(np.float32)))


def make_fixture(name: str, out_dir: str) -> None:
  config_cls, model_cls, extra, max_shard_size = VARIANTS[name]
  rng = np.random.default_rng([SEED, list(VARIANTS).index(name)])
  config = config_cls(**_COMMON, **extra)
  config._attn_implementation = "eager"
  model = model_cls(config).to(torch.float32).eval()
  _randomize(model, rng)
  tokens = rng.integers(0, config.vocab_size, size=(BATCH, SEQ_LEN), dtype=np.int32)
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()
  path = os.path.join(out_dir, name)
  kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
  model.save_pretrained(path, safe_serialization=True, **kwargs)
  np.savez(os.path.join(path, "golden_logits.npz"), tokens=tokens, logits=logits)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=FIXTURES, help="directory of the fixture directories")
  args = parser.parse_args()
  torch.manual_seed(SEED)  # only model construction draws from torch; its values are replaced
  for name in VARIANTS:
    make_fixture(name, args.out)
    print(f"wrote {os.path.join(args.out, name)} (transformers {transformers.__version__}, "
          f"torch {torch.__version__})")


if __name__ == "__main__":
  main()
