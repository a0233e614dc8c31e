"""Trainable subsets (all / attention / LoRA): adapters, partitioning, export, resume, options."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors
from flax import nnx

from mage_jax import ModelConfig, build_model
from mage_jax import checkpoint as hf_checkpoint
from mage_jax import lora as lora_lib
from pallas_kernels.dispatch import use_kernels
from train.attention import make_training_attend
from train import config as config_lib
from train import trainer

REPO = __file__.rsplit("/tests/", 1)[0]
ALL_TARGETS = tuple(lora_lib.TARGETS)


@nnx.jit
def _forward(model):
  seq = 16
  tokens = (jnp.arange(2 * seq, dtype=jnp.int32).reshape(2, seq) * 7) % model.config.vocab_size
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), tokens.shape)
  attend = make_training_attend(model.config.block_size)
  doubled = lambda x: jnp.concatenate([x, x], axis=1)
  with use_kernels("reference"):
    hidden, _ = model(doubled(tokens), doubled(positions), attend, None)
  return hidden.astype(jnp.float32), model.logits(hidden)


def _hidden_and_logits(model):
  """Hidden states and logits of a fixed doubled [x | x] batch (one compile per graph)."""
  return tuple(np.asarray(x) for x in _forward(model))


_build = nnx.jit(build_model, static_argnums=(0, 1))  # one compile, not one per initializer


def _random_adapters(model, seed=1):
  """Every adapter of ``model`` set to random values (b too: a trained adapter)."""
  values = lora_lib.adapter_values(model)
  keys = jax.random.split(jax.random.key(seed), len(values))
  return {n: 0.05 * jax.random.normal(k, v.shape) for k, (n, v) in zip(keys, values.items())}


def test_fresh_adapters_leave_the_model_exactly_as_it_was():
  cfg = ModelConfig.preset("tiny_qwen2", dtype="bfloat16")
  base = _build(cfg, 0)
  hidden, logits = _hidden_and_logits(base)
  adapted = lora_lib.attach(base, lora_lib.LoraConfig(rank=4, alpha=16.0, targets=ALL_TARGETS),
                            rngs=nnx.Rngs(3))
  assert isinstance(adapted.layers[1].self_attn.o_proj, lora_lib.LoRAProjection)
  assert np.any(np.asarray(adapted.layers[0].self_attn.q_proj.lora.lora_a.get_value()) != 0)
  adapted_hidden, adapted_logits = _hidden_and_logits(adapted)
  np.testing.assert_array_equal(adapted_hidden, hidden)  # b = 0: bitwise the base model
  np.testing.assert_array_equal(adapted_logits, logits)


def test_merged_model_equals_the_adapter_forward_and_is_plain_again():
  cfg = ModelConfig.preset("tiny_qwen2")  # float32: merging is exact up to float rounding
  lora = lora_lib.LoraConfig(rank=3, alpha=6.0, targets=("q_proj", "v_proj", "o_proj",
                                                          "down_proj"))
  base = _build(cfg, 0)
  base_kernel = base.layers[0].self_attn.o_proj.kernel.get_value()
  plain_names = {p for p, _ in nnx.to_flat_state(nnx.state(base, nnx.Param))}
  adapters = _random_adapters(lora_lib.attach(nnx.clone(base), lora))
  adapted = lora_lib.attach(base, lora, adapters=adapters)
  hidden, logits = _hidden_and_logits(adapted)
  merged = lora_lib.merge(adapted)
  assert not lora_lib.adapter_values(merged)
  assert {p for p, _ in nnx.to_flat_state(nnx.state(merged, nnx.Param))} == plain_names
  merged_hidden, merged_logits = _hidden_and_logits(merged)
  np.testing.assert_allclose(merged_hidden, hidden, atol=2e-5)
  np.testing.assert_allclose(merged_logits, logits, atol=2e-5)
  # PEFT's scale: alpha / rank times a @ b, on the flattened head axes (a sizeable change).
  a, b = (adapters[f"layers.0.self_attn.o_proj.lora.lora_{m}"] for m in "ab")
  np.testing.assert_allclose(merged.layers[0].self_attn.o_proj.kernel.get_value(),
                             base_kernel + 2.0 * (a @ b).reshape(base_kernel.shape), atol=1e-6)
  assert np.abs(2.0 * (a @ b)).max() > 0.02


def test_adapter_values_must_match_the_targets():
  cfg = ModelConfig.preset("tiny_qwen2")
  lora = lora_lib.LoraConfig(rank=2, targets=("q_proj",))
  base = _build(cfg, 0)
  adapters = lora_lib.adapter_values(lora_lib.attach(nnx.clone(base), lora))
  wrong = dict(adapters, **{"layers.0.self_attn.q_proj.lora.lora_a": jnp.zeros((64, 3))})
  with pytest.raises(ValueError, match=r"lora_a' has shape \(64, 3\), expected \(64, 2\)"):
    lora_lib.attach(nnx.clone(base), lora, adapters=wrong)
  with pytest.raises(ValueError, match="'layers.0.self_attn.k_proj.lora.lora_a' has no target"):
    lora_lib.attach(nnx.clone(base), lora, adapters={
        **adapters, "layers.0.self_attn.k_proj.lora.lora_a": jnp.zeros((64, 2))})


def test_attention_subset_updates_exactly_the_attention_weights(run_config):
  cfg = run_config(trainable="attention", **{"optim.grad_accum": 1})
  init = trainer.initial_model(cfg)
  layout = trainer.ParamLayout(init.config, "attention")
  params, shared = layout.split(init, seed=0)
  assert params and all(".self_attn." in n for n in params)
  assert set(shared) == {layout.name(p) for p, _ in layout.plain_variables} - set(params)
  assert all(v.dtype == jnp.float32 for v in params.values())
  tx, schedule = trainer.make_optimizer(cfg.optim, cfg.steps)
  state = trainer.initial_state(params, tx, 0)
  before = jax.tree.map(np.asarray, state.params)
  assert set(state.opt_state[1][0].mu) == set(params)  # moments for the trainable subset only
  step = trainer.make_train_step(cfg, "pretrain", layout, tx, schedule)
  tokens = jax.random.randint(jax.random.key(0), (1, 4, cfg.seq_len), 4, 32)
  state, metrics = step(state, tokens, trainer.FrozenWeights(shared, {}))
  state, metrics = step(state, tokens, trainer.FrozenWeights(shared, {}))
  assert np.isfinite(float(metrics["loss"]))
  for name, value in state.params.items():  # gradients reached every trainable weight
    assert np.any(np.asarray(value) != before[name]), name


def _source_checkpoint(path):
  """A sharded tiny Qwen2 checkpoint in bfloat16 with the extra files a real one has."""
  cfg = ModelConfig.preset("tiny_qwen2", vocab_size=32, dtype="bfloat16")
  hf_checkpoint.save_pretrained(build_model(cfg, seed=5), path, max_shard_bytes=40_000)
  with open(path / "config.json") as f:
    config = json.load(f)
  config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
  (path / "config.json").write_text(json.dumps(config))
  (path / "modeling_x.py").write_text("# custom modelling code\n")
  (path / "README.md").write_text("the source model's card\n")
  return path


def _restored(workdir, step):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  manager.close()
  return state


def test_lora_run_resumes_exactly_and_exports_in_the_source_layout(run_config, tmp_path,
                                                                   monkeypatch):
  source = _source_checkpoint(tmp_path / "source")
  export_dir = tmp_path / "export"
  cfg = run_config(model=str(source), steps=3, trainable="lora", export_dir=str(export_dir),
                   model_overrides={}, **{"lora.rank": 4, "lora.alpha": 8,
                                          "optim.learning_rate": 3e-2, "optim.grad_accum": 1})
  head = trainer.train(cfg, "selfdistill", stop_at_step=2)
  assert len(head) == 2 and not export_dir.exists()
  saved = _restored(cfg.workdir, 2)
  assert set(saved["params"]) == {n for n in saved["params"] if lora_lib.is_adapter_name(n)}
  assert len(saved["params"]) == 2 * 4 * 2  # layers x targets x (a, b)

  restored = []
  original_restore = trainer.Checkpoints.restore

  def restore(self, step, abstract):  # a host copy: the step donates the restored buffers
    state, meta = original_restore(self, step, abstract)
    restored.append(jax.tree.map(np.asarray, state))
    return state, meta

  monkeypatch.setattr(trainer.Checkpoints, "restore", restore)
  tail = trainer.train(cfg, "selfdistill")
  assert len(tail) == 1 and len(restored) == 1
  # Adapters, Adam moments, step, key and data position: exactly what was saved.
  got, want = jax.tree.leaves(restored[0]._asdict()), jax.tree.leaves(saved)  # by field name
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The source's own layout: same files, same tensor names and dtypes per file, config.json and
  # other files as they were (not the model card).
  source_files = sorted(os.listdir(source))
  assert sorted(os.listdir(export_dir)) == sorted(
      [f for f in source_files if f != "README.md"] + ["adapter", "tokenizer.json"])
  assert len([f for f in source_files if f.endswith(".safetensors")]) > 1
  for name in ("config.json", "modeling_x.py", "model.safetensors.index.json"):
    assert (export_dir / name).read_text() == (source / name).read_text()
  changed = set()
  for file in (f for f in source_files if f.endswith(".safetensors")):
    with safetensors.safe_open(source / file, "np") as old, \
         safetensors.safe_open(export_dir / file, "np") as new:
      assert list(new.keys()) == list(old.keys())
      for k in old.keys():
        assert new.get_slice(k).get_dtype() == old.get_slice(k).get_dtype() == "BF16"
        if not np.array_equal(new.get_tensor(k), old.get_tensor(k)):
          changed.add(k)
  # Only the adapted projections moved (LoRA's default targets: q/k/v/o kernels, no biases).
  assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight"
                     for i in range(2) for p in "qkvo"}

  # The merged export equals the base model with the adapters alone attached.
  lora, adapters = hf_checkpoint.load_adapter(export_dir / "adapter", ModelConfig.preset(
      "tiny_qwen2", vocab_size=32, dtype="bfloat16"))
  assert lora == lora_lib.LoraConfig(rank=4, alpha=8.0)
  final = _restored(cfg.workdir, 3)["params"]
  for name, value in adapters.items():
    np.testing.assert_array_equal(value, np.asarray(final[name]))
  base, _ = hf_checkpoint.load_pretrained(source, dtype="float32")
  merged, _ = hf_checkpoint.load_pretrained(export_dir, dtype="float32")
  _, adapted_logits = _hidden_and_logits(lora_lib.attach(base, lora, adapters=adapters))
  _, merged_logits = _hidden_and_logits(merged)
  assert np.abs(merged_logits - _hidden_and_logits(
      hf_checkpoint.load_pretrained(source, dtype="float32")[0])[1]).max() > 1e-3
  np.testing.assert_allclose(merged_logits, adapted_logits, atol=0.05)  # bf16 kernels

  # Another subset cannot take the run over.
  other = run_config(model=str(source), steps=4, trainable="attention", model_overrides={})
  with pytest.raises(config_lib.ConfigError, match=r"trainable = lora \{.*\}, not attention"):
    trainer.train(other, "selfdistill")


def test_adapter_files_are_peft_shaped_and_checked(tmp_path):
  cfg = ModelConfig.preset("tiny_qwen2")
  lora = lora_lib.LoraConfig(rank=4, alpha=5.0, targets=("k_proj", "o_proj"))
  adapters = _random_adapters(lora_lib.attach(_build(cfg, 0), lora))
  hf_checkpoint.save_adapter(tmp_path, adapters, lora, base_model="some/base")
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert (config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]) == (
      "LORA", 4, 5, ["k_proj", "o_proj"])
  with safetensors.safe_open(tmp_path / "adapter_model.safetensors", "np") as f:
    assert f.get_tensor("base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"
                        ).shape == (4, 64)  # [rank, in]
    assert f.get_tensor("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
                        ).shape == (32, 4)  # [out = 2 KV heads x 16, rank]
  loaded_lora, loaded = hf_checkpoint.load_adapter(tmp_path, cfg)
  assert loaded_lora == lora and set(loaded) == set(adapters)
  for name, value in adapters.items():
    np.testing.assert_array_equal(loaded[name], np.asarray(value))
  with pytest.raises(ValueError, match="lora.rank: 4 exceeds k_proj's smaller dimension 2"):
    hf_checkpoint.load_adapter(tmp_path, ModelConfig.preset("tiny_qwen2", num_kv_heads=1,
                                                             head_dim=2, num_heads=2))
  config["use_dora"] = True
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="use_dora = True is not supported"):
    hf_checkpoint.load_adapter(tmp_path, cfg)


@pytest.mark.parametrize("overrides, message", [
    ({"lora.targets": ["q_proj", "qkv"]}, "lora.targets: unknown module 'qkv'; known: q_proj"),
    ({"lora.rank": 0}, "lora.rank: must be >= 1, got 0"),
    ({"lora.rank": 40}, "lora.rank: 40 exceeds k_proj's smaller dimension 32 (in 64, out 32)"),
    ({"lora.alpha": -1}, "lora.alpha: must be > 0"),
    ({"trainable": "mlp"}, "trainable: must be one of ('all', 'attention', 'lora')"),
])
def test_bad_trainable_options_are_config_errors(overrides, message):
  raw = {"model": "tiny_qwen2", "workdir": "/tmp/x", "steps": 1, "seq_len": 64,
         "trainable": "lora"}
  cfg = config_lib.from_dict(config_lib.apply_overrides(raw, overrides))
  with pytest.raises(config_lib.ConfigError) as error:
    cfg.validate(ModelConfig.preset("tiny_qwen2"), "selfdistill")
  assert message in str(error.value)


def test_lora_options_without_lora_and_on_the_command_line(tmp_path):
  cfg = config_lib.from_dict({"model": "tiny_qwen2", "workdir": "/tmp/x", "steps": 1,
                              "seq_len": 64, "lora": {"rank": 8}})
  with pytest.raises(config_lib.ConfigError, match='lora: applies to trainable = "lora" only'):
    cfg.validate(ModelConfig.preset("tiny_qwen2"), "pretrain")
  config = tmp_path / "run.json"
  config.write_text(json.dumps({"model": "tiny_qwen2", "workdir": str(tmp_path / "run"),
                                "steps": 1, "seq_len": 32}))
  result = subprocess.run([sys.executable, "-m", "train", "--mode=selfdistill",
                           f"--config={config}", "--set", "trainable=lora", "--set",
                           'lora.targets=["q_proj","gate_proj"]'],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "mage-train: error: lora.targets: unknown module 'gate_proj'; known: q_proj, k_proj, "
      "v_proj, o_proj, down_proj"]


def test_memory_plan_of_the_7b_shape_comes_from_abstract_shapes():
  from train import memory

  model_cfg = ModelConfig.preset("fast_dllm_v2_7b")
  total_params = 7_615_616_512  # 2 x 152064 x 3584 + 28 x 233_057_792 + 3584
  attention_params = 28 * (2 * (3584 * 3584) + 3584 + 2 * (3584 * 512 + 512))
  lora_params = 28 * 64 * (2 * (3584 + 3584) + 2 * (3584 + 512))  # r (in + out) per target
  plans = {t: memory.plan(memory.benchmark_config("fast_dllm_v2_7b", t, 32768), model_cfg,
                          "selfdistill") for t in ("attention", "lora")}
  for trainable, params in (("attention", attention_params), ("lora", lora_params)):
    p = plans[trainable]
    assert p["trainable_params"] == params
    assert p["master_f32"] == p["gradients_f32"] == 4 * params
    assert 0 <= p["optimizer"] - 8 * params < 64  # m and v, plus optax's step counts
    base_trained = 0 if trainable == "lora" else params  # adapters are no base weights
    assert p["frozen"] == 2 * (total_params - base_trained)  # bf16, shared with the teacher
    assert p["teacher"] == 2 * base_trained
  # docs/training.md's plan: A (attention) and B (LoRA r = 64) in GB.
  gb = lambda x: round(x / 1e9, 1)
  a, b = plans["attention"], plans["lora"]
  assert (attention_params, lora_params) == (822_212_608, 40_370_176)
  assert gb(a["master_f32"] + a["optimizer"] + a["gradients_f32"]) == 13.2
  assert (gb(a["frozen"]), gb(a["teacher"]), gb(a["forward_copy"])) == (13.6, 1.6, 1.6)
  assert gb(b["master_f32"] + b["optimizer"] + b["gradients_f32"]) == 0.6
  assert (gb(b["frozen"]), b["teacher"]) == (15.2, 0)  # the teacher is the frozen base
  # Activations at 32K, 2 views: residuals 131K x 3584 x 2 B x 28 layers.
  assert b["residuals"] == 2 * 2 * 32768 * 3584 * 2 * 28
  assert b["total"] < memory.H100_BYTES < a["total"]


def test_views_one_after_the_other_give_the_same_loss_and_gradient(run_config):
  # With the selection loss on (budget 8: blocks 2-3 of 4 count), whose All-[MASK] pass runs
  # once per sequence when the views go together and once per view when split.
  results = []
  for split in (False, True):
    cfg = run_config(trainable="lora", split_views=split, **{"optim.grad_accum": 1,
                                                            "lora.rank": 4,
                                                            "mage.selection_weight": 0.5})
    init = trainer.initial_model(cfg)
    layout = trainer.ParamLayout(init.config, cfg.trainable, cfg.lora)
    params, shared = layout.split(init, seed=0)
    # b = 0 gives a = 0 gradients at the first step: start from a trained-looking adapter.
    params = {k: v + 0.1 * jax.random.normal(jax.random.key(len(k)), v.shape)
              for k, v in params.items()}
    tx, schedule = trainer.make_optimizer(cfg.optim, cfg.steps)
    step = trainer.make_train_step(cfg, "selfdistill", layout, tx, schedule)
    tokens = jax.random.randint(jax.random.key(0), (1, 4, cfg.seq_len), 4, 32)
    state, metrics = step(trainer.initial_state(params, tx, 0), tokens,
                          trainer.FrozenWeights(shared, layout.teacher_weights(params)))
    results.append((jax.tree.map(float, metrics), jax.tree.map(np.asarray, state.opt_state)))
  (joint, joint_opt), (split, split_opt) = results
  assert joint["kl"] > 1e-3 and joint["sel"] > 0  # a KL to weigh
  for key in ("loss", "ce", "kl", "sel", "grad_norm"):
    np.testing.assert_allclose(split[key], joint[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(split_opt), jax.tree.leaves(joint_opt)):  # Adam's m, v
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)


def test_export_in_the_source_layout_writes_the_changed_positions_into_config_json(tmp_path):
  # A long-context stage loads a checkpoint with a new RoPE base and more positions: the copied
  # config.json must carry them, in the source's own spelling, and keep its other keys.
  source = _source_checkpoint(tmp_path / "source")
  with open(source / "config.json") as f:
    config = json.load(f)
  config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
  (source / "config.json").write_text(json.dumps(config))
  model, _ = hf_checkpoint.load_pretrained(
      source, config_overrides={"rope_theta": 5e5, "max_position_embeddings": 131072})
  hf_checkpoint.save_pretrained_like(model, tmp_path / "out", source)
  with open(tmp_path / "out" / "config.json") as f:
    written = json.load(f)
  assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e5}
  assert "rope_theta" not in written
  assert written["max_position_embeddings"] == 131072
  assert written["auto_map"] == config["auto_map"]
  assert hf_checkpoint.load_pretrained(tmp_path / "out")[0].config == model.config

  # Unchanged, the file is copied byte for byte.
  unchanged, _ = hf_checkpoint.load_pretrained(source)
  hf_checkpoint.save_pretrained_like(unchanged, tmp_path / "same", source)
  assert (tmp_path / "same" / "config.json").read_text() == (source / "config.json").read_text()
