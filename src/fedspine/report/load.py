"""Reading a run directory (summary, per-round table, event log, resolved config) into plain Python data.

The engine writes these files; this module only reads and checks them, so that a missing or corrupt
file fails here with its name rather than deep inside a plot. A run directory is untrusted input: each
file is read only if it is a regular file inside the run directory (links resolved) and under its size
cap, JSON is strict (no ``NaN``), and every number a reader uses is checked.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from fedspine.errors import FedspineError
from fedspine.files import CONFIG_LIMIT, JSON, TEXT_LIMIT, InputFileError, parse_json, read_text
from fedspine.metrics.summary import MAX_MAGNITUDE, Summary

SUMMARY_FILE = "summary.json"
ROUNDS_FILE = "rounds.csv"
EVENTS_FILE = "events.jsonl"
CONFIG_FILE = "config.toml"

ROUND_COLUMNS = (
    "round",
    "virtual_start",
    "virtual_end",
    "round_seconds",
    "aggregation_seconds",
    "downlink_seconds",
    "training_seconds",
    "uplink_seconds",
    "selected",
    "aggregated",
    "late",
    "oom",
    "uplink_bytes",
    "downlink_bytes",
    "train_loss",
    "metric",
    "eval_loss",
)

# Keys (and their types) each known event kind must carry; unknown kinds are kept unchecked.
_NUMBER = (int, float)
_EVENT_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "task": {"round": int, "device_id": int, "status": str},
    "aggregation": {"round": int},
    "evaluation": {"round": int, "virtual_time": _NUMBER, "value": _NUMBER},
}
# Keys a task event may carry that the report adds up or plots: a number >= 0, or null.
_TASK_NUMBERS = (
    "compute_seconds",
    "downlink_seconds",
    "uplink_seconds",
    "uplink_bytes",
    "downlink_bytes",
    "pruning_ratio",
    "lora_rank",
    "train_seconds",
    "predicted_train_seconds",
    "predicted_uplink_seconds",
)
# A deployment's task measured against the cost model carries all of these, as numbers.
_COST_MODEL_KEYS = ("predicted_train_seconds", "train_seconds", "predicted_uplink_seconds", "uplink_seconds")


class ReportError(FedspineError):
    """A run-directory file is missing or malformed; the message names the file."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class RunData:
    """Everything a run directory holds, parsed.

    Attributes:
        run_dir: The run directory.
        summary: ``summary.json``, checked.
        rounds: ``rounds.csv`` rows, every cell a float; empty cells (``metric`` and ``eval_loss`` of
            rounds that were not evaluated) are NaN.
        events: ``events.jsonl`` records in file order, each with an ``event`` key.
        config_text: ``config.toml`` verbatim.
    """

    run_dir: Path
    summary: Summary
    rounds: list[dict[str, float]]
    events: list[dict[str, Any]]
    config_text: str

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        """Returns the events whose ``event`` key equals ``kind`` (``task``, ``evaluation`` …)."""
        return [event for event in self.events if event["event"] == kind]

    @property
    def metric_name(self) -> str:
        """The name of the evaluation metric."""
        return self.summary.metric.name

    @property
    def metric_value(self) -> float | None:
        """The final metric, or None when the run has not been evaluated yet."""
        value = self.summary.metric.value
        return None if value is None else float(value)


def load_run(run_dir: Path) -> RunData:
    """Reads and checks the four files of a run directory.

    Args:
        run_dir: A directory written by the engine.

    Returns:
        The parsed run.

    Raises:
        ReportError: If a file is missing, unreadable, not a regular file inside ``run_dir``, over its
            size cap or malformed (the message names it).
    """
    run_dir = Path(run_dir)
    return RunData(
        run_dir=run_dir,
        summary=read_summary(run_dir / SUMMARY_FILE, run_dir),
        rounds=read_rounds(run_dir / ROUNDS_FILE, run_dir),
        events=read_events(run_dir / EVENTS_FILE, run_dir),
        config_text=_read_text(run_dir / CONFIG_FILE, run_dir, CONFIG_LIMIT),
    )


