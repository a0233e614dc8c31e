"""The noising, the prediction positions and the MAGE-FT loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.config import ModelConfig
from mage_jax.model import build_model
from pallas_kernels.dispatch import use_kernels
from train import objective

BLOCK = 8


def test_complementary_views_mask_every_token_exactly_once():
  tokens = jnp.arange(64, dtype=jnp.int32).reshape(2, 32) + 10
  views = objective.noise_views(jax.random.key(0), tokens, block_size=BLOCK, mask_id=3,
                                eps=0.01, complementary=True)
  masked = np.asarray(views.masked)
  np.testing.assert_array_equal(masked[:2] ^ masked[2:], True)
  noise = np.asarray(views.noise)
  np.testing.assert_allclose(noise[:2] + noise[2:], 1.0, rtol=1e-6)
  assert np.all((noise >= 0.01) & (noise <= 0.99))
  # One level per block, and the mask id exactly where masked.
  np.testing.assert_array_equal(noise.reshape(4, 4, BLOCK).std(-1), 0)
  np.testing.assert_array_equal(np.asarray(views.noisy) == 3, masked)


def test_token_shift_predicts_block_starts_from_the_clean_stream():
  h_noisy = jnp.arange(16.0).reshape(1, 16, 1)
  h_clean = 100 + h_noisy
  hidden, scored = objective.predicting_hidden(h_noisy, h_clean, 4, token_shift=True)
  expected = [0, 0, 1, 2, 103, 4, 5, 6, 107, 8, 9, 10, 111, 12, 13, 14]
  np.testing.assert_array_equal(np.asarray(hidden[0, :, 0]), expected)
  np.testing.assert_array_equal(np.asarray(scored), np.arange(16) > 0)
  same, scored = objective.predicting_hidden(h_noisy, h_clean, 4, token_shift=False)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(h_noisy))
  assert np.all(np.asarray(scored))


def test_chunked_losses_match_unchunked():
  cfg = ModelConfig.preset("tiny_qwen2", dtype="float32")
  model = build_model(cfg, seed=1)
  hidden = jax.random.normal(jax.random.key(1), (2, 24, cfg.hidden_size))
  teacher_hidden = hidden + jax.random.normal(jax.random.key(4), hidden.shape)
  targets = jax.random.randint(jax.random.key(2), (2, 24), 0, cfg.vocab_size)
  weights = jax.random.uniform(jax.random.key(3), (2, 24))
  kl_mask = weights > 0.5
  ce, kl = objective.chunked_losses(model, hidden, targets, weights, chunk=7, teacher=model,
                                    teacher_hidden=teacher_hidden, kl_mask=kl_mask)
  log_p = jax.nn.log_softmax(model.logits(hidden))
  log_q = jax.nn.log_softmax(model.logits(teacher_hidden))
  expected_ce = -jnp.sum(weights * jnp.take_along_axis(log_p, targets[..., None], -1)[..., 0])
  expected_kl = jnp.sum(kl_mask * jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1))
  np.testing.assert_allclose(ce, expected_ce, rtol=1e-5)
  np.testing.assert_allclose(kl, expected_kl, rtol=1e-4)


def _selfdistill_terms(budget, seq=32):
  cfg = ModelConfig.preset("tiny_qwen2", dtype="float32")
  model = build_model(cfg, seed=0)
  tokens = jax.random.randint(jax.random.key(5), (2, seq), 4, cfg.vocab_size)
  views = objective.noise_views(jax.random.key(6), tokens, block_size=cfg.block_size,
                                mask_id=cfg.mask_token_id, eps=0.05, complementary=True)
  with use_kernels("reference"):
    selections = objective.select_keys(model, views, budget=budget, dense_layers=1,
                                       selection_queries="all_mask", alpha_includes_block=True,
                                       score_chunk=8, num_views=2)
    teacher_states = objective.teacher_states(model, views)
    _, metrics = objective.selfdistill_loss(model, model, views, selections, teacher_states,
                                            kl_weight=1.0, chunk=16, remat=False)
    pretrain, _ = objective.pretrain_loss(model, views, chunk=16, remat=False)
  return metrics, pretrain


def test_kl_is_zero_when_the_student_attends_exactly():
  metrics, pretrain = _selfdistill_terms(budget=32)
  assert abs(float(metrics["kl"])) < 1e-6
  np.testing.assert_allclose(metrics["ce"], pretrain, rtol=1e-5)


def test_kl_is_positive_when_the_budget_drops_keys():
  metrics, _ = _selfdistill_terms(budget=2)
  assert float(metrics["kl"]) > 1e-5


@pytest.mark.parametrize("queries", ["all_mask", "noisy"])
@pytest.mark.parametrize("includes_block", [True, False])
def test_selection_options_select_within_earlier_blocks(queries, includes_block):
  cfg = ModelConfig.preset("tiny_qwen2", dtype="float32")
  model = build_model(cfg, seed=0)
  tokens = jax.random.randint(jax.random.key(5), (1, 32), 4, cfg.vocab_size)
  views = objective.noise_views(jax.random.key(6), tokens, block_size=cfg.block_size,
                                mask_id=cfg.mask_token_id, eps=0.05, complementary=True)
  with use_kernels("reference"):
    selections = objective.select_keys(model, views, budget=4, dense_layers=1,
                                       selection_queries=queries,
                                       alpha_includes_block=includes_block, score_chunk=8,
                                       num_views=2)
  assert selections[0] is None
  indices, counts = (np.asarray(x) for x in selections[1])
  assert indices.shape == (2, 4, cfg.num_kv_heads, 4)
  np.testing.assert_array_equal(counts[0, :, 0], [0, 4, 4, 4])
  starts = np.arange(4)[None, :, None, None] * cfg.block_size
  used = np.arange(4) < counts[..., None]
  assert np.all(indices[used] < np.broadcast_to(starts, indices.shape)[used])


def test_training_view_predicts_what_a_decoding_step_predicts():
  # The noisy half of the training forward, with a block holding a prompt tail and [MASK]s and
  # nothing clean after it, must give the logits of the decoding step that sees the same block
  # over a prefilled cache: otherwise the model is trained on a view decoding never shows it.
  import importlib
  generate_lib = importlib.import_module("mage_jax.generate")  # the package exports generate()
  from mage_jax.kv_cache import init_cache
  from mage_jax.methods import ExactAttention, StepInfo
  from train import attention

  cfg = ModelConfig.preset("tiny_qwen2", vocab_size=64, dtype="float32", block_size=BLOCK)
  model = build_model(cfg, seed=3)
  seq, tail = 4 * BLOCK, 3  # the answer block starts at 2 * BLOCK; 3 of its tokens are prompt
  start = 2 * BLOCK
  tokens = jax.random.randint(jax.random.key(1), (1, seq), 5, 64)
  positions = jnp.arange(seq)
  in_block = (positions >= start) & (positions < start + BLOCK)
  noisy = jnp.where(in_block & (positions >= start + tail), cfg.mask_token_id, tokens)
  clean = jnp.where(positions >= start, 0, tokens)  # later blocks do not exist yet
  attend = attention.make_training_attend(BLOCK)
  with use_kernels("reference"):
    h_noisy, h_clean, _ = objective.doubled_forward(model, noisy, clean, attend, None)
  hidden, _ = objective.predicting_hidden(h_noisy, h_clean, BLOCK, cfg.token_shift)
  trained = model.logits(hidden)[0, start:start + BLOCK]

  method = ExactAttention()
  cache = init_cache(cfg, 1, seq)
  state = method.init_state(cfg, 1, seq)
  cache, state, prev_logits = generate_lib.prefill(model, tokens, jnp.array([start]), cache,
                                                   method, state, chunk=seq)
  logits, _ = generate_lib.forward_denoise(model, noisy[:, start:start + BLOCK], cache, method,
                                           state, StepInfo(True, jnp.int32(0)))
  decoded = jnp.concatenate([prev_logits[:, None], logits[:, :-1]], axis=1)[0]
  np.testing.assert_allclose(decoded, trained, atol=2e-5, rtol=2e-5)


@functools.cache
def _selection_setup():
  """A tiny float32 model (layer 0 dense, layer 1 sparse), two sequences of four blocks in both
  complementary views, their selections at budget 4 (blocks 1-3 see more keys than that), the
  teacher's keys, and the selection loss's value and gradient in the model's weights (one
  compilation), shared by the selection-loss tests."""
  from train import trainer

  cfg = ModelConfig.preset("tiny_qwen2", dtype="float32")
  model = build_model(cfg, seed=0)
  tokens = jax.random.randint(jax.random.key(5), (2, 4 * cfg.block_size), 4, cfg.vocab_size)
  views = objective.noise_views(jax.random.key(6), tokens, block_size=cfg.block_size,
                                mask_id=cfg.mask_token_id, eps=0.05, complementary=True)
  with use_kernels("reference"):
    selections = objective.select_keys(model, views, budget=4, dense_layers=1,
                                       selection_queries="all_mask", alpha_includes_block=True,
                                       score_chunk=8, num_views=2)
    teacher = objective.teacher_states(model, views, selection_dense_layers=1)
  layout = trainer.ParamLayout(cfg, "all")
  params, shared = layout.split(build_model(cfg, seed=0), seed=0)

  @jax.jit
  def value_and_grad(keys):
    def loss(p):
      with use_kernels("reference"):
        return objective.selection_loss(layout.model(p, shared), views, 4, keys,
                                        alpha_includes_block=True, score_chunk=6, num_views=2,
                                        remat=False)
    return jax.value_and_grad(loss)(params)

  return cfg, model, views, selections, teacher, value_and_grad


def test_selection_loss_is_zero_when_the_later_steps_attend_as_the_first():
  cfg, model, views, _, teacher, value_and_grad = _selection_setup()
  assert teacher.keys[0] is None and teacher.keys[1] is not None
  # The teacher is the student and its x_t is all [MASK]: the target is the student's own alpha.
  all_mask = views._replace(noisy=jnp.full_like(views.noisy, cfg.mask_token_id))
  with use_kernels("reference"):
    same = objective.teacher_states(model, all_mask, selection_dense_layers=1)
  assert abs(float(value_and_grad(same.keys)[0])) < 1e-7
  assert float(value_and_grad(teacher.keys)[0]) > 1e-5  # random weights: near uniform


def test_selection_loss_trains_what_feeds_the_sparse_layers_queries_and_keys():
  _, _, _, _, teacher, value_and_grad = _selection_setup()
  _, grads = value_and_grad(teacher.keys)
  moved = {name for name, g in grads.items() if np.any(np.asarray(g) != 0)}
  # The sparse layer's q/k (and its input norm), and everything upstream of them: the
  # embedding and the whole dense layer 0 (its output feeds layer 1's q/k).
  for name in ("layers.1.self_attn.q_proj", "layers.1.self_attn.k_proj",
               "layers.1.input_layernorm", "layers.0.self_attn.q_proj",
               "layers.0.self_attn.v_proj", "layers.0.mlp", "embed_tokens"):
    assert any(name in m for m in moved), name
  # Nothing after them: the sparse layer's values, output projection, MLP and the final norm.
  for name in ("layers.1.self_attn.v_proj", "layers.1.self_attn.o_proj", "layers.1.mlp",
               "layers.1.post_attention_layernorm", "model.norm"):
    assert not any(name in m for m in moved), name
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads.values())


def test_selection_weight_zero_is_the_papers_loss_and_adds_its_term_otherwise():
  _, model, views, selections, teacher, _ = _selection_setup()
  run = lambda weight: objective.selfdistill_loss(
      model, model, views, selections, teacher, kl_weight=1.0, chunk=16, remat=False,
      selection_weight=weight, score_chunk=6, num_views=2)
  with use_kernels("reference"):
    (loss, metrics), (weighted, weighted_metrics) = run(0.0), run(0.5)
  assert set(metrics) == {"loss", "ce", "kl"}
  assert float(loss) == float(metrics["ce"] + metrics["kl"])
  for key in ("ce", "kl"):
    assert float(weighted_metrics[key]) == float(metrics[key]), key
  assert float(weighted_metrics["sel"]) > 1e-5
  np.testing.assert_allclose(weighted, loss + 0.5 * weighted_metrics["sel"], rtol=1e-6)
  with pytest.raises(ValueError, match="needs the teacher's keys"):  # not a silent 0
    objective.selfdistill_loss(model, model, views, selections, teacher._replace(keys=()),
                               kl_weight=1.0, chunk=16, remat=False, selection_weight=0.5)


@pytest.mark.parametrize("weight", [-0.5, float("nan")])
def test_negative_selection_weight_is_a_config_error(weight):
  from train import config as config_lib

  cfg = config_lib.from_dict({"model": "tiny_qwen2", "workdir": "/tmp/x", "steps": 1,
                              "seq_len": 64, "mage": {"selection_weight": weight}})
  with pytest.raises(config_lib.ConfigError,
                     match=r"^mage.selection_weight: must be >= 0, got (-0.5|nan)$"):
    cfg.validate(ModelConfig.preset("tiny_qwen2"), "selfdistill")
