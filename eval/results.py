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
BATCHES_FILE = "batches.jsonl"
SUMMARY_FILE = "summary.json"

# Per-case measurements averaged by `summarize`, in table order.
SUMMARY_FIELDS = ("score", "recall", "mass_recall")
# Per-batch latency measurements (batches.jsonl) averaged by `summarize` over a group's batches.
LATENCY_FIELDS = ("prefill_ms", "ms_per_step", "tokens_per_s")
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
    setup: Digest of everything else that produced the result (model weights and config,
      method options, decoding options, the prompt's token ids): a case rerun with another
      checkpoint, dtype, tokenizer or method setting is a different case, never a reused one.
  """

  method: str
  budget: int | None
  task: str
  context_length: int
  depth: float | None
  sample_index: int
  seed: int
  setup: str = ""

  def __post_init__(self):
    for name in ("method", "task", "setup"):
      value = getattr(self, name)
      if (not value and name != "setup") or "/" in value:
        raise ValueError(f"{name} must be non-empty without '/', got {value!r}")

  @property
  def case_id(self) -> str:
    """E.g. "mage/k512/niah/ctx8192/d0.25/i0/s0/3f9a0c2b71de"; stable across runs."""
    budget = "dense" if self.budget is None else f"k{self.budget}"
    depth = "-" if self.depth is None else repr(float(self.depth))
    setup = f"/{self.setup}" if self.setup else ""
    return (f"{self.method}/{budget}/{self.task}/ctx{self.context_length}/"
            f"d{depth}/i{self.sample_index}/s{self.seed}{setup}")


_KEY_FIELDS = tuple(field.name for field in dataclasses.fields(CaseKey))


def parse_result_line(line: bytes, where: str) -> dict[str, Any]:
  """One results.jsonl line as a row.

  Raises:
    ValueError: starting with ``where`` (file:line), if the line is not a
      JSON record with a case_id.
  """
  return _parse_json_line(line, where, "result", "case_id", str, "no case_id")


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


def _load_log(path: pathlib.Path, parse) -> list[dict[str, Any]]:
  """The records of a JSONL log, each line through ``parse(line, number)``.

  A run killed mid-write can leave a partial last line. It is dropped here (or completed, if it
  is a whole record missing only its newline) so that the next append starts on a line of its
  own; any other bad line is an error (``parse`` raises).
  """
  if not path.exists():
    return []
  data = path.read_bytes()
  lines = data.split(b"\n")
  tail = lines.pop()  # b"" when the file ends with a newline.
  records = [parse(line, number) for number, line in enumerate(lines, start=1) if line.strip()]
  if not tail.strip():
    return records
  try:
    records.append(parse(tail, len(lines) + 1))
  except ValueError:
    with open(path, "r+b") as f:
      f.truncate(len(data) - len(tail))
    return records
  with open(path, "ab") as f:
    f.write(b"\n")
  return records


def _append_line(path: pathlib.Path, record: Mapping[str, Any]) -> None:
  line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
  with open(path, "a", encoding="utf-8") as f:
    f.write(line)
    f.flush()
    os.fsync(f.fileno())


def _parse_batch_line(line: bytes, where: str) -> dict[str, Any]:
  return _parse_json_line(line, where, "batch", "cases", list, "no list of cases")


def _parse_json_line(line: bytes, where: str, kind: str, key: str, key_type: type,
                     missing: str) -> dict[str, Any]:
  """A JSON object whose ``key`` holds a ``key_type``; else a ValueError starting with
  ``where`` ("<where>: <kind> line has <missing>" when the key is absent or of another type)."""
  try:
    record = json.loads(line.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{where}: malformed {kind} line: {e}") from e
  if not isinstance(record, dict) or not isinstance(record.get(key), key_type):
    raise ValueError(f"{where}: {kind} line has {missing}")
  return record


class ResultStore:
  """Append-only JSONL logs under an output directory: finished cases (results.jsonl) and the
  latency of each timed batch (batches.jsonl: one record per generate call, listing its cases,
  so a batch's latency is counted once, not once per row)."""

  def __init__(self, out_dir: str | os.PathLike[str]):
    """Opens (creating if needed) ``out_dir/results.jsonl`` and ``out_dir/batches.jsonl``.

    Raises:
      ValueError: if a complete line is not a JSON record with a case_id (a list of cases).
      OSError: if the directory cannot be created or read.
    """
    self.out_dir = pathlib.Path(out_dir)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    self.path = self.out_dir / RESULTS_FILE
    self.batches_path = self.out_dir / BATCHES_FILE
    self._rows: dict[str, dict[str, Any]] = {}
    for row in _load_log(self.path, lambda line, n: parse_result_line(line, f"{self.path}:{n}")):
      self._add(row)
    self._batches = _load_log(self.batches_path,
                              lambda line, n: _parse_batch_line(line, f"{self.batches_path}:{n}"))

  def _add(self, row: dict[str, Any]) -> None:
    # A case rerun after its first result (e.g. forced) replaces it.
    self._rows.pop(row["case_id"], None)
    self._rows[row["case_id"]] = row

  def finished(self) -> set[str]:
    """Case ids with a result; a restarted run skips these."""
    return set(self._rows)

  def rows(self, case_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """One row per finished case (the latest if a case was logged twice); with ``case_ids``,
    only those cases' rows, in that order (a requested grid, without other runs' rows)."""
    if case_ids is None:
      return list(self._rows.values())
    return [self._rows[c] for c in case_ids if c in self._rows]

  def batches(self, case_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Batch latency records; with ``case_ids``, those whose cases all belong to them."""
    if case_ids is None:
      return list(self._batches)
    wanted = set(case_ids)
    return [b for b in self._batches if set(b["cases"]) <= wanted]

  def append(self, key: CaseKey,
             measurements: Mapping[str, Any]) -> dict[str, Any]:
    """Logs one finished case and flushes it to disk before returning.

    Args:
      key: The case.
      measurements: At least "score"; usually also "recall", the prediction and answers.
        JSON-serialisable.

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
    _append_line(self.path, row)
    self._add(row)
    return row

  def append_batch(self, keys: Sequence[CaseKey],
                   measurements: Mapping[str, Any]) -> dict[str, Any]:
    """Logs the latency of one timed batch of cases (all of one method, budget, task and
    context length), e.g. prefill_ms, ms_per_step, tokens_per_s, batch_size, devices."""
    first = keys[0]
    group = {"method": first.method, "budget": first.budget, "task": first.task,
             "context_length": first.context_length}
    if any((k.method, k.budget, k.task, k.context_length) != tuple(group.values())
           for k in keys):
      raise ValueError("a batch's cases must share method, budget, task and context length")
    record = {**group, "cases": [k.case_id for k in keys], **measurements}
    _append_line(self.batches_path, record)
    self._batches.append(record)
    return record


def _mean(values: Iterable[Any]) -> float | None:
  present = [float(v) for v in values if v is not None]
  return math.fsum(present) / len(present) if present else None


def _group_order(group: Mapping[str, Any]) -> tuple[Any, ...]:
  budget = group["budget"]
  return (group["method"], budget is not None, budget or 0, group["task"],
          group["context_length"])


def summarize(rows: Iterable[Mapping[str, Any]],
              batches: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
  """Means of `SUMMARY_FIELDS` per method x budget x task x context length, and of
  `LATENCY_FIELDS` over that group's timed batches (each batch counted once).

  A measurement missing from some rows (e.g. recall, which dense attention
  does not have) is averaged over the rows that have it, and is None if none
  do.

  Returns:
    One dict per group with the group fields, "n" (cases), "batches" (timed batches) and the
    means, sorted by method, budget (dense first), task and context length. "exact_budget" is
    True where the budget is at least the context length: every cache entry is kept, so the
    sparse method ran as exact attention.
  """
  key = lambda r: (r["method"], r["budget"], r["task"], r["context_length"])
  groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
  for row in rows:
    groups.setdefault(key(row), []).append(row)
  timed: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
  for batch in batches:
    timed.setdefault(key(batch), []).append(batch)
  summary = []
  for (method, budget, task, context_length), members in groups.items():
    entry: dict[str, Any] = {"method": method, "budget": budget, "task": task,
                             "context_length": context_length,
                             "n": len(members)}
    entry["exact_budget"] = budget is not None and budget >= context_length
    for field in SUMMARY_FIELDS:
      entry[field] = _mean(row.get(field) for row in members)
    group_batches = timed.get((method, budget, task, context_length), [])
    entry["batches"] = len(group_batches)
    for field in LATENCY_FIELDS:
      entry[field] = _mean(b.get(field) for b in group_batches)
    for field in ("batch_size", "devices"):
      values = sorted({b[field] for b in group_batches if field in b})
      if values:
        entry[field] = values[0] if len(values) == 1 else values
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
    lines.append((e["method"], _budget_cell(e),
                  str(e["context_length"]), *cells))
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(line, widths))) for line in lines)


def write_summary(rows: Iterable[Mapping[str, Any]],
                  out_dir: str | os.PathLike[str],
                  batches: Iterable[Mapping[str, Any]] = ()) -> pathlib.Path:
  """Writes `summarize(rows, batches)` to ``out_dir/summary.json``; returns its path."""
  path = pathlib.Path(out_dir) / SUMMARY_FILE
  path.write_text(json.dumps(summarize(rows, batches), indent=2) + "\n",
                  encoding="utf-8")
  return path


def _cell(value: float | None, digits: int) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


EXACT_BUDGET_MARK = "*"
EXACT_BUDGET_NOTE = (f"{EXACT_BUDGET_MARK} budget >= context: every cache entry is kept, the "
                     "method ran as exact attention")


def _budget_cell(entry: Mapping[str, Any]) -> str:
  if entry["budget"] is None:
    return "dense"
  return str(entry["budget"]) + (EXACT_BUDGET_MARK if entry.get("exact_budget") else "")


def format_table(summary: Sequence[Mapping[str, Any]]) -> str:
  """A fixed-width text table of a summary, one line per group, for stdout.

  Latency columns are per timed batch: prefill ms (prompt written to the cache, i.e. the time
  before the first block's denoising starts), ms per denoising step (the decode stage's time,
  block commits included, over its steps) and generated tokens per second of the whole call.
  """
  header = ("method", "budget", "task", "context", "n", "score", "recall",
            "mass", "prefill ms", "ms/step", "tok/s")
  lines = [header]
  for entry in summary:
    lines.append((
        entry["method"],
        _budget_cell(entry),
        entry["task"],
        str(entry["context_length"]),
        str(entry["n"]),
        _cell(entry["score"], 3),
        _cell(entry["recall"], 3),
        _cell(entry.get("mass_recall"), 3),
        _cell(entry.get("prefill_ms"), 1),
        _cell(entry.get("ms_per_step"), 2),
        _cell(entry.get("tokens_per_s"), 1),
    ))
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  # Names left-aligned, numbers right-aligned.
  table = "\n".join(
      "  ".join(cell.ljust(width) if i < 3 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(line, widths)))
      for line in lines)
  if any(entry.get("exact_budget") for entry in summary):
    table += "\n" + EXACT_BUDGET_NOTE
  return table
