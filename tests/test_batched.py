"""Batched client training: tasks trained together in one forward/backward give the updates they get
trained one by one (tiny model, float32), whatever their ranks, scalings, steps, objective or penalty."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedspine.api import run_experiment
from fedspine.config import load_config
from fedspine.errors import ConfigError
from fedspine.model.lora import lora_module_names
from fedspine.runtime.experiment import build_experiment
from fedspine.types import ClientTask, ClientUpdate, DeviceLora
from tests.conftest import CONFIGS

FAST = ["data.max_examples=600", "data.test_size=60", "eval.every=100"]
TOLERANCE = {"atol": 2e-5, "rtol": 1e-4}
"""The lanes' rows are summed in another order than one by one: float32 agreement, not bit equality."""


def _random_payload(model: Any, rank: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = model.get_base_model()
    payload = {}
    for name in lora_module_names(model):
        linear = base.get_submodule(name).base_layer
        payload[name] = {
            "A": torch.randn(rank, linear.in_features, generator=gen) * 0.1,
            "B": torch.randn(linear.out_features, rank, generator=gen) * 0.1,
        }
    return payload


def _tasks(exp: Any, loras: list[DeviceLora], steps: list[int]) -> tuple[list[ClientTask], list[Any]]:
    tasks, prepared = [], []
    for device_id, (lora, n) in enumerate(zip(loras, steps, strict=True)):
        device = exp.devices[device_id]
        prepared.append(exp.trainer.executor.prepare(1, device, lora, n))
        payload = _random_payload(exp.trainer.executor.model, lora.rank, seed=device_id)
        tasks.append(ClientTask(1, device_id, n, lora, payload, 0))
    return tasks, prepared


def _assert_same(one: ClientUpdate, other: ClientUpdate) -> None:
    assert one.device_id == other.device_id and one.lora_rank == other.lora_rank
    assert one.tokens == other.tokens and one.num_samples == other.num_samples
    assert one.train_loss == pytest.approx(other.train_loss, rel=1e-5)
    assert set(one.lora_state) == set(other.lora_state)
    for name, entry in one.lora_state.items():
        for key in ("A", "B"):
            torch.testing.assert_close(entry[key], other.lora_state[name][key], **TOLERANCE)


@pytest.mark.parametrize("task", ["classification", "lm"])
def test_tasks_of_mixed_ranks_scalings_and_steps_train_together_as_one_by_one(task: str) -> None:
    exp = build_experiment(load_config(CONFIGS / "tiny.toml", [*FAST, f"data.task={task}"]))
    loras = [DeviceLora(2, 2.0), DeviceLora(4, 0.5), DeviceLora(8, 1.0), DeviceLora(4, 2.0)]
    tasks, prepared = _tasks(exp, loras, steps=[3, 1, 4, 3])
    alone = [exp.trainer.executor.run(t, p) for t, p in zip(tasks, prepared, strict=True)]
    exp.trainer.executor.batch_clients = 3  # two batches: three lanes, then one
    together = exp.trainer.executor.run_many(tasks, prepared)
    for one, other in zip(alone, together, strict=True):
        _assert_same(one, other)
    moved = [
        float((u.lora_state[n]["B"] - t.payload[n]["B"]).abs().max())
        for u, t in zip(together, tasks, strict=True)
        for n in u.lora_state
    ]
    assert min(moved) > 0  # every lane really trained


def _pruned_payload(exp: Any, plan: Any, rank: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: {
            "A": torch.randn(rank, in_f, generator=gen) * 0.1,
            "B": torch.randn(out_f, rank, generator=gen) * 0.1,
        }
        for name, (out_f, in_f) in exp.strategy.masks.kept_shapes(plan).items()
    }


def test_fedspine_tasks_on_two_plans_train_together_as_their_sliced_submodels_alone() -> None:
    """Masks on the dense weights (with compensation biases) train what the sliced submodels train:
    the same factors, FLAP scores, channel means, probe and train losses; a dense lane beside them."""
    config = load_config(
        CONFIGS / "tiny.toml",
        [*FAST, "strategy.name=fedspine", "lora.target_modules=['q_proj','o_proj','up_proj','down_proj']"],
    )
    exp = build_experiment(config)
    gen = torch.Generator().manual_seed(7)
    means = [
        torch.rand(exp.trainer.shape.intermediate, generator=gen) for _ in range(exp.trainer.shape.layers)
    ]
    specs = [
        (0.3, DeviceLora(4, 2.0), 3, True),
        (0.5, DeviceLora(8, 1.0), 2, True),
        (0.5, DeviceLora(4, 2.0), 2, False),
    ]
    tasks, prepared = [], []
    for device_id, (ratio, lora, steps, measure) in enumerate(specs):
        plan = exp.strategy.plan_for(ratio)
        prepared.append(exp.trainer.executor.prepare(1, exp.devices[device_id], lora, steps, plan))
        payload = _pruned_payload(exp, plan, lora.rank, seed=device_id)
        extra = {"measure_importance": measure}
        tasks.append(
            ClientTask(1, device_id, steps, lora, payload, 0, extra, plan, ratio, channel_means=means)
        )
    dense = DeviceLora(4, 2.0)
    prepared.append(exp.trainer.executor.prepare(1, exp.devices[3], dense, 2))
    tasks.append(ClientTask(1, 3, 2, dense, _random_payload(exp.trainer.executor.model, 4, seed=3), 0))
    assert {len(t.plan[0].channels) for t in tasks[:2]} == {
        len(exp.strategy.plan_for(0.3)[0].channels),
        len(exp.strategy.plan_for(0.5)[0].channels),
    } and len(exp.strategy.plan_for(0.3)[0].channels) > len(exp.strategy.plan_for(0.5)[0].channels)

    alone = [exp.trainer.executor.run(t, p) for t, p in zip(tasks, prepared, strict=True)]
    exp.trainer.executor.batch_clients = 4
    together = exp.trainer.executor.run_many(tasks, prepared)
    for one, other in zip(alone, together, strict=True):
        _assert_same(one, other)
        assert (one.probe_loss is None) == (other.probe_loss is None)
        if one.probe_loss is not None:
            assert one.probe_loss == pytest.approx(other.probe_loss, rel=1e-4)
        assert (one.importance is None) == (other.importance is None)
        for kind, values in (one.importance or {}).items():
            for mine, theirs in zip(values, other.importance[kind], strict=True):
                torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-3)
    assert alone[0].importance is not None and set(alone[0].importance) == {"heads", "channels", "means"}
    assert alone[2].importance is None  # measure_importance off: nothing measured on the device


