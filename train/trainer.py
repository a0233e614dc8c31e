"""The training loop: optimizer, jitted step, orbax checkpoints, logging, export.

Precision: the trainable weights live in float32 (``TrainState.params``, the master copy the
optimizer updates and its float32 moments); each forward casts them to the model's dtype
(bfloat16 for the real models), so matmuls run in bf16 and gradients come back in float32
through the cast. Softmax, norms, logits and losses are float32 inside the model.

One step = ``grad_accum`` micro-batches scanned inside one jit (their float32 gradients
averaged) then one AdamW update, so the step counter, the LR schedule, the data position and
the PRNG stream (fold_in(run key, step)) all advance together and a checkpoint restores them
exactly. A step whose loss or gradient norm is not finite leaves the state untouched; the loop
then stops before any save, so the last checkpoint on disk is the last good state.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import nnx

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mage_jax import checkpoint as hf_checkpoint
from mage_jax import sharding
from mage_jax.config import ModelConfig
from mage_jax.model import Transformer, build_model
from train import data as data_lib
from train import objective
from train import probe as probe_lib
from train.config import ConfigError, OptimConfig, TrainConfig, to_dict


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient norm stopped the run."""


class TrainState(NamedTuple):
  """Everything a checkpoint restores.

  Attributes:
    step: int32 scalar, optimizer steps completed.
    params: float32 master weights by dotted name (``layers.0.mlp.gate_up_proj.kernel``).
    opt_state: the optax state of ``params``.
    rng: uint32 key data of the run's PRNG key; step s uses fold_in(key, s).
    data_position: int32 scalar, packed sequences consumed (step * global batch).
  """

  step: jax.Array
  params: dict[str, jax.Array]
  opt_state: Any
  rng: jax.Array
  data_position: jax.Array


class ParamLayout:
  """Flat float32 weights <-> a Transformer in the model's dtype.

  Flat string-keyed dicts are what optax, orbax and the logs handle best; the graph of the
  model is built once, abstractly, and re-filled with cast weights inside every forward.
  """

  def __init__(self, cfg: ModelConfig):
    self.config = cfg
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    self.graphdef, state = nnx.split(abstract)
    self.variables = list(nnx.to_flat_state(state))

  @staticmethod
  def name(path: tuple) -> str:
    return ".".join(map(str, path))

  def flatten(self, model: Transformer) -> dict[str, jax.Array]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {self.name(p): v.get_value().astype(jnp.float32) for p, v in flat}

  def abstract_params(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The master copy's names, shapes and dtype, without allocating it."""
    return {self.name(p): jax.ShapeDtypeStruct(v.get_value().shape, jnp.float32)
            for p, v in self.variables}

  def model(self, params: dict[str, jax.Array]) -> Transformer:
    dtype = jnp.dtype(self.config.dtype)
    state = nnx.from_flat_state(
        [(p, v.replace(params[self.name(p)].astype(dtype))) for p, v in self.variables])
    return nnx.merge(self.graphdef, state)


def initial_model(cfg: TrainConfig) -> Transformer:
  """The weights a run starts from: a Hugging Face checkpoint directory, or random ones for a
  preset name or a config.json path. Deterministic, so MAGE-FT re-derives its frozen teacher
  from it on resume instead of storing a second copy in every checkpoint."""
  overrides = dict(cfg.model_overrides)
  try:
    if os.path.isdir(cfg.model):
      model, _ = hf_checkpoint.load_pretrained(cfg.model, config_overrides=overrides)
      return model
    if cfg.model.endswith(".json"):
      model_cfg = ModelConfig.from_json_file(cfg.model, **overrides)
    else:
      model_cfg = ModelConfig.preset(cfg.model, **overrides)
  except (OSError, TypeError, ValueError) as e:
    raise ConfigError(f"model: {e}") from e
  return build_model(model_cfg, seed=cfg.init_seed,
                     scaled_residual_init=cfg.scaled_residual_init)


def make_optimizer(optim: OptimConfig, steps: int) -> tuple[optax.GradientTransformation,
                                                            optax.Schedule]:
  """Clip by global norm, then AdamW (no decay on vectors: norms and biases) on a warmup +
  cosine schedule spanning the run."""
  warmup = min(optim.warmup_steps, steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, optim.learning_rate, warmup, max(steps, warmup + 1),
      end_value=optim.learning_rate * optim.min_lr_ratio)
  decay_mask = lambda params: {k: v.ndim >= 2 for k, v in params.items()}
  tx = optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=decay_mask))
  return tx, schedule


