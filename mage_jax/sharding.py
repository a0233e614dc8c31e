"""Tensor- and data-parallel layout over a ("data", "model") device mesh.

Every array names its dimensions with logical axes (``batch``, ``q_heads``, ``mlp``, ...) and
``AXIS_RULES`` maps each logical axis to a mesh axis, once, for the whole code base: weights,
KV cache, method states and trainer state all follow it. docs/sharding.md explains the choices
and sizes a 7B model on 8 GPUs.

Two mechanisms keep the model ignorant of the mesh:
  * GSPMD: sharded weights and cache go into the same jitted functions as on one device; XLA
    partitions the projections and MLPs (Megatron style: column-parallel in, row-parallel out,
    one all-reduce each) and the sampling over the vocabulary.
  * ``shard_kernel``: the attention kernels (Pallas on GPU) cannot be partitioned by XLA, so
    their call sites run them under ``shard_map`` over batch ("data") and KV heads ("model").
    A KV head's G query heads are contiguous (query head i uses KV head i // G), so a KV-head
    shard carries whole GQA groups and every kernel sees a complete, smaller problem.
Without a mesh (``jax.sharding.get_abstract_mesh()`` empty) both are no-ops: one device runs the
exact same code it always did. The mesh reaches the jitted code through ``jax.set_mesh``, which
is part of jit's trace key, so a sharded and an unsharded call never share a compilation.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mage_jax.config import ModelConfig
from mage_jax.kv_cache import KVCache, init_cache

MESH_AXES = ("data", "model")

# Logical axis -> mesh axis (None: replicated). Heads, the MLP hidden and the vocabulary split
# over "model"; the embedding width never does, so every activation between layers is whole on
# each device and tensor parallelism costs exactly two all-reduces per layer.
AXIS_RULES: dict[str, str | None] = {
    "batch": "data",
    "q_heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    # Vocabulary-parallel embedding and LM head: the two [vocab, embed] tables are the largest
    # weights of the small models (0.9 GB of the 1.5B model) and the float32 logits of a step
    # [batch, block, vocab] the largest activation; the lookup costs one all-reduce of the
    # embeddings and the softmax statistics over the vocabulary are [batch, block] scalars.
    "vocab": "model",
    "embed": None,
    "head_dim": None,
    "gate_up": None,  # the gate / up pair of the fused MLP input projection
    "seq": None,
    "capacity": None,
    "layers": None,
    "slots": None,
    "norm": None,
}

# Logical axes of the model's parameters, by the last two parts of their path (a norm's scale
# is matched by "scale" alone).
_PARAM_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("q_proj", "kernel"): ("embed", "q_heads", "head_dim"),
    ("q_proj", "bias"): ("q_heads", "head_dim"),
    ("k_proj", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("k_proj", "bias"): ("kv_heads", "head_dim"),
    ("v_proj", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("v_proj", "bias"): ("kv_heads", "head_dim"),
    ("o_proj", "kernel"): ("q_heads", "head_dim", "embed"),
    ("gate_up_proj", "kernel"): ("embed", "gate_up", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("scale",): ("norm",),
}

CACHE_AXES = ("batch", "kv_heads", "capacity", "head_dim")

# Activations handed to the attention kernels.
Q_AXES = ("batch", "seq", "q_heads", "head_dim")  # queries and attention outputs
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")  # a block's / sequence's own keys, values
LSE_AXES = ("batch", "q_heads", "seq")
ROWS_AXES = ("batch", "kv_heads", "capacity")  # per-row scores of one layer (alpha)
SELECTION_AXES = ("batch", "kv_heads", "slots")
PER_HEAD_AXES = ("batch", "kv_heads")


# ---------------------------------------------------------------------------------------------
# Meshes and the multi-host entry.


def parse_mesh(text: str) -> dict[str, int]:
  """``"data:2,model:4"`` -> {"data": 2, "model": 4}; an axis left out has size 1."""
  sizes = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, size = part.partition(":")
    if not sep or name not in MESH_AXES or name in sizes or not size.isdigit() or int(size) < 1:
      raise ValueError(f"--mesh={text!r}: expected comma-separated axis:size with axes from "
                       f"{MESH_AXES} and sizes >= 1, e.g. data:2,model:4")
    sizes[name] = int(size)
  return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "model") mesh over ``devices`` (default: every device of every process).

  Axes are Auto (GSPMD propagation), not Explicit: the model's reshapes and gathers need no
  per-op sharding annotations that way."""
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(sizes.get(axis, 1) for axis in MESH_AXES)
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh data:{shape[0]},model:{shape[1]} needs {int(np.prod(shape))} "
                     f"devices, found {len(devices)}")
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def mesh_from_flag(text: str | None) -> Mesh | None:
  """The mesh of a --mesh flag; None (one device, no sharding) when the flag is empty."""
  return make_mesh(parse_mesh(text)) if text else None


