"""LongBench (v1) from local JSONL files in the official format.

Prompt templates, generation lengths and the dataset -> metric map are
reproduced from THUDM/LongBench (config/dataset2prompt.json,
config/dataset2maxlen.json, eval.py) for the English datasets whose metrics
`mage_jax.tasks.metrics` implements. The MAGE paper reports NarrativeQA,
Qasper, MultiFieldQA-en, HotpotQA, TriviaQA and QMSum.
"""

from collections.abc import Callable, Sequence
import json
import os
from typing import Any

from mage_jax.tasks import sample as sample_lib

# Verbatim from LongBench's config/dataset2prompt.json.
DATASET_PROMPTS: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie "
        "script, and a question. Answer the question as concisely as you "
        "can, using a single phrase if possible. Do not provide any "
        "explanation.\n\nStory: {context}\n\nNow, answer the question based "
        "on the story as concisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\n"
        "Answer:"),
    "qasper": (
        "You are given a scientific article and a question. Answer the "
        "question as concisely as you can, using a single phrase or sentence "
        "if possible. If the question cannot be answered based on the "
        "information in the article, write \"unanswerable\". If the question "
        "is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". "
        "Do not provide any explanation.\n\nArticle: {context}\n\n Answer the "
        "question based on the above article as concisely as you can, using "
        "a single phrase or sentence if possible. If the question cannot be "
        "answered based on the information in the article, write "
        "\"unanswerable\". If the question is a yes/no question, answer "
        "\"yes\", \"no\", or \"unanswerable\". Do not provide any "
        "explanation.\n\nQuestion: {input}\n\nAnswer:"),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, "
        "answer the following question based on the above text, only give me "
        "the answer and do not output any other words.\n\nQuestion: {input}\n"
        "Answer:"),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the "
        "answer and do not output any other words.\n\nThe following are given "
        "passages.\n{context}\n\nAnswer the question based on the given "
        "passages. Only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:"),
    "2wikimqa": (
        "Answer the question based on the given passages. Only give me the "
        "answer and do not output any other words.\n\nThe following are given "
        "passages.\n{context}\n\nAnswer the question based on the given "
        "passages. Only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:"),
    "musique": (
        "Answer the question based on the given passages. Only give me the "
        "answer and do not output any other words.\n\nThe following are given "
        "passages.\n{context}\n\nAnswer the question based on the given "
        "passages. Only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:"),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page "
        "summary of the report.\n\nReport:\n{context}\n\nNow, write a "
        "one-page summary of the report.\n\nSummary:"),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question "
        "or instruction. Answer the query in one or more sentences.\n\n"
        "Transcript:\n{context}\n\nNow, answer the query based on the above "
        "meeting transcript in one or more sentences.\n\nQuery: {input}\n"
        "Answer:"),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all "
        "news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all "
        "the news.\n\nSummary:"),
    "trec": (
        "Please determine the type of the question below. Here are some "
        "examples of questions.\n\n{context}\n{input}"),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the "
        "answer and do not output any other words. The following are some "
        "examples.\n\n{context}\n\n{input}"),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are "
        "some examples.\n\n{context}\n\n{input}"),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them "
        "may be duplicates. Please carefully read these paragraphs and "
        "determine how many unique paragraphs there are after removing "
        "duplicates. In other words, how many non-repeating paragraphs are "
        "there in total?\n\n{context}\n\nPlease enter the final count of "
        "unique paragraphs after removing duplicates. The output format "
        "should only contain the number, such as 1, 2, 3, and so on.\n\nThe "
        "final answer is: "),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. "
        "Please determine which paragraph the abstract is from.\n\n{context}"
        "\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the "
        "number of the paragraph that the abstract is from. The answer format "
        "must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer "
        "is: "),
}

# LongBench's config/dataset2maxlen.json: max new tokens per dataset.
DATASET_MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "passage_count": 32,
    "passage_retrieval_en": 32,
}

# LongBench's eval.py dataset2metric, as names in mage_jax.tasks.metrics.
DATASET_METRICS: dict[str, str] = {
    "narrativeqa": "qa_f1_score",
    "qasper": "qa_f1_score",
    "multifieldqa_en": "qa_f1_score",
    "hotpotqa": "qa_f1_score",
    "2wikimqa": "qa_f1_score",
    "musique": "qa_f1_score",
    "gov_report": "rouge_score",
    "qmsum": "rouge_score",
    "multi_news": "rouge_score",
    "trec": "classification_score",
    "triviaqa": "qa_f1_score",
    "samsum": "rouge_score",
    "passage_count": "count_score",
    "passage_retrieval_en": "retrieval_score",
}

