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

With ``export.save`` every device's personal model is saved as ``models/personal/device-N`` (the
summary's ``models`` and the manifest name them), as a deployed node saves its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from transformers import PreTrainedModel

from fedspine.client.evaluate import Evaluation, evaluate
from fedspine.fleet.cost import CostModel
from fedspine.metrics.events import PersonalEvaluationEvent
from fedspine.model.pruning import PruningPlan, plan_like
from fedspine.runtime.executor import forward_only
from fedspine.runtime.experiment import Experiment, Trainer
from fedspine.runtime.export import save_personal_model
from fedspine.types import Device, LoraState, TrainWorkload

if TYPE_CHECKING:
    from fedspine.metrics.records import RunRecorder
    from fedspine.runtime.settings import RunSettings
    from fedspine.runtime.state import RunState

PERSONAL_TASK_KEY = 1 << 30
"""Keys the personalization task's batches and draws (a task key no round or offer count reaches)."""


class Personalizing(Protocol):
    """What building a personal model reads: a simulated run's
    :class:`~fedspine.runtime.experiment.Experiment` or a deployed node's
    :class:`~fedspine.runtime.experiment.DeployedNode`."""

    @property
    def settings(self) -> RunSettings: ...
    @property
    def trainer(self) -> Trainer: ...


@dataclass
class PersonalModel:
    """A device's personal model and the work building it took the device at the end of the run."""

    model: PreTrainedModel
    """A plain model (as :meth:`~fedspine.runtime.executor.InProcessExecutor.deployed_model` builds them)."""
    work: list[TrainWorkload] = field(default_factory=list)
    """What the device computed to build it (training steps, forward passes), for the cost model."""
    plan: PruningPlan | None = None
    """The units its weights keep (None: dense), to save it with a config that describes its shape."""
    means: list[torch.Tensor] | None = None
    """The channel means its removed units' outputs are compensated with (None: none)."""


def personal_model(
    exp: Personalizing,
    device: Device,
    plan: PruningPlan | None,
    means: list[torch.Tensor] | None,
    base: PreTrainedModel | None = None,
    clusters: list[LoraState] | None = None,
) -> PersonalModel | None:
    """``device``'s personal model from the global state loaded in ``exp``'s executor (at its deployed
    ``plan``, compensated with ``means``), by ``personalize.method``; None when it keeps the global
    model (``none``, or ``mask`` on a dense model). ``base`` (``mask``): the dense deployed model, built
    once for every device; ``clusters`` (``clustered``): the cluster adapters in ``plan``'s coordinates.
    The same code runs in simulation and on a deployed device's node."""
    settings, trainer = exp.settings.personalize, exp.trainer
    executor = trainer.executor
    steps = settings.steps or exp.settings.local_steps
    if settings.method == "finetune":
        batches = executor.local_batches(device, steps, PERSONAL_TASK_KEY)
        model = executor.finetuned(
            device, batches, settings.rank, settings.alpha, PERSONAL_TASK_KEY, plan, means
        )
        return PersonalModel(model, [executor.workload(device, batches, settings.rank, plan)], plan, means)
    if settings.method == "split":
        assert trainer.private is not None
        state = trainer.private.of(device.device_id, plan, trainer.shape)
        model = executor.with_adapter(state, settings.rank, settings.alpha, plan, means)
        return PersonalModel(model, [], plan, means)
    if settings.method == "clustered":
        assert clusters, "clustered: the cluster adapters come with the final model"
        [batch] = executor.local_batches(device, 1, PERSONAL_TASK_KEY)
        # one candidate model at a time beside the best so far
        best: tuple[float, PreTrainedModel] | None = None
        for state in clusters:
            candidate = executor.with_adapter(state, settings.rank, settings.alpha, plan, means)
            with torch.no_grad():
                loss = float(trainer.objective.loss(candidate, batch.to(next(candidate.parameters()).device)))
            if best is None or loss < best[0]:
                best = (loss, candidate)
        assert best is not None
        choosing = forward_only(executor.workload(device, [batch], settings.rank, plan))
        return PersonalModel(best[1], [choosing] * len(clusters), plan, means)
    if settings.method == "mask" and plan is not None:
        batches = executor.local_batches(device, steps, PERSONAL_TASK_KEY)
        heads, channels, own_means = executor.local_importance(
            base if base is not None else executor.deployed_model(),
            batches,
            settings.importance,
            compensated=means is not None,
        )
        own_plan, compensation = plan_like(plan, heads, channels), own_means if means is not None else None
        model = executor.deployed_model(own_plan, compensation)
        scoring = executor.workload(device, batches, 0)  # forward and backward passes, no optimizer
        work = [scoring if settings.importance == "taylor" else forward_only(scoring)]
        return PersonalModel(model, work, own_plan, compensation)
    return None


