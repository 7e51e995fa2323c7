"""The virtual clock only moves forward; the event queue orders by time and keeps ties in insertion order."""

from __future__ import annotations

import pytest

from fedspine.sim.clock import EventQueue, VirtualClock


def test_clock_moves_forward_only() -> None:
    clock = VirtualClock()
    clock.advance_to(2.5)
    clock.advance_to(2.5)
    assert clock.now == 2.5
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_to(1.0)


def test_events_pop_in_time_order_with_stable_ties() -> None:
    queue: EventQueue[str] = EventQueue()
    for time, name in [(3.0, "c"), (1.0, "a"), (3.0, "d"), (2.0, "b")]:
        queue.push(time, name)
    assert queue.peek_time() == 1.0
    assert [queue.pop() for _ in range(len(queue))] == [(1.0, "a"), (2.0, "b"), (3.0, "c"), (3.0, "d")]
    assert queue.peek_time() is None
