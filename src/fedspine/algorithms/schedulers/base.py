"""Scheduler registry and the plain values schedulers exchange with the engine."""

from __future__ import annotations

from dataclasses import dataclass

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
