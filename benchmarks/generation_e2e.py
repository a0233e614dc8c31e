"""A real generation, timed: ``mage_jax.generate`` on long prompts, exact attention vs MAGE.

    python benchmarks/generation_e2e.py --preset=fast_dllm_v2_1.5b --contexts=32768,131072 \
        --batches=1,8 --methods=exact,mage --new_tokens=256 --repeats=1 --out=$OUT
    ... --policy=fixed_steps                # the same with a fixed number of steps per block

For every (batch, context, method) cell: a random-weight model of --preset generates
--new_tokens tokens after --batch prompts of --context random tokens, through the public
``generate`` (prefill stage, then the jitted block loop). Reported per request (one generate
call for the whole batch), medians over --repeats calls: wall time, prefill seconds, decode
seconds (GenerationResult.prefill_s / decode_s), decoded tokens per second, and the mean number
of denoising steps per block (num_steps / num_blocks; commits excluded).

Compile is excluded: each cell first runs one warm-up generate with the same static shapes
(batch, cache capacity, method, options) but a one-block prompt and a one-token budget; prompt
lengths and the budget are traced values, so the timed calls reuse its compiled stages and the
warm-up costs little more than the compile.

Decoding policy (--policy, default the model family's: Fast-dLLM v2's confidence threshold).
With random weights the threshold policy's step count is arbitrary (the confidences mean
nothing, so most steps unmask only the one most confident position): the table reports it,
and --policy=fixed_steps (exactly --steps_per_block steps per block) gives timings that compare
across methods, runs and models. The benchmark's config names [MASK] as the only EOS token: the
decoder never proposes [MASK], so no random sequence stops early and every request decodes
exactly --new_tokens tokens.

Memory: one cell at a time; its cache lives inside generate and is freed when the call
returns, so two 128K batch-8 caches never coexist. A cell that runs out of device memory is
recorded as "out of memory" (any other failure, e.g. a kernel that does not compile, with its
message) and the run goes on. The JSON and markdown are rewritten after
every cell (a run cut short keeps what it measured). Writes generation_e2e.json and
generation_e2e.md under --out. Runtime (1.5B, H100, the command above): ~6 min, mostly 8
compiles (~20-30 s each: one per batch, capacity and method) and the 128K batch-8 prefills
(~32 s per call); each extra repeat adds ~2 min.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mage_jax import DecodeOptions, ModelConfig, build_model, get_method  # noqa: E402
from mage_jax.generate import generate, plan_request  # noqa: E402
from mage_jax.model import LAYER_KERNELS  # noqa: E402
from mage_jax.sampling import POLICIES  # noqa: E402

FLAGS = flags.FLAGS
METHODS = ("exact", "mage")
flags.DEFINE_string("preset", "fast_dllm_v2_1.5b", "model preset (random weights)")
flags.DEFINE_list("contexts", ["32768", "131072"], "prompt lengths in tokens")
flags.DEFINE_list("batches", ["1", "8"], "batch sizes (prompts per request)")
flags.DEFINE_list("methods", list(METHODS), "exact, mage")
flags.DEFINE_integer("new_tokens", 256, "tokens generated per sequence")
flags.DEFINE_integer("budget", 512, "MAGE budget k")
flags.DEFINE_integer("dense_layers", 2, "MAGE: first layers that always run exact attention")
flags.DEFINE_string("policy", None, f"decoding policy, one of {sorted(POLICIES)} (default: the "
                    "model family's)")
flags.DEFINE_integer("steps_per_block", None, "fixed_steps / sdar steps per block (default: the "
                     "model family's)")
flags.DEFINE_integer("repeats", 2, "timed generate calls per cell (median)")
flags.DEFINE_integer("prefill_chunk", 4096, "prefill chunk in tokens")
flags.DEFINE_list("layer_kernels", ["xla"], "layer paths, one or both of xla, fused "
                  "(DecodeOptions.layer_kernels): every cell runs with each")
flags.DEFINE_string("out", os.environ.get("OUT", "/tmp"), "output folder")


def check_flags() -> None:
  """One clear line per bad flag, before any work."""
  unknown = sorted(set(FLAGS.methods) - set(METHODS))
  if unknown:
    raise app.UsageError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
  unknown = sorted(set(FLAGS.layer_kernels) - set(LAYER_KERNELS))
  if unknown:
    raise app.UsageError(f"--layer_kernels: unknown {unknown}; choose from {list(LAYER_KERNELS)}")
  if FLAGS.policy is not None and FLAGS.policy not in POLICIES:
    raise app.UsageError(f"--policy: unknown {FLAGS.policy!r}; one of {sorted(POLICIES)}")
  for name in ("contexts", "batches"):
    values = getattr(FLAGS, name)
    if not all(v.isdigit() and int(v) > 0 for v in values):
      raise app.UsageError(f"--{name} must be positive integers, got {values}")
  for name in ("new_tokens", "repeats", "budget", "prefill_chunk"):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")


def benchmark_config(preset: str, longest: int, new_tokens: int) -> tuple[ModelConfig, int]:
  """The preset with room for the longest request and [MASK] as its only EOS token (never
  proposed by the decoder: random weights must not end sequences at random points), and the
  prompt tokens' ceiling (the lowest of its [MASK] and real EOS ids)."""
  cfg = ModelConfig.preset(preset)
  positions = max(cfg.max_position_embeddings, longest + new_tokens + 2 * cfg.block_size)
  top = min(cfg.mask_token_id, *cfg.eos_token_ids)
  return cfg.replace(max_position_embeddings=positions, eos_token_ids=(cfg.mask_token_id,)), top