def personalize(
    exp: Experiment, global_models: dict[int, Evaluation], state: RunState, recorder: RunRecorder
) -> dict[str, Any] | None:
    """In simulation, build and evaluate every device's personal model, record a ``personal_evaluation``
    event, and return the summary's ``personal`` part. ``global_models``: each device's evaluation of
    the final global model (loaded in the executor) on its held-out data."""
    settings = exp.settings.personalize
    strategy, executor = exp.strategy, exp.trainer.executor
    means = strategy.channel_means()
    base = executor.deployed_model() if settings.method == "mask" else None
    personal: dict[int, Evaluation] = {}
    extra: dict[int, float] = {}
    saved: dict[str, str] = {}
    models_dir = recorder.run_dir / "models" if exp.settings.export.save else None
    for device_id in sorted(global_models):
        device = exp.devices[device_id]
        plan = strategy.device_eval_plan(device_id)
        clusters = exp.clusters.sent(plan, exp.trainer.shape) if exp.clusters is not None else None
        built = personal_model(exp, device, plan, means, base, clusters)
        in_tasks = state.personal_seconds.get(device_id, 0.0)
        cost = CostModel.for_device(device)
        extra[device_id] = in_tasks + sum(cost.train_seconds(w) for w in built.work) if built else in_tasks
        if built is not None and models_dir is not None:  # saved before evaluation casts it to eval.dtype
            saved[str(device_id)] = save_personal_model(built, exp.trainer.tokenizer, models_dir, device_id)
        personal[device_id] = (
            global_models[device_id]
            if built is None
            else evaluate(
                executor.ready(built.model), exp.trainer.objective, exp.trainer.local_tests[device_id].batches
            )
        )
    summary = summarize(exp, state, recorder, personal, global_models, extra)
    if summary is not None and saved:
        summary["models"] = saved
    return summary


def from_devices(
    exp: Experiment, state: RunState, recorder: RunRecorder, reports: dict[int, dict[str, Any]]
) -> dict[str, Any] | None:
    """The summary's ``personal`` part from what deployed devices reported with their final models
    (checked by the transport): each device's personal model and the global one on its held-out
    examples, and the seconds building it took there (measured). None when no device reported one."""
    objective = exp.trainer.objective
    personal, global_models, extra = {}, {}, {}
    for device, report in sorted(reports.items()):
        said = report.get("personal")
        if not said:
            continue
        personal[device] = Evaluation(objective.metric_name, said["value"], said["loss"], said["count"])
        global_models[device] = Evaluation(
            objective.metric_name, said["global_value"], said["global_loss"], said["count"]
        )
        extra[device] = said["seconds"]
    return summarize(exp, state, recorder, personal, global_models, extra)


def summarize(
    exp: Experiment,
    state: RunState,
    recorder: RunRecorder,
    personal: dict[int, Evaluation],
    global_models: dict[int, Evaluation],
    extra: dict[int, float],
) -> dict[str, Any] | None:
    """Record the devices' personal models against the global one on the same examples (a
    ``personal_evaluation`` event) and return the summary's ``personal`` part (None without devices).
    ``extra``: per device, the seconds personalization cost it."""
    if not personal:
        return None
    method = exp.settings.personalize.method
    event = PersonalEvaluationEvent(
        method,
        exp.trainer.objective.metric_name,
        {
            str(d): {
                "value": e.metric,
                "loss": e.loss,
                "count": e.count,
                "global": global_models[d].metric,
                "global_loss": global_models[d].loss,
                "extra_seconds": extra.get(d, 0.0),
            }
            for d, e in sorted(personal.items())
        },
    )
    recorder.event(event)
    stats = state.device_stats
    trained = sum(stats[d].compute_seconds for d in personal if d in stats)
    higher = exp.trainer.objective.higher_is_better
    return {
        "method": method,
        "metric": exp.trainer.objective.metric_name,
        **_spread("", {d: e.metric for d, e in personal.items()}, higher),
        **_spread("global_", {d: global_models[d].metric for d in personal}, higher),
        "extra_device_seconds": sum(extra.get(d, 0.0) for d in personal),
        "extra_time_fraction": sum(extra.get(d, 0.0) for d in personal) / trained if trained > 0 else None,
        "extra_uplink_bytes": state.personal_bytes["uplink"],
        "extra_downlink_bytes": state.personal_bytes["downlink"],
    }


def _spread(prefix: str, values: dict[int, float], higher_is_better: bool) -> dict[str, Any]:
    """Mean over devices, the value a tenth of the devices do no better than, and each device's."""
    listed = list(values.values())
    return {
        f"{prefix}value": float(np.mean(listed)),
        f"{prefix}worst_decile": float(np.percentile(listed, 10 if higher_is_better else 90)),
        f"{prefix}devices": {str(d): v for d, v in sorted(values.items())},
    }
