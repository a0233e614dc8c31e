"""configs/train/long_context/device_stage.sh: its arguments, fresh folders and what it packs
into $OUT, with a stand-in for Python (PYTHON=stub) that records each call and writes what the
real stage driver and eval write; the real driver is tested in test_long_context.py."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "configs", "train", "long_context", "device_stage.sh")

STUB = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
if args[0] == "-c":  # device_stage.sh's own one-liners run for real
  os.execv(sys.executable, [sys.executable] + args)
opts = dict(a[2:].split("=", 1) for a in args[2:] if a.startswith("--"))
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps({{"module": args[1], "opts": opts}}) + "\\n")
if args[1] == "configs.train.long_context.stage":
  model = os.path.join(opts["run_dir"], "model")
  os.makedirs(model)
  os.makedirs(os.path.join(opts["run_dir"], "train"))
  sizes = json.loads(os.environ["STUB_SHARD_BYTES"])
  for i, size in enumerate(sizes):
    with open(os.path.join(model, f"model-{{i + 1:05d}}-of-{{len(sizes):05d}}.safetensors"),
              "wb") as f:
      f.write(b"w" * size)
  for name in ("config.json", "model.safetensors.index.json", "tokenizer.json"):
    with open(os.path.join(model, name), "w") as f:
      f.write("{{}}")
  with open(os.path.join(opts["run_dir"], "train", "metrics.jsonl"), "w") as f:
    f.write('{{"step": 1}}\\n')
  with open(os.path.join(opts["run_dir"], "progress.json"), "w") as f:
    json.dump({{"steps_done": 7, "train_config": {{}}}}, f)
  print("stub: trained")
elif args[1] == "eval":
  if os.path.exists(opts["output_dir"]):
    sys.exit("stub: eval output folder reused")
  os.makedirs(opts["output_dir"])
  with open(os.path.join(opts["output_dir"], "results.jsonl"), "w") as f:
    f.write('{{"score": 1.0}}\\n')
  print("stub: eval table")
  sys.exit(int(os.environ.get("STUB_EVAL_STATUS", "0")))
"""


@pytest.fixture
def device(tmp_path):
  stub = tmp_path / "python"
  stub.write_text(STUB)
  stub.chmod(0o755)
  init = tmp_path / "init"
  init.mkdir()

  def run(*args, shards=(1000, 2000), eval_status=0, out=True, mode=None):
    env = {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(tmp_path / "calls.jsonl"),
           "STUB_SHARD_BYTES": json.dumps(list(shards)), "STUB_EVAL_STATUS": str(eval_status),
           "RUNS_DIR": str(tmp_path / "runs"), "MAX_FILE_BYTES": "5000"}
    env.pop("OUT", None)
    env.pop("MODE", None)
    if mode is not None:
      env["MODE"] = mode
    if out:
      env["OUT"] = str(tmp_path / "out")
    args = [a.replace("INIT", str(init)) for a in args]
    return subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=60)

  def calls():
    with open(tmp_path / "calls.jsonl") as f:
      return [json.loads(line) for line in f]

  return run, calls, tmp_path


