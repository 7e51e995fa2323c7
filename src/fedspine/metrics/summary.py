"""A run's summary (``summary.json``): the figures a user, the CLI, the report and a comparison read.

The engine's run writes a :class:`Summary`; readers get one back from :meth:`Summary.from_json`, which
checks the file's contents first (a summary is read from disk: it may be truncated, edited or from
another tool): types, finiteness and ranges, nested keys included, so a reader never meets text where
it adds numbers, a NaN, a negative count or a number too large to format. The keys the engine always
writes are required; the others (the detail of tasks, devices and models) may be missing and read as
empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard, cast

from fedspine.types import TaskStatus


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
    device_classes: dict[str, dict[str, int]] | None = None
    """Per device class: ``devices``, ``tasks`` and a count for every task status summed over its
    devices (:func:`class_totals`): how many of a class's tasks ended late or were dropped."""
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
        """Check a parsed ``summary.json`` and build its summary: every key a reader uses has its type,
        is finite and lies in its range (counts whole and non-negative, durations non-negative), so
        what reads a summary can trust it.

        Raises:
            ValueError: naming the first key (``devices[2].uplink_bytes``) that is missing, of the
                wrong type or out of range.
        """
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        fields: dict[str, Any] = {key: _text(data, key) for key in _TEXT}
        for key, check in _REQUIRED.items():
            if key not in data:
                raise ValueError(f"missing key '{key}'")
            fields[key] = check(data[key], key)
        for key, check in _OPTIONAL.items():
            fields[key] = check(data.get(key), key)
        for key in _ZERO_IF_MISSING:
            fields[key] = fields[key] or 0.0
        for key in _OPTIONAL_TEXT:
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise _Wrong(key, "text or null", value)
            fields[key] = value
        fields["metric"] = _metric(data)
        fields["scheduler"] = fields["scheduler"] or "?"
        fields["model"] = fields["model"] or "?"
        fields["tasks"] = fields["tasks"] or {}
        fields["evaluations"] = fields["evaluations"] or []
        fields["devices"] = fields["devices"] or []
        return cls(**fields)


STATUS_KEYS = tuple(status.value for status in TaskStatus)
"""The task statuses a device entry counts."""