def test_the_removed_units_of_a_pruned_lane_stay_exactly_zero() -> None:
    """A pruned lane's factors are zero-padded to the dense coordinates; the padding never moves."""
    from fedspine.client.batched import train_lanes

    modules = "lora.target_modules=['q_proj','up_proj','down_proj']"
    exp = build_experiment(load_config(CONFIGS / "tiny.toml", [*FAST, "strategy.name=fedspine", modules]))
    plan = exp.strategy.plan_for(0.5)
    lora = DeviceLora(4, 2.0)
    prepared = exp.trainer.executor.prepare(1, exp.devices[0], lora, 3, plan)
    task = ClientTask(1, 0, 3, lora, _pruned_payload(exp, plan, 4, seed=0), 0, plan=plan, pruning_ratio=0.5)
    lane = exp.trainer.executor.lane(task, prepared)
    padded = {n: (e["A"] == 0, e["B"] == 0) for n, e in lane.state.items()}
    t = exp.trainer.executor.training
    (result,) = train_lanes(
        exp.trainer.executor.model,
        exp.trainer.objective,
        [lane],
        optimizer=t.optimizer,
        lr=t.lr,
        weight_decay=0.1,  # decay of a zero is zero too
        max_grad_norm=t.max_grad_norm,
        padding_side=exp.trainer.executor.train_data.padding_side,
        pad_id=exp.trainer.executor.train_data.pad_id,
    )
    assert any(b.any() for _, b in padded.values())  # up_proj rows of the removed channels
    assert any(a.any() for a, _ in padded.values())  # down_proj columns of the removed channels
    for name, (zero_a, zero_b) in padded.items():
        trained = result.state[name]
        assert torch.all(trained["B"][zero_b.all(dim=1)] == 0), name
        assert torch.all(trained["A"][:, zero_a.all(dim=0)] == 0), name
        assert not torch.equal(trained["B"], lane.state[name]["B"])  # the kept units did train


