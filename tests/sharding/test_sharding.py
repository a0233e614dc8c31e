"""Sharded decoding and training equal one device; layouts and errors are the declared ones.

The mesh cases run in a subprocess with 8 forced CPU devices (tests/sharding/sharded_run.py):
the device count is fixed when JAX starts and the rest of the suite runs on one device. The
flag and multi-host checks run here, on one device.
"""

import json
import os
import subprocess
import sys

import pytest

from mage_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESHES = ("1x8", "2x4", "8x1")
# (data, model) sizes of each mesh: kernels see batch 8 / data and 16 / model query heads.
SIZES = {"1x8": (1, 8), "2x4": (2, 4), "8x1": (8, 1)}
# What sharded_run.py runs on which mesh (it says why).
GENERATION_MESHES = {"exact": MESHES, "mage": MESHES, "mage_adaptive": ("1x8",)}
TRAINING_MESHES = {"pretrain": MESHES, "selfdistill": ("1x8", "2x4")}


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("MAGE_")}
  return {**env, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", **extra}


@pytest.fixture(scope="module")
def sharded():
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, "tests", "sharding", "sharded_run.py")], cwd=REPO,
      env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), capture_output=True,
      text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["exact", "mage", "mage_adaptive"])
def test_generation_on_a_mesh_matches_one_device(sharded, method):
  results = sharded["generation"][method]
  assert any(results["single"]), "nothing generated"
  ran = {key for key in results if key in MESHES}
  assert ran == set(GENERATION_MESHES[method])
  for mesh in ran:
    assert results[mesh] == results["single"], mesh
    if method == "mage":
      assert results[f"{mesh}_indices_equal"], f"{mesh}: MAGE selections differ"


@pytest.mark.parametrize("mode", ["pretrain", "selfdistill"])
def test_training_step_on_a_mesh_matches_one_device(sharded, mode):
  assert set(sharded["training"][mode]) == set(TRAINING_MESHES[mode])
  for mesh, r in sharded["training"][mode].items():
    assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-5), mesh
    assert r["grad_norm"][1] == pytest.approx(r["grad_norm"][0], rel=1e-5), mesh
    assert r["max_grad_error"] <= 1e-5 * r["max_grad"], mesh
    # Adam's first update is g / (|g| + eps) * lr, about lr * sign(g): a gradient that is
    # rounding noise around 0 may move its weight by a fraction of lr (1e-3) either way.
    assert r["max_param_error"] <= 1e-4, mesh
    assert r["laid_out"] == [True, True], f"{mesh}: master weights / Adam moments layout"


