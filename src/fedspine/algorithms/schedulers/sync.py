"""Synchronous rounds with client sampling, an optional deadline and over-selection (FedScale).

Each round samples ``ceil(k * (1 + over_selection))`` of the online devices, waits for the first
``k`` updates (or until the deadline) and aggregates them; updates arriving later are lost.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from fedspine.algorithms.schedulers.base import SCHEDULERS, RoundPlan


@SCHEDULERS.register("sync")
class SyncScheduler:
    """Synchronous FedAvg-style rounds."""

    name = "sync"

    def __init__(
        self,
        rounds: int,
        clients_per_round: int,
        over_selection: float = 0.0,
        deadline_seconds: float = 0.0,
    ) -> None:
        self.rounds = rounds
        self.clients_per_round = clients_per_round
        self.over_selection = over_selection
        self.deadline_seconds = deadline_seconds

    def select(self, online: Sequence[int], rng: random.Random) -> list[int]:
        """Sample the devices that get a task this round (sorted by id)."""
        wanted = math.ceil(self.clients_per_round * (1.0 + self.over_selection))
        count = min(len(online), wanted)
        return sorted(rng.sample(list(online), count))

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
