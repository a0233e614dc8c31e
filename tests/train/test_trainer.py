"""End-to-end runs of the trainer on a tiny model (CPU, in-process)."""

import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mage_jax import checkpoint as hf_checkpoint
from train import data as data_lib
from train import trainer


def test_loss_falls_on_a_learnable_task(run_config):
  cfg = run_config(steps=150, log_every=50, **{"optim.grad_accum": 1,
                                                "optim.batch_size": 8,
                                                "optim.warmup_steps": 10,
                                                "checkpoint.every": 1000})
  losses = [m["loss"] for m in trainer.train(cfg, "pretrain")]
  assert len(losses) == 150
  first, last = np.mean(losses[:10]), np.mean(losses[-10:])
  assert last < 0.6 * first, (first, last)  # measured: 3.2 -> 1.5


@pytest.mark.parametrize("mode", ["pretrain", "selfdistill"])
def test_resume_reproduces_the_uninterrupted_run(run_config, tmp_path, mode):
  whole = trainer.train(run_config(workdir=str(tmp_path / "whole"), steps=8), mode)
  split_cfg = run_config(workdir=str(tmp_path / "split"), steps=8)
  head = trainer.train(split_cfg, mode, stop_at_step=5)
  assert len(head) == 5
  # Drop everything but the workdir, and take the run up again from its checkpoint.
  jax.clear_caches()
  tail = trainer.train(split_cfg, mode)
  assert len(tail) == 3
  for key in ("loss", "ce", "kl", "grad_norm"):
    np.testing.assert_array_equal([m[key] for m in head + tail], [m[key] for m in whole])


def test_nan_in_a_batch_stops_with_the_last_good_checkpoint(run_config, monkeypatch):
  cfg = run_config(steps=10, **{"checkpoint.every": 2})
  clean_batch = data_lib.PackedData.batch

  def poisoned_batch(self, step, micro, accum):
    batch = clean_batch(self, step, micro, accum)
    if step == 4:  # the fifth step: an out-of-vocabulary id embeds as NaN
      batch[0, 0, 3] = 10**6
    return batch

  monkeypatch.setattr(data_lib.PackedData, "batch", poisoned_batch)
  with pytest.raises(trainer.TrainingDiverged, match=r"step 5.*last good checkpoint: step 4"):
    trainer.train(cfg, "pretrain")
  directory = os.path.join(cfg.workdir, "checkpoints")
  manager = ocp.CheckpointManager(directory)
  assert manager.all_steps() == [2, 4]
  restored = manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                        meta=ocp.args.JsonRestore()))
  assert restored.meta["step"] == 4 and restored.meta["data_position"] == 4 * 8
  leaves = jax.tree.leaves(restored.state)
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves
                        if np.issubdtype(np.asarray(x).dtype, np.floating))
  manager.close()


def test_export_loads_back_as_the_trained_weights(run_config, tmp_path):
  export_dir = tmp_path / "export"
  cfg = run_config(steps=2, export_dir=str(export_dir))
  trainer.train(cfg, "pretrain")
  model, model_cfg = hf_checkpoint.load_pretrained(export_dir)
  assert model_cfg.vocab_size == 32 and (export_dir / data_lib.TOKENIZER_FILE).exists()
  manager = ocp.CheckpointManager(os.path.join(cfg.workdir, "checkpoints"))
  state = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  manager.close()
  layout = trainer.ParamLayout(model_cfg)
  exported = layout.flatten(model)
  assert set(exported) == set(state["params"])
  for name, value in exported.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(state["params"][name]))


def test_prefetched_batches_equal_direct_batches_and_errors_arrive_in_order():
  from mage_jax import ModelConfig
  from train import config as config_lib
  from train import data as data_lib

  model_cfg = ModelConfig.preset("tiny_qwen2", vocab_size=128)
  data_cfg = config_lib.DataConfig()
  tokenizer = data_lib.build_word_tokenizer(model_cfg, data_lib._vocabulary_texts(data_cfg, 256))
  data = data_lib.PackedData(data_cfg, model_cfg, 256, tokenizer)
  for options in (dict(depth=2), dict(workers=2)):
    got = list(data_lib.prefetch_batches(data, range(3, 9), 2, 1, **options))
    assert len(got) == 6, options
    for step, batch in zip(range(3, 9), got):
      np.testing.assert_array_equal(batch, data.batch(step, 2, 1), err_msg=str(options))

  class Failing:
    def batch(self, step, micro, accum):
      if step == 2:
        raise RuntimeError("bad step 2")
      return np.full((accum, micro, 4), step)

  seen = []
  with pytest.raises(RuntimeError, match="bad step 2"):
    for b in data_lib.prefetch_batches(Failing(), range(0, 5), 1, 1):
      seen.append(int(b[0, 0, 0]))
  assert seen == [0, 1]


