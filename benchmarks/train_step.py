"""Time one MAGE-FT (selfdistill) training step per model shape, trainable subset and length.

Random weights (the Fast-dLLM v2 1.5B / 7B presets) and random tokens; the step is the trainer's
own jitted step (selection pass, sparse student forward + backward with remat, exact teacher
forward, chunked CE + KL, AdamW on the float32 master copy of the trainable subset; the frozen
weights in bf16, shared by student and teacher). Trainable subsets (train.config.TRAINABLE):
``all`` (full fine-tuning), ``attention`` (q/k/v/o) and ``lora`` (adapters of --lora_rank,
alpha 2 x rank, on q/k/v/o). Each variant runs in its own subprocess so that peak memory (jax
memory_stats peak_bytes_in_use) is that variant's alone and an out-of-memory variant does not end
the sweep. Beside each measured peak stands train.memory's estimate from abstract shapes.

The largest context that fits: after the sweep, for every (model, subset) the lengths of
--fit_lens (and --seq_lens not yet run) are tried in increasing order above the longest length
that fitted, up to the first that does not (lengths past max_position_embeddings raise it).

  python benchmarks/train_step.py                           # 1.5B and 7B x lora, attention, all
  python benchmarks/train_step.py --models=fast_dllm_v2_7b --trainable=lora --seq_lens=32768
  python benchmarks/train_step.py --fit_lens=                # no search

Prints the tables last; writes train_step.json and train_step.md under --out (default $OUT).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags

# The repository root (mage_jax, train) for bench_common and the children.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_common  # pylint: disable=wrong-import-position

TRAINABLE = ("all", "attention", "lora")

_MODELS = flags.DEFINE_list("models", ["fast_dllm_v2_1.5b", "fast_dllm_v2_7b"], "Presets.")
_TRAINABLE = flags.DEFINE_list("trainable", ["lora", "attention", "all"],
                               f"Trainable subsets, of {TRAINABLE}.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["16384", "32768"], "Training lengths L.")
_FIT_LENS = flags.DEFINE_list("fit_lens", ["24576", "49152", "65536", "98304", "131072"],
                              "Lengths tried for the largest context that fits (empty: none).")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 64, "LoRA rank (alpha = 2 x rank).")
_BUDGET = flags.DEFINE_integer("budget", 512, "MAGE budget k per noisy block and KV head.")
_DENSE_LAYERS = flags.DEFINE_integer("dense_layers", 2, "Leading dense layers.")
_COMPLEMENTARY = flags.DEFINE_bool("complementary", True, "Both complementary views per "
                                   "sequence (each step then runs 2 x 2L tokens).")
_SPLIT_VIEWS = flags.DEFINE_bool("split_views", False, "Run the two views as two passes, one "
                                  "after the other (half the activations, same gradient).")
_LOSS_CHUNK = flags.DEFINE_integer("loss_chunk", 1024, "Tokens per LM-head chunk.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after one warm-up step.")
_TIMEOUT = flags.DEFINE_integer("timeout", 1800, "Seconds per variant before it is a timeout.")
_OUT = flags.DEFINE_string("out", os.environ.get("OUT", "."), "Where results are written.")
_VARIANT = flags.DEFINE_string("variant", None, "Internal: MODEL:TRAINABLE:L, run in-process; "
                               "prints its JSON result.")


def _config(model: str, trainable: str, seq_len: int):
  from train import memory  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  return memory.benchmark_config(model, trainable, seq_len, lora_rank=_LORA_RANK.value,
                                 budget=_BUDGET.value, complementary=_COMPLEMENTARY.value,
                                 split_views=_SPLIT_VIEWS.value,
                                 loss_chunk=_LOSS_CHUNK.value, workdir=tempfile.mkdtemp(),
                                 dense_layers=_DENSE_LAYERS.value)


def _model_config(cfg):
  """The ModelConfig a run of ``cfg`` builds (a preset with its overrides), without weights."""
  from mage_jax.config import ModelConfig  # pylint: disable=import-outside-toplevel
  return ModelConfig.preset(cfg.model, **dict(cfg.model_overrides))


def _measure(model: str, trainable: str, seq_len: int) -> dict:
  import jax
  import jax.numpy as jnp
  from train import memory  # pylint: disable=import-outside-toplevel

  cfg = _config(model, trainable, seq_len)
  estimate = memory.plan(cfg, _model_config(cfg), "selfdistill")
  limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
  state_bytes = sum(estimate[k] for k in ("master_f32", "optimizer", "gradients_f32", "frozen",
                                          "teacher"))
  if limit and state_bytes > limit:  # e.g. full AdamW at 7B: no need to allocate to know
    return {"model": model, "trainable": trainable, "seq_len": seq_len,
            "error": f"OOM (state alone {state_bytes / 2**30:.0f} GiB > {limit / 2**30:.0f})"}
  setup = bench_common.TrainStepSetup.from_config(cfg, "selfdistill")
  model_cfg, state, step_fn, frozen = setup.model_cfg, setup.state, setup.step_fn, setup.frozen

  def tokens(i):
    ids = jax.random.randint(jax.random.key(i), (1, 1, seq_len), 0, model_cfg.mask_token_id)
    return ids.astype(jnp.int32)

  start = time.perf_counter()
  state, metrics = step_fn(state, tokens(0), frozen)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for i in range(_STEPS.value):
    batch = tokens(i + 1)
    jax.block_until_ready(batch)
    start = time.perf_counter()
    state, metrics = step_fn(state, batch, frozen)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  stats = jax.local_devices()[0].memory_stats() or {}
  step_s = statistics.median(times)
  return {
      "model": model, "trainable": trainable, "seq_len": seq_len, "budget": _BUDGET.value,
      "complementary": _COMPLEMENTARY.value, "split_views": _SPLIT_VIEWS.value,
      "lora_rank": _LORA_RANK.value,
      "trainable_params": estimate["trainable_params"],
      "step_s": step_s, "first_step_s": first, "tokens_per_s": seq_len / step_s,
      "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
      "estimate_gib": estimate["total"] / 2**30,
      "loss": float(metrics["loss"]), "kl": float(metrics["kl"]),
      "device": jax.devices()[0].device_kind, "jax": jax.__version__,
  }


def _run_variant(model: str, trainable: str, seq_len: int) -> dict:
  result = bench_common.run_child(
      [os.path.abspath(__file__), f"--variant={model}:{trainable}:{seq_len}",
       f"--lora_rank={_LORA_RANK.value}", f"--budget={_BUDGET.value}",
       f"--dense_layers={_DENSE_LAYERS.value}", f"--steps={_STEPS.value}",
       f"--loss_chunk={_LOSS_CHUNK.value}",
       "--complementary" if _COMPLEMENTARY.value else "--nocomplementary",
       "--split_views" if _SPLIT_VIEWS.value else "--nosplit_views"],
      timeout=_TIMEOUT.value)
  if "error" in result:
    return {"model": model, "trainable": trainable, "seq_len": seq_len, **result}
  return result


def _steps_minutes(step_s: float, steps: int = 200) -> str:
  return f"{steps * step_s / 60:.0f}"


def _table(results: list[dict]) -> str:
  lines = ["| model | trainable | L | trainable params | step (s) | tokens/s | peak (GiB) | "
           "estimate (GiB) | 200 steps (min) | first step (s) | loss | KL |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    head = f"| {r['model']} | {r['trainable']} | {r['seq_len']} |"
    if "error" in r:
      lines.append(f"{head} | {r['error']} | | | | | | | | |")
      continue
    lines.append(f"{head} {r['trainable_params']:.3g} | {r['step_s']:.2f} | "
                 f"{r['tokens_per_s']:.0f} | {r['peak_gib']:.1f} | {r['estimate_gib']:.1f} | "
                 f"{_steps_minutes(r['step_s'])} | {r['first_step_s']:.1f} | {r['loss']:.3f} | "
                 f"{r['kl']:.4f} |")
  return "\n".join(lines)


def _fit_table(fits: list[dict]) -> str:
  lines = ["| model | trainable | largest L that fits | smallest L that does not |",
           "|---|---|---|---|"]
  for f in fits:
    lines.append(f"| {f['model']} | {f['trainable']} | {f['largest_fitting'] or 'none'} | "
                 f"{f['smallest_failing'] or 'not reached'} |")
  return "\n".join(lines)


def _check_flags() -> None:
  unknown = [t for t in _TRAINABLE.value if t not in TRAINABLE]
  if unknown:
    raise app.UsageError(f"--trainable: unknown {unknown}; expected of {TRAINABLE}")
  for flag in (_SEQ_LENS, _FIT_LENS):
    if not all(n.isdigit() and int(n) > 0 for n in flag.value):
      raise app.UsageError(f"--{flag.name}: expected positive integers, got {flag.value}")


def main(argv):
  del argv
  if _VARIANT.value is not None:
    model, trainable, seq_len = _VARIANT.value.rsplit(":", 2)
    print(json.dumps(_measure(model, trainable, int(seq_len))))
    return
  _check_flags()
  results, fits = [], []
  for model in _MODELS.value:
    for trainable in _TRAINABLE.value:
      rows = [_run_variant(model, trainable, int(n)) for n in _SEQ_LENS.value]
      results += rows
      if not _FIT_LENS.value:
        continue

      def fits_at(length, model=model, trainable=trainable):
        row = _run_variant(model, trainable, length)
        results.append(row)
        return "error" not in row

      largest, failing = bench_common.largest_fitting(
          {r["seq_len"]: "error" not in r for r in rows}, [int(n) for n in _FIT_LENS.value],
          fits_at)
      fits.append({"model": model, "trainable": trainable, "largest_fitting": largest,
                   "smallest_failing": failing})
  os.makedirs(_OUT.value, exist_ok=True)
  device = next((r["device"] for r in results if "device" in r), "unknown")
  jax_version = next((r["jax"] for r in results if "jax" in r), "unknown")
  header = (f"MAGE-FT step, batch 1, random weights, budget {_BUDGET.value}, "
            f"{_DENSE_LAYERS.value} dense layers, LoRA rank {_LORA_RANK.value} (alpha "
            f"{2 * _LORA_RANK.value}) on q/k/v/o; {device}, jax {jax_version}, "
            f"{datetime.date.today()}. tokens/s counts training tokens (L per sequence); each "
            f"step runs {2 if _COMPLEMENTARY.value else 1} view(s) of 2L tokens"
            f"{' as two passes' if _SPLIT_VIEWS.value else ''}. estimate: "
            f"train.memory's plan from abstract shapes.")
  text = header + "\n\n" + _table(results)
  if fits:
    text += "\n\n" + _fit_table(fits)
  with open(os.path.join(_OUT.value, "train_step.json"), "w") as f:
    json.dump({"header": header, "results": results, "fits": fits}, f, indent=2)
  with open(os.path.join(_OUT.value, "train_step.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main)
