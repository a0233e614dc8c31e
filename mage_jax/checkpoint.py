"""Hugging Face checkpoints in and out: config.json, safetensors weights, tokenizer.

The name map is explicit (``_tensor_specs``): every tensor of a Qwen2 / Qwen3 checkpoint names
one parameter of mage_jax.model.Transformer and how the two layouts differ. Hugging Face linear
weights are [out, in]; ours put inputs first and keep head structure (q/k/v [embed, heads,
head_dim], o [heads, head_dim, embed]), so each conversion is "transpose, then reshape" and
export is its exact inverse.

Loading goes tensor by tensor: the model is built abstractly (random init never materialises),
each tensor is read with ``safe_open``, converted and placed before the next is read, and only
then are the parameters merged into the model, so host memory never holds two copies of the
weights.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import tokenizers
from flax import nnx

from mage_jax import lora as lora_lib
from mage_jax.config import ModelConfig
from mage_jax.lora import LoraConfig
from mage_jax.model import Transformer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_METADATA = {"format": "pt"}  # safetensors metadata of exported files (transformers expects it)
_SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}

# Buffers some exporters write next to the weights; they are recomputed, never loaded.
_IGNORABLE = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"),)


class _Spec(NamedTuple):
  """How one Hugging Face tensor maps onto one model parameter, or onto a part of one (the MLP's
  gate and up weights are the two halves of ``mlp.gate_up_proj.kernel``)."""

  path: tuple[str | int, ...]  # the parameter's path in the model's flat state
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]  # this tensor's shape in our layout
  transpose: bool  # a Linear weight: Hugging Face keeps [out, in], we keep inputs first
  part: tuple | None = None  # numpy index of this tensor inside the parameter (None: all of it)

  def to_ours(self, x: np.ndarray) -> np.ndarray:
    return (x.T if self.transpose else x).reshape(self.shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.transpose:
      return np.ascontiguousarray(x.reshape(self.hf_shape[::-1]).T)
    return x.reshape(self.hf_shape)


def _tensor_specs(cfg: ModelConfig) -> dict[str, _Spec]:
  """The Qwen2 (q/k/v bias) or Qwen3 (q/k norm) tensor names of ``cfg``, in checkpoint order."""
  e, hq, hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  f, vocab = cfg.intermediate_size, cfg.vocab_size
  specs = {"model.embed_tokens.weight": _Spec(("embed_tokens", "embedding"), (vocab, e),
                                              (vocab, e), False)}
  for i in range(cfg.num_layers):

    def add(name, path, hf_shape, shape, transpose, i=i):
      specs[f"model.layers.{i}.{name}"] = _Spec(("layers", i) + path, hf_shape, shape, transpose)

    add("input_layernorm.weight", ("input_layernorm", "scale"), (e,), (e,), False)
    for proj, heads in (("q", hq), ("k", hkv), ("v", hkv)):
      module = ("self_attn", f"{proj}_proj")
      add(f"self_attn.{proj}_proj.weight", module + ("kernel",), (heads * d, e), (e, heads, d),
          True)
      if cfg.attention_bias:
        add(f"self_attn.{proj}_proj.bias", module + ("bias",), (heads * d,), (heads, d), False)
    add("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (e, hq * d), (hq, d, e),
        True)
    if cfg.qk_norm:
      for norm in ("q_norm", "k_norm"):
        add(f"self_attn.{norm}.weight", ("self_attn", norm, "scale"), (d,), (d,), False)
    add("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (e,), (e,),
        False)
    for index, proj in enumerate(("gate", "up")):
      specs[f"model.layers.{i}.mlp.{proj}_proj.weight"] = _Spec(
          ("layers", i, "mlp", "gate_up_proj", "kernel"), (f, e), (e, f), True,
          part=(slice(None), index))
    add("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (e, f), (f, e), True)
  specs["model.norm.weight"] = _Spec(("norm", "scale"), (e,), (e,), False)
  if not cfg.tie_word_embeddings:
    specs["lm_head.weight"] = _Spec(("lm_head", "kernel"), (vocab, e), (e, vocab), True)
  return specs


# ---------------------------------------------------------------------------------------------
# Loading.


class _WeightFiles(NamedTuple):
  """Where a checkpoint's tensors live."""

  files: dict[str, str]  # file name -> full path, in the order they are read
  index: str | None  # path of model.safetensors.index.json when sharded
  weight_map: dict[str, str] | None  # tensor name -> file name, from the index

  def expected_file(self, name: str) -> str:
    """The file a tensor should be in: its shard per the index, else the single file."""
    if self.weight_map is None:
      return next(iter(self.files.values()))
    return self.files.get(self.weight_map.get(name, ""), self.index)


