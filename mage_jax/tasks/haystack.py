"""Filler text for synthetic long-context tasks, and fitting it to a length.

The haystack must not help or hurt retrieval by accident: the built-in filler
is plausible, varied English (a single repeated sentence is trivially
compressible, which flatters sparse attention), and it contains no digits and
no upper-case identifiers, so needle values and variable names occur only
where a task puts them.
"""

import bisect
from collections.abc import Callable, Sequence
import itertools
import os
import random
import re
from typing import TypeVar

T = TypeVar("T")

# Upper bound on filler units tried by `largest_fitting`: far beyond any
# context a model here can take, so hitting it means the counter never grows.
_MAX_FILLER_UNITS = 1 << 24

_ADJECTIVES = (
    "quiet", "ancient", "narrow", "bright", "careful", "distant", "gentle",
    "heavy", "hollow", "modest", "patient", "restless", "silver", "steady",
    "tired", "wooden", "crowded", "empty", "familiar", "forgotten", "humble",
    "curious", "golden", "muddy", "northern", "pale", "rough", "sudden",
    "warm", "young", "stubborn", "clever", "faded", "generous", "lonely",
    "noisy", "polished", "rusty", "sharp", "winding",
)
_NOUNS = (
    "baker", "bridge", "captain", "cart", "cottage", "engineer", "farmer",
    "garden", "harbor", "library", "lantern", "market", "merchant", "mill",
    "orchard", "painter", "river", "road", "sailor", "school", "shepherd",
    "station", "teacher", "tower", "valley", "village", "window", "workshop",
    "forest", "kitchen", "meadow", "museum", "neighbor", "notebook", "pilot",
    "traveler", "carpenter", "fisherman", "courtyard", "violinist",
)
_PLURALS = (
    "children", "visitors", "students", "farmers", "sailors", "travelers",
    "merchants", "neighbors", "engineers", "gardeners", "musicians",
    "clerks", "weavers", "soldiers", "poets", "cooks",
)
_PAST_VERBS = (
    "visited", "repaired", "painted", "described", "admired", "cleaned",
    "followed", "measured", "ignored", "noticed", "carried", "guarded",
    "opened", "studied", "watched", "remembered", "sketched", "crossed",
    "questioned", "praised",
)
_PRESENT_VERBS = (
    "gather", "wander", "linger", "argue", "rest", "sing", "trade", "wait",
    "work", "talk", "read", "walk",
)
_BASE_VERBS = (
    "explain", "describe", "protect", "rebuild", "understand", "measure",
    "photograph", "restore", "explore", "map",
)
_PREPOSITIONS = (
    "near", "behind", "beside", "beyond", "under", "across", "inside",
    "around", "toward", "above",
)
_ADVERBS = (
    "slowly", "quietly", "eagerly", "carefully", "happily", "reluctantly",
    "patiently", "suddenly", "gracefully", "thoroughly",
)
_TIMES = (
    "Early in the morning", "Late that evening", "During the long winter",
    "After the harvest", "Before the storm", "On most afternoons",
    "Every spring", "Some years later", "At the end of the season",
    "Long before the railway came",
)
_CONNECTIVES = (
    "although", "because", "while", "whenever", "as soon as", "even though",
)


def _noun_phrase(rng: random.Random) -> str:
  determiner = rng.choice(("the", "the", "a", "one", "every", "that"))
  words = [rng.choice(_NOUNS)]
  if rng.random() < 0.5:
    words.insert(0, rng.choice(_ADJECTIVES))
  if determiner == "a" and words[0][0] in "aeiou":
    determiner = "an"
  return " ".join([determiner, *words])


def _clause(rng: random.Random) -> str:
  return (f"{_noun_phrase(rng)} {rng.choice(_PAST_VERBS)} "
          f"{_noun_phrase(rng)}")


