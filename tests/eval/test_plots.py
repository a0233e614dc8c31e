"""Plots are written as non-empty PNG files from result rows."""

import json

import pytest

from eval import plots
from eval import results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows():
  rows = []
  for method, budgets in (("dense", (None,)), ("mage", (256, 512, 1024)),
                          ("quest", (256, 1024))):
    for budget in budgets:
      for length in (1024, 4096):
        for depth in (0.0, 0.5, 1.0):
          rows.append({
              "method": method, "budget": budget, "task": "niah",
              "context_length": length, "depth": depth, "sample_index": 0,
              "seed": 0, "score": float(budget is None or budget >= 512),
              "recall": None if budget is None else min(1.0, budget / 1024)})
        rows.append({"method": method, "budget": budget, "task": "qasper",
                     "context_length": length, "depth": None,
                     "sample_index": 0, "seed": 0, "score": 0.3})
  return rows


def _assert_pngs(paths):
  assert paths
  for path in paths:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_niah_heatmap_per_method_and_budget(tmp_path):
  paths = plots.plot_niah_heatmaps(_rows(), tmp_path)
  assert sorted(p.name for p in paths) == sorted([
      "niah_dense_dense.png", "niah_mage_k256.png", "niah_mage_k512.png",
      "niah_mage_k1024.png", "niah_quest_k256.png", "niah_quest_k1024.png"])
  _assert_pngs(paths)


@pytest.mark.parametrize("metric, tasks", [("score", ["niah", "qasper"]),
                                           ("recall", ["niah"])])
def test_metric_vs_budget_per_task(tmp_path, metric, tasks):
  paths = plots.plot_vs_budget(_rows(), tmp_path / "figs", metric=metric)
  assert [p.name for p in paths] == [f"{metric}_vs_budget_{t}.png"
                                     for t in tasks]
  _assert_pngs(paths)


def test_nothing_to_plot_is_an_error(tmp_path):
  rows = [r for r in _rows() if r["task"] == "qasper"]
  with pytest.raises(ValueError, match="no 'niah' rows"):
    plots.plot_niah_heatmaps(rows, tmp_path)
  with pytest.raises(ValueError, match="no rows with a 'recall'"):
    plots.plot_vs_budget(rows, tmp_path, metric="recall")


def _write_rows(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_command_line_merges_files_and_redraws(tmp_path, capsys):
  rows = _rows()
  for i, row in enumerate(rows):
    row["case_id"] = f"case{i}"
    row["mass_recall"] = row.get("recall")
  first = _write_rows(tmp_path / "a.jsonl", rows[:10])
  second = _write_rows(tmp_path / "b.jsonl", rows[5:])
  merged = results.read_results([first, second])
  assert [r["case_id"] for r in merged] == [r["case_id"] for r in rows]
  changed = dict(rows[0], score=0.25)
  _write_rows(tmp_path / "c.jsonl", [changed])
  assert results.read_results([first, tmp_path / "c.jsonl"])[0]["score"] == 0.25
  paths = plots.main([str(first), str(second), "--out_dir", str(tmp_path / "out"),
                      "--metric=recall,mass_recall", "--heatmaps"])
  names = sorted(p.name for p in paths)
  assert "recall_vs_budget_niah.png" in names and "mass_recall_vs_budget_niah.png" in names
  assert "niah_mage_k512.png" in names
  _assert_pngs(paths)
  assert "recall_vs_budget_niah.png" in capsys.readouterr().out


def test_command_line_names_bad_input(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"case_id": "x", "task": "niah"}\nnot json\n')
  with pytest.raises(SystemExit) as exit_info:
    plots.main([str(bad), "--out_dir", str(tmp_path)])
  assert exit_info.value.code == 2
  assert f"{bad}:2: malformed result line" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    plots.main([str(tmp_path / "missing.jsonl"), "--out_dir", str(tmp_path)])
  assert "cannot read results file" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    plots.main([str(bad), "--out_dir", str(tmp_path), "--metric=accuracy"])
  assert "--metric: unknown ['accuracy']" in capsys.readouterr().err


def test_budget_figure_stays_in_the_unit_range_and_shows_n():
  panels = {1024: {("mage", 256): [1.0, 1.0], ("mage", 512): [1.0, 1.0, 1.0],
                   ("exact", None): [1.0, 0.0]},
            4096: {("mage", 256): [0.5, 0.5]}}
  fig = plots.budget_figure("niah", panels, "score")
  first, second = fig.axes[:2]
  assert first.get_ylim() == (0.0, 1.0) and second.get_ylim() == (0.0, 1.0)
  assert first.get_title() == "niah, 1024 tokens, n=2-3 per point"
  assert second.get_title() == "niah, 4096 tokens, n=2 per point"
  plots.plt.close(fig)
