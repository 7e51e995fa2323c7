"""Machine-readable records of a run: ``events.jsonl``, ``rounds.csv`` and ``summary.json``.

``events.jsonl`` and ``rounds.csv`` hold only virtual-time quantities, so two runs with the same
config and seed write identical files. Host wall-clock measurements go to ``summary.json`` and
``host_timings.jsonl``. ``summary.json`` is written last and atomically: its presence means the
run finished.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO

from fedspine.errors import CheckpointError
from fedspine.files import JSON, InputFileError, parse_json, read_text
from fedspine.metrics.events import Event
from fedspine.metrics.summary import Summary

EVENTS_FILE = "events.jsonl"
ROUNDS_FILE = "rounds.csv"
SUMMARY_FILE = "summary.json"
HOST_TIMINGS_FILE = "host_timings.jsonl"


@dataclass
class RoundRecord:
    """One synchronous round (or one aggregation of an asynchronous scheduler).

    downlink/training/uplink seconds are those of the update whose arrival closed the round, so for
    synchronous rounds ``aggregation + downlink + training + uplink == round_seconds``.
    """

    round: int
    virtual_start: float
    virtual_end: float
    round_seconds: float
    aggregation_seconds: float
    downlink_seconds: float
    training_seconds: float
    uplink_seconds: float
    selected: int
    aggregated: int
    late: int
    oom: int
    uplink_bytes: int
    downlink_bytes: int
    train_loss: float | None
    metric: float | None = None
    eval_loss: float | None = None
    dropped: int = 0
    """Tasks lost because their device went offline."""
    mean_staleness: float | None = None
    """Mean staleness (aggregations since the device started) of the aggregated updates."""
    max_staleness: int | None = None
    """Largest staleness among the aggregated updates."""


ROUND_COLUMNS = [f.name for f in fields(RoundRecord)]


def _clean(value: object) -> object:
    """JSON-safe value: NaN/inf become None, floats are rounded to stable precision."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 9)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON to a temporary file in the same directory, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(_clean(data), f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class DeviceStats:
    """What one device did over a run: the engine's running totals, the summary's device entries and
    the report's device table.

    Attributes:
        device_id: The device's id in the fleet.
        device_class: Hardware class, e.g. ``raspberry_pi_4``.
        network: Network kind, e.g. ``wifi``.
        tasks: Tasks assigned to the device, whatever their outcome.
        compute_seconds: Virtual seconds spent on local training (lost work of late tasks included).
        communication_seconds: Virtual seconds spent on downlink plus uplink.
        uplink_bytes: Bytes sent to the server.
        downlink_bytes: Bytes received from the server.
        statuses: Task count per status (:class:`fedspine.types.TaskStatus` values).
    """

    device_id: int
    device_class: str = "unknown"
    network: str = "unknown"
    tasks: int = 0
    compute_seconds: float = 0.0
    communication_seconds: float = 0.0
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def add_task(
        self, status: str, compute_seconds: float, communication_seconds: float, uplink: int, downlink: int
    ) -> None:
        """Count one task of this device."""
        key = str(status)
        self.tasks += 1
        self.statuses[key] = self.statuses.get(key, 0) + 1
        self.compute_seconds += compute_seconds
        self.communication_seconds += communication_seconds
        self.uplink_bytes += uplink
        self.downlink_bytes += downlink


class RunRecorder:
    """Appends events and rounds to a run directory as they happen."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self._events: IO[str] = (run_dir / EVENTS_FILE).open("w", encoding="utf-8")
        self._host: IO[str] = (run_dir / HOST_TIMINGS_FILE).open("w", encoding="utf-8")
        self._rounds_file: IO[str] = (run_dir / ROUNDS_FILE).open("w", encoding="utf-8", newline="")
        self._rounds = csv.DictWriter(self._rounds_file, fieldnames=ROUND_COLUMNS)
        self._rounds.writeheader()
        self.rounds: list[RoundRecord] = []

    def positions(self) -> dict[str, int]:
        """Byte length of each record file now, flushed and fsynced: a checkpoint that records these
        positions is committed only after the records up to them are on disk."""
        out = {}
        for name, f in (
            (EVENTS_FILE, self._events),
            (HOST_TIMINGS_FILE, self._host),
            (ROUNDS_FILE, self._rounds_file),
        ):
            f.flush()
            os.fsync(f.fileno())
            out[name] = f.tell()
        return out

    @classmethod
    def resume(cls, run_dir: Path, positions: dict[str, int], rounds: list[RoundRecord]) -> RunRecorder:
        """Reopen a run's record files cut back to ``positions``, for appending after a checkpoint.

        Raises:
            CheckpointError: a record file is shorter than at the checkpoint (its tail was lost, e.g.
                to a power failure): resuming would pad it with zero bytes.
        """
        for name, size in positions.items():
            path = run_dir / name
            actual = path.stat().st_size if path.exists() else 0
            if actual < size:
                raise CheckpointError(
                    f"{path} holds {actual} bytes, {size} at the checkpoint: its records were lost; "
                    "the run cannot resume exactly"
                )
        for name, size in positions.items():
            os.truncate(run_dir / name, size)
        recorder = cls.__new__(cls)
        recorder.run_dir = run_dir
        recorder._events = (run_dir / EVENTS_FILE).open("a", encoding="utf-8")
        recorder._host = (run_dir / HOST_TIMINGS_FILE).open("a", encoding="utf-8")
        recorder._rounds_file = (run_dir / ROUNDS_FILE).open("a", encoding="utf-8", newline="")
        recorder._rounds = csv.DictWriter(recorder._rounds_file, fieldnames=ROUND_COLUMNS)
        recorder.rounds = list(rounds)
        return recorder

    def event(self, event: Event) -> None:
        """Record one event (:mod:`fedspine.metrics.events`)."""
        self._events.write(json.dumps(_clean({"event": event.kind, **event.record()})) + "\n")
        self._events.flush()

    def host_timing(self, kind: str, **data: object) -> None:
        """Record a host wall-clock measurement (not deterministic, kept out of events)."""
        self._host.write(json.dumps(_clean({"event": kind, **data})) + "\n")

    def round(self, record: RoundRecord) -> None:
        """Record one finished round."""
        self.rounds.append(record)
        row = {k: ("" if v is None else _clean(v)) for k, v in asdict(record).items()}
        self._rounds.writerow(row)
        self._rounds_file.flush()

    def close(self) -> None:
        """Flush and close the record files."""
        for f in (self._events, self._host, self._rounds_file):
            f.close()

    def write_summary(self, summary: Summary) -> Path:
        """Write ``summary.json`` atomically; call it last, when the run has finished."""
        path = self.run_dir / SUMMARY_FILE
        write_json_atomic(path, summary.to_json())
        return path


def read_events(run_dir: Path) -> list[JSON]:
    """All events of a run directory, in order. ``events.jsonl`` is read as untrusted input: a regular
    file inside ``run_dir`` (links resolved), at most :data:`~fedspine.files.TEXT_LIMIT` bytes, each
    line strict JSON.

    Raises:
        InputFileError: naming the file (and the line) and what is wrong with it.
    """
    path = run_dir / EVENTS_FILE
    events: list[JSON] = []
    for number, line in enumerate(read_text(path, within=run_dir).splitlines(), start=1):
        if line.strip():
            try:
                events.append(parse_json(line))
            except ValueError as error:
                raise InputFileError(path, f"line {number}: invalid JSON ({error})") from error
    return events