def _weight_files(path: str) -> _WeightFiles:
  """A single model.safetensors wins over an index, as in transformers."""
  single = os.path.join(path, SINGLE_FILE)
  if os.path.exists(single):
    return _WeightFiles({SINGLE_FILE: single}, None, None)
  index = os.path.join(path, INDEX_FILE)
  if not os.path.exists(index):
    raise FileNotFoundError(f"checkpoint {path} has neither {SINGLE_FILE} nor {INDEX_FILE}")
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{index} is not a valid safetensors index (with a weight_map): {e!r}") from e
  if not isinstance(weight_map, dict):
    raise ValueError(f"{index}: weight_map is not a mapping of tensor name to file")
  files = {name: os.path.join(path, name) for name in sorted(set(weight_map.values()))}
  return _WeightFiles(files, index, weight_map)


class _SafetensorsFile:
  """``safe_open`` whose failures name the file (a truncated or foreign file, a bad header)."""

  def __init__(self, file: str):
    if not os.path.exists(file):
      raise FileNotFoundError(f"safetensors file {file} does not exist")
    self.file = file
    try:
      self._handle = safetensors.safe_open(file, framework="np")
    except Exception as e:  # safetensors raises its own SafetensorError and others by cause.
      raise ValueError(f"{file} is not a valid safetensors file: {e}") from e

  def keys(self) -> list[str]:
    return list(self._handle.keys())

  def get(self, name: str) -> np.ndarray:
    try:
      return self._handle.get_tensor(name)
    except Exception as e:
      raise ValueError(f"cannot read tensor {name!r} from {self.file}: {e}") from e

  def dtype_and_shape(self, name: str) -> tuple[str, tuple[int, ...]]:
    """A tensor's safetensors dtype name ("BF16") and shape, from the header alone."""
    header = self._handle.get_slice(name)
    return header.get_dtype(), tuple(header.get_shape())

  def metadata(self) -> dict[str, str] | None:
    return self._handle.metadata()


def _iter_tensors(weights: _WeightFiles) -> Iterator[tuple[str, _SafetensorsFile]]:
  """Yields (name, open file) for every tensor of a checkpoint, one file open at a time.

  With an index, a shard and the index must agree on the shard's tensors; a disagreement is
  reported before any weight of that shard is read.
  """
  for short, file in weights.files.items():
    handle = _SafetensorsFile(file)
    names = handle.keys()
    if weights.weight_map is not None:
      listed = {n for n, f in weights.weight_map.items() if f == short}
      absent, unlisted = sorted(listed - set(names)), sorted(set(names) - listed)
      if absent:
        raise ValueError(f"{weights.index} lists tensor {absent[0]!r} in {file}, which does not "
                         f"contain it")
      if unlisted:
        raise ValueError(f"tensor {unlisted[0]!r} in {file} is not listed in {weights.index}")
    for name in names:
      yield name, handle


