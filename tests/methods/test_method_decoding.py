"""Methods inside the decoding loop: full budgets reproduce exact attention, decoding is
deterministic, a method's state keeps its structure."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax import DecodeOptions, ModelConfig, build_model, generate
from mage_jax.generate import forward_denoise, prefill
from mage_jax.kv_cache import init_cache
from mage_jax.methods import (ExactAttention, MageAttention, OracleAttention, QuestAttention,
                              SparseDAttention, StepInfo, TidalAttention)

CAPACITY = 48
PROMPT, NEW = 27, 16  # 3 full prompt blocks of 8 (+ a tail of 3): a context of 24..48 rows


def _setup():
  cfg = ModelConfig.preset("tiny_qwen2", num_layers=4, dtype="float32", eos_token_ids=(1,))
  model = build_model(cfg, seed=2)
  prompt = np.random.default_rng(0).integers(5, cfg.vocab_size, PROMPT).tolist()
  return cfg, model, prompt


# Budgets >= the capacity: every method must attend every row.
FULL = [
    MageAttention(budget=64, dense_layers=1),
    MageAttention(budget=64, dense_layers=1, adaptive=True, min_budget=64),
    QuestAttention(budget=64, page_size=4, dense_layers=1),
    TidalAttention(budget=64, dense_layers=1, selection_layer=1),
    SparseDAttention(dense_fraction=0.25, nominal_steps=8, tile_size=4, budget=64, dense_layers=1),
    OracleAttention(budget=64, dense_layers=1),
]

SPARSE = [
    MageAttention(budget=6, dense_layers=1),
    MageAttention(budget=6, dense_layers=1, adaptive=True),
    QuestAttention(budget=8, page_size=4, dense_layers=1),
    TidalAttention(budget=6, dense_layers=1, selection_layer=1),
    SparseDAttention(dense_fraction=0.25, nominal_steps=8, tile_size=4, budget=8, dense_layers=1),
    OracleAttention(budget=6, dense_layers=1),
]


def _id(method):
  return method.name + ("-adaptive" if getattr(method, "adaptive", False) else "")


@pytest.mark.parametrize("method", FULL, ids=_id)
def test_full_budget_per_step_logits_match_exact(method):
  cfg, model, prompt = _setup()
  buffer = jnp.zeros((1, CAPACITY), jnp.int32).at[0, :PROMPT].set(jnp.asarray(prompt))
  full = PROMPT // cfg.block_size * cfg.block_size
  rng = np.random.default_rng(1)
  exact = ExactAttention()
  cache, _, _ = prefill(model, buffer, jnp.asarray([full]), init_cache(cfg, 1, CAPACITY), exact,
                        (), chunk=CAPACITY)
  state = method.init_state(cfg, 1, CAPACITY)
  for layer in range(cfg.num_layers):
    state = method.after_write(layer, cache.layer(layer), state)
  for step in range(4):  # later steps see other tokens, as the block gets unmasked
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (1, cfg.block_size)), jnp.int32)
    info = StepInfo(step == 0, jnp.int32(step))
    expected, _ = forward_denoise(model, tokens, cache, exact, (), info)
    logits, state = forward_denoise(model, tokens, cache, method, state, info)
    np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=2e-5, err_msg=f"step {step}")


def test_full_budget_mage_generates_what_exact_generates():
  cfg, model, prompt = _setup()
  options = DecodeOptions.for_model(cfg)
  exact = generate(model, [prompt], max_new_tokens=NEW, options=options, capacity=CAPACITY)
  mage = generate(model, [prompt], max_new_tokens=NEW, options=options, capacity=CAPACITY,
                  method=FULL[0])
  assert mage.tokens == exact.tokens and len(exact.tokens[0]) > 0


@pytest.mark.parametrize("method", SPARSE, ids=_id)
def test_decoding_is_deterministic(method):
  cfg, model, prompt = _setup()
  # fixed_steps: every block runs all 8 steps, so SparseD reaches its sparse steps.
  options = DecodeOptions.for_model(cfg, policy="fixed_steps", steps_per_block=8)
  runs = [generate(model, [prompt, prompt[:13]], max_new_tokens=NEW, options=options,
                   capacity=CAPACITY, method=method) for _ in range(2)]
  assert runs[0].tokens == runs[1].tokens
  np.testing.assert_array_equal(runs[0].buffer, runs[1].buffer)
  for a, b in zip(jax.tree.leaves(runs[0].method_state), jax.tree.leaves(runs[1].method_state)):
    np.testing.assert_array_equal(a, b)  # the selections too


@dataclasses.dataclass(frozen=True)
class _GrowingState(ExactAttention):
  """Breaks the state contract: after_step adds an entry to the state."""

  def after_step(self, state, stats):
    return state + (jnp.zeros(()),)


def test_after_step_that_changes_the_state_structure_is_rejected():
  cfg = ModelConfig.preset("tiny_qwen2", dtype="float32")
  model = build_model(cfg, seed=0)
  cache = init_cache(cfg, 1, 2 * cfg.block_size)
  tokens = jnp.full((1, cfg.block_size), cfg.mask_token_id, jnp.int32)
  with pytest.raises(ValueError, match=r"_GrowingState\.after_step changed its state's structure"):
    forward_denoise(model, tokens, cache, _GrowingState(), (), StepInfo(True, jnp.int32(0)))
