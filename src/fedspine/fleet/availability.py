"""Availability traces: when each device is online, over virtual time.

A trace answers two questions the engines ask: is device ``d`` online at time ``t``, and, for a task
running from ``t0`` to ``t1``, when (if ever) does the device go offline in between. A device that
goes offline mid-task loses the task: its time is spent, its update is never sent.

* ``always``: every device is always online (the per-round ``availability`` draw still applies).
* ``periodic``: charging windows. Each device is online for ``online_fraction`` of every
  ``period_seconds``, from a phase drawn per device (devices are not all online at once).
* ``sessions``: random sessions, an alternating renewal process: online and offline spells are
  exponential with means ``mean_online_seconds`` and ``mean_offline_seconds``; the first state is
  drawn from the stationary share online.

Every draw comes from a ``random.Random`` keyed by (stream, seed, device), so a trace is fixed by the
seed and does not depend on the order in which the engine asks.
"""

from __future__ import annotations

import bisect
import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass


class AvailabilityTrace(ABC):
    """Online/offline state of every device over virtual time."""

    @abstractmethod
    def online(self, device_id: int, time: float) -> bool:
        """Whether the device is online at ``time``."""

    @abstractmethod
    def next_change(self, device_id: int, time: float) -> float:
        """The first time strictly after ``time`` at which the device's state flips (inf if never)."""

    def offline_during(self, device_id: int, start: float, end: float) -> float | None:
        """When a device online at ``start`` goes offline before ``end``, or None if it stays online."""
        change = self.next_change(device_id, start)
        return change if change < end else None


class AlwaysOnline(AvailabilityTrace):
    """No trace: every device is online all the time."""

    def online(self, device_id: int, time: float) -> bool:
        return True

    def next_change(self, device_id: int, time: float) -> float:
        return math.inf


@dataclass
class PeriodicTrace(AvailabilityTrace):
    """Online for ``online_fraction`` of each ``period`` seconds, from a per-device phase."""

    seed: int
    period: float
    online_fraction: float

    def _phase(self, device_id: int) -> float:
        return random.Random(f"trace_phase:{self.seed}:{device_id}").uniform(0.0, self.period)

    def online(self, device_id: int, time: float) -> bool:
        return (time + self._phase(device_id)) % self.period < self.online_fraction * self.period

    def next_change(self, device_id: int, time: float) -> float:
        if self.online_fraction >= 1.0:
            return math.inf
        position = (time + self._phase(device_id)) % self.period
        boundary = self.online_fraction * self.period
        return time + (boundary - position if position < boundary else self.period - position)


class SessionTrace(AvailabilityTrace):
    """Exponential online and offline spells, alternating, generated lazily per device."""

    def __init__(self, seed: int, mean_online: float, mean_offline: float) -> None:
        self.seed = seed
        self.mean_online = mean_online
        self.mean_offline = mean_offline
        self._changes: dict[int, list[float]] = {}
        self._start_online: dict[int, bool] = {}
        self._rngs: dict[int, random.Random] = {}

    def _extend(self, device_id: int, until: float) -> list[float]:
        changes = self._changes.get(device_id)
        if changes is None:
            rng = self._rngs[device_id] = random.Random(f"trace_sessions:{self.seed}:{device_id}")
            share = self.mean_online / (self.mean_online + self.mean_offline)
            self._start_online[device_id] = rng.random() < share
            changes = self._changes[device_id] = []
        rng = self._rngs[device_id]
        while not changes or changes[-1] <= until:
            online_now = self._start_online[device_id] == (len(changes) % 2 == 0)
            mean = self.mean_online if online_now else self.mean_offline
            changes.append((changes[-1] if changes else 0.0) + rng.expovariate(1.0 / mean))
        return changes

    def online(self, device_id: int, time: float) -> bool:
        changes = self._extend(device_id, time)
        flips = bisect.bisect_right(changes, time)
        return self._start_online[device_id] == (flips % 2 == 0)

    def next_change(self, device_id: int, time: float) -> float:
        changes = self._extend(device_id, time)
        return changes[bisect.bisect_right(changes, time)]


def make_trace(
    kind: str,
    seed: int,
    period_seconds: float = 3600.0,
    online_fraction: float = 0.5,
    mean_online_seconds: float = 600.0,
    mean_offline_seconds: float = 300.0,
) -> AvailabilityTrace:
    """The trace named ``kind`` (``always``, ``periodic``, ``sessions``)."""
    if kind == "always":
        return AlwaysOnline()
    if kind == "periodic":
        return PeriodicTrace(seed, period_seconds, online_fraction)
    if kind == "sessions":
        return SessionTrace(seed, mean_online_seconds, mean_offline_seconds)
    raise ValueError(f"unknown availability trace {kind!r}; allowed: always, periodic, sessions")
