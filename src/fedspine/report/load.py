"""Reading a run directory (summary, per-round table, event log, resolved config) into plain Python data.

The engine writes these files; this module only reads and checks them, so that a missing or corrupt
file fails here with its name rather than deep inside a plot.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedspine.errors import FedspineError
from fedspine.metrics.summary import Summary

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
        ReportError: If a file is missing, unreadable or malformed (the message names it).
    """
    run_dir = Path(run_dir)
    return RunData(
        run_dir=run_dir,
        summary=read_summary(run_dir / SUMMARY_FILE),
        rounds=read_rounds(run_dir / ROUNDS_FILE),
        events=read_events(run_dir / EVENTS_FILE),
        config_text=_read_text(run_dir / CONFIG_FILE),
    )


def read_summary(path: Path) -> Summary:
    """Reads ``summary.json`` and checks it (:meth:`Summary.from_json`)."""
    try:
        return Summary.from_json(json.loads(_read_text(path)))
    except json.JSONDecodeError as error:
        raise ReportError(path, f"invalid JSON ({error})") from error
    except ValueError as error:
        raise ReportError(path, str(error)) from error


def read_rounds(path: Path) -> list[dict[str, float]]:
    """Reads ``rounds.csv``; every cell becomes a float, empty cells NaN."""
    lines = _read_text(path).splitlines()
    reader = csv.DictReader(lines)
    missing = [column for column in ROUND_COLUMNS if column not in (reader.fieldnames or [])]
    if missing:
        raise ReportError(path, f"missing column(s) {', '.join(missing)}")
    return [_parse_round(path, line_number, row) for line_number, row in enumerate(reader, start=2)]


def read_events(path: Path) -> list[dict[str, Any]]:
    """Reads ``events.jsonl`` (blank lines skipped) and checks the keys of known event kinds."""
    events = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            events.append(_parse_event(path, line_number, line))
    return events


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise ReportError(path, "file not found") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ReportError(path, f"cannot read ({error})") from error


def _parse_round(path: Path, line_number: int, row: dict[str, str | None]) -> dict[str, float]:
    parsed = {}
    for column, cell in row.items():
        if column is None or cell is None:
            raise ReportError(path, f"line {line_number}: wrong number of cells")
        try:
            parsed[column] = float(cell) if cell.strip() else math.nan
        except ValueError as error:
            raise ReportError(
                path, f"line {line_number}: column '{column}' is not a number: {cell!r}"
            ) from error
    return parsed


def _parse_event(path: Path, line_number: int, line: str) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except json.JSONDecodeError as error:
        raise ReportError(path, f"line {line_number}: invalid JSON ({error})") from error
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        raise ReportError(path, f"line {line_number}: expected a JSON object with a string 'event' key")
    for key, expected in _EVENT_FIELDS.get(event["event"], {}).items():
        if not isinstance(event.get(key), expected):
            raise ReportError(path, f"line {line_number}: '{event['event']}' event needs a valid '{key}'")
    return event
