"""Scoring generated text: NIAH exact match, RULER and LongBench metrics.

The LongBench metrics are written from the definitions in THUDM/LongBench
(metrics.py, eval.py) so that scores are comparable with published tables
without the jieba / fuzzywuzzy / rouge dependencies. Where LongBench's code
behaves differently from its evident intent, the docstring says which one is
reproduced. Every function returns a score in [0, 1].
"""

from collections import Counter
from collections.abc import Callable, Sequence
import re
import string

from mage_jax.tasks import sample as sample_lib

# LongBench scores only the first line of the prediction for these few-shot
# datasets: the model tends to continue the pattern with new examples.
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """Lower-cases, drops punctuation, the articles a/an/the and extra spaces.

  The SQuAD normalisation LongBench uses, applied in the same order.
  """
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> float:
  """1.0 if the normalised answer occurs as whole words in the prediction.

  NIAH is scored on the generated continuation, which may wrap the value in a
  sentence ("The number is 1,234,567."): normalisation removes the wrapping
  punctuation, and matching whole words keeps "12345678" from counting as a
  hit for "1234567".

  Raises:
    ValueError: if the answer is empty after normalisation.
  """
  wanted = normalize_answer(answer).split()
  if not wanted:
    raise ValueError(f"answer {answer!r} is empty after normalisation")
  words = normalize_answer(prediction).split()
  return float(any(words[i:i + len(wanted)] == wanted
                   for i in range(len(words) - len(wanted) + 1)))


def string_match_all(prediction: str, references: Sequence[str]) -> float:
  """Fraction of ``references`` found (case-insensitive) in the prediction.

  RULER's metric for tasks whose answer is a set (all values, all variables).
  """
  if not references:
    raise ValueError("string_match_all needs at least one reference")
  text = prediction.lower()
  return sum(ref.lower() in text for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
  """1.0 if any of ``references`` occurs (case-insensitive) in the prediction.

  RULER's metric for tasks with alternative answers (QA).
  """
  if not references:
    raise ValueError("string_match_part needs at least one reference")
  text = prediction.lower()
  return float(any(ref.lower() in text for ref in references))


def _f1(prediction_tokens: Sequence[str],
        reference_tokens: Sequence[str]) -> float:
  common = Counter(prediction_tokens) & Counter(reference_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(prediction_tokens)
  recall = num_same / len(reference_tokens)
  return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
  """Token-level F1 between the normalised prediction and ground truth."""
  return _f1(normalize_answer(prediction).split(),
             normalize_answer(ground_truth).split())


def longest_common_subsequence(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence, O(len(a) * len(b)) time."""
  if len(b) > len(a):
    a, b = b, a
  previous = [0] * (len(b) + 1)
  for x in a:
    current = [0]
    for j, y in enumerate(b):
      current.append(previous[j] + 1 if x == y
                     else max(previous[j + 1], current[j]))
    previous = current
  return previous[-1]


def rouge_score(prediction: str, ground_truth: str) -> float:
  """ROUGE-L F1: LCS precision and recall over whitespace tokens.

  Periods separate tokens, as in the ``rouge`` package LongBench calls (it
  splits sentences at "."). That package scores multi-sentence texts by
  summary-level union LCS, which can differ slightly from the plain LCS used
  here; single-sentence texts without repeated words score the same. An empty
  side scores 0, as LongBench's try/except makes it.
  """
  prediction_tokens = prediction.replace(".", " ").split()
  reference_tokens = ground_truth.replace(".", " ").split()
  if not prediction_tokens or not reference_tokens:
    return 0.0
  lcs = longest_common_subsequence(prediction_tokens, reference_tokens)
  if lcs == 0:
    return 0.0
  precision = lcs / len(prediction_tokens)
  recall = lcs / len(reference_tokens)
  return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, ground_truth: str,
                         all_classes: Sequence[str]) -> float:
  """1 / (number of classes named) if the true class is among them, else 0.

  Class names that are substrings of the ground truth (but not equal to it)
  are not counted against the prediction. LongBench's similarity fallback for
  predictions naming no class never runs (it compares a list with 0), so such
  predictions score 0, as in the published numbers.
  """
  named = [c for c in all_classes if c in prediction]
  named = [c for c in named if c == ground_truth or c not in ground_truth]
  if ground_truth not in named:
    return 0.0
  return 1.0 / len(named)


def _fraction_equal(numbers: Sequence[str], wanted: str) -> float:
  if not numbers:
    return 0.0
  return sum(number == wanted for number in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str) -> float:
  """Fraction of the numbers in the prediction that equal the paragraph id.

  Raises:
    ValueError: if the ground truth has no "Paragraph <n>".
  """
  match = re.search(r"Paragraph (\d+)", ground_truth)
  if match is None:
    raise ValueError(
        f"retrieval ground truth {ground_truth!r} has no 'Paragraph <n>'")
  return _fraction_equal(re.findall(r"\d+", prediction), match.group(1))


def count_score(prediction: str, ground_truth: str) -> float:
  """Fraction of the numbers in the prediction that equal the true count."""
  return _fraction_equal(re.findall(r"\d+", prediction), str(ground_truth))


# Metrics scored against each reference separately; the sample's score is the
# best one (LongBench's rule, also right for NIAH's single answer).
_PER_REFERENCE: dict[str, Callable[[str, str, Sequence[str]], float]] = {
    "exact_match": lambda p, g, _: exact_match(p, g),
    "qa_f1_score": lambda p, g, _: qa_f1_score(p, g),
    "rouge_score": lambda p, g, _: rouge_score(p, g),
    "classification_score": classification_score,
    "retrieval_score": lambda p, g, _: retrieval_score(p, g),
    "count_score": lambda p, g, _: count_score(p, g),
}
# Metrics that look at all references at once.
_ALL_REFERENCES: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}
METRICS = frozenset(_PER_REFERENCE) | frozenset(_ALL_REFERENCES)


def score_prediction(task: str, metric: str, prediction: str,
                     answers: Sequence[str],
                     all_classes: Sequence[str] = ()) -> float:
  """Scores one prediction by the rules of its task and metric.

  For per-reference metrics the score is the maximum over ``answers``, and for
  LongBench's few-shot tasks (`FIRST_LINE_TASKS`) only the first non-empty
  line of the prediction is scored, as LongBench's eval.py does.

  Args:
    task: Task name (e.g. "niah", "triviaqa").
    metric: A name in `METRICS`.
    prediction: Generated text.
    answers: Reference answers.
    all_classes: Class names, for classification_score.

  Returns:
    The score in [0, 1].

  Raises:
    ValueError: for an unknown metric or no answers.
  """
  if not answers:
    raise ValueError(f"no reference answers to score task {task!r} against")
  if task in FIRST_LINE_TASKS:
    prediction = prediction.lstrip("\n").split("\n")[0]
  if metric in _ALL_REFERENCES:
    return _ALL_REFERENCES[metric](prediction, answers)
  if metric not in _PER_REFERENCE:
    raise ValueError(f"unknown metric {metric!r}; expected one of "
                     f"{sorted(METRICS)}")
  score = _PER_REFERENCE[metric]
  return max(score(prediction, answer, all_classes) for answer in answers)


def score_sample(sample: sample_lib.Sample, prediction: str) -> float:
  """Scores ``prediction`` against ``sample`` (task, metric, answers)."""
  return score_prediction(sample.task, sample.metric, prediction,
                          sample.answers, sample.meta.get("all_classes") or ())
