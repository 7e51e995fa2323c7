"""Reliability: update validation, robust aggregation against poisoning devices."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from flwr.app import ArrayRecord, Message

from fedspine.algorithms.robust import ROBUST_RULES, Received, change_norm, clip, combine, corrupt
from fedspine.algorithms.validation import check_update
from fedspine.api import run_experiment
from fedspine.config import load_config
from fedspine.errors import ConfigError
from fedspine.model.pruning import LayerKeep
from fedspine.runtime.experiment import check_config
from fedspine.types import ClientTask, ClientUpdate, DeviceLora
from tests.test_deploy import QUIET, TINY, run_fake


def _task(rank: int = 4) -> ClientTask:
    g = torch.Generator().manual_seed(0)
    payload = {
        "m.q": {"A": torch.randn(rank, 8, generator=g), "B": torch.zeros(6, rank)},
        "m.v": {"A": torch.randn(rank, 8, generator=g), "B": torch.zeros(6, rank)},
    }
    return ClientTask(1, 3, 4, DeviceLora(rank, 2.0), payload, 0)


def _update(task: ClientTask, step: float = 0.01) -> ClientUpdate:
    state = {m: {"A": f["A"] + step, "B": f["B"] + step} for m, f in task.payload.items()}
    return ClientUpdate(task.round, task.device_id, 10, state, 0, 1.0, 100, 0.1, task.lora.rank, 2.0)


def _with(update: ClientUpdate, module: str, name: str, value: torch.Tensor) -> ClientUpdate:
    state = {m: dict(f) for m, f in update.lora_state.items()}
    state[module][name] = value
    return dataclasses.replace(update, lora_state=state)


# --- validation --------------------------------------------------------------------------------------


def test_a_sound_update_passes_and_each_defect_is_named() -> None:
    task = _task()
    good = _update(task)
    assert check_update(good, task) is None
    nan = good.lora_state["m.q"]["A"].clone()
    nan[0, 0] = float("nan")
    assert "m.q.A has NaN or Inf" in str(check_update(_with(good, "m.q", "A", nan), task))
    inf = good.lora_state["m.v"]["B"].clone()
    inf[1, 1] = float("inf")
    assert "m.v.B has NaN or Inf" in str(check_update(_with(good, "m.v", "B", inf), task))
    assert "shapes A (4, 7)" in str(check_update(_with(good, "m.q", "A", torch.zeros(4, 7)), task))
    assert "not a floating-point" in str(
        check_update(_with(good, "m.q", "A", torch.zeros(4, 8, dtype=torch.int64)), task)
    )
    extra = dataclasses.replace(good, lora_state={**good.lora_state, "m.k": good.lora_state["m.q"]})
    assert "unexpected ['m.k']" in str(check_update(extra, task))
    missing = dataclasses.replace(good, lora_state={"m.q": good.lora_state["m.q"]})
    assert "missing ['m.v']" in str(check_update(missing, task))
    assert "rank 8 outside 1..4" in str(check_update(dataclasses.replace(good, lora_rank=8), task))
    assert "pruning plan" in str(
        check_update(dataclasses.replace(good, plan={0: LayerKeep((0,), (0,))}), task)
    )
    assert "round 2" in str(check_update(dataclasses.replace(good, round=2), task))


def test_the_norm_bound_rejects_large_changes_only() -> None:
    task = _task()
    small, large = _update(task, 0.01), _update(task, 1.0)
    assert check_update(small, task, max_norm=1.0) is None
    reason = check_update(large, task, max_norm=1.0)
    assert reason is not None and "exceeds server.max_update_norm 1" in reason


def test_a_device_that_lowered_its_rank_is_checked_at_its_own_rank() -> None:
    task = _task(rank=4)
    state = {m: {"A": f["A"][:2] + 0.1, "B": f["B"][:, :2] + 0.1} for m, f in task.payload.items()}
    shrunk = ClientUpdate(1, 3, 10, state, 0, 1.0, 100, 0.1, 2, 2.0)
    assert check_update(shrunk, task) is None
    assert "shapes" in str(check_update(dataclasses.replace(shrunk, lora_rank=3), task))


# --- robust rules ------------------------------------------------------------------------------------


def test_median_and_trimmed_mean_ignore_one_outlier_per_coordinate() -> None:
    task = _task()
    updates = [_update(task, s) for s in (0.1, 0.2, 0.3, 0.4, 50.0)]
    start = task.payload["m.q"]["A"]
    median = combine(updates, task.payload, "median")
    torch.testing.assert_close(median.lora_state["m.q"]["A"], start + 0.3)
    trimmed = combine(updates, task.payload, "trimmed_mean", trim=0.2)  # drops 0.1 and 50.0
    torch.testing.assert_close(trimmed.lora_state["m.q"]["A"], start + 0.3)
    assert median.num_samples == 50
    even = combine(updates[:4], task.payload, "median")
    torch.testing.assert_close(even.lora_state["m.q"]["A"], start + 0.25)
    with pytest.raises(ValueError, match="equal shapes"):
        combine([updates[0], _with(updates[1], "m.q", "A", torch.zeros(2, 8))], task.payload, "median")


def test_clipping_bounds_the_change_and_keeps_its_direction() -> None:
    task = _task()
    big = _update(task, 2.0)
    clipped = clip(big, task.payload, 1.0)
    assert change_norm(clipped, task.payload) == pytest.approx(1.0, rel=1e-5)
    delta = clipped.lora_state["m.q"]["B"] - task.payload["m.q"]["B"]
    assert torch.allclose(delta, torch.full_like(delta, delta[0, 0].item()))  # same direction (all +)
    small = _update(task, 0.01)
    assert clip(small, task.payload, 1.0) is small


def test_attacks_scale_flip_or_poison_the_change() -> None:
    task = _task()
    honest = _update(task, 0.1)
    flipped = corrupt(honest, task.payload, "sign_flip", 10.0)
    torch.testing.assert_close(flipped.lora_state["m.q"]["B"], task.payload["m.q"]["B"] - 1.0)
    scaled = corrupt(honest, task.payload, "scale", 10.0)
    assert change_norm(scaled, task.payload) == pytest.approx(
        10 * change_norm(honest, task.payload), rel=1e-5
    )
    assert check_update(corrupt(honest, task.payload, "nonfinite", 0.0), task) is not None


# --- in a run ----------------------------------------------------------------------------------------

POISON = ["scheduler.rounds=3", "scheduler.clients_per_round=6", *QUIET]
FLIP = ["fleet.attack.kind=sign_flip", "fleet.attack.devices=[0]", "fleet.attack.factor=10"]


def _loss(tmp_path: Path, name: str, *overrides: str) -> float:
    summary = run_experiment(load_config(TINY, [*POISON, *overrides]), tmp_path / name).summary
    return float(summary.final_eval_loss or "nan")


def test_robust_aggregation_holds_the_metric_that_a_poisoning_device_ruins(tmp_path: Path) -> None:
    """One device of six uploads its change sign-flipped and scaled 10x (tiny model, 3 rounds).

    The tiny random model's accuracy is noise; its held-out loss is the metric that moves.
    """
    clean = _loss(tmp_path, "clean")
    plain = _loss(tmp_path, "plain", *FLIP)
    clipped = _loss(tmp_path, "clip", *FLIP, "server.robust=clip", "server.clip_norm=0.5")
    median = _loss(tmp_path, "median", *FLIP, "server.robust=median")
    assert plain > clean + 0.1  # averaging lets one device undo everyone's training
    assert abs(clipped - clean) < 0.05
    assert median < plain - 0.05


def test_non_finite_updates_are_rejected_counted_and_the_run_goes_on(tmp_path: Path) -> None:
    cfg = load_config(TINY, [*POISON, "fleet.attack.kind=nonfinite", "fleet.attack.devices=[0, 3]"])
    summary = run_experiment(cfg, tmp_path / "run").summary
    assert summary.tasks["rejected"] == 6 and summary.tasks["ok"] == 12
    assert summary.final_eval_loss == pytest.approx(summary.final_eval_loss)  # finite: not NaN
    events = (tmp_path / "run" / "events.jsonl").read_text()
    assert events.count('"status": "rejected"') == 6 and "has NaN or Inf entries" in events


def test_a_wrong_shape_update_from_a_flower_device_is_rejected(tmp_path: Path) -> None:
    replies: list[int] = []

    def truncate(reply: Message) -> Message:
        replies.append(1)
        if len(replies) == 7:  # the first task reply: cut every factor to its first row
            lora = reply.content.array_records["lora"]
            reply.content["lora"] = ArrayRecord({k: type(a)(a.numpy()[:1].copy()) for k, a in lora.items()})
        return reply

    result, _ = run_fake(
        load_config(TINY, ["scheduler.rounds=1", "scheduler.clients_per_round=6", *QUIET]), tmp_path, truncate
    )
    assert result.summary.tasks["rejected"] == 1 and result.summary.tasks["ok"] == 5
    assert "rejected: " in (result.run_dir / "events.jsonl").read_text()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["server.robust=median", "strategy.name=flora"], "server.robust"),
        (["server.robust=trimmed_mean", "scheduler.name=fedbuff"], "server.robust"),
        (["server.robust=median", "strategy.name=hetlora", "lora.ranks=[2, 4, 4, 4, 4, 4]"], "server.robust"),
        (["fleet.attack.kind=scale", "fleet.attack.devices=[9]"], "fleet.attack.devices[0]"),
        (["server.trim_fraction=0.5"], "server.trim_fraction"),
        (["fleet.attack.kind=nan"], "fleet.attack.kind"),
        (["server.robust=krum"], "server.robust"),
    ],
)
def test_robustness_settings_that_cannot_apply_are_config_errors(
    tmp_path: Path, overrides: list[str], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        run_experiment(load_config(TINY, [*QUIET, *overrides]), tmp_path / "run")
    assert info.value.key == key
    assert not (tmp_path / "run").exists()


def test_an_unknown_robust_rule_names_the_registered_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known: clip, median, none, trimmed_mean"):
        check_config(load_config(TINY, ["server.robust=krum"]))


def test_a_registered_robust_rule_runs_without_touching_the_config_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One file and one registry line add a rule: the config accepts its name, the server applies it."""
    seen: list[int] = []

    @dataclasses.dataclass(frozen=True)
    class Counting:
        combines: ClassVar[bool] = False

        def __call__(self, received: Received) -> list[ClientUpdate]:
            seen.append(len(received))
            return [u for u, _ in received]

    monkeypatch.setitem(ROBUST_RULES._entries, "counting", lambda clip_norm, trim: Counting())
    overrides = ["scheduler.rounds=2", "scheduler.clients_per_round=3", "server.robust=counting", *QUIET]
    result = run_experiment(load_config(TINY, overrides), tmp_path / "run")
    assert seen == [3, 3]
    assert result.summary.tasks["ok"] == 6
