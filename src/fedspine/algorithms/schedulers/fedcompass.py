"""FedCompass (Li et al., ICLR 2024): semi-asynchronous FL with a computing-power-aware scheduler.

Specification: algorithms.md §3 (the reference implementation's rules). Every device trains all the
time. The server estimates each device's seconds per local step from its reports and gives it a
number of steps ``Q`` in ``[q_min, q_max]`` so that it arrives together with an *arrival group*; a
group is aggregated when all its members have arrived or at its latest arrival time
``T_lat = now + lambda Q v``, whichever comes first. Updates arriving after their group's ``T_lat``
wait in a general buffer and ride along with the next group aggregation, so none is dropped.
A device's first report, before it belongs to a group, is applied at once on its own.

Aggregation: ``w <- w + alpha sum_j s(tau_j) (n_j / N) delta_j`` with ``n_j / N`` the device's share
of the whole fleet's weight (the reference code's ``1/N``), so one group moves the model by its
members' share.

Local work is counted in optimizer steps. The paper's Q range (20-100) is for small models; an LLM
step on an edge device takes seconds to minutes, so the defaults here are smaller (2-8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedspine.algorithms.schedulers.base import (
    SCHEDULERS,
    Arrival,
    Limits,
    Scheduler,
    ServerStep,
    TaskOrder,
)


@dataclass
class ArrivalGroup:
    """Devices expected to report together.

    Attributes:
        members: devices still training for this group.
        arrived: updates of members that reported on time, waiting for the group's aggregation.
        expected: expected arrival time ``T_exp``.
        latest: latest arrival time ``T_lat``, when the group is aggregated at the latest.
    """

    members: set[int] = field(default_factory=set)
    arrived: list[Arrival] = field(default_factory=list)
    expected: float = 0.0
    latest: float = 0.0


@SCHEDULERS.register("fedcompass")
class FedCompass(Scheduler):
    """Computing-power-aware step assignment and arrival groups."""

    name = "fedcompass"
    fills = False

    def __init__(
        self,
        limits: Limits,
        q_min: int = 2,
        q_max: int = 8,
        latest_time_factor: float = 1.5,
        speed_momentum: float = 0.9,
        alpha: float = 0.9,
    ) -> None:
        super().__init__(limits)
        if not 1 <= q_min <= q_max:
            raise ValueError(f"need 1 <= q_min <= q_max, got q_min={q_min}, q_max={q_max}")
        self.q_min = q_min
        self.q_max = q_max
        self.latest_time_factor = latest_time_factor
        self.speed_momentum = speed_momentum
        self.alpha = alpha
        self.speed: dict[int, float] = {}
        """Estimated seconds per local step (download and upload included), per device."""
        self.steps: dict[int, int] = {}
        self.started: dict[int, float] = {}
        self.group_of: dict[int, int] = {}
        self.groups: dict[int, ArrivalGroup] = {}
        self.general: list[Arrival] = []
        self._next_group = 0
        self._to_assign: list[int] = []
        self._timers: list[tuple[float, int]] = []

    # --- events ----------------------------------------------------------------------------------

    def start(self, now: float, devices: Sequence[int]) -> list[TaskOrder]:
        """Every device fetches the initial model at the same time and trains ``q_max`` steps."""
        return [self._order(d, self.q_max, now) for d in devices]

    def on_arrival(self, now: float, arrival: Arrival) -> list[ServerStep]:
        device = arrival.device_id
        self._observe_speed(device, now)
        group_id = self.group_of.pop(device, None)
        if group_id is None:  # not in a group yet: apply at once, on its own
            self._to_assign.append(device)
            return [ServerStep((arrival,), lr=self.alpha, normalize="fleet")]
        group = self.groups.get(group_id)
        if group is None or now > group.latest:  # late: wait for the next group aggregation
            self.general.append(arrival)
            self._to_assign.append(device)
            if group is not None:  # its timer has fired already: nobody else waits for it
                group.members.discard(device)
                if not group.members and not group.arrived:
                    del self.groups[group_id]
            return []
        group.members.discard(device)
        group.arrived.append(arrival)
        return self._complete(group_id)

    def on_lost(self, now: float, device_id: int) -> list[ServerStep]:
        """A device dropped out: it leaves its group (which may now be complete)."""
        self.steps.pop(device_id, None)
        group_id = self.group_of.pop(device_id, None)
        if group_id is None or group_id not in self.groups:
            return []
        group = self.groups[group_id]
        group.members.discard(device_id)
        if not group.members and not group.arrived:
            del self.groups[group_id]
            return []
        return self._complete(group_id)

    def on_timer(self, now: float, key: int) -> list[ServerStep]:
        """A group's latest arrival time: aggregate whoever arrived."""
        group = self.groups.get(key)
        if group is None or not group.arrived:
            return []
        return self._aggregate_group(key)

    def on_available(self, now: float, device_id: int) -> None:
        self._to_assign.append(device_id)

    def orders(self, now: float, version: int) -> list[TaskOrder]:
        """Assign the devices waiting for work, fastest first (after the current event's steps)."""
        waiting = sorted(set(self._to_assign), key=lambda d: (self.speed.get(d, math.inf), d))
        self._to_assign = []
        return [self._order(device, self.assign(device, now), now) for device in waiting]

    def take_timers(self) -> list[tuple[float, int]]:
        timers, self._timers = self._timers, []
        return timers

    def pending(self) -> list[Arrival]:
        return [*self.general, *(a for g in self.groups.values() for a in g.arrived)]

    # --- the scheduler ---------------------------------------------------------------------------

    def assign(self, device: int, now: float) -> int:
        """Give ``device`` a number of steps and an arrival group (algorithms.md §3.3); returns Q."""
        v = self.speed.get(device)
        if v is None:  # never reported (e.g. offline at the start): a full task, on its own
            return self.q_max
        if not self.groups:
            return self._new_group(device, self.q_max, v, now)
        best: tuple[int, int] | None = None  # (Q, group)
        for group_id, group in self.groups.items():
            q = math.floor((group.expected - now) / v)
            if self.q_min <= q <= self.q_max and (best is None or q >= best[0]):
                best = (q, group_id)
        if best is not None:
            q, group_id = best
            self.groups[group_id].members.add(device)
            self.group_of[device] = group_id
            return q
        q = -1
        for group in self.groups.values():
            if now < group.latest:
                fastest = min(self.speed[d] for d in (*group.members, *(a.device_id for a in group.arrived)))
                q_group = math.floor((group.latest + fastest * self.q_max - now) / v)
                if q_group <= self.q_max:
                    q = max(q, q_group)
        if 0 <= q < self.q_min:
            q = self.q_min
        if q < 0:
            q = self.q_max
        return self._new_group(device, q, v, now)

    def _new_group(self, device: int, q: int, v: float, now: float) -> int:
        group_id = self._next_group
        self._next_group += 1
        group = ArrivalGroup({device}, [], now + q * v, now + self.latest_time_factor * q * v)
        self.groups[group_id] = group
        self.group_of[device] = group_id
        self._timers.append((group.latest, group_id))
        return q

    def _order(self, device: int, steps: int, now: float) -> TaskOrder:
        self.steps[device] = steps
        self.started[device] = now
        return TaskOrder(device, steps)

    def _observe_speed(self, device: int, now: float) -> None:
        observed = (now - self.started[device]) / self.steps[device]
        previous = self.speed.get(device)
        m = self.speed_momentum
        self.speed[device] = observed if previous is None else (1 - m) * previous + m * observed

    def _complete(self, group_id: int) -> list[ServerStep]:
        """Aggregate the group if every member has reported."""
        group = self.groups[group_id]
        return self._aggregate_group(group_id) if not group.members and group.arrived else []

    def _aggregate_group(self, group_id: int) -> list[ServerStep]:
        """Group aggregation: the general buffer and the group's updates, then re-assign its members.

        Members still training stay in the group, which can no longer be joined (its times are
        reset); they will arrive late.
        """
        group = self.groups[group_id]
        step = ServerStep((*self.general, *group.arrived), lr=self.alpha, normalize="fleet")
        self.general = []
        self._to_assign.extend(a.device_id for a in group.arrived)
        group.arrived = []
        group.expected = group.latest = 0.0
        if not group.members:
            del self.groups[group_id]
        return [step]
