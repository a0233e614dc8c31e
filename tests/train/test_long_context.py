"""The long-context curriculum (configs/train/long_context): stage configs, RoPE / position
overrides of a loaded checkpoint, the segment plan of a stage split over several GPU calls, and
one real time-boxed segment on a tiny model (train, stop, export in small shards)."""

import json
import os

import numpy as np
import pytest
import tokenizers

from configs.train.long_context import stage as stage_lib
from mage_jax import ModelConfig, build_model
from mage_jax.checkpoint import load_pretrained, save_pretrained
from train import config as config_lib
from train import data as data_lib
from train import trainer
from train.config import ConfigError


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "configs", "train", "long_context")
SHIPPED = os.path.join(ROOT, "models", "default")
STAGES = ("l1_8k", "l2_16k", "l3_32k")
RULER_KINDS = {"ruler_niah_multikey", "ruler_niah_multivalue", "ruler_niah_multiquery",
               "ruler_vt"}


def _raw(name: str) -> dict:
  with open(os.path.join(RECIPE, f"{name}.json")) as f:
    return json.load(f)


def test_stages_chain_and_extend_the_context():
  previous = "models/default"
  for name, length in zip(STAGES, (8192, 16384, 32768)):
    raw = _raw(name)
    assert raw["model"] == previous and raw["seq_len"] == length
    previous = raw["export_dir"]
    overrides = raw["model_overrides"]
    assert overrides["rope_theta"] == 5e5 and overrides["max_position_embeddings"] >= 4 * length
    assert raw["export_max_shard_bytes"] < 16_000_000  # files come back from the GPU <= 16 MiB
    kinds = {s["kind"] for s in raw["data"]["sources"]}
    assert kinds == {"repeat", "niah_drill", "niah"} | RULER_KINDS
    for source in raw["data"]["sources"]:  # log-uniform lengths from short up to the stage's
      assert source["min_context_tokens"] <= 256
      assert length - 64 <= source["context_tokens"] <= length - data_lib.ANSWER_ROOM
    (niah,) = [s for s in raw["data"]["sources"] if s["kind"] == "niah"]
    assert 0 < niah["zero_depth_share"] < 1


@pytest.mark.parametrize("name", STAGES)
def test_stage_config_validates_with_mixed_lengths_up_to_the_stage(name):
  cfg = config_lib.load_config(os.path.join(RECIPE, f"{name}.json"), {"data.workers": 0})
  model_cfg = ModelConfig.from_json_file(os.path.join(SHIPPED, "config.json"),
                                         **dict(cfg.model_overrides))
  assert model_cfg.rope_theta == 5e5 and model_cfg.max_position_embeddings == 131072
  cfg.validate(model_cfg, "pretrain")
  for source in cfg.data.sources:
    lengths = [data_lib._Synthetic(source, cfg.data.seed, cfg.seq_len, len).context_length(i)
               for i in range(300)]
    assert source.min_context_tokens <= min(lengths) < 4 * source.min_context_tokens
    assert cfg.seq_len // 2 < max(lengths) <= source.context_tokens


def test_the_16k_mage_ft_config_starts_from_the_16k_stage_and_validates():
  """ft_mage_16k (MAGE-FT at 16K, device_stage.sh with MODE=selfdistill) trains the 16K
  stage's export: its positions and RoPE base (written into that export's config.json)."""
  raw = _raw("ft_mage_16k")
  assert raw["model"] == _raw("l2_16k")["export_dir"] and raw["seq_len"] == 16384
  cfg = config_lib.load_config(os.path.join(RECIPE, "ft_mage_16k.json"), {"data.workers": 0})
  model_cfg = ModelConfig.from_json_file(os.path.join(SHIPPED, "config.json"),
                                         **_raw("l2_16k")["model_overrides"])
  cfg.validate(model_cfg, "selfdistill")
  assert cfg.mage.budget == 1024 and cfg.mage.dense_layers == 2  # the paper's k at 16K
  assert cfg.export_max_shard_bytes < 16_000_000


