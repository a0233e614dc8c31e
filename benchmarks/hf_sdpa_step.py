"""What a user would pick instead: the same denoising step through Hugging Face transformers.

    python benchmarks/hf_sdpa_step.py --preset=fast_dllm_v2_1.5b --contexts=32768,131072 \
        --batches=1,8 --out=$OUT

The model is transformers' own Qwen2ForCausalLM (Qwen3ForCausalLM for the SDAR presets) built
from a config matching --preset (``hf_config_dict``: vocabulary, hidden and intermediate sizes,
layers, heads, KV heads, head size), random weights, bfloat16, attn_implementation="sdpa"
(torch.nn.functional.scaled_dot_product_attention), on the GPU.

One step = one forward of a 32-token block (the preset's block size) at positions
[context, context + block) over a transformers DynamicCache holding ``context`` rows per layer,
logits for every block position, as one block-diffusion denoising step: the block's queries see
the whole cache and the whole block (no causal mask inside the block). transformers has no
switch for that with a cache (without a mask its SDPA path would make the block causal), so the
step passes an explicit 4-D boolean mask [batch, 1, block, context + block], all True, which
transformers hands to SDPA unchanged. With a mask, transformers expands K/V over the query
heads of each group (repeat_kv) before SDPA, and SDPA runs its memory-efficient kernel: that is
what the user gets.

The cache is filled cheaply: random bfloat16 K/V of shape [batch, kv_heads, context, head_dim]
written into every layer through ``DynamicCache.update`` (what a prefill would leave, without
the 128K-token prefill; the values do not change the step's time). The forward appends the
block's K/V to the cache (DynamicCache concatenates: it rewrites every layer's cache each step,
part of the measured time); after each timed step the cache is cropped back to ``context`` rows,
so every repeat sees the same cache. Time: median of --repeats forwards after two warm-ups,
each between torch.cuda.synchronize() calls; eager PyTorch, so the host's kernel launches are
part of it, as they are for a user.

Floor of the step: (weight bytes + the cache's K/V bytes) / the device-to-device copy bandwidth
measured in the script (a 1 GiB tensor copy, bytes read + written per second), as decode_e2e's
floor. A cell that runs out of GPU memory (7B at 128K, batch 8) is recorded as "out of memory".
Writes hf_sdpa_step.json and hf_sdpa_step.md under --out (rewritten after every cell).

torch and transformers are imported inside ``main``: without them the script exits with code 2
and one line naming the missing package.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mage_jax.config import ModelConfig, list_presets  # noqa: E402

FLAGS = flags.FLAGS
KV_ITEMSIZE = 2  # bfloat16 cache


def define_flags() -> None:
  """The script's flags, defined only when it runs as a script: tests import its helpers into
  a process where other modules define flags of the same names."""
  flags.DEFINE_string("preset", "fast_dllm_v2_1.5b", "model preset (random weights)")
  flags.DEFINE_list("contexts", ["32768", "131072"], "cache lengths in tokens")
  flags.DEFINE_list("batches", ["1", "8"], "batch sizes")
  flags.DEFINE_integer("repeats", 10, "timed steps per cell (median)")
  flags.DEFINE_string("out", os.environ.get("OUT", "/tmp"), "output folder")


def hf_config_dict(cfg: ModelConfig, max_positions: int) -> dict:
  """The transformers config (AutoConfig.for_model keyword arguments) of ``cfg``'s architecture,
  with positions up to at least ``max_positions``."""
  hf = cfg.to_hf_config()
  for key in ("architectures", "block_diffusion", "torch_dtype"):
    hf.pop(key)
  hf.update(max_position_embeddings=max(cfg.max_position_embeddings, max_positions),
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            use_sliding_window=False, use_cache=True)
  return hf


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int) -> int:
  """Bytes of every layer's cached K and V for ``batch`` sequences of ``context`` rows."""
  return batch * cfg.num_layers * context * 2 * cfg.num_kv_heads * cfg.head_dim * KV_ITEMSIZE


def step_floor_seconds(weight_bytes: int, cfg: ModelConfig, context: int, batch: int,
                       bytes_per_s: float) -> float:
  """A step reads the weights once and the whole cache once: its time at ``bytes_per_s``."""
  return (weight_bytes + kv_cache_bytes(cfg, context, batch)) / bytes_per_s