# LongBench's pred.py feeds these few-shot / completion prompts to chat models
# without the chat template.
NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc",
                              "repobench-p"})

# The six datasets of the MAGE paper's LongBench table.
MAGE_DATASETS = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa",
                 "triviaqa", "qmsum")

_FIELDS: dict[str, type | tuple[type, ...]] = {
    "input": str,
    "context": str,
    "answers": list,
    "length": int,
    "dataset": str,
    "language": str,
    "all_classes": (list, type(None)),
    "_id": str,
}


def _base_dataset(name: str) -> str:
  """LongBench-E records name their dataset "<name>_e"."""
  if name not in DATASET_PROMPTS and name.endswith("_e"):
    return name[:-2]
  return name


def _parse_record(record: Any, where: str) -> sample_lib.Sample:
  """Validates one decoded JSON line and makes a Sample of it."""
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object, got "
                     f"{type(record).__name__}")
  missing = sorted(set(_FIELDS) - set(record))
  if missing:
    raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
  for field, kind in _FIELDS.items():
    if not isinstance(record[field], kind) or isinstance(record[field], bool):
      raise ValueError(f"{where}: field {field!r} has type "
                       f"{type(record[field]).__name__}")
  answers = record["answers"]
  if not answers or not all(isinstance(a, str) for a in answers):
    raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
  dataset = _base_dataset(record["dataset"])
  if dataset not in DATASET_PROMPTS:
    raise ValueError(f"{where}: unsupported dataset {record['dataset']!r}; "
                     f"supported: {sorted(DATASET_PROMPTS)}")
  return sample_lib.Sample(
      task=dataset,
      context=record["context"],
      question=record["input"],
      answers=list(answers),
      metric=DATASET_METRICS[dataset],
      template=DATASET_PROMPTS[dataset],
      max_new_tokens=DATASET_MAX_NEW_TOKENS[dataset],
      meta={
          "id": record["_id"],
          "length": record["length"],
          "language": record["language"],
          "all_classes": record["all_classes"],
          "longbench_e": dataset != record["dataset"],
          "chat_template": dataset not in NO_CHAT_TEMPLATE,
          "source": where,
      },
  )


def load_longbench(path: str | os.PathLike[str],
                   dataset: str | None = None) -> list[sample_lib.Sample]:
  """Reads a LongBench JSONL file (one official record per line).

  Args:
    path: File such as ``data/qasper.jsonl`` from the official release.
    dataset: If given, every record must belong to this dataset, which
      catches a file passed under the wrong task name.

  Returns:
    One sample per record, in file order; blank lines are skipped.

  Raises:
    ValueError: naming the file (and line) if it cannot be read, is empty,
      or has a malformed or unsupported record.
  """
  if dataset is not None and dataset not in DATASET_PROMPTS:
    raise ValueError(f"unsupported LongBench dataset {dataset!r}; "
                     f"supported: {sorted(DATASET_PROMPTS)}")
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read LongBench file {path}: {e}") from e
  samples = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f"{os.fspath(path)}:{number}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: malformed JSON: {e}") from e
    sample = _parse_record(record, where)
    if dataset is not None and sample.task != dataset:
      raise ValueError(f"{where}: record of dataset {sample.task!r} in a "
                       f"file loaded as {dataset!r}")
    samples.append(sample)
  if not samples:
    raise ValueError(f"LongBench file {path} has no records")
  return samples


def truncate_middle(prompt: str, max_length: int,
                    encode: Callable[[str], Sequence[int]],
                    decode: Callable[[Sequence[int]], str]) -> str:
  """Keeps the first and last ``max_length // 2`` tokens of a long prompt.

  LongBench's pred.py cuts the middle, since the instructions sit at both
  ends; prompts within ``max_length`` tokens are returned unchanged.

  Args:
    prompt: The rendered prompt (`Sample.prompt()`).
    max_length: Token budget for the prompt; at least 2.
    encode: Tokenizer encode, without special tokens.
    decode: Tokenizer decode, skipping special tokens.

  Returns:
    The prompt, or decode(head) + decode(tail) of the over-long prompt.
  """
  if max_length < 2:
    raise ValueError(f"max_length must be at least 2, got {max_length}")
  ids = list(encode(prompt))
  if len(ids) <= max_length:
    return prompt
  half = max_length // 2
  return decode(ids[:half]) + decode(ids[-half:])