def initial_state(params: dict[str, jax.Array], tx: optax.GradientTransformation,
                  seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)),
                    data_position=jnp.zeros((), jnp.int32))


def state_shardings(layout: ParamLayout, tx: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
  """Where every part of the train state lives: the master weights and the optimizer moments by
  the parameter rules of mage_jax.sharding (heads, MLP hidden and vocabulary over "model",
  replicated over "data": no FSDP, see docs/sharding.md), counters and keys replicated."""
  abstract = jax.eval_shape(lambda: initial_state(layout.abstract_params(), tx, 0))
  params = sharding.named_param_shardings({k: v.shape for k, v in abstract.params.items()}, mesh)
  replicated = NamedSharding(mesh, P())
  return TrainState(step=replicated, params=params,
                    opt_state=sharding.shardings_like_params(abstract.opt_state, params, mesh),
                    rng=replicated, data_position=replicated)


def make_train_step(cfg: TrainConfig, mode: str, layout: ParamLayout,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh | None = None) -> Callable:
  """The jitted step: (state, tokens [accum, micro, L], teacher weights) -> (state, metrics).

  With a ``mesh`` the state and teacher weights must be laid out by ``state_shardings`` (the
  step keeps them there) and the micro-batches are split over "data"."""
  model_cfg = layout.config
  num_views = 2 if cfg.complementary else 1
  mage = cfg.mage
  impl = cfg.attention_impl
  if mesh is not None:
    shardings = state_shardings(layout, tx, mesh)
    tokens_sharding = sharding.checked_sharding(
        mesh, "training micro-batch", (cfg.optim.grad_accum, cfg.optim.batch_size, cfg.seq_len),
        (None, "batch", "seq"))

  def micro_loss(params, views, selections, teacher_states, teacher):
    model = layout.model(params)
    if mode == "pretrain":
      return objective.pretrain_loss(model, views, chunk=cfg.loss_chunk, remat=cfg.remat,
                                     impl=impl)
    return objective.selfdistill_loss(model, teacher, views, selections, teacher_states,
                                      kl_weight=mage.kl_weight, chunk=cfg.loss_chunk,
                                      remat=cfg.remat, impl=impl)

  def step(state: TrainState, tokens: jax.Array, teacher_params):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    teacher = layout.model(teacher_params) if mode == "selfdistill" else None

    def accumulate(grad_sum, xs):
      micro_tokens, micro_key = xs
      views = objective.noise_views(
          micro_key, micro_tokens, block_size=model_cfg.block_size,
          mask_id=model_cfg.mask_token_id, eps=cfg.noise_eps, complementary=cfg.complementary)
      selections = teacher_states = None
      if mode == "selfdistill":
        selections = objective.select_keys(
            layout.model(state.params), views, budget=mage.budget,
            dense_layers=mage.dense_layers, selection_queries=mage.selection_queries,
            alpha_includes_block=mage.alpha_includes_block, score_chunk=mage.score_chunk,
            num_views=num_views, impl=impl)
        teacher_states = objective.teacher_hidden(teacher, views, impl)
      (_, metrics), grads = jax.value_and_grad(micro_loss, has_aux=True)(
          state.params, views, selections, teacher_states, teacher)
      return jax.tree.map(jnp.add, grad_sum, grads), metrics

    accum = tokens.shape[0]
    keys = jax.random.split(key, accum)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grad_sum, metrics = jax.lax.scan(accumulate, zeros, (tokens, keys))
    grads = jax.tree.map(lambda g: g / accum, grad_sum)
    metrics = jax.tree.map(jnp.mean, metrics)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        rng=state.rng,
        data_position=state.data_position + tokens.shape[0] * tokens.shape[1])
    metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step))
    if mesh is not None:  # same layout in and out: the donated buffers are reused, no recompile
      new_state = jax.lax.with_sharding_constraint(new_state, shardings)
    return new_state, metrics

  jitted = jax.jit(step, donate_argnums=0)
  if mesh is None:
    return jitted

  def sharded_step(state: TrainState, tokens, teacher_params):
    with jax.set_mesh(mesh):
      return jitted(state, jax.device_put(tokens, tokens_sharding), teacher_params)

  return sharded_step