def test_worker_processes_raise_a_bad_batch_at_its_step():
  from mage_jax import ModelConfig
  from train import config as config_lib

  model_cfg = ModelConfig.preset("tiny_qwen2", vocab_size=128)
  data_cfg = config_lib.DataConfig()
  tokenizer = data_lib.build_word_tokenizer(model_cfg, data_lib._vocabulary_texts(data_cfg, 256))
  data = data_lib.PackedData(data_cfg, model_cfg, 256, tokenizer)
  batches = data_lib.prefetch_batches(data, range(0, 4), 1, 1, workers=1)
  assert next(batches).shape == (1, 1, 256)
  batches.close()  # stops the pool with work still queued
  with pytest.raises(ValueError, match="need at least one array"):
    # a negative micro batch builds no rows: np.stack fails inside the worker, and arrives here
    next(data_lib.prefetch_batches(data, range(0, 2), -1, 1, workers=1))


def test_documents_at_log_uniform_lengths_pack_several_to_a_sequence():
  from mage_jax import ModelConfig
  from train import config as config_lib

  model_cfg = ModelConfig.preset("tiny_qwen2", vocab_size=256)
  source = config_lib.SourceConfig(kind="niah", min_context_tokens=100, context_tokens=900)
  data_cfg = config_lib.DataConfig(sources=(source,))
  tokenizer = data_lib.build_word_tokenizer(model_cfg, data_lib._vocabulary_texts(data_cfg, 512))
  data = data_lib.PackedData(data_cfg, model_cfg, 1024, tokenizer)
  synthetic = data.sources[0]
  lengths = [synthetic.context_length(i) for i in range(400)]
  assert min(lengths) >= 100 and max(lengths) <= 900
  assert np.median(lengths) < 400 and max(lengths) > 700  # log-uniform: median 300
  assert lengths == [synthetic.context_length(i) for i in range(400)]  # deterministic
  eos = model_cfg.eos_token_ids[0]
  np.testing.assert_array_equal(data.sequence(3), data.sequence(3))
  assert np.mean([np.sum(data.sequence(i) == eos) for i in range(8)]) >= 1.5


def test_max_seconds_stops_checkpointed_and_the_run_resumes(run_config, tmp_path):
  export_dir = tmp_path / "export"
  cfg = run_config(steps=4, export_dir=str(export_dir), **{"checkpoint.every": 100})
  head = trainer.train(cfg, "pretrain", max_seconds=1e-9)
  assert len(head) == 1 and not export_dir.exists()
  manager = ocp.CheckpointManager(os.path.join(cfg.workdir, "checkpoints"))
  assert manager.all_steps() == [1]
  manager.close()
  tail = trainer.train(cfg, "pretrain")
  assert len(tail) == 3 and export_dir.exists()


def test_word_tokenizer_splits_off_newlines_and_round_trips():
  from mage_jax import ModelConfig

  model_cfg = ModelConfig.preset("tiny_qwen2", vocab_size=64)
  text = "The end.\n\nWhat is 1234567?\nThe end."
  tokenizer = data_lib.build_word_tokenizer(model_cfg, [text])
  encoding = tokenizer.encode(text, add_special_tokens=False)
  assert encoding.tokens[:6] == ["▁The", "▁end", ".", "\n\n", "What", "▁is"]
  assert "[UNK]" not in encoding.tokens
  assert tokenizer.decode(encoding.ids) == text


