"""benchmarks/tpu_kernels.py on the CPU: its flags are checked (each bad value names its flag)
and it refuses a non-TPU device before any work. Its numbers need a TPU (docs/tpu.md)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
try:
  import tpu_kernels  # pylint: disable=g-import-not-at-top
finally:
  sys.path.pop(0)


def test_defaults_cover_decode_kernels_table():
  flags = tpu_kernels.parse_flags([])
  assert flags.modes == ("check", "table")
  assert flags.models == ("1.5B", "7B")
  assert flags.caches == (16384, 32768, 65536, 131072) and flags.batches == (1, 8)
  assert flags.tuning == {} and flags.baselines and not flags.interpret and flags.chip is None


def test_values_are_parsed():
  flags = tpu_kernels.parse_flags([
      "--mode=table", "--models=7B", "--caches=4096,8192", "--batches=2",
      '--tuning={"exact": {"block_k": 512}, "sparse": {"num_splits": 2}}', "--no-baselines",
      "--interpret", "--chip=v6e", "--name=run1", "--out=/tmp/x"])
  assert flags.modes == ("table",) and flags.models == ("7B",)
  assert flags.caches == (4096, 8192) and flags.batches == (2,)
  assert flags.tuning == {"exact": {"block_k": 512}, "sparse": {"num_splits": 2}}
  assert not flags.baselines and flags.interpret and flags.chip == "v6e"
  assert (flags.name, flags.out) == ("run1", "/tmp/x")


@pytest.mark.parametrize("argv,flag", [
    (["--mode=check,bench"], "--mode: unknown ['bench']"),
    (["--models=1.5B,13B"], "--models: unknown ['13B']"),
    (['--tuning={"flash": {}}'], "--tuning"),
    (['--tuning={"exact": 512}'], "--tuning"),
    (["--tuning=[1]"], "--tuning"),
    (["--caches=16384,abc"], "--caches"),
    (["--caches=100"], "--caches must be multiples of 8"),
    (["--batches=0"], "--batches"),
])
def test_bad_values_name_their_flag(argv, flag):
  with pytest.raises(ValueError, match=flag.replace("[", r"\[").replace("]", r"\]")):
    tpu_kernels.parse_flags(argv)


def test_bad_chip_is_refused():
  with pytest.raises(SystemExit):
    tpu_kernels.parse_flags(["--chip=v4"])


def test_refuses_a_cpu_before_any_work(tmp_path):
  with pytest.raises(SystemExit, match="not a TPU; pass --interpret"):
    tpu_kernels.main([f"--out={tmp_path}"])
  assert not list(tmp_path.iterdir())


def test_chip_names():
  assert tpu_kernels.chip_of("TPU v5 lite") == "v5e"
  assert tpu_kernels.chip_of("TPU v5p") == "v5p"
  assert tpu_kernels.chip_of("TPU v6 lite") == "v6e"
  assert tpu_kernels.chip_of("cpu") is None
