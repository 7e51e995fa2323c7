"""Synchronous rounds with client sampling, an optional deadline and over-selection (FedScale).

Each round samples ``ceil(k * (1 + over_selection))`` of the online devices, waits for the first
``k`` updates (or until the deadline) and aggregates them; updates arriving later are lost. With
``keep = "all_in_time"`` (a deadline needed) it keeps every update that meets the deadline instead: a
straggler that makes itself fast enough (FedSpine prunes it) still counts, where the first ``k``
would keep cutting it for being slower than the rest. On the
engine's event loop a round is a :class:`~fedspine.algorithms.schedulers.base.Cohort`: ordered when
the previous round's server step is done, closed when every task of its cohort has ended.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Literal

from fedspine.algorithms.schedulers.base import (
    SCHEDULERS,
    Arrival,
    Cohort,
    Limits,
    Order,
    RoundPlan,
    Scheduler,
    ServerStep,
)


@SCHEDULERS.register("sync")
class SyncScheduler(Scheduler):
    """Synchronous FedAvg-style rounds."""

    name = "sync"
    fills = False
    orders_cohorts = True

    def __init__(
        self,
        rounds: int,
        clients_per_round: int,
        over_selection: float = 0.0,
        deadline_seconds: float = 0.0,
        keep: Literal["first_k", "all_in_time"] = "first_k",
    ) -> None:
        if keep == "all_in_time" and deadline_seconds <= 0:
            raise ValueError("keeping every update in time needs a deadline")
        super().__init__(Limits(rounds, local_steps=0, concurrency=clients_per_round))
        self.clients_per_round = clients_per_round
        self.over_selection = over_selection
        self.deadline_seconds = deadline_seconds
        self.keep_all_in_time = keep == "all_in_time"
        self.capacity = (
            math.ceil(clients_per_round * (1.0 + over_selection))
            if self.keep_all_in_time
            else clients_per_round
        )
        """The most updates a round aggregates."""
        self.opened = 0
        """The newest round ordered."""

    def orders(self, now: float, version: int) -> Sequence[Order]:
        """The next round, once the previous one has its server step (``version`` rounds are done)."""
        if self.opened > version or version >= self.rounds:
            return []
        self.opened = version + 1
        return [Cohort(self.opened)]

    def on_arrival(self, now: float, arrival: Arrival) -> list[ServerStep]:
        return []  # a cohort's arrivals are planned together when the round closes (:meth:`plan`)

    def select(self, online: Sequence[int], rng: random.Random) -> list[int]:
        """Sample the devices that get a task this round (sorted by id)."""
        count = min(len(online), math.ceil(self.clients_per_round * (1.0 + self.over_selection)))
        return sorted(rng.sample(list(online), count))

    def admits(self, seconds: float, earlier: Sequence[float]) -> bool:
        """Whether an update arriving ``seconds`` after the round start can still be aggregated, given
        the round's ``earlier`` valid arrivals: not after the deadline, nor after the k-th of them
        (``first_k``). (One that cannot is never trained in simulation: its work is lost in the fleet.)"""
        k = self.capacity
        bound = sorted(earlier)[k - 1] if len(earlier) >= k else float("inf")
        return not ((self.deadline_seconds > 0 and seconds > self.deadline_seconds) or seconds > bound)

    def plan(self, arrival_seconds: Mapping[int, float], launched: int | None = None) -> RoundPlan:
        """Decide which arrivals to keep, given each device's seconds from round start to arrival.
        ``launched``: the round's tasks, arrived or not (default: those that arrived)."""
        order = sorted(arrival_seconds, key=lambda d: (arrival_seconds[d], d))
        in_time = [
            d for d in order if self.deadline_seconds <= 0 or arrival_seconds[d] <= self.deadline_seconds
        ]
        accepted = in_time[: self.capacity]
        late = tuple(d for d in order if d not in accepted)
        launched = len(order) if launched is None else launched
        awaited = min(launched, self.capacity) if self.keep_all_in_time else self.capacity
        if len(accepted) == awaited or self.deadline_seconds <= 0:
            close = max((arrival_seconds[d] for d in accepted), default=0.0)
        else:
            close = self.deadline_seconds  # fewer arrived than it waits for: it waited for the deadline
        return RoundPlan(accepted=tuple(accepted), late=late, close_seconds=close)
