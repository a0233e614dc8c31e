"""Result store: resuming killed runs, partial lines, summaries, tables."""

import dataclasses
import json

import pytest

from eval import results


def _keys(method="mage", budget=512):
  return [results.CaseKey(method, budget, "niah", length, depth, 0, 0)
          for length in (1024, 2048) for depth in (0.0, 0.5, 1.0)]


class Killed(Exception):
  """Stands in for the process dying between two cases."""


def _run(store, keys, evaluate, kill_after=None):
  """The loop an eval CLI runs: skip finished cases, log each new one."""
  done = store.finished()
  for key in keys:
    if key.case_id in done:
      continue
    if kill_after is not None and len(store.rows()) == kill_after:
      raise Killed()
    store.append(key, {"score": evaluate(key)})


def test_case_id_is_stable_and_readable():
  key = results.CaseKey("mage", 512, "niah", 8192, 0.25, 3, 7)
  assert key.case_id == "mage/k512/niah/ctx8192/d0.25/i3/s7"
  dense = results.CaseKey("dense", None, "qasper", 32768, None, 0, 0)
  assert dense.case_id == "dense/dense/qasper/ctx32768/d-/i0/s0"
  # An integer depth names the same case as the float.
  assert results.CaseKey("m", 1, "t", 1, 1, 0, 0).case_id == results.CaseKey(
      "m", 1, "t", 1, 1.0, 0, 0).case_id
  with pytest.raises(ValueError, match="method"):
    results.CaseKey("a/b", 1, "t", 1, None, 0, 0)


def test_killed_and_restarted_run_skips_finished_cases(tmp_path):
  keys = _keys()
  calls = []

  def evaluate(key):
    calls.append(key.case_id)
    return key.depth

  with pytest.raises(Killed):
    _run(results.ResultStore(tmp_path), keys, evaluate, kill_after=4)
  assert len(calls) == 4

  restarted = results.ResultStore(tmp_path)
  assert restarted.finished() == {k.case_id for k in keys[:4]}
  calls.clear()
  _run(restarted, keys, evaluate)
  assert calls == [k.case_id for k in keys[4:]]

  lines = (tmp_path / results.RESULTS_FILE).read_text().splitlines()
  assert [json.loads(line)["case_id"] for line in lines] == [
      k.case_id for k in keys]
  assert results.ResultStore(tmp_path).finished() == {k.case_id for k in keys}


def test_partial_last_line_is_dropped_and_appends_continue(tmp_path):
  keys = _keys()
  store = results.ResultStore(tmp_path)
  for key in keys[:2]:
    store.append(key, {"score": 1.0})
  path = tmp_path / results.RESULTS_FILE
  with open(path, "ab") as f:  # killed in the middle of writing case 3
    f.write(b'{"case_id": "' + keys[2].case_id.encode() + b'", "sco')

  restarted = results.ResultStore(tmp_path)
  assert restarted.finished() == {keys[0].case_id, keys[1].case_id}
  restarted.append(keys[2], {"score": 0.0})
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["case_id"] for r in rows] == [k.case_id for k in keys[:3]]
  assert rows[2]["score"] == 0.0


def test_complete_last_record_missing_its_newline_is_kept(tmp_path):
  key = _keys()[0]
  path = tmp_path / results.RESULTS_FILE
  path.write_text(json.dumps({"case_id": key.case_id, "score": 1.0}))
  store = results.ResultStore(tmp_path)
  assert store.finished() == {key.case_id}
  store.append(_keys()[1], {"score": 0.5})
  assert len(path.read_text().splitlines()) == 2


def test_corrupt_line_before_the_end_is_an_error(tmp_path):
  path = tmp_path / results.RESULTS_FILE
  path.write_text('{"case_id": "a", "score": 1}\nnot json\n'
                  '{"case_id": "b", "score": 1}\n')
  with pytest.raises(ValueError, match=r"results\.jsonl:2: malformed"):
    results.ResultStore(tmp_path)
  path.write_text('{"score": 1}\n')
  with pytest.raises(ValueError, match=r"results\.jsonl:1: .*no case_id"):
    results.ResultStore(tmp_path)