def test_a_call_returns_shards_and_one_archive(device):
  run, calls, tmp = device
  res = run("l1_8k", "INIT", "6", "2048,8192", "12", "300")
  assert res.returncode == 0, res.stderr
  out = tmp / "out" / "l1_8k"
  assert sorted(os.listdir(out)) == ["model-00001-of-00002.safetensors",
                                     "model-00002-of-00002.safetensors", "run.tar.gz"]
  assert os.path.getsize(out / "model-00002-of-00002.safetensors") == 2000
  with tarfile.open(out / "run.tar.gz") as tar:
    names = set(tar.getnames())
  assert {"model/config.json", "model/model.safetensors.index.json", "model/tokenizer.json",
          "run/progress.json", "run/metrics.jsonl", "run/train.log", "run/eval.log",
          "run/eval/results.jsonl"} <= names
  assert not any(n.endswith(".safetensors") for n in names)
  train, evaluation = calls()
  assert train["module"] == "configs.train.long_context.stage"
  assert train["opts"]["config"] == "configs/train/long_context/l1_8k.json"
  assert (train["opts"]["init"], train["opts"]["minutes"], train["opts"]["steps_done"],
          train["opts"]["mode"]) == (str(tmp / "init"), "6", "300", "pretrain")
  assert evaluation["module"] == "eval"
  assert evaluation["opts"]["checkpoint"] == os.path.join(train["opts"]["run_dir"], "model")
  assert evaluation["opts"]["context_lengths"] == "2048,8192"
  assert evaluation["opts"]["num_samples"] == "3"  # 12 prompts: 3 per depth, 5 depths
  assert evaluation["opts"]["method"] == "exact" and evaluation["opts"]["task"] == "niah"
  assert '"steps_done": 7' in res.stdout and "train_config" not in res.stdout.split("\n")[-2]


def test_a_mage_ft_segment_runs_the_stage_driver_in_selfdistill_mode(device):
  run, calls, tmp = device
  res = run("ft_mage_16k", "INIT", "7", "none", "5", mode="selfdistill")
  assert res.returncode == 0, res.stderr
  (train,) = calls()
  assert train["opts"]["config"] == "configs/train/long_context/ft_mage_16k.json"
  assert train["opts"]["mode"] == "selfdistill"
  assert sorted(os.listdir(tmp / "out" / "ft_mage_16k"))[-1] == "run.tar.gz"


def test_every_call_uses_fresh_folders(device):
  run, calls, _ = device
  for _ in range(2):
    assert run("l2_16k", "INIT", "1", "16384", "5").returncode == 0
  first, second = calls()[0::2], calls()[1::2]
  assert first[0]["opts"]["run_dir"] != first[1]["opts"]["run_dir"]
  assert second[0]["opts"]["output_dir"] != second[1]["opts"]["output_dir"]
  assert first[0]["opts"]["steps_done"] == "0"


def test_no_eval_and_a_failed_eval_still_return_the_weights(device):
  run, calls, tmp = device
  assert run("l3_32k", "INIT", "1", "none", "5").returncode == 0
  assert [c["module"] for c in calls()] == ["configs.train.long_context.stage"]
  res = run("l3_32k", "INIT", "1", "32768", "5", eval_status=1)
  assert res.returncode == 0 and "the eval failed" in res.stdout
  assert len(os.listdir(tmp / "out" / "l3_32k")) == 3


@pytest.mark.parametrize("args,kwargs,message", [
    (("l1_8k", "INIT", "6", "8192"), {}, "usage:"),
    (("l9_64k", "INIT", "6", "8192", "5"), {}, "STAGE: no config"),
    (("l1_8k", "/no/such/dir", "6", "8192", "5"), {}, "INIT_MODEL_DIR"),
    (("l1_8k", "INIT", "6", "8k", "5"), {}, "EVAL_LENGTHS"),
    (("l1_8k", "INIT", "6", "8192", "0"), {}, "N_PROMPTS"),
    (("l1_8k", "INIT", "6", "8192", "5"), {"out": False}, "OUT is not set"),
    (("l1_8k", "INIT", "6", "8192", "5"), {"shards": (1000, 6000)}, "above 5000"),
    (("l1_8k", "INIT", "6", "8192", "5"), {"shards": (10,) * 5}, "5 weight files"),
    (("ft_mage_16k", "INIT", "6", "none", "5"), {"mode": "distill"},
     "MODE: expected pretrain or selfdistill, got distill"),
])
def test_bad_input_fails_with_one_line(device, args, kwargs, message):
  run, _, _ = device
  res = run(*args, **kwargs)
  assert res.returncode != 0
  errors = [line for line in res.stderr.splitlines() if line.strip()]
  assert len(errors) == 1 and message in errors[0], res.stderr
