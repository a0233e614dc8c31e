"""Shared helpers: a tiny run configuration on a learnable synthetic corpus."""

import json

import pytest

from train import config as config_lib

# A successor language: each document walks a cycle of words from a random start, so a masked
# word is determined by its neighbours and a small model can drive the loss far down.
_CYCLE = [f"w{i}" for i in range(12)]


def write_cycle_corpus(path, num_docs: int = 200, length: int = 40) -> None:
  with open(path, "w") as f:
    for d in range(num_docs):
      start = (d * 7) % len(_CYCLE)
      words = [_CYCLE[(start + i) % len(_CYCLE)] for i in range(length)]
      f.write(json.dumps({"text": " ".join(words)}) + "\n")


@pytest.fixture
def run_config(tmp_path):
  """Returns make(**overrides) -> TrainConfig of a tiny float32 model on the cycle corpus."""
  corpus = tmp_path / "cycle.jsonl"
  write_cycle_corpus(corpus)

  def make(**overrides):
    raw = {
        "model": "tiny_qwen2",
        "model_overrides": {"vocab_size": 32, "dtype": "float32"},
        "workdir": str(tmp_path / "run"),
        "steps": 12,
        "seq_len": 32,
        "log_every": 4,
        "progress_bar": False,
        "loss_chunk": 64,
        "optim": {"batch_size": 4, "grad_accum": 2, "warmup_steps": 2,
                  "learning_rate": 3e-3},
        "mage": {"budget": 8, "dense_layers": 1},
        "checkpoint": {"every": 2, "max_to_keep": 2},
        "data": {"sources": [{"kind": "files", "paths": [str(corpus)]}]},
    }
    return config_lib.from_dict(config_lib.apply_overrides(raw, overrides))

  return make
