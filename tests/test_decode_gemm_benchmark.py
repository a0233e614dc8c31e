"""benchmarks/decode_gemm.py end to end at toy sizes on the CPU (interpret-mode kernel): its
numbers mean something only on the GPU; this keeps the script working between device sessions."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import decode_gemm  # noqa: E402  (benchmarks/decode_gemm.py)


def test_benchmark_checks_sweeps_and_tables_each_shape(tmp_path):
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "decode_gemm.py"), "--toy",
       "--models=toy", "--ops=qkv,down,head", "--rows=32", "--reps=2", "--timings=1",
       "--grid=[{\"block_n\": 16, \"split_k\": 2}, {\"block_n\": 64}]", f"--out={tmp_path}"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "checks: 6 ok, 0 failed" in done.stdout
  with open(tmp_path / "decode_gemm.json") as f:
    report = json.load(f)
  assert [(c["op"], c["rows"]) for c in report["checks"]] == [
      (op, rows) for op in ("qkv", "down", "head") for rows in (32, 96)]
  assert all(c["kernel_token_match"] == 1.0 for c in report["checks"] if c["op"] == "head")
  table = report["table"]
  assert [r["op"] for r in table] == ["qkv", "down", "head"]
  for r in table:
    assert r["xla_us"] > 0 and r["kernel_us"] > 0 and r["floor_us"] > 0, r
    # Launches equal to the defaults are timed once, under the defaults: down's default
    # block_n is 64; qkv's rotary-pair tiles need block_n >= 32 (the first entry is dropped)
    # and lie inside a toy head of 32 (64 fits to 32: its default); the head's default
    # block_n is 128, without split_k.
    want = {"qkv": [], "down": [{"block_n": 16, "split_k": 2}],
            "head": [{"block_n": 16}, {"block_n": 64}]}[r["op"]]
    assert [{k: v for k, v in s.items() if k not in ("us", "ok")} for s in r["sweep"]] == want
    assert all(s["ok"] for s in r["sweep"]), r  # every timed launch checked correct
    assert r["best_us"] == min([r["kernel_us"]] + [s["us"] for s in r["sweep"]])
  assert "| toy | down | 32 | 48 x 64 |" in (tmp_path / "decode_gemm.md").read_text()


def test_cases_have_the_models_projection_shapes():
  shapes = {(c.model, c.op, c.rows): (c.k, c.n) for c in decode_gemm.cases(["1.5B", "7B"], [32])}
  assert shapes[("1.5B", "qkv", 32)] == (1536, 2048)
  assert shapes[("1.5B", "swiglu", 32)] == (1536, 8960)
  assert shapes[("1.5B", "head", 32)] == (1536, 151936)
  assert shapes[("1.5B", "o_proj", 32)] == (1536, 1536)
  assert shapes[("7B", "qkv", 32)] == (3584, 4608)
  assert shapes[("7B", "down", 32)] == (18944, 3584)
  qkv = decode_gemm.Case("1.5B", "qkv", 32, 1536, 2048)
  # w + x + out + norm weight + bias, bf16.
  assert qkv.bytes_moved() == 2 * (1536 * 2048 + 32 * 1536 + 32 * 2048 + 1536 + 2048)
  assert qkv.widths == (1536, 256, 256)
  down = decode_gemm.Case("1.5B", "down", 32, 8960, 1536)
  assert down.bytes_moved() == 2 * (8960 * 1536 + 32 * 8960 + 2 * 32 * 1536)  # + residual
  swiglu = decode_gemm.Case("1.5B", "swiglu", 32, 1536, 8960)
  # Gate and up weights, x, the activation out, the norm weight.
  assert swiglu.bytes_moved() == 2 * (1536 * 2 * 8960 + 32 * 1536 + 32 * 8960 + 1536)
  assert swiglu.flops() == 2 * 32 * 1536 * 2 * 8960
  head = decode_gemm.Case("1.5B", "head", 32, 1536, 151936)
  # The weight and x in bf16; a token and a confidence per row.
  assert head.bytes_moved() == 2 * (1536 * 151936 + 32 * 1536) + 8 * 32
