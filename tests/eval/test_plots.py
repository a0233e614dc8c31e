"""Plots are written as non-empty PNG files from result rows."""

import pytest

from eval import plots

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
