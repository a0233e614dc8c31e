"""mage-jax: MAGE sparse attention for block-diffusion LLMs in JAX and Pallas.

The library API (every piece usable under jit with a static config):
  ModelConfig.preset / from_hf_config    model configs as data
  build_model(cfg) / load_pretrained(dir) an NNX Transformer, random or from an HF checkpoint
  init_cache(cfg, batch, capacity)       the functional KV cache
  prefill, forward_denoise, forward_write  the three forward passes of block diffusion
  generate(model, prompts, ...)          the jitted denoising loop (plan_request: its sizes)
  get_method(name, **options)            exact, MAGE and the baselines behind one interface
"""

from mage_jax.config import ModelConfig, list_presets
from mage_jax.generate import (DecodeOptions, GenerationResult, forward_denoise, forward_write,
                               generate, plan_request, prefill)
from mage_jax.kv_cache import KVCache, LayerCache, init_cache
from mage_jax.methods import AttentionMethod, StepInfo, get_method
from mage_jax.model import Transformer, build_model

__all__ = [
    "ModelConfig", "list_presets", "DecodeOptions", "GenerationResult", "forward_denoise",
    "forward_write", "generate", "plan_request", "prefill", "KVCache", "LayerCache", "init_cache",
    "AttentionMethod", "StepInfo", "get_method", "Transformer", "build_model",
]