class Checkpoints:
  """Orbax CheckpointManager: numbered steps, async saves, the newest ``max_to_keep`` kept.

  Each step holds the TrainState and, as JSON, the step, data position and training config.
  """

  def __init__(self, directory: str, every: int, max_to_keep: int, async_save: bool):
    self.directory = os.path.abspath(directory)
    self.every = every
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, meta: dict[str, Any]) -> None:
    self.manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, abstract: TrainState) -> tuple[TrainState, dict[str, Any]]:
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def broken_dir(self) -> str:
    """Where unreadable checkpoints are moved (beside the checkpoints, never deleted)."""
    return os.path.join(os.path.dirname(self.directory), "broken_checkpoints")

  def restore_newest_intact(self, abstract: TrainState, echo: Callable[[str], None]
                            ) -> tuple[TrainState, dict[str, Any]] | None:
    """The newest checkpoint that restores; None if there is none.

    A newer one that cannot be read (a truncated or missing file: a job killed while writing,
    a full disk) is named, moved to ``broken_dir()`` (so the next save cannot collide with it
    and nothing is lost) and the one before it restored.

    Raises:
      ConfigError: no checkpoint restores (nothing is moved then: the error may be in the run's
        configuration rather than in the files).
    """
    broken: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      with _quiet_abandoned_reads():
        try:
          restored = self.restore(step, abstract)
        except Exception as e:  # orbax / tensorstore raise many types for unreadable data
          broken.append((step, _first_line(e)))
          continue
      for bad, error in broken:
        target = self._move_aside(bad)
        echo(f"checkpoint step {bad} cannot be read ({error}); moved to {target}")
      if broken:
        self.manager.reload()
      return restored
    if broken:
      step, error = broken[0]
      raise ConfigError(f"no checkpoint in {self.directory} can be restored (step {step}: "
                        f"{error}); move that folder aside to start over from step 0")
    return None

  def _move_aside(self, step: int) -> str:
    os.makedirs(self.broken_dir(), exist_ok=True)
    target = os.path.join(self.broken_dir(), str(step))
    suffix = 1
    while os.path.exists(target):
      target = os.path.join(self.broken_dir(), f"{step}.{suffix}")
      suffix += 1
    os.rename(os.path.join(self.directory, str(step)), target)
    return target

  def close(self) -> None:
    """Waits for pending async saves (a save is only complete once this returns)."""
    self.manager.wait_until_finished()
    self.manager.close()


