"""Synthetic task generators: determinism, answers present, lengths, depths."""

from collections import Counter
import re

import pytest

from mage_jax.tasks import haystack as haystack_lib
from mage_jax.tasks import niah
from mage_jax.tasks import ruler
from mage_jax.tasks import sample as sample_lib


def count_chars_over_4(text: str) -> int:
  """A tokenizer-like count that is not additive over words."""
  return (len(text) + 3) // 4


COUNTERS = [sample_lib.count_words, count_chars_over_4]


# ---------------------------------------------------------------- haystack


def test_synthetic_haystack_is_deterministic_varied_and_digit_free():
  first = haystack_lib.Haystack.synthetic(7).take(300)
  assert first == haystack_lib.Haystack.synthetic(7).take(300)
  assert first != haystack_lib.Haystack.synthetic(8).take(300)
  assert len(set(first)) >= 290
  text = " ".join(first)
  assert not re.search(r"\d", text)
  assert not re.search(r"\b[A-Z]{2,}\b", text)
  assert len(set(text.lower().split())) > 150


def test_haystack_take_returns_prefixes_of_one_stream():
  stream = haystack_lib.Haystack.synthetic(1)
  assert stream.take(50)[:20] == stream.take(20)


def test_haystack_file_cycles_its_sentences(tmp_path):
  path = tmp_path / "essay.txt"
  path.write_text("First line here.\nSecond one!  Third?\n\n", encoding="utf-8")
  stream = haystack_lib.Haystack.from_file(path)
  assert stream.take(5) == ["First line here.", "Second one!", "Third?",
                            "First line here.", "Second one!"]
  assert stream.source == str(path)


@pytest.mark.parametrize("content", [b"", b" \n\t\n"])
def test_haystack_file_without_text_is_rejected(tmp_path, content):
  path = tmp_path / "empty.txt"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="empty.txt contains no text"):
    haystack_lib.Haystack.from_file(path)


def test_haystack_file_unreadable_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="cannot read haystack file .*missing"):
    haystack_lib.Haystack.from_file(tmp_path / "missing.txt")
  binary = tmp_path / "binary.txt"
  binary.write_bytes(b"\xff\xfe\x00bad")
  with pytest.raises(ValueError, match="binary.txt"):
    haystack_lib.Haystack.from_file(binary)


def test_insert_at_depths_places_inserts_at_sentence_boundaries():
  sentences = ["Aaaa.", "Bbbb.", "Cccc.", "Dddd."]
  text = haystack_lib.insert_at_depths(
      sentences, [(1.0, "END"), (0.0, "START"), (0.5, "MID1"), (0.5, "MID2")])
  assert text == "START Aaaa. Bbbb. MID1 MID2 Cccc. Dddd. END"
  with pytest.raises(ValueError, match="depth"):
    haystack_lib.insert_at_depths(sentences, [(1.5, "x")])


def test_largest_fitting_finds_the_boundary_and_rejects_impossible_targets():
  assert haystack_lib.largest_fitting(lambda n: n, lambda n: 3 * n + 1,
                                      100) == (33, 33)
  with pytest.raises(ValueError, match="too small"):
    haystack_lib.largest_fitting(lambda n: n, lambda n: n + 11, 10)
  with pytest.raises(ValueError, match="does not grow"):
    haystack_lib.largest_fitting(lambda n: n, lambda n: 0, 10)


# ---------------------------------------------------------------- NIAH


def test_niah_is_deterministic_per_seed():
  a = niah.niah_sample(600, 0.4, seed=3, index=1)
  assert a == niah.niah_sample(600, 0.4, seed=3, index=1)
  assert a.answers != niah.niah_sample(600, 0.4, seed=4, index=1).answers
  assert a.answers != niah.niah_sample(600, 0.4, seed=3, index=2).answers


