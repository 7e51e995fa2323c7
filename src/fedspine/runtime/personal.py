"""Personal models at the end of a run (``[personalize]``), measured on each device's own held-out data.

Every device with a held-out slice (``eval.local_fraction`` of its examples) gets its final model and
is evaluated on that slice, beside the global model as it would deploy it (the baseline the personal
model must beat):

* ``none``: the global model, at the device's deployed sparsity (pruning strategies);
* ``finetune``: the device trains a fresh adapter of rank ``personalize.rank`` on that model for
  ``personalize.steps`` local steps, and merges it (the standard baseline);
* ``split``: the device's private adapter, trained beside the shared one in every one of its tasks
  (:class:`~fedspine.client.personal.PrivateAdapters`), merged into that model;
* ``clustered``: the cluster adapter (:class:`~fedspine.algorithms.clusters.ClusterAdapters`) with the
  lowest loss on a batch of the device's data, merged into that model;
* ``mask`` (pruning strategies): the device scores the units of the dense model on its own data (FLAP,
  forward passes over ``personalize.steps`` local batches) and keeps, at its deployed sparsity, the
  units that matter there instead of the globally ranked ones, compensated with its own channel means.

What personalization costs each device is charged by the cost model, as training is: ``finetune``'s
steps, ``mask``'s and the cluster choice's forward passes (a third of a training step's FLOPs and
weight reads: the backward pass costs about twice the forward), and the personal adapter ``split`` and
``clustered`` train in every task (the difference between the task's cost with and without it, summed
by the engine). Nothing private is uploaded; ``clustered``'s adapters travel, and the summary counts
their bytes apart (``extra_uplink_bytes``, ``extra_downlink_bytes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedspine.algorithms.strategies import FedSpine
from fedspine.client.evaluate import Evaluation, evaluate
from fedspine.fleet.cost import CostModel
from fedspine.metrics.events import PersonalEvaluationEvent
from fedspine.runtime.executor import forward_only

if TYPE_CHECKING:
    from fedspine.runtime.engine import Engine

PERSONAL_TASK_KEY = 1 << 30
"""Keys the personalization task's batches and draws (a task key no round or offer count reaches)."""


def personalize(engine: Engine) -> dict[str, Any] | None:
    """Build and evaluate every device's personal model (``personalize.method``), record a
    ``personal_evaluation`` event, and return the summary's ``personal`` part (None when the devices
    hold no data out)."""
    exp = engine.exp
    if not exp.local_tests:
        return None
    settings = exp.settings.personalize
    strategy, executor = exp.strategy, exp.executor
    executor.load_global(strategy.global_lora())
    global_models = engine.device_evaluations(engine.loop.version).evaluations
    steps = settings.steps or exp.settings.local_steps
    means = strategy.channel_means()
    base = executor.deployed_model() if settings.method == "mask" else None
    personal: dict[int, Evaluation] = {}
    extra: dict[int, float] = {}
    for device_id in sorted(global_models):
        device = exp.devices[device_id]
        plan = strategy.device_eval_plan(device_id)
        cost = CostModel.for_device(device)
        model = None
        if settings.method == "finetune":
            batches = executor.local_batches(device, steps, PERSONAL_TASK_KEY)
            model = executor.finetuned(
                device, batches, settings.rank, settings.alpha, PERSONAL_TASK_KEY, plan, means
            )
            extra[device_id] = cost.train_seconds(executor.workload(device, batches, settings.rank, plan))
        elif settings.method == "split":
            assert exp.private is not None
            state = exp.private.of(device_id)
            model = executor.with_adapter(state, settings.rank, settings.alpha, plan, means)
            extra[device_id] = engine.state.personal_seconds.get(device_id, 0.0)
        elif settings.method == "clustered":
            assert exp.clusters is not None
            [batch] = executor.local_batches(device, 1, PERSONAL_TASK_KEY)
            candidates = [
                executor.with_adapter(state, settings.rank, settings.alpha, plan, means)
                for state in exp.clusters.states
            ]
            with torch.no_grad():
                losses = [
                    float(exp.objective.loss(c, batch.to(next(c.parameters()).device))) for c in candidates
                ]
            model = candidates[losses.index(min(losses))]
            choosing = forward_only(executor.workload(device, [batch], settings.rank, plan))
            extra[device_id] = engine.state.personal_seconds.get(device_id, 0.0) + len(
                candidates
            ) * cost.train_seconds(choosing)
        elif settings.method == "mask" and isinstance(strategy, FedSpine) and plan is not None:
            batches = executor.local_batches(device, steps, PERSONAL_TASK_KEY)
            heads, channels, own_means = executor.local_importance(base, batches)
            mine = strategy.personal_plan(device_id, heads, channels)
            model = executor.deployed_model(mine, own_means if means is not None else None)
            extra[device_id] = cost.train_seconds(forward_only(executor.workload(device, batches, 0)))
        if model is None:
            personal[device_id] = global_models[device_id]
            extra.setdefault(device_id, 0.0)
        else:
            personal[device_id] = evaluate(
                executor.ready(model), exp.objective, exp.local_tests[device_id].batches
            )
    event = PersonalEvaluationEvent(
        settings.method,
        exp.objective.metric_name,
        {
            str(d): {
                "value": e.metric,
                "loss": e.loss,
                "count": e.count,
                "global": global_models[d].metric,
                "global_loss": global_models[d].loss,
                "extra_seconds": extra[d],
            }
            for d, e in personal.items()
        },
    )
    engine.recorder.event(event)
    trained = sum(
        engine.state.device_stats[d].compute_seconds for d in personal if d in engine.state.device_stats
    )
    higher = exp.objective.higher_is_better
    return {
        "method": settings.method,
        "metric": exp.objective.metric_name,
        **_spread("", {d: e.metric for d, e in personal.items()}, higher),
        **_spread("global_", {d: e.metric for d, e in global_models.items()}, higher),
        "extra_device_seconds": sum(extra.values()),
        "extra_time_fraction": sum(extra.values()) / trained if trained > 0 else None,
        "extra_uplink_bytes": engine.state.personal_bytes["uplink"],
        "extra_downlink_bytes": engine.state.personal_bytes["downlink"],
    }


def _spread(prefix: str, values: dict[int, float], higher_is_better: bool) -> dict[str, Any]:
    """Mean over devices, the value a tenth of the devices do no better than, and each device's."""
    listed = list(values.values())
    return {
        f"{prefix}value": float(np.mean(listed)),
        f"{prefix}worst_decile": float(np.percentile(listed, 10 if higher_is_better else 90)),
        f"{prefix}devices": {str(d): v for d, v in sorted(values.items())},
    }
