"""RULER-style synthetic tasks, generated from seeds.

After Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context
Language Models?" (NVIDIA/RULER). The tasks stress what a fixed KV budget can
lose: several needles at once (multi-key/value/query NIAH), information spread
over a chain of statements (variable tracking), and aggregation over the whole
context (common-word extraction), where no small subset of the cache suffices.

Every generator is a pure function of (context_length, seed, index, options):
the same arguments give the same sample, and every answer occurs in the context.
"""

from collections.abc import Callable, Sequence
import random
import string

from mage_jax.tasks import haystack as haystack_lib
from mage_jax.tasks import niah
from mage_jax.tasks import sample as sample_lib

_NEEDLE = "One of the special magic numbers for {key} is {value}."
_NIAH_TEMPLATE = (
    "Special magic numbers are hidden somewhere in the text below. Read it "
    "carefully and remember them: you will be asked about them at the "
    "end.\n\n{context}\n\n{input}")
_NIAH_QUESTION = ("What are all the special magic numbers for {keys} "
                  "mentioned in the text?")
_NIAH_ANSWER_PREFIX = (" The special magic numbers for {keys} mentioned in the "
                       "text are")
_NIAH_MAX_NEW_TOKENS = 128

_VT_TEMPLATE = (
    "The text below hides one or more chains of variable assignments. Keep "
    "track of every assignment.\n\n{context}\n\n{input}")
_VT_QUESTION = ("Which variables are assigned the value {value} in the text "
                "above, directly or through other variables?")
_VT_ANSWER_PREFIX = (" Answer: following the assignments in the text, the "
                     "variables with the value {value} are:")
_VT_MAX_NEW_TOKENS = 32

_CWE_TEMPLATE = (
    "Below is a numbered list of words. Some of the words occur much more "
    "often than the others; remember which.\n\n{context}\n\n{input}")
_CWE_QUESTION = "Which {count} words occur most often in the list above?"
_CWE_ANSWER_PREFIX = (" Answer: the {count} words that occur most often in the "
                      "list are:")
_CWE_MAX_NEW_TOKENS = 128

# Needle depths are drawn without replacement from this grid, as in RULER, so
# two needles never share a position.
_DEPTH_GRID = tuple(i / 40 for i in range(41))

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _spoken_list(items: Sequence[str]) -> str:
  """"a", "a and b", "a, b, and c"."""
  if len(items) == 1:
    return items[0]
  if len(items) == 2:
    return f"{items[0]} and {items[1]}"
  return ", ".join(items[:-1]) + ", and " + items[-1]


def _distinct(draw: Callable[[], str], count: int,
              taken: set[str]) -> list[str]:
  """``count`` draws not in ``taken``; adds them to ``taken``."""
  out = []
  while len(out) < count:
    item = draw()
    if item not in taken:
      taken.add(item)
      out.append(item)
  return out


def _positive(name: str, value: int) -> None:
  if value <= 0:
    raise ValueError(f"{name} must be positive, got {value}")


def _needles(
    task: str,
    context_length: int,
    *,
    num_keys: int,
    num_values: int,
    num_queries: int,
    seed: int,
    index: int,
    count_tokens: sample_lib.TokenCounter,
    haystack: haystack_lib.Haystack | None,
) -> sample_lib.Sample:
  """NIAH: ``num_keys`` keys of ``num_values`` values; ``num_queries`` asked.

  Keys that are not asked are distractors: they look exactly like the asked
  needles, so retrieving "some needle" is not enough.
  """
  for name, value in (("num_keys", num_keys), ("num_values", num_values),
                      ("num_queries", num_queries)):
    _positive(name, value)
  if num_keys * num_values > len(_DEPTH_GRID):
    raise ValueError(
        f"at most {len(_DEPTH_GRID)} needles, got {num_keys * num_values}")
  rng = random.Random(f"{task}/{seed}/{index}")
  keys = _distinct(lambda: niah.random_key(rng), num_keys, set())
  taken_values: set[str] = set()
  values = [_distinct(lambda: niah.random_value(rng), num_values, taken_values)
            for _ in keys]
  texts = [_NEEDLE.format(key=key, value=value)
           for key, key_values in zip(keys, values) for value in key_values]
  depths = rng.sample(_DEPTH_GRID, len(texts))
  asked = sorted(rng.sample(range(num_keys), num_queries))
  asked_keys = _spoken_list([keys[i] for i in asked])
  if haystack is None:
    haystack = haystack_lib.Haystack.synthetic(f"{task}/{seed}/{index}")
  return niah.haystack_sample(
      task=task,
      inserts=list(zip(depths, texts)),
      question=_NIAH_QUESTION.format(keys=asked_keys),
      answers=[value for i in asked for value in values[i]],
      metric="string_match_all",
      template=_NIAH_TEMPLATE,
      answer_prefix=_NIAH_ANSWER_PREFIX.format(keys=asked_keys),
      max_new_tokens=_NIAH_MAX_NEW_TOKENS,
      context_length=context_length,
      count_tokens=count_tokens,
      haystack=haystack,
      meta={"seed": seed, "index": index, "depths": sorted(depths),
            "keys": keys, "queried_keys": [keys[i] for i in asked]},
  )


