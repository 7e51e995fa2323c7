"""The synchronous engine on the virtual clock: memory checks, deadlines, over-selection, availability."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest

from fedspine.config import load_config
from fedspine.errors import FleetError
from fedspine.metrics.records import RunRecorder, read_events
from fedspine.model.footprint import ModelShape
from fedspine.runtime.engine import Engine
from fedspine.runtime.experiment import (
    Experiment,
    build_experiment,
    build_fleet_from_config,
    check_fleet_fits,
)
from fedspine.runtime.server import Server
from fedspine.runtime.simulated import SimulatedTransport
from fedspine.runtime.tasks import Ended, Lost, RunningTask, TaskOutcome
from tests.conftest import CONFIGS

FAST = ["data.max_examples=600", "data.test_size=60", "train.local_steps=2", "eval.every=100"]


def _experiment(*overrides: str) -> Experiment:
    return build_experiment(load_config(CONFIGS / "tiny.toml", [*FAST, *overrides]))


def _run(exp: Experiment, run_dir: Path) -> list[dict]:
    recorder = RunRecorder(run_dir)
    Engine(exp, recorder).run()
    recorder.close()
    return read_events(run_dir)


def _tasks(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "task"]


def test_a_task_that_does_not_fit_is_reported_and_never_run(tmp_path: Path) -> None:
    exp = _experiment("scheduler.clients_per_round=6", "scheduler.rounds=1")
    small = dataclasses.replace(exp.devices[0].device_class, memory_bytes=1024)
    exp.devices[0] = dataclasses.replace(exp.devices[0], device_class=small)
    events = _run(exp, tmp_path)
    first = [e for e in _tasks(events) if e["device_id"] == 0]
    assert first and all(e["status"] == "oom" and e["train_loss"] is None for e in first)
    assert all(e["uplink_bytes"] == 0 and e["compute_seconds"] == 0 for e in first)
    aggregation = next(e for e in events if e["event"] == "aggregation")
    assert aggregation["num_updates"] == 5
    trained = [json.loads(line) for line in (tmp_path / "host_timings.jsonl").read_text().splitlines()]
    assert 0 not in {t["device_id"] for t in trained}


def test_over_selection_keeps_the_first_k_and_loses_the_rest(tmp_path: Path) -> None:
    exp = _experiment("scheduler.clients_per_round=2", "scheduler.over_selection=1.0", "scheduler.rounds=2")
    events = _run(exp, tmp_path)
    for round_no in (1, 2):
        tasks = [e for e in _tasks(events) if e["round"] == round_no]
        assert len(tasks) == 4
        ok = [e for e in tasks if e["status"] == "ok"]
        late = [e for e in tasks if e["status"] == "late"]
        assert len(ok) == 2 and len(late) == 2
        assert max(e["virtual_end"] for e in ok) <= min(e["virtual_end"] for e in late)
        assert all(e["train_loss"] is None for e in late)  # lost work is never applied


def test_a_deadline_drops_slow_devices_and_the_round_waits_for_it(tmp_path: Path) -> None:
    exp = _experiment("scheduler.clients_per_round=6", "scheduler.rounds=1")
    events = _run(exp, tmp_path / "free")
    arrivals = sorted(e["virtual_end"] for e in _tasks(events))
    deadline = (arrivals[2] + arrivals[3]) / 2
    exp = _experiment(
        "scheduler.clients_per_round=6", "scheduler.rounds=1", f"scheduler.deadline_seconds={deadline}"
    )
    events = _run(exp, tmp_path / "deadline")
    statuses = sorted(e["status"] for e in _tasks(events))
    assert statuses == ["late"] * 3 + ["ok"] * 3
    aggregation = next(e for e in events if e["event"] == "aggregation")
    assert aggregation["virtual_start"] == pytest.approx(deadline)


def test_offline_devices_are_not_sampled(tmp_path: Path) -> None:
    exp = _experiment(
        "scheduler.clients_per_round=6", "scheduler.rounds=4", "fleet.groups.0.availability=0.01"
    )
    events = _run(exp, tmp_path)
    assert {e["device_id"] for e in _tasks(events)}.isdisjoint({0, 1})


def test_virtual_time_is_the_sum_of_round_times(tmp_path: Path) -> None:
    exp = _experiment("scheduler.rounds=3")
    recorder = RunRecorder(tmp_path)
    Engine(exp, recorder).run()
    recorder.close()
    rounds = recorder.rounds
    for prev, cur in itertools.pairwise(rounds):
        assert cur.virtual_start == prev.virtual_end
    for r in rounds:
        parts = r.aggregation_seconds + r.downlink_seconds + r.training_seconds + r.uplink_seconds
        assert parts == pytest.approx(r.round_seconds)


def test_a_fleet_that_cannot_hold_the_model_is_an_error() -> None:
    cfg = load_config(CONFIGS / "tiny.toml", FAST)
    devices = build_fleet_from_config(cfg)
    llama_7b = ModelShape(
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=32,
        head_dim=128,
        intermediate=11008,
        vocab=32000,
        tied_embeddings=False,
    )
    with pytest.raises(FleetError, match="no device in the fleet can hold the model"):
        check_fleet_fits(devices, llama_7b, cfg)
    check_fleet_fits(devices, dataclasses.replace(llama_7b, layers=2), cfg)  # a 2-layer slice fits


def test_a_model_too_big_for_the_fleet_is_rejected_before_its_weights_exist() -> None:
    """A 70B-shaped tiny config would take minutes and ~280 GB to build: the check must come first."""
    huge = [
        "model.tiny.hidden=8192",
        "model.tiny.layers=80",
        "model.tiny.heads=64",
        "model.tiny.kv_heads=8",
        "model.tiny.intermediate=28672",
    ]
    with pytest.raises(FleetError, match="no device in the fleet can hold the model"):
        build_experiment(load_config(CONFIGS / "tiny.toml", [*FAST, *huge]))


class _LostAfterTraining(SimulatedTransport):
    """The simulated fleet, except that every device goes offline during its upload: each task
    trains (its update exists on the device, a HetLoRA device may have shrunk its rank) and is lost."""

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        self.trained: list[int] = []

    def _end(self, task: RunningTask) -> Ended:
        o = task.outcome
        if o.update is not None:
            self.trained.append(o.update.lora_rank)
        o.lose(o.downlink_seconds + o.compute_seconds + o.uplink_seconds / 2)
        return task.start + o.end_seconds, Lost(task)


def test_an_update_lost_on_its_way_never_reaches_the_server_checks_nor_changes_what_it_keeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an update that arrived and passed the checks may change what the server keeps about its
    device (a HetLoRA device's lowered rank): one lost during its upload is never validated."""
    exp = _experiment(
        "strategy.name=hetlora",
        "strategy.hetlora.prune_threshold=1e9",  # every device lowers its rank in every task
        "scheduler.name=fedasync",
        "scheduler.rounds=3",
    )
    checked: list[int] = []
    validate = Server.validate

    def spy(self: Server, outcome: TaskOutcome) -> None:
        checked.append(outcome.device.device_id)
        validate(self, outcome)

    monkeypatch.setattr(Server, "validate", spy)
    transport = _LostAfterTraining(exp)
    engine = Engine(exp, RunRecorder(tmp_path / "run"), transport)
    before = dict(engine.device_lora)
    state = engine.run()
    assert state.updates["applied"] == 0 and state.updates["dispatched"] > 0
    assert transport.trained and min(transport.trained) < max(lora.rank for lora in before.values())
    assert checked == []
    assert engine.device_lora == before
