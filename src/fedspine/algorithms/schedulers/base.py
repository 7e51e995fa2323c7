"""Scheduler registry and the plain values schedulers exchange with the engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fedspine.registry import Registry


@dataclass(frozen=True)
class RoundPlan:
    """Which arrivals a round keeps, decided from observed (or simulated) arrival times.

    Attributes:
        accepted: device ids whose updates are aggregated, in arrival order.
        late: device ids whose work is lost (after the deadline, or beyond the first K).
        close_seconds: seconds after the round start at which the server stops waiting.
    """

    accepted: tuple[int, ...]
    late: tuple[int, ...]
    close_seconds: float


SCHEDULERS: Registry[type] = Registry("scheduler")


@dataclass(frozen=True)
class Arrival:
    """An update that reached the server.

    Attributes:
        task_id: unique id of the task that produced it.
        device_id: the device.
        version: the global version (number of aggregations) the device started from.
        weight: its aggregation weight (e.g. number of training samples).
        time: virtual arrival time.
    """

    task_id: int
    device_id: int
    version: int
    weight: float
    time: float


@dataclass(frozen=True)
class ServerStep:
    """Apply these arrivals now: ``w <- w + lr * sum_j s(tau_j) p_j delta_j``.

    ``p_j = weight_j / sum of the step's weights`` (``normalize = "buffer"``) or ``/ sum of every
    device's weight`` (``"fleet"``, FedCompass's ``1/N``); ``delta_j`` is the change update ``j`` made to
    the version it started from, ``s`` the stale-update handler's scale; ``momentum`` is the server
    momentum (FedBuff), 0 for none.
    """

    arrivals: tuple[Arrival, ...]
    lr: float
    normalize: Literal["buffer", "fleet"] = "buffer"
    momentum: float = 0.0


@dataclass(frozen=True)
class TaskOrder:
    """Give ``device_id`` a task of ``steps`` local optimizer steps now."""

    device_id: int
    steps: int


@dataclass(frozen=True)
class Cohort:
    """Start synchronous round ``round``: sample the reachable devices and give each a task; the round
    closes, with one server step, when every task of the cohort has ended."""

    round: int


Order = TaskOrder | Cohort


@dataclass(frozen=True)
class Limits:
    """When a run stops, and how many devices the engine keeps training.

    Attributes:
        rounds: stop after this many aggregations (global versions; synchronous rounds).
        local_steps: optimizer steps of a task the engine hands out when it fills (0: it never does).
        concurrency: devices training at once when the engine fills (>= 1).
        max_updates: stop once this many updates were applied (0 = no limit).
        max_virtual_seconds: stop at this virtual time (0 = no limit).
    """

    rounds: int
    local_steps: int
    concurrency: int
    max_updates: int = 0
    max_virtual_seconds: float = 0.0


class Scheduler(ABC):
    """An event-driven scheduler: reacts to arrivals, losses and timers with server steps and orders.

    The engine owns the clock, the devices and the updates; a scheduler sees only arrivals and
    decides when to aggregate what, and (FedCompass) who trains how many steps. Schedulers that
    ``fill`` let the engine keep ``concurrency`` devices busy with ``local_steps``-step tasks, drawn at
    random among idle online devices. Synchronous rounds order :class:`Cohort` s instead of tasks.
    """

    name = ""
    fills = True
    orders_cohorts = False
    """True for schedulers whose orders are :class:`Cohort` s (synchronous rounds), not tasks."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.rounds = limits.rounds
        self.local_steps = limits.local_steps
        self.concurrency = limits.concurrency
        self.deadline_seconds = 0.0

    def start(self, now: float, devices: Sequence[int]) -> list[TaskOrder]:
        """Orders at the start (besides the engine's filling)."""
        return []

    @abstractmethod
    def on_arrival(self, now: float, arrival: Arrival) -> list[ServerStep]:
        """An update arrived; return the server steps to run now (possibly none)."""

    def on_lost(self, now: float, device_id: int) -> list[ServerStep]:
        """A device's task was lost (it went offline, ran out of memory, or declined)."""
        return []

    def on_timer(self, now: float, key: int) -> list[ServerStep]:
        """A timer set through :meth:`take_timers` fired."""
        return []

    def orders(self, now: float, version: int) -> Sequence[Order]:
        """Orders to dispatch now, after the current event's server steps (at global ``version``)."""
        return []

    def on_available(self, now: float, device_id: int) -> None:  # noqa: B027 (optional hook)
        """A device that could not train (offline, out of memory) may be given work again."""

    def take_timers(self) -> list[tuple[float, int]]:
        """Timers set since the last call, as ``(virtual time, key)``."""
        return []

    def pending(self) -> list[Arrival]:
        """Arrivals held in buffers, not yet applied."""
        return []
