"""Hugging Face import / export: layouts, sharding, round trips and the errors a user meets.

The checkpoints here are written tensor by tensor from the Hugging Face layout spelled out in
``_hf_shapes`` (independent of mage_jax.checkpoint's name map), so a mistake in the map cannot
hide behind a matching mistake in the exporter.
"""

from __future__ import annotations

import json
import os
import re
import stat

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
from flax import nnx

from mage_jax.checkpoint import (apply_chat_template, load_pretrained, load_tokenizer,
                                 save_pretrained)
from mage_jax.config import ModelConfig, preset_file

PRESETS = ("tiny_qwen2", "tiny_qwen3")


def _preset_json(name: str) -> dict:
  return json.loads(preset_file(name).read_text())


def _hf_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
  """Tensor names and shapes of a transformers Qwen2 / Qwen3 checkpoint."""
  e, heads, kv, d = (hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"],
                     hf["head_dim"])
  f, vocab, qwen3 = hf["intermediate_size"], hf["vocab_size"], hf["model_type"] == "qwen3"
  shapes = {"model.embed_tokens.weight": (vocab, e), "model.norm.weight": (e,)}
  if not hf["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (vocab, e)
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (e,),
        p + "post_attention_layernorm.weight": (e,),
        p + "self_attn.q_proj.weight": (heads * d, e),
        p + "self_attn.k_proj.weight": (kv * d, e),
        p + "self_attn.v_proj.weight": (kv * d, e),
        p + "self_attn.o_proj.weight": (e, heads * d),
        p + "mlp.gate_proj.weight": (f, e),
        p + "mlp.up_proj.weight": (f, e),
        p + "mlp.down_proj.weight": (e, f),
    })
    if qwen3:
      shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    else:
      shapes.update({p + f"self_attn.{x}_proj.bias": (n * d,)
                     for x, n in (("q", heads), ("k", kv), ("v", kv))})
  return shapes


