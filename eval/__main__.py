"""The eval CLI: ``python -m eval --method=mage`` (console script ``mage-eval``).

Runs the chosen methods side by side (exact is always added as the reference) on a task grid,
writes results.jsonl line by line (a killed run resumes and skips finished cases; a case is
tied to the weights, method and decoding options and prompt that produced it, so results of
another checkpoint in the same folder are never reused), batches.jsonl (prefill and per-step
decode latency per batch), summary.json, PNG plots, and prints the requested grid's method x
task x context table. Bad flags or unreadable files end the run with one line on stderr and
exit status 2. --help lists the flags.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

import models
from eval import mesh_flags

FLAGS = flags.FLAGS
DEFAULT_CHECKPOINT = models.DEFAULT

flags.DEFINE_list("method", None, "attention method(s), comma list: exact, mage, mage_adaptive, "
                  "quest, tidal, sparsed, oracle; exact is added as the reference. A suffix "
                  "@denseN sets a sparse method's exact first layers (mage@dense0)")
flags.DEFINE_list("budget", ["64"], "KV budget(s) k of the sparse methods, comma list; a budget "
                  ">= the context keeps every entry (exact attention; marked * in the table)")
flags.DEFINE_string("checkpoint", DEFAULT_CHECKPOINT, "Hugging Face checkpoint directory "
                    "(default: the shipped model, models.DEFAULT)")
flags.DEFINE_string("task", "niah", "niah, a RULER task (ruler_niah_single, ...), or "
                    "longbench:<path.jsonl>")
# The defaults run NIAH at the shipped model's training context (2048 tokens): 5 depths x 2
# samples, 10 prompts per method, one batch.
flags.DEFINE_list("context_lengths", ["2048"], "prompt lengths in tokens, comma list; each "
                  "prompt plus its answer must fit the checkpoint's max_position_embeddings")
flags.DEFINE_list("depths", ["0.0", "0.25", "0.5", "0.75", "1.0"], "needle depths for niah")
flags.DEFINE_integer("num_samples", 2, "samples per grid cell (LongBench: records per file)")
flags.DEFINE_integer("batch_size", 10, "sequences decoded together")
flags.DEFINE_list("measure", ["accuracy", "latency"], "accuracy, recall, latency")
flags.DEFINE_string("output_dir", "runs/eval", "where results, summary and plots go; a folder "
                    "of earlier runs is resumed, its other results kept but not shown")
flags.DEFINE_integer("seed", 0, "seed of the task generators (eval seeds are < 10**6)")
flags.DEFINE_string("haystack_file", None, "plain-text filler for niah / RULER tasks")
flags.DEFINE_enum("layer_kernels", "xla", ["xla", "fused"], "the layers outside attention in "
                  "the denoising steps: XLA's, or the fused decode kernels "
                  "(DecodeOptions.layer_kernels; a GPU setting, their references elsewhere)")


class _Fail(Exception):
  """A problem with the user's input: reported in one line."""


def _output_dir_error(e: Exception) -> str:
  return f"--output_dir={FLAGS.output_dir}: {e}"


