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
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import tokenizers
from flax import nnx

from mage_jax.config import ModelConfig
from mage_jax.model import Transformer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

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
  or, when they exceed ``max_shard_bytes``, to model-0000i-of-0000n.safetensors shards plus
  model.safetensors.index.json. Weight files of an earlier export in ``path`` that this one does
  not rewrite are removed, so a stale index can never shadow the new weights.
  """
  if max_shard_bytes is not None and max_shard_bytes < 1:
    raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
  path = os.fspath(path)
  cfg = model.config
  dtype = jnp.dtype(cfg.dtype)
  specs = _tensor_specs(cfg)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  _check_name_map(specs, flat)

  shards: list[list[str]] = [[]]
  shard_bytes = 0
  for name, spec in specs.items():
    nbytes = math.prod(spec.hf_shape) * dtype.itemsize
    if max_shard_bytes and shards[-1] and shard_bytes + nbytes > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(name)
    shard_bytes += nbytes
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
    safetensors.numpy.save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
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
