"""The training loop: optimizer, jitted step, orbax checkpoints, logging, export.

Precision: the trainable weights live in float32 (``TrainState.params``, the master copy the
optimizer updates and its float32 moments); each forward casts them to the model's dtype
(bfloat16 for the real models), so matmuls run in bf16 and gradients come back in float32
through the cast. Softmax, norms, logits and losses are float32 inside the model. Weights
outside the trainable subset (``trainable`` = attention or lora) stay in the model's dtype,
with no gradient and no optimizer state (``FrozenWeights``).

One step = ``grad_accum`` micro-batches scanned inside one jit (their float32 gradients
averaged) then one AdamW update, so the step counter, the LR schedule, the data position and
the PRNG stream (fold_in(run key, step)) all advance together and a checkpoint restores them
exactly. A step whose loss or gradient norm is not finite leaves the state untouched; the loop
then stops before any save, so the last checkpoint on disk is the last good state.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
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
from mage_jax import lora as lora_lib
from mage_jax import sharding
from mage_jax.config import ModelConfig
from mage_jax.lora import LoraConfig
from mage_jax.model import Transformer, build_model
from pallas_kernels.dispatch import use_kernels
from train import data as data_lib
from train import objective
from train import probe as probe_lib
from train.config import TRAINABLE, ConfigError, OptimConfig, TrainConfig, to_dict


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient norm stopped the run."""


class TrainState(NamedTuple):
  """Everything a checkpoint restores.

  Attributes:
    step: int32 scalar, optimizer steps completed.
    params: float32 master weights of the trainable subset by dotted name
      (``layers.0.mlp.gate_up_proj.kernel``; LoRA: ``layers.0.self_attn.q_proj.lora.lora_a``).
    opt_state: the optax state of ``params``.
    rng: uint32 key data of the run's PRNG key; step s uses fold_in(key, s).
    data_position: int32 scalar, packed sequences consumed (step * global batch).
  """

  step: jax.Array
  params: dict[str, jax.Array]
  opt_state: Any
  rng: jax.Array
  data_position: jax.Array


class FrozenWeights(NamedTuple):
  """The weights a step reads and never updates, in the model's dtype (the step's third
  argument, not donated; rebuilt from the initial model on resume, never checkpointed).

  Attributes:
    shared: the base weights outside the trainable subset (all of them under LoRA), read by the
      student and by MAGE-FT's exact teacher alike: one copy for both.
    teacher: MAGE-FT: the initial values of the trainable base weights (the teacher is the
      initial model; under LoRA it is ``shared`` alone, the adapters off, so this is empty).
      Empty in pretraining.
  """

  shared: dict[str, jax.Array]
  teacher: dict[str, jax.Array]


