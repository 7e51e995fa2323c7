"""Synchronous scheduling: sampling with over-selection, deadlines, first-K arrivals."""

from __future__ import annotations

import random

from fedspine.algorithms.schedulers import SyncScheduler


def test_select_samples_k_times_one_plus_over_selection() -> None:
    scheduler = SyncScheduler(rounds=1, clients_per_round=4, over_selection=0.5)
    chosen = scheduler.select(list(range(20)), random.Random(0))
    assert len(chosen) == 6
    assert chosen == sorted(set(chosen))
    assert scheduler.select([1, 2], random.Random(0)) == [1, 2]  # fewer online than wanted


def test_select_is_deterministic_for_a_seed() -> None:
    scheduler = SyncScheduler(rounds=1, clients_per_round=3)
    assert scheduler.select(list(range(10)), random.Random(5)) == scheduler.select(
        list(range(10)), random.Random(5)
    )


def test_plan_keeps_the_first_k_arrivals() -> None:
    plan = SyncScheduler(1, clients_per_round=2).plan({0: 5.0, 1: 1.0, 2: 3.0})
    assert plan.accepted == (1, 2)
    assert plan.late == (0,)
    assert plan.close_seconds == 3.0


def test_plan_drops_updates_after_the_deadline_and_waits_for_it() -> None:
    plan = SyncScheduler(1, clients_per_round=3, deadline_seconds=4.0).plan({0: 5.0, 1: 1.0, 2: 3.0})
    assert plan.accepted == (1, 2)
    assert plan.late == (0,)
    assert plan.close_seconds == 4.0  # fewer than k arrived in time: the server waited until the deadline


def test_plan_closes_early_when_k_arrive_before_the_deadline() -> None:
    plan = SyncScheduler(1, clients_per_round=2, deadline_seconds=10.0).plan({0: 2.0, 1: 1.0, 2: 3.0})
    assert plan.close_seconds == 2.0
    assert plan.late == (2,)