_DISTRIBUTED_ENV = ("MAGE_COORDINATOR_ADDRESS", "MAGE_NUM_PROCESSES", "MAGE_PROCESS_ID")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Joins a multi-host run (jax.distributed.initialize) when asked; returns whether it did.

  Each argument falls back to its environment variable (MAGE_COORDINATOR_ADDRESS,
  MAGE_NUM_PROCESSES, MAGE_PROCESS_ID); with none of them set this is a single-process run and
  nothing happens. Must run before any other JAX call: the device list is fixed at the first.
  """
  values = [coordinator_address, num_processes, process_id]
  for i, var in enumerate(_DISTRIBUTED_ENV):
    if values[i] is None and os.environ.get(var):
      values[i] = os.environ[var]
  if all(v is None for v in values):
    return False
  if any(v is None for v in values):
    missing = [var for v, var in zip(values, _DISTRIBUTED_ENV) if v is None]
    raise ValueError(f"multi-host run: coordinator address, process count and process id are "
                     f"all needed; missing {', '.join(missing)} (flag or environment)")
  try:
    address, count, index = str(values[0]), int(values[1]), int(values[2])
  except ValueError:
    raise ValueError(f"multi-host run: process count and id must be integers, got "
                     f"{values[1]!r}, {values[2]!r}") from None
  if not 0 <= index < count:
    raise ValueError(f"multi-host run: process id {index} is not in [0, {count})")
  jax.distributed.initialize(address, num_processes=count, process_id=index)
  return True


# ---------------------------------------------------------------------------------------------
# Logical axes -> specs and shardings.


def logical_spec(axes: Sequence[str | None]) -> P:
  return P(*(None if a is None else AXIS_RULES[a] for a in axes))


def checked_sharding(mesh: Mesh, name: str, shape: Sequence[int],
                     axes: Sequence[str | None]) -> NamedSharding:
  """The NamedSharding of tensor ``name``; raises ValueError naming the tensor, the dimension
  and both sizes when a sharded dimension does not divide its mesh axis."""
  spec = logical_spec(axes)
  for dim, (size, logical, mesh_axis) in enumerate(zip(shape, axes, spec)):
    if mesh_axis is not None and size % mesh.shape[mesh_axis]:
      raise ValueError(f"{name}: dimension {dim} ({logical}) of size {size} does not divide "
                       f"mesh axis '{mesh_axis}' of size {mesh.shape[mesh_axis]}")
  return NamedSharding(mesh, spec)


def param_axes(path: Sequence[Any]) -> tuple[str, ...]:
  """Logical axes of the parameter at ``path`` (nnx state path or dotted name split)."""
  parts = tuple(str(p) for p in path)
  for key in (parts[-2:], parts[-1:]):
    if key in _PARAM_AXES:
      return _PARAM_AXES[key]
  raise ValueError(f"no sharding rule for parameter {'.'.join(parts)}: add it to _PARAM_AXES")


def shard_model(model: nnx.Module, mesh: Mesh) -> None:
  """Moves ``model``'s parameters onto ``mesh`` in place, laid out by the rules."""
  flat = []
  for path, var in nnx.to_flat_state(nnx.state(model)):
    value = var.get_value()
    sharding = checked_sharding(mesh, ".".join(map(str, path)), value.shape, param_axes(path))
    flat.append((path, var.replace(jax.device_put(value, sharding))))
  nnx.update(model, nnx.from_flat_state(flat))


