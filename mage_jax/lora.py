"""LoRA adapters on the model's projections, with PEFT's scale: y = W x + (alpha / rank) B A x.

The projections keep their head structure (q/k/v kernels [embed, heads, head_dim], o [heads,
head_dim, embed]). An adapter sees a projection as a plain matrix over its flattened input and
output axes ([embed] -> [heads * head_dim] for q/k/v, [heads * head_dim] -> [embed] for o); that
is also the order of Hugging Face's [out, in] weights, so PEFT's ``lora_A.weight`` [rank, in] and
``lora_B.weight`` [out, rank] are our ``lora_a`` [in, rank] and ``lora_b`` [rank, out]
transposed (mage_jax.checkpoint.save_adapter / load_adapter).

The low-rank product is flax's own ``nnx.LoRA`` (x @ a @ b; a random, b zero at init, so a fresh
adapter leaves the model's output exactly as it was). ``nnx.LoRA`` adds its product to a base
module of the same output shape, which head-structured einsums do not have, and has no scale:
``LoRAProjection`` flattens the input, reshapes the product to the base output and scales it.

``attach`` wraps the target projections of a model in place; the wrapped module keeps the
original one as ``base``, whose weights therefore live at ``...q_proj.base.kernel``.
``param_name`` drops that ``base`` step, so a wrapped model's frozen weights carry the plain
model's names (the trainer, the teacher and the export share one name space) and the adapters
are ``layers.{i}.self_attn.q_proj.lora.lora_a`` / ``lora_b``. ``merge`` folds the adapters back
into the kernels and unwraps the projections: a plain Transformer again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mage_jax.config import ModelConfig

# Module name -> (its parent in a decoder layer, how many leading kernel axes are inputs). The
# MLP's gate / up projection is one fused parameter (mage_jax.model.MLP) with no single PEFT
# counterpart, so it is not a target.
TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("self_attn", 1),
    "k_proj": ("self_attn", 1),
    "v_proj": ("self_attn", 1),
    "o_proj": ("self_attn", 2),
    "down_proj": ("mlp", 1),
}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
BASE = "base"  # the attribute of LoRAProjection holding the wrapped projection


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get adapters, and their size.

  Attributes:
    rank: r, the inner dimension of each adapter (>= 1, at most the projection's smaller side).
    alpha: PEFT's lora_alpha; the adapter's output is scaled by alpha / rank.
    targets: projection names, from ``TARGETS``.
  """

  rank: int = 16
  alpha: float = 32.0
  targets: tuple[str, ...] = DEFAULT_TARGETS

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def check(self, cfg: ModelConfig) -> None:
    """Raises ValueError naming the first bad field (``lora.rank: ...``)."""
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown:
      raise ValueError(f"lora.targets: unknown module {unknown[0]!r}; known: "
                       f"{', '.join(TARGETS)}")
    if not self.targets or len(set(self.targets)) != len(self.targets):
      raise ValueError(f"lora.targets: needs distinct module names, got {list(self.targets)}")
    if self.rank < 1:
      raise ValueError(f"lora.rank: must be >= 1, got {self.rank}")
    if self.alpha <= 0:
      raise ValueError(f"lora.alpha: must be > 0, got {self.alpha}")
    for target in self.targets:
      fan_in, fan_out = target_features(cfg, target)
      if self.rank > min(fan_in, fan_out):
        raise ValueError(f"lora.rank: {self.rank} exceeds {target}'s smaller dimension "
                         f"{min(fan_in, fan_out)} (in {fan_in}, out {fan_out})")


def target_features(cfg: ModelConfig, target: str) -> tuple[int, int]:
  """(in_features, out_features) of a target projection, its axes flattened."""
  e, f = cfg.hidden_size, cfg.intermediate_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {"q_proj": (e, q), "k_proj": (e, kv), "v_proj": (e, kv), "o_proj": (q, e),
          "down_proj": (f, e)}[target]


