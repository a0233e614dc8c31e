"""Model configuration: a frozen, hashable dataclass read from Hugging Face config.json.

A config is static data: it is hashed into every jit cache key, so it never holds arrays.
Presets live as JSON files in the ``mage_jax.presets`` package (package data), in the same
layout as a checkpoint's config.json plus a ``block_diffusion`` section, so a preset and a real
checkpoint go through one parser.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from typing import Any, Mapping

from mage_jax.sampling import POLICIES

# Block-diffusion fields that config.json of Fast-dLLM v2 / SDAR checkpoints do not carry (or
# carry under model-specific names). Per family defaults, from the released generation code:
#   fast_dllm_v2: Qwen2.5 layout; mask id 151665; blocks of 32 decoded in sub-blocks of 8;
#     unmask above confidence 0.9; token shift (position i predicted from hidden state i-1).
#   sdar: Qwen3 layout; mask id 151669; blocks of 4 (b4 release; 8..64 variants exist);
#     low_confidence_dynamic remasking at threshold 0.9 with block_size steps per block;
#     no token shift.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "fast_dllm_v2": dict(
        mask_token_id=151665,
        block_size=32,
        token_shift=True,
        decode_policy="fast_dllm_v2",
        sub_block_size=8,
        confidence_threshold=0.9,
        steps_per_block=32,
    ),
    "sdar": dict(
        mask_token_id=151669,
        block_size=4,
        token_shift=False,
        decode_policy="sdar",
        sub_block_size=4,
        confidence_threshold=0.9,
        steps_per_block=4,
    ),
}

_QWEN_EOS = (151645, 151643)  # <|im_end|>, <|endoftext|>


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture plus the block-diffusion decoding defaults of one model.

  Attributes follow Hugging Face names where one exists. ``dtype`` is the dtype of weights and
  activations (softmax, norms and logits always run in float32).
  """

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float
  rms_norm_eps: float
  tie_word_embeddings: bool
  attention_bias: bool
  qk_norm: bool
  max_position_embeddings: int
  mask_token_id: int
  eos_token_ids: tuple[int, ...]
  pad_token_id: int
  block_size: int
  token_shift: bool
  decode_policy: str
  sub_block_size: int
  confidence_threshold: float
  steps_per_block: int
  dtype: str = "bfloat16"

  def __post_init__(self):
    def fail(field, why):
      raise ValueError(f"ModelConfig.{field}: {why}")

    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "intermediate_size", "block_size", "max_position_embeddings",
                  "sub_block_size", "steps_per_block"):
      if getattr(self, field) < 1:
        fail(field, f"must be >= 1, got {getattr(self, field)}")
    if self.num_heads % self.num_kv_heads:
      fail("num_heads", f"{self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      fail("head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
    if self.block_size % self.sub_block_size:
      fail("sub_block_size", f"{self.sub_block_size} does not divide block_size={self.block_size}")
    if not 0 <= self.mask_token_id < self.vocab_size:
      fail("mask_token_id", f"{self.mask_token_id} outside the vocabulary [0, {self.vocab_size})")
    if self.decode_policy not in POLICIES:
      fail("decode_policy", f"unknown policy {self.decode_policy!r}; one of {sorted(POLICIES)}")
    if self.dtype not in ("bfloat16", "float32", "float16"):
      fail("dtype", f"unsupported dtype {self.dtype!r}")

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], *, family: str | None = None,
                     **overrides) -> "ModelConfig":
    """Builds a config from a Qwen2 / Qwen2.5 / Qwen3 config.json dictionary.

    ``family`` (fast_dllm_v2 | sdar) picks the block-diffusion defaults; without it the
    ``block_diffusion`` section, then the architecture (Qwen3 -> sdar, else fast_dllm_v2), decide.
    ``overrides`` replace any field last. Both spellings of transformers are read (< 5:
    ``rope_theta``, ``torch_dtype``; >= 5: ``rope_parameters``, ``dtype``). RoPE scaling and
    sliding windows change the attention itself, which the model does not implement, so they are
    refused rather than ignored.
    """
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"RoPE type {rope_type!r} is not supported (only 'default')")
    if hf.get("use_sliding_window"):
      raise ValueError("sliding-window attention is not supported")
    torch_dtype = hf.get("torch_dtype") or (hf["dtype"] if isinstance(hf.get("dtype"), str) else None)
    model_type = str(hf.get("model_type", "")).lower()
    archs = " ".join(hf.get("architectures", []) or []).lower()
    is_qwen3 = "qwen3" in model_type or "qwen3" in archs or "sdar" in model_type or "sdar" in archs
    bd = dict(hf.get("block_diffusion", {}))
    family = family or bd.pop("family", None) or ("sdar" if is_qwen3 else "fast_dllm_v2")
    bd.pop("family", None)
    if family not in FAMILY_DEFAULTS:
      raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILY_DEFAULTS)}")
    fields = dict(FAMILY_DEFAULTS[family])
    # Some checkpoints name the block size in config.json (Fast-dLLM v2: bd_size; SDAR: block_size).
    for key in ("bd_size", "block_size"):
      if key in hf and isinstance(hf[key], int):
        fields["block_size"] = hf[key]
    if "mask_token_id" in hf:
      fields["mask_token_id"] = hf["mask_token_id"]
    fields.update(bd)

    def need(key):
      if key not in hf:
        raise ValueError(f"config.json has no {key!r} (needed for a {family} model)")
      return hf[key]

    num_heads = need("num_attention_heads")
    hidden = need("hidden_size")
    eos = hf.get("eos_token_id")
    eos = _QWEN_EOS if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    pad = hf.get("pad_token_id")
    fields.update(
        family=family,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        num_layers=need("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hidden // num_heads,
        intermediate_size=need("intermediate_size"),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v bias; Qwen3 has attention_bias=False and q/k norms.
        attention_bias=bool(hf.get("attention_bias", not is_qwen3)),
        qk_norm=bool(hf.get("qk_norm", is_qwen3)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        eos_token_ids=tuple(int(e) for e in eos if e is not None),
        pad_token_id=int(pad if pad is not None else eos[0]),
    )
    if torch_dtype and "dtype" not in overrides and "dtype" not in bd:
      fields["dtype"] = {"float32": "float32", "float16": "float16"}.get(torch_dtype, "bfloat16")
    fields.update(overrides)
    return cls(**fields)

  def to_hf_config(self) -> dict[str, Any]:
    """The config.json of this model (Qwen2 or Qwen3 layout) plus a block_diffusion section."""
    qwen3 = self.qk_norm
    hf = {
        "architectures": ["Qwen3ForCausalLM" if qwen3 else "Qwen2ForCausalLM"],
        "model_type": "qwen3" if qwen3 else "qwen2",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "intermediate_size": self.intermediate_size,
        "hidden_act": "silu",
        "rope_theta": self.rope_theta,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "attention_bias": self.attention_bias,
        "max_position_embeddings": self.max_position_embeddings,
        "eos_token_id": list(self.eos_token_ids),
        "pad_token_id": self.pad_token_id,
        "torch_dtype": self.dtype,
        "block_diffusion": {
            "family": self.family,
            "mask_token_id": self.mask_token_id,
            "block_size": self.block_size,
            "token_shift": self.token_shift,
            "decode_policy": self.decode_policy,
            "sub_block_size": self.sub_block_size,
            "confidence_threshold": self.confidence_threshold,
            "steps_per_block": self.steps_per_block,
        },
    }
    return hf

  @classmethod
  def from_json_file(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
    try:
      with open(path) as f:
        hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"cannot read model config {os.fspath(path)}: {e}") from e
    return cls.from_hf_config(hf, **overrides)

  @classmethod
  def preset(cls, name: str, **overrides) -> "ModelConfig":
    """A shipped preset by name (see ``list_presets``), e.g. ``fast_dllm_v2_1.5b``."""
    if name not in list_presets():
      raise ValueError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return cls.from_hf_config(json.loads(preset_file(name).read_text()), **overrides)


def preset_file(name: str) -> resources.abc.Traversable:
  """The JSON file of preset ``name`` inside the mage_jax.presets package."""
  return resources.files("mage_jax.presets") / f"{name}.json"


def list_presets() -> list[str]:
  folder = resources.files("mage_jax.presets")
  return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".json"))
