"""The unit every task produces: a context, a question and the answers."""

from collections.abc import Callable
import dataclasses
from typing import Any

TokenCounter = Callable[[str], int]


def count_words(text: str) -> int:
  """Whitespace word count: the default length unit when no tokenizer is given.

  Real runs pass the model tokenizer's count so that a "32K" context is 32K
  positions of KV cache, which is what the sparse-attention budget is about.
  """
  return len(text.split())


def render_prompt(template: str, context: str, question: str,
                  answer_prefix: str = "") -> str:
  """Fills ``template`` and appends ``answer_prefix``.

  Templates name their fields ``{context}`` and ``{input}``, the names of
  LongBench's official templates, so those are stored verbatim. Only the
  template is parsed by ``str.format``; braces inside the context or question
  are inserted as they are.

  Args:
    template: Prompt text with ``{context}`` and, usually, ``{input}``.
    context: The long document.
    question: The query, substituted for ``{input}``.
    answer_prefix: Text the model continues from (RULER-style); may be empty.

  Returns:
    The prompt text given to the model, before any chat template.
  """
  return template.format(context=context, input=question) + answer_prefix


@dataclasses.dataclass(frozen=True)
class Sample:
  """One evaluation case.

  Attributes:
    task: Task name, e.g. "niah", "ruler_vt", "qasper"; LongBench scoring rules
      are keyed on it.
    context: The long document (haystack with needles, or a LongBench context).
    question: The query, rendered into the template's ``{input}``.
    answers: Reference answers; their meaning depends on ``metric`` (any of
      them for exact match and LongBench metrics, all of them for
      string_match_all).
    metric: Name of the scoring function in ``mage_jax.tasks.metrics``.
    template: Per-task prompt template with ``{context}`` and ``{input}``.
    answer_prefix: Text appended after the template, which the model continues.
    max_new_tokens: Generation length the task was designed for.
    meta: Provenance: seed, sample index, depth, target and actual length, ...
  """

  task: str
  context: str
  question: str
  answers: list[str]
  metric: str
  template: str = "{context}\n\n{input}"
  answer_prefix: str = ""
  max_new_tokens: int = 32
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def prompt(self) -> str:
    """The final prompt text (context + question in the task's template)."""
    return render_prompt(self.template, self.context, self.question,
                         self.answer_prefix)
