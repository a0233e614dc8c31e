"""Attention methods behind one interface, chosen by name."""

import dataclasses

from mage_jax.methods.base import AttentionMethod, Selection, StepInfo, WrittenRows
from mage_jax.methods.exact import ExactAttention
from mage_jax.methods.mage import MageAttention
from mage_jax.methods.oracle import OracleAttention
from mage_jax.methods.quest import QuestAttention
from mage_jax.methods.sparsed import SparseDAttention
from mage_jax.methods.tidal import TidalAttention

METHODS: dict[str, type[AttentionMethod]] = {
    cls.name: cls for cls in (ExactAttention, MageAttention, QuestAttention, TidalAttention,
                              SparseDAttention, OracleAttention)
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


__all__ = ["AttentionMethod", "Selection", "StepInfo", "WrittenRows", "METHODS", "get_method", "ExactAttention",
           "MageAttention", "QuestAttention", "TidalAttention", "SparseDAttention",
           "OracleAttention"]
