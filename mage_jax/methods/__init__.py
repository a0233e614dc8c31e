"""Attention methods behind one interface, chosen by name."""

import dataclasses

from mage_jax.methods.base import AttentionMethod, StepInfo
from mage_jax.methods.exact import ExactAttention

METHODS: dict[str, type[AttentionMethod]] = {
    ExactAttention.name: ExactAttention,
}


def get_method(name: str, **options) -> AttentionMethod:
  """The method registered under ``name``, configured by ``options`` (its dataclass fields)."""
  if name not in METHODS:
    raise ValueError(f"unknown attention method {name!r}; available: {', '.join(sorted(METHODS))}")
  cls = METHODS[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(f"method {name!r} has no option(s) {unknown}; options: {sorted(fields)}")
  return cls(**options)


__all__ = ["AttentionMethod", "StepInfo", "METHODS", "get_method", "ExactAttention"]
