"""LongBench loading, templates, truncation, scoring on hand-written files."""

import json
import pathlib

import pytest

from mage_jax.tasks import longbench
from mage_jax.tasks import metrics

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "longbench"


def test_loads_official_records_in_file_order():
  samples = longbench.load_longbench(FIXTURES / "qasper.jsonl", "qasper")
  assert [s.question for s in samples] == [
      "What dataset do they evaluate on?", "Is the model trained end-to-end?"]
  first = samples[0]
  assert first.task == "qasper"
  assert first.answers == ["Penn Treebank", "the Penn Treebank (PTB)"]
  assert first.metric == "qa_f1_score"
  assert first.max_new_tokens == 128
  assert first.meta["id"] == "5b6e2a0c1f7d4e8a9b3c2d1e0f4a5b6c7d8e9f0a1b2c3d4e"
  assert first.meta["length"] == 17
  assert first.meta["chat_template"] is True
  assert first.meta["source"].endswith("qasper.jsonl:1")


def test_prompt_is_the_official_template_filled_in():
  (sample,) = longbench.load_longbench(FIXTURES / "multifieldqa_en.jsonl")
  assert sample.prompt() == (
      "Read the following text and answer briefly.\n\n"
      "The old stone bridge was built in Ghent in 1820.\n\n"
      "Now, answer the following question based on the above text, only give "
      "me the answer and do not output any other words.\n\n"
      "Question: Where was the bridge built?\nAnswer:")
  assert sample.max_new_tokens == 64


def test_triviaqa_is_few_shot_and_scored_on_the_first_line():
  (sample,) = longbench.load_longbench(FIXTURES / "triviaqa.jsonl")
  assert sample.meta["chat_template"] is False
  assert sample.max_new_tokens == 32
  assert sample.prompt().startswith(
      "Answer the question based on the given passage. Only give me the "
      "answer and do not output any other words. The following are some "
      "examples.\n\nPassage:\nMount Kilimanjaro")
  assert sample.prompt().endswith("Which river flows through Paris?\nAnswer:")
  assert metrics.score_sample(sample, " Seine\n\nPassage: Danube") == 1.0
  # "the River Seine" normalises to [river, seine]; best truth "River Seine".
  assert metrics.score_sample(sample, "The River Seine") == 1.0
  assert metrics.score_sample(sample, "\nDanube\nSeine") == 0.0


def test_the_mage_datasets_have_template_length_and_metric():
  expected_max_new_tokens = {"narrativeqa": 128, "qasper": 128,
                             "multifieldqa_en": 64, "hotpotqa": 32,
                             "triviaqa": 32, "qmsum": 512}
  for name in longbench.MAGE_DATASETS:
    assert longbench.DATASET_MAX_NEW_TOKENS[name] == expected_max_new_tokens[
        name]
    assert "{context}" in longbench.DATASET_PROMPTS[name]
    assert longbench.DATASET_METRICS[name] in metrics.METRICS
  assert longbench.DATASET_METRICS["qmsum"] == "rouge_score"
  assert longbench.DATASET_PROMPTS["qmsum"].endswith("Query: {input}\nAnswer:")


def _write(tmp_path, lines, name="data.jsonl"):
  path = tmp_path / name
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


def _record(**overrides):
  record = {"input": "q?", "context": "c.", "answers": ["a"], "length": 2,
            "dataset": "hotpotqa", "language": "en", "all_classes": None,
            "_id": "x1"}
  record.update(overrides)
  return json.dumps(record)


def test_malformed_line_is_reported_with_file_and_line(tmp_path):
  path = _write(tmp_path, [_record(), "", '{"input": "q?", "context'])
  with pytest.raises(ValueError, match=r"data\.jsonl:3: malformed JSON"):
    longbench.load_longbench(path)


@pytest.mark.parametrize("line, message", [
    ('["not", "an", "object"]', "expected a JSON object"),
    (json.dumps({"input": "q?"}), "missing field.*answers"),
    (_record(answers="a"), "'answers' has type str"),
    (_record(answers=[]), "non-empty list of strings"),
    (_record(length="2"), "'length' has type str"),
    (_record(dataset="dureader"), "unsupported dataset 'dureader'"),
])
def test_bad_records_are_rejected(tmp_path, line, message):
  path = _write(tmp_path, [_record(), line])
  with pytest.raises(ValueError, match=r"data\.jsonl:2: .*" + message):
    longbench.load_longbench(path)


def test_file_errors_are_reported(tmp_path):
  with pytest.raises(ValueError, match="cannot read LongBench file .*nope"):
    longbench.load_longbench(tmp_path / "nope.jsonl")
  empty = _write(tmp_path, ["", "  "], name="empty.jsonl")
  with pytest.raises(ValueError, match="empty.jsonl has no records"):
    longbench.load_longbench(empty)
  with pytest.raises(ValueError, match="loaded as 'qasper'"):
    longbench.load_longbench(FIXTURES / "triviaqa.jsonl", "qasper")
  with pytest.raises(ValueError, match="unsupported LongBench dataset"):
    longbench.load_longbench(FIXTURES / "triviaqa.jsonl", "lcc")


def test_longbench_e_records_use_the_base_dataset(tmp_path):
  path = _write(tmp_path, [_record(dataset="hotpotqa_e")])
  (sample,) = longbench.load_longbench(path, "hotpotqa")
  assert sample.task == "hotpotqa"
  assert sample.meta["longbench_e"] is True


def _encode(text):
  return [ord(ch) for ch in text]


def _decode(ids):
  return "".join(chr(i) for i in ids)


def test_truncate_middle_keeps_head_and_tail_halves():
  assert longbench.truncate_middle("abcdefghij", 4, _encode,
                                   _decode) == "abij"
  # An odd budget keeps int(max_length / 2) tokens at each end, as pred.py.
  assert longbench.truncate_middle("abcdefghij", 5, _encode,
                                   _decode) == "abij"
  assert longbench.truncate_middle("abcdefghij", 10, _encode,
                                   _decode) == "abcdefghij"
  with pytest.raises(ValueError, match="at least 2"):
    longbench.truncate_middle("abc", 1, _encode, _decode)
