"""Where evaluation results go: a resumable JSONL log and its summaries.

A long-context sweep (methods x budgets x tasks x lengths up to 128K) runs for
hours and gets killed. Each finished case is therefore appended to
``results.jsonl`` as one flushed line, keyed by a stable case id; a restarted
run reads the finished ids back and skips them. Summaries and tables are
derived from the log, never stored instead of it.
"""

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import json
import math
import os
import pathlib
from typing import Any

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"

# Per-case measurements averaged by `summarize`, in table order.
SUMMARY_FIELDS = ("score", "recall", "mass_recall", "ms_per_step", "tokens_per_s")
# Per-case lists (one value per layer) averaged elementwise by `summarize`.
LAYER_FIELDS = ("layer_recall", "layer_mass_recall")


@dataclasses.dataclass(frozen=True)
class CaseKey:
  """What identifies one evaluation case across runs.

  Attributes:
    method: Attention method, e.g. "dense", "mage", "quest".
    budget: KV budget k (selected cache entries), None for dense attention.
    task: Task name, e.g. "niah", "ruler_vt", "qasper".
    context_length: Target context length in tokens (LongBench: the
      truncation length).
    depth: Needle depth for NIAH, None elsewhere.
    sample_index: Index of the sample within its grid cell or dataset.
    seed: Seed the sample was generated with.
  """

  method: str
  budget: int | None
  task: str
  context_length: int
  depth: float | None
  sample_index: int
  seed: int

  def __post_init__(self):
    for name in ("method", "task"):
      value = getattr(self, name)
      if not value or "/" in value:
        raise ValueError(f"{name} must be non-empty without '/', got {value!r}")

  @property
  def case_id(self) -> str:
    """E.g. "mage/k512/niah/ctx8192/d0.25/i0/s0"; stable across runs."""
    budget = "dense" if self.budget is None else f"k{self.budget}"
    depth = "-" if self.depth is None else repr(float(self.depth))
    return (f"{self.method}/{budget}/{self.task}/ctx{self.context_length}/"
            f"d{depth}/i{self.sample_index}/s{self.seed}")


_KEY_FIELDS = tuple(field.name for field in dataclasses.fields(CaseKey))


