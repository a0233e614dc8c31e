"""Where the time of one denoising step goes: host dispatch, launch gaps, or kernels.

    python benchmarks/step_profile.py --preset=fast_dllm_v2_1.5b --context=32768 --batches=1,8 \
        --methods=none,exact,mage --variants=default,no_command_buffer,command_buffer_while \
        --out=$OUT

decode_e2e.py times one jitted step per Python call; the generate loop runs its steps inside a
``lax.while_loop``, where no Python dispatch happens between steps. For each (variant, batch,
method) this script measures a later denoising step three ways:
  * call: median wall time of one jitted ``forward_denoise`` call (decode_e2e's number);
  * loop: wall time of ``--steps`` later steps inside one jitted while_loop, per step (each
    step's tokens come from the previous step's argmax, as in decoding);
  * device: from a jax.profiler trace of the loop: kernels launched per step, the sum of their
    durations per step (busy), and the span from the first kernel's start to the last one's
    end per step (busy + gaps between kernels); the top kernels by time.
Variants are XLA_FLAGS settings, each run in its own process (flags are read at start-up):
``default``; ``no_command_buffer`` (CUDA graphs off); ``command_buffer_while`` (the default
command types plus WHILE and CONDITIONAL, so a whole step loop can become one graph);
``cublas_gemm`` (every matmul through cuBLAS instead of XLA's Triton GEMM fusions);
``no_dot_merger`` (XLA's DotMerger off: it merges dots that share an input, q / k / v and
gate / up, into one dot over concatenated weights); ``cublas_no_dot_merger`` (both).
The cache holds random K/V (no prefill: the step's cost does not depend on the values).
Writes step_profile.json and step_profile.md under --out.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import subprocess
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "fast_dllm_v2_1.5b", "model preset (random weights)")
flags.DEFINE_integer("context", 32768, "valid cache rows per sequence")
flags.DEFINE_list("batches", ["1", "8"], "batch sizes")
flags.DEFINE_list("methods", ["none", "exact", "mage"], "none, exact, mage")
flags.DEFINE_integer("budget", 512, "MAGE budget k")
flags.DEFINE_integer("steps", 31, "later steps per timed loop")
flags.DEFINE_integer("repeats", 10, "timed calls per measurement (median)")
flags.DEFINE_list("variants", ["default", "no_command_buffer", "command_buffer_while"],
                  "XLA_FLAGS variants, each in its own process")
flags.DEFINE_bool("dump_hlo", False, "write the optimized HLO of each step loop (default "
                  "variant) to OUT/hlo_<method>_b<batch>.txt.gz")
flags.DEFINE_string("child", None, "internal: run one variant in this process")
flags.DEFINE_string("out", os.environ.get("OUT", "/tmp"), "output folder")

VARIANT_FLAGS = {
    "default": "",
    "no_command_buffer": "--xla_gpu_enable_command_buffer=",
    "command_buffer_while": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL",
    "cublas_gemm": "--xla_gpu_enable_triton_gemm=false",
    "no_dot_merger": "--xla_disable_hlo_passes=dot-merger",
    "cublas_no_dot_merger": "--xla_gpu_enable_triton_gemm=false "
                            "--xla_disable_hlo_passes=dot-merger",
}


def _run_variant(variant: str) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mage_jax import KVCache, ModelConfig, StepInfo, build_model, forward_denoise, get_method
  from mage_jax.methods.base import AttentionMethod

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from bench_common import (NoAttention, denoise_loop, kernel_summary, median_seconds,
                            trace_kernels)

  cfg = ModelConfig.preset(FLAGS.preset, max_position_embeddings=1 << 20)
  graphdef, params = nnx.split(build_model(cfg, seed=0))
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  rows = []
  for batch in map(int, FLAGS.batches):
    capacity = FLAGS.context + cfg.block_size
    shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
    keys = jax.random.split(jax.random.key(batch), 2 * cfg.num_layers)
    layers = tuple((jax.random.normal(keys[2 * i], shape, cfg.dtype),
                    jax.random.normal(keys[2 * i + 1], shape, cfg.dtype))
                   for i in range(cfg.num_layers))
    cache = KVCache(layers, jnp.full((batch,), FLAGS.context, jnp.int32))
    block = jnp.full((batch, cfg.block_size), cfg.mask_token_id, jnp.int32)
    for name in FLAGS.methods:
      method: AttentionMethod = (NoAttention() if name == "none" else get_method(name)
                                 if name == "exact" else get_method(name, budget=FLAGS.budget))

      @jax.jit
      def first_step(params, block, cache, state):
        return forward_denoise(nnx.merge(graphdef, params), block, cache, method, state,
                               StepInfo(True, jnp.int32(0)))

      @jax.jit
      def later_step(params, block, cache, state):
        return forward_denoise(nnx.merge(graphdef, params), block, cache, method, state,
                               StepInfo(False, jnp.int32(1)))

      later_loop = denoise_loop(graphdef, method, first=False, steps=FLAGS.steps)

      state = method.init_state(cfg, batch, capacity)
      _, state = first_step(params, block, cache, state)
      call_s = median_seconds(lambda: later_step(params, block, cache, state), FLAGS.repeats)
      loop_s = median_seconds(lambda: later_loop(params, block, cache, state), FLAGS.repeats)
      calls = 3
      device = kernel_summary(trace_kernels(lambda: later_loop(params, block, cache, state),
                                            calls), calls, FLAGS.steps)
      if FLAGS.dump_hlo and variant == "default":
        text = later_loop.lower(params, block, cache, state).compile().as_text()
        with gzip.open(os.path.join(FLAGS.out, f"hlo_{name}_b{batch}.txt.gz"), "wt") as f:
          f.write(text)
      row = dict(variant=variant, batch=batch, method=name, context=FLAGS.context,
                 call_ms=1e3 * call_s, loop_ms=1e3 * loop_s / FLAGS.steps,
                 weight_bytes=weight_bytes, **device)
      print(json.dumps(row), flush=True)
      rows.append(row)
    del cache, layers
  return rows


def _markdown(meta, rows) -> str:
  lines = [f"# step_profile: {meta['preset']}, random weights, {meta['device']}, jax "
           f"{meta['jax']}, {meta['date']}", "",
           f"Context {meta['context']} tokens, MAGE budget {meta['budget']}, {meta['steps']} later "
           "steps per timed loop. call: one jitted step per Python call; loop: per step inside "
           "one jitted while_loop; busy: sum of kernel durations per step; span: first kernel "
           "start to last kernel end per step (busy + launch gaps).", "",
           "| variant | batch | method | call ms | loop ms | span ms | busy ms | kernels / step | "
           "gemm ms | xla fusion ms | other ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    k = r.get("by_kind", {})
    lines.append(
        f"| {r['variant']} | {r['batch']} | {r['method']} | {r['call_ms']:.2f} | "
        f"{r['loop_ms']:.2f} | {r['span_ms']:.2f} | {r['busy_ms']:.2f} | "
        f"{r['kernels_per_step']:.0f} | {k.get('gemm', 0):.2f} | {k.get('xla fusion', 0):.2f} | "
        f"{k.get('other (pallas / custom)', 0):.2f} |")
  lines += ["", "## Top kernels (default variant, batch 1)", ""]
  for r in rows:
    if r["variant"] == rows[0]["variant"] and r["batch"] == rows[0]["batch"]:
      lines += [f"### {r['method']}", "", "| kernel | per step | ms / step |", "|---|---|---|"]
      lines += [f"| `{t['name']}` | {t['per_step']:.1f} | {t['ms_per_step']:.3f} |"
                for t in r["top"]]
      lines.append("")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if FLAGS.child:
    with open(os.path.join(FLAGS.out, f"step_profile_{FLAGS.child}.json"), "w") as f:
      json.dump(_run_variant(FLAGS.child), f)
    return
  unknown = sorted(set(FLAGS.variants) - set(VARIANT_FLAGS))
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; choose from {sorted(VARIANT_FLAGS)}")
  os.makedirs(FLAGS.out, exist_ok=True)
  rows = []
  for variant in FLAGS.variants:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + VARIANT_FLAGS[variant]).strip()
    args = [a for a in sys.argv[1:] if not a.startswith("--child")]
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *args,
                           f"--child={variant}"], env=env)
    path = os.path.join(FLAGS.out, f"step_profile_{variant}.json")
    if done.returncode or not os.path.exists(path):
      print(f"variant {variant} failed (exit {done.returncode})", flush=True)
      continue
    with open(path) as f:
      rows += json.load(f)
    os.remove(path)
  import jax
  meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
              date=datetime.date.today().isoformat(), preset=FLAGS.preset,
              context=FLAGS.context, budget=FLAGS.budget, steps=FLAGS.steps,
              variants={v: VARIANT_FLAGS[v] for v in FLAGS.variants})
  with open(os.path.join(FLAGS.out, "step_profile.json"), "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=2)
  table = _markdown(meta, rows)
  with open(os.path.join(FLAGS.out, "step_profile.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  app.run(main)