def _memory_stats() -> dict[str, int]:
  """Device memory in use and its peak, where the backend reports them (GPUs do, CPUs not)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


@contextlib.contextmanager
def _quiet_abandoned_reads():
  """A restore that fails on one array abandons orbax's other pending reads, and Python reports
  each one ("Exception ignored in: <coroutine ...>", a traceback apiece) when it is collected;
  they are collected here, silently: the failure itself is reported in one line."""
  hook = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = hook


def _first_line(error: Exception, limit: int = 200) -> str:
  """An error's type and first line, without tensorstore's spec dump, at most ``limit`` chars."""
  text = str(error).strip()
  line = text.splitlines()[0].split(" See full TensorStore details")[0] if text else ""
  line = f"{type(error).__name__}: {line}".strip()
  return line if len(line) <= limit else line[:limit - 3] + "..."


class MetricsLog:
  """One JSON object per logged step in ``metrics.jsonl`` and a line on stdout.

  A resumed run replays the steps after its checkpoint; their records from the interrupted run
  (steps > ``resume_step``) are dropped when the log is opened, so each step is logged once.
  """

  def __init__(self, path: str, resume_step: int = 0):
    _drop_records_after(path, resume_step)
    self.file = open(path, "a")

  def write(self, record: dict[str, Any], echo: Callable[[str], None]) -> None:
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    fields = []
    for k, v in record.items():
      fields.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    echo(" ".join(fields))

  def close(self) -> None:
    self.file.close()


def _drop_records_after(path: str, step: int) -> None:
  """Rewrites ``path`` (atomically) without the records of steps after ``step``, and without a
  partial last line a killed run left; other lines are kept as they are."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.read().splitlines(keepends=True)
  kept = []
  for number, line in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines) - 1:
        continue  # the partial line of a killed write
      kept.append(line)
      continue
    if not (isinstance(record, dict) and isinstance(record.get("step"), int)
            and record["step"] > step):
      kept.append(line if line.endswith("\n") else line + "\n")
  if kept != lines:
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def export(layout: ParamLayout, params: dict[str, jax.Array], directory: str,
           tokenizer_file: str) -> None:
  """Writes the weights (in the model's dtype) as a Hugging Face checkpoint, with the run's
  tokenizer, loadable by mage_jax.checkpoint.load_pretrained and transformers."""
  hf_checkpoint.save_pretrained(layout.model(params), directory)
  shutil.copy(tokenizer_file, os.path.join(directory, data_lib.TOKENIZER_FILE))


