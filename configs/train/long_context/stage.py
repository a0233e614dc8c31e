"""One time-boxed segment of a long-context stage: train from exported weights, export.

    python -m configs.train.long_context.stage --config=configs/train/long_context/l1_8k.json \
        --init=models/default --minutes=6 --steps_done=0 --run_dir=runs/long_context/l1_8k/call1

The GPU machine keeps nothing between calls and returns at most 64 MB, so a stage's optimizer
state (float32 weights and Adam moments: ~290 MB for the 24.4M model) cannot be carried from
one call to the next; only the exported bf16 weights (48.8 MB) can. A stage that needs several
calls therefore runs as segments, each a fresh AdamW from the previous segment's export:

- segment 1 (``--steps_done=0``) is the stage's config as written;
- a later segment continues the stage's learning-rate schedule: it starts at the rate the
  stage's warmup + cosine had reached after ``steps_done`` steps (after a short warmup of its
  own, ``--segment_warmup``, since Adam's moments restart at zero; or, if the stage's warmup
  was not over, warms up to the peak where the stage's warmup ends) and decays to the stage's
  final rate over the stage's remaining steps;
- each segment draws other training documents (``data.seed`` + ``steps_done``): the data
  position of the earlier segments is lost with their workdir.

Training stops at ``--minutes`` (after the first step that ends later; compilation counts) or at
the end of the stage; either way the weights are exported to ``<run_dir>/model`` (in shards of
the config's ``export_max_shard_bytes``) and ``<run_dir>/progress.json`` says how far the stage
got (``steps_done``, to pass to the next segment). device_stage.sh runs this on the GPU machine.
``--mode=selfdistill`` runs a MAGE-FT config the same way (e.g. ft_mage_16k.json on the 16K
stage's export: the sparse student against the exact teacher at the stage's length).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Mapping

from train.config import MODES, ConfigError, OptimConfig, load_config, parse_override, to_dict

# Warmup of a segment after the first: Adam's moments restart at zero.
SEGMENT_WARMUP = 20


def segment_overrides(stage: Mapping[str, Any], steps_done: int,
                      warmup: int = SEGMENT_WARMUP) -> dict[str, Any]:
  """Config overrides (dotted paths) of the segment that starts after ``steps_done`` steps.

  Args:
    stage: the stage's raw JSON config (``steps``, ``optim``, ``data.seed``).
    steps_done: optimizer steps the stage's earlier segments ran (0: the first segment).
    warmup: the segment's warmup steps (later segments only).

  Raises:
    ConfigError: ``steps_done`` is negative or the stage is already complete.
  """
  from train.trainer import make_optimizer  # jax loads only when a segment is planned

  total = int(stage["steps"])
  if not 0 <= steps_done < total:
    raise ConfigError(f"--steps_done: must be in [0, {total}) (the stage's steps), got "
                      f"{steps_done}")
  if steps_done == 0:
    return {}
  optim = OptimConfig(**stage.get("optim", {}))
  _, schedule = make_optimizer(optim, total)
  remaining = total - steps_done
  warmup = min(warmup, remaining - 1)
  if steps_done < min(optim.warmup_steps, total - 1):  # the stage's warmup is not over: finish it
    start_lr = optim.learning_rate
    warmup = max(warmup, optim.warmup_steps - steps_done)
  else:
    start_lr = float(schedule(steps_done))
  end_lr = optim.learning_rate * optim.min_lr_ratio
  return {
      "steps": remaining,
      "optim.learning_rate": start_lr,
      "optim.min_lr_ratio": min(1.0, end_lr / start_lr),
      "optim.warmup_steps": warmup,
      "data.seed": int(stage.get("data", {}).get("seed", 0)) + steps_done,
  }


def run_segment(config: str, init: str, minutes: float, steps_done: int, run_dir: str, *,
                mode: str = "pretrain", warmup: int = SEGMENT_WARMUP,
                overrides: Mapping[str, Any] = ()) -> dict:
  """Trains one segment into a fresh ``run_dir`` (train/, model/, progress.json) in the
  trainer's ``mode`` (pretrain, or selfdistill: MAGE-FT); returns the progress record.
  ``overrides``: further dotted-path config overrides (tests, data.workers)."""
  from train import trainer

  if mode not in MODES:
    raise ConfigError(f"--mode: must be one of {MODES}, got {mode!r}")
  if os.path.exists(run_dir) and os.listdir(run_dir):
    raise ConfigError(f"--run_dir: {run_dir} is not empty; every segment starts in a fresh one")
  if minutes <= 0:
    raise ConfigError(f"--minutes: must be > 0, got {minutes}")
  with open(config) as f:
    stage = json.load(f)
  segment = segment_overrides(stage, steps_done, warmup)
  export_dir = os.path.join(run_dir, "model")
  cfg = load_config(config, {**segment, **dict(overrides), "model": init,
                             "workdir": os.path.join(run_dir, "train"),
                             "export_dir": export_dir, "progress_bar": False})
  started = time.monotonic()
  history = trainer.train(cfg, mode, max_seconds=60.0 * minutes)
  ran = len(history)
  if ran < cfg.steps:  # stopped by the time box: export the checkpoint it saved at the stop
    trainer.train(dataclasses.replace(cfg, steps=ran), mode)
  record = {
      "stage": os.path.splitext(os.path.basename(config))[0],
      "mode": mode,
      "config": config,
      "init": init,
      "stage_steps": int(stage["steps"]),
      "steps_done_before": steps_done,
      "steps_this_segment": ran,
      "steps_done": steps_done + ran,
      "complete": steps_done + ran >= int(stage["steps"]),
      "tokens_this_segment": ran * cfg.optim.batch_size * cfg.optim.grad_accum * cfg.seq_len,
      "seconds": round(time.monotonic() - started, 1),
      "segment_overrides": segment,
      "last_metrics": history[-1] if history else None,
      "train_config": to_dict(cfg),
  }
  with open(os.path.join(run_dir, "progress.json"), "w") as f:
    json.dump(record, f, indent=2)
  return record


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="the stage's training config JSON")
  parser.add_argument("--init", required=True, help="Hugging Face directory to start from")
  parser.add_argument("--minutes", type=float, required=True, help="training time box")
  parser.add_argument("--steps_done", type=int, default=0,
                      help="steps the stage's earlier segments ran (their progress.json)")
  parser.add_argument("--run_dir", required=True, help="a fresh folder for this segment")
  parser.add_argument("--segment_warmup", type=int, default=SEGMENT_WARMUP)
  parser.add_argument("--mode", default="pretrain",
                      help=f"the trainer's mode, one of {MODES} (selfdistill: MAGE-FT)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                      help="further config override, repeatable")
  args = parser.parse_args(argv)
  from train.trainer import TrainingDiverged

  try:
    overrides = dict(parse_override(text) for text in args.set)
    record = run_segment(args.config, args.init, args.minutes, args.steps_done, args.run_dir,
                         mode=args.mode, warmup=args.segment_warmup, overrides=overrides)
  except (ConfigError, OSError, json.JSONDecodeError) as e:
    print(f"stage: error: {e}", file=sys.stderr)
    return 2
  except TrainingDiverged as e:
    print(f"stage: error: {e}", file=sys.stderr)
    return 1
  print(json.dumps({k: v for k, v in record.items() if k != "train_config"}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