def test_the_shared_base_model_is_unchanged_by_batched_training() -> None:
    exp = build_experiment(load_config(CONFIGS / "tiny.toml", FAST))
    before = {k: v.clone() for k, v in exp.trainer.executor.model.state_dict().items()}
    tasks, prepared = _tasks(exp, [DeviceLora(4, 2.0)] * 2, steps=[2, 2])
    exp.trainer.executor.batch_clients = 2
    exp.trainer.executor.run_many(tasks, prepared)
    after = exp.trainer.executor.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(h for m in exp.trainer.executor.model.modules() for h in m._forward_hooks.values())


def _task_records(run_dir: Path) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return sorted((e for e in events if e["event"] == "task"), key=lambda e: (e["round"], e["device_id"]))


@pytest.mark.parametrize("strategy", ["fedit", "flora", "hetlora", "fedspine"])
def test_a_run_with_batched_clients_records_what_one_by_one_records(tmp_path: Path, strategy: str) -> None:
    overrides = [*FAST, "scheduler.rounds=2", "train.local_steps=2", f"strategy.name={strategy}"]
    results = {}
    for batch in (1, 6):
        config = load_config(CONFIGS / "tiny.toml", [*overrides, f"executor.batch_clients={batch}"])
        results[batch] = run_experiment(config, tmp_path / f"b{batch}")
    one, six = _task_records(results[1].run_dir), _task_records(results[6].run_dir)
    assert [(e["round"], e["device_id"], e["status"]) for e in one] == [
        (e["round"], e["device_id"], e["status"]) for e in six
    ]
    for a, b in zip(one, six, strict=True):
        if a["train_loss"] is not None:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["uplink_bytes"] == b["uplink_bytes"] and a["compute_seconds"] == b["compute_seconds"]
    assert results[6].summary.final_eval_loss == pytest.approx(results[1].summary.final_eval_loss, rel=1e-4)


@pytest.mark.parametrize("scheduler", ["fedasync", "fedbuff"])
def test_asynchronous_tasks_launched_together_train_together_as_one_by_one(
    tmp_path: Path, scheduler: str
) -> None:
    overrides = [
        *FAST,
        "scheduler.rounds=4",
        "train.local_steps=2",
        f"scheduler.name={scheduler}",
        "scheduler.concurrency=4",
        "fleet.trace.kind=sessions",  # devices drop out: lost tasks are never trained, either way
    ]
    results = {}
    for batch in (1, 6):
        config = load_config(CONFIGS / "tiny.toml", [*overrides, f"executor.batch_clients={batch}"])
        results[batch] = run_experiment(config, tmp_path / f"b{batch}")
    one, six = _task_records(results[1].run_dir), _task_records(results[6].run_dir)
    assert len(one) == len(six) > 4
    for a, b in zip(one, six, strict=True):
        assert (a["device_id"], a["status"], a["uplink_bytes"]) == (
            b["device_id"],
            b["status"],
            b["uplink_bytes"],
        )
        if a["train_loss"] is not None:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert {e["status"] for e in one} >= {"ok"}
    assert results[6].summary.final_eval_loss == pytest.approx(results[1].summary.final_eval_loss, rel=1e-4)


def test_batched_clients_need_lora_dropout_off() -> None:
    with pytest.raises(ConfigError, match=r"executor\.batch_clients"):
        load_config(CONFIGS / "tiny.toml", ["executor.batch_clients=4", "lora.dropout=0.1"])


@pytest.mark.slow  # starts a local Ray instance and two workers (about a minute)
@pytest.mark.parametrize("strategy", ["flora", "fedspine"])
def test_the_ray_executor_gives_the_records_of_the_in_process_one(tmp_path: Path, strategy: str) -> None:
    pytest.importorskip("ray")
    overrides = [*FAST, "scheduler.rounds=2", "train.local_steps=2", f"strategy.name={strategy}"]
    results = {}
    for name in ("simulation", "ray"):
        config = load_config(CONFIGS / "tiny.toml", [*overrides, f"executor.name={name}", "run.threads=1"])
        results[name] = run_experiment(config, tmp_path / name)
    local, remote = results["simulation"], results["ray"]
    assert remote.summary.executor == "ray" and local.summary.executor == "simulation"
    strip = ("host_train_seconds", "host_seconds", "wall_seconds")

    def records(run: Any) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k not in strip} for e in _task_records(run.run_dir)]

    assert records(remote) == records(local)  # bit for bit: the same base, seeds and threads
    assert remote.summary.evaluations == local.summary.evaluations