class ParamLayout:
  """The trainable float32 weights and the frozen ones <-> a Transformer in the model's dtype.

  Flat string-keyed dicts are what optax, orbax and the logs handle best; the model's graph is
  built once, abstractly (with LoRA adapters on its target projections under trainable =
  "lora"), and re-filled with cast weights inside every forward. Names are
  ``mage_jax.lora.param_name``s: base weights keep the plain model's names in every subset, so
  the teacher and the export read the same dicts as the student.

  Attributes:
    trainable: "all", "attention" or "lora" (train.config.TRAINABLE).
    lora: the adapters' configuration under "lora", else None.
    trainable_names, frozen_names: the two parts of the student's weights, in graph order.
  """

  def __init__(self, cfg: ModelConfig, trainable: str = "all", lora: LoraConfig | None = None):
    if trainable not in TRAINABLE:
      raise ValueError(f"trainable: must be one of {TRAINABLE}, got {trainable!r}")
    self.config = cfg
    self.trainable = trainable
    self.lora = (lora or LoraConfig()) if trainable == "lora" else None
    plain = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    self.plain_graphdef, state = nnx.split(plain)
    self.plain_variables = list(nnx.to_flat_state(state))
    if self.lora is None:
      self.graphdef, self.variables = self.plain_graphdef, self.plain_variables
    else:
      adapted = nnx.eval_shape(lambda: lora_lib.attach(
          Transformer(cfg, rngs=nnx.Rngs(0)), self.lora, rngs=nnx.Rngs(0)))
      self.graphdef, state = nnx.split(adapted)
      self.variables = list(nnx.to_flat_state(state))
    self.trainable_names = [self.name(p) for p, v in self.variables if self._trains(p, v)]
    self.frozen_names = [self.name(p) for p, v in self.variables if not self._trains(p, v)]

  def _trains(self, path: tuple, variable) -> bool:
    if self.trainable == "lora":
      return isinstance(variable, nnx.LoRAParam)
    if self.trainable == "attention":
      return "self_attn" in path
    return True

  @staticmethod
  def name(path: tuple) -> str:
    return lora_lib.param_name(path)

  def flatten(self, model: Transformer) -> dict[str, jax.Array]:
    """Every weight of a plain model in float32, by name."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {self.name(p): v.get_value().astype(jnp.float32) for p, v in flat}

  def split(self, model: Transformer, seed: int) -> tuple[dict[str, jax.Array],
                                                          dict[str, jax.Array]]:
    """(float32 trainable weights, frozen weights in the model's dtype) of a plain initial model.

    Under LoRA the adapters start as nnx.LoRA initialises them (a from ``seed``, b zero: the
    adapted model starts exactly as ``model``); ``model`` is wrapped in place, so pass one that
    is not needed afterwards."""
    if self.lora is not None:
      lora_lib.attach(model, self.lora, rngs=nnx.Rngs(params=seed))
    values = {self.name(p): v.get_value()
              for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return ({n: values[n].astype(jnp.float32) for n in self.trainable_names},
            {n: values[n] for n in self.frozen_names})

  def teacher_weights(self, params: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """FrozenWeights.teacher from the initial trainable weights: copies in the model's dtype of
    those that are base weights (a copy even when the dtypes agree: the state's buffers are
    donated to every step)."""
    dtype = jnp.dtype(self.config.dtype)
    return {k: jnp.array(v, dtype, copy=True) for k, v in params.items()
            if not lora_lib.is_adapter_name(k)}

  def abstract_params(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The trainable master copy's names, shapes and dtype, without allocating it."""
    shapes = {self.name(p): v.get_value().shape for p, v in self.variables}
    return {n: jax.ShapeDtypeStruct(shapes[n], jnp.float32) for n in self.trainable_names}

  def abstract_frozen(self, mode: str) -> FrozenWeights:
    """FrozenWeights' names, shapes and dtype for ``mode``, without allocating them."""
    dtype = jnp.dtype(self.config.dtype)
    shapes = {self.name(p): v.get_value().shape for p, v in self.variables}
    shared = {n: jax.ShapeDtypeStruct(shapes[n], dtype) for n in self.frozen_names}
    teacher = {}
    if mode == "selfdistill":
      teacher = {n: jax.ShapeDtypeStruct(shapes[n], dtype) for n in self.trainable_names
                 if not lora_lib.is_adapter_name(n)}
    return FrozenWeights(shared, teacher)

  def _merge(self, graphdef, variables, values: dict[str, jax.Array]) -> Transformer:
    dtype = jnp.dtype(self.config.dtype)
    state = nnx.from_flat_state(
        [(p, v.replace(values[self.name(p)].astype(dtype))) for p, v in variables])
    return nnx.merge(graphdef, state)

  def model(self, params: dict[str, jax.Array], frozen: dict[str, jax.Array]) -> Transformer:
    """The student: trainable weights cast to the model's dtype, frozen ones as they are."""
    return self._merge(self.graphdef, self.variables, {**frozen, **params})

  def teacher_model(self, frozen: FrozenWeights) -> Transformer:
    """MAGE-FT's teacher, the initial model: the shared frozen weights plus the teacher's own."""
    return self._merge(self.plain_graphdef, self.plain_variables,
                       {**frozen.shared, **frozen.teacher})

  def export_model(self, params: dict[str, jax.Array],
                   frozen: dict[str, jax.Array]) -> Transformer:
    """The trained weights as a plain model (adapters merged into their kernels)."""
    return lora_lib.merge(self.model(params, frozen))


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


def _param_shardings(shapes: dict[str, tuple[int, ...]], mesh: Mesh) -> dict[str, NamedSharding]:
  """Base weights by the parameter rules of mage_jax.sharding; LoRA adapters (a few MB)
  replicated."""
  replicated = NamedSharding(mesh, P())
  base = sharding.named_param_shardings(
      {k: v for k, v in shapes.items() if not lora_lib.is_adapter_name(k)}, mesh)
  return {k: base.get(k, replicated) for k in shapes}


def state_shardings(layout: ParamLayout, tx: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
  """Where every part of the train state lives: the master weights and the optimizer moments by
  the parameter rules of mage_jax.sharding (heads, MLP hidden and vocabulary over "model",
  replicated over "data": no FSDP, see docs/sharding.md), counters and keys replicated."""
  abstract = jax.eval_shape(lambda: initial_state(layout.abstract_params(), tx, 0))
  params = _param_shardings({k: v.shape for k, v in abstract.params.items()}, mesh)
  replicated = NamedSharding(mesh, P())
  return TrainState(step=replicated, params=params,
                    opt_state=sharding.shardings_like_params(abstract.opt_state, params, mesh),
                    rng=replicated, data_position=replicated)


def frozen_shardings(layout: ParamLayout, mode: str, mesh: Mesh) -> FrozenWeights:
  """The frozen weights' layout: the parameter rules, as for the master weights."""
  return jax.tree.map(lambda part: _param_shardings({k: v.shape for k, v in part.items()}, mesh),
                      layout.abstract_frozen(mode), is_leaf=lambda x: isinstance(x, dict))


def make_train_step(cfg: TrainConfig, mode: str, layout: ParamLayout,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh | None = None) -> Callable:
  """The jitted step: (state, tokens [accum, micro, L], FrozenWeights) -> (state, metrics).

  Gradients, the optimizer state and the update cover ``state.params`` (the trainable subset)
  only. With a ``mesh`` the state and the frozen weights must be laid out by
  ``state_shardings`` / ``frozen_shardings`` (the step keeps them there) and the micro-batches
  are split over "data"."""
  model_cfg = layout.config
  num_views = 2 if cfg.complementary else 1
  mage = cfg.mage
  if mesh is not None:
    shardings = state_shardings(layout, tx, mesh)
    tokens_sharding = sharding.checked_sharding(
        mesh, "training micro-batch", (cfg.optim.grad_accum, cfg.optim.batch_size, cfg.seq_len),
        (None, "batch", "seq"))

  def micro_loss(params, frozen_shared, views, selections, teacher_states, teacher,
                 kl_weight=mage.kl_weight, views_per_sequence=num_views):
    model = layout.model(params, frozen_shared)
    if mode == "pretrain":
      return objective.pretrain_loss(model, views, chunk=cfg.loss_chunk, remat=cfg.remat)
    return objective.selfdistill_loss(
        model, teacher, views, selections, teacher_states, kl_weight=kl_weight,
        chunk=cfg.loss_chunk, remat=cfg.remat, selection_weight=mage.selection_weight,
        alpha_includes_block=mage.alpha_includes_block, score_chunk=mage.score_chunk,
        num_views=views_per_sequence)

  def view_by_view(params, frozen_shared, views, selections, teacher_states, teacher):
    """micro_loss's value and gradient with the complementary views run one after the other
    (a scan: one view's activations live at a time). Every view scores the same number of
    tokens, so the CE is the views' mean; the KL averages over all views' masked tokens, so each
    view's KL is weighted by its share of them (masked and scored: position 0 is not scored
    under token shift, see objective.predicting_hidden). The selection loss is a mean over the
    view's rows, the same count in every view, so the views' mean is the joint one (each view
    runs its own All-[MASK] pass: its gradient is taken apart from the other's)."""
    per_view = lambda x: x.reshape((num_views, x.shape[0] // num_views) + x.shape[1:])
    masked = views.masked[:, 1:] if model_cfg.token_shift else views.masked
    kl_tokens = jnp.maximum(jnp.sum(per_view(masked), axis=(1, 2)), 1).astype(jnp.float32)
    kl_share = kl_tokens / jnp.maximum(jnp.sum(per_view(masked)), 1)
    xs = jax.tree.map(per_view, (views, selections, teacher_states))

    def one_view(grad_sum, x):
      (view, view_selections, view_teacher_states), share = x
      (_, metrics), grads = jax.value_and_grad(micro_loss, has_aux=True)(
          params, frozen_shared, view, view_selections, view_teacher_states,
          teacher, mage.kl_weight * share * num_views, 1)
      metrics["kl"] = metrics["kl"] * share * num_views
      return jax.tree.map(lambda a, g: a + g / num_views, grad_sum, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, metrics = jax.lax.scan(one_view, zeros, (xs, kl_share))
    return jax.tree.map(jnp.mean, metrics), grads

  def step(state: TrainState, tokens: jax.Array, frozen: FrozenWeights):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    teacher = layout.teacher_model(frozen) if mode == "selfdistill" else None

    def accumulate(grad_sum, xs):
      micro_tokens, micro_key = xs
      views = objective.noise_views(
          micro_key, micro_tokens, block_size=model_cfg.block_size,
          mask_id=model_cfg.mask_token_id, eps=cfg.noise_eps, complementary=cfg.complementary)
      selections = teacher_states = None
      if mode == "selfdistill":
        selections = objective.select_keys(
            layout.model(state.params, frozen.shared), views, budget=mage.budget,
            dense_layers=mage.dense_layers, selection_queries=mage.selection_queries,
            alpha_includes_block=mage.alpha_includes_block, score_chunk=mage.score_chunk,
            num_views=num_views)
        teacher_states = objective.teacher_states(
            teacher, views,
            selection_dense_layers=mage.dense_layers if mage.selection_weight > 0 else None)
      if cfg.split_views:
        metrics, grads = view_by_view(state.params, frozen.shared, views, selections,
                                      teacher_states, teacher)
      else:
        (_, metrics), grads = jax.value_and_grad(micro_loss, has_aux=True)(
            state.params, frozen.shared, views, selections, teacher_states, teacher)
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

  def step_with_kernels(state: TrainState, tokens: jax.Array, teacher_params):
    with use_kernels(cfg.attention_impl):  # traced once per step function: one setting
      return step(state, tokens, teacher_params)

  jitted = jax.jit(step_with_kernels, donate_argnums=0)
  if mesh is None:
    return jitted

  def sharded_step(state: TrainState, tokens, frozen: FrozenWeights):
    with jax.set_mesh(mesh):
      return jitted(state, jax.device_put(tokens, tokens_sharding), frozen)

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

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON meta of a step alone (the state is not read)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def read_newest_meta(self) -> dict[str, Any] | None:
    """The meta of the newest checkpoint whose meta reads; None if there is none."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      with _quiet_abandoned_reads():
        try:
          return self.read_meta(step)
        except Exception:  # an unreadable step: restore_newest_intact names and moves it
          continue
    return None

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
    _close_abandoned_reads()
    sys.unraisablehook = hook


def _close_abandoned_reads() -> None:
  """Closes orbax's read coroutines that a failed restore left suspended. The event loop that
  holds them may outlive this process's use of them; finalised later (at exit, say), each would
  print "Exception ignored in: <coroutine ...>" with a traceback, after a one-line error."""
  for obj in gc.get_objects():
    if (inspect.iscoroutine(obj) and obj.cr_frame is not None and not obj.cr_running
        and obj.cr_code.co_name == "_read_array_index_and_device_put"):
      try:
        obj.close()
      except BaseException:  # pylint: disable=broad-except  (orbax re-raises GeneratorExit)
        pass


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


ADAPTER_DIR = "adapter"  # export_dir's subdirectory for the LoRA adapters alone


def export(layout: ParamLayout, params: dict[str, jax.Array], frozen: dict[str, jax.Array],
           directory: str, tokenizer_file: str, source: str | None = None,
           max_shard_bytes: int | None = None) -> None:
  """Writes the trained weights (in the model's dtype; LoRA adapters merged into their kernels)
  as a Hugging Face checkpoint with the run's tokenizer, loadable by
  mage_jax.checkpoint.load_pretrained and transformers.

  With ``source`` (the checkpoint directory the run started from) the weights go into the
  source's own files under its own tensor names, beside copies of its other files
  (checkpoint.save_pretrained_like); without, or with ``max_shard_bytes`` (a per-file limit the
  source's layout need not meet), into a fresh Qwen2 / Qwen3 layout in shard files of at most
  that size. Under LoRA the adapters alone also go, PEFT-style and in float32, to
  ``directory/adapter``: a subdirectory, because transformers reads a directory holding
  adapter_config.json as an adapter only."""
  model = layout.export_model(params, frozen)
  if source is None or max_shard_bytes is not None:
    hf_checkpoint.save_pretrained(model, directory, max_shard_bytes=max_shard_bytes)
  else:
    hf_checkpoint.save_pretrained_like(model, directory, source)
  if layout.lora is not None:
    hf_checkpoint.save_adapter(os.path.join(directory, ADAPTER_DIR), params, layout.lora,
                               base_model=source or "")
  shutil.copy(tokenizer_file, os.path.join(directory, data_lib.TOKENIZER_FILE))


def trainable_mismatch(meta: dict[str, Any] | None, cfg: TrainConfig) -> str | None:
  """Why a checkpoint (its meta; None: no checkpoint) cannot resume under ``cfg``'s trainable
  subset, or None.

  Another subset has other master weights and optimizer moments: resuming would drop or
  invent state. Checkpoints from before the subsets trained everything."""
  if meta is None:
    return None
  saved = meta.get("config", {})
  saved_trainable = saved.get("trainable", "all")
  before = (saved_trainable, saved.get("lora") if saved_trainable == "lora" else None)
  now = (cfg.trainable, to_dict(cfg)["lora"] if cfg.trainable == "lora" else None)
  if before == now:
    return None
  describe = lambda t, l: t if l is None else f"{t} {json.dumps(l, sort_keys=True)}"
  return (f"its checkpoints train trainable = {describe(*before)}, not {describe(*now)}; "
          f"resume with the same subset or start a new workdir")


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
  layout = ParamLayout(model_cfg, cfg.trainable, cfg.lora)
  init_params, shared = layout.split(init, cfg.init_seed)
  del init
  tx, schedule = make_optimizer(cfg.optim, cfg.steps)
  frozen = FrozenWeights(
      shared, layout.teacher_weights(init_params) if mode == "selfdistill" else {})

  fresh = initial_state(init_params, tx, cfg.seed)
  try:  # a mesh the model or the batch does not divide is a configuration error
    step_fn = make_train_step(cfg, mode, layout, tx, schedule, mesh)
    if mesh is not None:
      shardings = state_shardings(layout, tx, mesh)
      fresh = jax.device_put(fresh, shardings)  # restored checkpoints take this layout too
      frozen = jax.device_put(frozen, frozen_shardings(layout, mode, mesh))
  except ValueError as e:
    raise ConfigError(f"--mesh: {e}") from e
  ckpt = Checkpoints(os.path.join(cfg.workdir, "checkpoints"), cfg.checkpoint.every,
                     cfg.checkpoint.max_to_keep, cfg.checkpoint.async_save)
  try:
    # Another trainable subset has another state tree: refuse it before any restore, which
    # would fail on it and mistake a good checkpoint for a broken one.
    refusal = trainable_mismatch(ckpt.read_newest_meta(), cfg)
    if refusal is not None:
      raise ConfigError(f"workdir {cfg.workdir}: {refusal}")
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
      state, metrics = step_fn(state, jnp.asarray(batch), frozen)
      done = step + 1
      # Metrics are fetched one step late, so the host never waits for the device between
      # steps. A non-finite step leaves the state untouched (see make_train_step), so the one
      # step dispatched after it changes nothing that is kept: the run stops before saving.
      if pending is not None:
        finish_step(*pending, last=False)
      last = done == end or (deadline is not None and time.monotonic() > deadline)
      pending = (done, metrics)
      if cfg.probe_every and (done % cfg.probe_every == 0 or last):
        with use_kernels(cfg.attention_impl):
          probes = probe_lib.run_probes(layout.model(state.params, frozen.shared), tokenizer,
                                        context=cfg.probe_context)
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
    export(layout, state.params, frozen.shared, cfg.export_dir,
           os.path.join(cfg.workdir, data_lib.TOKENIZER_FILE),
           source=cfg.model if os.path.isdir(cfg.model) else None,
           max_shard_bytes=cfg.export_max_shard_bytes)
  return history