def _write_checkpoint(path, hf: dict, tensors: dict[str, np.ndarray], num_shards: int) -> None:
  """config.json plus ``num_shards`` safetensors files (with an index when more than one)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  names = sorted(tensors)
  if num_shards == 1:
    safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"))
    return
  weight_map = {}
  for s in range(num_shards):
    file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
    part = {n: tensors[n] for n in names[s::num_shards]}
    safetensors.numpy.save_file(part, os.path.join(path, file), metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
               "weight_map": weight_map}, f)


def _random_tensors(hf: dict, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {n: rng.standard_normal(s).astype(np.float32) for n, s in _hf_shapes(hf).items()}


def _read_checkpoint(path) -> dict[str, np.ndarray]:
  out = {}
  for file in sorted(os.listdir(path)):
    if file.endswith(".safetensors"):
      for name, value in safetensors.numpy.load_file(os.path.join(path, file)).items():
        assert name not in out, f"{name} written twice"
        out[name] = value
  return out


@pytest.fixture(params=PRESETS)
def sharded(request, tmp_path):
  """A 3-shard checkpoint of a tiny preset: (path, hf config, tensors)."""
  hf = _preset_json(request.param)
  tensors = _random_tensors(hf)
  path = tmp_path / "ckpt"
  _write_checkpoint(path, hf, tensors, num_shards=3)
  return path, hf, tensors


def test_load_places_every_tensor_in_its_head_layout(sharded):
  path, hf, t = sharded
  model, cfg = load_pretrained(path)
  assert cfg == ModelConfig.from_hf_config(hf)
  e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
  p = "model.layers.1."
  # q kernel [embed, heads, head_dim][i, j, k] is the HF weight [heads * head_dim, embed][j*d+k, i].
  q = t[p + "self_attn.q_proj.weight"].reshape(h, d, e)
  np.testing.assert_array_equal(attn.q_proj.kernel[...], q.transpose(2, 0, 1))
  k = t[p + "self_attn.k_proj.weight"].reshape(kv, d, e)
  np.testing.assert_array_equal(attn.k_proj.kernel[...], k.transpose(2, 0, 1))
  np.testing.assert_array_equal(attn.o_proj.kernel[...],
                                t[p + "self_attn.o_proj.weight"].T.reshape(h, d, e))
  np.testing.assert_array_equal(mlp.down_proj.kernel[...], t[p + "mlp.down_proj.weight"].T)
  np.testing.assert_array_equal(model.layers[1].post_attention_layernorm.scale[...],
                                t[p + "post_attention_layernorm.weight"])
  np.testing.assert_array_equal(model.embed_tokens.embedding[...], t["model.embed_tokens.weight"])
  if cfg.qk_norm:
    np.testing.assert_array_equal(attn.k_norm.scale[...], t[p + "self_attn.k_norm.weight"])
  else:
    np.testing.assert_array_equal(attn.v_proj.bias[...],
                                  t[p + "self_attn.v_proj.bias"].reshape(kv, d))
  if cfg.tie_word_embeddings:
    assert model.lm_head is None
  else:
    np.testing.assert_array_equal(model.lm_head.kernel[...], t["lm_head.weight"].T)


@pytest.mark.parametrize("max_shard_bytes", [None, 20_000])
def test_export_round_trips_tensors_and_config(sharded, tmp_path, max_shard_bytes):
  path, hf, tensors = sharded
  model, cfg = load_pretrained(path)
  out = tmp_path / "export"
  save_pretrained(model, out, max_shard_bytes=max_shard_bytes)
  written = _read_checkpoint(out)
  assert sorted(written) == sorted(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(written[name], value, err_msg=name)
  index_file = out / "model.safetensors.index.json"
  if max_shard_bytes is None:
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  else:
    index = json.loads(index_file.read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert sorted(index["weight_map"]) == sorted(tensors)
    for file in set(index["weight_map"].values()):
      shard = safetensors.numpy.load_file(out / file)
      assert {n for n, f in index["weight_map"].items() if f == file} == set(shard)
      # Only a tensor larger than the limit makes a shard larger than the limit, alone.
      assert sum(v.nbytes for v in shard.values()) <= max_shard_bytes or len(shard) == 1
  reloaded, cfg2 = load_pretrained(out)
  assert cfg2 == cfg
  for a, b in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(reloaded))):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1][...], b[1][...])


def test_reexport_removes_stale_shards(sharded, tmp_path):
  path, _, tensors = sharded
  model, _ = load_pretrained(path)
  out = tmp_path / "export"
  save_pretrained(model, out, max_shard_bytes=20_000)
  save_pretrained(model, out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_follow_the_umask(sharded, tmp_path, umask):
  path, _, _ = sharded
  model, _ = load_pretrained(path)
  old = os.umask(umask)
  try:
    save_pretrained(model, tmp_path / "single")
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=20_000)
  finally:
    os.umask(old)
  for out in (tmp_path / "single", tmp_path / "sharded"):
    for file in os.listdir(out):  # weights, index and config alike
      assert stat.S_IMODE(os.stat(out / file).st_mode) == 0o666 & ~umask, file


def test_dtype_casts_on_load_and_export_writes_that_dtype(sharded, tmp_path):
  path, _, tensors = sharded
  model, cfg = load_pretrained(path, dtype=jnp.bfloat16)
  assert cfg.dtype == "bfloat16"
  assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(model.embed_tokens.embedding[...]),
      tensors["model.embed_tokens.weight"].astype(jnp.bfloat16))
  save_pretrained(model, tmp_path / "bf16")
  written = _read_checkpoint(tmp_path / "bf16")
  assert {v.dtype for v in written.values()} == {np.dtype(jnp.bfloat16)}
  hf = json.loads((tmp_path / "bf16" / "config.json").read_text())
  assert hf["torch_dtype"] == "bfloat16"


def test_config_overrides(sharded):
  path, _, _ = sharded
  _, cfg = load_pretrained(path, config_overrides={"block_size": 1, "sub_block_size": 1})
  assert (cfg.block_size, cfg.sub_block_size) == (1, 1)


def test_transformers_5_config_spelling(tmp_path):
  hf = _preset_json("tiny_qwen3")
  tensors = _random_tensors(hf)
  del hf["rope_theta"], hf["torch_dtype"]
  hf.update(rope_parameters={"rope_type": "default", "rope_theta": 5e5}, dtype="bfloat16")
  _write_checkpoint(tmp_path / "v5", hf, tensors, num_shards=1)
  _, cfg = load_pretrained(tmp_path / "v5")
  assert (cfg.rope_theta, cfg.dtype) == (5e5, "bfloat16")

  hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}
  _write_checkpoint(tmp_path / "yarn", hf, tensors, num_shards=1)
  with pytest.raises(ValueError, match=r"config\.json: RoPE type 'yarn' is not supported"):
    load_pretrained(tmp_path / "yarn")


# ---------------------------------------------------------------------------------------------
# Broken checkpoints: each error names the tensor and the file.


def _shard_of(path, name: str) -> str:
  index = json.loads((path / "model.safetensors.index.json").read_text())
  return index["weight_map"][name]


def _rewrite_shard(path, file: str, edit) -> None:
  tensors = safetensors.numpy.load_file(path / file)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path / file)


def test_corrupt_file_names_the_file(sharded):
  path, _, _ = sharded
  file = _shard_of(path, "model.norm.weight")
  (path / file).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors header")
  with pytest.raises(ValueError, match=rf"{file} is not a valid safetensors file"):
    load_pretrained(path)


def test_truncated_file_names_the_file(sharded):
  path, _, _ = sharded
  file = _shard_of(path, "model.norm.weight")
  data = (path / file).read_bytes()
  (path / file).write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=rf"{file}"):
    load_pretrained(path)


def test_missing_tensor_in_single_file(tmp_path):
  hf = _preset_json("tiny_qwen2")
  tensors = _random_tensors(hf)
  del tensors["model.layers.1.self_attn.k_proj.bias"]
  _write_checkpoint(tmp_path, hf, tensors, num_shards=1)
  with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"
                                       r": expected in .*model\.safetensors"):
    load_pretrained(tmp_path)


def test_tensor_listed_in_index_but_absent_from_shard(sharded):
  path, _, _ = sharded
  name = "model.layers.0.mlp.up_proj.weight"
  file = _shard_of(path, name)
  _rewrite_shard(path, file, lambda t: t.pop(name))
  with pytest.raises(ValueError, match=rf"lists tensor '{name}' in .*{file}, which does not"):
    load_pretrained(path)


def test_unexpected_tensor(sharded):
  path, hf, _ = sharded
  name = "model.layers.0.self_attn.o_proj.bias"
  file = _shard_of(path, "model.norm.weight")
  _rewrite_shard(path, file, lambda t: t.update({name: np.zeros(hf["hidden_size"], np.float32)}))
  index_file = path / "model.safetensors.index.json"
  index = json.loads(index_file.read_text())
  index["weight_map"][name] = file
  index_file.write_text(json.dumps(index))
  with pytest.raises(ValueError, match=rf"unexpected tensor '{name}' in .*{file}"):
    load_pretrained(path)


def test_tensor_missing_from_index(sharded):
  path, _, _ = sharded
  file = _shard_of(path, "model.norm.weight")
  _rewrite_shard(path, file, lambda t: t.update({"extra": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=rf"tensor 'extra' in .*{file} is not listed in"):
    load_pretrained(path)


def test_ignorable_tensor_is_skipped(tmp_path):
  hf = _preset_json("tiny_qwen2")
  tensors = _random_tensors(hf)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
  _write_checkpoint(tmp_path, hf, tensors, num_shards=1)
  load_pretrained(tmp_path)


def test_misshaped_tensor(sharded):
  path, hf, _ = sharded
  name = "model.layers.1.self_attn.k_proj.weight"
  file = _shard_of(path, name)
  wrong = np.zeros((hf["num_attention_heads"] * hf["head_dim"], hf["hidden_size"]), np.float32)
  _rewrite_shard(path, file, lambda t: t.update({name: wrong}))
  with pytest.raises(ValueError, match=rf"tensor '{name}' in .*{file} has shape \(64, 64\), "
                                       r"expected \(32, 64\)"):
    load_pretrained(path)


def test_missing_files(sharded):
  path, _, _ = sharded
  file = _shard_of(path, "model.norm.weight")
  os.remove(path / file)
  with pytest.raises(FileNotFoundError, match=rf"{file} does not exist"):
    load_pretrained(path)
  os.remove(path / "model.safetensors.index.json")
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
    load_pretrained(path)
  os.remove(path / "config.json")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_pretrained(path)


@pytest.mark.parametrize("same", [True, False])
def test_tied_checkpoint_with_lm_head(tmp_path, same):
  hf = _preset_json("tiny_qwen2")
  assert hf["tie_word_embeddings"]
  tensors = _random_tensors(hf)
  head = tensors["model.embed_tokens.weight"]
  tensors["lm_head.weight"] = head.copy() if same else head + 1
  _write_checkpoint(tmp_path, hf, tensors, num_shards=1)
  if same:
    model, _ = load_pretrained(tmp_path)
    assert model.lm_head is None
  else:
    with pytest.raises(ValueError, match=r"'lm_head.weight' in .*model\.safetensors differs"):
      load_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template.

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _write_tokenizer(path) -> None:
  vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", "<|im_start|>"])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))


def test_load_tokenizer_and_chat_template(tmp_path):
  _write_tokenizer(tmp_path)
  tok, template = load_tokenizer(tmp_path)
  assert tok.encode("hello world foo").ids == [1, 2, 0]
  assert template is None

  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": _CHATML}))
  _, template = load_tokenizer(tmp_path)
  assert template == _CHATML
  prompt = apply_chat_template(template, [{"role": "user", "content": "hi"}])
  assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_variants(tmp_path):
  _write_tokenizer(tmp_path)
  (tmp_path / "chat_template.jinja").write_text(_CHATML)
  assert load_tokenizer(tmp_path)[1] == _CHATML
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": [{"name": "tool_use", "template": "x"},
                         {"name": "default", "template": "{{ raise_exception('no') }}"}]}))
  _, template = load_tokenizer(tmp_path)
  with pytest.raises(ValueError, match="chat template: TemplateError: no"):
    apply_chat_template(template, [])
  with pytest.raises(ValueError, match="chat template: TemplateSyntaxError"):
    apply_chat_template("{% if %}", [])


def test_jinja2_is_a_declared_dependency():
  # Fast-dLLM v2 and SDAR checkpoints ship chat templates: rendering one must not need an
  # extra install.
  import tomllib
  with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "pyproject.toml"), "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
  assert any(re.match(r"jinja2\b", d, re.I) for d in dependencies), dependencies


def test_chat_template_tojson_keeps_characters():
  out = apply_chat_template("{{ tools | tojson }}", [], tools=[{"name": "a<b", "d": "é"}])
  assert out == '[{"name": "a<b", "d": "é"}]'


def test_missing_tokenizer(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
    load_tokenizer(tmp_path)


def test_name_map_checks_each_part_against_the_models_parameter():
  from mage_jax import checkpoint
  from mage_jax.model import Transformer

  cfg = ModelConfig.preset("tiny_qwen2")
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  flat = dict(nnx.to_flat_state(nnx.state(abstract)))
  specs = checkpoint._tensor_specs(cfg)
  checkpoint._check_name_map(specs, flat)  # the real map agrees with the model
  name = "model.layers.0.mlp.up_proj.weight"
  wrong = dict(specs, **{name: specs[name]._replace(shape=(1, 2))})
  with pytest.raises(ValueError, match=r"name map shape \(1, 2\) of 'model.layers.0.mlp"):
    checkpoint._check_name_map(wrong, flat)
  ghost = dict(specs, extra=specs[name]._replace(path=("layers", 0, "mlp", "nope")))
  with pytest.raises(ValueError, match="'extra' points at layers.0.mlp.nope"):
    checkpoint._check_name_map(ghost, flat)
  del flat[specs["model.norm.weight"].path]
  missing = {n: s for n, s in specs.items() if n != "model.norm.weight"}
  flat[("norm", "extra")] = flat[specs["model.embed_tokens.weight"].path]
  with pytest.raises(ValueError, match="model parameter norm.extra has no Hugging Face name"):
    checkpoint._check_name_map(missing, flat)
