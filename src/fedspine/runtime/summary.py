"""Assembling a run's :class:`~fedspine.metrics.summary.Summary` from its experiment and records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedspine.algorithms.strategies import FedSpine
from fedspine.metrics.records import DeviceStats, RoundRecord
from fedspine.metrics.stats import time_to_target
from fedspine.metrics.summary import Metric, Summary, class_totals
from fedspine.runtime.experiment import Experiment
from fedspine.runtime.state import RunState
from fedspine.types import TaskStatus


def _devices(experiment: Experiment, state: RunState) -> list[dict[str, Any]]:
    """One entry per device: its totals, with a count for every task status (zero included)."""
    rows = []
    for device in experiment.devices:
        stats = state.device_stats.get(device.device_id) or DeviceStats(
            device.device_id, device.device_class.name, device.network.name
        )
        rows.append(
            {
                "device_id": device.device_id,
                "device_class": stats.device_class,
                "network": stats.network,
                "train_examples": experiment.train_examples(device.device_id),
                "tasks": stats.tasks,
                **{status.value: stats.statuses.get(status.value, 0) for status in TaskStatus},
                "compute_seconds": stats.compute_seconds,
                "communication_seconds": stats.communication_seconds,
                "uplink_bytes": stats.uplink_bytes,
                "downlink_bytes": stats.downlink_bytes,
            }
        )
    return rows


def _staleness(rounds: Sequence[RoundRecord]) -> dict[str, float] | None:
    """Mean and largest staleness of the applied updates (None for synchronous runs)."""
    steps = [r for r in rounds if r.mean_staleness is not None]
    count = sum(r.aggregated for r in steps)
    if not count:
        return None
    mean = sum((r.mean_staleness or 0.0) * r.aggregated for r in steps) / count
    return {"mean": mean, "max": float(max(r.max_staleness or 0 for r in steps))}


def make_summary(
    experiment: Experiment,
    state: RunState,
    rounds: Sequence[RoundRecord],
    loop_seconds: float,
    setup_seconds: float,
    executor: str,
    device_models: dict[str, Any] | None,
) -> Summary:
    """The run's summary: ``loop_seconds`` of host time in the federated loop, ``setup_seconds``
    before it, the ``executor``'s name and the exported ``device_models``' manifest."""
    run = experiment.settings
    nothing: dict[str, Any] = {
        "metric": experiment.trainer.objective.metric_name,
        "value": None,
        "loss": None,
    }
    final = state.evaluations[-1] if state.evaluations else nothing  # no device ever answered
    devices = _devices(experiment, state)
    return Summary(
        task=experiment.task_name,
        metric=Metric(final["metric"], final["value"], experiment.trainer.objective.higher_is_better),
        chance_level=experiment.chance_level,
        initial_metric=state.evaluations[0]["value"] if run.eval_at_start and state.evaluations else None,
        final_eval_loss=final["loss"],
        rounds=len(rounds),
        virtual_seconds=rounds[-1].virtual_end if rounds else 0.0,
        wall_seconds=loop_seconds,
        train_wall_seconds=state.train_wall_seconds,
        eval_wall_seconds=state.eval_wall_seconds,
        aggregation_wall_seconds=state.aggregation_wall_seconds,
        setup_wall_seconds=setup_seconds,
        uplink_bytes=sum(r.uplink_bytes for r in rounds),
        downlink_bytes=sum(r.downlink_bytes for r in rounds),
        target=run.eval_target if run.eval_target > 0 else None,
        time_to_target_seconds=time_to_target(
            state.evaluations, run.eval_target, experiment.trainer.objective.higher_is_better
        ),
        strategy=run.strategy_name,
        scheduler=run.scheduler_name,
        model=run.model_name,
        num_devices=len(experiment.devices),
        seed=run.seed,
        tasks={
            status.value: sum(d.statuses.get(status.value, 0) for d in state.device_stats.values())
            for status in TaskStatus
        },
        updates=state.updates or None,
        staleness=_staleness(rounds),
        evaluations=state.evaluations,
        devices=devices,
        device_classes=class_totals(devices),
        pruning=_pruning(experiment),
        executor=executor,
        device_models=device_models,
        federated=_federated(final, experiment.trainer.objective.higher_is_better),
        personal=state.personal,
    )


def _pruning(experiment: Experiment) -> dict[str, Any] | None:
    """What a pruning strategy evaluated and deployed, and whether any of it went untrained."""
    strategy = experiment.strategy
    if not isinstance(strategy, FedSpine):
        return None
    deployed = strategy.deployment([d.device_id for d in experiment.devices])
    eval_plan = strategy.eval_plan()
    return {
        "global_sparsity": strategy.masks.target_sparsity,
        "units": "heads_and_channels" if strategy.masks.prune_heads else "channels",
        "policy": strategy.policy.name,
        "deployed_ratio_mean": sum(a.ratio for a in deployed.values()) / max(len(deployed), 1),
        "untrained_units_evaluated": None if eval_plan is None else strategy.untrained_units(eval_plan),
        "untrained_units_deployed": sum(
            strategy.untrained_units(strategy.plan_for(r))
            for r in sorted({a.ratio for a in deployed.values()})
        ),
    }


def _federated(final: dict[str, Any], higher_is_better: bool) -> dict[str, Any] | None:
    """The last evaluation's federated part (None when the devices did not evaluate)."""
    if final.get("federated") is None:
        return None
    values = list(final["devices"].values())
    worst = float(np.percentile(values, 10 if higher_is_better else 90)) if values else None
    return {**final["federated"], "worst_decile": worst, "devices": dict(final["devices"])}