def main(argv):
  if len(argv) > 1:
    raise _Fail(f"unexpected arguments: {' '.join(argv[1:])}")
  from eval import runner
  from eval.plots import plot_niah_heatmaps, plot_vs_budget
  from eval.results import (ResultStore, format_layer_table, format_table, summarize,
                            write_summary)
  from mage_jax import sharding
  from mage_jax.checkpoint import apply_chat_template, load_pretrained, load_tokenizer
  from mage_jax.generate import DecodeOptions

  try:
    if not FLAGS.method:
      raise ValueError("--method is required (e.g. --method=mage)")
    names = list(dict.fromkeys(["exact", *FLAGS.method]))
    specs = runner.method_specs(names, runner.as_ints("budget", FLAGS.budget))
    lengths = runner.as_ints("context_lengths", FLAGS.context_lengths)
    depths = runner.as_depths(FLAGS.depths)
    measure = runner.parse_measures(FLAGS.measure)
    if FLAGS.batch_size < 1 or FLAGS.num_samples < 1:
      raise ValueError("--batch_size and --num_samples must be >= 1")
    if not os.path.isdir(FLAGS.checkpoint):
      raise ValueError(f"--checkpoint: {FLAGS.checkpoint} is not a directory")
    if os.path.exists(FLAGS.output_dir) and not os.path.isdir(FLAGS.output_dir):
      raise ValueError(_output_dir_error("exists and is not a directory"))
    mesh = mesh_flags.setup()
    if mesh is not None:
      runner.check_mesh(mesh, FLAGS.batch_size, measure)
      if FLAGS.layer_kernels == "fused":
        raise ValueError("--layer_kernels=fused runs on one device; drop --mesh")
    model, cfg = load_pretrained(FLAGS.checkpoint)
    options = DecodeOptions.for_model(cfg, layer_kernels=FLAGS.layer_kernels)
    if mesh is not None:
      sharding.shard_model(model, mesh)
    tok, template = load_tokenizer(FLAGS.checkpoint)
    chat = None
    if template:
      chat = lambda text: apply_chat_template(template, [{"role": "user", "content": text}])
    tokenizer = runner.Tokenizer(encode=lambda s: tok.encode(s, add_special_tokens=False).ids,
                                 decode=lambda ids: tok.decode(ids), chat_template=chat)
    samples = runner.build_samples(FLAGS.task, lengths, num_samples=FLAGS.num_samples,
                                   seed=FLAGS.seed, depths=depths, tokenizer=tokenizer,
                                   haystack_file=FLAGS.haystack_file)
    runner.check_context_fits(cfg, tokenizer, samples, FLAGS.checkpoint)
    try:
      store = ResultStore(FLAGS.output_dir)
    except (ValueError, OSError) as e:
      raise ValueError(_output_dir_error(e)) from e
  except (ValueError, OSError) as e:
    raise _Fail(str(e)) from e

  rows = runner.run_cases(model, tokenizer, samples, specs, store=store,
                          batch_size=FLAGS.batch_size, seed=FLAGS.seed, measure=measure,
                          options=options, mesh=mesh)
  case_ids = [r["case_id"] for r in rows]
  batches = store.batches(case_ids)
  write_summary(rows, FLAGS.output_dir, batches)
  if FLAGS.task == "niah":
    plot_niah_heatmaps(rows, FLAGS.output_dir)
  plot_vs_budget(rows, FLAGS.output_dir, metric="score")
  if "recall" in measure and any(r.get("recall") is not None for r in rows):
    plot_vs_budget(rows, FLAGS.output_dir, metric="recall")
  summary = summarize(rows, batches)
  print(format_table(summary))
  for field, title in (("layer_recall", "index recall"), ("layer_mass_recall", "mass recall")):
    table = format_layer_table(summary, field)
    if table:
      print(f"\nper-layer {title} (steps 2..T vs the per-step oracle):\n{table}")
  others = len(store.finished()) - len(rows)
  if others:
    print(f"({others} other results in this folder, from other checkpoints, settings or grids, "
          f"are kept in results.jsonl and not shown)")
  print(f"results: {os.path.join(FLAGS.output_dir, 'results.jsonl')}")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parsing with any flag error as one line instead of usage text; -h is --help (absl's
  own short form is -?)."""
  argv = [argv[0]] + ["--help" if a == "-h" else a for a in argv[1:]]
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"mage-eval: {e}", file=sys.stderr)
    sys.exit(2)


def _main_reporting(argv: list[str]) -> None:
  try:
    main(argv)
  except _Fail as e:
    print(f"mage-eval: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  """Entry point: absl's --help / -h / --helpfull; flag and input errors become one line on
  stderr, exit status 2."""
  app.run(_main_reporting, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