def niah_single(
    context_length: int, *, seed: int = 0, index: int = 0,
    count_tokens: sample_lib.TokenCounter = sample_lib.count_words,
    haystack: haystack_lib.Haystack | None = None) -> sample_lib.Sample:
  """One needle, at a random depth, asked for."""
  return _needles("ruler_niah_single", context_length, num_keys=1,
                  num_values=1, num_queries=1, seed=seed, index=index,
                  count_tokens=count_tokens, haystack=haystack)


def niah_multikey(
    context_length: int, *, seed: int = 0, index: int = 0,
    num_keys: int = 4,
    count_tokens: sample_lib.TokenCounter = sample_lib.count_words,
    haystack: haystack_lib.Haystack | None = None) -> sample_lib.Sample:
  """One asked needle among ``num_keys - 1`` distractor needles."""
  return _needles("ruler_niah_multikey", context_length, num_keys=num_keys,
                  num_values=1, num_queries=1, seed=seed, index=index,
                  count_tokens=count_tokens, haystack=haystack)


def niah_multivalue(
    context_length: int, *, seed: int = 0, index: int = 0,
    num_values: int = 4,
    count_tokens: sample_lib.TokenCounter = sample_lib.count_words,
    haystack: haystack_lib.Haystack | None = None) -> sample_lib.Sample:
  """One key with ``num_values`` values; all of them must be returned."""
  return _needles("ruler_niah_multivalue", context_length, num_keys=1,
                  num_values=num_values, num_queries=1, seed=seed,
                  index=index, count_tokens=count_tokens, haystack=haystack)


def niah_multiquery(
    context_length: int, *, seed: int = 0, index: int = 0,
    num_queries: int = 4,
    count_tokens: sample_lib.TokenCounter = sample_lib.count_words,
    haystack: haystack_lib.Haystack | None = None) -> sample_lib.Sample:
  """``num_queries`` needles with different keys, all asked at once."""
  return _needles("ruler_niah_multiquery", context_length,
                  num_keys=num_queries, num_values=1, num_queries=num_queries,
                  seed=seed, index=index, count_tokens=count_tokens,
                  haystack=haystack)


def variable_tracking(
    context_length: int, *, seed: int = 0, index: int = 0,
    num_chains: int = 1, num_hops: int = 4,
    count_tokens: sample_lib.TokenCounter = sample_lib.count_words,
    haystack: haystack_lib.Haystack | None = None) -> sample_lib.Sample:
  """Chains ``VAR A = 12345. VAR B = VAR A. ...``; name every variable of one.

  Each chain is a value assignment followed by ``num_hops`` copies, spread in
  order over the filler. Chain 0 is asked; the others are distractors with
  their own values. The answer needs every statement of the chain, wherever it
  sits, which is hard for a selection that keeps a few dense regions.

  Args:
    context_length: Target prompt length in tokens.
    seed: Run seed.
    index: Sample index within the run.
    num_chains: Chains in the context (1 asked, the rest distractors).
    num_hops: Copies per chain; the answer has ``num_hops + 1`` names.
    count_tokens: Token counter of the model's tokenizer.
    haystack: Filler; the built-in synthetic text if None.

  Returns:
    The sample; ``answers`` are the asked chain's variable names.
  """
  _positive("num_chains", num_chains)
  _positive("num_hops", num_hops)
  task = "ruler_vt"
  rng = random.Random(f"{task}/{seed}/{index}")
  taken_names: set[str] = set()
  taken_values: set[str] = set()
  inserts = []
  chains = []
  for _ in range(num_chains):
    names = _distinct(
        lambda: "".join(rng.choices(string.ascii_uppercase, k=5)),
        num_hops + 1, taken_names)
    (value,) = _distinct(lambda: str(rng.randint(10000, 99999)), 1,
                         taken_values)
    statements = [f"VAR {names[0]} = {value}."] + [
        f"VAR {name} = VAR {previous}."
        for previous, name in zip(names, names[1:])
    ]
    depths = sorted(rng.random() for _ in statements)
    inserts.extend(zip(depths, statements))
    chains.append((value, names))
  value, names = chains[0]
  if haystack is None:
    haystack = haystack_lib.Haystack.synthetic(f"{task}/{seed}/{index}")
  return niah.haystack_sample(
      task=task,
      inserts=inserts,
      question=_VT_QUESTION.format(value=value),
      answers=names,
      metric="string_match_all",
      template=_VT_TEMPLATE,
      answer_prefix=_VT_ANSWER_PREFIX.format(value=value),
      max_new_tokens=_VT_MAX_NEW_TOKENS,
      context_length=context_length,
      count_tokens=count_tokens,
      haystack=haystack,
      meta={"seed": seed, "index": index, "num_chains": num_chains,
            "num_hops": num_hops, "value": value},
  )


def _pseudo_word(rng: random.Random) -> str:
  """A pronounceable 6-letter non-word, e.g. "kamuro".

  All words have the same length, so a distinct word is never a substring of
  another and substring scoring cannot credit a wrong word.
  """
  return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS)
                 for _ in range(3))