def test_a_segment_trains_in_the_mode_it_is_given(monkeypatch, tmp_path):
  """stage.run_segment hands its mode to the trainer (selfdistill: a MAGE-FT segment) and
  records it; a mode the trainer lacks is a one-line ConfigError before any work."""
  modes = []
  monkeypatch.setattr(trainer, "train", lambda cfg, mode, **kw: modes.append(mode) or [{}] * 300)
  (tmp_path / "run").mkdir()  # an empty run folder is a fresh one
  record = stage_lib.run_segment(os.path.join(RECIPE, "ft_mage_16k.json"), SHIPPED, 1.0, 0,
                                 str(tmp_path / "run"), mode="selfdistill")
  assert modes == ["selfdistill"] and record["mode"] == "selfdistill" and record["complete"]
  with pytest.raises(ConfigError, match="--mode: must be one of"):
    stage_lib.run_segment(os.path.join(RECIPE, "ft_mage_16k.json"), SHIPPED, 1.0, 0,
                          str(tmp_path / "other"), mode="distill")


def test_the_8k_stage_packs_full_sequences_with_the_shipped_tokenizer(tmp_path):
  cfg = config_lib.load_config(os.path.join(RECIPE, "l1_8k.json"), {
      "data.workers": 0, "data.tokenizer": os.path.join(SHIPPED, "tokenizer.json")})
  assert config_lib.load_config(os.path.join(RECIPE, "l1_8k.json")).data.tokenizer == (
      "models/default/tokenizer.json")
  model_cfg = ModelConfig.from_json_file(os.path.join(SHIPPED, "config.json"),
                                         **dict(cfg.model_overrides))
  tokenizer = data_lib.load_tokenizer(cfg.data, model_cfg, cfg.seq_len, str(tmp_path))
  data = data_lib.PackedData(cfg.data, model_cfg, cfg.seq_len, tokenizer)
  rows = np.stack([data.sequence(i) for i in range(2)])
  assert rows.shape == (2, 8192)
  assert np.mean(rows == tokenizer.token_to_id("[UNK]")) < 0.02


@pytest.mark.parametrize("overrides,message", [
    ({"rope_theta": -1.0}, "model_overrides.rope_theta: must be a finite number > 0"),
    ({"rope_theta": 0}, "model_overrides.rope_theta"),
    ({"rope_theta": "5e5"}, "model_overrides.rope_theta"),
    ({"rope_theta": float("inf")}, "model_overrides.rope_theta"),
    ({"max_position_embeddings": 0}, "model_overrides.max_position_embeddings: must be an "
                                     "integer >= 1"),
    ({"max_position_embeddings": 8192.5}, "model_overrides.max_position_embeddings"),
    ({"max_position_embeddings": True}, "model_overrides.max_position_embeddings"),
    ({"rope_thetaa": 5e5}, "model_overrides: unknown field 'rope_thetaa'"),
])
def test_bad_position_overrides_are_one_line_errors(overrides, message):
  raw = {"model": "tiny_qwen2", "workdir": "w", "steps": 1, "seq_len": 8,
         "model_overrides": overrides}
  with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")) as e:
    config_lib.from_dict(raw)
  assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def short_checkpoint(tmp_path_factory):
  """A tiny model trained for 1024 positions at RoPE base 1e4, with a word tokenizer."""
  path = tmp_path_factory.mktemp("short")
  cfg = ModelConfig.preset("tiny_qwen2", vocab_size=32, max_position_embeddings=1024,
                           dtype="bfloat16")
  save_pretrained(build_model(cfg, seed=1), path)
  return str(path), cfg


def test_overrides_extend_a_loaded_checkpoint_and_keep_its_weights(short_checkpoint):
  path, cfg = short_checkpoint
  run = config_lib.from_dict({
      "model": path, "workdir": "w", "steps": 1, "seq_len": 2048,
      "model_overrides": {"rope_theta": 5e5, "max_position_embeddings": 131072}})
  model = trainer.initial_model(run)
  assert (model.config.rope_theta, model.config.max_position_embeddings) == (5e5, 131072)
  run.validate(model.config, "pretrain")  # 2048 > the checkpoint's own 1024 positions
  original, _ = load_pretrained(path)
  np.testing.assert_array_equal(np.asarray(model.embed_tokens.embedding[...]),
                                np.asarray(original.embed_tokens.embedding[...]))