def test_kernels_see_one_shard(sharded):
  calls = {**sharded["generation"]["kernel_calls"], **sharded["training"]["kernel_calls"]}
  assert {tuple(c[1:]) for c in calls["single"]} == {(8, 16)}
  for name, seen in calls.items():
    if name == "single":
      continue
    data, model = SIZES[name.split("/")[-1]]
    training = "/" in name
    # Training batches: the two complementary views (16 rows), MAGE-FT's selection pass (8).
    batches = {16 // data, 8 // data} if training else {8 // data}
    assert {c[1] for c in seen} <= batches and {c[2] for c in seen} == {16 // model}, name
    expected = ({"block_diffusion_attention"} if training else
                {"block_diffusion_attention", "exact_block_attention", "mask_step_attention",
                 "sparse_block_attention"})
    assert {c[0] for c in seen} == expected, name


def test_params_and_cache_carry_the_declared_shardings(sharded):
  specs = sharded["generation"]["specs"]
  for mesh in MESHES:
    assert specs[mesh] == {
        "k_proj": [None, "model", None], "o_proj": ["model", None, None],
        "gate_up_proj": [None, None, "model"], "down_proj": ["model", None],
        "embed": ["model", None], "lm_head": [None, "model"],
        "cache_k": ["data", "model", None, None], "cache_lengths": ["data"]}, mesh
    assert specs[f"{mesh}/selections"], f"{mesh}: MAGE selections not over (data, model)"


def test_sizes_that_do_not_divide_the_mesh_name_the_tensor(sharded):
  errors = sharded["generation"]["errors"]
  assert errors["kv_heads"] == ("layers.0.self_attn.k_proj.bias: dimension 0 (kv_heads) of "
                                "size 2 does not divide mesh axis 'model' of size 8")
  assert errors["batch"] == ("KV cache: dimension 0 (batch) of size 3 does not divide mesh "
                             "axis 'data' of size 2")


def test_parse_mesh():
  assert sharding.parse_mesh("data:2,model:4") == {"data": 2, "model": 4}
  assert sharding.parse_mesh("model:8") == {"data": 1, "model": 8}
  for bad in ("data:2,data:2", "pipe:2", "data:0", "data:x", "data"):
    with pytest.raises(ValueError, match="expected comma-separated axis:size"):
      sharding.parse_mesh(bad)


def test_mesh_must_cover_the_devices():
  with pytest.raises(ValueError, match="needs 8 devices, found 1"):
    sharding.make_mesh({"data": 2, "model": 4})


def test_multi_host_settings(monkeypatch):
  for var in ("MAGE_COORDINATOR_ADDRESS", "MAGE_NUM_PROCESSES", "MAGE_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  assert not sharding.initialize_distributed()
  monkeypatch.setenv("MAGE_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  with pytest.raises(ValueError, match="missing MAGE_NUM_PROCESSES, MAGE_PROCESS_ID"):
    sharding.initialize_distributed()
  with pytest.raises(ValueError, match=r"process id 2 is not in \[0, 2\)"):
    sharding.initialize_distributed(num_processes=2, process_id=2)


def _tiny_checkpoint(path) -> str:
  """A 3-layer model with 8 query / 4 KV heads and a word tokenizer in which every id decodes to
  its own word (so predictions compare token for token)."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

  from mage_jax import ModelConfig, build_model  # pylint: disable=g-import-not-at-top
  from mage_jax.checkpoint import save_pretrained  # pylint: disable=g-import-not-at-top

  cfg = ModelConfig.preset("tiny_qwen2", vocab_size=128, mask_token_id=3, eos_token_ids=(2,),
                           pad_token_id=0, num_layers=3, num_heads=8, num_kv_heads=4)
  save_pretrained(build_model(cfg, seed=0), path)
  words = ["<pad>", "<unk>", "<eos>", "<mask>"] + [f"w{i}" for i in range(124)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.save(str(path / "tokenizer.json"))
  return str(path)


def test_eval_cli_on_a_mesh_matches_one_device(tmp_path):
  checkpoint = _tiny_checkpoint(tmp_path / "ckpt")
  longbench = os.path.join(REPO, "tests", "fixtures", "longbench", "qasper.jsonl")
  predictions = {}
  for mesh in ("", "data:2,model:4"):
    out = tmp_path / f"out{mesh}"
    run = subprocess.run(
        [sys.executable, "-m", "eval", "--method=mage", "--budget=16",
         f"--checkpoint={checkpoint}", f"--task=longbench:{longbench}", "--context_lengths=96",
         "--num_samples=2", "--batch_size=2", "--measure=accuracy", f"--output_dir={out}",
         *([f"--mesh={mesh}"] if mesh else [])],
        cwd=REPO, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(out / "results.jsonl") as f:
      rows = [json.loads(line) for line in f]
    predictions[mesh] = sorted((r["method"], r["sample_index"], r["prediction"]) for r in rows)
  assert len(predictions[""]) == 4
  assert predictions["data:2,model:4"] == predictions[""]


def _cli_error(*args) -> str:
  run = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=120)
  assert run.returncode == 2, run.stderr[-2000:]
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1, run.stderr
  return lines[0]


def test_eval_cli_rejects_a_bad_mesh_in_one_line(tmp_path):
  line = _cli_error("eval", "--method=exact", f"--checkpoint={tmp_path}", "--mesh=data:2,model:x")
  assert "expected comma-separated axis:size" in line


def test_train_cli_rejects_a_mesh_larger_than_the_devices_in_one_line(tmp_path):
  config = tmp_path / "run.json"
  config.write_text(json.dumps({"model": "tiny_qwen2", "workdir": str(tmp_path / "run"),
                                 "steps": 1, "seq_len": 32}))
  line = _cli_error("train", "--mode=pretrain", f"--config={config}", "--mesh=data:2")
  assert "mesh data:2,model:1 needs 2 devices, found 1" in line
