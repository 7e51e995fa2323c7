"""Federated evaluation (``eval.mode``): devices evaluate the global model on held-out slices of their
own data; the server pools them by count and records every device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedspine.api import run_experiment
from fedspine.client.evaluate import Evaluation, pooled
from fedspine.client.objectives import ClassificationObjective, LanguageModelingObjective
from fedspine.config import load_config
from fedspine.data import hold_out
from fedspine.errors import ConfigError
from fedspine.metrics.records import RunRecorder, read_events
from fedspine.runtime.engine import Engine
from fedspine.runtime.experiment import build_experiment
from tests.conftest import CONFIGS, run_and_resume_from_first_checkpoint

FAST = [
    "data.max_examples=600",
    "data.test_size=60",
    "train.local_steps=2",
    "scheduler.rounds=2",
    "export.save=false",
    "export.speed=false",
]


def test_hold_out_splits_every_shard_into_disjoint_kept_and_held_parts() -> None:
    rng = np.random.default_rng(0)
    parts = [np.arange(0, 10), np.arange(10, 11), np.arange(11, 13), np.arange(13, 413)]
    kept, held = hold_out(parts, 0.2, rng, max_examples=50)
    assert [len(h) for h in held] == [2, 0, 1, 50]  # round(0.2 n), at least 1, at most n - 1, capped
    for part, k, h in zip(parts, kept, held, strict=True):
        assert not set(k) & set(h)
        assert sorted([*k, *h]) == sorted(part)
        assert list(k) == sorted(k) and list(h) == sorted(h)
    uncapped = hold_out(parts, 0.2, np.random.default_rng(0))[1]
    assert len(uncapped[3]) == 80
    with pytest.raises(ValueError):
        hold_out(parts, 1.0, rng)


def test_pooling_is_the_metric_of_the_union_not_the_mean_of_the_devices() -> None:
    accuracy = ClassificationObjective([1, 2])
    a = Evaluation("accuracy", 1.0, 0.5, 10, correct=10)
    b = Evaluation("accuracy", 0.0, 2.0, 30, correct=0)
    both = pooled(accuracy, [a, b])
    assert both.metric == pytest.approx(0.25) and both.count == 40 and both.correct == 10
    assert both.loss == pytest.approx((0.5 * 10 + 2.0 * 30) / 40)
    lm = pooled(
        LanguageModelingObjective(),
        [Evaluation("perplexity", 0, 1.0, 10), Evaluation("perplexity", 0, 3.0, 30)],
    )
    assert lm.metric == pytest.approx(np.exp(2.5))


def test_local_slices_leave_training_and_central_runs_keep_every_example() -> None:
    central = build_experiment(load_config(CONFIGS / "tiny.toml", FAST))
    local = build_experiment(load_config(CONFIGS / "tiny.toml", [*FAST, "eval.mode=both"]))
    assert central.trainer.local_tests == {}
    assert set(local.trainer.local_tests) == {d.device_id for d in local.devices}
    for device, eval_set in local.trainer.local_tests.items():
        everything = len(central.trainer.partitions[device])
        assert len(local.trainer.partitions[device]) + eval_set.count == everything
        assert eval_set.count == min(max(round(0.2 * everything), 1), 64)
        held = {
            tuple(row[mask.bool()].tolist())
            for batch in eval_set.batches
            for row, mask in zip(batch.input_ids, batch.attention_mask, strict=True)
        }
        trained = {
            tuple(local.trainer.executor.train_data.input_ids[i]) for i in local.trainer.partitions[device]
        }
        assert not held & trained  # (verses that repeat word for word aside, none in this corpus's sample)


@pytest.mark.parametrize("strategy", ["fedit", "fedspine"])
def test_both_modes_record_every_device_and_pool_them_by_count(tmp_path: Path, strategy: str) -> None:
    cfg = load_config(CONFIGS / "tiny.toml", [*FAST, "eval.mode=both", f"strategy.name={strategy}"])
    run_experiment(cfg, tmp_path)
    events = read_events(tmp_path)
    central = [e for e in events if e["event"] == "evaluation"]
    federated = [e for e in events if e["event"] == "federated_evaluation"]
    assert [e["round"] for e in federated] == [e["round"] for e in central] == [0, 1, 2]
    for record in federated:
        devices = record["devices"]
        assert set(devices) == {str(d) for d in range(sum(g.count for g in cfg.fleet.groups))}
        count = sum(d["count"] for d in devices.values())
        assert record["count"] == count
        assert record["value"] == pytest.approx(
            sum(d["value"] * d["count"] for d in devices.values()) / count
        )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metric"]["value"] == central[-1]["value"]  # central stays the run's metric
    last = federated[-1]
    assert summary["federated"]["value"] == last["value"]
    assert summary["federated"]["devices"] == {d: v["value"] for d, v in last["devices"].items()}
    assert "Federated evaluation" in (tmp_path / "report.html").read_text()
    values = sorted(v["value"] for v in last["devices"].values())
    assert values[0] <= summary["federated"]["worst_decile"] <= values[-1]


def test_federated_mode_makes_the_devices_pooled_metric_the_runs(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "tiny.toml", [*FAST, "eval.mode=federated", "eval.target=0.01"])
    run_experiment(cfg, tmp_path)
    events = read_events(tmp_path)
    central = [e for e in events if e["event"] == "evaluation"]
    federated = [e for e in events if e["event"] == "federated_evaluation"]
    assert [c["value"] for c in central] == [f["value"] for f in federated]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["time_to_target_seconds"] == central[0]["virtual_time"]


def test_a_fedspine_device_evaluates_the_model_it_would_deploy(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "tiny.toml", [*FAST, "eval.mode=both", "strategy.name=fedspine"])
    exp = build_experiment(cfg)
    recorder = RunRecorder(tmp_path)
    Engine(exp, recorder).run()
    recorder.close()
    last = [e for e in read_events(tmp_path) if e["event"] == "federated_evaluation"][-1]
    strategy = exp.strategy
    deployed = strategy.deployment([d.device_id for d in exp.devices])
    assert len({arm.ratio for arm in deployed.values()}) > 1  # devices deploy different sizes here
    exp.trainer.executor.load_global(strategy.global_lora())
    for device, arm in deployed.items():
        plan = strategy.plan_for(arm.ratio)
        own = exp.trainer.executor.evaluate(exp.trainer.local_tests[device], plan, strategy.channel_means())
        assert last["devices"][str(device)]["value"] == pytest.approx(own.metric, abs=1e-9)
        assert last["devices"][str(device)]["loss"] == pytest.approx(own.loss, rel=1e-6)


def test_bad_local_evaluation_settings_name_the_field() -> None:
    for override, key in (
        ("eval.mode=device", "eval.mode"),
        ("eval.local_fraction=1.0", "eval.local_fraction"),
        ("eval.local_max_examples=-1", "eval.local_max_examples"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(CONFIGS / "tiny.toml", [override])


def test_a_run_with_federated_evaluation_resumes_to_the_same_records(tmp_path: Path) -> None:
    cfg = load_config(
        CONFIGS / "tiny.toml", [*FAST, "scheduler.rounds=3", "eval.mode=both", "run.checkpoint_every=1"]
    )
    whole, cut = run_and_resume_from_first_checkpoint(cfg, tmp_path)

    def federated(run: Path) -> list[str]:
        return [
            line for line in (run / "events.jsonl").read_text().splitlines() if "federated_evaluation" in line
        ]

    assert federated(cut) == federated(whole) and len(federated(whole)) == 4
    a, b = (json.loads((run / "summary.json").read_text()) for run in (whole, cut))
    assert a["federated"] == b["federated"] and a["metric"] == b["metric"]
