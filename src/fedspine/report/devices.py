"""Per-device totals, from task events, from the summary's device entries, or from both merged."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, SupportsFloat

from fedspine.metrics.records import DeviceStats
from fedspine.types import TaskStatus

TASK_STATUSES = tuple(status.value for status in TaskStatus)

# Summary device-entry keys copied as they are onto DeviceStats (the summary is authoritative).
_ENTRY_FIELDS = (
    "device_class",
    "network",
    "tasks",
    "compute_seconds",
    "communication_seconds",
    "uplink_bytes",
    "downlink_bytes",
)


def device_stats(records: Sequence[Mapping[str, Any]]) -> list[DeviceStats]:
    """Totals per device from either events (those with an ``event`` key) or summary device entries.

    Args:
        records: ``events.jsonl`` records (only ``task`` events count) or ``Summary.devices``.

    Returns:
        One entry per device, sorted by device id.
    """
    if any("event" in record for record in records):
        return merge_device_stats([], records)
    return merge_device_stats(records, [])


def merge_device_stats(
    devices: Iterable[Mapping[str, Any]], events: Iterable[Mapping[str, Any]]
) -> list[DeviceStats]:
    """Totals per device from task events, overridden by whatever the summary's device entries state.

    Args:
        devices: ``Summary.devices`` entries (may be empty).
        events: ``events.jsonl`` records (may be empty).

    Returns:
        One entry per device seen in either source, sorted by device id.
    """
    by_id: dict[int, DeviceStats] = {}
    for event in events:
        if event.get("event") == "task":
            _add_task(by_id.setdefault(int(event["device_id"]), DeviceStats(int(event["device_id"]))), event)
    for entry in devices:
        _apply_entry(by_id.setdefault(int(entry["device_id"]), DeviceStats(int(entry["device_id"]))), entry)
    return [by_id[device_id] for device_id in sorted(by_id)]


def _add_task(stats: DeviceStats, event: Mapping[str, Any]) -> None:
    stats.device_class = str(event.get("device_class", stats.device_class))
    stats.network = str(event.get("network", stats.network))
    stats.add_task(
        str(event["status"]),
        _number(event.get("compute_seconds")),
        _number(event.get("downlink_seconds")) + _number(event.get("uplink_seconds")),
        int(_number(event.get("uplink_bytes"))),
        int(_number(event.get("downlink_bytes"))),
    )


def _apply_entry(stats: DeviceStats, entry: Mapping[str, Any]) -> None:
    for key in _ENTRY_FIELDS:
        if entry.get(key) is not None:  # Cast to the field's own type (str, int or float).
            setattr(stats, key, type(getattr(stats, key))(entry[key]))
    if entry.get("communication_seconds") is None and "uplink_seconds" in entry:
        downlink_seconds = _number(entry.get("downlink_seconds"))
        stats.communication_seconds = downlink_seconds + _number(entry["uplink_seconds"])
    if any(status in entry for status in TASK_STATUSES):  # the summary counts every status
        stats.statuses = {status: int(entry[status]) for status in TASK_STATUSES if entry.get(status)}


def _number(value: SupportsFloat | str | None) -> float:
    return 0.0 if value is None else float(value)
