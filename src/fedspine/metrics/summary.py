"""A run's summary (``summary.json``): the figures a user, the CLI, the report and a comparison read.

The engine's run writes a :class:`Summary`; readers get one back from :meth:`Summary.from_json`, which
checks the file's contents first (a summary is read from disk: it may be truncated, edited or from
another tool). The keys the engine always writes are required; the others (the detail of tasks,
devices and models) may be missing and read as empty.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Metric:
    """The run's final evaluation: the metric's name, its value (None before any evaluation), and
    whether higher is better."""

    name: str
    value: float | None
    higher_is_better: bool = True


@dataclass(frozen=True)
class Summary:
    """What ``summary.json`` holds (its keys, in this order).

    ``wall_seconds`` is the host time of the federated loop (rounds, evaluation included);
    ``train_wall_seconds`` the part spent in local training, ``eval_wall_seconds`` in global
    evaluation, ``aggregation_wall_seconds`` in aggregation; ``setup_wall_seconds`` model and data
    loading before the loop. ``rounds`` counts synchronous rounds or asynchronous server steps.
    ``time_to_target_seconds`` is virtual time, None when the target was not reached or not set.
    """

    task: str
    metric: Metric
    chance_level: float | None
    initial_metric: float | None
    final_eval_loss: float | None
    rounds: int
    virtual_seconds: float
    wall_seconds: float
    train_wall_seconds: float
    eval_wall_seconds: float
    aggregation_wall_seconds: float
    setup_wall_seconds: float
    uplink_bytes: int
    downlink_bytes: int
    target: float | None
    time_to_target_seconds: float | None
    strategy: str
    scheduler: str
    model: str
    num_devices: int | None
    seed: int | None
    tasks: dict[str, int] = field(default_factory=dict)
    """Client tasks by status (every status, zero included)."""
    updates: dict[str, int] | None = None
    """Updates dispatched, applied and still buffered at the end (``unapplied_at_end``)."""
    staleness: dict[str, float] | None = None
    """Mean and largest staleness of the applied updates (None for synchronous runs)."""
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    """Every evaluation: ``round``, ``virtual_time``, ``metric``, ``value``, ``loss``."""
    devices: list[dict[str, Any]] = field(default_factory=list)
    """One entry per device: its totals, with a count for every task status."""
    pruning: dict[str, Any] | None = None
    """What a pruning strategy evaluated and deployed (None for the others)."""
    executor: str | None = None
    """``simulation`` or ``flower``."""
    device_models: dict[str, Any] | None = None
    """The exported device models' manifest (None when nothing was exported)."""
    federated: dict[str, Any] | None = None
    """The last federated evaluation (``eval.mode`` federated or both; else None): ``value``, ``loss``
    and ``count`` pooled over the devices, ``worst_decile`` (the value a tenth of the devices do no
    better than) and ``devices`` (device id -> value)."""
    personal: dict[str, Any] | None = None
    """Each device's personal model (``[personalize]``) on its own held-out data, when the devices hold
    data out: ``method``; ``value`` (mean over devices), ``worst_decile`` and ``devices`` (device id ->
    value), and the same of the global model on the same examples (``global_value``,
    ``global_worst_decile``, ``global_devices``); ``extra_device_seconds`` (virtual, all devices),
    ``extra_time_fraction`` (of the devices' training time in the run), and the bytes cluster adapters
    added to the uplinks and downlinks (``extra_uplink_bytes``, ``extra_downlink_bytes``)."""

    def to_json(self) -> dict[str, Any]:
        """The summary as ``summary.json`` writes it."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Summary:
        """Check a parsed ``summary.json`` and build its summary.

        Raises:
            ValueError: naming the first key that is missing or of the wrong type.
        """
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        fields: dict[str, Any] = {}
        for key in _TEXT:
            fields[key] = _text(data, key)
        for key in _NUMBERS:
            fields[key] = _number(data, key, nullable=False)
        for key in _NULLABLE_NUMBERS:
            fields[key] = _number(data, key, nullable=True)
        for key in _OPTIONAL_NUMBERS:
            fields[key] = _number(data, key, nullable=True) if key in data else None
        for key in _ZERO_IF_MISSING:
            fields[key] = fields[key] or 0.0
        for key in _OPTIONAL_TEXT:
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"key '{key}' must be text or null, got {value!r}")
            fields[key] = value
        for key, kind in _CONTAINERS.items():
            value = data.get(key)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"key '{key}' must be a JSON {kind.__name__} or null, got {value!r}")
            fields[key] = value
        for key in ("rounds", "uplink_bytes", "downlink_bytes", "num_devices", "seed"):
            if fields[key] is not None:
                fields[key] = int(fields[key])
        fields["metric"] = _metric(data)
        fields["scheduler"] = fields["scheduler"] or "?"
        fields["model"] = fields["model"] or "?"
        fields["tasks"] = fields["tasks"] or {}
        fields["evaluations"] = fields["evaluations"] or []
        fields["devices"] = fields["devices"] or []
        return cls(**fields)


# What the engine always writes (nullable: null before any evaluation, or without a target) ...
_TEXT = ("task", "strategy")
_NUMBERS = (
    "rounds",
    "virtual_seconds",
    "wall_seconds",
    "train_wall_seconds",
    "uplink_bytes",
    "downlink_bytes",
)
_NULLABLE_NUMBERS = ("chance_level", "target", "time_to_target_seconds")
# ... and what a reader does without.
_OPTIONAL_NUMBERS = (
    "initial_metric",
    "final_eval_loss",
    "eval_wall_seconds",
    "aggregation_wall_seconds",
    "setup_wall_seconds",
    "num_devices",
    "seed",
)
_OPTIONAL_TEXT = ("scheduler", "model", "executor")
_CONTAINERS: dict[str, type] = {
    "tasks": dict,
    "updates": dict,
    "staleness": dict,
    "evaluations": list,
    "devices": list,
    "pruning": dict,
    "device_models": dict,
    "federated": dict,
    "personal": dict,
}
_ZERO_IF_MISSING = ("eval_wall_seconds", "aggregation_wall_seconds", "setup_wall_seconds")


def _text(data: dict[str, Any], key: str) -> str:
    if key not in data:
        raise ValueError(f"missing key '{key}'")
    value = data[key]
    if not isinstance(value, str):
        raise ValueError(f"key '{key}' must be text, got {value!r}")
    return value


def _number(data: dict[str, Any], key: str, nullable: bool) -> float | None:
    if key not in data:
        raise ValueError(f"missing key '{key}'")
    value = data[key]
    if value is None and nullable:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        kind = "a number or null" if nullable else "a number"
        raise ValueError(f"key '{key}' must be {kind}, got {value!r}")
    return value


def _metric(data: dict[str, Any]) -> Metric:
    if "metric" not in data:
        raise ValueError("missing key 'metric'")
    metric = data["metric"]
    if metric is None:
        return Metric("metric", None)
    problem = ValueError(f"key 'metric' must be {{'name': …, 'value': number or null}}, got {metric!r}")
    if not isinstance(metric, dict):
        raise problem
    name, value, higher = (
        metric.get("name", "metric"),
        metric.get("value"),
        metric.get("higher_is_better", True),
    )
    if not isinstance(name, str) or not isinstance(higher, bool):
        raise problem
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise problem
    return Metric(name or "metric", value, higher)