def test_segment_plan_continues_the_stages_schedule():
  raw = _raw("l1_8k")
  assert stage_lib.segment_overrides(raw, 0) == {}
  total, optim = raw["steps"], config_lib.OptimConfig(**raw["optim"])
  _, stage_schedule = trainer.make_optimizer(optim, total)
  assert optim.warmup_steps == 50
  for done in (10, 45, 600, total - 1):
    plan = stage_lib.segment_overrides(raw, done, warmup=20)
    assert plan["steps"] == total - done
    assert plan["data.seed"] == raw["data"]["seed"] + done
    segment = config_lib.OptimConfig(**{**raw["optim"],
                                        "learning_rate": plan["optim.learning_rate"],
                                        "min_lr_ratio": plan["optim.min_lr_ratio"],
                                        "warmup_steps": plan["optim.warmup_steps"]})
    _, schedule = trainer.make_optimizer(segment, plan["steps"])
    if done < 50:  # inside the stage's warmup: reach the peak where the stage's warmup ends
      assert plan["optim.warmup_steps"] == max(20, 50 - done)
      np.testing.assert_allclose(float(schedule(max(20, 50 - done))), optim.learning_rate,
                                 rtol=1e-5)
    else:  # after its own warmup the segment runs at the rate the stage had reached
      assert plan["optim.warmup_steps"] == min(20, total - done - 1)
      np.testing.assert_allclose(float(schedule(plan["optim.warmup_steps"])),
                                 float(stage_schedule(done)), rtol=1e-5)
    # Every segment ends at the stage's final rate.
    np.testing.assert_allclose(float(schedule(plan["steps"])),
                               optim.learning_rate * optim.min_lr_ratio, rtol=1e-5)
  for done in (-1, total, total + 5):
    with pytest.raises(ConfigError, match=r"--steps_done: must be in \[0, 1500\)"):
      stage_lib.segment_overrides(raw, done)


def test_a_time_boxed_segment_exports_small_shards_with_the_new_positions(short_checkpoint,
                                                                           run_config, tmp_path):
  del run_config  # only for its corpus in tmp_path
  init, _ = short_checkpoint
  corpus = tmp_path / "cycle.jsonl"
  config = tmp_path / "stage.json"
  config.write_text(json.dumps({
      "model": "unused: the segment's --init", "workdir": "unused", "steps": 40,
      "seq_len": 32, "loss_chunk": 64, "remat": False, "log_every": 1,
      "model_overrides": {"rope_theta": 5e5, "max_position_embeddings": 131072},
      "export_max_shard_bytes": 40_000,
      "optim": {"batch_size": 2, "warmup_steps": 2, "learning_rate": 1e-3},
      "checkpoint": {"every": 100, "max_to_keep": 1, "async_save": False},
      "data": {"sources": [{"kind": "files", "paths": [str(corpus)]}], "seed": 4}}))
  run_dir = tmp_path / "segment"
  record = stage_lib.run_segment(str(config), init, 1e-4, 0, str(run_dir))
  # The time box stopped it after its first step; the stopped checkpoint was exported.
  assert (record["steps_this_segment"], record["steps_done"], record["complete"]) == (1, 1, False)
  assert record["tokens_this_segment"] == 2 * 32
  assert json.loads((run_dir / "progress.json").read_text())["steps_done"] == 1
  model_dir = run_dir / "model"
  shards = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
  assert len(shards) >= 2 and all(os.path.getsize(model_dir / f) <= 40_000 for f in shards)
  hf = json.loads((model_dir / "config.json").read_text())
  assert (hf["rope_theta"], hf["max_position_embeddings"]) == (5e5, 131072)
  model, cfg = load_pretrained(model_dir)
  assert cfg.rope_theta == 5e5
  tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
  with pytest.raises(ConfigError, match="is not empty"):
    stage_lib.run_segment(str(config), init, 1e-4, 0, str(run_dir))
