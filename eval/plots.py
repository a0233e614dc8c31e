r"""Figures from result rows (`eval.results`): NIAH heatmaps, budget curves.

Functions take the rows of a ResultStore and write PNGs, so a figure can be
redrawn from a results.jsonl without rerunning anything:

    python -m eval.plots runs/a/results.jsonl runs/b/results.jsonl \
        --out_dir=docs/results --metric=recall,mass_recall [--heatmaps]

merges the files (a case in several files: the last file's row) and draws
``<metric>_vs_budget_<task>.png`` per metric (and the NIAH heatmaps).
"""

import argparse
from collections.abc import Iterable, Mapping, Sequence
import math
import os
import pathlib
import re
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

from eval import results  # pylint: disable=g-import-not-at-top


def _slug(*parts: Any) -> str:
  """A file-name-safe name made of ``parts``."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(str(p) for p in parts))


def _budget_label(budget: int | None) -> str:
  return "dense" if budget is None else f"k{budget}"


def _mean(values: Sequence[float]) -> float:
  return math.fsum(values) / len(values)


def plot_niah_heatmaps(rows: Iterable[Mapping[str, Any]],
                       out_dir: str | os.PathLike[str],
                       task: str = "niah") -> list[pathlib.Path]:
  """One depth x context-length heatmap of mean score per method and budget.

  Args:
    rows: Result rows; those of ``task`` with a depth are used.
    out_dir: Directory for ``niah_<method>_<budget>.png``.
    task: Task whose rows to plot.

  Returns:
    The written PNG paths, one per (method, budget).

  Raises:
    ValueError: if no row of ``task`` has a depth.
  """
  cells: dict[tuple[str, int | None], dict[tuple[float, int], list[float]]] = {}
  for row in rows:
    if row["task"] == task and row.get("depth") is not None:
      grid = cells.setdefault((row["method"], row["budget"]), {})
      grid.setdefault((float(row["depth"]), row["context_length"]),
                      []).append(float(row["score"]))
  if not cells:
    raise ValueError(f"no {task!r} rows with a depth to plot")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = []
  for (method, budget), grid in sorted(
      cells.items(), key=lambda item: (item[0][0], item[0][1] is not None,
                                       item[0][1] or 0)):
    depths = sorted({depth for depth, _ in grid})
    lengths = sorted({length for _, length in grid})
    values = [[_mean(grid[(d, n)]) if (d, n) in grid else math.nan
               for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths),
                                    1.2 + 0.45 * len(depths)))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0,
                      aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(values):
      for j, value in enumerate(row):
        if not math.isnan(value):
          ax.text(j, i, f"{value:.2f}", ha="center", va="center",
                  fontsize="small")
    ax.set_title(f"{task}: {method} {_budget_label(budget)}")
    fig.colorbar(image, ax=ax, label="score")
    path = out / f"{_slug(task, method, _budget_label(budget))}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths.append(path)
  return paths


def plot_vs_budget(rows: Iterable[Mapping[str, Any]],
                   out_dir: str | os.PathLike[str],
                   metric: str = "score") -> list[pathlib.Path]:
  """``metric`` against KV budget: one PNG per task, a panel per length.

  Each method with budgets is a line; a method without budgets (dense
  attention) is a dashed horizontal reference line in the same panel.

  Args:
    rows: Result rows.
    out_dir: Directory for ``<metric>_vs_budget_<task>.png``.
    metric: Row field to average: "score", "recall" or "mass_recall".

  Returns:
    The written PNG paths, one per task that has ``metric`` values.

  Raises:
    ValueError: if no row has a value for ``metric``.
  """
  # task -> context_length -> (method, budget) -> values
  data: dict[str, dict[int, dict[tuple[str, int | None], list[float]]]] = {}
  for row in rows:
    if row.get(metric) is not None:
      panel = data.setdefault(row["task"], {}).setdefault(
          row["context_length"], {})
      panel.setdefault((row["method"], row["budget"]),
                       []).append(float(row[metric]))
  if not data:
    raise ValueError(f"no rows with a {metric!r} value to plot")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = []
  for task, panels in sorted(data.items()):
    fig = budget_figure(task, panels, metric)
    path = out / f"{_slug(metric, 'vs_budget', task)}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths.append(path)
  return paths


def _count_label(counts: set[int]) -> str:
  low, high = min(counts), max(counts)
  return f"n={low}" if low == high else f"n={low}-{high}"


def budget_figure(task: str,
                  panels: Mapping[int, Mapping[tuple[str, int | None], Sequence[float]]],
                  metric: str):
  """The figure of ``plot_vs_budget`` for one task: a panel per context length, titled with
  the cases behind each point (n), the y-axis the metric's range [0, 1]."""
  lengths = sorted(panels)
  fig, axes = plt.subplots(1, len(lengths), squeeze=False,
                           figsize=(4.0 * len(lengths), 3.2),
                           layout="constrained")
  for ax, length in zip(axes[0], lengths):
    panel = panels[length]
    methods = sorted({method for method, _ in panel})
    for method in methods:
      points = sorted((budget, _mean(values))
                      for (m, budget), values in panel.items()
                      if m == method and budget is not None)
      if points:  # markers on the 0 / 1 edges drawn whole
        ax.plot([b for b, _ in points], [v for _, v in points],
                marker="o", label=method, clip_on=False)
      if (method, None) in panel:
        ax.axhline(_mean(panel[(method, None)]), linestyle="--",
                   color="gray",
                   label=f"{method} (dense)" if points else method)
    budgets = sorted({b for _, b in panel if b is not None})
    if budgets:
      ax.set_xscale("log", base=2)
      ax.set_xticks(budgets, [str(b) for b in budgets])
      ax.minorticks_off()
    ax.set_ylim(0.0, 1.0)  # scores and recalls are fractions
    ax.set_xlabel("KV budget k")
    ax.set_ylabel(metric)
    counts = {len(values) for values in panel.values()}
    ax.set_title(f"{task}, {length} tokens, {_count_label(counts)} per point")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
  return fig


def main(argv: Sequence[str] | None = None) -> list[pathlib.Path]:
  """Command line: redraws figures from results files; returns the PNG paths."""
  parser = argparse.ArgumentParser(prog="python -m eval.plots",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("results", nargs="+", help="results.jsonl files")
  parser.add_argument("--out_dir", required=True, help="where the PNGs go")
  parser.add_argument("--metric", default="score",
                      help="comma list of score, recall, mass_recall")
  parser.add_argument("--heatmaps", action="store_true",
                      help="also the NIAH depth x length heatmaps")
  args = parser.parse_args(argv)
  metrics = [m for m in args.metric.split(",") if m]
  unknown = sorted(set(metrics) - {"score", "recall", "mass_recall"})
  if unknown or not metrics:
    parser.error(f"--metric: unknown {unknown or metrics}; "
                 "choose from score, recall, mass_recall")
  try:
    rows = results.read_results(args.results)
    paths = []
    for metric in metrics:
      paths += plot_vs_budget(rows, args.out_dir, metric=metric)
    if args.heatmaps:
      paths += plot_niah_heatmaps(rows, args.out_dir)
  except ValueError as e:
    parser.exit(2, f"python -m eval.plots: {e}\n")
  for path in paths:
    print(path)
  return paths


if __name__ == "__main__":
  main(sys.argv[1:])
