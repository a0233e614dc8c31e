"""Do fused projection weights make the decode step's matmuls faster? One question, measured.

    python benchmarks/gemm_layouts.py --out=$OUT

The model keeps q / k / v and gate / up as separate weights. XLA merges each group into one
dot over concatenated weights (its DotMerger), reading the concatenation inside a Triton GEMM
fusion; step_profile.py measured that merged gate / up dot at 49 us per layer at 256 rows
(batch 8 x 32 tokens) where cuBLAS took 32 us. This script times, for 32 and 256 rows and the
1.5B shape, a stack of 28 layers of each projection group in three layouts:
  * separate: one weight per projection (the model today; XLA merges them);
  * fused: one weight holding all projections ([embed, sum of outputs]), sliced after the dot.
Each layer's input depends on the previous layer's output, so nothing is hoisted. Time per
layer: wall of one jitted call over 28 layers / 28 (median), and the GPU kernels' device time
from a profile. Writes gemm_layouts.json / .md under --out.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_common import median_seconds, trace_kernels  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", ["32", "256"], "tokens per step (batch x block)")
flags.DEFINE_integer("layers", 28, "layers stacked in one call")
flags.DEFINE_integer("embed", 1536, "hidden size (1.5B: 1536)")
flags.DEFINE_integer("mlp", 8960, "intermediate size (1.5B: 8960)")
flags.DEFINE_integer("q_out", 1536, "q projection outputs (12 heads x 128)")
flags.DEFINE_integer("kv_out", 256, "k and v projection outputs each (2 heads x 128)")
flags.DEFINE_string("out", os.environ.get("OUT", "/tmp"), "output folder")


def _weights(key, layers, embed, outs):
  keys = jax.random.split(key, layers * len(outs))
  return [[jax.random.normal(keys[i * len(outs) + j], (embed, o), jnp.bfloat16) * 0.02
           for j, o in enumerate(outs)] for i in range(layers)]


def _stack_fn(fused: bool, outs):
  """28 layers: y = x @ W (one fused weight or one per output), then x += the row means of
  every output, so layer i+1 waits for layer i and no output is dead."""

  def run(x, weights):
    for layer in weights:
      if fused:
        y = x @ layer[0]
        parts, start = [], 0
        for o in outs:
          parts.append(y[:, start:start + o])
          start += o
      else:
        parts = [x @ w for w in layer]
      x = x + sum(jnp.mean(p, axis=1, keepdims=True) for p in parts).astype(x.dtype) * 1e-3
    return x

  return jax.jit(run)


def main(argv):
  del argv
  os.makedirs(FLAGS.out, exist_ok=True)
  groups = {"gate_up": [FLAGS.mlp, FLAGS.mlp],
            "qkv": [FLAGS.q_out, FLAGS.kv_out, FLAGS.kv_out]}
  rows_out = []
  for group, outs in groups.items():
    separate = _weights(jax.random.key(1), FLAGS.layers, FLAGS.embed, outs)
    fused = [[jnp.concatenate(layer, axis=1)] for layer in separate]
    for rows in map(int, FLAGS.rows):
      x = jax.random.normal(jax.random.key(rows), (rows, FLAGS.embed), jnp.bfloat16)
      for layout, weights in (("separate", separate), ("fused", fused)):
        fn = _stack_fn(layout == "fused", outs)
        wall = median_seconds(lambda: fn(x, weights), 10) / FLAGS.layers
        events = trace_kernels(lambda: fn(x, weights), 3)
        device = sum(d for _, _, d in events) / 3 / FLAGS.layers / 1e3
        names = sorted({n[:48] for n, _, _ in events})
        weight_bytes = sum(w.nbytes for w in weights[0])
        row = dict(group=group, rows=rows, layout=layout, wall_us=wall * 1e6,
                   device_us=device, weight_MB=weight_bytes / 1e6, kernels=names[:6])
        print(json.dumps(row), flush=True)
        rows_out.append(row)
  meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
              date=datetime.date.today().isoformat(), layers=FLAGS.layers)
  with open(os.path.join(FLAGS.out, "gemm_layouts.json"), "w") as f:
    json.dump(dict(meta=meta, rows=rows_out), f, indent=2)
  lines = [f"# gemm_layouts: {meta['device']}, jax {meta['jax']}, {meta['date']}", "",
           f"Per layer, {FLAGS.layers} layers per call; device = sum of GPU kernel durations.",
           "", "| group | rows | layout | weights MB | wall us | device us | kernels |",
           "|---|---|---|---|---|---|---|"]
  lines += [f"| {r['group']} | {r['rows']} | {r['layout']} | {r['weight_MB']:.1f} | "
            f"{r['wall_us']:.1f} | {r['device_us']:.1f} | {', '.join(r['kernels'])} |"
            for r in rows_out]
  table = "\n".join(lines) + "\n"
  with open(os.path.join(FLAGS.out, "gemm_layouts.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  app.run(main)
