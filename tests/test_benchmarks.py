"""The GPU benchmark scripts run end to end on the CPU at toy sizes (their numbers are only
meaningful on the GPU; this keeps the scripts from breaking between device sessions)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_decode_e2e_times_every_method_in_the_loop_and_rewrites_its_table(tmp_path):
  _run("decode_e2e.py", "--preset=tiny_qwen2", "--contexts=40,100", "--batches=2",
       "--methods=exact,mage,none,xla", "--layer_kernels=xla,fused", "--budget=16",
       "--loop_context=0", "--loop_steps=2", "--step_repeats=1", "--prefill_chunk=64",
       f"--out={tmp_path}")
  with open(tmp_path / "decode_e2e.json") as f:
    saved = json.load(f)
  steps = saved["steps"]
  assert [(r["method"], r["layers"], r["context"]) for r in steps] == [
      (m, layers, c) for m in ("exact", "mage", "none", "xla") for layers in ("xla", "fused")
      for c in (40, 100)]
  for r in steps:
    assert r["step_ms"] > 0 and r["first_step_ms"] > 0 and r["call_ms"] > 0, r
    assert r["floor_step_ms"] <= r["floor_first_ms"], r  # MAGE's later step reads less
  table = (tmp_path / "decode_e2e.md").read_text()
  assert "| mage | fused | 2 | 100 |" in table and "exact / this block" in table
  os.remove(tmp_path / "decode_e2e.md")
  _run("decode_e2e.py", f"--markdown_from={tmp_path / 'decode_e2e.json'}", f"--out={tmp_path}")
  assert (tmp_path / "decode_e2e.md").read_text() == table
  # A variant that failed (recorded by the run, which goes on) gets a row of its own.
  saved["steps"].append(dict(method="mage", layers="fused", batch=8,
                             error="JaxRuntimeError: triton\ncompile | failed"))
  (tmp_path / "decode_e2e.json").write_text(json.dumps(saved))
  _run("decode_e2e.py", f"--markdown_from={tmp_path / 'decode_e2e.json'}", f"--out={tmp_path}")
  rewritten = (tmp_path / "decode_e2e.md").read_text().splitlines()
  assert set(table.splitlines()) < set(rewritten)
  assert ("| mage | fused | 8 | failed: JaxRuntimeError: triton compile / failed |" + " - |" * 11
          in rewritten)


def test_step_profile_runs_a_variant_in_its_own_process(tmp_path):
  out = _run("step_profile.py", "--preset=tiny_qwen2", "--context=60", "--batches=1",
             "--methods=none,exact,mage", "--budget=16", "--variants=default", "--steps=2",
             "--repeats=1", f"--out={tmp_path}")
  with open(tmp_path / "step_profile.json") as f:
    rows = json.load(f)["rows"]
  assert [(r["variant"], r["method"]) for r in rows] == [
      ("default", m) for m in ("none", "exact", "mage")]
  assert all(r["loop_ms"] > 0 and r["call_ms"] > 0 for r in rows)
  assert "| default | 1 | mage |" in out


def test_gemm_layouts_times_both_layouts(tmp_path):
  _run("gemm_layouts.py", "--rows=8", "--layers=2", "--embed=32", "--mlp=48", "--q_out=32",
       "--kv_out=8", f"--out={tmp_path}")
  with open(tmp_path / "gemm_layouts.json") as f:
    rows = json.load(f)["rows"]
  assert {(r["group"], r["layout"]) for r in rows} == {
      (g, layout) for g in ("gate_up", "qkv") for layout in ("separate", "fused")}


def test_pretrain_step_times_each_width_and_batch_in_its_own_process(tmp_path):
  out = _run("pretrain_step.py",
             "--config=configs/train/default_model/s6_diffusion2048_numbers.json",
             "--batch_sizes=1", "--hidden_sizes=128,192", "--seq_len=64", "--steps=1",
             f"--out={tmp_path}")
  with open(tmp_path / "pretrain_step.json") as f:
    rows = json.load(f)["results"]
  assert [(r["batch"], r["hidden"], r["num_heads"], r["num_kv_heads"]) for r in rows] == [
      (1, 128, 2, 2), (1, 192, 3, 1)]
  assert all(r["step_s"] > 0 and r["flops"]["total"] > 0 and r["block_size"] == 32 for r in rows)
  assert [r["profiled"] for r in rows] == [True, False]  # the first variant only
  assert "| 1 | 192 | 3/1 |" in out


def test_decode_kernels_grid_choices():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import decode_kernels  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  assert decode_kernels.parse_grid("full") is None
  full = decode_kernels.exact_tunings(1, 12, 2, 32768)
  assert full[0] == {} and {"block_q": 128} in full and len(full) > 2
  assert decode_kernels.parse_grid("defaults") == [{}]
  chosen = decode_kernels.parse_grid('[{"block_q": 128}, {"num_warps": 8}]')
  assert chosen == [{"block_q": 128}, {"num_warps": 8}]
  for bad in ('{"block_q": 128}', "[{block_q: 128}]"):
    with pytest.raises(ValueError, match="--grid"):
      decode_kernels.parse_grid(bad)


def test_decode_kernels_names_an_unknown_model_before_any_work(tmp_path):
  done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "decode_kernels.py"),
                         "--mode=sweep_exact", "--models=1.5B,13B", f"--out={tmp_path}"],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and "--models: unknown ['13B']" in done.stderr
  assert not (tmp_path / "decode_kernels.log").exists()


_FAKE_NCU = '''#!/usr/bin/env python3
"""Stands in for Nsight Compute: prints the arguments it got and one kernel's details page."""
import sys
print("ARGS " + " ".join(sys.argv[1:]))
print("  block_attention_alpha (1, 2, 129)x(128, 1, 1), Context 1, Stream 14, Device 0, CC 9.0")
print("    Duration                         us        15.23")
print("    L2 Hit Rate                       %        19.34")
print("    Registers Per Thread    register/thread         175")
print("    Section: Launch Statistics")
print("    Achieved Occupancy                %        11.41")
'''


def test_ncu_kernels_profiles_each_entry_and_shape_and_summarises(tmp_path):
  fake = tmp_path / "ncu"
  fake.write_text(_FAKE_NCU)
  fake.chmod(0o755)
  out = _run("ncu_kernels.py", f"--ncu={fake}", "--entries=exact,mask_step",
             "--shapes=1.5B:1:32768,7B:8:16384", "--cache_control=none", f"--out={tmp_path}")
  names = [f"ncu_{e}_{s}_l2warm" for e in ("exact", "mask_step")
           for s in ("1.5B_b1_32768", "7B_b8_16384")]
  for name in names:
    text = (tmp_path / f"{name}.txt").read_text()
    entry = name.split("_")[1] if "exact" in name else "mask_step"
    # The second call of the entry point is profiled: skip and count its launches.
    launches = {"exact": 2, "mask_step": 3}[entry]
    assert f"--launch-skip {launches} --launch-count {launches}" in text
    assert "--cache-control none" in text and f"--child={entry}@" in text
    assert f"== {name} (rc 0)" in out
  assert out.count("Duration  us  15.23") == 4 and "Achieved Occupancy  %  11.41" in out
  assert "Section: Launch Statistics" not in out  # only the deciding lines


def test_ncu_kernels_names_a_bad_shape():
  done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ncu_kernels.py"),
                         "--shapes=1.5B:1"], capture_output=True, text=True, timeout=60)
  assert done.returncode != 0 and "--shapes entries are MODEL:BATCH:CACHE" in done.stderr
  done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ncu_kernels.py"),
                         "--shapes=13B:1:4096"], capture_output=True, text=True, timeout=60)
  assert done.returncode != 0 and "'13B:1:4096' needs a model of" in done.stderr



def test_train_step_times_each_subset_and_searches_the_largest_fitting_length(tmp_path):
  out = _run("train_step.py", "--models=tiny_qwen2", "--trainable=lora", "--seq_lens=64",
             "--fit_lens=128", "--steps=1", "--budget=16", "--dense_layers=1", "--lora_rank=4",
             "--split_views", f"--out={tmp_path}")
  with open(tmp_path / "train_step.json") as f:
    saved = json.load(f)
  rows = saved["results"]
  assert [(r["model"], r["trainable"], r["seq_len"]) for r in rows] == [
      ("tiny_qwen2", "lora", 64), ("tiny_qwen2", "lora", 128)]
  # rank 4 on q/k/v/o of 2 layers: 4 x (in + out) per target
  assert all(r["trainable_params"] == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32)) for r in rows)
  assert all(r["step_s"] > 0 and r["estimate_gib"] > 0 and r["lora_rank"] == 4
             and r["split_views"] for r in rows)
  assert saved["fits"] == [{"model": "tiny_qwen2", "trainable": "lora", "largest_fitting": 128,
                            "smallest_failing": None}]
  assert "| tiny_qwen2 | lora | 128 | not reached |" in out


def test_train_step_largest_fitting_length_tries_only_what_can_change_it():
  # bench_common defines no absl flags (train_step's would collide with train.__main__'s).
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import bench_common  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  tried = []

  def fits_below(limit):
    return lambda n: tried.append(n) or n < limit

  candidates = [24, 48, 64, 96, 128]
  largest_fitting = bench_common.largest_fitting
  assert largest_fitting({16: True, 32: True}, candidates, fits_below(80)) == (64, 96)
  assert tried == [48, 64, 96]  # not 24 (below a fitting length), not 128 (above a failure)
  tried.clear()
  assert largest_fitting({16: True, 32: False}, candidates, fits_below(30)) == (24, 32)
  assert tried == [24]
  tried.clear()
  assert largest_fitting({16: False}, candidates, fits_below(0)) == (None, 16)
  assert tried == []


def test_train_step_names_a_bad_flag_before_any_work(tmp_path):
  done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"),
                         "--trainable=lora,mlp", f"--out={tmp_path}"],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and "--trainable: unknown ['mlp']" in done.stderr
  assert not (tmp_path / "train_step.json").exists()


def test_generation_e2e_times_whole_generate_calls_per_method_and_batch(tmp_path):
  out = _run("generation_e2e.py", "--preset=tiny_qwen2", "--contexts=40", "--new_tokens=16",
             "--batches=1,2", "--methods=exact,mage", "--budget=8", "--dense_layers=1",
             "--repeats=1", "--prefill_chunk=64", f"--out={tmp_path}")
  with open(tmp_path / "generation_e2e.json") as f:
    saved = json.load(f)
  rows = saved["rows"]
  assert [(r["batch"], r["method"]) for r in rows] == [
      (b, m) for b in (1, 2) for m in ("exact", "mage")]
  assert saved["meta"]["policy"] == "fast_dllm_v2"  # the family's threshold policy by default
  for r in rows:
    assert r["context"] == 40 and r["wall_s"] > 0 and r["prefill_s"] > 0 and r["decode_s"] > 0
    assert r["wall_s"] >= r["prefill_s"] + r["decode_s"], r
    assert r["wall_s"] < r["warmup_s"], r  # the timed calls reuse the warm-up's compile
    # [MASK] is the only EOS: every sequence decodes all 16 tokens, 2 blocks of 8.
    assert r["generated_tokens"] == 16 * r["batch"] and r["blocks"] == 2, r
    # Token shift decides each block's first token: 7 masks, at least one unmasked per step.
    assert 1 <= r["steps_per_block"] <= 7, r
  table = (tmp_path / "generation_e2e.md").read_text()
  assert "| mage | xla | 2 | 40 |" in table and "exact / this (decode)" in table
  assert table in out


def test_generation_e2e_fixed_steps_policy_takes_its_steps_and_bad_flags_stop_it(tmp_path):
  _run("generation_e2e.py", "--preset=tiny_qwen2", "--contexts=24", "--new_tokens=8",
       "--batches=1", "--methods=exact", "--policy=fixed_steps", "--steps_per_block=3",
       "--layer_kernels=xla,fused", "--repeats=1", "--prefill_chunk=64", f"--out={tmp_path}")
  with open(tmp_path / "generation_e2e.json") as f:
    rows = json.load(f)["rows"]
  assert [r["layers"] for r in rows] == ["xla", "fused"]
  for row in rows:
    assert row["steps_per_block"] == 3 and row["generated_tokens"] == 8
  for bad, message in (("--methods=exact,quest", "--methods: unknown ['quest']"),
                       ("--policy=greedy", "--policy: unknown 'greedy'"),
                       ("--layer_kernels=cublas", "--layer_kernels: unknown ['cublas']")):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "generation_e2e.py"),
                           bad, f"--out={tmp_path / 'bad'}"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode != 0 and message in done.stderr
  assert not (tmp_path / "bad").exists()


def _hf_sdpa_step_with(tmp_path, modules: dict[str, str]):
  """hf_sdpa_step.py run with stand-in packages (name -> __init__ source) first on the path."""
  tmp_path.mkdir()
  for name, source in modules.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(source)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
  return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "hf_sdpa_step.py"),
                         f"--out={tmp_path / 'out'}"], capture_output=True, text=True,
                        timeout=120, cwd=ROOT, env=env)


def test_hf_sdpa_step_exits_2_naming_a_missing_package(tmp_path):
  missing = "raise ImportError('not installed')\n"
  done = _hf_sdpa_step_with(tmp_path / "a", {"torch": missing})
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1] == (
      "hf_sdpa_step.py: the 'torch' package is not installed (this benchmark needs torch and "
      "transformers)")
  done = _hf_sdpa_step_with(tmp_path / "b", {"torch": "", "transformers": missing})
  assert done.returncode == 2 and "the 'transformers' package is not installed" in done.stderr
  assert not (tmp_path / "a" / "out").exists() and not (tmp_path / "b" / "out").exists()


def _hf_sdpa_step_module():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import hf_sdpa_step  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  return hf_sdpa_step


def test_hf_sdpa_step_config_matches_the_preset_and_floor_counts_weights_and_cache():
  hf_sdpa_step = _hf_sdpa_step_module()
  from mage_jax.config import ModelConfig  # pylint: disable=import-outside-toplevel
  for preset in ("fast_dllm_v2_1.5b", "sdar_1.7b"):
    cfg = ModelConfig.preset(preset)
    hf = hf_sdpa_step.hf_config_dict(cfg, 131072 + 64)
    assert hf["model_type"] == ("qwen3" if cfg.qk_norm else "qwen2")
    assert hf["max_position_embeddings"] == max(131136, cfg.max_position_embeddings)
    assert "block_diffusion" not in hf and "architectures" not in hf
    back = ModelConfig.from_hf_config(hf, family=cfg.family)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "rope_theta", "tie_word_embeddings",
                  "attention_bias", "qk_norm"):
      assert getattr(back, field) == getattr(cfg, field), (preset, field)
  cfg = ModelConfig.preset("fast_dllm_v2_1.5b")
  # 28 layers x (K + V) x 2 KV heads x 128 dims x 2 bytes = 28 KiB per cached token.
  assert hf_sdpa_step.kv_cache_bytes(cfg, 131072, 1) == 131072 * 28 * 1024
  assert hf_sdpa_step.kv_cache_bytes(cfg, 32768, 8) == 8 * 32768 * 28 * 1024
  floor = hf_sdpa_step.step_floor_seconds(3 * 10**9, cfg, 131072, 1, 3e12)
  assert floor == pytest.approx((3e9 + 131072 * 28 * 1024) / 3e12)  # ~2.25 ms (docs/gpu.md)


def test_compare_e2e_joins_the_three_benchmarks_by_batch_and_context(tmp_path):
  def save(name, rows_key, rows):
    meta = dict(device="GPU X", date="2026-12-08", preset="p")
    (tmp_path / name).write_text(json.dumps({"meta": meta, rows_key: rows}))
    return str(tmp_path / name)

  decode = save("decode.json", "steps", [
      dict(method=m, batch=1, context=64, step_ms=s, first_step_ms=f, floor_step_ms=1.0)
      for m, s, f in (("exact", 4.0, 4.0), ("mage", 1.0, 32.0), ("none", 0.5, 0.5))])
  generation = save("generation.json", "rows", [
      dict(method=m, batch=1, context=64, decode_s=d, steps_per_block=31.0)
      for m, d in (("exact", 0.9), ("mage", 0.3))])
  hf = save("hf.json", "rows", [dict(batch=1, context=64, step_ms=12.0, floor_ms=1.0),
                                 dict(batch=8, context=64, floor_ms=3.0, error="out of memory")])
  out = _run("compare_e2e.py", f"--decode_e2e={decode}", f"--generation_e2e={generation}",
             f"--hf_sdpa_step={hf}", f"--out={tmp_path}")
  table = (tmp_path / "compare_e2e.md").read_text()
  assert table in out and "decode.json: p, GPU X, 2026-12-08" in table
  # MAGE block mean: (32 + 31 x 1) / 32 ms; sdpa / exact = 12 / 4; exact / MAGE decode = 3.
  assert ("| 1 | 64 | 12.00 | 4.00 | 1.00 | 1.00 | 1.97 | 3.0 | 6.1 | 0.900 | 0.300 | 3.0 |"
          in table)
  assert "| 8 | 64 | out of memory | - | - | - | - | - | - | - | - | - |" in table
