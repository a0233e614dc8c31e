"""The command line reports every bad input as one clear line, without a traceback."""

import json
import subprocess
import sys

import pytest

REPO = __file__.rsplit("/tests/", 1)[0]


def _run(*args):
  return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120)


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
