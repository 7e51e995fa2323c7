"""The plain values a run's tasks and events are made of, shared by the engine and its transports.

A task is dispatched as a :class:`RunningTask` holding its :class:`TaskOutcome` (the device, the
task, its times and bytes, and its update once trained). The engine's event queue holds the small
event types below, dispatched by type: a task's :class:`Arrive` or :class:`Lost`, a scheduler's
:class:`Timer`, a device coming back :class:`Online`, and a synchronous round's :class:`OpenCohort`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedspine.algorithms.schedulers import Cohort
from fedspine.algorithms.wire import update_payload_bytes
from fedspine.runtime.executor import PreparedTask
from fedspine.sim.clock import EventQueue
from fedspine.types import ClientTask, ClientUpdate, Device, TaskStatus


@dataclass
class TaskOutcome:
    """Timing and result of one client task (times relative to the task's start)."""

    device: Device
    status: TaskStatus
    downlink_bytes: int
    downlink_seconds: float = 0.0
    compute_seconds: float = 0.0
    uplink_seconds: float = 0.0
    uplink_bytes: int = 0
    update: ClientUpdate | None = None
    prepared: PreparedTask | None = None
    task: ClientTask | None = None
    lost_seconds: float | None = None
    """When the device went offline and lost the task (status ``dropped``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Transport-specific fields recorded with the task (e.g. a deployment's measured timings)."""

    @property
    def arrival_seconds(self) -> float:
        return self.downlink_seconds + self.compute_seconds + self.uplink_seconds

    def lose(self, at_seconds: float) -> None:
        """The device went offline ``at_seconds`` after the task started: the task ends there, lost."""
        self.status, self.lost_seconds = TaskStatus.DROPPED, at_seconds
        self.downlink_seconds = min(self.downlink_seconds, at_seconds)
        self.compute_seconds = max(0.0, min(self.compute_seconds, at_seconds - self.downlink_seconds))
        self.uplink_seconds = max(0.0, at_seconds - self.downlink_seconds - self.compute_seconds)
        self.uplink_bytes, self.update = 0, None

    @property
    def end_seconds(self) -> float:
        """When the task ended for the server: its arrival, or the moment it was lost."""
        return self.lost_seconds if self.lost_seconds is not None else self.arrival_seconds


@dataclass
class RunningTask:
    """A dispatched task, from its start until it arrives, is lost or is cancelled."""

    task_id: int
    outcome: TaskOutcome
    version: int
    """Global version the device received."""
    start: float
    """Dispatch time on the run's clock."""
    deadline: float = 0.0
    """Seconds after ``start`` after which the task is late (a synchronous round's deadline); 0: none."""


def count_upload(outcome: TaskOutcome, update: ClientUpdate) -> None:
    """Record the size of ``update``'s upload on it and on ``outcome``, with a cluster adapter's share
    (``clustered``) and the cluster it trained recorded apart."""
    update.uplink_bytes = outcome.uplink_bytes = update_payload_bytes(update)
    if update.cluster_state is not None:
        alone = update_payload_bytes(dataclasses.replace(update, cluster=None, cluster_state=None))
        outcome.extra["cluster"] = update.cluster
        outcome.extra["cluster_uplink_bytes"] = update.uplink_bytes - alone


@dataclass(frozen=True)
class Arrive:
    """A task's reply reached the server (with an update, or without one: rejected, or the device failed)."""

    task: RunningTask


@dataclass(frozen=True)
class Lost:
    """A task's device went offline before its update was in."""

    task: RunningTask


@dataclass(frozen=True)
class Timer:
    """A timer the scheduler set fired (its key: the scheduler's own number for it)."""

    key: int


@dataclass(frozen=True)
class Online:
    """A device the availability trace had taken offline is back."""

    device: int


@dataclass(frozen=True)
class OpenCohort:
    """A synchronous round's cohort is due (an event, so that a checkpoint can come before it)."""

    order: Cohort


Event = Arrive | Lost | Timer | Online | OpenCohort

Events = EventQueue[Event]
"""The run's event queue."""

Ended = tuple[float, Arrive | Lost]
"""A task's end as a transport reports it: when on the run's clock, and how."""