def _synthetic_sentence(rng: random.Random) -> str:
  """One sentence from a handful of patterns filled from the word lists."""
  pattern = rng.randrange(6)
  if pattern == 0:
    text = (f"{_clause(rng)} {rng.choice(_PREPOSITIONS)} "
            f"{_noun_phrase(rng)}")
  elif pattern == 1:
    text = (f"{rng.choice(_TIMES)}, {_noun_phrase(rng)} "
            f"{rng.choice(_PAST_VERBS)} {_noun_phrase(rng)} "
            f"{rng.choice(_ADVERBS)}")
  elif pattern == 2:
    text = (f"many {rng.choice(_PLURALS)} {rng.choice(_PRESENT_VERBS)} "
            f"{rng.choice(_PREPOSITIONS)} {_noun_phrase(rng)} "
            f"{rng.choice(_CONNECTIVES)} {_clause(rng)}")
  elif pattern == 3:
    text = (f"it was {rng.choice(_ADJECTIVES)} work to "
            f"{rng.choice(_BASE_VERBS)} {_noun_phrase(rng)}, so "
            f"{_noun_phrase(rng)} {rng.choice(_PAST_VERBS)} it "
            f"{rng.choice(_ADVERBS)}")
  elif pattern == 4:
    text = (f"{_noun_phrase(rng)} was {rng.choice(_ADJECTIVES)} and "
            f"{rng.choice(_ADJECTIVES)}, and the {rng.choice(_PLURALS)} "
            f"{rng.choice(_PRESENT_VERBS)} there {rng.choice(_ADVERBS)}")
  else:
    text = (f"nobody {rng.choice(_PAST_VERBS)} "
            f"{_noun_phrase(rng)} {rng.choice(_CONNECTIVES)} "
            f"{_clause(rng)}")
  return text[0].upper() + text[1:] + "."


class Haystack:
  """An endless, deterministic stream of filler units, read by prefix.

  Units are sentences for the built-in and file haystacks (or words for tasks
  whose filler is a word list). Generators ask for the first ``n`` units many
  times while searching for the largest ``n`` that fits a token target; the
  stream is cached so repeated prefixes cost nothing and are identical.
  """

  def __init__(self, next_unit: Callable[[], str], source: str):
    """Wraps a unit generator; ``source`` names it in sample metadata."""
    self._next_unit = next_unit
    self._units: list[str] = []
    self.source = source

  @classmethod
  def synthetic(cls, seed: int | str) -> "Haystack":
    """Built-in filler: varied English sentences drawn from word lists."""
    rng = random.Random(f"haystack/{seed}")
    return cls(lambda: _synthetic_sentence(rng), source=f"synthetic:{seed}")

  @classmethod
  def from_file(cls, path: str | os.PathLike[str]) -> "Haystack":
    """Filler read from a plain-text file, repeated as often as needed.

    Args:
      path: UTF-8 text file (the --haystack_file flag), e.g. essays.

    Returns:
      A haystack whose sentences are the file's, in order, cycling.

    Raises:
      ValueError: if the file cannot be read, is not UTF-8, or has no text.
    """
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"cannot read haystack file {path}: {e}") from e
    sentences = split_sentences(text)
    if not sentences:
      raise ValueError(f"haystack file {path} contains no text")
    cycle = itertools.cycle(sentences)
    return cls(lambda: next(cycle), source=os.fspath(path))

  def take(self, n: int) -> list[str]:
    """The first ``n`` units of the stream."""
    while len(self._units) < n:
      self._units.append(self._next_unit())
    return self._units[:n]


def split_sentences(text: str) -> list[str]:
  """Splits text into sentences at ., ! or ? followed by whitespace.

  Whitespace (newlines included) is collapsed so that needles inserted between
  sentences never land inside a broken line.
  """
  text = re.sub(r"\s+", " ", text).strip()
  if not text:
    return []
  return re.split(r"(?<=[.!?]) ", text)


def insert_at_depths(sentences: Sequence[str],
                     inserts: Sequence[tuple[float, str]]) -> str:
  """Joins ``sentences`` with each insert placed at its depth.

  Depth is a fraction of the filler's characters (a close proxy for tokens that
  needs no tokenizer); each insert goes to the sentence boundary nearest to it.
  Inserts at the same boundary keep their order in ``inserts`` once sorted by
  depth, so a chain of statements given in order stays in order.

  Args:
    sentences: Filler sentences.
    inserts: (depth in [0, 1], text) pairs.

  Returns:
    The context text.

  Raises:
    ValueError: if a depth is outside [0, 1].
  """
  boundaries = [0]
  for sentence in sentences:
    boundaries.append(boundaries[-1] + len(sentence) + 1)
  total = max(boundaries[-1] - 1, 0)
  placed: dict[int, list[str]] = {}
  for depth, text in sorted(inserts, key=lambda item: item[0]):
    if not 0.0 <= depth <= 1.0:
      raise ValueError(f"depth must be in [0, 1], got {depth}")
    target = depth * total
    after = min(bisect.bisect_left(boundaries, target), len(boundaries) - 1)
    before = max(after - 1, 0)
    slot = (before if target - boundaries[before] <= boundaries[after] - target
            else after)
    placed.setdefault(slot, []).append(text)
  pieces = []
  for i in range(len(sentences) + 1):
    pieces.extend(placed.get(i, ()))
    if i < len(sentences):
      pieces.append(sentences[i])
  return " ".join(pieces)