@pytest.mark.parametrize("count_tokens", COUNTERS)
@pytest.mark.parametrize("target", [300, 2000])
def test_niah_prompt_fills_but_never_exceeds_the_target(count_tokens, target):
  sample = niah.niah_sample(target, 0.5, count_tokens=count_tokens)
  tokens = count_tokens(sample.prompt())
  assert tokens == sample.meta["prompt_tokens"]
  assert tokens <= target
  # Adding one more filler sentence (< 40 tokens) would have crossed it.
  assert tokens > target - 40


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_niah_needle_is_at_the_requested_depth(depth):
  sample = niah.niah_sample(3000, depth, seed=5)
  (value,) = sample.answers
  needle = niah.NEEDLE.format(key=sample.meta["key"], value=value)
  assert sample.context.count(needle) == 1
  position = sample.context.index(needle) / len(sample.context)
  assert abs(position - depth) < 0.02
  if depth == 0.0:
    assert sample.context.startswith(needle)
  if depth == 1.0:
    assert sample.context.endswith(needle)


def test_niah_grid_covers_lengths_depths_and_samples_with_answers_present():
  samples = niah.niah_grid([200, 400], [0.0, 0.5, 1.0], num_samples=2, seed=9)
  cells = [(s.meta["context_length"], s.meta["depth"], s.meta["index"])
           for s in samples]
  assert cells == [(n, d, i) for n in (200, 400) for d in (0.0, 0.5, 1.0)
                   for i in (0, 1)]
  for s in samples:
    assert s.answers[0] in s.context
    assert s.meta["key"] in s.prompt()
    assert s.metric == "exact_match"
  # The needle depends on the sample index, not on the grid cell.
  assert {s.answers[0] for s in samples if s.meta["index"] == 0} == {
      samples[0].answers[0]}


def test_niah_uses_a_haystack_file(tmp_path):
  path = tmp_path / "essay.txt"
  path.write_text("The lighthouse keeper counted ships every night. " * 3,
                  encoding="utf-8")
  sample = niah.niah_sample(
      150, 0.5, haystack=haystack_lib.Haystack.from_file(path))
  assert "lighthouse keeper" in sample.context
  assert sample.answers[0] in sample.context
  assert sample.meta["haystack"] == str(path)


def test_niah_rejects_bad_depth_and_tiny_target():
  with pytest.raises(ValueError, match="depth"):
    niah.niah_sample(500, 1.2)
  with pytest.raises(ValueError, match="too small"):
    niah.niah_sample(20, 0.5)


# ---------------------------------------------------------------- RULER


@pytest.mark.parametrize("task", sorted(ruler.RULER_TASKS))
@pytest.mark.parametrize("count_tokens", COUNTERS)
def test_ruler_tasks_are_deterministic_fit_and_contain_their_answers(
    task, count_tokens):
  make = ruler.RULER_TASKS[task]
  sample = make(1500, seed=11, index=2, count_tokens=count_tokens)
  assert sample == make(1500, seed=11, index=2, count_tokens=count_tokens)
  assert sample.answers != make(1500, seed=12, index=2,
                                count_tokens=count_tokens).answers
  assert sample.task == task
  assert count_tokens(sample.prompt()) <= 1500
  assert count_tokens(sample.prompt()) > 1400
  assert sample.answers
  for answer in sample.answers:
    assert answer in sample.context


def _needle_values(sample):
  return dict(re.findall(r"magic numbers for ([a-z]+-[a-z]+) is (\d+)\.",
                         sample.context))


def test_ruler_multikey_hides_the_asked_needle_among_distractors():
  sample = ruler.niah_multikey(2000, seed=1, num_keys=5)
  found = re.findall(r"magic numbers for ([a-z]+-[a-z]+) is (\d+)\.",
                     sample.context)
  assert len(found) == 5 and len({k for k, _ in found}) == 5
  (asked,) = sample.meta["queried_keys"]
  assert sample.answers == [v for k, v in found if k == asked]
  others = [k for k, _ in found if k != asked]
  assert all(k not in sample.question for k in others)


def test_ruler_multivalue_asks_for_every_value_of_one_key():
  sample = ruler.niah_multivalue(2000, seed=2, num_values=3)
  found = re.findall(r"magic numbers for ([a-z]+-[a-z]+) is (\d+)\.",
                     sample.context)
  assert len({k for k, _ in found}) == 1
  assert sorted(sample.answers) == sorted(v for _, v in found)
  assert len(set(sample.answers)) == 3
  assert sample.metric == "string_match_all"


def test_ruler_multiquery_asks_every_key():
  sample = ruler.niah_multiquery(2000, seed=3, num_queries=3)
  values = _needle_values(sample)
  assert len(values) == 3
  for key in values:
    assert key in sample.question
  assert sample.answers == [values[k] for k in sample.meta["queried_keys"]]