def load_pretrained(path: str | os.PathLike, *, dtype=None,
                    config_overrides: Mapping[str, Any] | None = None
                    ) -> tuple[Transformer, ModelConfig]:
  """Loads a Qwen2 / Qwen3 layout Hugging Face checkpoint directory into a Transformer.

  Args:
    path: directory with config.json and model.safetensors, or shards listed in
      model.safetensors.index.json.
    dtype: weight and activation dtype (default: config.json's); tensors are cast on load.
    config_overrides: ModelConfig fields to replace (e.g. block_size, mask_token_id).

  Returns:
    (model, config).

  Raises:
    FileNotFoundError: config.json or a weight file is missing.
    ValueError: a tensor is missing, unexpected or mis-shaped, or a file is not valid; the
      message names the tensor and the file.
  """
  path = os.fspath(path)
  config_file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"checkpoint {path} has no {CONFIG_FILE}")
  try:
    with open(config_file) as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read {config_file}: {e}") from e
  overrides = dict(config_overrides or {})
  if dtype is not None:
    overrides["dtype"] = jnp.dtype(dtype).name
  try:
    cfg = ModelConfig.from_hf_config(hf, **overrides)
  except ValueError as e:
    raise ValueError(f"{config_file}: {e}") from e

  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  specs = _tensor_specs(cfg)
  _check_name_map(specs, flat)

  values: dict[tuple, jax.Array] = {}
  parts: dict[tuple, np.ndarray] = {}  # parameters assembled from several tensors
  loaded: set[str] = set()
  tied_head: _SafetensorsFile | None = None
  weights = _weight_files(path)
  for name, handle in _iter_tensors(weights):
    file = handle.file
    if any(p.search(name) for p in _IGNORABLE):
      continue
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      tied_head = handle  # checked against the embedding once that is loaded
      continue
    spec = specs.get(name)
    if spec is None:
      raise ValueError(f"unexpected tensor {name!r} in {file}: not part of a "
                       f"{hf.get('model_type', 'qwen')} model with this config.json")
    x = handle.get(name)
    if tuple(x.shape) != spec.hf_shape:
      raise ValueError(f"tensor {name!r} in {file} has shape {tuple(x.shape)}, expected "
                       f"{spec.hf_shape} from {config_file}")
    dtype = flat[spec.path].get_value().dtype
    loaded.add(name)
    if spec.part is None:
      values[spec.path] = jnp.asarray(spec.to_ours(x), dtype=dtype)
    else:
      whole = parts.setdefault(spec.path, np.zeros(flat[spec.path].get_value().shape, dtype))
      whole[spec.part] = spec.to_ours(x).astype(dtype)
  missing = [n for n in specs if n not in loaded]
  if missing:
    more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
    raise ValueError(f"missing tensor {missing[0]!r}: expected in "
                     f"{weights.expected_file(missing[0])}{more}")
  values.update({p: jnp.asarray(v) for p, v in parts.items()})
  if tied_head is not None:
    _check_tied_head(tied_head, values[specs["model.embed_tokens.weight"].path])
  state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat.items()])
  return nnx.merge(graphdef, state), cfg


def _check_name_map(specs: Mapping[str, _Spec], flat: Mapping[tuple, Any]) -> None:
  """Fails loudly if the model grew or reshaped a parameter the name map does not know."""
  mapped = {s.path for s in specs.values()}
  for p in flat:
    if p not in mapped:
      raise ValueError(f"model parameter {'.'.join(map(str, p))} has no Hugging Face name")
  for name, spec in specs.items():
    if spec.path not in flat:
      raise ValueError(f"name map entry {name!r} points at "
                       f"{'.'.join(map(str, spec.path))}, which the model does not have")
    shape = tuple(flat[spec.path].get_value().shape)
    if spec.part is not None:  # the shape of the part, without materialising anything
      shape = np.broadcast_to(np.float32(0), shape)[spec.part].shape
    if shape != spec.shape:
      raise ValueError(f"name map shape {spec.shape} of {name!r} disagrees with the model's "
                       f"{shape}")


