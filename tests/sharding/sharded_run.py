"""Decodes and trains a tiny model on one device and under meshes of 8 forced CPU devices, and
prints one JSON object with what tests/sharding/test_sharding.py compares.

Runs in its own process: the CPU device count (XLA_FLAGS) is fixed when JAX starts, and the
rest of the suite runs on one device. Usage: python tests/sharding/sharded_run.py
"""

from __future__ import annotations

import json
import os
import sys

FLAG = "--xla_force_host_platform_device_count=8"
if FLAG not in os.environ.get("XLA_FLAGS", ""):
  sys.exit(f"run with XLA_FLAGS={FLAG} (set before JAX starts)")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from mage_jax import ModelConfig, attention, build_model, generate, sharding
from mage_jax.methods import ExactAttention, MageAttention, common
from train import config as config_lib
from train import trainer

MESHES = {"1x8": {"data": 1, "model": 8}, "2x4": {"data": 2, "model": 4},
          "8x1": {"data": 8, "model": 1}}
# The meshes each method / training mode runs on (test_sharding.py asserts the same table).
# Adaptive MAGE's one extra step is a max over all KV heads, split 8 ways only by 1x8; MAGE-FT
# differs from pretraining in what the model axis splits (1x8, 2x4), not in the data split.
GENERATION_MESHES = {"exact": tuple(MESHES), "mage": tuple(MESHES), "mage_adaptive": ("1x8",)}
TRAINING_MESHES = {"pretrain": tuple(MESHES), "selfdistill": ("1x8", "2x4")}
BATCH = 8
# 16 query / 8 KV heads and an MLP hidden and vocabulary divisible by 8: every tensor the rules
# split can split 8 ways. Untied embeddings so the LM head is exercised too; 3 layers so that
# adaptive MAGE shares its budget between 2 sparse layers (a max over all KV heads).
OVERRIDES = dict(num_heads=16, num_kv_heads=8, head_dim=16, num_layers=3, vocab_size=128,
                 dtype="float32", tie_word_embeddings=False, eos_token_ids=(1,))


# (kernel, batch, query heads) of every attention kernel call traced since the last reset: under
# a mesh the kernels must see one shard, not the whole batch and every head.
KERNEL_CALLS: set[tuple[str, int, int]] = set()


def _record_kernel_calls(module, name: str) -> None:
  kernel = getattr(module, name)

  def recorded(q, *args, **kwargs):
    KERNEL_CALLS.add((name, q.shape[0], q.shape[2]))
    return kernel(q, *args, **kwargs)

  setattr(module, name, recorded)


for _module, _name in ((common, "exact_block_attention"), (common, "mask_step_attention"),
                       (common, "sparse_block_attention"),
                       (attention, "block_diffusion_attention")):
  _record_kernel_calls(_module, _name)


def _kernel_calls() -> list:
  calls = sorted(KERNEL_CALLS)
  KERNEL_CALLS.clear()
  return calls


def _spec(x) -> list:
  return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def _laid_out(x, mesh, axes) -> bool:
  """Whether x is sharded as the logical axes say (XLA drops mesh axes of size 1 from the specs
  it picks, so specs are compared by equivalence)."""
  expected = jax.sharding.NamedSharding(mesh, sharding.logical_spec(axes))
  return bool(x.sharding.is_equivalent_to(expected, x.ndim))


def _error(fn) -> str:
  try:
    fn()
  except ValueError as e:
    return str(e)
  return ""