def test_ruler_needles_do_not_collide_in_depth():
  sample = ruler.niah_multikey(2000, seed=4, num_keys=8)
  assert len(set(sample.meta["depths"])) == 8


@pytest.mark.parametrize("num_chains", [1, 3])
def test_variable_tracking_answer_is_the_resolved_chain(num_chains):
  sample = ruler.variable_tracking(3000, seed=5, num_chains=num_chains,
                                   num_hops=3)
  statements = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})\.",
                          sample.context)
  assert len(statements) == num_chains * 4
  bound: dict[str, str] = {}
  for name, source in statements:  # in text order: a name is bound before use
    bound[name] = bound[source[4:]] if source.startswith("VAR ") else source
  value = sample.meta["value"]
  assert value in sample.question
  assert sorted(sample.answers) == sorted(
      n for n, v in bound.items() if v == value)
  assert len(sample.answers) == 4


def test_common_words_are_exactly_the_most_frequent():
  sample = ruler.common_words_extraction(3000, seed=6, num_common=5,
                                         freq_common=20, freq_uncommon=2)
  words = re.findall(r"^\d+\. ([a-z]+)$", sample.context, flags=re.MULTILINE)
  numbers = re.findall(r"^(\d+)\. ", sample.context, flags=re.MULTILINE)
  assert numbers == [str(i) for i in range(1, len(words) + 1)]
  counts = Counter(words)
  assert {w: counts[w] for w in sample.answers} == {
      w: 20 for w in sample.answers}
  assert set(counts) - set(sample.answers)
  assert all(c == 2 for w, c in counts.items() if w not in sample.answers)


def test_ruler_rejects_bad_options():
  with pytest.raises(ValueError, match="num_keys must be positive"):
    ruler.niah_multikey(1000, num_keys=0)
  with pytest.raises(ValueError, match="at most 41 needles"):
    ruler.niah_multivalue(1000, num_values=42)
  with pytest.raises(ValueError, match="num_hops must be positive"):
    ruler.variable_tracking(1000, num_hops=0)
  with pytest.raises(ValueError, match="freq_uncommon"):
    ruler.common_words_extraction(1000, freq_common=3, freq_uncommon=3)
  with pytest.raises(ValueError, match="too small"):
    ruler.common_words_extraction(100)
  with pytest.raises(ValueError, match="unknown RULER task"):
    ruler.ruler_samples("ruler_nope", [1000])


def test_ruler_samples_cover_lengths_and_indices():
  samples = ruler.ruler_samples("ruler_vt", [500, 900], num_samples=2, seed=1)
  assert [(s.meta["context_length"], s.meta["index"]) for s in samples] == [
      (500, 0), (500, 1), (900, 0), (900, 1)]


def test_ruler_samples_use_a_haystack_file(tmp_path):
  path = tmp_path / "essay.txt"
  path.write_text("The lighthouse keeper counted ships every night.",
                  encoding="utf-8")
  stream = haystack_lib.Haystack.from_file(path)
  (sample,) = ruler.ruler_samples("ruler_niah_multikey", [400],
                                  haystack=stream)
  assert "lighthouse keeper" in sample.context
  assert sample.meta["haystack"] == str(path)
  with pytest.raises(ValueError, match="takes no haystack"):
    ruler.ruler_samples("ruler_cwe", [400], haystack=stream)


def test_recall_drill_asks_every_needle_once_after_an_niah_prompt():
  text = niah.recall_drill_text(600, 6, seed=3, index=4)
  assert text == niah.recall_drill_text(600, 6, seed=3, index=4)
  needles = dict(re.findall(r"The special magic number for (\S+) is (\d{7})\.", text))
  asked = re.findall(r"What is the special magic number for (\S+) mentioned in the text\? "
                     r"The special magic number for (\S+) mentioned in the text is (\d{7})\.", text)
  assert len(needles) == 6
  assert sorted(k for k, _, _ in asked) == sorted(needles)
  assert all(k == k2 and needles[k] == v for k, k2, v in asked)
  # The document opens as an NIAH eval prompt of at most the target length.
  prompt = text[:text.index(" " + asked[0][2] + ".")]
  assert prompt.startswith("A special magic number is hidden")
  assert sample_lib.count_words(prompt) <= 600