def train(cfg: TrainConfig, mode: str, *, stop_at_step: int | None = None,
          max_seconds: float | None = None, mesh: Mesh | None = None) -> list[dict]:
  """Runs (or resumes, from the newest checkpoint in the workdir) a training run.

  Args:
    cfg: the run's configuration.
    mode: "pretrain" or "selfdistill".
    stop_at_step: stop after this step (checkpointed) as a time-boxed job would, leaving the
      run resumable; None runs to ``cfg.steps``.
    max_seconds: stop (checkpointed, resumable) after the first step that ends later than this
      many seconds after the loop starts; None: no time limit.
    mesh: a ("data", "model") mesh to train on (docs/sharding.md); None: one device.

  Returns:
    The metrics of every step this call ran (floats), in order.

  Raises:
    ConfigError: an inconsistent configuration or unreadable input.
    TrainingDiverged: a non-finite loss; the newest checkpoint is the last good state.
  """
  init = initial_model(cfg)
  model_cfg = init.config
  cfg.validate(model_cfg, mode)
  os.makedirs(cfg.workdir, exist_ok=True)
  tokenizer = data_lib.load_tokenizer(cfg.data, model_cfg, cfg.seq_len, cfg.workdir)
  dataset = data_lib.PackedData(cfg.data, model_cfg, cfg.seq_len, tokenizer)
  layout = ParamLayout(model_cfg)
  init_params = layout.flatten(init)
  del init
  tx, schedule = make_optimizer(cfg.optim, cfg.steps)
  teacher_params = None
  if mode == "selfdistill":
    dtype = jnp.dtype(model_cfg.dtype)
    # A copy even when the dtypes agree: the state's buffers are donated to every step.
    teacher_params = {k: jnp.array(v, dtype, copy=True) for k, v in init_params.items()}

  fresh = initial_state(init_params, tx, cfg.seed)
  try:  # a mesh the model or the batch does not divide is a configuration error
    step_fn = make_train_step(cfg, mode, layout, tx, schedule, mesh)
    if mesh is not None:
      shardings = state_shardings(layout, tx, mesh)
      fresh = jax.device_put(fresh, shardings)  # restored checkpoints take this layout too
      if teacher_params is not None:
        teacher_params = jax.device_put(teacher_params, shardings.params)
  except ValueError as e:
    raise ConfigError(f"--mesh: {e}") from e
  ckpt = Checkpoints(os.path.join(cfg.workdir, "checkpoints"), cfg.checkpoint.every,
                     cfg.checkpoint.max_to_keep, cfg.checkpoint.async_save)
  try:
    restored = ckpt.restore_newest_intact(
        jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh), print)
  except ConfigError:
    ckpt.close()
    raise
  if restored is None:
    state = fresh
  else:
    state, meta = restored
    if meta.get("mode") != mode:
      ckpt.close()
      raise ConfigError(f"workdir {cfg.workdir} holds a {meta.get('mode')} run, not {mode}")
    print(f"resumed from step {int(state.step)} ({ckpt.directory})")
  del fresh

  micro, accum = cfg.optim.batch_size, cfg.optim.grad_accum
  tokens_per_step = accum * micro * cfg.seq_len
  start = int(state.step)
  end = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)
  log = MetricsLog(os.path.join(cfg.workdir, "metrics.jsonl"), resume_step=start)
  bar = tqdm.tqdm(total=cfg.steps, initial=start, desc=mode, disable=not cfg.progress_bar,
                  file=sys.stderr, dynamic_ncols=True)
  history = []
  interval = {"start": time.perf_counter(), "steps": 0}
  deadline = None if max_seconds is None else time.monotonic() + max_seconds

  def finish_step(done: int, metrics_on_device: dict[str, jax.Array], last: bool) -> None:
    """Fetches a step's metrics (the next step is already queued), checks, logs them."""
    metrics = {k: float(v) for k, v in jax.device_get(metrics_on_device).items()}
    if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
      ckpt.manager.wait_until_finished()
      good = ckpt.latest_step()
      raise TrainingDiverged(
          f"non-finite loss {metrics['loss']} (grad norm {metrics['grad_norm']}) at step "
          f"{done}: training stopped; last good checkpoint: "
          f"{'none' if good is None else f'step {good}'} in {ckpt.directory}")
    history.append(metrics)
    bar.update(1)
    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
    interval["steps"] += 1
    if done % cfg.log_every == 0 or last:
      elapsed = time.perf_counter() - interval["start"]
      log.write({"step": done, **metrics,
                 "tokens_per_s": interval["steps"] * tokens_per_step / elapsed,
                 **_memory_stats()}, bar.write)
      interval.update(start=time.perf_counter(), steps=0)

  batches = data_lib.prefetch_batches(dataset, range(start, end), micro, accum,
                                      workers=cfg.data.workers)
  pending = None  # (step number, metrics) of the step whose metrics are not fetched yet
  try:
    for step, batch in zip(range(start, end), batches):
      state, metrics = step_fn(state, jnp.asarray(batch), teacher_params)
      done = step + 1
      # Metrics are fetched one step late, so the host never waits for the device between
      # steps. A non-finite step leaves the state untouched (see make_train_step), so the one
      # step dispatched after it changes nothing that is kept: the run stops before saving.
      if pending is not None:
        finish_step(*pending, last=False)
      last = done == end or (deadline is not None and time.monotonic() > deadline)
      pending = (done, metrics)
      if cfg.probe_every and (done % cfg.probe_every == 0 or last):
        probes = probe_lib.run_probes(layout.model(state.params), tokenizer,
                                      context=cfg.probe_context, impl=cfg.attention_impl)
        log.write({"step": done, **probes}, bar.write)
      if last or done % cfg.checkpoint.every == 0:
        finish_step(*pending, last=last)
        pending = None
        ckpt.save(state, {"mode": mode, "step": done,
                          "data_position": int(state.data_position), "config": to_dict(cfg)})
      if last:
        end = done
        break
  finally:
    batches.close()
    bar.close()
    log.close()
    ckpt.close()
  if cfg.export_dir and end == cfg.steps:
    export(layout, state.params, cfg.export_dir,
           os.path.join(cfg.workdir, data_lib.TOKENIZER_FILE))
  return history
