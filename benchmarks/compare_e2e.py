"""One table from the step and generation benchmarks: transformers vs our exact step vs MAGE.

    python benchmarks/compare_e2e.py --decode_e2e=$OUT/decode_e2e.json \
        --generation_e2e=$OUT/generation_e2e.json --hf_sdpa_step=$OUT/hf_sdpa_step.json --out=$OUT

Reads whichever JSON files are given (each flag takes a list: decode_e2e's committed results
are split by batch, results/decode_e2e_b1.json,results/decode_e2e_b8.json) and writes
compare_e2e.md under --out: one row per (batch, context) that any input measured, "-" where
none did. Columns: the transformers sdpa step (hf_sdpa_step.py), our exact and MAGE later
steps and MAGE's mean over a 32-step block (decode_e2e.py, inside the jitted loop), the exact
step's floor, the step ratios, and the whole generate calls' decode seconds (generation_e2e.py).
The header names each input's preset, device and date: compare rows only where they match.
--layers picks the layer path (xla or fused) of our rows when the inputs timed both.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("decode_e2e", [], "decode_e2e.json files")
flags.DEFINE_list("generation_e2e", [], "generation_e2e.json files")
flags.DEFINE_list("hf_sdpa_step", [], "hf_sdpa_step.json files")
flags.DEFINE_string("out", os.environ.get("OUT", "/tmp"), "output folder")
flags.DEFINE_string("layers", "xla", "which layer path's rows of decode_e2e / generation_e2e to "
                    "join (their layers column: xla or fused; rows without it ran xla)")

STEPS_PER_BLOCK = 32  # decode_e2e's block: one first step and 31 later steps


def _load(paths: list[str], rows_key: str) -> tuple[list[dict], list[str]]:
  """The rows of every file and one "name: device, date" line per file."""
  rows, sources = [], []
  for path in paths:
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise app.UsageError(f"cannot read {path}: {e}") from e
    rows += saved[rows_key]
    meta = saved["meta"]
    sources.append(f"{os.path.basename(path)}: {meta.get('preset', '?')}, {meta['device']}, "
                   f"{meta['date']}")
  return rows, sources


def _get(row: dict | None, key: str):
  return None if row is None else row.get(key)


def compare(decode_steps: list[dict], generations: list[dict], hf_steps: list[dict]) -> list[dict]:
  """One dict per (batch, context) measured by any input, sorted; absent values are None."""
  keys = sorted({(r["batch"], r["context"]) for r in decode_steps + generations + hf_steps})
  step = {(r["method"], r["batch"], r["context"]): r for r in decode_steps}
  generate = {(r["method"], r["batch"], r["context"]): r for r in generations}
  hf = {(r["batch"], r["context"]): r for r in hf_steps}
  table = []
  for batch, context in keys:
    exact, mage = step.get(("exact", batch, context)), step.get(("mage", batch, context))
    hf_row = hf.get((batch, context))
    block_mean = None if mage is None else (
        mage["first_step_ms"] + (STEPS_PER_BLOCK - 1) * mage["step_ms"]) / STEPS_PER_BLOCK
    row = dict(batch=batch, context=context, hf_step_ms=_get(hf_row, "step_ms"),
               hf_error=_get(hf_row, "error"), exact_step_ms=_get(exact, "step_ms"),
               exact_floor_ms=_get(exact, "floor_step_ms"), mage_step_ms=_get(mage, "step_ms"),
               mage_block_mean_ms=block_mean)
    for method in ("exact", "mage"):
      gen = generate.get((method, batch, context))
      row[f"{method}_decode_s"] = _get(gen, "decode_s")
      row[f"{method}_steps_per_block"] = _get(gen, "steps_per_block")
    table.append(row)
  return table


def _ratio(a, b) -> str:
  return "-" if a is None or b is None else f"{a / b:.1f}"


def _value(x, digits: int = 2) -> str:
  return "-" if x is None else f"{x:.{digits}f}"


def markdown(table: list[dict], sources: list[str]) -> str:
  lines = ["# compare_e2e: transformers sdpa vs our exact and MAGE steps, and whole generations",
           "", "Inputs: " + "; ".join(sources) + f"; our layers: {FLAGS.layers}.", "",
           "| batch | context | transformers sdpa step ms | exact step ms | exact floor ms | "
           "MAGE step ms | MAGE block mean ms | sdpa / exact | sdpa / MAGE block | "
           "exact decode s | MAGE decode s | exact / MAGE decode |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in table:
    hf = r["hf_error"] or _value(r["hf_step_ms"])
    lines.append(
        f"| {r['batch']} | {r['context']} | {hf} | {_value(r['exact_step_ms'])} | "
        f"{_value(r['exact_floor_ms'])} | {_value(r['mage_step_ms'])} | "
        f"{_value(r['mage_block_mean_ms'])} | {_ratio(r['hf_step_ms'], r['exact_step_ms'])} | "
        f"{_ratio(r['hf_step_ms'], r['mage_block_mean_ms'])} | "
        f"{_value(r['exact_decode_s'], 3)} | {_value(r['mage_decode_s'], 3)} | "
        f"{_ratio(r['exact_decode_s'], r['mage_decode_s'])} |")
  lines += ["", "Steps: whole-model denoising steps of a 32-token block (transformers: one "
            "forward over a DynamicCache; ours: inside the jitted loop). MAGE block mean: one "
            f"first (selection) step and {STEPS_PER_BLOCK - 1} later steps, averaged. decode s: "
            "the decode stage of one generate call (generation_e2e.py; its steps per block "
            "depend on the policy)."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if not (FLAGS.decode_e2e or FLAGS.generation_e2e or FLAGS.hf_sdpa_step):
    raise app.UsageError("give at least one of --decode_e2e, --generation_e2e, --hf_sdpa_step")
  decode_steps, decode_sources = _load(FLAGS.decode_e2e, "steps")
  generations, generation_sources = _load(FLAGS.generation_e2e, "rows")
  ours = lambda rows: [r for r in rows if r.get("layers", "xla") == FLAGS.layers]
  decode_steps, generations = ours(decode_steps), ours(generations)
  hf_steps, hf_sources = _load(FLAGS.hf_sdpa_step, "rows")
  text = markdown(compare(decode_steps, generations, hf_steps),
                  decode_sources + generation_sources + hf_sources)
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "compare_e2e.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
