"""Sharded export under a file-size limit (save_pretrained's max_shard_bytes): every shard file,
header included, stays within the limit, the index lists every tensor once, and the export
loads back identically. The long-context stages rely on this to return weights from the GPU
machine in files of at most 16 MiB (configs/train/long_context)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from mage_jax.checkpoint import load_pretrained, safetensors_file_bytes, save_pretrained
from mage_jax.config import ModelConfig
from mage_jax.model import build_model


@pytest.fixture(scope="module")
def model():
  return build_model(ModelConfig.preset("tiny_qwen2", dtype="bfloat16"), seed=3)


def _files(path) -> list[str]:
  return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


def test_file_size_bound_is_an_upper_bound_and_tight(model, tmp_path):
  save_pretrained(model, tmp_path)
  (file,) = _files(tmp_path)
  shapes = {n: v.shape for n, v in safetensors.numpy.load_file(tmp_path / file).items()}
  actual = os.path.getsize(tmp_path / file)
  bound = safetensors_file_bytes(shapes, "bfloat16")
  # The bound writes every offset with the file's largest value: a few digits per tensor more.
  assert actual <= bound <= actual + 8 * len(shapes) + 8


@pytest.mark.parametrize("fraction", [0.2, 0.45])
def test_shards_stay_within_the_limit_and_load_back_identically(model, tmp_path, fraction):
  single = tmp_path / "single"
  save_pretrained(model, single)
  limit = int(os.path.getsize(single / "model.safetensors") * fraction)
  out = tmp_path / "sharded"
  save_pretrained(model, out, max_shard_bytes=limit)

  files = _files(out)
  assert len(files) >= int(1 / fraction)
  assert files == [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                   for i in range(len(files))]
  for file in files:
    assert os.path.getsize(out / file) <= limit, file
  index = json.loads((out / "model.safetensors.index.json").read_text())
  whole = safetensors.numpy.load_file(single / "model.safetensors")
  assert sorted(index["weight_map"]) == sorted(whole)
  assert sorted(set(index["weight_map"].values())) == files
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in whole.values())
  for file in files:
    shard = safetensors.numpy.load_file(out / file)
    assert set(shard) == {n for n, f in index["weight_map"].items() if f == file}
    for name, value in shard.items():
      np.testing.assert_array_equal(value, whole[name], err_msg=name)

  reloaded, cfg = load_pretrained(out)
  assert cfg == model.config
  for (pa, a), (pb, b) in zip(nnx.to_flat_state(nnx.state(model)),
                              nnx.to_flat_state(nnx.state(reloaded))):
    assert pa == pb
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))


def test_a_limit_equal_to_a_files_bound_keeps_exactly_those_tensors(model, tmp_path):
  # At a 1-byte limit every tensor is a shard of its own, in export order.
  save_pretrained(model, tmp_path / "each", max_shard_bytes=1)
  each = json.loads((tmp_path / "each" / "model.safetensors.index.json").read_text())
  order = sorted(each["weight_map"], key=each["weight_map"].get)
  assert len(set(each["weight_map"].values())) == len(order)
  shapes = {n: safetensors.numpy.load_file(tmp_path / "each" / f)[n].shape
            for n, f in each["weight_map"].items()}
  first = {n: shapes[n] for n in order[:5]}
  save_pretrained(model, tmp_path / "cut", max_shard_bytes=safetensors_file_bytes(first,
                                                                                  "bfloat16"))
  cut = json.loads((tmp_path / "cut" / "model.safetensors.index.json").read_text())
  first_file = _files(tmp_path / "cut")[0]
  assert sorted(n for n, f in cut["weight_map"].items() if f == first_file) == sorted(first)
