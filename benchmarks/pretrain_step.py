"""Where the time of one pretraining step of the default model goes, at wider models and
larger batches: is the step overhead-bound, so that more width or batch is nearly free?

The step is the trainer's own jitted pretraining step (train.trainer.make_train_step, mode
"pretrain": noise views, the doubled [x_t | x_0] forward + backward, chunked LM head + CE,
AdamW on float32 master weights), fed random tokens of the shape the trainer feeds it (int32
[grad_accum, batch, L]: packed documents are plain token rows, no segment or mask arrays).
The training settings (seq_len, batch, remat, loss_chunk, complementary, block_size) come from
a stage config (``--config``); its "model" is a previous stage's export, so the model is built
instead from ``--base_config``'s preset and model_overrides (the first stage's: vocab 512,
8 layers, ...) with the stage's own model_overrides on top, random weights.
``--hidden_sizes`` widens it: heads = hidden / head_dim (64), KV heads 2 (or the largest
divisor of the heads below that), MLP 3 x hidden.

Every (batch, hidden) variant runs in its own subprocess, so peak memory (memory_stats
peak_bytes_in_use) is that variant's alone and an out-of-memory variant does not end the sweep.
Per variant: the median of ``--steps`` blocked steps after a warm-up (compile) step, each step
including the host-to-device copy of its batch as in the trainer; "pipelined": the same steps
dispatched back to back and blocked once (how the trainer runs them, metrics fetched late).
Model FLOPs per step, with S = grad_accum x batch x views sequences (views = 2 with
complementary masking) of L tokens, each run as 2L tokens ([x_t | x_0], also at block_size 1):
  6 x (layer matmul weights) x S x 2L          (q/k/v/o, gate/up, down; biases / norms not)
  + 6 x vocab x hidden x S x L                 (LM head over the L predicting states)
  + 12 x layers x heads x head_dim x S x L x (L + block_size)   (attention: QK^T and PV,
      forward 4 FLOPs per visible (query, key) pair and head dim, backward twice that; the
      block-diffusion mask lets a sequence see L x (L + block_size) pairs of the 4L^2)
No recomputation counted (remat, the LM head's checkpoint), so TFLOP/s is model FLOPs per second.
With ``--profile`` the first variant (``--profile_all``: every one) traces ``--profile_steps``
steps with jax.profiler (bench_common.trace_kernels): kernels per step, busy time (sum of kernel
durations), span (first kernel start to last kernel end), the top 12 kernels and their share of
busy. busy << step: launch / host gaps; busy ~ step and a few kernels: those kernels. Off the GPU
no kernels are traced and the profile is left empty.

  python benchmarks/pretrain_step.py                 # s3 (AR, L 2048): 3 batches x 3 widths
  python benchmarks/pretrain_step.py \
      --config=configs/train/default_model/s6_diffusion2048_numbers.json   # block diffusion
  python benchmarks/pretrain_step.py --batch_sizes=1 --hidden_sizes=128 --seq_len=128 --steps=1

Writes pretrain_step.json and pretrain_step.md under --out (default $OUT) after every variant
(a run cut short keeps what it finished); prints the table last.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags

# The repository root (mage_jax, train) for bench_common and the children.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable-next=wrong-import-position
from bench_common import REPO_ROOT, TrainStepSetup, kernel_summary, run_child, trace_kernels

_CONFIG = flags.DEFINE_string("config", "configs/train/default_model/s3_ar2048.json",
                              "Stage config: training settings and model_overrides.")
_BASE_CONFIG = flags.DEFINE_string("base_config", "configs/train/default_model/s1_ar128.json",
                                   "Config whose model (a preset) and model_overrides build the "
                                   "model; the stage config's model_overrides go on top.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", None, "Micro-batch sizes (default: the config's "
                                 "batch size x 1, 2, 4).")
_HIDDEN_SIZES = flags.DEFINE_list("hidden_sizes", ["256", "384", "512"], "Model widths "
                                  "(multiples of head_dim).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Training length L (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up (compile) step.")
_PROFILE = flags.DEFINE_bool("profile", True, "Trace the first variant's kernels.")
_PROFILE_ALL = flags.DEFINE_bool("profile_all", False, "Trace every variant's kernels.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "Steps per kernel trace.")
_VARIANT_TIMEOUT = flags.DEFINE_integer("variant_timeout", 300, "Seconds one variant's "
                                        "subprocess may run.")
_OUT = flags.DEFINE_string("out", os.environ.get("OUT", "."), "Where results are written.")
_VARIANT = flags.DEFINE_string("variant", None, "Internal: run one BATCH:HIDDEN variant "
                               "in-process and print its JSON result.")

def _read_json(path: str) -> dict:
  with open(path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)) as f:
    return json.load(f)


def _width_overrides(hidden: int, model_overrides: dict) -> dict:
  """heads = hidden / head_dim, KV heads as before (or the largest divisor of the heads below
  that), MLP 3 x hidden."""
  head_dim = model_overrides["head_dim"]
  if hidden % head_dim:
    raise app.UsageError(f"--hidden_sizes: {hidden} is not a multiple of head_dim={head_dim}")
  heads = hidden // head_dim
  kv_heads = max(d for d in range(1, min(model_overrides["num_kv_heads"], heads) + 1)
                 if heads % d == 0)
  return dict(hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
              intermediate_size=3 * hidden)


def _train_config_dict(batch: int, hidden: int, seq_len: int) -> dict:
  """The stage config with the base model (plus width), this batch and length, a temp workdir."""
  raw = _read_json(_CONFIG.value)
  base = _read_json(_BASE_CONFIG.value)
  overrides = {**base["model_overrides"], **raw.get("model_overrides", {})}
  overrides.update(_width_overrides(hidden, overrides))
  raw.update(model=base["model"], model_overrides=overrides, workdir=tempfile.mkdtemp(),
             seq_len=seq_len, export_dir="")
  raw["optim"] = {**raw.get("optim", {}), "batch_size": batch}
  return raw


def _model_flops(cfg, model_cfg, params: dict) -> dict:
  """Model FLOPs of one step (the formula in the module docstring), by part."""
  seqs = cfg.optim.grad_accum * cfg.optim.batch_size * (2 if cfg.complementary else 1)
  seq_len = cfg.seq_len
  layer_weights = sum(v.size for k, v in params.items()
                      if k.startswith("layers.") and k.endswith(".kernel"))
  matmul = (6 * layer_weights * seqs * 2 * seq_len
            + 6 * model_cfg.vocab_size * model_cfg.hidden_size * seqs * seq_len)
  attention = (12 * model_cfg.num_layers * model_cfg.num_heads * model_cfg.head_dim * seqs
               * seq_len * (seq_len + model_cfg.block_size))
  return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def _measure(batch: int, hidden: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np


  seq_len = _SEQ_LEN.value
  setup = TrainStepSetup.build(_train_config_dict(batch, hidden, seq_len), "pretrain")
  cfg, model_cfg, params = setup.cfg, setup.model_cfg, setup.params
  state, step_fn = setup.state, setup.step_fn
  num_params = sum(v.size for v in params.values())
  flops = _model_flops(cfg, model_cfg, params)

  # Random token rows as the data pipeline yields them: int32 [grad_accum, batch, L], any id
  # but the mask id (data never holds it).
  rng = np.random.default_rng(0)
  shape = (cfg.optim.grad_accum, batch, seq_len)

  def random_batch():
    ids = rng.integers(0, model_cfg.vocab_size - 1, shape)
    return (ids + (ids >= model_cfg.mask_token_id)).astype(np.int32)

  batches = [random_batch() for _ in range(_STEPS.value + 1)]

  def run(tokens):  # one step as the trainer runs it: host batch -> device, state donated
    nonlocal state
    state, metrics = step_fn(state, jnp.asarray(tokens), setup.frozen)
    return metrics

  start = time.perf_counter()
  jax.block_until_ready(run(batches[0]))
  first = time.perf_counter() - start
  times = []
  for tokens in batches[1:]:
    start = time.perf_counter()
    metrics = jax.block_until_ready(run(tokens))
    times.append(time.perf_counter() - start)
  start = time.perf_counter()
  for tokens in batches[1:]:
    metrics = run(tokens)
  jax.block_until_ready(metrics)
  pipelined = (time.perf_counter() - start) / _STEPS.value
  stats = jax.local_devices()[0].memory_stats() or {}

  profile = None
  if _PROFILE.value:
    calls = _PROFILE_STEPS.value
    summary = kernel_summary(trace_kernels(lambda: run(batches[0]), calls), calls)
    if summary["kernels_per_step"]:
      profile = summary
  step_s = statistics.median(times)
  tokens_per_step = cfg.optim.grad_accum * batch * seq_len
  return {
      "batch": batch, "hidden": hidden, "seq_len": seq_len, "grad_accum": cfg.optim.grad_accum,
      "num_heads": model_cfg.num_heads, "num_kv_heads": model_cfg.num_kv_heads,
      "intermediate_size": model_cfg.intermediate_size, "block_size": model_cfg.block_size,
      "complementary": cfg.complementary, "remat": cfg.remat, "loss_chunk": cfg.loss_chunk,
      "params": num_params, "flops": flops, "step_s": step_s, "steps_s": times,
      "pipelined_step_s": pipelined, "first_step_s": first,
      "tokens_per_s": tokens_per_step / step_s, "tflops_per_s": flops["total"] / step_s / 1e12,
      "peak_gib": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
      "loss": float(metrics["loss"]), "profiled": _PROFILE.value, "profile": profile,
      "device": jax.devices()[0].device_kind, "jax": jax.__version__,
  }


def _run_variant(batch: int, hidden: int, seq_len: int, profile: bool) -> dict:
  result = run_child(
      [os.path.abspath(__file__), f"--variant={batch}:{hidden}", f"--config={_CONFIG.value}",
       f"--base_config={_BASE_CONFIG.value}", f"--seq_len={seq_len}", f"--steps={_STEPS.value}",
       f"--profile_steps={_PROFILE_STEPS.value}", "--profile" if profile else "--noprofile"],
      timeout=_VARIANT_TIMEOUT.value)
  if "error" in result:
    return {"batch": batch, "hidden": hidden, "seq_len": seq_len, **result}
  return result


def _header(results: list[dict], seq_len: int) -> str:
  device = next((r["device"] for r in results if "device" in r), "unknown")
  jax_version = next((r["jax"] for r in results if "jax" in r), "unknown")
  ok = next((r for r in results if "error" not in r), None)
  setup = "" if ok is None else (
      f" block_size {ok['block_size']}, {2 if ok['complementary'] else 1} view(s) per sequence, "
      f"each a doubled [x_t | x_0] forward of 2L = {2 * seq_len} tokens; remat "
      f"{ok['remat']}, loss_chunk {ok['loss_chunk']}, grad_accum {ok['grad_accum']}.")
  return (f"Pretraining step of {os.path.basename(_CONFIG.value)} (L = {seq_len}) on the model "
          f"of {os.path.basename(_BASE_CONFIG.value)} widened per row (head_dim 64, MLP 3 x "
          f"hidden), random weights and tokens; {device}, jax {jax_version}, "
          f"{datetime.date.today()}.{setup} step: median of {_STEPS.value} blocked steps; "
          f"pipelined: the same steps back to back, one block. tokens/s counts training tokens "
          f"(grad_accum x batch x L per step), as the trainer logs them. TFLOP/s: model FLOPs "
          f"(6 x layer matmul weights x forward tokens + 6 x vocab x hidden x predicted tokens + "
          f"12 x layers x heads x head_dim x visible attention pairs L(L + block_size) per "
          f"view; no recomputation) per step time.")


def _table(results: list[dict]) -> str:
  lines = ["| batch | hidden | heads q/kv | params (M) | step (s) | pipelined (s) | tokens/s | "
           "TFLOP/step | attn share | TFLOP/s | peak (GiB) | first step (s) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['batch']} | {r['hidden']} | | | {r['error']} | | | | | | | |")
      continue
    peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    lines.append(
        f"| {r['batch']} | {r['hidden']} | {r['num_heads']}/{r['num_kv_heads']} | "
        f"{r['params'] / 1e6:.2f} | {r['step_s']:.4f} | {r['pipelined_step_s']:.4f} | "
        f"{r['tokens_per_s']:.0f} | {r['flops']['total'] / 1e12:.3g} | "
        f"{r['flops']['attention'] / r['flops']['total']:.0%} | {r['tflops_per_s']:.3g} | "
        f"{peak} | {r['first_step_s']:.1f} |")
  return "\n".join(lines)


def _profiles(results: list[dict]) -> str:
  """Per traced variant: kernels, busy, span against the step, by kind, the top 12 kernels."""
  parts = []
  for r in results:
    if "error" in r or not r["profiled"]:
      continue
    p = r["profile"]
    if p is None:
      parts += [f"Batch {r['batch']}, hidden {r['hidden']}: no GPU kernels traced (not on a "
                "GPU), no kernel profile.", ""]
      continue
    step_ms = 1e3 * r["step_s"]
    kinds = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(p["by_kind"].items(),
                                                            key=lambda kv: -kv[1]))
    parts += [f"### Kernels of batch {r['batch']}, hidden {r['hidden']}", "",
              f"Per step: {p['kernels_per_step']:.0f} kernels, busy {p['busy_ms']:.2f} ms, "
              f"span {p['span_ms']:.2f} ms, step {step_ms:.2f} ms (busy / step "
              f"{p['busy_ms'] / step_ms:.0%}, span / step {p['span_ms'] / step_ms:.0%}). "
              f"By kind: {kinds}.", "",
              "| kernel | calls / step | ms / step | share of busy |", "|---|---|---|---|"]
    parts += [f"| `{t['name']}` | {t['per_step']:.1f} | {t['ms_per_step']:.3f} | "
              f"{t['share']:.1%} |" for t in p["top"]]
    parts.append("")
  return "\n".join(parts)


def _write(results: list[dict], seq_len: int) -> str:
  """Writes the JSON and markdown; returns the markdown."""
  header, table, profiles = _header(results, seq_len), _table(results), _profiles(results)
  text = header + "\n\n" + table + "\n" + ("\n" + profiles if profiles else "")
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "pretrain_step.json"), "w") as f:
    json.dump({"header": header, "config": _CONFIG.value, "base_config": _BASE_CONFIG.value,
               "results": results}, f, indent=2)
  with open(os.path.join(_OUT.value, "pretrain_step.md"), "w") as f:
    f.write(text)
  return text


def main(argv):
  del argv
  if _VARIANT.value is not None:
    batch, hidden = map(int, _VARIANT.value.split(":"))
    print(json.dumps(_measure(batch, hidden)))
    return
  stage = _read_json(_CONFIG.value)
  seq_len = _SEQ_LEN.value or stage["seq_len"]
  batch_sizes = ([int(b) for b in _BATCH_SIZES.value] if _BATCH_SIZES.value else
                 [stage.get("optim", {}).get("batch_size", 8) * m for m in (1, 2, 4)])
  hidden_sizes = [int(h) for h in _HIDDEN_SIZES.value]
  base_overrides = {**_read_json(_BASE_CONFIG.value)["model_overrides"],
                    **stage.get("model_overrides", {})}
  for hidden in hidden_sizes:  # a bad width is a flag error before any subprocess starts
    _width_overrides(hidden, base_overrides)
  results = []
  for hidden in hidden_sizes:
    for batch in batch_sizes:
      profile = _PROFILE.value and (_PROFILE_ALL.value or not results)
      results.append(_run_variant(batch, hidden, seq_len, profile))
      print(json.dumps({k: v for k, v in results[-1].items() if k not in ("profile", "steps_s")}),
            flush=True)
      text = _write(results, seq_len)
  print(text)


if __name__ == "__main__":
  app.run(main)