def parse_result_line(line: bytes, where: str) -> dict[str, Any]:
  """One results.jsonl line as a row.

  Raises:
    ValueError: starting with ``where`` (file:line), if the line is not a
      JSON record with a case_id.
  """
  try:
    row = json.loads(line.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{where}: malformed result line: {e}") from e
  if not isinstance(row, dict) or not isinstance(row.get("case_id"), str):
    raise ValueError(f"{where}: result line has no case_id")
  return row


def read_results(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
  """The rows of several results.jsonl files, read only, one per case id: a
  case in several files (or logged twice) keeps its last row, in the place of
  its first.

  Raises:
    ValueError: naming the file (and line) that cannot be read or parsed.
  """
  rows: dict[str, dict[str, Any]] = {}
  for path in paths:
    try:
      data = pathlib.Path(path).read_bytes()
    except OSError as e:
      raise ValueError(f"cannot read results file {path}: {e}") from e
    for number, line in enumerate(data.split(b"\n"), start=1):
      if line.strip():
        row = parse_result_line(line, f"{path}:{number}")
        rows[row["case_id"]] = row
  return list(rows.values())


class ResultStore:
  """Append-only JSONL log of finished cases under an output directory."""

  def __init__(self, out_dir: str | os.PathLike[str]):
    """Opens (creating if needed) ``out_dir/results.jsonl``.

    A run killed mid-write can leave a partial last line. It is dropped here
    (or completed, if it is a whole record missing only its newline) so that
    the next append starts on a line of its own.

    Raises:
      ValueError: if a complete line is not a JSON record with a case_id.
    """
    self.out_dir = pathlib.Path(out_dir)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    self.path = self.out_dir / RESULTS_FILE
    self._rows: dict[str, dict[str, Any]] = {}
    self._load()

  def _load(self) -> None:
    if not self.path.exists():
      return
    data = self.path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline.
    for number, line in enumerate(lines, start=1):
      if line.strip():
        self._add(self._parse(line, number))
    if not tail.strip():
      return
    try:
      row = self._parse(tail, len(lines) + 1)
    except ValueError:
      with open(self.path, "r+b") as f:
        f.truncate(len(data) - len(tail))
      return
    self._add(row)
    with open(self.path, "ab") as f:
      f.write(b"\n")

  def _parse(self, line: bytes, number: int) -> dict[str, Any]:
    return parse_result_line(line, f"{self.path}:{number}")

  def _add(self, row: dict[str, Any]) -> None:
    # A case rerun after its first result (e.g. forced) replaces it.
    self._rows.pop(row["case_id"], None)
    self._rows[row["case_id"]] = row

  def finished(self) -> set[str]:
    """Case ids with a result; a restarted run skips these."""
    return set(self._rows)

  def rows(self) -> list[dict[str, Any]]:
    """One row per finished case (the latest if a case was logged twice)."""
    return list(self._rows.values())

  def append(self, key: CaseKey,
             measurements: Mapping[str, Any]) -> dict[str, Any]:
    """Logs one finished case and flushes it to disk before returning.

    Args:
      key: The case.
      measurements: At least "score"; usually also "recall", "ms_per_step",
        "tokens_per_s", the prediction and answers. JSON-serialisable.

    Returns:
      The row as written.

    Raises:
      ValueError: if "score" is missing or a measurement reuses a key field.
    """
    if "score" not in measurements:
      raise ValueError(f"measurements for {key.case_id} lack 'score'")
    clash = sorted(set(measurements) & {"case_id", *_KEY_FIELDS})
    if clash:
      raise ValueError(f"measurements reuse key field(s) {', '.join(clash)}")
    row = {"case_id": key.case_id, **dataclasses.asdict(key), **measurements}
    line = json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())
    self._add(row)
    return row


def _mean(values: Iterable[Any]) -> float | None:
  present = [float(v) for v in values if v is not None]
  return math.fsum(present) / len(present) if present else None


def _group_order(group: Mapping[str, Any]) -> tuple[Any, ...]:
  budget = group["budget"]
  return (group["method"], budget is not None, budget or 0, group["task"],
          group["context_length"])


def summarize(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Means of `SUMMARY_FIELDS` per method x budget x task x context length.

  A measurement missing from some rows (e.g. recall, which dense attention
  does not have) is averaged over the rows that have it, and is None if none
  do.

  Returns:
    One dict per group with the group fields, "n" and the means, sorted by
    method, budget (dense first), task and context length.
  """
  groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
  for row in rows:
    group = (row["method"], row["budget"], row["task"], row["context_length"])
    groups.setdefault(group, []).append(row)
  summary = []
  for (method, budget, task, context_length), members in groups.items():
    entry: dict[str, Any] = {"method": method, "budget": budget, "task": task,
                             "context_length": context_length,
                             "n": len(members)}
    for field in SUMMARY_FIELDS:
      entry[field] = _mean(row.get(field) for row in members)
    for field in LAYER_FIELDS:
      per_layer = [row[field] for row in members if row.get(field) is not None]
      if per_layer:
        entry[field] = [_mean(values) for values in zip(*per_layer)]
    summary.append(entry)
  return sorted(summary, key=_group_order)


def format_layer_table(summary: Sequence[Mapping[str, Any]], field: str = "layer_recall") -> str:
  """Per-layer means of ``field`` (a recall list per case), one line per group that has it."""
  entries = [e for e in summary if e.get(field)]
  if not entries:
    return ""
  layers = max(len(e[field]) for e in entries)
  header = ("method", "budget", "context", *[f"L{i}" for i in range(layers)])
  lines = [header]
  for e in entries:
    cells = [_cell(v, 3) for v in e[field]] + ["-"] * (layers - len(e[field]))
    lines.append((e["method"], "dense" if e["budget"] is None else str(e["budget"]),
                  str(e["context_length"]), *cells))
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(line, widths))) for line in lines)


def write_summary(rows: Iterable[Mapping[str, Any]],
                  out_dir: str | os.PathLike[str]) -> pathlib.Path:
  """Writes `summarize(rows)` to ``out_dir/summary.json``; returns its path."""
  path = pathlib.Path(out_dir) / SUMMARY_FILE
  path.write_text(json.dumps(summarize(rows), indent=2) + "\n",
                  encoding="utf-8")
  return path


def _cell(value: float | None, digits: int) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def format_table(summary: Sequence[Mapping[str, Any]]) -> str:
  """A fixed-width text table of a summary, one line per group, for stdout."""
  header = ("method", "budget", "task", "context", "n", "score", "recall",
            "mass", "ms/step", "tok/s")
  lines = [header]
  for entry in summary:
    lines.append((
        entry["method"],
        "dense" if entry["budget"] is None else str(entry["budget"]),
        entry["task"],
        str(entry["context_length"]),
        str(entry["n"]),
        _cell(entry["score"], 3),
        _cell(entry["recall"], 3),
        _cell(entry.get("mass_recall"), 3),
        _cell(entry["ms_per_step"], 2),
        _cell(entry["tokens_per_s"], 1),
    ))
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  # Names left-aligned, numbers right-aligned.
  return "\n".join(
      "  ".join(cell.ljust(width) if i < 3 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(line, widths)))
      for line in lines)