def test_append_validates_measurements(tmp_path):
  store = results.ResultStore(tmp_path)
  key = _keys()[0]
  with pytest.raises(ValueError, match="lack 'score'"):
    store.append(key, {"recall": 1.0})
  with pytest.raises(ValueError, match="reuse key field.*task"):
    store.append(key, {"score": 1.0, "task": "other"})
  row = store.append(key, {"score": 1.0, "prediction": "1234567"})
  assert row["method"] == "mage" and row["depth"] == 0.0
  assert row["prediction"] == "1234567"


def _rows():
  rows = []
  for score, recall in ((1.0, 0.8), (0.0, 0.6)):
    rows.append({"method": "mage", "budget": 512, "task": "niah",
                 "context_length": 4096, "score": score, "recall": recall})
  rows.append({"method": "dense", "budget": None, "task": "niah",
               "context_length": 4096, "score": 1.0})
  rows.append({"method": "mage", "budget": 256, "task": "niah",
               "context_length": 4096, "score": 0.5, "recall": None})
  return rows


def _batches():
  group = {"method": "mage", "budget": 512, "task": "niah", "context_length": 4096}
  return [  # a batch of 2 cases and, say, a rerun batch of 1: each batch counts once
      {**group, "cases": ["a", "b"], "prefill_ms": 100.0, "ms_per_step": 10.0,
       "tokens_per_s": 100.0, "batch_size": 2, "devices": 1},
      {**group, "cases": ["c"], "prefill_ms": 50.0, "ms_per_step": 14.0,
       "tokens_per_s": 60.0, "batch_size": 1, "devices": 1},
      {"method": "dense", "budget": None, "task": "niah", "context_length": 4096,
       "cases": ["d"], "prefill_ms": 300.0, "ms_per_step": 30.0, "tokens_per_s": 40.0,
       "batch_size": 1, "devices": 1}]


def test_summary_means_per_group(tmp_path):
  summary = results.summarize(_rows(), _batches())
  assert [(e["method"], e["budget"]) for e in summary] == [
      ("dense", None), ("mage", 256), ("mage", 512)]
  dense, mage256, mage512 = summary
  assert dense["recall"] is None and dense["ms_per_step"] == 30.0
  assert mage256 == {"method": "mage", "budget": 256, "task": "niah",
                     "context_length": 4096, "n": 1, "exact_budget": False, "score": 0.5,
                     "recall": None, "mass_recall": None, "batches": 0, "prefill_ms": None,
                     "ms_per_step": None, "tokens_per_s": None}
  assert mage512["n"] == 2 and mage512["batches"] == 2
  assert mage512["score"] == 0.5
  assert mage512["recall"] == pytest.approx(0.7)
  assert mage512["ms_per_step"] == 12.0 and mage512["prefill_ms"] == 75.0
  assert mage512["batch_size"] == [1, 2] and mage512["devices"] == 1

  path = results.write_summary(_rows(), tmp_path, _batches())
  assert json.loads(path.read_text()) == summary


def test_summary_of_store_rows_uses_the_latest_result_per_case(tmp_path):
  store = results.ResultStore(tmp_path)
  key = _keys()[0]
  store.append(key, {"score": 0.0})
  store.append(key, {"score": 1.0})
  (entry,) = results.summarize(results.ResultStore(tmp_path).rows())
  assert entry["n"] == 1 and entry["score"] == 1.0


