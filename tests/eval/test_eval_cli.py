"""The eval CLI end to end on a tiny checkpoint written by the test."""

import importlib
import json
import os
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from eval import provenance, runner
from eval.results import ResultStore
from mage_jax import DecodeOptions, ModelConfig, build_model, get_method
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
  # A chat template, as Fast-dLLM v2 and SDAR checkpoints ship: the CLI prompts through it.
  (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
      "{% for m in messages %}{{ m['content'] }}{% endfor %}"
      "{% if add_generation_prompt %} the answer is{% endif %}")}))
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
  store = ResultStore(out)
  rows = store.rows()
  assert {r["method"] for r in rows} == {"exact", "mage"} and len(rows) == 4
  assert all(0.0 <= r["score"] <= 1.0 for r in rows)
  # Latency once per batch (both samples in one batch of 2), prefill apart from the steps.
  batches = store.batches()
  assert sorted(b["method"] for b in batches) == ["exact", "mage"]
  for b in batches:
    assert len(b["cases"]) == 2 and b["batch_size"] == 2 and b["devices"] == 1
    assert b["prefill_ms"] > 0 and b["ms_per_step"] > 0 and b["steps"] >= 1
  assert all("ms_per_step" not in r for r in rows)
  mage_rows = [r for r in rows if r["method"] == "mage"]
  for r in mage_rows:
    assert r["layer_recall"][:2] == [1.0, 1.0]  # dense layers
    assert 0.0 < r["layer_recall"][2] < 1.0 and r["recall"] == r["layer_recall"][2]
  assert all("recall" not in r for r in rows if r["method"] == "exact")
  assert "exact" in first.stdout and "mage" in first.stdout
  summary = json.loads((out / "summary.json").read_text())
  assert [(e["n"], e["batches"]) for e in summary] == [(2, 1), (2, 1)]
  # A restarted run finds every case finished and writes nothing new.
  size = (out / "results.jsonl").stat().st_size
  again = _cli(*args, cwd=REPO)
  assert again.returncode == 0, again.stderr[-2000:]
  assert (out / "results.jsonl").stat().st_size == size
  assert again.stdout.splitlines()[:3] == first.stdout.splitlines()[:3]


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
  assert [r["depth"] for r in rest] == [0.0, 1.0] and rest[0] == first[0]
  lines = (tmp_path / "results.jsonl").read_text().splitlines()
  assert [json.loads(line)["depth"] for line in lines] == [0.0, 1.0]


def test_results_are_tied_to_the_model_that_produced_them(checkpoint, tmp_path):
  # Another checkpoint's results in the folder are neither reused nor shown: the zeroed model
  # below "scored" like the original when cases were keyed without the model.
  model, cfg = load_pretrained(checkpoint)
  tok = Tokenizer.from_file(os.path.join(checkpoint, "tokenizer.json"))
  tokenizer = runner.Tokenizer(lambda s: tok.encode(s).ids, tok.decode)
  samples = runner.build_samples("niah", [96], num_samples=1, seed=0, depths=[0.5],
                                 tokenizer=tokenizer)
  specs = runner.method_specs(["exact"], [16])
  run = lambda m: runner.run_cases(m, tokenizer, samples, specs, store=ResultStore(tmp_path),
                                   batch_size=1, seed=0, measure=["accuracy"], progress=False)
  (first,) = run(model)
  assert run(model) == [first]  # same model: reused
  zeroed = build_model(cfg, seed=0)
  for layer in zeroed.layers:
    layer.self_attn.o_proj.kernel[...] = 0.0
    layer.mlp.down_proj.kernel[...] = 0.0
  (other,) = run(zeroed)
  assert other["case_id"] != first["case_id"]
  assert other["case_id"].rsplit("/", 1)[0] == first["case_id"].rsplit("/", 1)[0]
  assert [r["case_id"] for r in ResultStore(tmp_path).rows()] == [first["case_id"],
                                                                   other["case_id"]]