def test_word_tokenizer_groups_digits_and_holds_every_group():
  from mage_jax import ModelConfig

  model_cfg = ModelConfig.preset("tiny_qwen2", vocab_size=1200)
  text = "The magic number is 8737866.\nAnd 0012, then 7 and 45."
  tokenizer = data_lib.build_word_tokenizer(model_cfg, [text, "words never seen"], 3)
  encoding = tokenizer.encode(text, add_special_tokens=False)
  numbers = [t for t in encoding.tokens if t.isdigit()]
  assert numbers == ["873", "786", "6", "001", "2", "7", "45"]  # left to right, up to 3
  assert "[UNK]" not in encoding.tokens
  assert tokenizer.decode(encoding.ids) == text
  vocab = tokenizer.get_vocab()
  assert all(g in vocab for g in data_lib.number_tokens(3))  # seen in the texts or not
  assert len(data_lib.number_tokens(3)) == 1110
  # Special tokens keep the model's ids; ids are dense and within vocab_size.
  assert vocab["[PAD]"] == model_cfg.pad_token_id
  assert vocab["[MASK]"] == model_cfg.mask_token_id
  assert sorted(vocab.values()) == list(range(len(vocab))) and len(vocab) <= 1200
  assert "▁words" in vocab and "▁never" in vocab


def test_digit_groups_need_room_in_the_vocabulary():
  from mage_jax import ModelConfig
  from train import config as config_lib

  with pytest.raises(config_lib.ConfigError, match="1110 number tokens"):
    data_lib.build_word_tokenizer(ModelConfig.preset("tiny_qwen2", vocab_size=1024), ["a b"], 3)
  for digits, tokenizer, field in ((4, "word", "must be in"), (3, "tok.json", "word tokenizer")):
    cfg = config_lib.from_dict({"model": "tiny_qwen2", "workdir": "/tmp/x", "steps": 1,
                                "seq_len": 512, "data": {"sources": [{"kind": "repeat"}],
                                                         "tokenizer": tokenizer,
                                                         "digits_per_token": digits}})
    with pytest.raises(config_lib.ConfigError, match=f"data.digits_per_token.*{field}"):
      cfg.validate(ModelConfig.preset("tiny_qwen2"), "pretrain")


