"""Synchronous scheduling: sampling with over-selection, deadlines, first-K arrivals."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedspine.algorithms.schedulers import SyncScheduler
from fedspine.api import run_experiment
from fedspine.config import load_config
from fedspine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


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


def test_keeping_all_in_time_counts_a_straggler_that_meets_the_deadline() -> None:
    """Over-selected, first K: the third arrival is cut though it met the deadline; all in time keeps it."""
    arrivals = {0: 1.0, 1: 2.0, 2: 2.4, 3: 3.0}
    first_k = SyncScheduler(1, clients_per_round=2, over_selection=1.0, deadline_seconds=2.6).plan(arrivals)
    assert first_k.accepted == (0, 1) and first_k.late == (2, 3) and first_k.close_seconds == 2.0
    scheduler = SyncScheduler(
        1, clients_per_round=2, over_selection=1.0, deadline_seconds=2.6, keep="all_in_time"
    )
    plan = scheduler.plan(arrivals, launched=4)
    assert plan.accepted == (0, 1, 2) and plan.late == (3,)
    assert plan.close_seconds == 2.6  # one task was still out: the server waited for the deadline
    assert scheduler.admits(2.4, [1.0, 2.0]) and not scheduler.admits(3.0, [1.0, 2.0, 2.4])


def test_keeping_all_in_time_closes_when_every_launched_task_has_arrived() -> None:
    scheduler = SyncScheduler(
        1, clients_per_round=2, over_selection=0.5, deadline_seconds=9.0, keep="all_in_time"
    )
    assert scheduler.plan({0: 1.0, 1: 2.0, 2: 2.5}, launched=3).close_seconds == 2.5
    assert scheduler.plan({0: 1.0, 1: 2.0}, launched=3).close_seconds == 9.0  # one never came back


def test_keeping_all_in_time_without_a_deadline_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "tiny.toml", ["scheduler.keep=all_in_time"])
    assert info.value.key == "scheduler.keep"
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "tiny.toml", ["scheduler.keep=every"])
    assert info.value.key == "scheduler.keep" and "first_k" in str(info.value)


def test_a_round_that_keeps_all_in_time_aggregates_more_than_k(tmp_path: Path) -> None:
    """On the tiny fleet, over-selected rounds with a generous deadline aggregate every arrival."""
    overrides = [
        "scheduler.rounds=2",
        "scheduler.clients_per_round=2",
        "scheduler.over_selection=1.0",
        "scheduler.deadline_seconds=1000",
        "eval.every=2",
        "data.test_size=40",
        "eval.at_start=false",
        "export.save=false",
        "export.speed=false",
    ]
    counts = {}
    for keep in ("first_k", "all_in_time"):
        cfg = load_config(ROOT / "configs" / "tiny.toml", [*overrides, f"scheduler.keep={keep}"])
        result = run_experiment(cfg, tmp_path / keep)
        counts[keep] = (result.summary.tasks["ok"], result.summary.tasks["late"])
    assert counts["first_k"] == (4, 4)
    assert counts["all_in_time"] == (8, 0)