def largest_fitting(build: Callable[[int], T], count_tokens: Callable[[T], int],
                    target_tokens: int) -> tuple[int, T]:
  """Largest filler amount ``n`` whose ``build(n)`` stays within the target.

  Token counts of real tokenizers are not additive over concatenation, so the
  final text is measured, never estimated: an exponential search brackets the
  answer, a bisection finds an ``n`` that fits while ``n + 1`` does not. Only
  measured values are returned, so the result never exceeds the target.

  Args:
    build: Maps a filler amount (sentences, words, ...) to the text to measure.
    count_tokens: Token count of a built value.
    target_tokens: Inclusive upper bound on the count.

  Returns:
    (n, build(n)).

  Raises:
    ValueError: if even ``build(0)`` exceeds the target, or the count never
      exceeds it (a counter that ignores the filler).
  """
  best = build(0)
  base = count_tokens(best)
  if base > target_tokens:
    raise ValueError(
        f"target of {target_tokens} tokens is too small: the prompt has "
        f"{base} tokens before any filler is added")
  low, high = 0, 1
  while True:
    candidate = build(high)
    if count_tokens(candidate) > target_tokens:
      break
    low, best = high, candidate
    high *= 2
    if high > _MAX_FILLER_UNITS:
      raise ValueError(
          f"{_MAX_FILLER_UNITS} filler units still fit in {target_tokens} "
          "tokens: the token counter does not grow with the text")
  while high - low > 1:
    mid = (low + high) // 2
    candidate = build(mid)
    if count_tokens(candidate) <= target_tokens:
      low, best = mid, candidate
    else:
      high = mid
  return low, best


# Words of repeated_passage: the filler's word lists and the digits, drawn independently.
_COPY_WORDS = (_ADJECTIVES + _NOUNS + _PLURALS + _PAST_VERBS + _PRESENT_VERBS + _ADVERBS
               + tuple("0123456789"))


MAX_NUMBER_DIGITS = 18


def repeated_passage(context_length: int, *, seed: int | str, index: int,
                     count_tokens: Callable[[str], int], number_share: float = 0.0,
                     number_digits: int = 7) -> str:
  """A passage of random words followed by its exact repetition, at most
  ``context_length`` tokens in all.

  The words are drawn independently (no grammar), so the second half is
  predictable only by copying from the first: a training document that makes a
  small model form copying (induction) heads, which retrieval builds on. With
  grammatical filler the copy gains little over the grammar and a model from
  scratch did not pick it up (WORKSPACE_NOTES.md).

  ``number_share`` of the items are ``number_digits``-digit numbers instead of
  words. A word-level tokenizer that spells numbers one digit per token draws
  them from an alphabet of ten, so the previous token alone does not say where
  a copy continues ("8737866": which 7?); numbers teach the multi-token copying
  that needle values need. Numbers longer than the 7-digit needle values train
  copying past the 7th digit (the shipped model copies digits 1-5 of a needle
  value and misses 6-7: WORKSPACE_NOTES.md, session 5).

  Raises:
    ValueError: if ``context_length`` cannot hold a word twice, or a number
      setting is out of range.
  """
  if not 0.0 <= number_share <= 1.0:
    raise ValueError(f"number_share must be in [0, 1], got {number_share}")
  if not 1 <= number_digits <= MAX_NUMBER_DIGITS:
    raise ValueError(f"number_digits must be in [1, {MAX_NUMBER_DIGITS}], got {number_digits}")
  rng = random.Random(f"repeat/{seed}/{index}")
  if number_share == 0.0:  # the original stream, kept for the runs that used it
    words = [rng.choice(_COPY_WORDS) for _ in range(context_length)]
  else:
    low = 10**(number_digits - 1) if number_digits > 1 else 0
    words = [str(rng.randrange(low, 10**number_digits)) if rng.random() < number_share
             else rng.choice(_COPY_WORDS) for _ in range(context_length)]

  def doubled(n: int) -> str:
    passage = " ".join(words[:n])
    return f"{passage}\n\n{passage}"

  n, text = largest_fitting(doubled, count_tokens, context_length)
  if n == 0:
    raise ValueError(f"context_length {context_length} cannot hold a word twice")
  return text
