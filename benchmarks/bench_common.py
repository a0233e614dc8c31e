"""What the whole-model step benchmarks share (decode_e2e.py, step_profile.py,
pretrain_step.py).

* Two attention methods that exist only for benchmarks: the off-the-shelf dense baseline
  (``XlaDenseAttention``) and attention replaced by zeros (``NoAttention``: what the rest of a
  step costs).
* ``denoise_loop``: denoising steps inside one jitted ``lax.while_loop``, as the generate loop
  runs them. Timing one jitted step per Python call adds the host's dispatch of the call (its
  ~340 parameter and cache arrays) to every step: 1.2-1.9 ms on the 1.5B shape, as large as
  the step's kernels, and absent from real decoding.
* ``median_seconds``: median wall time of a blocking call, after a warm-up call;
  ``trace_kernels``: the GPU kernels calls launch, from a jax.profiler trace;
  ``kernel_summary``: per step, their count, busy time, span and the top kernels;
* ``TrainStepSetup``: the trainer's own jitted step and its state, built from a raw config, and
  ``run_child``: one variant in its own process, its JSON result or its error (train_step.py,
  pretrain_step.py); ``largest_fitting``: the search for the longest context that fits.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import ClassVar

import jax
import jax.numpy as jnp

from flax import nnx

from mage_jax import DecodeOptions, KVCache, StepInfo
from mage_jax.generate import block_proposals, denoise_hidden
from mage_jax.methods.base import AttentionMethod


@dataclasses.dataclass(frozen=True)
class XlaDenseAttention(AttentionMethod):
  """Dense attention of the block over cache + block with jax.nn.dot_product_attention (XLA)."""

  name: ClassVar[str] = "xla"

  def attend(self, layer, q, k_block, v_block, cache, state, step):
    del layer, step
    batch, block, heads, _ = q.shape
    group = heads // k_block.shape[2]
    keys = jnp.concatenate([jnp.swapaxes(cache.k, 1, 2), k_block.astype(cache.k.dtype)], axis=1)
    values = jnp.concatenate([jnp.swapaxes(cache.v, 1, 2), v_block.astype(cache.v.dtype)], axis=1)
    keys, values = jnp.repeat(keys, group, axis=2), jnp.repeat(values, group, axis=2)
    capacity = cache.k.shape[2]
    rows = jnp.arange(capacity + block)
    visible = (rows[None, :] < cache.lengths[:, None]) | (rows[None, :] >= capacity)
    mask = jnp.broadcast_to(visible[:, None, None, :], (batch, 1, block, capacity + block))
    return jax.nn.dot_product_attention(q, keys, values, mask=mask), state, None


@dataclasses.dataclass(frozen=True)
class NoAttention(AttentionMethod):
  """No attention over the cache: what the rest of the step costs (weights, norms, LM head).

  The output is q plus the block's own k and v (broadcast over each KV group), not zeros: with
  zeros, q / k / v would be dead code and every layer's o_proj would read the same zero input,
  which XLA merges into one dot over concatenated o_proj weights (measured: 0.31 ms per step
  of weight copies on the 1.5B shape that no real step has)."""

  name: ClassVar[str] = "none"

  def attend(self, layer, q, k_block, v_block, cache, state, step):
    del layer, cache, step
    group = q.shape[2] // k_block.shape[2]
    return q + jnp.repeat(k_block + v_block, group, axis=2).astype(q.dtype), state, None


def median_seconds(fn, repeats: int) -> float:
  """Median wall seconds of ``fn()`` (blocked on), after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run_log(path: str):
  """A ``log(message)`` that prints each message and appends it to ``path`` (flushed at once,
  so a run killed at the device's time limit keeps what it logged)."""
  log_file = open(path, "a")  # pylint: disable=consider-using-with  (open for the run)

  def log(message: str) -> None:
    print(message, flush=True)
    log_file.write(message + "\n")
    log_file.flush()

  return log