def random_prompts(top: int, batch: int, context: int, seed: int) -> list[list[int]]:
  """``batch`` prompts of ``context`` random tokens below ``top``."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, top, context).tolist() for _ in range(batch)]


def time_cell(model, cfg: ModelConfig, top: int, method_name: str, options: DecodeOptions,
              batch: int, context: int) -> dict:
  """Warm-up generate (compile) then --repeats timed generates of one (batch, context, method)."""
  method = (get_method("exact") if method_name == "exact" else
            get_method("mage", budget=FLAGS.budget, dense_layers=FLAGS.dense_layers))
  capacity = plan_request(cfg, [context] * batch, FLAGS.new_tokens,
                          prefill_chunk=options.prefill_chunk).capacity
  run = lambda prompts, new: generate(model, prompts, max_new_tokens=new, method=method,
                                      options=options, capacity=capacity)
  t0 = time.perf_counter()
  run(random_prompts(top, batch, cfg.block_size, seed=1), 1)
  warmup_s = time.perf_counter() - t0
  prompts = random_prompts(top, batch, context, seed=batch)
  walls, prefills, decodes, results = [], [], [], []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    result = run(prompts, FLAGS.new_tokens)
    walls.append(time.perf_counter() - t0)
    prefills.append(result.prefill_s)
    decodes.append(result.decode_s)
    results.append((result.num_blocks, result.num_steps, sum(len(t) for t in result.tokens)))
    del result
  blocks, steps, generated = results[-1]
  decode_s = statistics.median(decodes)
  prefill_s = statistics.median(prefills)
  return dict(method=method_name, layers=options.layer_kernels, batch=batch, context=context,
              warmup_s=warmup_s,
              wall_s=statistics.median(walls), prefill_s=prefill_s, decode_s=decode_s,
              generated_tokens=generated, decoded_tokens_per_s=generated / decode_s,
              prefill_tokens_per_s=batch * context / prefill_s, blocks=blocks, steps=steps,
              steps_per_block=steps / blocks,
              steps_per_block_runs=[s / b for b, s, _ in results])


def main(argv):
  del argv
  check_flags()
  os.makedirs(FLAGS.out, exist_ok=True)
  contexts = sorted(map(int, FLAGS.contexts))
  cfg, top = benchmark_config(FLAGS.preset, contexts[-1], FLAGS.new_tokens)
  overrides = dict(prefill_chunk=FLAGS.prefill_chunk)
  if FLAGS.policy is not None:
    overrides["policy"] = FLAGS.policy
  if FLAGS.steps_per_block is not None:
    overrides["steps_per_block"] = FLAGS.steps_per_block
  options = DecodeOptions.for_model(cfg, **overrides)
  options.validate(cfg)
  model = build_model(cfg, seed=0)
  meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
              date=datetime.date.today().isoformat(), preset=FLAGS.preset,
              policy=options.policy, threshold=options.threshold,
              sub_block_size=options.sub_block_size, steps_per_block=options.steps_per_block,
              block_size=cfg.block_size, new_tokens=FLAGS.new_tokens, budget=FLAGS.budget,
              dense_layers=FLAGS.dense_layers, repeats=FLAGS.repeats,
              weight_bytes=sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))))
  rows = []
  for batch in map(int, FLAGS.batches):
    for context in contexts:
      for name in FLAGS.methods:
        for layers in FLAGS.layer_kernels:
          cell_options = dataclasses.replace(options, layer_kernels=layers)
          try:
            rows.append(time_cell(model, cfg, top, name, cell_options, batch, context))
          except Exception as e:  # pylint: disable=broad-except
            # A cell that fails (out of memory, a kernel that does not compile) is recorded
            # and spares the others.
            error = ("out of memory" if "RESOURCE_EXHAUSTED" in str(e)
                     else f"{type(e).__name__}: {e}"[:300].replace("\n", " ").replace("|", "/"))
            rows.append(dict(method=name, layers=layers, batch=batch, context=context,
                             error=error))
          print(json.dumps(rows[-1]), flush=True)
          gc.collect()
          write_results(meta, rows)
  print(markdown(meta, rows))


def write_results(meta: dict, rows: list[dict]) -> None:
  with open(os.path.join(FLAGS.out, "generation_e2e.json"), "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=2)
  with open(os.path.join(FLAGS.out, "generation_e2e.md"), "w") as f:
    f.write(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
  policy = meta["policy"]
  rule = (f"exactly {meta['steps_per_block']} steps per block" if POLICIES[policy].fixed_steps
          else f"confidence threshold {meta['threshold']}" +
          (f", sub-blocks of {meta['sub_block_size']}" if policy == "fast_dllm_v2" else ""))
  lines = [f"# generation_e2e: {meta['preset']}, random weights, {meta['device']}, "
           f"jax {meta['jax']}, {meta['date']}", "",
           f"One generate call per request: {meta['new_tokens']} new tokens per sequence, "
           f"policy {policy} ({rule}), blocks of {meta['block_size']}; MAGE budget "
           f"{meta['budget']}, first {meta['dense_layers']} layers dense. Medians of "
           f"{meta['repeats']} calls after a compile warm-up. Weights "
           f"{meta['weight_bytes'] / 1e9:.2f} GB.", "",
           "| method | layers | batch | context | wall s | prefill s | decode s | decoded tok/s | "
           "steps / block | exact / this (wall) | exact / this (decode) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  # Ratios to exact attention with the same layers (rows saved before the layers column: xla).
  layers = lambda r: r.get("layers", "xla")
  exact = {(r["batch"], r["context"], layers(r)): r for r in rows
           if r["method"] == "exact" and "error" not in r}
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['method']} | {layers(r)} | {r['batch']} | {r['context']} | "
                   f"{r['error']} |" + " - |" * 6)
      continue
    ref = exact.get((r["batch"], r["context"], layers(r)))
    wall = "-" if ref is None else f"{ref['wall_s'] / r['wall_s']:.2f}"
    decode = "-" if ref is None else f"{ref['decode_s'] / r['decode_s']:.2f}"
    lines.append(f"| {r['method']} | {layers(r)} | {r['batch']} | {r['context']} | "
                 f"{r['wall_s']:.3f} | "
                 f"{r['prefill_s']:.3f} | {r['decode_s']:.3f} | {r['decoded_tokens_per_s']:.0f} | "
                 f"{r['steps_per_block']:.1f} | {wall} | {decode} |")
  lines += ["", "wall: the whole generate call (host packing, prefill, decode, output); decode: "
            "every block's denoising steps and its commit; decoded tok/s: tokens generated by "
            "the batch / decode s. steps / block: denoising forward passes per block (the "
            "batch's blocks advance together, so a block takes as many steps as its slowest "
            "sequence); with random weights a threshold policy's count is arbitrary: compare "
            "methods with --policy=fixed_steps."]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  app.run(main)
