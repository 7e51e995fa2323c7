"""The events a run writes to ``events.jsonl``: one dataclass per kind.

Each line is ``{"event": KIND, ...the event's fields}``, in the order the fields are declared here
(a task's ``detail`` first). Everything in an event is reproducible for a seed in simulation; host
wall-clock measurements go to ``host_timings.jsonl`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import ClassVar, Protocol


class Event(Protocol):
    """What the recorder writes: a kind and the fields of one line."""

    kind: ClassVar[str]

    def record(self) -> dict[str, object]:
        """The event's fields, in file order."""
        ...


def _fields(event: object, skip: tuple[str, ...] = ()) -> dict[str, object]:
    if not is_dataclass(event):
        raise TypeError(f"{type(event).__name__} is not a dataclass")
    return {f.name: getattr(event, f.name) for f in fields(event) if f.name not in skip}


class _Fields:
    """An event whose line is its fields, as declared."""

    def record(self) -> dict[str, object]:
        return _fields(self)


@dataclass(frozen=True)
class TaskEvent:
    """A client task ended: arrived (``ok``, ``rejected``), late, out of memory, dropped or cancelled.

    Times are on the run's clock; ``round`` is the synchronous round, or the global version an
    asynchronous task started from.
    """

    kind: ClassVar[str] = "task"

    round: int
    device_id: int
    device_class: str
    network: str
    status: str
    virtual_start: float
    virtual_end: float
    downlink_seconds: float
    compute_seconds: float
    uplink_seconds: float
    downlink_bytes: int
    uplink_bytes: int
    tokens: int
    num_samples: int
    local_steps: int
    lora_rank: int
    pruning_ratio: float
    train_loss: float | None
    peak_memory_bytes: int
    detail: dict[str, object] = field(default_factory=dict)
    """What depends on the scheduler and transport (``task_id`` of an asynchronous task, the
    ``reason`` a task failed, a deployment's measured ``setup_seconds``...), written first."""

    def record(self) -> dict[str, object]:
        return {**self.detail, **_fields(self, skip=("detail",))}


@dataclass(frozen=True)
class AggregationEvent(_Fields):
    """The server aggregated ``num_updates`` updates (``uplink_bytes`` of them) into version ``round``."""

    kind: ClassVar[str] = "aggregation"

    round: int
    virtual_start: float
    virtual_end: float
    aggregation_seconds: float
    num_updates: int
    uplink_bytes: int


@dataclass(frozen=True)
class ServerStepEvent(_Fields):
    """An asynchronous scheduler's server step: the tasks it applied, their staleness and its rate."""

    kind: ClassVar[str] = "server_step"

    round: int
    task_ids: list[int]
    staleness: list[int]
    lr: float


@dataclass(frozen=True)
class EvaluationEvent(_Fields):
    """The global model evaluated after ``round`` server steps, at ``virtual_time``."""

    kind: ClassVar[str] = "evaluation"

    round: int
    virtual_time: float
    metric: str
    value: float
    loss: float


@dataclass(frozen=True)
class FederatedEvaluationEvent(_Fields):
    """The devices evaluated global version ``round`` on their own held-out data: the pooled metric
    (count-weighted) and, per device id, its ``value``, ``loss`` and ``count``; ``failed``: the
    devices asked that gave none, and why."""

    kind: ClassVar[str] = "federated_evaluation"

    round: int
    virtual_time: float
    metric: str
    value: float | None
    """None when no device answered."""
    loss: float | None
    count: int
    devices: dict[str, dict[str, float]]
    failed: dict[str, str] = field(default_factory=dict)
    """Devices asked that gave no evaluation, and why (a deployment's refusals, timeouts, bad replies)."""


@dataclass(frozen=True)
class PersonalEvaluationEvent(_Fields):
    """Every device's personal model (``personalize.method``) evaluated on its own held-out data at
    the end of the run: per device id, its ``value``, ``loss`` and ``count``, the ``global`` model's
    value and ``global_loss`` on the same examples, and the device seconds personalization cost it
    (``extra_seconds``)."""

    kind: ClassVar[str] = "personal_evaluation"

    method: str
    metric: str
    devices: dict[str, dict[str, float]]


@dataclass(frozen=True)
class DeploymentEvent(_Fields):
    """A deployment found its devices' SuperNodes (device id -> Flower node id)."""

    kind: ClassVar[str] = "deployment"

    nodes: dict[str, int]
    discovery_seconds: float
    data: dict[str, dict[str, object]] = field(default_factory=dict)
    """Nodes that bring their own data: per device, the ``examples`` it trains on, the
    ``eval_examples`` it holds out, and the ``error`` that makes its data unusable ("" when none)."""
