"""Asynchronous scheduling: staleness, FedCompass's step assignment, availability, the event engine."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fedspine.algorithms.schedulers import (
    Arrival,
    FedBuff,
    FedCompass,
    Limits,
    Scheduler,
    ServerStep,
)
from fedspine.algorithms.staleness import DCASGD, StalenessFunction, StalenessWeight, make_handler
from fedspine.algorithms.strategies import FedIT, FlexLoRA, FLoRA
from fedspine.config import load_config
from fedspine.errors import ConfigError
from fedspine.fleet.availability import PeriodicTrace, SessionTrace
from fedspine.metrics.records import RunRecorder, read_events
from fedspine.runtime.engine import Engine
from fedspine.runtime.experiment import build_experiment, build_scheduler, strategy_class
from fedspine.sim.clock import EventQueue
from fedspine.types import ClientUpdate, DeviceLora
from tests.conftest import CONFIGS

FAST = ["data.max_examples=600", "data.test_size=60", "train.local_steps=2", "eval.every=100"]

# --- staleness ----------------------------------------------------------------------------------


def test_polynomial_staleness_down_weights_stale_updates() -> None:
    s = StalenessFunction("polynomial", a=0.5)
    assert s(0) == 1.0
    assert s(3) == pytest.approx(0.5)  # FedBuff's 1 / sqrt(1 + tau)
    assert all(s(t + 1) < s(t) for t in range(10))  # the FedCompass code's (tau+1)**a would grow


def test_constant_and_hinge_staleness() -> None:
    assert StalenessFunction("constant")(7) == 1.0
    hinge = StalenessFunction("hinge", a=10.0, b=4.0)
    assert [hinge(t) for t in range(5)] == [1.0] * 5
    assert hinge(5) == pytest.approx(1 / 11)
    assert hinge(6) == pytest.approx(1 / 21)
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        hinge(-1)


def test_handlers_scale_and_compensate() -> None:
    fn = StalenessFunction("polynomial", a=1.0)
    assert StalenessWeight(fn).scale(1) == pytest.approx(0.5)
    assert make_handler("identity", fn).scale(9) == 1.0
    delta, drift = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.1, 0.1, -1.0])
    dc = DCASGD(lam=2.0)
    assert dc.needs_drift
    assert torch.allclose(dc.compensate(delta, drift), delta + 2.0 * delta * delta * drift)


# --- rebasing stale updates ---------------------------------------------------------------------


def _update(state: dict[str, dict[str, torch.Tensor]], scaling: float) -> ClientUpdate:
    rank = state["m"]["A"].shape[0]
    return ClientUpdate(0, 0, 10, state, 0, 0.0, 0, 0.0, lora_rank=rank, lora_scaling=scaling)


def test_a_global_adapter_update_is_rebased_as_its_change_to_what_it_received() -> None:
    torch.manual_seed(0)
    strategy = FedIT()
    strategy.init_global({"m": (6, 5)}, 4, torch.Generator().manual_seed(0))
    lora = DeviceLora(4, 2.0)
    start = strategy.configure(1, 0, lora, torch.Generator()).lora_state
    trained = {"m": {"A": start["m"]["A"] + 0.1, "B": start["m"]["B"] + 0.2}}
    fresh = strategy.rebase(_update(trained, 2.0), start, 1.0)
    assert torch.allclose(fresh.lora_state["m"]["A"], trained["m"]["A"])  # nothing moved: unchanged
    moved = {"m": {"A": torch.randn(4, 5), "B": torch.randn(6, 4)}}
    strategy.set_global_lora(moved)
    rebased = strategy.rebase(_update(trained, 2.0), start, 0.5).lora_state["m"]
    assert torch.allclose(rebased["A"], moved["m"]["A"] + 0.5 * 0.1)
    assert torch.allclose(rebased["B"], moved["m"]["B"] / 2.0 + 0.5 * 0.2)


def test_flexlora_rebases_exactly_in_product_space() -> None:
    strategy = FlexLoRA()
    strategy.init_global({"m": (6, 5)}, 3, torch.Generator().manual_seed(0))
    strategy.set_global_lora({"m": {"A": torch.randn(3, 5), "B": torch.randn(6, 3)}})
    start = {"m": {"A": torch.randn(3, 5), "B": torch.randn(6, 3)}}
    trained = {"m": {"A": torch.randn(3, 5), "B": torch.randn(6, 3)}}
    s, scale = 2.0, 0.7
    out = strategy.rebase(_update(trained, s), start, scale).lora_state["m"]
    g = strategy.global_lora()["m"]
    want = g["B"] @ g["A"] + scale * s * (
        trained["m"]["B"] @ trained["m"]["A"] - start["m"]["B"] @ start["m"]["A"]
    )
    assert torch.allclose(s * out["B"] @ out["A"], want, atol=1e-5)


def test_fresh_adapter_updates_are_scaled_not_moved() -> None:
    strategy = FLoRA()
    trained = {"m": {"A": torch.randn(2, 5), "B": torch.randn(6, 2)}}
    out = strategy.rebase(_update(trained, 1.0), {}, 0.25).lora_state["m"]
    assert torch.equal(out["A"], trained["m"]["A"])
    assert torch.allclose(out["B"], 0.25 * trained["m"]["B"])
    with pytest.raises(ValueError, match="nothing to compensate"):
        strategy.rebase(_update(trained, 1.0), {}, 1.0, DCASGD().compensate)


# --- schedulers without an engine ---------------------------------------------------------------


def _simulate(scheduler: Scheduler, speeds: dict[int, float], until: float) -> dict[str, Any]:
    """Drive a scheduler with devices of fixed seconds-per-step: arrival = start + steps * speed."""
    queue: EventQueue[tuple[str, Any]] = EventQueue()
    version, task = 0, 0
    versions: dict[int, int] = {}
    orders_log: list[tuple[float, int, int]] = []
    steps_log: list[tuple[float, tuple[int, ...]]] = []

    def dispatch(now: float, orders: list[Any]) -> None:
        nonlocal task
        for order in orders:
            orders_log.append((now, order.device_id, order.steps))
            versions[order.device_id] = version
            queue.push(now + order.steps * speeds[order.device_id], ("arrive", (task, order.device_id)))
            task += 1

    dispatch(0.0, scheduler.start(0.0, sorted(speeds)))
    for at, key in scheduler.take_timers():
        queue.push(at, ("timer", key))
    while len(queue):
        now, (kind, payload) = queue.pop()
        if now > until:
            break
        if kind == "arrive":
            task_id, device = payload
            steps = scheduler.on_arrival(now, Arrival(task_id, device, versions[device], 1.0, now))
        else:
            steps = scheduler.on_timer(now, payload)
        for step in steps:
            steps_log.append((now, tuple(a.device_id for a in step.arrivals)))
            version += 1
        dispatch(now, scheduler.orders(now, version))
        for at, key in scheduler.take_timers():
            queue.push(at, ("timer", key))
    return {"orders": orders_log, "steps": steps_log}


def _compass(**kwargs: Any) -> FedCompass:
    return FedCompass(Limits(rounds=100, local_steps=8, concurrency=3), q_min=2, q_max=8, **kwargs)


def test_fedcompass_assigns_steps_as_computed_by_hand() -> None:
    """Devices of 1, 2 and 5 s per step, Q in [2, 8], lambda 1.5 (worked through in the comments)."""
    log = _simulate(_compass(), {0: 1.0, 1: 2.0, 2: 5.0}, until=60.0)
    orders, steps = log["orders"], log["steps"]
    assert orders[:3] == [(0.0, 0, 8), (0.0, 1, 8), (0.0, 2, 8)]  # everyone starts with Q_max
    # t=8: device 0 reports first, alone; it opens group G0 (Q 8, T_exp 16, T_lat 20).
    assert steps[0] == (8.0, (0,)) and orders[3] == (8.0, 0, 8)
    # t=16: device 1 (2 s/step) cannot reach G0 with >= 2 steps; a new group lines up after G0's
    # fastest member's next cycle: floor((20 + 1 * 8 - 16) / 2) = 6 steps, T_exp 28.
    assert steps[1] == (16.0, (1,)) and orders[4] == (16.0, 1, 6)
    # t=16: device 0 closes G0; G1 is 12 steps away (> Q_max), so it opens G2 with Q_max.
    assert steps[2] == (16.0, (0,)) and orders[5] == (16.0, 0, 8)
    # t=24: device 0 closes G2 and joins G1 with floor((28 - 24) / 1) = 4 steps ...
    assert steps[3] == (24.0, (0,)) and orders[6] == (24.0, 0, 4)
    # ... so devices 0 and 1 arrive together at t=28 and are aggregated in one step.
    assert steps[4] == (28.0, (1, 0))
    assert all(2 <= q <= 8 for _, _, q in orders)


def test_fedcompass_groups_arrive_together_on_a_wide_fleet() -> None:
    speeds = {d: v for d, v in enumerate([0.2, 0.3, 0.5, 1.0, 1.5, 3.0, 5.0, 8.0])}
    log = _simulate(_compass(), speeds, until=2000.0)
    assert all(2 <= q <= 8 for _, _, q in log["orders"])
    grouped = [devices for _, devices in log["steps"] if len(devices) > 1]
    assert len(grouped) >= 10  # devices of different speeds arrive in shared groups
    assert any(len(set(devices)) >= 3 for devices in grouped)


def test_fedcompass_late_arrivals_ride_along_with_the_next_group() -> None:
    scheduler = _compass()
    scheduler.start(0.0, [0, 1])
    assert scheduler.on_arrival(8.0, Arrival(0, 0, 0, 1.0, 8.0))  # alone: applied at once
    scheduler.orders(8.0, 1)  # device 0 opens a group with T_lat = 8 + 1.5 * 8
    group = scheduler.group_of[0]
    scheduler.group_of[1] = group  # device 1 belongs to the same group but is slow
    scheduler.groups[group].members.add(1)
    assert scheduler.on_arrival(16.0, Arrival(1, 0, 1, 1.0, 16.0)) == []  # 1 is still missing
    step = scheduler.on_timer(20.0, group)[0]  # T_lat: aggregate whoever arrived
    assert [a.task_id for a in step.arrivals] == [1]
    assert scheduler.on_arrival(30.0, Arrival(2, 1, 0, 1.0, 30.0)) == []  # late: buffered
    assert [a.task_id for a in scheduler.pending()] == [2]


def test_fedbuff_steps_every_k_arrivals() -> None:
    buff = FedBuff(Limits(10, 2, 4), buffer_size=3, server_lr=0.5)
    arrivals = [Arrival(i, i, 0, 1.0, float(i)) for i in range(7)]
    steps: list[ServerStep] = [s for a in arrivals for s in buff.on_arrival(a.time, a)]
    assert [[a.task_id for a in s.arrivals] for s in steps] == [[0, 1, 2], [3, 4, 5]]
    assert steps[0].lr == 0.5 and [a.task_id for a in buff.pending()] == [6]


# --- availability traces ------------------------------------------------------------------------


def test_periodic_trace_is_online_its_share_of_each_period() -> None:
    trace = PeriodicTrace(seed=0, period=100.0, online_fraction=0.3)
    for device in range(4):
        online = sum(trace.online(device, t + 0.5) for t in range(1000))
        assert online == pytest.approx(300, abs=2)
        t = 17.0
        change = trace.next_change(device, t)
        assert t < change <= t + 100
        assert trace.online(device, change - 1e-6) != trace.online(device, change + 1e-6)


def test_session_trace_flips_at_its_changes_and_is_fixed_by_the_seed() -> None:
    a, b = SessionTrace(3, 50.0, 20.0), SessionTrace(3, 50.0, 20.0)
    times = [a.next_change(1, 0.0)]
    for _ in range(20):
        times.append(a.next_change(1, times[-1]))
    assert times == sorted(times) and len(set(times)) == len(times)
    for t in times:
        assert a.online(1, t - 1e-6) != a.online(1, t + 1e-6)
    assert [b.online(1, t) for t in range(0, 500, 7)] == [a.online(1, t) for t in range(0, 500, 7)]
    share = sum(a.online(2, t) for t in range(0, 200_000, 10)) / 20_000
    assert share == pytest.approx(50 / 70, abs=0.05)
    start = next(t for t in range(1000) if a.online(0, t))
    assert a.offline_during(0, start, start + 1e9) == a.next_change(0, start)


# --- the engine ---------------------------------------------------------------------------------


def _run_async(tmp_path: Path, *overrides: str) -> tuple[list[dict], dict]:
    exp = build_experiment(load_config(CONFIGS / "tiny.toml", [*FAST, *overrides]))
    recorder = RunRecorder(tmp_path)
    engine = Engine(exp, recorder)
    state = engine.run()
    recorder.close()
    return read_events(tmp_path), state.updates


def _check_accounting(events: list[dict], updates: dict) -> tuple[list[dict], list[int]]:
    """Every dispatched task ends once; every arrived update is applied at most once."""
    tasks = [e for e in events if e["event"] == "task"]
    ids = [e["task_id"] for e in tasks]
    assert len(ids) == len(set(ids)) == updates["dispatched"]
    applied = [i for e in events if e["event"] == "server_step" for i in e["task_ids"]]
    assert len(applied) == len(set(applied)) == updates["applied"]
    ok = {e["task_id"] for e in tasks if e["status"] == "ok"}
    assert set(applied) <= ok
    assert len(ok) == updates["applied"] + updates["unapplied_at_end"]
    return tasks, applied


@pytest.mark.parametrize("scheduler", ["fedasync", "fedbuff", "fedcompass"])
@pytest.mark.parametrize("strategy", ["fedit", "flora", "fedspine"])
def test_each_scheduler_runs_each_lora_strategy(tmp_path: Path, scheduler: str, strategy: str) -> None:
    events, updates = _run_async(
        tmp_path, f"scheduler.name={scheduler}", f"strategy.name={strategy}", "scheduler.rounds=4"
    )
    _check_accounting(events, updates)
    steps = [e for e in events if e["event"] == "server_step"]
    assert len(steps) == 4
    assert any(tau > 0 for e in steps for tau in e["staleness"])  # updates do go stale
    evaluations = [e for e in events if e["event"] == "evaluation"]
    assert evaluations[-1]["round"] == 4


def test_random_dropouts_lose_work_but_never_an_applied_update(tmp_path: Path) -> None:
    events, updates = _run_async(
        tmp_path,
        "scheduler.name=fedbuff",
        "scheduler.rounds=8",
        "fleet.trace.kind=sessions",
        "fleet.trace.mean_online_seconds=0.03",
        "fleet.trace.mean_offline_seconds=0.02",
    )
    tasks, applied = _check_accounting(events, updates)
    dropped = {e["task_id"] for e in tasks if e["status"] == "dropped"}
    assert len(dropped) >= 3
    assert not dropped & set(applied)
    assert all(e["uplink_bytes"] == 0 and e["train_loss"] is None for e in tasks if e["status"] == "dropped")


def test_fedcompass_survives_dropouts(tmp_path: Path) -> None:
    events, updates = _run_async(
        tmp_path,
        "scheduler.name=fedcompass",
        "scheduler.rounds=8",
        "fleet.trace.kind=periodic",
        "fleet.trace.period_seconds=0.2",
        "fleet.trace.online_fraction=0.6",
    )
    tasks, _ = _check_accounting(events, updates)
    assert any(e["status"] == "dropped" for e in tasks)
    assert len([e for e in events if e["event"] == "server_step"]) == 8


def test_an_async_run_is_deterministic_for_its_seed(tmp_path: Path) -> None:
    overrides = ["scheduler.name=fedcompass", "scheduler.rounds=5", "fleet.trace.kind=sessions"]
    overrides += ["fleet.trace.mean_online_seconds=0.05", "fleet.trace.mean_offline_seconds=0.02"]
    _run_async(tmp_path / "a", *overrides)
    _run_async(tmp_path / "b", *overrides)
    for name in ("events.jsonl", "rounds.csv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_max_updates_and_virtual_time_stop_the_run(tmp_path: Path) -> None:
    events, updates = _run_async(
        tmp_path / "u", "scheduler.name=fedasync", "scheduler.rounds=50", "scheduler.max_updates=3"
    )
    assert updates["applied"] == 3
    events, updates = _run_async(
        tmp_path / "t", "scheduler.name=fedasync", "scheduler.rounds=500", "scheduler.max_virtual_seconds=0.1"
    )
    steps = [e for e in events if e["event"] == "evaluation"]
    assert 0 < updates["applied"] < 500 and steps[-1]["virtual_time"] <= 0.1 + 0.06


def test_declining_devices_are_offered_work_again(tmp_path: Path) -> None:
    _, updates = _run_async(
        tmp_path,
        "scheduler.name=fedasync",
        "scheduler.rounds=6",
        "scheduler.concurrency=1",
        "fleet.groups[0].availability=0.3",
        "fleet.groups[1].availability=0.3",
    )
    assert updates["applied"] == 6


def test_server_momentum_runs_and_changes_the_trajectory(tmp_path: Path) -> None:
    base = ["scheduler.name=fedbuff", "scheduler.rounds=4", "eval.every=1"]
    plain, _ = _run_async(tmp_path / "p", *base)
    heavy, _ = _run_async(tmp_path / "m", *base, "scheduler.fedbuff.server_momentum=0.9")
    losses = [[e["loss"] for e in ev if e["event"] == "evaluation"] for ev in (plain, heavy)]
    assert losses[0][:2] == losses[1][:2]  # momentum has nothing to add at the first step
    assert losses[0][-1] != losses[1][-1]


def test_dcasgd_runs_with_a_global_adapter(tmp_path: Path) -> None:
    _, updates = _run_async(
        tmp_path, "scheduler.name=fedasync", "scheduler.rounds=4", "scheduler.staleness.handler=dcasgd"
    )
    assert updates["applied"] == 4


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["strategy.name=flora", "scheduler.staleness.handler=dcasgd"], "scheduler.staleness.handler"),
        (
            ["strategy.name=fedspine", "scheduler.fedbuff.server_momentum=0.9"],
            "scheduler.fedbuff.server_momentum",
        ),
        (
            ["strategy.name=flexlora", "scheduler.fedbuff.server_momentum=0.5"],
            "scheduler.fedbuff.server_momentum",
        ),
    ],
)
def test_combinations_a_strategy_cannot_run_are_rejected(overrides: list[str], key: str) -> None:
    cfg = load_config(CONFIGS / "tiny.toml", ["scheduler.name=fedbuff", *overrides])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_scheduler(cfg, 8, strategy_class(cfg))


def test_scheduler_parameters_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"scheduler\.fedcompass\.q_max.*>= q_min"):
        load_config(None, ["scheduler.fedcompass.q_min=5", "scheduler.fedcompass.q_max=3"])
    with pytest.raises(ConfigError, match=r"scheduler\.staleness\.function.*allowed values"):
        load_config(None, ["scheduler.staleness.function=cubic"])
    with pytest.raises(ConfigError, match=r"fleet\.trace\.online_fraction"):
        load_config(None, ["fleet.trace.online_fraction=0"])


def test_sync_rounds_lose_tasks_of_devices_that_go_offline(tmp_path: Path) -> None:
    from fedspine.runtime.engine import Engine

    exp = build_experiment(
        load_config(
            CONFIGS / "tiny.toml",
            [
                *FAST,
                "scheduler.rounds=4",
                "fleet.trace.kind=sessions",
                "fleet.trace.mean_online_seconds=0.03",
                "fleet.trace.mean_offline_seconds=0.02",
            ],
        )
    )
    recorder = RunRecorder(tmp_path)
    Engine(exp, recorder).run()
    recorder.close()
    events = read_events(tmp_path)
    tasks = [e for e in events if e["event"] == "task"]
    assert any(e["status"] == "dropped" for e in tasks)
    for round_no in range(1, 5):
        ok = [e for e in tasks if e["round"] == round_no and e["status"] == "ok"]
        agg = next(e for e in events if e["event"] == "aggregation" and e["round"] == round_no)
        assert agg["num_updates"] == len(ok)
    assert not math.isnan(sum(e["virtual_end"] for e in tasks))
