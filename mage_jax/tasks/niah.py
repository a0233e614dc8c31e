"""Needle in a haystack over a grid of context lengths x needle depths.

One key-value fact ("The special magic number for <key> is <value>.") is
hidden at a chosen depth of filler text, and the model is asked for the value.
A method that drops the needle's KV entries cannot answer, which makes the grid
a direct picture of where a sparse-attention selection loses recall.
"""

from collections.abc import Sequence
import random
from typing import Any

from mage_jax.tasks import haystack as haystack_lib
from mage_jax.tasks import sample as sample_lib

NEEDLE = "The special magic number for {key} is {value}."
TEMPLATE = (
    "A special magic number is hidden somewhere in the text below. Read it "
    "carefully and remember the number: you will be asked for it at the "
    "end.\n\n{context}\n\n{input}")
QUESTION = "What is the special magic number for {key} mentioned in the text?"
ANSWER_PREFIX = " The special magic number for {key} mentioned in the text is"
# A 7-digit number plus a little slack: one 32-token block of a block-diffusion
# model.
MAX_NEW_TOKENS = 32

# Keys are hyphenated pairs from lists disjoint from the filler vocabulary, so
# a key is never mentioned anywhere but in its needle and the question.
_KEY_ADJECTIVES = (
    "amber", "brisk", "cobalt", "dusky", "elegant", "fierce", "glossy",
    "hazel", "icy", "jolly", "keen", "lavish", "mellow", "nimble", "ornate",
    "plucky", "quaint", "rosy", "scarlet", "tawny", "upbeat", "vivid",
    "wiry", "zesty",
)
_KEY_NOUNS = (
    "otter", "falcon", "walrus", "badger", "heron", "lynx", "marmot",
    "panda", "quail", "raven", "salmon", "tapir", "urchin", "viper",
    "wombat", "yak", "zebra", "beetle", "coyote", "dolphin", "ferret",
    "gecko", "ibis", "jackal",
)


def check_value_digits(value_digits: Sequence[int]) -> tuple[int, int]:
  """(low, high) of a needle-value digit range; ValueError unless 1 <= low <= high <=
  haystack.MAX_NUMBER_DIGITS (the limit of repeat sources' numbers too)."""
  most = haystack_lib.MAX_NUMBER_DIGITS
  if len(value_digits) != 2 or not 1 <= value_digits[0] <= value_digits[1] <= most:
    raise ValueError(f"value_digits must be (low, high) with 1 <= low <= high <= {most}, "
                     f"got {tuple(value_digits)}")
  return int(value_digits[0]), int(value_digits[1])


def random_key(rng: random.Random) -> str:
  """A needle key such as "cobalt-heron"."""
  return f"{rng.choice(_KEY_ADJECTIVES)}-{rng.choice(_KEY_NOUNS)}"


def random_value(rng: random.Random, digits: int = 7) -> str:
  """A needle value of ``digits`` digits (7 in every eval task); the filler has no digits, so
  it is unique."""
  return str(rng.randint(10**(digits - 1), 10**digits - 1))


def haystack_sample(
    *,
    task: str,
    inserts: Sequence[tuple[float, str]],
    question: str,
    answers: list[str],
    metric: str,
    template: str,
    answer_prefix: str,
    max_new_tokens: int,
    context_length: int,
    count_tokens: sample_lib.TokenCounter,
    haystack: haystack_lib.Haystack,
    meta: dict[str, Any],
) -> sample_lib.Sample:
  """Fills ``haystack`` around ``inserts`` up to ``context_length`` tokens.

  The length measured is that of the whole rendered prompt (template, context,
  question and answer prefix): that is what occupies the KV cache when the
  answer is generated.

  Args:
    task: Task name for the sample.
    inserts: (depth in [0, 1], text) pairs placed in the filler.
    question: Query rendered into the template.
    answers: Reference answers; each must occur in an insert.
    metric: Scoring function name.
    template: Prompt template with ``{context}`` and ``{input}``.
    answer_prefix: Text the model continues from.
    max_new_tokens: Generation length for the task.
    context_length: Target prompt length in tokens (inclusive upper bound).
    count_tokens: Token counter of the model's tokenizer.
    haystack: Filler source.
    meta: Task-specific metadata, extended with the measured lengths.

  Returns:
    The sample, its prompt at most ``context_length`` tokens long.

  Raises:
    ValueError: if ``context_length`` cannot hold the prompt without filler.
  """
  if context_length <= 0:
    raise ValueError(f"context_length must be positive, got {context_length}")

  def prompt_tokens(context: str) -> int:
    return count_tokens(
        sample_lib.render_prompt(template, context, question, answer_prefix))

  filler_units, context = haystack_lib.largest_fitting(
      lambda n: haystack_lib.insert_at_depths(haystack.take(n), inserts),
      prompt_tokens, context_length)
  return sample_lib.Sample(
      task=task,
      context=context,
      question=question,
      answers=answers,
      metric=metric,
      template=template,
      answer_prefix=answer_prefix,
      max_new_tokens=max_new_tokens,
      meta={
          **meta,
          "context_length": context_length,
          "prompt_tokens": prompt_tokens(context),
          "filler_units": filler_units,
          "haystack": haystack.source,
      },
  )


