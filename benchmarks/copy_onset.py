"""When does a model trained from scratch start to copy? Depth x block size, with the probes.

Each variant trains the default model's shape (configs/train/default_model/s1_ar128.json, with
the number of layers and the block size overridden) from scratch on ``repeat`` documents only
(random words, then the same words) for ``--steps`` steps, with the retrieval probes
(train/probe.py) every ``--probe_every`` steps. A model that copies shows masked-token accuracy
in the repeated half far above the first half. The question it answers (WORKSPACE_NOTES, issue
8): does depth or the block size keep the 8-layer model on its pre-induction plateau?

  python benchmarks/copy_onset.py --layers=2,4,8 --block_sizes=1,32 --steps=400

Each variant runs the trainer in its own workdir under a temporary directory. Prints a table
last (the first step at which repeated-half accuracy exceeds first-half accuracy by 0.2, and the
final probe values); writes copy_onset.json and copy_onset.md under --out (default $OUT).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile

import jax
from absl import app
from absl import flags

_LAYERS = flags.DEFINE_list("layers", ["2", "4", "8"], "Layer counts to try.")
_BLOCK_SIZES = flags.DEFINE_list("block_sizes", ["1", "32"], "Diffusion block sizes to try "
                                 "(1: every token predicted from the clean prefix, i.e. AR).")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps per variant.")
_PROBE_EVERY = flags.DEFINE_integer("probe_every", 50, "Steps between probes.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Training sequence length.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Sequences per step.")
_SET = flags.DEFINE_multi_string("set", [], "Further trainer config overrides (path=json), "
                                 "passed to every variant.")
_WORKERS = flags.DEFINE_integer("workers", 4, "Batch-building processes per trainer.")
_CONFIG = flags.DEFINE_string("config", "configs/train/default_model/s1_ar128.json",
                              "Base training config (model shape, optimiser).")
_OUT = flags.DEFINE_string("out", os.environ.get("OUT", "."), "Where results are written.")

ONSET_GAP = 0.2


def _run_variant(layers: int, block_size: int, workdir: str) -> list[dict]:
  context = _SEQ_LEN.value // 2
  sources = [{"kind": "repeat", "min_context_tokens": min(64, context // 2),
              "context_tokens": context}]
  sub_block = min(block_size, 8)
  cmd = [sys.executable, "-m", "train", "--mode=pretrain", f"--config={_CONFIG.value}",
         f"--workdir={workdir}", "--export_dir=", f"--steps={_STEPS.value}",
         f"--set=model_overrides.num_layers={layers}",
         f"--set=model_overrides.block_size={block_size}",
         f"--set=model_overrides.sub_block_size={sub_block}",
         f"--set=seq_len={_SEQ_LEN.value}", f"--set=optim.batch_size={_BATCH.value}",
         f"--set=probe_every={_PROBE_EVERY.value}", f"--set=data.workers={_WORKERS.value}",
         # Probe repeats as long as the longest trained ones (copying does not extrapolate).
         f"--set=probe_context={max(128, context)}", "--set=progress_bar=false",
         f"--set=log_every={_PROBE_EVERY.value}", f"--set=checkpoint.every={_STEPS.value}",
         f"--set=data.sources={json.dumps(sources)}"] + [f"--set={s}" for s in _SET.value]
  subprocess.run(cmd, check=True)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _summary(layers: int, block_size: int, records: list[dict]) -> dict:
  probes = [r for r in records if "copy_second_half" in r]
  onset = next((r["step"] for r in probes
                if r["copy_second_half"] - r["copy_first_half"] > ONSET_GAP), None)
  last = probes[-1]
  losses = [r for r in records if "loss" in r]
  return {"layers": layers, "block_size": block_size, "copy_onset_step": onset,
          "copy_first_half": last["copy_first_half"],
          "copy_second_half": last["copy_second_half"],
          "final_loss": losses[-1]["loss"] if losses else None,
          "probes": probes}


def _write(results: list[dict]) -> str:
  """Writes copy_onset.json / .md for the variants done so far; returns the table."""
  meta = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
          "date": datetime.date.today().isoformat(), "steps": _STEPS.value,
          "seq_len": _SEQ_LEN.value, "batch_size": _BATCH.value, "config": _CONFIG.value,
          "overrides": _SET.value}
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "copy_onset.json"), "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=1)
  lines = [f"# Copy onset ({meta['device']}, jax {meta['jax']}, {meta['date']})", "",
           f"{_STEPS.value} steps, {_BATCH.value} x {_SEQ_LEN.value} tokens of repeat documents; "
           f"onset: first probe with repeated-half minus first-half accuracy > {ONSET_GAP}.", "",
           "| layers | block | onset step | first half | repeated half | final loss |",
           "|---|---|---|---|---|---|"]
  for r in results:
    loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
    lines.append(f"| {r['layers']} | {r['block_size']} | {r['copy_onset_step'] or 'none'} | "
                 f"{r['copy_first_half']:.3f} | {r['copy_second_half']:.3f} | {loss} |")
  table = "\n".join(lines)
  with open(os.path.join(_OUT.value, "copy_onset.md"), "w") as f:
    f.write(table + "\n")
  return table


def main(argv):
  del argv
  results = []
  table = ""
  with tempfile.TemporaryDirectory() as tmp:
    for layers in map(int, _LAYERS.value):
      for block_size in map(int, _BLOCK_SIZES.value):
        workdir = os.path.join(tmp, f"L{layers}_B{block_size}")
        results.append(_summary(layers, block_size, _run_variant(layers, block_size, workdir)))
        table = _write(results)  # after every variant: a killed run keeps what it measured
  print(table)


if __name__ == "__main__":
  app.run(main)