class LoRAProjection(nnx.Module):
  """A projection (``nnx.Einsum`` or ``nnx.Linear``) plus a scaled low-rank ``nnx.LoRA`` update
  over its flattened input and output axes."""

  def __init__(self, base: nnx.Module, input_axes: int, rank: int, scale: float, *,
               rngs: nnx.Rngs):
    kernel = base.kernel.get_value()
    self.base = base
    self.input_axes = input_axes
    self.scale = scale
    self.lora = nnx.LoRA(math.prod(kernel.shape[:input_axes]), rank,
                         math.prod(kernel.shape[input_axes:]), dtype=kernel.dtype,
                         param_dtype=kernel.dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base(x)
    x_flat = x.reshape(x.shape[:x.ndim - self.input_axes] + (-1,))
    update = self.lora(x_flat) * jnp.asarray(self.scale, x_flat.dtype)
    return y + update.reshape(y.shape).astype(y.dtype)

  def merged_kernel(self) -> jax.Array:
    """W + scale * (a @ b), reshaped to the kernel, computed in float32, in the kernel's dtype."""
    kernel = self.base.kernel.get_value()
    a = self.lora.lora_a.get_value().astype(jnp.float32)
    b = self.lora.lora_b.get_value().astype(jnp.float32)
    update = (self.scale * (a @ b)).reshape(kernel.shape)
    return (kernel.astype(jnp.float32) + update).astype(kernel.dtype)


def attach(model, lora: LoraConfig, *, rngs: nnx.Rngs | None = None,
           adapters: Mapping[str, Any] | None = None):
  """Wraps ``lora.targets`` of every layer of ``model`` (a Transformer) in LoRAProjections, in
  place, and returns it. New adapters start as nnx.LoRA initialises them (a random, b zero) from
  ``rngs``; ``adapters`` (by ``param_name``, e.g. from ``adapter_values`` or
  mage_jax.checkpoint.load_adapter) sets their values instead.

  Raises:
    ValueError: a bad LoraConfig, a projection already wrapped, or ``adapters`` missing or
      mis-shaping an adapter.
  """
  lora.check(model.config)
  rngs = rngs if rngs is not None else nnx.Rngs(0)
  for layer in model.layers:
    for target in lora.targets:
      parent_name, input_axes = TARGETS[target]
      parent = getattr(layer, parent_name)
      base = getattr(parent, target)
      if isinstance(base, LoRAProjection):
        raise ValueError(f"{target} already has a LoRA adapter")
      setattr(parent, target, LoRAProjection(base, input_axes, lora.rank, lora.scale, rngs=rngs))
  if adapters is not None:
    _set_adapter_values(model, adapters)
  return model


def param_name(path: Sequence[Any]) -> str:
  """A parameter's dotted name, without the ``base`` step of a wrapped projection."""
  return ".".join(str(p) for p in path if p != BASE)


def is_adapter_name(name: str) -> bool:
  """Whether a ``param_name`` names an adapter matrix."""
  return name.endswith((".lora.lora_a", ".lora.lora_b"))


def adapter_values(model) -> dict[str, jax.Array]:
  """The adapters (nnx.LoRAParam) of a model, by ``param_name``."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  return {param_name(p): v.get_value() for p, v in flat}


def _set_adapter_values(model, adapters: Mapping[str, Any]) -> None:
  flat = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  names = {param_name(p) for p, _ in flat}
  extra = sorted(set(adapters) - names)
  if extra:
    raise ValueError(f"adapter {extra[0]!r} has no target in this model (its targets: "
                     f"{len(names)} adapter matrices)")
  updated = []
  for path, var in flat:
    name = param_name(path)
    if name not in adapters:
      raise ValueError(f"missing adapter {name!r}")
    value = jnp.asarray(adapters[name])
    expected = var.get_value().shape
    if value.shape != expected:
      raise ValueError(f"adapter {name!r} has shape {tuple(value.shape)}, expected {expected}")
    updated.append((path, var.replace(value.astype(var.get_value().dtype))))
  nnx.update(model, nnx.from_flat_state(updated))


def merge(model):
  """Folds every adapter into its projection's kernel and unwraps the projection, in place:
  the plain model whose forward equals the adapted one (up to the kernel dtype's rounding)."""
  for layer in model.layers:
    for target, (parent_name, _) in TARGETS.items():
      parent = getattr(layer, parent_name)
      wrapped = getattr(parent, target)
      if isinstance(wrapped, LoRAProjection):
        wrapped.base.kernel.set_value(wrapped.merged_kernel())
        setattr(parent, target, wrapped.base)
  return model