def read_summary(path: Path, within: Path | None = None) -> Summary:
    """Reads ``summary.json`` (a regular file; with ``within``, inside that directory) and checks it
    (:meth:`Summary.from_json`)."""
    try:
        data = parse_json(_read_text(path, within))
    except ValueError as error:
        raise ReportError(path, f"invalid JSON ({error})") from error
    try:
        return Summary.from_json(data)
    except ValueError as error:
        raise ReportError(path, str(error)) from error


def read_rounds(path: Path, within: Path | None = None) -> list[dict[str, float]]:
    """Reads ``rounds.csv``; every cell becomes a float, empty cells NaN."""
    lines = _read_text(path, within).splitlines()
    reader = csv.DictReader(lines)
    missing = [column for column in ROUND_COLUMNS if column not in (reader.fieldnames or [])]
    if missing:
        raise ReportError(path, f"missing column(s) {', '.join(missing)}")
    return [_parse_round(path, line_number, row) for line_number, row in enumerate(reader, start=2)]


def read_events(path: Path, within: Path | None = None) -> list[dict[str, Any]]:
    """Reads ``events.jsonl`` (blank lines skipped) and checks the keys of known event kinds."""
    events = []
    for line_number, line in enumerate(_read_text(path, within).splitlines(), start=1):
        if line.strip():
            events.append(_parse_event(path, line_number, line))
    return events


def _read_text(path: Path, within: Path | None, limit: int = TEXT_LIMIT) -> str:
    """The text of ``path`` through :func:`fedspine.files.read_text`, its refusals as :class:`ReportError`."""
    try:
        return read_text(path, limit, within)
    except InputFileError as error:
        raise ReportError(path, error.reason) from error


def _parse_round(path: Path, line_number: int, row: dict[str, str | None]) -> dict[str, float]:
    parsed = {}
    for column, cell in row.items():
        if column is None or cell is None:
            raise ReportError(path, f"line {line_number}: wrong number of cells")
        try:
            parsed[column] = float(cell) if cell.strip() else math.nan
        except ValueError as error:
            raise ReportError(
                path, f"line {line_number}: column '{column}' is not a number: {cell[:40]!r}"
            ) from error
        if cell.strip() and not abs(parsed[column]) <= MAX_MAGNITUDE:  # NaN fails this too
            raise ReportError(
                path, f"line {line_number}: column '{column}' is not a finite number: {cell[:40]!r}"
            )
    return parsed


def _parse_event(path: Path, line_number: int, line: str) -> dict[str, Any]:
    try:
        event = parse_json(line)
    except ValueError as error:
        raise ReportError(path, f"line {line_number}: invalid JSON ({error})") from error
    if not isinstance(event, dict) or not isinstance(kind := event.get("event"), str):
        raise ReportError(path, f"line {line_number}: expected a JSON object with a string 'event' key")
    for key, expected in _EVENT_FIELDS.get(kind, {}).items():
        if not isinstance(event.get(key), expected) or not _in_range(event[key]):
            raise ReportError(path, f"line {line_number}: '{kind}' event needs a valid '{key}'")
    if kind == "task":
        _check_task(path, line_number, event)
    return event


def _check_task(path: Path, line_number: int, event: dict[str, JSON]) -> None:
    """The numbers of a task event the report adds up and plots: each >= 0 (or null); the cost-model
    columns all present when one is."""
    required = _COST_MODEL_KEYS if "predicted_train_seconds" in event else ()
    for key in _TASK_NUMBERS:
        value = event.get(key)
        if (value is None and key not in required) or (_is_number(value) and 0 <= value <= MAX_MAGNITUDE):
            continue
        raise ReportError(
            path, f"line {line_number}: 'task' event's '{key}' must be a number >= 0, got {str(value)[:40]}"
        )


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_range(value: object) -> bool:
    """Whether a number lies within :data:`MAX_MAGNITUDE` (anything else passes: its type was checked)."""
    return not _is_number(value) or abs(value) <= MAX_MAGNITUDE