def named_param_shardings(shapes: Mapping[str, Sequence[int]],
                          mesh: Mesh) -> dict[str, NamedSharding]:
  """Shardings of a flat {dotted name: shape} parameter dict (the trainer's master copy)."""
  return {name: checked_sharding(mesh, name, shape, param_axes(name.split(".")))
          for name, shape in shapes.items()}


def shardings_like_params(tree: Any, params: Mapping[str, NamedSharding], mesh: Mesh) -> Any:
  """Shardings for a pytree that holds per-parameter copies (optimizer moments) keyed by
  parameter name: a leaf under key ``name`` is laid out like that parameter when the shapes
  agree; everything else (step counters, keys) is replicated."""
  replicated = NamedSharding(mesh, P())

  def leaf(path, x):
    for key in reversed(path):
      name = getattr(key, "key", None)
      if name in params and len(params[name].spec) == len(x.shape):
        return params[name]
    return replicated

  return jax.tree_util.tree_map_with_path(leaf, tree)


def cache_shardings(cfg: ModelConfig, batch: int, capacity: int, mesh: Mesh) -> KVCache:
  shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
  rows = checked_sharding(mesh, "KV cache", shape, CACHE_AXES)
  lengths = checked_sharding(mesh, "KV cache lengths", (batch,), ("batch",))
  return KVCache(layers=((rows, rows),) * cfg.num_layers, lengths=lengths)


def init_sharded_cache(cfg: ModelConfig, batch: int, capacity: int, mesh: Mesh) -> KVCache:
  """An empty cache created directly in its shards (a 128K cache never exists whole)."""
  shardings = cache_shardings(cfg, batch, capacity, mesh)
  return jax.jit(lambda: init_cache(cfg, batch, capacity), out_shardings=shardings)()


def batch_sharding(mesh: Mesh, name: str, shape: Sequence[int]) -> NamedSharding:
  """Inputs whose leading dimension is the batch (token buffers, lengths), split over "data"."""
  return checked_sharding(mesh, name, shape, ("batch",) + (None,) * (len(shape) - 1))


# ---------------------------------------------------------------------------------------------
# Inside jitted code: constraints and kernels per shard (no-ops without a mesh).


def _active_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Pins ``x`` to its logical layout where XLA's propagation could pick another (loop carries
  created inside the jit, scatter outputs)."""
  if _active_mesh() is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(axes))


def constrain_state(state: Any) -> Any:
  """Pins the parts of a method state that declare their layout: a NamedTuple whose class has
  an ``AXES`` attribute (one logical axes tuple per field, e.g. LayerSelections). Other leaves
  follow XLA's propagation."""
  declares = lambda node: hasattr(type(node), "AXES")

  def pin(node):
    if not declares(node):
      return node
    return type(node)(*(constrain(x, axes) for x, axes in zip(node, type(node).AXES)))

  return jax.tree.map(pin, state, is_leaf=declares)


def shard_kernel(fn: Callable, in_axes: Sequence[Any], out_axes: Any) -> Callable:
  """``fn`` run per shard under the active mesh, or ``fn`` itself without one.

  ``in_axes`` gives one entry per positional argument of ``fn`` and ``out_axes`` the output's
  structure: logical axes tuples (or pytree prefixes of them, e.g. one tuple for every array of
  a TokenBlocks). Every kernel keeps batch rows and KV-head groups independent, so the shards
  need no communication. Replication is not checked (check_vma=False): pallas_call does not
  carry the varying-axes types, and no output here claims to be replicated."""
  if _active_mesh() is None:
    return fn
  is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
  to_spec = lambda tree: jax.tree.map(logical_spec, tree, is_leaf=is_axes)
  return jax.shard_map(fn, in_specs=tuple(to_spec(a) for a in in_axes),
                       out_specs=to_spec(out_axes), check_vma=False)
