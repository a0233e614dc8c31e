"""Per-device memory and tensor-parallel traffic of a model laid out by mage_jax.sharding.

Pure arithmetic from the config (no device needed): which (data, model) mesh the rules allow,
bytes per device for weights, KV cache and MAGE selections, and the bytes each device sends
for the all-reduces of one denoising step. The output is pasted in docs/sharding.md.

    python benchmarks/sharding_plan.py  # 7B, 128K context, batch 32, 8 GPUs
"""

from __future__ import annotations

import argparse
import math
import os

import jax.numpy as jnp
from flax import nnx

from mage_jax import sharding
from mage_jax.config import ModelConfig
from mage_jax.model import Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024**3
MIB = 1024**2


def model_axis(cfg: ModelConfig, devices: int) -> int:
  """The widest "model" axis that divides the devices and every tensor the rules split."""
  split = (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size)
  return max(m for m in range(1, devices + 1)
             if devices % m == 0 and all(n % m == 0 for n in split))


def weight_bytes_per_device(cfg: ModelConfig, sizes: dict[str, int]) -> tuple[int, int]:
  """(bytes per device, total bytes) of the weights in the model's dtype."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  per_device = total = 0
  for path, var in nnx.to_flat_state(nnx.state(abstract)):
    value = var.get_value()
    nbytes = math.prod(value.shape) * value.dtype.itemsize
    spec = sharding.logical_spec(sharding.param_axes(path))
    shards = math.prod(sizes[a] for a in spec if a is not None)
    per_device += nbytes // shards
    total += nbytes
  return per_device, total


def ring_all_reduce_sent(payload: float, parties: int) -> float:
  """Bytes each device sends in a ring all-reduce of ``payload`` bytes."""
  return 2 * (parties - 1) / parties * payload


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(REPO, "mage_jax", "presets", "fast_dllm_v2_7b.json"))
  parser.add_argument("--context", type=int, default=128 * 1024, help="KV cache capacity")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--budget", type=int, default=512, help="MAGE rows per KV head")
  parser.add_argument("--dense_layers", type=int, default=2)
  args = parser.parse_args()

  cfg = ModelConfig.from_json_file(args.config)
  m = model_axis(cfg, args.devices)
  d = args.devices // m
  sizes = {"data": d, "model": m}
  act = jnp.dtype(cfg.dtype).itemsize
  local_batch, local_kv = args.batch // d, cfg.num_kv_heads // m
  block = cfg.block_size

  print(f"model: {os.path.basename(args.config)}: {cfg.num_layers} layers, {cfg.num_heads} q / "
        f"{cfg.num_kv_heads} KV heads, head_dim {cfg.head_dim}, hidden {cfg.hidden_size}, "
        f"intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}, {cfg.dtype}")
  print(f"request: batch {args.batch}, context {args.context}, block {block}, "
        f"MAGE budget {args.budget} ({cfg.num_layers - args.dense_layers} sparse layers)")
  print(f"mesh: data:{d},model:{m} on {args.devices} devices (model axis = widest divisor of "
        f"{cfg.num_kv_heads} KV heads)")
  if args.batch % d:
    raise SystemExit(f"batch {args.batch} does not divide data axis {d}")
  print(f"per device: batch {local_batch}, KV heads {local_kv}, q heads {cfg.num_heads // m}, "
        f"MLP hidden {cfg.intermediate_size // m}, vocab {cfg.vocab_size // m}")
  print()

  weights, weights_total = weight_bytes_per_device(cfg, sizes)
  cache = 2 * cfg.num_layers * local_batch * local_kv * args.context * cfg.head_dim * act
  slots = min(args.budget, args.context)
  sparse = cfg.num_layers - args.dense_layers
  selections = sparse * local_batch * local_kv * (slots + 1) * 4  # int32 indices + count
  logits = local_batch * block * (cfg.vocab_size // m) * 4
  train_state = 3 * 4 * weights_total // act // m  # float32 master + 2 Adam moments, no FSDP
  print("memory per device                          GiB")
  print(f"  weights ({cfg.dtype}, total {weights_total / GIB:.2f})".ljust(40)
        + f"{weights / GIB:8.2f}")
  print(f"  KV cache ({args.context} rows)".ljust(40) + f"{cache / GIB:8.2f}")
  print("  MAGE selections (int32)".ljust(40) + f"{selections / GIB:8.4f}"
        f"  ({selections / MIB:.2f} MiB)")
  print("  step logits (float32, vocab-parallel)".ljust(40) + f"{logits / GIB:8.4f}")
  print("  total".ljust(40) + f"{(weights + cache + selections + logits) / GIB:8.2f}")
  print(f"  (training state, f32 master + Adam, /{m})".ljust(40) + f"{train_state / GIB:8.2f}")
  print()

  hidden_msg = local_batch * block * cfg.hidden_size * act
  count = 2 * cfg.num_layers + 1  # o_proj and down_proj per layer, the vocab-parallel embedding
  sent = ring_all_reduce_sent(hidden_msg, m)
  stats = 3 * local_batch * block * 4  # max, sum-exp, argmax over the vocab shards
  print("tensor-parallel traffic per denoising step (within each group of "
        f"{m} model devices)")
  print(f"  all-reduce of [batch {local_batch}, block {block}, hidden {cfg.hidden_size}] "
        f"{cfg.dtype}: {hidden_msg / MIB:.2f} MiB each")
  print(f"  count: 2 per layer x {cfg.num_layers} + 1 (embedding) = {count}")
  print(f"  payload: {count * hidden_msg / MIB:.1f} MiB; sent per device (ring, 2(M-1)/M): "
        f"{count * sent / MIB:.1f} MiB")
  print(f"  vocab softmax statistics: ~{stats / 1024:.1f} KiB (negligible)")
  print("  attention, KV cache, MAGE selection: 0 bytes (whole KV-head groups per device)")
  print("  data axis: 0 bytes while decoding (sequences are independent)")


if __name__ == "__main__":
  main()
