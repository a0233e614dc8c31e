"""Training configuration: frozen dataclasses read from one JSON file plus command-line overrides.

The JSON mirrors the dataclasses section by section (``optim``, ``mage``, ``data``,
``checkpoint``); unknown keys are errors, so a typo never silently falls back to a default.
Overrides use dotted paths with JSON values (``optim.learning_rate=1e-4``, ``data.seed=3``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any, Mapping

from mage_jax.config import ModelConfig
from mage_jax.lora import LoraConfig
from mage_jax.tasks import haystack, niah

MODES = ("pretrain", "selfdistill")
# What the optimizer updates (train.trainer.ParamLayout): every weight, the attention layers'
# weights (q/k/v/o projections, their biases, Qwen3's q/k norms), or LoRA adapters only.
TRAINABLE = ("all", "attention", "lora")
# Synthetic training samples draw seeds from [TRAIN_SEED_OFFSET, ...): eval uses seeds below it,
# so no training sequence is ever an eval sample.
TRAIN_SEED_OFFSET = 10**6
SYNTHETIC_KINDS = ("niah", "ruler_niah_single", "ruler_niah_multikey", "ruler_niah_multivalue",
                   "ruler_niah_multiquery", "ruler_vt", "ruler_cwe", "niah_drill", "repeat")
# Word tokenizer: the longest digit group one token may hold (1110 number tokens at 3).
MAX_DIGITS_PER_TOKEN = 3


class ConfigError(ValueError):
  """A configuration problem, reported to the user as one line."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup then cosine decay to ``min_lr_ratio`` of the peak.

  ``grad_accum`` micro-batches of ``batch_size`` sequences make one optimizer step.
  """

  learning_rate: float = 3e-4
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  batch_size: int = 8
  grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class MageConfig:
  """MAGE-FT (selfdistill) settings.

  Attributes:
    budget: clean keys kept per noisy block and KV head (k).
    dense_layers: the first layers attend exactly (MAGE keeps two dense).
    kl_weight: lambda of L = CE + lambda * KL(p_sparse || p_exact); not published, 1 by default.
    selection_queries: "all_mask" selects from a fully masked block, as MAGE does at the first
      denoising step; "noisy" from the partially masked x_t the student trains on.
    alpha_includes_block: whether alpha's softmax includes the block's own keys (not published;
      match the inference method's setting).
    score_chunk: clean keys per step of the alpha computation (memory vs. loop length).
    selection_weight: weight of the selection-aware term (not in the paper; 0, the default,
      is the paper's objective and adds nothing to the step): per sparse layer, noisy block and
      KV head, KL(teacher's alpha of x_t || student's alpha of the All-[MASK] pass), both
      normalised over the block's clean keys, so the first step's top-k learns to rank keys by
      the mass the later steps attend (objective.selection_loss).
  """

  budget: int = 512
  dense_layers: int = 2
  kl_weight: float = 1.0
  selection_queries: str = "all_mask"
  alpha_includes_block: bool = True
  score_chunk: int = 256
  selection_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One data source of the mixture.

  ``kind`` is "files" (``paths``: .jsonl with a ``text`` field per line, or plain text with one
  document per blank-line-separated paragraph) or a synthetic task (niah, ruler_*) whose samples
  are generated at ``context_tokens`` (default: the training length minus the answer), or, with
  ``min_context_tokens``, at lengths drawn log-uniformly from [min_context_tokens,
  context_tokens] per document (short documents are packed several to a sequence, so the model
  learns retrieval at every distance and with other documents' needles as distractors).
  "niah_drill" documents hold 1..n needles (uniform per document; n = ``needles``, at most one
  per 64 prompt tokens), each asked and
  answered in the NIAH format after the prompt (mage_jax.tasks.niah.recall_drill_text): dense
  retrieval targets for a model learning to retrieve from scratch. "repeat" documents are a
  filler passage and its exact repetition (mage_jax.tasks.haystack.repeated_passage): copying
  practice, which makes a model from scratch form induction heads early; ``number_share`` of
  its items are ``number_digits``-digit numbers (copying digit strings exactly, as needle
  values need; default 7, the needle values' length). ``value_digits`` (low, high): the digit
  counts of niah_drill needle values, uniform per value (default (7, 7), the eval tasks').
  ``zero_depth_share``: the share of niah documents whose needle sits at depth 0, right after
  the task header, instead of at a uniform depth (default 0: uniform for all).
  """

  kind: str
  weight: float = 1.0
  paths: tuple[str, ...] = ()
  context_tokens: int | None = None
  min_context_tokens: int | None = None
  needles: int = 8
  number_share: float = 0.0
  number_digits: int = 7
  value_digits: tuple[int, int] = (7, 7)
  zero_depth_share: float = 0.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Sources, tokenizer and the data seed.

  ``tokenizer`` is a tokenizer.json path, or "word": a word-level tokenizer trained on the
  sources (``word_vocab_docs`` documents) with the model's vocab size and special ids, for the
  small models trained from scratch here. ``workers`` > 0 builds batches in that many processes
  (synthetic long documents cost ~0.1 s of Python per 4K tokens: one thread cannot feed a GPU);
  0 builds them on one background thread. Either way batch ``step`` is the same.
  ``vocab_sources``, when given, are what the word-level vocabulary is built from instead of
  ``sources``: a first curriculum stage on short documents of a few kinds still gets a
  vocabulary that covers every task the later stages and the evals use.
  ``digits_per_token`` (word tokenizer only): numbers split left to right into groups of up to
  this many digits, each group one token (1: one token per digit, as Qwen's tokenizer does; 3:
  as GPT-4's cl100k does, so a 7-digit needle value is 3 tokens); above 1, every group of 1 to
  ``digits_per_token`` digits is in the vocabulary.
  """

  sources: tuple[SourceConfig, ...] = (SourceConfig(kind="niah"),)
  vocab_sources: tuple[SourceConfig, ...] = ()
  tokenizer: str = "word"
  seed: int = 0
  word_vocab_docs: int = 64
  digits_per_token: int = 1
  workers: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 500
  max_to_keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run needs.

  Attributes:
    model: a preset name (mage_jax/presets/*.json), a model config.json path, or a Hugging Face
      checkpoint directory (weights are loaded from it).
    model_overrides: ModelConfig fields to replace (e.g. dtype, vocab_size).
    init_seed: seed of the random initialisation when ``model`` has no weights.
    workdir: checkpoints, tokenizer, metrics.jsonl.
    steps: optimizer steps of the whole run (the LR schedule spans them).
    seq_len: training length L (a multiple of the block size); each forward runs 2L tokens.
    noise_eps: t ~ U(eps, 1) per block (U(eps, 1 - eps) with complementary masking, so that the
      complementary view's 1 / (1 - t) weight stays bounded too).
    complementary: also train each sequence with the complementary mask (Fast-dLLM v2).
    remat: recompute each layer's activations in the backward pass.
    split_views: run the two complementary views as two passes, one after the other, instead
      of one pass over both (half the activations, the same loss and gradient; needs
      ``complementary``).
    loss_chunk: tokens per chunk of the LM head + loss (never [tokens, vocab] at once).
    attention_impl: the kernel setting of the run (pallas_kernels.dispatch; auto: the Pallas
      kernels on GPU, the plain-JAX paths elsewhere).
    log_every: steps between log lines.
    scaled_residual_init: a model built from scratch (a preset or config.json, not a checkpoint)
      starts its o_proj / down_proj at 0.02 / sqrt(2 * layers) (GPT-2; see build_model).
    probe_every: steps between runs of the retrieval probes (train.probe: copy and needle-digit
      accuracy on fresh documents of ``probe_context`` tokens), logged to metrics.jsonl; 0: off.
    export_dir: Hugging Face export of the final weights ("" for none): merged weights in the
      source checkpoint's own files and names when ``model`` is a checkpoint directory; under
      LoRA also the adapters alone, PEFT-style, in its ``adapter`` subdirectory.
    trainable: which weights train (``TRAINABLE``); the others stay in the model's dtype, one
      copy shared by the student and MAGE-FT's teacher, with no optimizer state.
    lora: the adapters' rank, alpha and target projections (trainable = "lora" only).
    export_max_shard_bytes: the export's weights in shard files of at most this many bytes each
      (mage_jax.checkpoint.save_pretrained); None: one model.safetensors.
  """

  model: str
  workdir: str
  steps: int
  seq_len: int
  model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  init_seed: int = 0
  seed: int = 0
  noise_eps: float = 1e-3
  complementary: bool = True
  remat: bool = True
  split_views: bool = False
  loss_chunk: int = 1024
  attention_impl: str = "auto"
  log_every: int = 10
  scaled_residual_init: bool = True
  probe_every: int = 0
  probe_context: int = 512
  progress_bar: bool = True
  export_dir: str = ""
  trainable: str = "all"
  lora: LoraConfig = LoraConfig()
  export_max_shard_bytes: int | None = None
  optim: OptimConfig = OptimConfig()
  mage: MageConfig = MageConfig()
  data: DataConfig = DataConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()

  def validate(self, model_cfg: ModelConfig, mode: str) -> None:
    """Raises ConfigError naming the first inconsistent field."""
    checks = [
        (mode in MODES, "mode", f"must be one of {MODES}, got {mode!r}"),
        (self.steps >= 1, "steps", f"must be >= 1, got {self.steps}"),
        (self.seq_len >= 1 and self.seq_len % model_cfg.block_size == 0, "seq_len",
         f"{self.seq_len} is not a positive multiple of block_size={model_cfg.block_size}"),
        (self.seq_len <= model_cfg.max_position_embeddings, "seq_len",
         f"{self.seq_len} exceeds max_position_embeddings={model_cfg.max_position_embeddings}"),
        (0 < self.noise_eps < 0.5, "noise_eps", f"must be in (0, 0.5), got {self.noise_eps}"),
        (self.loss_chunk >= 1, "loss_chunk", f"must be >= 1, got {self.loss_chunk}"),
        (self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}"),
        (self.probe_every >= 0, "probe_every", f"must be >= 0, got {self.probe_every}"),
        (self.probe_context >= 64, "probe_context",
         f"must be >= 64 (a needle prompt), got {self.probe_context}"),
        (self.optim.batch_size >= 1, "optim.batch_size", "must be >= 1"),
        (self.optim.grad_accum >= 1, "optim.grad_accum", "must be >= 1"),
        (self.optim.learning_rate > 0, "optim.learning_rate", "must be > 0"),
        (0 <= self.optim.warmup_steps, "optim.warmup_steps", "must be >= 0"),
        (0 <= self.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]"),
        (self.optim.clip_norm > 0, "optim.clip_norm", "must be > 0"),
        (self.mage.budget >= 1, "mage.budget", "must be >= 1"),
        (0 <= self.mage.dense_layers <= model_cfg.num_layers, "mage.dense_layers",
         f"must be in [0, {model_cfg.num_layers}], got {self.mage.dense_layers}"),
        (self.mage.kl_weight >= 0, "mage.kl_weight", "must be >= 0"),
        (self.mage.selection_queries in ("all_mask", "noisy"), "mage.selection_queries",
         f"must be all_mask or noisy, got {self.mage.selection_queries!r}"),
        (self.mage.score_chunk >= 1, "mage.score_chunk", "must be >= 1"),
        (self.mage.selection_weight >= 0, "mage.selection_weight",
         f"must be >= 0, got {self.mage.selection_weight}"),
        (len(self.data.sources) >= 1, "data.sources", "needs at least one source"),
        (self.data.workers >= 0, "data.workers", f"must be >= 0, got {self.data.workers}"),
        (1 <= self.data.digits_per_token <= MAX_DIGITS_PER_TOKEN, "data.digits_per_token",
         f"must be in [1, {MAX_DIGITS_PER_TOKEN}], got {self.data.digits_per_token}"),
        (self.data.digits_per_token == 1 or self.data.tokenizer == "word",
         "data.digits_per_token", "applies to the word tokenizer (data.tokenizer = \"word\") only; "
         f"got data.tokenizer = {self.data.tokenizer!r}, whose file fixes how digits split"),
        (0 <= self.data.seed < TRAIN_SEED_OFFSET, "data.seed",
         f"must be in [0, {TRAIN_SEED_OFFSET}) (synthetic seeds are data.seed + "
         f"{TRAIN_SEED_OFFSET})"),
        (self.export_max_shard_bytes is None or self.export_max_shard_bytes >= 1,
         "export_max_shard_bytes", f"must be >= 1, got {self.export_max_shard_bytes}"),
        (self.checkpoint.every >= 1, "checkpoint.every", "must be >= 1"),
        (self.checkpoint.max_to_keep >= 1, "checkpoint.max_to_keep", "must be >= 1"),
        (not self.split_views or self.complementary, "split_views",
         "needs complementary = true (one view has nothing to split)"),
        (self.trainable in TRAINABLE, "trainable",
         f"must be one of {TRAINABLE}, got {self.trainable!r}"),
        (self.trainable == "lora" or self.lora == LoraConfig(), "lora",
         f"applies to trainable = \"lora\" only, got trainable = {self.trainable!r}"),
    ]
    for source in self.data.sources + self.data.vocab_sources:
      checks += [
          (source.kind == "files" or source.kind in SYNTHETIC_KINDS, "data.sources.kind",
           f"unknown kind {source.kind!r}; expected files or one of {SYNTHETIC_KINDS}"),
          (source.weight > 0, "data.sources.weight", f"must be > 0, got {source.weight}"),
          (1 <= source.needles <= len(niah.all_keys()), "data.sources.needles",
           f"must be in [1, {len(niah.all_keys())}] (distinct needle keys), "
           f"got {source.needles}"),
          (0.0 <= source.number_share <= 1.0, "data.sources.number_share",
           f"must be in [0, 1], got {source.number_share}"),
          (source.number_share == 0.0 or source.kind == "repeat", "data.sources.number_share",
           f"applies to repeat sources only, not {source.kind}"),
          (1 <= source.number_digits <= haystack.MAX_NUMBER_DIGITS,
           "data.sources.number_digits",
           f"must be in [1, {haystack.MAX_NUMBER_DIGITS}], got {source.number_digits}"),
          (0.0 <= source.zero_depth_share <= 1.0, "data.sources.zero_depth_share",
           f"must be in [0, 1], got {source.zero_depth_share}"),
          (source.zero_depth_share == 0.0 or source.kind == "niah",
           "data.sources.zero_depth_share", f"applies to niah sources only, not {source.kind}"),
          (_valid_value_digits(source.value_digits), "data.sources.value_digits",
           f"must be [low, high] with 1 <= low <= high <= {haystack.MAX_NUMBER_DIGITS}, "
           f"got {list(source.value_digits)}"),
          (tuple(source.value_digits) == (7, 7) or source.kind == "niah_drill",
           "data.sources.value_digits", f"applies to niah_drill sources only, not {source.kind}"),
          (source.kind != "files" or source.paths, "data.sources.paths",
           "a files source needs paths"),
          (source.min_context_tokens is None or source.min_context_tokens >= 1,
           "data.sources.min_context_tokens", f"must be >= 1, got {source.min_context_tokens}"),
          (source.min_context_tokens is None or source.min_context_tokens
           <= (source.context_tokens or self.seq_len), "data.sources.min_context_tokens",
           f"{source.min_context_tokens} exceeds the source's context length "
           f"{source.context_tokens or self.seq_len}"),
      ]
    for ok, field, why in checks:
      if not ok:
        raise ConfigError(f"{field}: {why}")
    if self.trainable == "lora":
      try:
        self.lora.check(model_cfg)
      except ValueError as e:
        raise ConfigError(str(e)) from e


def _valid_value_digits(value_digits) -> bool:
  try:
    niah.check_value_digits(value_digits)
  except (TypeError, ValueError):
    return False
  return True


def _convert(value: Any, annotation: Any, where: str) -> Any:
  """JSON value -> the dataclass field type (nested dataclasses, tuples, optionals)."""
  origin = typing.get_origin(annotation)
  if dataclasses.is_dataclass(annotation):
    if not isinstance(value, Mapping):
      raise ConfigError(f"{where}: expected an object, got {value!r}")
    return _build(annotation, value, where)
  if origin in (typing.Union, types.UnionType):
    if value is None:
      return None
    (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _convert(value, inner, where)
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where}: expected a list, got {value!r}")
    inner = typing.get_args(annotation)[0]
    return tuple(_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
  if annotation is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  expected = origin or annotation
  if expected is not Any and not isinstance(value, expected) or (
      expected in (int, float) and isinstance(value, bool)):
    raise ConfigError(f"{where}: expected {getattr(expected, '__name__', expected)}, "
                      f"got {value!r}")
  return value


def _build(cls, values: Mapping[str, Any], where: str = ""):
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(f"{where or 'config'}: unknown field {unknown[0]!r}; known: "
                      f"{', '.join(fields)}")
  missing = [n for n, f in fields.items() if n not in values and
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ConfigError(f"{where or 'config'}: missing required field {missing[0]!r}")
  return cls(**{k: _convert(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in values.items()})


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
  """Sets dotted paths (``optim.learning_rate``) in a copy of the raw JSON dictionary."""
  raw = json.loads(json.dumps(raw))
  for path, value in overrides.items():
    node = raw
    *parents, leaf = path.split(".")
    for key in parents:
      node = node.setdefault(key, {})
      if not isinstance(node, dict):
        raise ConfigError(f"override {path}: {key} is not a section")
    node[leaf] = value
  return raw


def parse_override(text: str) -> tuple[str, Any]:
  """``key.path=value`` with a JSON value (bare words are strings)."""
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise ConfigError(f"--set {text!r}: expected key.path=value")
  try:
    return key, json.loads(value)
  except json.JSONDecodeError:
    return key, value


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] = ()) -> TrainConfig:
  """Reads the JSON file, applies the overrides, returns the validated structure."""
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"cannot read training config {os.fspath(path)}: {e}") from e
  if not isinstance(raw, dict):
    raise ConfigError(f"training config {os.fspath(path)} must hold a JSON object")
  return from_dict(apply_overrides(raw, dict(overrides)))


def from_dict(raw: Mapping[str, Any]) -> TrainConfig:
  cfg = _build(TrainConfig, raw)
  check_model_overrides(cfg.model_overrides)
  return cfg


def check_model_overrides(overrides: Mapping[str, Any]) -> None:
  """Raises ConfigError naming an unknown ``model_overrides`` key or a bad RoPE / position value.

  These two change a loaded checkpoint's positions when a run extends its context (the
  long-context stages raise rope_theta and max_position_embeddings); the exported config.json
  carries the new values.
  """
  fields = [f.name for f in dataclasses.fields(ModelConfig)]
  for key, value in overrides.items():
    if key not in fields:
      raise ConfigError(f"model_overrides: unknown field {key!r}; known: {', '.join(fields)}")
  theta = overrides.get("rope_theta", 1.0)
  if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (
      math.isfinite(theta) and theta > 0):
    raise ConfigError(f"model_overrides.rope_theta: must be a finite number > 0, got {theta!r}")
  positions = overrides.get("max_position_embeddings", 1)
  if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
    raise ConfigError(f"model_overrides.max_position_embeddings: must be an integer >= 1, got "
                      f"{positions!r}")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
  """JSON-ready dictionary (saved next to every checkpoint)."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))