def class_totals(devices: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per device class (sorted by name), its ``devices``, ``tasks`` and every status count, summed
    over the ``devices`` entries of a summary."""
    totals: dict[str, dict[str, int]] = {}
    for device in devices:
        row = totals.setdefault(
            str(device.get("device_class", "unknown")), dict.fromkeys(("devices", "tasks", *STATUS_KEYS), 0)
        )
        row["devices"] += 1
        for key in ("tasks", *STATUS_KEYS):
            row[key] += int(device.get(key) or 0)
    return dict(sorted(totals.items()))


MAX_COUNT = 2**53
"""Largest count (rounds, bytes, devices, tasks) a summary may hold: every whole number up to it is exact
as a JSON float, and no run comes near it."""
MAX_SEED = 2**64 - 1
"""Largest seed (``run.seed`` is at most 64 bits)."""
MAX_SECONDS = 1e12
"""Largest duration in seconds (about 31,700 years), virtual or host."""
MAX_MAGNITUDE = 1e150
"""Largest magnitude of any other number (a metric, a loss): beyond it, a variance over seeds overflows."""

Check = Callable[[Any, str], Any]


class _Wrong(ValueError):
    """A key's value is of the wrong type or out of range."""

    def __init__(self, key: str, kind: str, value: object) -> None:
        self.key, self.kind, self.value = key, kind, value
        where = f"key '{key}'" if key else "the file"
        super().__init__(f"{where} must be {kind}, got {_shown(value)}")


def _join(key: str, name: object) -> str:
    """The key of ``name`` inside ``key`` (``devices.3``); at the top of a file, ``name`` alone."""
    return f"{key}.{name}" if key else str(name)


def _shown(value: object) -> str:
    """``value``'s repr, cut short: a tampered value may be megabytes long."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _real(value: object, key: str, low: float = -MAX_MAGNITUDE, high: float = MAX_MAGNITUDE) -> float:
    """``value`` when it is a finite number from ``low`` to ``high``."""
    if not _is_number(value):
        raise _Wrong(key, "a number", value)
    if isinstance(value, float) and not math.isfinite(value):
        raise _Wrong(key, "a finite number", value)
    if not low <= value <= high:
        raise _Wrong(key, f"a number from {low:g} to {high:g}", value)
    return value


def _count(value: object, key: str, high: int = MAX_COUNT) -> int:
    """``value`` as an int when it is a whole number from 0 to ``high``."""
    number = _real(value, key, 0, high)
    if number != int(number):
        raise _Wrong(key, f"a whole number from 0 to {high:g}", value)
    return int(number)


def _seconds(value: object, key: str) -> float:
    return _real(value, key, 0.0, MAX_SECONDS)


def _non_negative(value: object, key: str) -> float:
    return _real(value, key, 0.0)


def _fraction(value: object, key: str) -> float:
    return _real(value, key, 0.0, 1.0)


def _nullable(check: Check) -> Check:
    """``check`` that also lets null (None) through; its message says so."""

    def checked(value: Any, key: str) -> Any:
        if value is None:
            return None
        try:
            return check(value, key)
        except _Wrong as error:
            if error.key != key:  # a key inside the value
                raise
            raise _Wrong(key, f"{error.kind} or null", value) from None

    return checked


def _seed(value: object, key: str) -> int:
    return _count(value, key, MAX_SEED)


def _table(kind: type, each: Check | None = None, *, required: tuple[str, ...] = ()) -> Check:
    """A check that ``value`` is a JSON object (``kind`` dict) or list whose items pass ``each``, and
    (objects) that holds the ``required`` keys. Returns the value unchanged."""

    def checked(value: Any, key: str) -> Any:
        if not isinstance(value, kind):
            raise _Wrong(key, f"a JSON {kind.__name__}", value)
        value = cast(Any, value)  # a dict or a list
        for name in required:
            if name not in value:
                raise ValueError(f"key '{_join(key, name)}' is missing")
        if each is not None and isinstance(value, dict):
            for name, item in value.items():
                each(item, _join(key, _shown(name)[1:-1]))
        elif each is not None:
            for index, item in enumerate(value):
                each(item, f"{key}[{index}]")
        return value

    return checked


def _fields(checks: dict[str, Check], *, required: tuple[str, ...] = ()) -> Check:
    """A check that ``value`` is a JSON object whose keys named in ``checks`` (when present) pass
    theirs; other keys are left as they are."""

    def checked(value: Any, key: str) -> Any:
        _table(dict, required=required)(value, key)
        for name, check in checks.items():
            if name in value:
                check(value[name], _join(key, name))
        return value

    return checked


def _device_ids(each: Check) -> Check:
    """A JSON object keyed by device id (a decimal string) whose values pass ``each``."""

    def checked(value: Any, key: str) -> Any:
        _table(dict)(value, key)
        for name in value:
            if not (isinstance(name, str) and name.isdecimal() and len(name) <= 18):
                raise _Wrong(key, "keyed by device ids (whole numbers)", name)
        return _table(dict, each)(value, key)

    return checked


def _text_value(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise _Wrong(key, "text", value)
    return value


def _flag(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise _Wrong(key, "true or false", value)
    return value


_METRIC = _nullable(_real)
_COUNTS = _table(dict, _count)
_DEVICE_ENTRY = _fields(
    {
        "device_id": _count,
        "device_class": _text_value,
        "network": _text_value,
        **dict.fromkeys(("train_examples", "tasks", "uplink_bytes", "downlink_bytes"), _nullable(_count)),
        **dict.fromkeys(
            ("compute_seconds", "communication_seconds", "downlink_seconds", "uplink_seconds"),
            _nullable(_seconds),
        ),
        **dict.fromkeys(STATUS_KEYS, _nullable(_count)),
    },
    required=("device_id",),
)
_EVALUATION = _fields(
    {"round": _count, "virtual_time": _seconds, "value": _METRIC, "loss": _METRIC},
    required=("virtual_time", "value"),
)
_MODEL_SIZE = {
    "parameters": _count,
    "bytes": _count,
    "tokens_per_second": _nullable(_non_negative),
}


def check_device_models(value: Any, key: str = "device_models") -> dict[str, Any]:
    """Check the exported device models' manifest (``models/manifest.json``, the summary's
    ``device_models``): the dense base's and each model's size, each model's directory name (text) and
    sparsity, and per device (keyed by id) its model, which the manifest lists, sparsity and LoRA rank.
    Returns it unchanged. ``key`` names it in errors (empty: a file of its own).

    Raises:
        ValueError: naming the first key that is missing, of the wrong type or out of range.
    """
    _fields(
        {
            "dense_base": _fields(_MODEL_SIZE, required=("parameters", "bytes")),
            "models": _table(
                list,
                _fields(
                    {
                        **_MODEL_SIZE,
                        "dir": _text_value,
                        "ratio": _fraction,
                        "metric": _METRIC,
                        "saved": _flag,
                        "format": _text_value,
                    },
                    required=("dir", "parameters", "bytes"),
                ),
            ),
            "devices": _device_ids(
                _fields(
                    {"model": _text_value, "ratio": _fraction, "rank": _count, "personal": _text_value},
                    required=("model", "ratio", "rank"),
                )
            ),
        },
        required=("dense_base", "models", "devices"),
    )(value, key)
    names = {model["dir"] for model in value["models"]}
    for device, entry in value["devices"].items():
        if entry["model"] not in names:
            known = ", ".join(sorted(names))
            raise _Wrong(
                _join(key, f"devices.{device}.model"), f"one of the models ({known})", entry["model"]
            )
    return cast(dict[str, Any], value)


_SCORES = _device_ids(_METRIC)
_FEDERATED = _fields(
    {"value": _METRIC, "loss": _METRIC, "count": _count, "worst_decile": _METRIC, "devices": _SCORES},
    required=("value", "count", "worst_decile", "devices"),
)
_PERSONAL = _fields(
    {
        "method": _text_value,
        "metric": _text_value,
        **dict.fromkeys(("value", "worst_decile", "global_value", "global_worst_decile"), _METRIC),
        "devices": _SCORES,
        "global_devices": _SCORES,
        "extra_device_seconds": _nullable(_seconds),
        "extra_time_fraction": _nullable(_non_negative),
        **dict.fromkeys(("extra_uplink_bytes", "extra_downlink_bytes"), _nullable(_count)),
        "models": _device_ids(_text_value),
    }
)

# What the engine always writes (nullable: null before any evaluation, or without a target) ...
_TEXT = ("task", "strategy")
_REQUIRED: dict[str, Check] = {
    "rounds": _count,
    "virtual_seconds": _seconds,
    "wall_seconds": _seconds,
    "train_wall_seconds": _seconds,
    "uplink_bytes": _count,
    "downlink_bytes": _count,
    "chance_level": _METRIC,
    "target": _METRIC,
    "time_to_target_seconds": _nullable(_seconds),
}
# ... and what a reader does without (missing reads as null).
_OPTIONAL: dict[str, Check] = {
    "initial_metric": _METRIC,
    "final_eval_loss": _METRIC,
    "eval_wall_seconds": _nullable(_seconds),
    "aggregation_wall_seconds": _nullable(_seconds),
    "setup_wall_seconds": _nullable(_seconds),
    "num_devices": _nullable(_count),
    "seed": _nullable(_seed),
    "tasks": _nullable(_COUNTS),
    "updates": _nullable(_COUNTS),
    "staleness": _nullable(_table(dict, _non_negative)),
    "evaluations": _nullable(_table(list, _EVALUATION)),
    "devices": _nullable(_table(list, _DEVICE_ENTRY)),
    "device_classes": _nullable(_table(dict, _COUNTS)),
    "pruning": _nullable(_table(dict)),
    "device_models": _nullable(check_device_models),
    "federated": _nullable(_FEDERATED),
    "personal": _nullable(_PERSONAL),
}
_OPTIONAL_TEXT = ("scheduler", "model", "executor")
_ZERO_IF_MISSING = ("eval_wall_seconds", "aggregation_wall_seconds", "setup_wall_seconds")


def _text(data: dict[str, Any], key: str) -> str:
    if key not in data:
        raise ValueError(f"missing key '{key}'")
    return _text_value(data[key], key)


def _metric(data: dict[str, Any]) -> Metric:
    if "metric" not in data:
        raise ValueError("missing key 'metric'")
    metric = data["metric"]
    if metric is None:
        return Metric("metric", None)
    problem = ValueError(
        f"key 'metric' must be {{'name': …, 'value': a finite number or null}}, got {_shown(metric)}"
    )
    if not isinstance(metric, dict):
        raise problem
    name, value, higher = (
        metric.get("name", "metric"),
        metric.get("value"),
        metric.get("higher_is_better", True),
    )
    if not isinstance(name, str) or not isinstance(higher, bool):
        raise problem
    try:
        value = _METRIC(value, "metric.value")
    except ValueError:
        raise problem from None
    return Metric(name or "metric", value, higher)