def _check_tied_head(handle: _SafetensorsFile, embedding: jax.Array) -> None:
  """A tied checkpoint may still store lm_head.weight; it must then equal the embedding."""
  head = handle.get("lm_head.weight")
  if head.shape != embedding.shape or not np.array_equal(
      np.asarray(jnp.asarray(head, embedding.dtype)), np.asarray(embedding)):
    raise ValueError(f"tensor 'lm_head.weight' in {handle.file} differs from "
                     f"model.embed_tokens.weight but config.json sets tie_word_embeddings")


# ---------------------------------------------------------------------------------------------
# Export.


def save_pretrained(model: Transformer, path: str | os.PathLike, *,
                    max_shard_bytes: int | None = None) -> None:
  """Writes ``model`` as a Hugging Face checkpoint that transformers' Qwen2 / Qwen3 code loads.

  Tensors are written in the Hugging Face layout and in the config's dtype, to model.safetensors
  or, when that file would exceed ``max_shard_bytes``, to model-0000i-of-0000n.safetensors shards
  plus model.safetensors.index.json: every shard file, header included, stays within
  ``max_shard_bytes`` unless a single tensor is larger (that tensor then gets a shard alone).
  Weight files of an earlier export in ``path`` that this one does not rewrite are removed, so a
  stale index can never shadow the new weights.
  """
  if max_shard_bytes is not None and max_shard_bytes < 1:
    raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
  path = os.fspath(path)
  cfg = model.config
  dtype = jnp.dtype(cfg.dtype)
  specs = _tensor_specs(cfg)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  _check_name_map(specs, flat)

  shards = _plan_shards({n: s.hf_shape for n, s in specs.items()}, dtype, max_shard_bytes)
  if len(shards) == 1:
    files = [SINGLE_FILE]
  else:
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

  os.makedirs(path, exist_ok=True)
  for stale in os.listdir(path):
    if (stale in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.match(stale)) and stale not in files:
      os.remove(os.path.join(path, stale))
  for file, names in zip(files, shards):
    tensors = {n: specs[n].to_hf(_our_tensor(flat, specs[n], dtype)) for n in names}
    safetensors.numpy.save_file(tensors, os.path.join(path, file), metadata=_METADATA)
    _follow_umask(os.path.join(path, file))
  if len(files) > 1:
    index = {
        "metadata": {"total_size": sum(math.prod(s.hf_shape) * dtype.itemsize
                                       for s in specs.values())},
        "weight_map": {n: f for f, names in zip(files, shards) for n in names},
    }
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(cfg.to_hf_config(), f, indent=2)