def test_rows_and_batches_of_a_requested_grid(tmp_path):
  store = results.ResultStore(tmp_path)
  keys = _keys()
  for key in keys:
    store.append(key, {"score": 1.0})
  store.append_batch(keys[:2], {"ms_per_step": 1.0})
  store.append_batch(keys[3:5], {"ms_per_step": 2.0})
  with open(tmp_path / results.BATCHES_FILE, "ab") as f:
    f.write(b'{"cases": ["x"], "ms_')  # killed mid-write
  with pytest.raises(ValueError, match="share method"):
    store.append_batch([keys[0], results.CaseKey("quest", 512, "niah", 1024, 0.0, 0, 0)], {})
  reopened = results.ResultStore(tmp_path)
  wanted = [keys[3].case_id, keys[1].case_id, keys[0].case_id, "not/run"]
  assert [r["case_id"] for r in reopened.rows(wanted)] == wanted[:3]
  # Only batches wholly inside the grid: their latency belongs to it.
  assert [b["ms_per_step"] for b in reopened.batches(wanted)] == [1.0]
  assert [b["ms_per_step"] for b in reopened.batches()] == [1.0, 2.0]
  assert reopened.batches()[0]["cases"] == [keys[0].case_id, keys[1].case_id]


def test_format_table():
  table = results.format_table(results.summarize(_rows(), _batches()))
  lines = table.splitlines()
  assert lines[0].split() == ["method", "budget", "task", "context", "n",
                              "score", "recall", "mass", "prefill", "ms", "ms/step", "tok/s"]
  assert lines[1].split() == ["dense", "dense", "niah", "4096", "1", "1.000",
                              "-", "-", "300.0", "30.00", "40.0"]
  assert lines[3].split() == ["mage", "512", "niah", "4096", "2", "0.500",
                              "0.700", "-", "75.0", "12.00", "80.0"]
  assert len({len(line) for line in lines}) == 1


def test_budget_at_least_the_context_is_marked_as_exact():
  rows = [{"method": "mage", "budget": b, "task": "niah", "context_length": 2048, "score": 1.0}
          for b in (64, 2048, 4096)]
  summary = results.summarize(rows)
  assert [e["exact_budget"] for e in summary] == [False, True, True]
  lines = results.format_table(summary).splitlines()
  assert [line.split()[1] for line in lines[1:4]] == ["64", "2048*", "4096*"]
  assert lines[-1] == results.EXACT_BUDGET_NOTE
  assert results.EXACT_BUDGET_NOTE not in results.format_table(summary[:1])


def test_case_id_carries_the_setup_digest():
  plain = results.CaseKey("mage", 512, "niah", 8192, 0.25, 3, 7)
  tied = dataclasses.replace(plain, setup="3f9a0c2b71de")
  assert tied.case_id == plain.case_id + "/3f9a0c2b71de"
  with pytest.raises(ValueError, match="setup"):
    dataclasses.replace(plain, setup="a/b")


def test_per_layer_recall_is_averaged_elementwise_and_tabulated():
  rows = [
      {"method": "mage", "budget": 64, "task": "niah", "context_length": 8000, "score": 1.0,
       "recall": 0.5, "mass_recall": 0.9, "layer_recall": [1.0, 0.4, 0.6],
       "layer_mass_recall": [1.0, 0.8, 1.0]},
      {"method": "mage", "budget": 64, "task": "niah", "context_length": 8000, "score": 0.0,
       "recall": 0.7, "mass_recall": 0.7, "layer_recall": [1.0, 0.6, 0.8],
       "layer_mass_recall": [1.0, 0.6, 0.8]},
      {"method": "exact", "budget": None, "task": "niah", "context_length": 8000,
       "score": 1.0},
  ]
  summary = results.summarize(rows)
  mage = next(e for e in summary if e["method"] == "mage")
  assert mage["layer_recall"] == pytest.approx([1.0, 0.5, 0.7])
  assert mage["layer_mass_recall"] == pytest.approx([1.0, 0.7, 0.9])
  assert mage["mass_recall"] == pytest.approx(0.8)
  assert "layer_recall" not in next(e for e in summary if e["method"] == "exact")
  lines = results.format_layer_table(summary).splitlines()
  assert lines[0].split() == ["method", "budget", "context", "L0", "L1", "L2"]
  assert lines[1].split() == ["mage", "64", "8000", "1.000", "0.500", "0.700"]
  assert len(lines) == 2
  assert results.format_layer_table(summary[:0]) == ""