def denoise_loop(graphdef, method: AttentionMethod, *, first: bool, steps: int,
                 layer_kernels: str = "xla"):
  """A jitted ``(params, block, cache, state) -> (tokens, state)`` running ``steps`` denoising
  steps of one block in a while_loop, each as the generate loop's greedy step: the model
  (``layer_kernels``), then the proposals (mage_jax.generate.block_proposals: the LM head,
  [MASK] excluded, token shift, softmax confidence; with "fused" the fused greedy head). Step
  i's tokens are the previous tokens with the first i positions replaced by the previous
  step's proposals, so every step depends on the one before (nothing is hoisted or skipped).
  ``first`` makes every step a first (All-[MASK]) step, as MAGE's selection step; otherwise
  later steps (step index 1..steps). The method state is returned too: a loop-carried value
  nothing reads would be dead code (MAGE's selection)."""
  options = DecodeOptions(layer_kernels=layer_kernels)

  @jax.jit
  def run(params, block, cache: KVCache, state):
    model = nnx.merge(graphdef, params)
    positions = jnp.arange(block.shape[1])[None, :]
    prev_logits = jnp.zeros((block.shape[0], model.config.vocab_size), jnp.float32)
    key = jax.random.key(0)

    def body(carry):
      i, tokens, state = carry
      info = StepInfo(first, jnp.int32(0) if first else i)
      hidden, state = denoise_hidden(model, tokens, cache, method, state, info,
                                     layer_kernels=layer_kernels)
      proposals, _ = block_proposals(model, hidden, prev_logits, key, options)
      tokens = jnp.where(positions < i, proposals.astype(tokens.dtype), tokens)
      return i + 1, tokens, state

    return jax.lax.while_loop(lambda c: c[0] <= steps, body, (jnp.int32(1), block, state))[1:]

  return run


def traced_device_lines(fn, calls: int, device: str):
  """The trace lines of the ``device`` planes ("GPU", "TPU") while ``fn()`` runs ``calls``
  times, after one untraced call (jax.profiler)."""
  jax.block_until_ready(fn())
  trace_dir = tempfile.mkdtemp()
  jax.profiler.start_trace(trace_dir)
  for _ in range(calls):
    jax.block_until_ready(fn())
  jax.profiler.stop_trace()
  for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
    for plane in jax.profiler.ProfileData.from_file(path).planes:
      if plane.name.startswith(f"/device:{device}"):
        yield from plane.lines


def trace_kernels(fn, calls: int) -> list[tuple[str, int, int]]:
  """(name, start_ns, duration_ns) of every GPU kernel ``calls`` calls of ``fn`` launch."""
  events = []
  for line in traced_device_lines(fn, calls, "GPU"):
    if line.name.startswith("Stream"):
      events += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
  return events


GEMM_MARKERS = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_")


def kernel_kind(name: str) -> str:
  """gemm, xla fusion, copy or other (pallas / custom), from a GPU kernel's name."""
  lower = name.lower()
  if any(m in lower for m in GEMM_MARKERS):
    return "gemm"
  if "fusion" in lower or lower.startswith(("loop_", "input_", "wrapped_")):
    return "xla fusion"
  if "memcpy" in lower or "memset" in lower:
    return "copy"
  return "other (pallas / custom)"


