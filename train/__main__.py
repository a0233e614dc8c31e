"""Command line: ``python -m train --mode=pretrain|selfdistill --config=run.json [overrides]``.

Overrides: --workdir, --steps, --model, --export_dir, and any field by dotted path with
--set (repeatable), e.g. ``--set optim.learning_rate=1e-4 --set mage.budget=1024``. --mesh and
the multi-host flags (docs/sharding.md) spread a run over several devices or hosts. A run
resumes from the newest checkpoint in its workdir. Problems with flags, files or the config
are reported as one line on stderr (exit status 2); a diverged run exits with status 1.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging

from eval import mesh_flags
from train.config import MODES, ConfigError, load_config, parse_override

_MODE = flags.DEFINE_enum("mode", None, list(MODES), "pretrain (block-diffusion objective from "
                          "scratch) or selfdistill (MAGE-FT).")
_CONFIG = flags.DEFINE_string("config", None, "Training config JSON (see docs/training.md).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Overrides the config's workdir.")
_STEPS = flags.DEFINE_integer("steps", None, "Overrides the config's steps.")
_MODEL = flags.DEFINE_string("model", None, "Overrides the config's model (preset, config.json "
                             "or Hugging Face checkpoint directory).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Overrides the config's export_dir.")
_STOP_AT_STEP = flags.DEFINE_integer("stop_at_step", None, "Stop (checkpointed, resumable) "
                                     "after this step, e.g. to fit a time slot.")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", None, "Stop (checkpointed, resumable) after the "
                                  "first step that ends this many seconds after training starts.")
_SET = flags.DEFINE_multi_string("set", [], "key.path=json_value override, repeatable.")
_DETERMINISTIC = flags.DEFINE_bool(
    "deterministic", False, "GPU: XLA's deterministic ops (--xla_gpu_deterministic_ops=true in "
    "XLA_FLAGS), so reruns of one config do not drift apart through the order of floating-point "
    "reductions; scatters and reductions get slower. The CPU backend is deterministic already.")

DETERMINISTIC_OPS = "--xla_gpu_deterministic_ops"


def _fail(message: str, status: int = 2):
  print(f"mage-train: error: {message}", file=sys.stderr)
  sys.exit(status)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parsing with any flag error as one line instead of usage text."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  if len(rest) > 1:
    _fail(f"unexpected arguments: {' '.join(rest[1:])}")
  for name in ("mode", "config"):
    if flags.FLAGS[name].value is None:
      _fail(f"--{name} is required")
  return rest


def with_deterministic_ops(xla_flags: str) -> str:
  """``xla_flags`` (an XLA_FLAGS value) with XLA's deterministic GPU ops switched on.

  Raises:
    ConfigError: XLA_FLAGS already switches them off.
  """
  for flag in xla_flags.split():
    name, _, value = flag.partition("=")
    if name == DETERMINISTIC_OPS:
      if value.lower() not in ("", "true", "1"):
        raise ConfigError(f"--deterministic conflicts with {flag} in XLA_FLAGS")
      return xla_flags
  return f"{xla_flags} {DETERMINISTIC_OPS}=true".strip()


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  from train import trainer  # jax and the model load only once the flags are valid

  overrides = {}
  try:
    if _DETERMINISTIC.value:  # read when jax starts its backend, which has not happened yet
      os.environ["XLA_FLAGS"] = with_deterministic_ops(os.environ.get("XLA_FLAGS", ""))
    for text in _SET.value:
      key, value = parse_override(text)
      overrides[key] = value
    for flag, key in ((_WORKDIR, "workdir"), (_STEPS, "steps"), (_MODEL, "model"),
                      (_EXPORT_DIR, "export_dir")):
      if flag.value is not None:
        overrides[key] = flag.value
    if _STOP_AT_STEP.value is not None and _STOP_AT_STEP.value < 1:
      raise ConfigError(f"--stop_at_step must be >= 1, got {_STOP_AT_STEP.value}")
    if _MAX_SECONDS.value is not None and _MAX_SECONDS.value <= 0:
      raise ConfigError(f"--max_seconds must be > 0, got {_MAX_SECONDS.value}")
    cfg = load_config(_CONFIG.value, overrides)
    try:
      mesh = mesh_flags.setup()
    except ValueError as e:
      raise ConfigError(str(e)) from e
    trainer.train(cfg, _MODE.value, stop_at_step=_STOP_AT_STEP.value,
                  max_seconds=_MAX_SECONDS.value, mesh=mesh)
  except ConfigError as e:
    _fail(str(e))
  except trainer.TrainingDiverged as e:
    _fail(str(e), status=1)


def run() -> None:
  """Console-script entry point (``mage-train``)."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