def test_case_setup_covers_weights_dtype_options_and_prompt(checkpoint):
  model, cfg = load_pretrained(checkpoint)
  base = provenance.model_fingerprint(model)
  assert provenance.model_fingerprint(load_pretrained(checkpoint)[0]) == base
  assert provenance.model_fingerprint(load_pretrained(checkpoint, dtype="bfloat16")[0]) != base
  changed = load_pretrained(checkpoint)[0]
  changed.layers[1].mlp.down_proj.kernel[0, 0] += 1e-3
  assert provenance.model_fingerprint(changed) != base
  method, options = get_method("mage", budget=16), DecodeOptions.for_model(cfg)
  setup = provenance.case_setup(base, method, options, [5, 6, 7], 8)
  assert provenance.case_setup(base, method, options, [5, 6, 7], 8) == setup
  for other in (provenance.case_setup(base, get_method("mage", budget=32), options, [5, 6, 7], 8),
                provenance.case_setup(base, get_method("mage", budget=16, dense_layers=0), options,
                                      [5, 6, 7], 8),
                provenance.case_setup(base, method, DecodeOptions.for_model(cfg, threshold=0.5),
                                      [5, 6, 7], 8),
                provenance.case_setup(base, method,
                                      DecodeOptions.for_model(cfg, layer_kernels="fused"),
                                      [5, 6, 7], 8),
                provenance.case_setup(base, method, options, [5, 6, 8], 8),
                provenance.case_setup(base, method, options, [5, 6, 7], 9),
                provenance.case_setup("other", method, options, [5, 6, 7], 8)):
    assert other != setup


def test_warm_up_compiles_the_timed_loop_without_decoding_the_batch(checkpoint):
  generate_lib = importlib.import_module("mage_jax.generate")
  model, cfg = load_pretrained(checkpoint)
  method, options = get_method("exact"), DecodeOptions.for_model(cfg)
  prompts = [[5 + i % 7 for i in range(90)], [6] * 70]
  capacity = generate_lib.plan_request(cfg, [len(p) for p in prompts], 16).capacity
  runner._warm_up(model, 2, capacity, method, options, None)
  compiled = (generate_lib._prefill_jit._cache_size(), generate_lib._decode_jit._cache_size())
  result = generate_lib.generate(model, prompts, max_new_tokens=16, method=method,
                                 options=options, capacity=capacity)
  assert (generate_lib._prefill_jit._cache_size(),
          generate_lib._decode_jit._cache_size()) == compiled  # no compile in the timed call
  assert result.prefill_s > 0 and result.decode_s > 0


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
    # The default 2048-token context on a 1024-position model.
    (["--method=mage"], "--context_lengths: 2048 needs 2"),
    (["--method=mage", "--context_lengths=1020"], "beyond max_position_embeddings=1024 of "),
])
def test_bad_flags_give_one_clear_line(checkpoint, tmp_path, args, message):
  if not any(a.startswith("--checkpoint") for a in args):
    args = args + [f"--checkpoint={checkpoint}"]
  res = _cli(*args, f"--output_dir={tmp_path}", cwd=REPO)
  assert res.returncode == 2
  lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and message in lines[0], res.stderr
  assert "Traceback" not in res.stderr


def test_output_dir_errors_name_the_flag(checkpoint, tmp_path):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("")
  res = _cli("--method=exact", f"--checkpoint={checkpoint}", "--context_lengths=96",
             f"--output_dir={not_a_dir}", cwd=REPO)
  assert res.returncode == 2 and res.stderr.strip().splitlines() == [
      f"mage-eval: --output_dir={not_a_dir}: exists and is not a directory"]
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "results.jsonl").write_text("not json\n")
  res = _cli("--method=exact", f"--checkpoint={checkpoint}", "--context_lengths=96",
             f"--output_dir={corrupt}", cwd=REPO)
  assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
  assert res.stderr.startswith(f"mage-eval: --output_dir={corrupt}: ") and "malformed" in res.stderr


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_lists_the_flags(flag, tmp_path):
  res = _cli(flag, cwd=tmp_path)
  assert "Unknown command line flag" not in res.stderr
  for name in ("--method", "--budget", "--checkpoint", "--context_lengths", "--output_dir"):
    assert name in res.stdout, (name, res.stdout[-2000:])


def test_shipped_model_is_package_data_found_from_anywhere():
  # `pip install .` (not editable) must ship the default checkpoint, and the path must not
  # depend on the working directory.
  import fnmatch
  import tomllib

  import models
  from eval import __main__ as cli

  assert cli.DEFAULT_CHECKPOINT == models.DEFAULT and os.path.isabs(models.DEFAULT)
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    setuptools_cfg = tomllib.load(f)["tool"]["setuptools"]
  assert "models" in setuptools_cfg["packages"]["find"]["include"]
  patterns = setuptools_cfg["package-data"]["models"]
  shipped = sorted(os.listdir(models.DEFAULT))
  assert "config.json" in shipped and "tokenizer.json" in shipped
  for name in shipped:
    assert any(fnmatch.fnmatch(f"default/{name}", p) for p in patterns), name