def safetensors_file_bytes(shapes: Mapping[str, tuple[int, ...]], dtype) -> int:
  """An upper bound on the size of a safetensors file holding tensors of these names and shapes
  in ``dtype`` (as save_pretrained writes it): the 8-byte header length, the JSON header padded
  to 8 bytes, and the data. The bound gives every tensor the largest offsets of the file."""
  dtype = jnp.dtype(dtype)
  data = sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize
  header = {"__metadata__": _METADATA}
  for name, shape in shapes.items():
    header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype.name], "shape": list(shape),
                    "data_offsets": [data, data]}
  header_bytes = len(json.dumps(header, separators=(",", ":")).encode())
  return 8 + -(-header_bytes // 8) * 8 + data


def _plan_shards(shapes: Mapping[str, tuple[int, ...]], dtype,
                 max_shard_bytes: int | None) -> list[list[str]]:
  """Tensor names in order, cut into consecutive shards whose files (header included) stay
  within ``max_shard_bytes``; a tensor whose file alone would exceed it gets a shard of its own.
  None: one shard."""
  shards: list[list[str]] = [[]]
  for name in shapes:
    grown = {n: shapes[n] for n in shards[-1] + [name]}
    if max_shard_bytes and shards[-1] and safetensors_file_bytes(grown, dtype) > max_shard_bytes:
      shards.append([])
    shards[-1].append(name)
  return shards


def _follow_umask(file: str) -> None:
  """safetensors writes through a private temporary file (mode 0600) that it renames; give the
  weights the mode any other file written here gets (0666 less the umask)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(file, 0o666 & ~umask)


def _our_tensor(flat, spec: _Spec, dtype) -> np.ndarray:
  """The parameter (or the part of it) that ``spec`` exports, in ``dtype``."""
  value = np.asarray(flat[spec.path].get_value().astype(dtype))
  return value if spec.part is None else value[spec.part]


# Safetensors dtype names -> numpy dtypes, for writing a tensor in its source file's dtype.
_DTYPES_OF_SAFETENSORS = {"BF16": jnp.bfloat16, "F16": np.float16, "F32": np.float32,
                          "F64": np.float64}
# A source checkpoint's files that describe the source model itself, not copied to an export.
_NOT_COPIED = ("README.md",)


def save_pretrained_like(model: Transformer, path: str | os.PathLike,
                         source: str | os.PathLike) -> None:
  """Writes ``model``'s weights in the Hugging Face checkpoint ``source``'s own layout.

  Every weight file of ``source`` (model.safetensors, or its shards and index) is written again
  under the same file name, with the same tensor names in the same dtypes, holding ``model``'s
  values; tensors the model recomputes (rotary inv_freq) are copied. ``source``'s other files
  (config.json with its architectures / auto_map, tokenizer files, custom modelling code) are
  copied as they are, except its model card: the result loads wherever ``source`` loads
  (transformers, with or without trust_remote_code; load_pretrained). Weight files of an
  earlier export in ``path`` that ``source`` does not have are removed.

  Raises:
    ValueError: ``path`` is ``source``; a tensor of ``source`` has no parameter of the model
      or another shape; a parameter is not in ``source``.
  """
  path, source = os.fspath(path), os.fspath(source)
  if os.path.exists(path) and os.path.samefile(path, source):
    raise ValueError(f"export directory {path} is the source checkpoint itself")
  cfg = model.config
  specs = _tensor_specs(cfg)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  _check_name_map(specs, flat)
  weights = _weight_files(source)
  os.makedirs(path, exist_ok=True)
  for stale in os.listdir(path):
    if (stale in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.match(stale)) and (
        stale not in weights.files and stale != os.path.basename(weights.index or "")):
      os.remove(os.path.join(path, stale))

  written: set[str] = set()
  for short, file in weights.files.items():
    handle = _SafetensorsFile(file)
    tensors = {}
    for name in handle.keys():
      if any(p.search(name) for p in _IGNORABLE):
        tensors[name] = handle.get(name)
        continue
      spec = specs.get("model.embed_tokens.weight" if name == "lm_head.weight"
                       and cfg.tie_word_embeddings else name)
      if spec is None:
        raise ValueError(f"tensor {name!r} of {file} has no parameter in the model")
      dtype_name, shape = handle.dtype_and_shape(name)
      dtype = _DTYPES_OF_SAFETENSORS.get(dtype_name, cfg.dtype)
      tensor = spec.to_hf(_our_tensor(flat, spec, dtype))
      if tensor.shape != shape:
        raise ValueError(f"tensor {name!r} of {file} has shape {shape}, the model's "
                         f"{tensor.shape}")
      tensors[name] = tensor
      written.add(name)
    safetensors.numpy.save_file(tensors, os.path.join(path, short),
                                metadata=handle.metadata() or {"format": "pt"})
    _follow_umask(os.path.join(path, short))
  missing = [n for n in specs if n not in written]
  if missing:
    raise ValueError(f"parameter {missing[0]!r} is not in the source checkpoint {source}")
  for name in sorted(os.listdir(source)):
    origin = os.path.join(source, name)
    if (os.path.isfile(origin) and name not in weights.files and name not in _NOT_COPIED
        and not _SHARD_NAME.match(name) and name != SINGLE_FILE):
      shutil.copyfile(origin, os.path.join(path, name))
  _update_config_json(os.path.join(path, CONFIG_FILE), cfg)


def _update_config_json(config_file: str, cfg: ModelConfig) -> None:
  """Writes into a copied config.json the fields in which ``cfg`` differs from it (a run that
  changed rope_theta or max_position_embeddings), in the file's own spelling; the rest of the
  file (architectures, auto_map, keys the model does not read) stays as it is."""
  with open(config_file) as f:
    hf = json.load(f)
  ours = cfg.to_hf_config()
  theirs = ModelConfig.from_hf_config(hf, dtype=cfg.dtype).to_hf_config()
  changed = {k: v for k, v in ours.items() if theirs.get(k) != v}
  if not changed:
    return
  for key, value in changed.items():
    if key == "rope_theta" and isinstance(hf.get("rope_parameters"), dict):
      hf["rope_parameters"]["rope_theta"] = value
    else:
      hf[key] = value
  with open(config_file, "w") as f:
    json.dump(hf, f, indent=2)


# ---------------------------------------------------------------------------------------------
# LoRA adapters alone, PEFT-style.

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's names: the PeftModel's base_model.model is the CausalLM, whose .model is the decoder.
_PEFT_PREFIX = "base_model.model.model."
_PEFT_MATRIX = {"lora_a": "lora_A", "lora_b": "lora_B"}


def _peft_name(name: str) -> str:
  """``layers.3.self_attn.q_proj.lora.lora_a`` -> PEFT's ``...q_proj.lora_A.weight``."""
  module, matrix = name.rsplit(".lora.", 1)
  return f"{_PEFT_PREFIX}{module}.{_PEFT_MATRIX[matrix]}.weight"


def save_adapter(path: str | os.PathLike, adapters: Mapping[str, Any], lora: LoraConfig, *,
                 base_model: str = "") -> None:
  """Writes LoRA adapters (by mage_jax.lora.param_name, e.g. lora.adapter_values(model) or the
  trainer's master copy) as PEFT does: adapter_model.safetensors, float32, Hugging Face's
  [out, in] orientation (lora_A [rank, in], lora_B [out, rank]) and adapter_config.json
  (r, lora_alpha, target_modules; scale alpha / r)."""
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  tensors = {_peft_name(n): np.ascontiguousarray(np.asarray(v, np.float32).T)
             for n, v in adapters.items()}
  safetensors.numpy.save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS_FILE),
                              metadata={"format": "pt"})
  _follow_umask(os.path.join(path, ADAPTER_WEIGHTS_FILE))
  alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lora.rank, "lora_alpha": alpha, "target_modules": list(lora.targets),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None}
  with open(os.path.join(path, ADAPTER_CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)


def load_adapter(path: str | os.PathLike,
                 cfg: ModelConfig) -> tuple[LoraConfig, dict[str, np.ndarray]]:
  """Reads a PEFT LoRA adapter directory for a model of ``cfg``.

  Returns:
    (its LoraConfig, float32 adapters by mage_jax.lora.param_name); attach them with
    ``lora.attach(model, lora_config, adapters=adapters)``.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: an adapter this code does not run (not LORA, rsLoRA, DoRA, trained biases,
      fan_in_fan_out, a layer subset, modules_to_save), a bad rank or target, or a tensor
      missing, unexpected or mis-shaped; the message names the file and the field or tensor.
  """
  path = os.fspath(path)
  config_file = os.path.join(path, ADAPTER_CONFIG_FILE)
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"adapter {path} has no {ADAPTER_CONFIG_FILE}")
  try:
    with open(config_file) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read {config_file}: {e}") from e
  unsupported = [(k, config.get(k)) for k, ok in (
      ("peft_type", "LORA"), ("use_rslora", False), ("use_dora", False), ("bias", "none"),
      ("fan_in_fan_out", False), ("layers_to_transform", None), ("modules_to_save", None))
                 if config.get(k, ok) != ok]
  if unsupported:
    raise ValueError(f"{config_file}: {unsupported[0][0]} = {unsupported[0][1]!r} is not "
                     f"supported")
  targets = config.get("target_modules")
  if isinstance(targets, str):
    raise ValueError(f"{config_file}: target_modules must list module names, got a pattern "
                     f"{targets!r}")
  lora = LoraConfig(rank=int(config.get("r", 0)), alpha=float(config.get("lora_alpha", 0)),
                    targets=tuple(targets or ()))
  try:
    lora.check(cfg)
  except ValueError as e:
    raise ValueError(f"{config_file}: {e}") from e
  expected = {}
  for i in range(cfg.num_layers):
    for target in lora.targets:
      parent = lora_lib.TARGETS[target][0]
      fan_in, fan_out = lora_lib.target_features(cfg, target)
      module = f"layers.{i}.{parent}.{target}.lora"
      expected[f"{module}.lora_a"] = (fan_in, lora.rank)
      expected[f"{module}.lora_b"] = (lora.rank, fan_out)
  by_peft_name = {_peft_name(n): n for n in expected}
  handle = _SafetensorsFile(os.path.join(path, ADAPTER_WEIGHTS_FILE))
  adapters = {}
  for peft_name in handle.keys():
    name = by_peft_name.get(peft_name)
    if name is None:
      raise ValueError(f"unexpected tensor {peft_name!r} in {handle.file}: not an adapter of "
                       f"{config_file}'s target_modules")
    x = handle.get(peft_name).T
    if x.shape != expected[name]:
      raise ValueError(f"tensor {peft_name!r} in {handle.file} has shape {x.shape[::-1]}, "
                       f"expected {expected[name][::-1]}")
    adapters[name] = np.asarray(x, np.float32)
  missing = [n for n in expected if n not in adapters]
  if missing:
    raise ValueError(f"missing tensor {_peft_name(missing[0])!r} in {handle.file}")
  return lora, adapters


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template.


