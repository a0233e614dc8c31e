"""Recall of every sparse method against the per-step oracle, as a markdown table.

  python benchmarks/recall_table.py > table.md

Stand-in model until a trained checkpoint exists: the tiny Qwen2 preset with random weights,
deepened to --layers layers and given Fast-dLLM v2's block of 32 tokens (G = 2 query heads per KV
head, head_dim 16), decoding --prompts random prompts of --context tokens for --new tokens with
fixed_steps (--steps steps per block). Page and tile sizes are scaled down with the budgets.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mage_jax import DecodeOptions, ModelConfig, build_model  # pylint: disable=g-import-not-at-top
from mage_jax.methods import (MageAttention, OracleAttention, QuestAttention, SparseDAttention,
                              TidalAttention)
from mage_jax.recall import measure_recall


def methods(budget: int, dense_layers: int, steps: int, page_size: int, tile_size: int):
  return {
      "mage": MageAttention(budget=budget, dense_layers=dense_layers),
      "mage-adaptive": MageAttention(budget=budget, dense_layers=dense_layers, adaptive=True),
      "quest": QuestAttention(budget=budget, page_size=page_size, dense_layers=dense_layers),
      "tidal": TidalAttention(budget=budget, dense_layers=dense_layers,
                              selection_layer=dense_layers),
      "sparsed": SparseDAttention(nominal_steps=steps, tile_size=tile_size, budget=budget,
                                  dense_layers=dense_layers),
      "oracle": OracleAttention(budget=budget, dense_layers=dense_layers),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--dense-layers", type=int, default=2)
  parser.add_argument("--context", type=int, default=320)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--prompts", type=int, default=4)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--budgets", default="16,32,64")
  parser.add_argument("--page-size", type=int, default=4)
  parser.add_argument("--tile-size", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  cfg = ModelConfig.preset("tiny_qwen2", num_layers=args.layers, block_size=32, sub_block_size=8,
                           dtype="float32", eos_token_ids=(1,))
  model = build_model(cfg, seed=args.seed)
  options = DecodeOptions.for_model(cfg, policy="fixed_steps", steps_per_block=args.steps)
  rng = np.random.default_rng(args.seed)
  prompts = [rng.integers(5, cfg.vocab_size, args.context).tolist() for _ in range(args.prompts)]
  sparse = range(args.dense_layers, args.layers)
  header = ("| method | k | " + " | ".join(f"L{l}" for l in sparse) +
            " | index recall | mass recall |")
  print(f"Index recall per layer (layers 0-{args.dense_layers - 1} dense), overall index and "
        f"attention-mass recall; {args.prompts} prompts x {args.context} tokens + {args.new} "
        f"generated, {args.steps} steps per block of 32, steps 2..T.\n")
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  start = time.time()
  for budget in (int(b) for b in args.budgets.split(",")):
    for name, method in methods(budget, args.dense_layers, args.steps, args.page_size,
                                args.tile_size).items():
      report = measure_recall(model, prompts, method, budget=budget, max_new_tokens=args.new,
                              options=options)
      cells = ["dense" if report.dense[l] else f"{report.index_recall[l]:.3f}" for l in sparse]
      print(f"| {name} | {budget} | " + " | ".join(cells) +
            f" | {report.overall_index_recall:.3f} | {report.overall_mass_recall:.3f} |",
            flush=True)
  print(f"\n({time.time() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
  main()
