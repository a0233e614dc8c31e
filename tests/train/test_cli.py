"""The command line reports every bad input as one clear line, without a traceback."""

import json
import os
import subprocess
import sys

import pytest

REPO = __file__.rsplit("/tests/", 1)[0]


def _run(*args, env=None):
  return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=env)


@pytest.fixture
def config_file(tmp_path, run_config):
  del run_config  # only for its corpus in tmp_path
  path = tmp_path / "run.json"
  path.write_text(json.dumps({
      "model": "tiny_qwen2", "workdir": str(tmp_path / "run"), "steps": 1, "seq_len": 32,
      "data": {"sources": [{"kind": "files", "paths": [str(tmp_path / "cycle.jsonl")]}]}}))
  return path


@pytest.mark.parametrize("args, message", [
    (["--mode=finetune", "--config=x.json"], "flag --mode=finetune: value should be one of"),
    (["--mode=pretrain"], "--config is required"),
    (["--mode=pretrain", "--config=/nonexistent.json"], "cannot read training config"),
    (["--mode=pretrain", "--config={cfg}", "--steps=zero"], "flag --steps=zero"),
    (["--mode=pretrain", "--config={cfg}", "--set", "optim.lr=1"], "unknown field 'lr'"),
    (["--mode=pretrain", "--config={cfg}", "--set", "seq_len=30"],
     "seq_len: 30 is not a positive multiple of block_size=8"),
    (["--mode=pretrain", "--config={cfg}", "--model=no_such_preset"], "unknown preset"),
    (["--mode=pretrain", "--config={cfg}", "--set", "data.sources=[{\"kind\": \"files\", "
      "\"paths\": [\"/missing.jsonl\"]}]"], "cannot read /missing.jsonl"),
])
def test_bad_input_gives_one_line(config_file, args, message):
  result = _run(*(a.replace("{cfg}", str(config_file)) for a in args))
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("mage-train: error: ") and message in lines[0], lines[0]


def test_deterministic_flag_sets_xla_flags_and_trains(config_file):
  from train.__main__ import with_deterministic_ops
  from train.config import ConfigError

  assert with_deterministic_ops("") == "--xla_gpu_deterministic_ops=true"
  assert (with_deterministic_ops("--xla_dump_to=/tmp/d")
          == "--xla_dump_to=/tmp/d --xla_gpu_deterministic_ops=true")
  kept = "--xla_gpu_deterministic_ops=true --xla_dump_to=/tmp/d"
  assert with_deterministic_ops(kept) == kept
  with pytest.raises(ConfigError, match="conflicts with --xla_gpu_deterministic_ops=false"):
    with_deterministic_ops("--xla_gpu_deterministic_ops=false")
  # XLA knows the flag on every backend (an unknown XLA_FLAGS entry aborts the process).
  result = _run("--mode=pretrain", f"--config={config_file}", "--deterministic")
  assert result.returncode == 0, result.stderr
  # The command line applies it to the process's XLA_FLAGS (here: refuses the contradiction).
  env = {**os.environ, "XLA_FLAGS": "--xla_gpu_deterministic_ops=false"}
  result = _run("--mode=pretrain", f"--config={config_file}", "--deterministic", env=env)
  assert result.returncode == 2 and "conflicts with" in result.stderr, result.stderr