def generation() -> dict:
  cfg = ModelConfig.preset("tiny_qwen2", **OVERRIDES)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(5, cfg.vocab_size, n).tolist() for n in (5, 9, 16, 23, 12, 30, 8, 17)]
  methods = {"exact": ExactAttention(), "mage": MageAttention(budget=8, dense_layers=1),
             "mage_adaptive": MageAttention(budget=8, dense_layers=1, adaptive=True)}
  run = lambda model, method, mesh=None: generate(model, prompts, max_new_tokens=16,
                                                  method=method, capacity=64, mesh=mesh)
  single = build_model(cfg, seed=1)
  out = {name: {"single": run(single, m).tokens} for name, m in methods.items()}
  out["mage"]["single_indices"] = np.asarray(run(single, methods["mage"]).method_state.indices)
  out["specs"], out["kernel_calls"] = {}, {"single": _kernel_calls()}
  for mesh_name, sizes in MESHES.items():
    mesh = sharding.make_mesh(sizes)
    model = build_model(cfg, seed=1)
    sharding.shard_model(model, mesh)
    for name, method in methods.items():
      if mesh_name not in GENERATION_MESHES[name]:
        continue
      result = run(model, method, mesh)
      out[name][mesh_name] = result.tokens
      if name == "mage":
        state = result.method_state
        out[name][f"{mesh_name}_indices_equal"] = bool(
            np.array_equal(np.asarray(state.indices), out["mage"]["single_indices"]))
        out["specs"][f"{mesh_name}/selections"] = _laid_out(
            state.indices, mesh, ("layers", "batch", "kv_heads", "slots"))
    out["kernel_calls"][mesh_name] = _kernel_calls()
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    cache = sharding.init_sharded_cache(cfg, BATCH, 64, mesh)
    out["specs"][mesh_name] = {
        "k_proj": _spec(attn.k_proj.kernel), "o_proj": _spec(attn.o_proj.kernel),
        "gate_up_proj": _spec(mlp.gate_up_proj.kernel), "down_proj": _spec(mlp.down_proj.kernel),
        "embed": _spec(model.embed_tokens.embedding), "lm_head": _spec(model.lm_head.kernel),
        "cache_k": _spec(cache.layers[0][0]), "cache_lengths": _spec(cache.lengths)}
  del out["mage"]["single_indices"]
  mesh_2x4 = sharding.make_mesh(MESHES["2x4"])
  narrow = build_model(ModelConfig.preset("tiny_qwen2", num_heads=8, num_kv_heads=2), seed=1)
  out["errors"] = {
      "kv_heads": _error(lambda: sharding.shard_model(narrow, sharding.make_mesh(MESHES["1x8"]))),
      "batch": _error(lambda: generate(single, prompts[:3], max_new_tokens=4, mesh=mesh_2x4)),
  }
  return out


def _train_config(mode: str) -> config_lib.TrainConfig:
  return config_lib.from_dict({
      "model": "tiny_qwen2", "model_overrides": {k: v for k, v in OVERRIDES.items()
                                                 if k != "eos_token_ids"},
      "workdir": "/nonexistent", "steps": 4, "seq_len": 32, "loss_chunk": 64,
      "optim": {"batch_size": BATCH, "grad_accum": 1, "warmup_steps": 0,
                "learning_rate": 1e-3},
      "mage": {"budget": 8, "dense_layers": 1},
  })


def training() -> dict:
  out = {"kernel_calls": {}}
  tokens = np.random.default_rng(1).integers(5, 128, (1, BATCH, 32)).astype(np.int32)
  for mode in ("pretrain", "selfdistill"):
    cfg = _train_config(mode)
    model = trainer.initial_model(cfg)
    layout = trainer.ParamLayout(model.config)
    params = layout.flatten(model)
    tx, schedule = trainer.make_optimizer(cfg.optim, cfg.steps)

    def one_step(mesh):
      # Fresh buffers per run: the step donates its state.
      state = trainer.initial_state({k: jnp.array(v) for k, v in params.items()}, tx, cfg.seed)
      frozen = trainer.FrozenWeights(
          {}, {k: jnp.array(v) for k, v in params.items()} if mode == "selfdistill" else {})
      if mesh is not None:
        state = jax.device_put(state, trainer.state_shardings(layout, tx, mesh))
        frozen = jax.device_put(frozen, trainer.frozen_shardings(layout, mode, mesh))
      step = trainer.make_train_step(cfg, mode, layout, tx, schedule, mesh)
      return step(state, tokens, frozen)

    ref_state, ref_metrics = one_step(None)
    _kernel_calls()
    ref_mu = ref_state.opt_state[1][0].mu
    results = {}
    for mesh_name in TRAINING_MESHES[mode]:
      mesh = sharding.make_mesh(MESHES[mesh_name])
      state, metrics = one_step(mesh)
      out["kernel_calls"][f"{mode}/{mesh_name}"] = _kernel_calls()
      mu = state.opt_state[1][0].mu
      name = "layers.1.self_attn.q_proj.kernel"
      results[mesh_name] = {
          "loss": [float(ref_metrics["loss"]), float(metrics["loss"])],
          "grad_norm": [float(ref_metrics["grad_norm"]), float(metrics["grad_norm"])],
          # Adam's first moment after one step is (1 - b1) * gradient.
          "max_grad_error": max(float(jnp.max(jnp.abs(mu[k] - ref_mu[k]))) for k in mu),
          "max_grad": max(float(jnp.max(jnp.abs(ref_mu[k]))) for k in mu),
          "max_param_error": max(float(jnp.max(jnp.abs(state.params[k] - ref_state.params[k])))
                                 for k in params),
          "laid_out": [_laid_out(x[name], mesh, ("embed", "q_heads", "head_dim"))
                       for x in (state.params, mu)],
      }
    out[mode] = results
  return out


def main() -> None:
  assert jax.device_count() == 8, jax.devices()
  print(json.dumps({"generation": generation(), "training": training()}, default=str))


if __name__ == "__main__":
  main()
