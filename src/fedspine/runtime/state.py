"""What a run accumulates (:class:`RunState`, for the summary) and what its event loop keeps between two
events (:class:`LoopState`, saved with every checkpoint)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fedspine.metrics.records import DeviceStats
from fedspine.runtime.tasks import Events, RunningTask, TaskOutcome
from fedspine.sim.clock import EventQueue
from fedspine.types import ClientUpdate, LoraState


@dataclass
class RunState:
    """What the engine accumulates while it runs."""

    evaluations: list[dict[str, Any]] = field(default_factory=list)
    train_wall_seconds: float = 0.0
    eval_wall_seconds: float = 0.0
    aggregation_wall_seconds: float = 0.0
    device_stats: dict[int, DeviceStats] = field(default_factory=dict)
    updates: dict[str, int] = field(default_factory=dict)
    """Update accounting: dispatched, applied, unapplied_at_end."""
    personal_seconds: dict[int, float] = field(default_factory=dict)
    """Per device, the virtual seconds its personal adapter (``split``, ``clustered``) added to its
    tasks."""
    personal_bytes: dict[str, int] = field(default_factory=lambda: {"uplink": 0, "downlink": 0})
    """Bytes the cluster adapters (``clustered``) added to the tasks' uplinks and downlinks."""
    personal: dict[str, Any] | None = None
    """The personal models' evaluation (:func:`~fedspine.runtime.personal.personalize`; None when the
    devices hold no data out)."""
    stalled: str | None = None
    """Why the run stopped before its limits, when it could make no progress."""


@dataclass
class OpenRound:
    """A synchronous round whose cohort is out."""

    round: int
    start: float
    outcomes: list[TaskOutcome]
    """Every selected device's task, in selection order (those that did not fit in memory too)."""
    out: set[int] = field(default_factory=set)
    """Ids of the launched tasks that have not ended yet."""
    arrivals: list[float] = field(default_factory=list)
    """Seconds after ``start`` of the round's valid arrivals so far."""


@dataclass
class LoopState:
    """Everything the event loop keeps between two events; a checkpoint saves it with the run."""

    queue: Events = field(default_factory=EventQueue)
    """Pending arrivals, losses, scheduler timers, devices coming back online and cohorts."""
    version: int = 0
    """Server steps taken: the global version (synchronous: rounds done)."""
    applied: int = 0
    dispatched: int = 0
    running: dict[int, RunningTask] = field(default_factory=dict)
    round: OpenRound | None = None
    """The synchronous round in progress."""
    arrived: dict[int, tuple[RunningTask, ClientUpdate]] = field(default_factory=dict)
    """Arrived updates the scheduler has not applied yet, by task id."""
    busy: set[int] = field(default_factory=set)
    offline: set[int] = field(default_factory=set)
    """Devices waiting for their trace to bring them back online."""
    declined: set[int] = field(default_factory=set)
    """Devices that declined an offer: offered work again after an aggregation, or when idle."""
    failed: set[int] = field(default_factory=set)
    """Devices whose task did not fit in memory: offered work again after an aggregation."""
    offers: dict[int, int] = field(default_factory=dict)
    """Offers made to each device so far (keys its next task's batches and draws)."""
    momentum: LoraState | None = None
    recent_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=20))
    since: dict[str, float] = field(default_factory=dict)
    """Counts since the last server step, for its record."""
    last_aggregation_end: float = 0.0
    last_evaluated: int = -1
    checkpointed: int = 0
    """The version of the newest checkpoint."""
    fruitless: dict[int, int] = field(default_factory=dict)
    """Per device, its tasks that ended without an update (rejected, lost, out of memory) since the
    last update arrived from any device: an asynchronous run whose every task fails would otherwise
    offer new ones forever."""