def test_recall_drill_rejects_bad_needle_counts_and_tiny_targets():
  with pytest.raises(ValueError, match="num_needles must be in"):
    niah.recall_drill_text(600, 0)
  with pytest.raises(ValueError, match="num_needles must be in"):
    niah.recall_drill_text(600, len(niah.all_keys()) + 1)
  with pytest.raises(ValueError, match="too small"):
    niah.recall_drill_text(60, 8)


@pytest.mark.parametrize("target", [7, 50, 333])
def test_repeated_passage_is_a_passage_twice_within_the_target(target):
  text = haystack_lib.repeated_passage(target, seed=1, index=2,
                                       count_tokens=sample_lib.count_words)
  first, second = text.split("\n\n")
  assert first == second and first
  assert sample_lib.count_words(text) <= target
  # Filled: one more word would not fit.
  assert sample_lib.count_words(text) + 2 > target
  assert text == haystack_lib.repeated_passage(target, seed=1, index=2,
                                               count_tokens=sample_lib.count_words)
  with pytest.raises(ValueError, match="cannot hold a word twice"):
    haystack_lib.repeated_passage(1, seed=1, index=2, count_tokens=sample_lib.count_words)


def test_repeated_passage_number_share_mixes_in_seven_digit_numbers():
  count = sample_lib.count_words
  plain = haystack_lib.repeated_passage(400, seed=1, index=2, count_tokens=count)
  mixed = haystack_lib.repeated_passage(400, seed=1, index=2, count_tokens=count,
                                        number_share=0.3)
  first, second = mixed.split("\n\n")
  assert first == second
  items = first.split(" ")
  numbers = [w for w in items if re.fullmatch(r"\d{7}", w)]
  assert 0.15 < len(numbers) / len(items) < 0.45
  assert not re.search(r"\d{2}", plain)  # share 0: the original stream, digits single
  with pytest.raises(ValueError, match="number_share must be in"):
    haystack_lib.repeated_passage(400, seed=1, index=2, count_tokens=count, number_share=1.5)


def test_repeated_passage_number_digits_sets_the_numbers_length():
  count = sample_lib.count_words
  mixed = haystack_lib.repeated_passage(400, seed=1, index=2, count_tokens=count,
                                        number_share=0.3)
  # 7 digits is the default and keeps the stream the shipped recipe was trained on.
  assert mixed == haystack_lib.repeated_passage(400, seed=1, index=2, count_tokens=count,
                                                number_share=0.3, number_digits=7)
  longer = haystack_lib.repeated_passage(400, seed=1, index=2, count_tokens=count,
                                         number_share=0.3, number_digits=10)
  numbers = [w for w in re.findall(r"\d+", longer.split("\n\n")[0]) if len(w) > 1]
  assert numbers and all(len(n) == 10 for n in numbers)  # (single digits are filler words)
  with pytest.raises(ValueError, match="number_digits must be in"):
    haystack_lib.repeated_passage(400, seed=1, index=2, count_tokens=count, number_share=0.3,
                                  number_digits=0)


def test_recall_drill_value_digits_sets_the_values_lengths():
  # The default (7, 7) keeps the stream the shipped recipe was trained on.
  assert niah.recall_drill_text(900, 8, seed=3, index=4) == niah.recall_drill_text(
      900, 8, seed=3, index=4, value_digits=(7, 7))
  text = niah.recall_drill_text(900, 8, seed=3, index=4, value_digits=(5, 12))
  needles = dict(re.findall(r"The special magic number for (\S+) is (\d+)\.", text))
  answered = dict(re.findall(r"The special magic number for (\S+) mentioned in the text is "
                             r"(\d+)\.", text))
  assert len(needles) == 8 and answered == needles
  lengths = {len(v) for v in needles.values()}
  assert lengths <= set(range(5, 13)) and len(lengths) > 1
  fixed = niah.recall_drill_text(900, 8, seed=3, index=4, value_digits=(10, 10))
  assert all(len(v) == 10 for v in re.findall(r"is (\d+)\.", fixed))
  for bad in ((8, 7), (0, 7), (7, 19), (7,)):
    with pytest.raises(ValueError, match="value_digits must be"):
      niah.recall_drill_text(900, 8, value_digits=bad)