def import_torch_stack():
  """(torch, transformers), or exit 2 with one line naming the missing package."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    _fail("the 'torch' package is not installed (this benchmark needs torch and transformers)")
  try:
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError:
    _fail("the 'transformers' package is not installed (this benchmark needs torch and "
          "transformers)")
  if not torch.cuda.is_available():
    _fail("no CUDA device (torch.cuda.is_available() is False)")
  return torch, transformers


def _fail(why: str):
  print(f"hf_sdpa_step.py: {why}", file=sys.stderr)
  sys.exit(2)


def check_flags() -> None:
  if FLAGS.preset not in list_presets():
    raise app.UsageError(f"--preset: unknown {FLAGS.preset!r}; one of {list_presets()}")
  for name in ("contexts", "batches"):
    values = getattr(FLAGS, name)
    if not all(v.isdigit() and int(v) > 0 for v in values):
      raise app.UsageError(f"--{name} must be positive integers, got {values}")
  if FLAGS.repeats < 1:
    raise app.UsageError(f"--repeats must be >= 1, got {FLAGS.repeats}")


def copy_bandwidth(torch) -> float:
  """Bytes read + written per second by a device-to-device copy of 1 GiB (median of 10)."""
  src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
  dst = torch.empty_like(src)
  dst.copy_(src)
  times = []
  for _ in range(10):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dst.copy_(src)
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
  return 2 * src.numel() / statistics.median(times)


def time_step(torch, transformers, model, cfg: ModelConfig, context: int, batch: int) -> dict:
  """Median milliseconds of one block forward over a DynamicCache of ``context`` random rows,
  and the peak GPU memory of the cell."""
  block = cfg.block_size
  cache = transformers.DynamicCache(config=model.config)
  for layer in range(cfg.num_layers):
    shape = (batch, cfg.num_kv_heads, context, cfg.head_dim)
    keys = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    values = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    cache.update(keys, values, layer)
    del keys, values
  if cache.get_seq_length() != context:
    raise RuntimeError(f"cache holds {cache.get_seq_length()} rows, expected {context}")
  top = min(cfg.mask_token_id, *cfg.eos_token_ids)
  tokens = torch.randint(0, top, (batch, block), device="cuda")
  positions = (context + torch.arange(block, device="cuda"))[None].expand(batch, block)
  everything = torch.ones((batch, 1, block, context + block), dtype=torch.bool, device="cuda")

  def step():
    model(input_ids=tokens, position_ids=positions, attention_mask=everything,
          past_key_values=cache, use_cache=True)

  times = []
  with torch.inference_mode():
    for _ in range(2):
      step()
      cache.crop(context)
    for _ in range(FLAGS.repeats):
      torch.cuda.synchronize()
      t0 = time.perf_counter()
      step()
      torch.cuda.synchronize()
      times.append(time.perf_counter() - t0)
      cache.crop(context)
  return dict(step_ms=1e3 * statistics.median(times),
              peak_bytes=torch.cuda.max_memory_allocated())


def main(argv):
  del argv
  check_flags()
  torch, transformers = import_torch_stack()
  os.makedirs(FLAGS.out, exist_ok=True)
  contexts = sorted(map(int, FLAGS.contexts))
  cfg = ModelConfig.preset(FLAGS.preset)
  hf_config = transformers.AutoConfig.for_model(
      **hf_config_dict(cfg, contexts[-1] + 2 * cfg.block_size))
  with torch.device("cuda"):
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16,
                                                          attn_implementation="sdpa")
  model.eval()
  bandwidth = copy_bandwidth(torch)
  weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
  meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
              transformers=transformers.__version__, date=datetime.date.today().isoformat(),
              preset=FLAGS.preset, model=type(model).__name__, block=cfg.block_size,
              repeats=FLAGS.repeats, copy_bandwidth_GBps=bandwidth / 1e9,
              weight_bytes=weight_bytes)
  rows = []
  for batch in map(int, FLAGS.batches):
    for context in contexts:
      row = dict(batch=batch, context=context,
                 floor_ms=1e3 * step_floor_seconds(weight_bytes, cfg, context, batch, bandwidth))
      torch.cuda.reset_peak_memory_stats()
      try:
        row.update(time_step(torch, transformers, model, cfg, context, batch))
      except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or cuBLAS failing to allocate
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "ALLOC_FAILED" not in str(e):
          raise
        row["error"] = "out of memory"
      gc.collect()
      torch.cuda.empty_cache()
      rows.append(row)
      print(json.dumps(row), flush=True)
      write_results(meta, rows)
  print(markdown(meta, rows))


def write_results(meta: dict, rows: list[dict]) -> None:
  with open(os.path.join(FLAGS.out, "hf_sdpa_step.json"), "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=2)
  with open(os.path.join(FLAGS.out, "hf_sdpa_step.md"), "w") as f:
    f.write(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
  lines = [f"# hf_sdpa_step: {meta['preset']} as transformers {meta['model']}, random weights, "
           f"{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, "
           f"{meta['date']}", "",
           f"One denoising step: a {meta['block']}-token block over a DynamicCache of `context` "
           "rows, attn_implementation=sdpa with an explicit all-True 4-D mask (full attention "
           f"inside the block), median of {meta['repeats']}. Floor: weights "
           f"({meta['weight_bytes'] / 1e9:.2f} GB) + cache K/V at the measured copy bandwidth "
           f"({meta['copy_bandwidth_GBps']:.0f} GB/s, read + write).", "",
           "| batch | context | step ms | floor ms | step / floor | peak GPU memory GB |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['batch']} | {r['context']} | {r['error']} | {r['floor_ms']:.2f} | - "
                   "| - |")
    else:
      lines.append(f"| {r['batch']} | {r['context']} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} "
                   f"| {r['step_ms'] / r['floor_ms']:.1f} | {r['peak_bytes'] / 1e9:.1f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  define_flags()
  app.run(main)
