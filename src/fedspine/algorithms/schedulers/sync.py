"""Synchronous rounds with client sampling, an optional deadline and over-selection (FedScale).

Each round samples ``ceil(k * (1 + over_selection))`` of the online devices, waits for the first
``k`` updates (or until the deadline) and aggregates them; updates arriving later are lost. On the
engine's event loop a round is a :class:`~fedspine.algorithms.schedulers.base.Cohort`: ordered when
the previous round's server step is done, closed when every task of its cohort has ended.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

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
    ) -> None:
        super().__init__(Limits(rounds, local_steps=0, concurrency=clients_per_round))
        self.clients_per_round = clients_per_round
        self.over_selection = over_selection
        self.deadline_seconds = deadline_seconds
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
        wanted = math.ceil(self.clients_per_round * (1.0 + self.over_selection))
        count = min(len(online), wanted)
        return sorted(rng.sample(list(online), count))

    def admits(self, seconds: float, earlier: Sequence[float]) -> bool:
        """Whether an update arriving ``seconds`` after the round start can still be aggregated, given
        the round's ``earlier`` valid arrivals: not after the deadline, nor after the k-th of them.
        (One that cannot is never trained in simulation: its work is lost in the fleet.)"""
        k = self.clients_per_round
        bound = sorted(earlier)[k - 1] if len(earlier) >= k else float("inf")
        return not ((self.deadline_seconds > 0 and seconds > self.deadline_seconds) or seconds > bound)

    def plan(self, arrival_seconds: Mapping[int, float]) -> RoundPlan:
        """Decide which arrivals to keep, given each device's seconds from round start to arrival."""
        order = sorted(arrival_seconds, key=lambda d: (arrival_seconds[d], d))
        in_time = [
            d for d in order if self.deadline_seconds <= 0 or arrival_seconds[d] <= self.deadline_seconds
        ]
        accepted = in_time[: self.clients_per_round]
        late = tuple(d for d in order if d not in accepted)
        if len(accepted) == self.clients_per_round or self.deadline_seconds <= 0:
            close = max((arrival_seconds[d] for d in accepted), default=0.0)
        else:
            close = self.deadline_seconds  # fewer than k arrived: the server waited for the deadline
        return RoundPlan(accepted=tuple(accepted), late=late, close_seconds=close)
