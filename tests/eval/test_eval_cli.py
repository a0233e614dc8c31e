"""The eval CLI end to end on a tiny checkpoint written by the test."""

import json
import os
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from eval import runner
from eval.results import ResultStore
from mage_jax import ModelConfig, build_model
from mage_jax.checkpoint import load_pretrained, save_pretrained

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LONGBENCH = os.path.join(REPO, "tests", "fixtures", "longbench", "qasper.jsonl")


def _word_tokenizer(size: int) -> Tokenizer:
  """Word-level tokenizer: specials, digits, then the first words of the fixture texts."""
  specials = ["<pad>", "<unk>", "<eos>", "<mask>"]
  words = []
  with open(LONGBENCH) as f:
    for line in f:
      words += json.loads(line)["context"].split()
  vocab = {w: i for i, w in enumerate(specials + [str(d) for d in range(10)])}
  for w in words:
    if len(vocab) >= size:
      break
    vocab.setdefault(w, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
  tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
  return tok


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt")
  cfg = ModelConfig.preset("tiny_qwen2", vocab_size=128, mask_token_id=3, eos_token_ids=(2,),
                           pad_token_id=0, num_layers=3)  # layers 0-1 dense for MAGE, 2 sparse
  save_pretrained(build_model(cfg, seed=0), path)
  _word_tokenizer(128).save(str(path / "tokenizer.json"))
  return str(path)


def _cli(*args, cwd):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "eval", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_longbench_fixture_runs_end_to_end_and_resumes(checkpoint, tmp_path):
  out = tmp_path / "out"
  args = ["--method=mage", "--budget=16", f"--checkpoint={checkpoint}", f"--task=longbench:{LONGBENCH}",
          "--context_lengths=96", "--num_samples=2", "--batch_size=2", f"--output_dir={out}",
          "--measure=accuracy,latency,recall"]
  first = _cli(*args, cwd=REPO)
  assert first.returncode == 0, first.stderr[-2000:]
  rows = ResultStore(out).rows()
  assert {r["method"] for r in rows} == {"exact", "mage"} and len(rows) == 4
  assert all(0.0 <= r["score"] <= 1.0 and r["ms_per_step"] > 0 for r in rows)
  mage_rows = [r for r in rows if r["method"] == "mage"]
  for r in mage_rows:
    assert r["layer_recall"][:2] == [1.0, 1.0]  # dense layers
    assert 0.0 < r["layer_recall"][2] < 1.0 and r["recall"] == r["layer_recall"][2]
  assert all("recall" not in r for r in rows if r["method"] == "exact")
  assert "exact" in first.stdout and "mage" in first.stdout
  assert (out / "summary.json").exists()
  # A restarted run finds every case finished and writes nothing new.
  size = (out / "results.jsonl").stat().st_size
  again = _cli(*args, cwd=REPO)
  assert again.returncode == 0, again.stderr[-2000:]
  assert (out / "results.jsonl").stat().st_size == size


def test_killed_run_resumes_without_redoing_finished_cases(checkpoint, tmp_path):
  model, _ = load_pretrained(checkpoint)
  tok = Tokenizer.from_file(os.path.join(checkpoint, "tokenizer.json"))
  tokenizer = runner.Tokenizer(lambda s: tok.encode(s).ids, tok.decode)
  samples = runner.build_samples("niah", [128], num_samples=1, seed=0, depths=[0.0, 1.0],
                                 tokenizer=tokenizer)
  specs = runner.method_specs(["exact"], [16])
  store = ResultStore(tmp_path)
  first = runner.run_cases(model, tokenizer, samples[:1], specs, store=store, batch_size=1,
                           seed=0, measure=["accuracy"], progress=False)
  assert len(first) == 1
  # "Killed" after one case: a new store over the same folder runs only the other one.
  rest = runner.run_cases(model, tokenizer, samples, specs, store=ResultStore(tmp_path),
                          batch_size=1, seed=0, measure=["accuracy"], progress=False)
  assert [r["depth"] for r in rest] == [1.0]
  assert len(ResultStore(tmp_path).rows()) == 2


def test_method_specs_expand_budgets_and_variants():
  specs = runner.method_specs(["exact", "mage", "mage_adaptive"], [16, 32])
  assert [(s.name, s.budget) for s in specs] == [
      ("exact", None), ("mage", 16), ("mage", 32), ("mage_adaptive", 16), ("mage_adaptive", 32)]
  adaptive = specs[3].build()
  assert type(adaptive).name == "mage" and adaptive.adaptive and adaptive.budget == 16
  assert not specs[1].build().adaptive
  with pytest.raises(ValueError, match="available: .*mage_adaptive"):
    runner.method_specs(["magic"], [16])
  dense0 = runner.method_specs(["mage@dense0", "quest@dense1"], [16])
  assert [s.name for s in dense0] == ["mage@dense0", "quest@dense1"]
  assert dense0[0].build().dense_layers == 0 and dense0[1].build().dense_layers == 1
  assert runner.method_specs(["mage"], [16])[0].build().dense_layers == 2
  with pytest.raises(ValueError, match="has no dense layers"):
    runner.method_specs(["exact@dense0"], [16])
  with pytest.raises(ValueError, match="expected mage@denseN"):
    runner.method_specs(["mage@densex"], [16])
  # A budget one method cannot take fails before any case runs, naming method and budget.
  with pytest.raises(ValueError, match="--method=sparsed --budget=16: .*tile_size"):
    runner.method_specs(["mage", "sparsed"], [16, 64])


@pytest.mark.parametrize("args,message", [
    ([], "--method is required"),
    (["--method=nope"], "unknown method 'nope'"),
    (["--method=mage", "--budget=x"], "--budget: expected integers"),
    (["--method=mage", "--depths=2"], "--depths: values must be in [0, 1]"),
    (["--method=mage", "--measure=speed"], "--measure: unknown"),
    (["--method=mage", "--checkpoint=/no/such/dir"], "is not a directory"),
    (["--method=mage", "--task=longbench:/no/such.jsonl"], "cannot read LongBench file"),
    (["--method=mage", "--batch_size=oops"], "batch_size"),
])
def test_bad_flags_give_one_clear_line(checkpoint, tmp_path, args, message):
  if not any(a.startswith("--checkpoint") for a in args):
    args = args + [f"--checkpoint={checkpoint}"]
  res = _cli(*args, f"--output_dir={tmp_path}", cwd=REPO)
  assert res.returncode == 2
  lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and message in lines[0], res.stderr
  assert "Traceback" not in res.stderr
