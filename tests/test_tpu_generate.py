"""generate() through the Pallas TPU (Mosaic) kernels, run in TPU interpret mode on the CPU,
decodes what the plain-JAX references decode, token for token: prefill and commits through the
TPU flash kernel, exact steps through the TPU decode kernel, MAGE's first step through the TPU
mask step and its later steps through the TPU sparse gather."""

import numpy as np
import pytest

from mage_jax import DecodeOptions, ModelConfig, build_model, generate
from mage_jax.methods import MageAttention
from pallas_kernels import dispatch

CAPACITY = 64


# MAGE's dense layer 0 runs exact attention through the TPU decode kernel, so the second preset
# (q/k norms, the SDAR policy) decodes with MAGE only: every kernel still runs on both.
@pytest.mark.parametrize("preset,policy,exact", [("tiny_qwen2", "fast_dllm_v2", True),
                                                 ("tiny_qwen3", "sdar", False)])
def test_generate_through_the_tpu_kernels_equals_the_reference_path(preset, policy, exact):
  cfg = ModelConfig.preset(preset, num_layers=2, dtype="float32", eos_token_ids=(1,))
  model = build_model(cfg, seed=3)
  rng = np.random.default_rng(0)
  # A ragged batch: prompts that end mid-block and on a block boundary.
  prompts = [rng.integers(5, cfg.vocab_size, n).tolist() for n in (21, 2 * cfg.block_size)]
  # MAGE with a budget below the context: its later steps attend gathered rows only.
  methods = [None] * exact + [MageAttention(budget=6, dense_layers=1)]
  for method in methods:
    runs = [generate(model, prompts, max_new_tokens=12, capacity=CAPACITY, method=method,
                     options=DecodeOptions.for_model(cfg, policy=policy, kernels=kernels))
            for kernels in ("reference", "mosaic_interpret")]
    assert runs[1].tokens == runs[0].tokens, (preset, method)
    assert all(len(t) > 0 for t in runs[0].tokens)


def test_entry_points_hand_mosaic_to_the_tpu_kernels(monkeypatch):
  from pallas_kernels import decode_attention, flash_attention, sparse_attention
  from pallas_kernels.tpu import decode_attention as tpu_decode
  from pallas_kernels.tpu import flash_attention as tpu_flash
  from pallas_kernels.tpu import sparse_attention as tpu_sparse

  calls = []
  for module, name in [(tpu_decode, "exact_block_attention"), (tpu_decode, "mask_step_attention"),
                       (tpu_sparse, "sparse_block_attention"),
                       (tpu_flash, "block_diffusion_attention")]:
    monkeypatch.setattr(module, name, lambda *a, _n=name, **kw: calls.append((_n, kw)))
  decode_attention.exact_block_attention(*range(6), impl="mosaic", block_k=512)
  decode_attention.mask_step_attention(*range(6), impl="mosaic_interpret",
                                       alpha_includes_block=False)
  sparse_attention.sparse_block_attention(*range(7), impl="mosaic")
  flash_attention.block_diffusion_attention(*range(6), impl="mosaic", return_lse=True)
  assert [(n, kw["interpret"]) for n, kw in calls] == [
      ("exact_block_attention", False), ("mask_step_attention", True),
      ("sparse_block_attention", False), ("block_diffusion_attention", False)]
  assert calls[0][1]["block_k"] == 512 and calls[1][1]["alpha_includes_block"] is False
  assert calls[3][1]["return_lse"] is True
  assert dispatch.resolve_impl("auto", "tpu") == "mosaic"