def load_tokenizer(path: str | os.PathLike) -> tuple[tokenizers.Tokenizer, str | None]:
  """The checkpoint's fast tokenizer and its chat template (None if it has none).

  The template comes from tokenizer_config.json's ``chat_template`` (a string, or a list of
  named templates of which "default" is used) or from chat_template.jinja, where transformers 5
  writes it.
  """
  path = os.fspath(path)
  file = os.path.join(path, "tokenizer.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"{path} has no tokenizer.json (a tokenizers fast-tokenizer file)")
  try:
    tokenizer = tokenizers.Tokenizer.from_file(file)
  except Exception as e:  # tokenizers raises a bare Exception on a bad file.
    raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from e
  return tokenizer, _chat_template(path)


def _chat_template(path: str) -> str | None:
  config_file = os.path.join(path, "tokenizer_config.json")
  if os.path.exists(config_file):
    try:
      with open(config_file) as f:
        template = json.load(f).get("chat_template")
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"cannot read {config_file}: {e}") from e
    if isinstance(template, list):
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
      if "default" not in named:
        raise ValueError(f"{config_file}: chat_template lists {sorted(named)} but no 'default'")
      template = named["default"]
    if template is not None:
      return str(template)
  jinja_file = os.path.join(path, "chat_template.jinja")
  if os.path.exists(jinja_file):
    with open(jinja_file) as f:
      return f.read()
  return None


def apply_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *,
                        add_generation_prompt: bool = True, **variables: Any) -> str:
  """Renders a Hugging Face chat template, with the environment transformers uses.

  ``variables`` reach the template as globals (bos_token, eos_token, tools, enable_thinking...).

  Raises:
    ValueError: the template does not parse or raises while rendering (its message).
  """
  import jinja2  # a declared dependency, imported here: only chat prompting needs it
  import jinja2.ext
  import jinja2.sandbox

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: jinja2's own escapes HTML characters, which would change prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  try:
    return env.from_string(template).render(messages=list(messages),
                                            add_generation_prompt=add_generation_prompt,
                                            **variables)
  except jinja2.exceptions.TemplateError as e:
    raise ValueError(f"chat template: {type(e).__name__}: {e}") from e
