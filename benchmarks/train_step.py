"""Time one MAGE-FT (selfdistill) training step of the Fast-dLLM v2 1.5B shape on one GPU.

Random weights (mage_jax/presets/fast_dllm_v2_1.5b.json) and random tokens; the step is the trainer's
own jitted step (selection pass, sparse student forward + backward with remat, exact teacher
forward, chunked CE + KL, AdamW update on float32 master weights). Each sequence length runs in
its own subprocess so that peak memory (jax memory_stats peak_bytes_in_use) is that variant's
alone and an out-of-memory variant does not end the sweep.

  python benchmarks/train_step.py                      # 16K and 32K, results under $OUT
  python benchmarks/train_step.py --seq_lens=32768 --no_complementary --budget=1024

Prints a table last; writes train_step.json and train_step.md under --out (default $OUT).
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
import bench_common  # pylint: disable=wrong-import-position

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["16384", "32768"], "Training lengths L.")
_BUDGET = flags.DEFINE_integer("budget", 512, "MAGE budget k per noisy block and KV head.")
_DENSE_LAYERS = flags.DEFINE_integer("dense_layers", 2, "Leading dense layers.")
_COMPLEMENTARY = flags.DEFINE_bool("complementary", True, "Both complementary views per "
                                   "sequence (each step then runs 2 x 2L tokens).")
_LOSS_CHUNK = flags.DEFINE_integer("loss_chunk", 1024, "Tokens per LM-head chunk.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after one warm-up step.")
_MODEL = flags.DEFINE_string("model", "fast_dllm_v2_1.5b", "Preset name.")
_OUT = flags.DEFINE_string("out", os.environ.get("OUT", "."), "Where results are written.")
_VARIANT = flags.DEFINE_integer("variant", None, "Internal: run one sequence length in-process "
                                "and print its JSON result.")


def _measure(seq_len: int) -> dict:
  import jax
  import jax.numpy as jnp


  raw = {"model": _MODEL.value, "workdir": tempfile.mkdtemp(), "steps": 1000,
         "seq_len": seq_len, "complementary": _COMPLEMENTARY.value,
         "loss_chunk": _LOSS_CHUNK.value, "optim": {"batch_size": 1, "grad_accum": 1},
         "mage": {"budget": _BUDGET.value, "dense_layers": _DENSE_LAYERS.value}}
  setup = bench_common.TrainStepSetup.build(raw, "selfdistill")
  model_cfg, params, state, step_fn = setup.model_cfg, setup.params, setup.state, setup.step_fn
  teacher = {k: jnp.array(v, jnp.dtype(model_cfg.dtype), copy=True) for k, v in params.items()}

  def tokens(i):
    ids = jax.random.randint(jax.random.key(i), (1, 1, seq_len), 0, model_cfg.mask_token_id)
    return ids.astype(jnp.int32)

  start = time.perf_counter()
  state, metrics = step_fn(state, tokens(0), teacher)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for i in range(_STEPS.value):
    batch = tokens(i + 1)
    jax.block_until_ready(batch)
    start = time.perf_counter()
    state, metrics = step_fn(state, batch, teacher)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  stats = jax.local_devices()[0].memory_stats() or {}
  step_s = statistics.median(times)
  return {
      "seq_len": seq_len, "budget": _BUDGET.value, "complementary": _COMPLEMENTARY.value,
      "step_s": step_s, "first_step_s": first, "tokens_per_s": seq_len / step_s,
      "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
      "loss": float(metrics["loss"]), "kl": float(metrics["kl"]),
      "device": jax.devices()[0].device_kind, "jax": jax.__version__,
  }


def _run_variant(seq_len: int) -> dict:
  result = bench_common.run_child(
      [os.path.abspath(__file__), f"--variant={seq_len}", f"--budget={_BUDGET.value}",
       f"--dense_layers={_DENSE_LAYERS.value}", f"--steps={_STEPS.value}",
       f"--loss_chunk={_LOSS_CHUNK.value}", f"--model={_MODEL.value}",
       "--complementary" if _COMPLEMENTARY.value else "--nocomplementary"])
  return result if "error" not in result else {"seq_len": seq_len, **result}


def _table(results: list[dict]) -> str:
  lines = ["| L | budget | views | step (s) | tokens/s | peak (GiB) | first step (s) | loss | KL |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['seq_len']} | {_BUDGET.value} | | {r['error']} | | | | | |")
      continue
    lines.append(f"| {r['seq_len']} | {r['budget']} | {2 if r['complementary'] else 1} | "
                 f"{r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.1f} | "
                 f"{r['first_step_s']:.1f} | {r['loss']:.3f} | {r['kl']:.4f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if _VARIANT.value is not None:
    print(json.dumps(_measure(_VARIANT.value)))
    return
  results = [_run_variant(int(n)) for n in _SEQ_LENS.value]
  os.makedirs(_OUT.value, exist_ok=True)
  device = next((r["device"] for r in results if "device" in r), "unknown")
  jax_version = next((r["jax"] for r in results if "jax" in r), "unknown")
  header = (f"MAGE-FT step, {_MODEL.value}, batch 1, random weights; {device}, jax "
            f"{jax_version}, {datetime.date.today()}. tokens/s counts training tokens (L per "
            f"sequence); each step runs {2 if _COMPLEMENTARY.value else 1} view(s) of 2L tokens.")
  table = _table(results)
  with open(os.path.join(_OUT.value, "train_step.json"), "w") as f:
    json.dump({"header": header, "results": results}, f, indent=2)
  with open(os.path.join(_OUT.value, "train_step.md"), "w") as f:
    f.write(header + "\n\n" + table + "\n")
  print(header)
  print(table)


if __name__ == "__main__":
  app.run(main)