def test_drill_and_repeat_sources_pack_their_documents():
  from mage_jax import ModelConfig
  from train import config as config_lib

  model_cfg = ModelConfig.preset("tiny_qwen2", vocab_size=512)
  sources = (config_lib.SourceConfig(kind="niah_drill", needles=16, min_context_tokens=128,
                                     context_tokens=700),
             config_lib.SourceConfig(kind="repeat", min_context_tokens=64, context_tokens=300))
  data_cfg = config_lib.DataConfig(sources=sources)
  tokenizer = data_lib.build_word_tokenizer(model_cfg, data_lib._vocabulary_texts(data_cfg, 1024))
  data = data_lib.PackedData(data_cfg, model_cfg, 1024, tokenizer)
  drill, repeat = data.sources
  # Needle counts: 1..16, at most one per 64 prompt tokens.
  counts = [len(re.findall(r"number for \S+ is \d{7}", drill.text(i))) for i in range(30)]
  assert min(counts) >= 1 and len(set(counts)) > 3
  assert all(c <= max(1, drill.context_length(i) // 64) for i, c in enumerate(counts))
  for i in range(5):
    first, second = repeat.text(i).split("\n\n")
    assert first == second
  eos = model_cfg.eos_token_ids[0]
  unk = tokenizer.token_to_id("[UNK]")
  rows = np.stack([data.sequence(i) for i in range(6)])
  assert rows.shape == (6, 1024) and np.sum(rows == eos) >= 6
  assert np.mean(rows == unk) < 0.01


def test_needles_out_of_range_is_a_config_error():
  from mage_jax import ModelConfig
  from train import config as config_lib

  cfg = config_lib.from_dict({"model": "tiny_qwen2", "workdir": "/tmp/x", "steps": 1, "seq_len": 512, "data": {
      "sources": [{"kind": "niah_drill", "needles": 0}]}})
  with pytest.raises(config_lib.ConfigError, match="data.sources.needles"):
    cfg.validate(ModelConfig.preset("tiny_qwen2"), "pretrain")


def test_probe_every_logs_retrieval_probes(run_config):
  import json

  cfg = run_config(steps=4, probe_every=2, probe_context=128)
  trainer.train(cfg, "pretrain")
  with open(os.path.join(cfg.workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  probes = [r for r in records if "copy_second_half" in r]
  assert [r["step"] for r in probes] == [2, 4]
  for r in probes:
    assert all(0.0 <= r[k] <= 1.0 for k in ("copy_first_half", "copy_second_half",
                                             "needle_digits_all_masked",
                                             "needle_digits_alternate"))
  assert [r["step"] for r in records if "loss" in r] == [4]  # log_every=4


def test_models_from_scratch_start_with_scaled_residual_projections(run_config):
  scaled = trainer.initial_model(run_config())
  plain = trainer.initial_model(run_config(scaled_residual_init=False))
  layers = scaled.config.num_layers
  ratio = (np.asarray(scaled.layers[0].mlp.down_proj.kernel.get_value())
           / np.asarray(plain.layers[0].mlp.down_proj.kernel.get_value()))
  np.testing.assert_allclose(ratio, 1 / np.sqrt(2 * layers), rtol=1e-5)


def test_vocab_sources_build_the_vocabulary_from_other_tasks():
  from mage_jax import ModelConfig
  from mage_jax.tasks import ruler
  from train import config as config_lib

  model_cfg = ModelConfig.preset("tiny_qwen2", vocab_size=512)
  short = (config_lib.SourceConfig(kind="repeat", context_tokens=60),)
  vt = config_lib.SourceConfig(kind="ruler_vt", context_tokens=400)
  text = ruler.RULER_TASKS["ruler_vt"](400, seed=5, index=0, count_tokens=lambda s: len(
      s.split())).prompt()

  def unknown_share(data_cfg):
    tokenizer = data_lib.build_word_tokenizer(model_cfg, data_lib._vocabulary_texts(data_cfg, 128))
    tokens = tokenizer.encode(text, add_special_tokens=False).tokens
    return np.mean([t == "[UNK]" for t in tokens])

  assert unknown_share(config_lib.DataConfig(sources=short)) > 0.2
  assert unknown_share(config_lib.DataConfig(sources=short, vocab_sources=(vt,))) == 0


def test_bad_vocab_source_is_a_config_error():
  from mage_jax import ModelConfig
  from train import config as config_lib

  cfg = config_lib.from_dict({"model": "tiny_qwen2", "workdir": "/tmp/x", "steps": 1,
                              "seq_len": 512, "data": {"sources": [{"kind": "repeat"}],
                                                       "vocab_sources": [{"kind": "ruler_nope"}]}})
  with pytest.raises(config_lib.ConfigError, match="data.sources.kind.*'ruler_nope'"):
    cfg.validate(ModelConfig.preset("tiny_qwen2"), "pretrain")


def test_number_share_outside_repeat_is_a_config_error():
  from mage_jax import ModelConfig
  from train import config as config_lib

  cfg = config_lib.from_dict({"model": "tiny_qwen2", "workdir": "/tmp/x", "steps": 1,
                              "seq_len": 512,
                              "data": {"sources": [{"kind": "niah", "number_share": 0.2}]}})
  with pytest.raises(config_lib.ConfigError, match="number_share: applies to repeat sources"):
    cfg.validate(ModelConfig.preset("tiny_qwen2"), "pretrain")
  cfg = config_lib.from_dict({"model": "tiny_qwen2", "workdir": "/tmp/x", "steps": 1,
                              "seq_len": 512, "data": {"sources": [
                                  {"kind": "repeat", "number_share": 0.2, "number_digits": 40}]}})
  with pytest.raises(config_lib.ConfigError, match="number_digits: must be in"):
    cfg.validate(ModelConfig.preset("tiny_qwen2"), "pretrain")


@pytest.mark.parametrize("source, why", [
    ({"kind": "niah", "value_digits": [8, 10]}, "value_digits: applies to niah_drill sources"),
    ({"kind": "niah_drill", "value_digits": [10, 8]}, r"value_digits: must be \[low, high\]"),
    ({"kind": "niah_drill", "value_digits": [0, 8]}, r"value_digits: must be \[low, high\]"),
    ({"kind": "niah_drill", "value_digits": [7, 8, 9]}, r"value_digits: must be \[low, high\]"),
])
def test_bad_value_digits_are_config_errors(source, why):
  from mage_jax import ModelConfig
  from train import config as config_lib

  cfg = config_lib.from_dict({"model": "tiny_qwen2", "workdir": "/tmp/x", "steps": 1,
                              "seq_len": 512, "data": {"sources": [source]}})
  with pytest.raises(config_lib.ConfigError, match=why):
    cfg.validate(ModelConfig.preset("tiny_qwen2"), "pretrain")


def test_value_digits_reach_the_drill_documents():
  from mage_jax.tasks import sample as sample_lib
  from train import config as config_lib
  from train import data as data_lib

  source = config_lib.from_dict({"model": "tiny_qwen2", "workdir": "/tmp/x", "steps": 1,
                                 "seq_len": 512, "data": {"sources": [
                                     {"kind": "niah_drill", "needles": 6,
                                      "value_digits": [9, 11]}]}}).data.sources[0]
  drill = data_lib._Synthetic(source, seed=1, seq_len=512, count_tokens=sample_lib.count_words)
  values = re.findall(r"The special magic number for \S+ is (\d+)\.", drill.text(0, needles=6))
  assert len(values) == 6 and all(9 <= len(v) <= 11 for v in values)


def test_zero_depth_share_puts_niah_needles_after_the_header():
  from mage_jax.tasks import sample as sample_lib
  from train import config as config_lib
  from train import data as data_lib

  def source(**fields):
    return config_lib.from_dict({"model": "tiny_qwen2", "workdir": "/tmp/x", "steps": 1,
                                 "seq_len": 512, "data": {"sources": [
                                     {"kind": "niah", **fields}]}}).data.sources[0]

  after_header = re.compile(r"at the end\.\n\nThe special magic number for")
  count = sample_lib.count_words
  plain = data_lib._Synthetic(source(), seed=1, seq_len=512, count_tokens=count)
  half = data_lib._Synthetic(source(zero_depth_share=0.5), seed=1, seq_len=512,
                             count_tokens=count)
  texts = [(plain.text(i), half.text(i)) for i in range(40)]
  assert sum(bool(after_header.search(t)) for t, _ in texts) <= 2
  assert 10 <= sum(bool(after_header.search(t)) for _, t in texts) <= 30
  # The documents not moved are the default stream's.
  assert all(t == h for t, h in texts if not after_header.search(h))


@pytest.mark.parametrize("source, why", [
    ({"kind": "niah", "zero_depth_share": 1.5}, "zero_depth_share: must be in"),
    ({"kind": "niah_drill", "zero_depth_share": 0.5}, "zero_depth_share: applies to niah"),
])
def test_bad_zero_depth_share_is_a_config_error(source, why):
  from mage_jax import ModelConfig
  from train import config as config_lib

  cfg = config_lib.from_dict({"model": "tiny_qwen2", "workdir": "/tmp/x", "steps": 1,
                              "seq_len": 512, "data": {"sources": [source]}})
  with pytest.raises(config_lib.ConfigError, match=why):
    cfg.validate(ModelConfig.preset("tiny_qwen2"), "pretrain")


def _truncate_largest_file(step_dir):
  files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(run_config, capsys):
  import json

  cfg = run_config(steps=8, log_every=1, **{"checkpoint.every": 2, "checkpoint.max_to_keep": 3})
  trainer.train(cfg, "pretrain", stop_at_step=5)  # checkpoints 2, 4, 5; metrics of steps 1-5
  checkpoints = os.path.join(cfg.workdir, "checkpoints")
  _truncate_largest_file(os.path.join(checkpoints, "5"))
  capsys.readouterr()
  tail = trainer.train(cfg, "pretrain")
  out = capsys.readouterr().out
  broken = os.path.join(cfg.workdir, "broken_checkpoints", "5")
  assert re.search(r"checkpoint step 5 cannot be read \(.*\); moved to " + re.escape(broken), out)
  assert "resumed from step 4" in out and len(tail) == 4
  assert os.path.isdir(broken)  # moved aside, never deleted
  with open(os.path.join(cfg.workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(1, 9))  # the replayed step 5 logged once
  manager = ocp.CheckpointManager(checkpoints)
  assert manager.all_steps() == [4, 6, 8]
  manager.close()


def test_no_readable_checkpoint_refuses_in_one_line_and_moves_nothing(run_config):
  cfg = run_config(steps=4, **{"checkpoint.every": 2})
  trainer.train(cfg, "pretrain")
  checkpoints = os.path.join(cfg.workdir, "checkpoints")
  for step in ("2", "4"):
    _truncate_largest_file(os.path.join(checkpoints, step))
  with pytest.raises(trainer.ConfigError, match=r"no checkpoint in .* can be restored \(step 4: "
                     r".*\); move that folder aside") as error:
    trainer.train(cfg, "pretrain")
  assert "\n" not in str(error.value)
  assert sorted(os.listdir(checkpoints)) == ["2", "4"]
