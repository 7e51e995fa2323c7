"""The virtual clock and its event queue: the only owner of simulated time."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class VirtualClock:
    """Simulated wall-clock time of the fleet, in seconds. It only moves forward."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    @property
    def now(self) -> float:
        """Current virtual time, seconds."""
        return self._now

    def advance_to(self, time: float) -> None:
        """Move the clock to ``time``; moving backwards is a bug in the caller."""
        if time < self._now:
            raise ValueError(f"virtual time cannot go back from {self._now} to {time}")
        self._now = time


@dataclass(order=True)
class _Entry(Generic[T]):
    time: float
    seq: int
    item: T = field(compare=False)


class EventQueue(Generic[T]):
    """Events ordered by virtual time; ties keep insertion order, so runs are deterministic."""

    def __init__(self) -> None:
        self._heap: list[_Entry[T]] = []
        self._pushed = 0
        """Events pushed so far: the tie-breaker that keeps insertion order (a plain int, so a
        checkpoint can save the queue)."""

    def push(self, time: float, item: T) -> None:
        """Schedule ``item`` at virtual ``time``."""
        heapq.heappush(self._heap, _Entry(time, self._pushed, item))
        self._pushed += 1

    def pop(self) -> tuple[float, T]:
        """Remove and return the earliest event as ``(time, item)``."""
        entry = heapq.heappop(self._heap)
        return entry.time, entry.item

    def peek_time(self) -> float | None:
        """Time of the earliest event, or None when empty."""
        return self._heap[0].time if self._heap else None

    def items(self) -> list[T]:
        """The pending events' items, in no particular order."""
        return [entry.item for entry in self._heap]

    def __len__(self) -> int:
        return len(self._heap)