def niah_sample(
    context_length: int,
    depth: float,
    *,
    seed: int = 0,
    index: int = 0,
    count_tokens: sample_lib.TokenCounter = sample_lib.count_words,
    haystack: haystack_lib.Haystack | None = None,
) -> sample_lib.Sample:
  """One needle at ``depth`` in a prompt of at most ``context_length`` tokens.

  The needle and the built-in filler depend on (seed, index) only, not on the
  grid point, so the cells of a heatmap differ in length and depth alone.

  Args:
    context_length: Target prompt length in tokens.
    depth: Needle position as a fraction of the context: 0 = start, 1 = end.
    seed: Run seed.
    index: Sample index within the run.
    count_tokens: Token counter of the model's tokenizer.
    haystack: Filler; the built-in synthetic text for (seed, index) if None.

  Returns:
    The sample; ``answers`` is the needle value, scored by exact match.

  Raises:
    ValueError: if depth is outside [0, 1] or the target is too small.
  """
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}")
  rng = random.Random(f"niah/{seed}/{index}")
  key, value = random_key(rng), random_value(rng)
  if haystack is None:
    haystack = haystack_lib.Haystack.synthetic(f"niah/{seed}/{index}")
  return haystack_sample(
      task="niah",
      inserts=[(depth, NEEDLE.format(key=key, value=value))],
      question=QUESTION.format(key=key),
      answers=[value],
      metric="exact_match",
      template=TEMPLATE,
      answer_prefix=ANSWER_PREFIX.format(key=key),
      max_new_tokens=MAX_NEW_TOKENS,
      context_length=context_length,
      count_tokens=count_tokens,
      haystack=haystack,
      meta={"seed": seed, "index": index, "depth": depth, "key": key},
  )


def niah_grid(
    context_lengths: Sequence[int],
    depths: Sequence[float],
    *,
    num_samples: int = 1,
    seed: int = 0,
    count_tokens: sample_lib.TokenCounter = sample_lib.count_words,
    haystack: haystack_lib.Haystack | None = None,
) -> list[sample_lib.Sample]:
  """Samples for every (context length, depth, sample index), in that order.

  Args:
    context_lengths: Target prompt lengths in tokens.
    depths: Needle depths in [0, 1].
    num_samples: Samples (different needles and filler) per grid cell.
    seed: Run seed.
    count_tokens: Token counter of the model's tokenizer.
    haystack: Filler shared by all samples, or None for the built-in one.

  Returns:
    len(context_lengths) * len(depths) * num_samples samples.
  """
  if num_samples <= 0:
    raise ValueError(f"num_samples must be positive, got {num_samples}")
  return [
      niah_sample(length, depth, seed=seed, index=index,
                  count_tokens=count_tokens, haystack=haystack)
      for length in context_lengths
      for depth in depths
      for index in range(num_samples)
  ]


def all_keys() -> list[str]:
  """Every needle key, in a fixed order (24 x 24 = 576)."""
  return [f"{a}-{n}" for a in _KEY_ADJECTIVES for n in _KEY_NOUNS]


def recall_drill_text(
    context_length: int,
    num_needles: int,
    *,
    seed: int = 0,
    index: int = 0,
    count_tokens: sample_lib.TokenCounter = sample_lib.count_words,
    haystack: haystack_lib.Haystack | None = None,
    value_digits: tuple[int, int] = (7, 7),
) -> str:
  """A training document dense in retrieval: many needles, then every one asked.

  ``num_needles`` needles with distinct keys sit at random depths of the
  filler; the prompt (at most ``context_length`` tokens) is the NIAH prompt for
  the first needle, so the document opens exactly as an eval sample does. Its
  answer follows, then the question and answer of every other needle, in a
  random order, in the same format. A single-needle NIAH document puts 7 of its
  ~1000+ tokens on retrieval; this one puts ~15 per needle (key match and the
  value's digits), so a small model sees retrieval targets often enough to
  learn key matching and copying.

  Each value has a digit count drawn uniformly from ``value_digits`` (low, high); the default
  (7, 7) is the eval tasks' length and keeps the original stream. Longer values put the 7th
  digit inside the copied range rather than at its end (the shipped model copies digits 1-5 of
  a 7-digit value and misses 6-7: WORKSPACE_NOTES.md, session 5).

  Raises:
    ValueError: if num_needles is outside [1, 576], value_digits is not an ordered pair in
      [1, haystack.MAX_NUMBER_DIGITS], or the prompt cannot hold the needles.
  """
  keys = all_keys()
  if not 1 <= num_needles <= len(keys):
    raise ValueError(f"num_needles must be in [1, {len(keys)}], got {num_needles}")
  low, high = check_value_digits(value_digits)
  rng = random.Random(f"niah-drill/{seed}/{index}")
  chosen = rng.sample(keys, num_needles)
  if low == high:
    values = [random_value(rng, low) for _ in chosen]
  else:
    values = [random_value(rng, rng.randint(low, high)) for _ in chosen]
  depths = [rng.random() for _ in chosen]
  if haystack is None:
    haystack = haystack_lib.Haystack.synthetic(f"niah-drill/{seed}/{index}")
  sample = haystack_sample(
      task="niah_drill",
      inserts=[(d, NEEDLE.format(key=k, value=v))
               for d, k, v in zip(depths, chosen, values)],
      question=QUESTION.format(key=chosen[0]),
      answers=[values[0]],
      metric="exact_match",
      template=TEMPLATE,
      answer_prefix=ANSWER_PREFIX.format(key=chosen[0]),
      max_new_tokens=MAX_NEW_TOKENS,
      context_length=context_length,
      count_tokens=count_tokens,
      haystack=haystack,
      meta={"seed": seed, "index": index},
  )
  order = list(range(1, num_needles))
  rng.shuffle(order)
  follow_ups = "".join(
      f"\n\n{QUESTION.format(key=chosen[i])}{ANSWER_PREFIX.format(key=chosen[i])} {values[i]}."
      for i in order)
  return f"{sample.prompt()} {values[0]}.{follow_ups}"
