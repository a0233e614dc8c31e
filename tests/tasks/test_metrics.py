"""Metrics against hand-computed values on small cases."""

import pytest

from mage_jax.tasks import metrics
from mage_jax.tasks import niah


def test_normalize_answer():
  assert metrics.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
  assert metrics.normalize_answer("An apple a day") == "apple day"
  # Articles are dropped as whole words only.
  assert metrics.normalize_answer("Theater anthem") == "theater anthem"


@pytest.mark.parametrize("prediction, answer, expected", [
    ("The magic number is 1,234,567.", "1234567", 1.0),
    ("1234567", "1234567", 1.0),
    ("It is 12345678.", "1234567", 0.0),
    ("no idea", "1234567", 0.0),
    ("The answer: New York City.", "new york", 1.0),
    ("The answer: New Jersey, York.", "new york", 0.0),
])
def test_exact_match(prediction, answer, expected):
  assert metrics.exact_match(prediction, answer) == expected


def test_exact_match_rejects_an_empty_answer():
  with pytest.raises(ValueError, match="empty after normalisation"):
    metrics.exact_match("anything", "The.")


def test_string_match_all_and_part():
  refs = ["11", "22", "33", "44"]
  assert metrics.string_match_all("values: 11 and 22", refs) == 0.5
  assert metrics.string_match_part("values: 11 and 22", refs) == 1.0
  assert metrics.string_match_part("values: 55", refs) == 0.0
  assert metrics.string_match_all("ABCDE, fghij", ["abcde", "FGHIJ"]) == 1.0
  with pytest.raises(ValueError):
    metrics.string_match_all("x", [])


def test_qa_f1_score():
  # pred tokens [cat, sat, on, mat], truth [cat, on, mat]: P = 3/4, R = 1.
  assert metrics.qa_f1_score("The cat sat on the mat.",
                             "a cat on a mat") == pytest.approx(6 / 7)
  assert metrics.qa_f1_score("Paris", "paris") == 1.0
  assert metrics.qa_f1_score("London", "Paris") == 0.0
  assert metrics.qa_f1_score("", "Paris") == 0.0
  # Shared counts are clipped: "b b c" and "b c c" share {b: 1, c: 1}, so
  # P = R = 2/3.
  assert metrics.qa_f1_score("b b c", "b c c") == pytest.approx(2 / 3)


def test_longest_common_subsequence():
  assert metrics.longest_common_subsequence(list("ABCBDAB"),
                                            list("BDCABA")) == 4
  assert metrics.longest_common_subsequence([], ["a"]) == 0
  assert metrics.longest_common_subsequence(["x", "y"], ["y", "x"]) == 1


def test_rouge_score():
  # LCS "a c d" = 3: P = 3/4, R = 3/5, F = 2/3.
  assert metrics.rouge_score("a b c d", "a c d e f") == pytest.approx(2 / 3)
  # Periods separate tokens: [police, killed, the, gunman] vs
  # [police, kill, the, gunman]: LCS 3, P = R = 3/4.
  assert metrics.rouge_score("police killed the gunman.",
                             "police kill the gunman") == pytest.approx(0.75)
  assert metrics.rouge_score("", "anything") == 0.0
  assert metrics.rouge_score("x y", "z") == 0.0


def test_classification_score():
  classes = ["Location", "City", "Country", "Count", "Number"]
  assert metrics.classification_score("City", "City", classes) == 1.0
  assert metrics.classification_score("City or Number", "City",
                                      classes) == 0.5
  # "Count" occurs inside "Country": three classes are named.
  assert metrics.classification_score("City or Country", "City",
                                      classes) == pytest.approx(1 / 3)
  assert metrics.classification_score("Location", "City", classes) == 0.0
  assert metrics.classification_score("nothing known", "City", classes) == 0.0
  # "Count" is a substring of the truth "Country", so it is not held against
  # the prediction.
  assert metrics.classification_score("Country", "Country", classes) == 1.0


def test_retrieval_and_count_scores():
  assert metrics.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
  assert metrics.retrieval_score("Paragraph 3 or 12", "Paragraph 3") == 0.5
  assert metrics.retrieval_score("I do not know", "Paragraph 3") == 0.0
  with pytest.raises(ValueError, match="Paragraph"):
    metrics.retrieval_score("3", "3")
  assert metrics.count_score("There are 7 unique out of 10", "7") == 0.5
  assert metrics.count_score("7", "7") == 1.0
  assert metrics.count_score("seven", "7") == 0.0


def test_score_prediction_takes_the_best_reference():
  # qa_f1 against "Paris": 1.0, against "City of Light": 0.0.
  assert metrics.score_prediction("hotpotqa", "qa_f1_score", "Paris",
                                  ["City of Light", "Paris"]) == 1.0
  # "Paris France" vs "Paris": P = 1/2, R = 1 -> 2/3.
  assert metrics.score_prediction("hotpotqa", "qa_f1_score", "Paris France",
                                  ["Paris"]) == pytest.approx(2 / 3)


def test_score_prediction_keeps_only_the_first_line_for_few_shot_tasks():
  prediction = "\nParis\nQuestion: Which river? Answer: London"
  # hotpotqa scores the whole text: tokens [paris, question, which, river,
  # answer, london] vs [london]: P = 1/6, R = 1 -> 2/7.
  assert metrics.score_prediction("hotpotqa", "qa_f1_score", prediction,
                                  ["London"]) == pytest.approx(2 / 7)
  assert metrics.score_prediction("triviaqa", "qa_f1_score", prediction,
                                  ["London"]) == 0.0
  assert metrics.score_prediction("triviaqa", "qa_f1_score", prediction,
                                  ["Paris", "London"]) == 1.0


def test_score_prediction_rejects_unknown_metric_and_no_answers():
  with pytest.raises(ValueError, match="unknown metric"):
    metrics.score_prediction("niah", "bleu", "x", ["x"])
  with pytest.raises(ValueError, match="no reference answers"):
    metrics.score_prediction("niah", "exact_match", "x", [])


def test_score_sample_on_a_niah_sample():
  sample = niah.niah_sample(300, 0.5, seed=2)
  (value,) = sample.answers
  assert metrics.score_sample(sample, f" {value}.") == 1.0
  assert metrics.score_sample(sample, f" {value[:-1]}.") == 0.0
