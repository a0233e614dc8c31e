"""Runs evaluation cases: builds samples, generates with each method, scores, logs line by line.

Kept apart from the absl entry point so tests and other code can drive it with plain arguments.
A case is (method, budget, task, context length, depth, sample index, seed) plus a digest of its
setup (eval.provenance: weights, method and decoding options, prompt ids); finished cases are
read back from the output folder's results.jsonl and skipped, so a killed run resumes, and a
case another model or setting produced is never taken for this one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import tqdm
from jax.sharding import Mesh

from eval import provenance
from eval.results import CaseKey, ResultStore
from mage_jax.generate import DecodeOptions, generate, plan_request
from mage_jax.methods import METHODS, get_method
from mage_jax.recall import measure_recall
from mage_jax.tasks import longbench, metrics, niah, ruler
from mage_jax.tasks.haystack import Haystack
from mage_jax.tasks.sample import Sample

MEASURES = ("accuracy", "recall", "latency")


# Eval names of method variants: (registered method, options).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mage_adaptive": ("mage", {"adaptive": True}),  # MAGE v1's layer-adaptive budgets
}


DENSE_SUFFIX = "@dense"  # mage@dense0: the method with its first 0 layers exact, not its default


def _resolve(name: str) -> tuple[str, dict[str, Any]]:
  """Method name -> (registered method, constructor options): variants and ``@denseN``."""
  base, suffix, dense = name.partition(DENSE_SUFFIX)
  method, options = VARIANTS.get(base, (base, {}))
  if suffix:
    if not dense.isdigit():
      raise ValueError(f"--method: {name!r}: expected {base}{DENSE_SUFFIX}N with N a layer count")
    options = {**options, "dense_layers": int(dense)}
  return method, options


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """An attention method (or variant) at one budget (None for methods without one)."""

  name: str
  budget: int | None

  def build(self):
    method, options = _resolve(self.name)
    if self.budget is not None:
      options = {**options, "budget": self.budget}
    return get_method(method, **options)


def method_specs(names: Sequence[str], budgets: Sequence[int]) -> list[MethodSpec]:
  """Every named method at every budget; methods without a budget once."""
  specs = []
  for name in names:
    method, _ = _resolve(name)
    if method not in METHODS:
      available = sorted([*METHODS, *VARIANTS])
      raise ValueError(f"--method: unknown method {name!r}; available: {', '.join(available)}")
    fields = {f.name for f in dataclasses.fields(METHODS[method])}
    if DENSE_SUFFIX in name and "dense_layers" not in fields:
      raise ValueError(f"--method: {name!r}: {method} has no dense layers to set")
    if "budget" in fields:
      specs.extend(MethodSpec(name, b) for b in budgets)
    else:
      specs.append(MethodSpec(name, None))
  for spec in specs:  # every combination is valid before the first case runs
    try:
      spec.build()
    except ValueError as e:
      raise ValueError(f"--method={spec.name} --budget={spec.budget}: {e}") from e
  return specs


@dataclasses.dataclass
class Tokenizer:
  """The pieces of a tokenizer the runner needs (ids in, text out, optional chat template)."""

  encode: Callable[[str], list[int]]
  decode: Callable[[list[int]], str]
  chat_template: Callable[[str], str] | None = None

  def count(self, text: str) -> int:
    return len(self.encode(text))

  def prompt_ids(self, text: str) -> list[int]:
    """Tokens of ``text`` as a prompt (with the chat template, if any)."""
    return self.encode(self.chat_template(text) if self.chat_template else text)


def build_samples(task: str, context_lengths: Sequence[int], *, num_samples: int, seed: int,
                  depths: Sequence[float], tokenizer: Tokenizer,
                  haystack_file: str | None = None) -> list[Sample]:
  """Samples of ``task``: niah, a RULER task name, or longbench:<path>."""
  haystack = Haystack.from_file(haystack_file) if haystack_file else None
  if task == "niah":
    return niah.niah_grid(context_lengths, depths, num_samples=num_samples, seed=seed,
                          count_tokens=tokenizer.count, haystack=haystack)
  if task in ruler.RULER_TASKS:
    return ruler.ruler_samples(task, context_lengths, num_samples=num_samples, seed=seed,
                               count_tokens=tokenizer.count, haystack=haystack)
  if task.startswith("longbench:"):
    samples = longbench.load_longbench(task.split(":", 1)[1])[:num_samples]
    out = []
    for length in context_lengths:
      for s in samples:
        prompt = longbench.truncate_middle(s.prompt(), length, tokenizer.encode, tokenizer.decode)
        out.append(dataclasses.replace(
            s, context=prompt, template="{context}", question="", answer_prefix="",
            meta={**s.meta, "length": length}))
    return out
  raise ValueError(f"--task: unknown task {task!r}; use niah, one of "
                   f"{', '.join(sorted(ruler.RULER_TASKS))}, or longbench:<path.jsonl>")


def case_key(spec: MethodSpec, sample: Sample, index: int, seed: int, setup: str = "") -> CaseKey:
  meta = sample.meta
  return CaseKey(method=spec.name, budget=spec.budget, task=sample.task,
                 context_length=int(meta.get("length", meta.get("context_length", 0))),
                 depth=meta.get("depth"), sample_index=int(meta.get("index", index)), seed=seed,
                 setup=setup)


def check_context_fits(cfg, tokenizer: Tokenizer, samples: Sequence[Sample],
                       checkpoint: str) -> None:
  """Every prompt, its answer and the block it ends in must fit the model's positions.

  Raises:
    ValueError: naming --context_lengths, the length that does not fit, the positions it needs,
      the model's max_position_embeddings and the checkpoint.
  """
  limit = cfg.max_position_embeddings
  unlimited = cfg.replace(max_position_embeddings=2**62)  # sized here, refused with the flag
  for s in samples:
    needed = plan_request(unlimited, [len(tokenizer.prompt_ids(s.prompt()))],
                          s.max_new_tokens).capacity
    if needed > limit:
      length = s.meta.get("length", s.meta.get("context_length"))
      raise ValueError(f"--context_lengths: {length} needs {needed} positions (prompt, answer "
                       f"and block rounding), beyond max_position_embeddings={limit} of "
                       f"{checkpoint}")


def _warm_up(model, batch_size: int, capacity: int, method, options, mesh) -> None:
  """Compiles the decoding loop of (batch, capacity, method, options) outside the timed calls,
  cheaply: one-token prompts and one new token reuse the same compiled stages (lengths and
  max_new_tokens are arrays), so prefill writes nothing and one block is decoded."""
  generate(model, [[0]] * batch_size, max_new_tokens=1, method=method, options=options,
           capacity=capacity, mesh=mesh)


def run_cases(model, tokenizer: Tokenizer, samples: Sequence[Sample], specs: Sequence[MethodSpec],
              *, store: ResultStore, batch_size: int, seed: int, measure: Sequence[str],
              options: DecodeOptions | None = None, progress: bool = True,
              mesh: Mesh | None = None, model_id: str | None = None) -> list[dict]:
  """Runs every unfinished case of the grid ``specs`` x ``samples``; returns the grid's rows
  (cases finished by an earlier run included), in grid order.

  A case is finished only if a row with its id exists, and the id carries a digest of what
  produces the result (``model_id``, default: a fingerprint of the model's weights and config;
  the method's and decoding options; the prompt's token ids): rows another checkpoint or
  setting wrote to the same folder are neither reused nor returned.

  Cases are grouped by context length so one compiled loop (fixed batch and capacity) serves
  a group; a short last batch is padded with copies of its first prompt and the copies dropped.
  With "latency" each batch's prefill and decode times go to the store's batch log.
  With a ``mesh`` (see ``check_mesh``) the model must already be sharded onto it.
  """
  cfg = model.config
  options = options or DecodeOptions.for_model(cfg)
  model_id = model_id or provenance.model_fingerprint(model)
  prompts = [tokenizer.prompt_ids(s.prompt()) for s in samples]
  methods = {spec: spec.build() for spec in specs}
  keys: dict[tuple[MethodSpec, int], CaseKey] = {}
  for spec, method in methods.items():
    for i, s in enumerate(samples):
      setup = provenance.case_setup(model_id, method, options, prompts[i], s.max_new_tokens)
      keys[spec, i] = case_key(spec, s, i, seed, setup)
  finished = store.finished()
  groups: dict[tuple, list[int]] = {}
  for (spec, i), key in keys.items():
    if key.case_id not in finished:
      groups.setdefault((spec, key.context_length), []).append(i)
  devices = 1 if mesh is None else mesh.size
  bar = tqdm.tqdm(total=sum(map(len, groups.values())), desc="eval", unit="case",
                  disable=not progress)
  for (spec, _), indices in groups.items():
    method = methods[spec]
    max_new = max(samples[i].max_new_tokens for i in indices)
    # One capacity for the group's batches: one compiled loop.
    capacity = plan_request(cfg, [len(prompts[i]) for i in indices], max_new).capacity
    if "latency" in measure:
      _warm_up(model, batch_size, capacity, method, options, mesh)
    for first in range(0, len(indices), batch_size):
      batch = indices[first:first + batch_size]
      batch_prompts = [prompts[i] for i in batch]
      batch_prompts += [batch_prompts[0]] * (batch_size - len(batch))
      result = generate(model, batch_prompts, max_new_tokens=max_new, method=method,
                        options=options, capacity=capacity, mesh=mesh)
      recalls = {}
      if "recall" in measure and spec.budget is not None:
        for i in batch:
          report = measure_recall(model, [prompts[i]], method, budget=spec.budget,
                                  max_new_tokens=max_new, options=options, capacity=capacity,
                                  mesh=mesh)
          recalls[i] = {"recall": report.overall_index_recall,
                        "mass_recall": report.overall_mass_recall,
                        "layer_recall": [float(x) for x in report.index_recall],
                        "layer_mass_recall": [float(x) for x in report.mass_recall]}
      for row, i in enumerate(batch):
        s = samples[i]
        text = tokenizer.decode(result.tokens[row])
        measurements = {"score": metrics.score_sample(s, text), "prediction": text,
                        "answers": list(s.answers)}
        measurements.update(recalls.get(i, {}))
        store.append(keys[spec, i], measurements)
        bar.update(1)
      if "latency" in measure:
        new_tokens = sum(len(t) for t in result.tokens[:len(batch)])
        store.append_batch([keys[spec, i] for i in batch], {
            "batch_size": len(batch), "padded_batch": batch_size, "devices": devices,
            "prefill_ms": 1e3 * result.prefill_s,
            "ms_per_step": 1e3 * result.decode_s / max(result.num_steps, 1),
            "steps": result.num_steps, "new_tokens": new_tokens,
            "tokens_per_s": new_tokens / (result.prefill_s + result.decode_s)})
  bar.close()
  return store.rows(key.case_id for key in keys.values())


def check_mesh(mesh: Mesh, batch_size: int, measure: Sequence[str]) -> None:
  """The batch splits over the mesh's "data" axis; recall decodes one prompt at a time."""
  data = mesh.shape["data"]
  if batch_size % data:
    raise ValueError(f"--batch_size={batch_size} must be a multiple of the mesh's data axis "
                     f"({data})")
  if "recall" in measure and data > 1:
    raise ValueError(f"--measure=recall decodes one prompt at a time: it needs a mesh with "
                     f"data:1, got data:{data}")


def parse_measures(values: Sequence[str]) -> list[str]:
  unknown = sorted(set(values) - set(MEASURES))
  if unknown:
    raise ValueError(f"--measure: unknown {unknown}; choose from {', '.join(MEASURES)}")
  return list(values)


def as_ints(flag: str, values: Sequence[str]) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--{flag}: expected integers, got {','.join(values)}") from None
  if any(v < 1 for v in out):
    raise ValueError(f"--{flag}: values must be >= 1, got {out}")
  return out


def as_depths(values: Sequence[str]) -> list[float]:
  try:
    out = [float(v) for v in values]
  except ValueError:
    raise ValueError(f"--depths: expected numbers in [0, 1], got {','.join(values)}") from None
  if any(not 0 <= d <= 1 for d in out):
    raise ValueError(f"--depths: values must be in [0, 1], got {out}")
  return out