def common_words_extraction(
    context_length: int, *, seed: int = 0, index: int = 0,
    num_common: int = 10, freq_common: int = 30, freq_uncommon: int = 3,
    count_tokens: sample_lib.TokenCounter = sample_lib.count_words,
) -> sample_lib.Sample:
  """A shuffled numbered word list; name the ``num_common`` frequent words.

  The common words occur ``freq_common`` times each; the list is filled to the
  target length with as many uncommon words (``freq_uncommon`` times each) as
  fit. Counting needs the whole list, so this task has no small "needle" set.

  Args:
    context_length: Target prompt length in tokens.
    seed: Run seed.
    index: Sample index within the run.
    num_common: Words to find (the answers).
    freq_common: Occurrences of each common word.
    freq_uncommon: Occurrences of each uncommon word; below freq_common.
    count_tokens: Token counter of the model's tokenizer.

  Returns:
    The sample; ``answers`` are the common words.

  Raises:
    ValueError: on inconsistent frequencies, or if the common words alone
      exceed the target.
  """
  for name, value in (("num_common", num_common), ("freq_common", freq_common),
                      ("freq_uncommon", freq_uncommon)):
    _positive(name, value)
  if freq_uncommon >= freq_common:
    raise ValueError(f"freq_uncommon ({freq_uncommon}) must be below "
                     f"freq_common ({freq_common})")
  task = "ruler_cwe"
  rng = random.Random(f"{task}/{seed}/{index}")
  taken: set[str] = set()
  common = _distinct(lambda: _pseudo_word(rng), num_common, taken)
  uncommon = haystack_lib.Haystack(
      lambda: _distinct(lambda: _pseudo_word(rng), 1, taken)[0],
      source="pseudo-words")
  question = _CWE_QUESTION.format(count=num_common)
  answer_prefix = _CWE_ANSWER_PREFIX.format(count=num_common)

  def word_list(num_uncommon: int) -> str:
    words = common * freq_common + uncommon.take(num_uncommon) * freq_uncommon
    random.Random(f"{task}/{seed}/{index}/{num_uncommon}").shuffle(words)
    return "\n".join(f"{i + 1}. {word}" for i, word in enumerate(words))

  def prompt_tokens(context: str) -> int:
    return count_tokens(sample_lib.render_prompt(
        _CWE_TEMPLATE, context, question, answer_prefix))

  num_uncommon, context = haystack_lib.largest_fitting(
      word_list, prompt_tokens, context_length)
  return sample_lib.Sample(
      task=task,
      context=context,
      question=question,
      answers=common,
      metric="string_match_all",
      template=_CWE_TEMPLATE,
      answer_prefix=answer_prefix,
      max_new_tokens=_CWE_MAX_NEW_TOKENS,
      meta={"seed": seed, "index": index, "context_length": context_length,
            "prompt_tokens": prompt_tokens(context),
            "filler_units": num_uncommon, "freq_common": freq_common,
            "freq_uncommon": freq_uncommon},
  )


# Task name -> generator(context_length, *, seed, index, count_tokens, ...).
RULER_TASKS: dict[str, Callable[..., sample_lib.Sample]] = {
    "ruler_niah_single": niah_single,
    "ruler_niah_multikey": niah_multikey,
    "ruler_niah_multivalue": niah_multivalue,
    "ruler_niah_multiquery": niah_multiquery,
    "ruler_vt": variable_tracking,
    "ruler_cwe": common_words_extraction,
}


def ruler_samples(
    task: str,
    context_lengths: Sequence[int],
    *,
    num_samples: int = 1,
    seed: int = 0,
    count_tokens: sample_lib.TokenCounter = sample_lib.count_words,
    haystack: haystack_lib.Haystack | None = None,
) -> list[sample_lib.Sample]:
  """``num_samples`` samples of ``task`` per context length, default options.

  Args:
    task: A name in `RULER_TASKS`.
    context_lengths: Target prompt lengths in tokens.
    num_samples: Samples per context length.
    seed: Run seed.
    count_tokens: Token counter of the model's tokenizer.
    haystack: Filler shared by all samples (e.g. from --haystack_file), or
      None for the built-in one.

  Returns:
    len(context_lengths) * num_samples samples, length-major.

  Raises:
    ValueError: for an unknown task, a non-positive num_samples, or a
      haystack for ruler_cwe, whose filler is its word list.
  """
  if task not in RULER_TASKS:
    raise ValueError(
        f"unknown RULER task {task!r}; expected one of {sorted(RULER_TASKS)}")
  _positive("num_samples", num_samples)
  options = {}
  if haystack is not None:
    if task == "ruler_cwe":
      raise ValueError("ruler_cwe fills its context with its word list and "
                       "takes no haystack")
    options["haystack"] = haystack
  return [
      RULER_TASKS[task](length, seed=seed, index=index,
                        count_tokens=count_tokens, **options)
      for length in context_lengths
      for index in range(num_samples)
  ]
