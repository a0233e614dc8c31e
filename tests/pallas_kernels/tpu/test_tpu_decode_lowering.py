"""The TPU decode kernels lowered for TPU at the real model shapes, on a CPU.

`jax.export(..., platforms=("tpu",))` runs Pallas' Mosaic lowering (block shapes, memory spaces,
DMAs, unsupported ops fail there) and serialises the Mosaic module into a `tpu_custom_call`; only
the last compile to machine code needs a TPU. Each model shape is lowered at the extremes of the
grid in issue 26: batch 1 with blocks of 32 at 16K, batch 8 with blocks of 4 at 128K, and the
largest query tile (7B, blocks of 32, 224 rows) at batch 8 and 128K. One export takes ~0.3 s."""

import functools
import re

import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.tpu import decode_attention, sparse_attention, topk

HEAD_DIM = 128
# (query heads, KV heads) of Fast-dLLM v2 1.5B and 7B, and of SDAR 4B / 8B.
MODELS = {"fast_dllm_v2_1.5b": (12, 2), "fast_dllm_v2_7b": (28, 4), "sdar_4b_8b": (32, 8)}
# (model, batch, block, capacity, MAGE budget K)
SHAPES = [(model, 1, 32, 16384, 512) for model in MODELS]
SHAPES += [(model, 8, 4, 131072, 4096) for model in MODELS]
SHAPES += [("fast_dllm_v2_7b", 8, 32, 131072, 2048)]
# The most VMEM any kernel may ask for: far below every chip's VMEM in docs/tpu.md, and within
# the scoped default of v6e, so the kernels leave room for XLA's own fusions.
MAX_SCOPED_VMEM = 32 << 20


def block_args(model, batch, block, capacity):
  q_heads, kv_heads = MODELS[model]
  bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  return (bf16(batch, block, q_heads, HEAD_DIM), bf16(batch, kv_heads, capacity, HEAD_DIM),
          bf16(batch, kv_heads, capacity, HEAD_DIM),
          bf16(batch, block, kv_heads, HEAD_DIM), bf16(batch, block, kv_heads, HEAD_DIM))


def lowered_for_tpu(f, *args) -> str:
  return jax.export.export(jax.jit(f), platforms=("tpu",))(*args).mlir_module()


def assert_mosaic_kernels(module: str, count: int) -> None:
  assert module.count("stablehlo.custom_call @tpu_custom_call") == count
  sizes = [int(size) for size in re.findall(r"\\22size\\22: (\d+)", module)]
  assert len(sizes) == count and max(sizes) <= MAX_SCOPED_VMEM, sizes


@pytest.mark.parametrize("model,batch,block,capacity,budget", SHAPES)
def test_decode_kernels_lower_for_tpu(model, batch, block, capacity, budget):
  q, k_cache, v_cache, k_block, v_block = block_args(model, batch, block, capacity)
  kv_heads = k_cache.shape[1]
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
  exact = lowered_for_tpu(decode_attention.exact_block_attention, q, k_cache, v_cache, lengths,
                          k_block, v_block)
  assert_mosaic_kernels(exact, 1)
  mask_step = functools.partial(decode_attention.mask_step_attention,
                                alpha_includes_block=block == 32)
  assert_mosaic_kernels(lowered_for_tpu(mask_step, q, k_cache, v_cache, lengths, k_block,
                                        v_block), 2)
  indices = jax.ShapeDtypeStruct((batch, kv_heads, budget), jnp.int32)
  counts = jax.ShapeDtypeStruct((batch, kv_heads), jnp.int32)
  assert_mosaic_kernels(lowered_for_tpu(sparse_attention.sparse_block_attention, q, k_cache,
                                        v_cache, indices, counts, k_block, v_block), 1)


def test_split_kv_lowers_with_several_splits():
  q, k_cache, v_cache, k_block, v_block = block_args("fast_dllm_v2_1.5b", 1, 32, 32768)
  lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
  f = functools.partial(decode_attention.mask_step_attention, num_splits=2)
  assert_mosaic_kernels(lowered_for_tpu(f, q, k_cache, v_cache, lengths, k_block, v_block), 2)


def test_selection_lowers_for_tpu_without_a_sort():
  """All 28 layers of the 1.5B model at batch 8 and 128K in one call, as MAGE selects."""
  scores = jax.ShapeDtypeStruct((28, 8, 2, 131072), jnp.float32)
  lengths = jax.ShapeDtypeStruct((8, 1), jnp.int32)
  module = lowered_for_tpu(functools.partial(topk.select_kv_indices, k=4096), scores, lengths)
  assert "stablehlo.sort" not in module and "TopK" not in module