def kernel_summary(events, calls: int, steps_per_call: int = 1) -> dict:
  """Per-step kernel count, busy time (sum of kernel durations) and span (first kernel start
  to last kernel end: busy + gaps) from ``trace_kernels`` of ``calls`` calls; the top 12
  kernels by time, each with its share of the busy time. No events (no GPU): NaN times."""
  steps = calls * steps_per_call
  if not events:
    return dict(kernels_per_step=0.0, busy_ms=float("nan"), span_ms=float("nan"), top=[],
                by_kind={})
  events.sort(key=lambda e: e[1])
  busy = sum(d for _, _, d in events)
  # The span per call: from the first kernel's start to the last one's end, calls separated by
  # the host's block_until_ready; split into calls at the largest gaps.
  gaps = sorted(((events[i + 1][1] - (events[i][1] + events[i][2]), i)
                 for i in range(len(events) - 1)), reverse=True)
  cuts = sorted(i for _, i in gaps[:calls - 1])
  span, start = 0, 0
  for cut in cuts + [len(events) - 1]:
    span += events[cut][1] + events[cut][2] - events[start][1]
    start = cut + 1
  per_name = collections.defaultdict(lambda: [0, 0])
  by_kind = collections.Counter()
  for name, _, duration in events:
    per_name[name][0] += 1
    per_name[name][1] += duration
    by_kind[kernel_kind(name)] += duration
  top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:12]
  return dict(kernels_per_step=len(events) / steps, busy_ms=busy / steps / 1e6,
              span_ms=span / steps / 1e6,
              by_kind={k: v / steps / 1e6 for k, v in by_kind.items()},
              top=[dict(name=n[:90], per_step=c / steps, ms_per_step=d / steps / 1e6,
                        share=d / busy) for n, (c, d) in top])


@dataclasses.dataclass
class TrainStepSetup:
  """What a training-step benchmark needs: the validated configs, the float32 trainable weights,
  the frozen ones (train.trainer.FrozenWeights, the step's third argument), the optimizer
  state and the trainer's jitted step (train.trainer.make_train_step)."""
  cfg: object
  model_cfg: object
  params: dict
  frozen: object
  state: object
  step_fn: object

  @classmethod
  def build(cls, raw: dict, mode: str) -> "TrainStepSetup":
    """A random-weight model as the trainer would start it from ``raw`` (a train config dict)."""
    from train import config as config_lib  # pylint: disable=import-outside-toplevel
    return cls.from_config(config_lib.from_dict(raw), mode)

  @classmethod
  def from_config(cls, cfg, mode: str) -> "TrainStepSetup":
    """The same from a train.config.TrainConfig."""
    from train import trainer  # pylint: disable=import-outside-toplevel
    init = trainer.initial_model(cfg)
    model_cfg = init.config
    cfg.validate(model_cfg, mode)
    layout = trainer.ParamLayout(model_cfg, cfg.trainable, cfg.lora)
    params, shared = layout.split(init, cfg.init_seed)
    del init
    frozen = trainer.FrozenWeights(
        shared, layout.teacher_weights(params) if mode == "selfdistill" else {})
    tx, schedule = trainer.make_optimizer(cfg.optim, cfg.steps)
    return cls(cfg, model_cfg, params, frozen, trainer.initial_state(params, tx, cfg.seed),
               trainer.make_train_step(cfg, mode, layout, tx, schedule))


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(args: list[str], timeout: float | None = None) -> dict:
  """Runs ``python *args`` from the repository root (on PYTHONPATH) and returns the JSON object
  of the last stdout line that starts with "{", or {"error": "OOM" / "timeout after N s" / the
  last line of stderr} when there is none, so one failed variant does not end a sweep."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT,
                                                                  os.environ.get("PYTHONPATH")])))
  try:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timeout after {timeout} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:] or ["no output"]
  oom = any("RESOURCE_EXHAUSTED" in l or "out of memory" in l.lower() for l in tail)
  return {"error": "OOM" if oom else tail[-1].replace("|", "/")}


def largest_fitting(measured: dict[int, bool], candidates: list[int],
                    fits) -> tuple[int | None, int | None]:
  """(largest length that fits, smallest that does not), from ``measured`` (length -> fitted)
  and those ``candidates`` above the longest fitting and below the shortest failing length,
  tried in increasing order by ``fits(length) -> bool`` (memory grows with the length)."""
  known = dict(measured)
  for length in sorted(set(candidates) - set(known)):
    fitting = [n for n, ok in known.items() if ok]
    failing = [n for n, ok in known.items() if not ok]
    if failing and length >= min(failing):
      break
    if fitting and length < max(fitting):
      continue
    known[length] = fits(length)
  fitting = [n for n, ok in known.items() if ok]
  failing = [n for n, ok in known.items() if not ok]
  return (max(fitting) if fitting else None), (min(failing) if failing else None)
