"""The server's side of every task, whatever the scheduler: what a device receives, the one check on
what comes back, and aggregation into the global state (with the robust rule, the cluster adapters,
the base merges and server momentum)."""

from __future__ import annotations

import logging
import time

import torch

from fedspine.algorithms.aggregate import aggregate
from fedspine.algorithms.strategies.base import Dispatcher, TruncatedGlobalAdapter
from fedspine.algorithms.validation import check_update
from fedspine.algorithms.wire import payload_bytes
from fedspine.metrics.events import AggregationEvent
from fedspine.metrics.records import RunRecorder
from fedspine.runtime.executor import task_seed
from fedspine.runtime.experiment import Experiment
from fedspine.runtime.state import RunState
from fedspine.runtime.tasks import TaskOutcome
from fedspine.runtime.transport import Transport
from fedspine.types import ClientTask, ClientUpdate, Device, DeviceLora, LoraState, TaskStatus

log = logging.getLogger("fedspine.engine")


class Server:
    """The global state a run builds, and the server's work on each task.

    ``device_lora`` (each device's current rank and scaling: HetLoRA devices shrink theirs) and
    ``base_delta`` (everything merged into the base weights so far: FLoRA, FedSpine) are checkpointed
    with the run; ``state`` is the run's :class:`RunState`, replaced on a restore.
    """

    def __init__(self, exp: Experiment, transport: Transport, recorder: RunRecorder, state: RunState) -> None:
        self.exp = exp
        self.transport = transport
        self.recorder = recorder
        self.state = state
        self.seed = exp.settings.seed
        self.device_lora = dict(exp.device_lora)
        self.base_delta: dict[str, torch.Tensor] = {}
        self.total_weight = sum(self.device_weight(d.device_id) for d in exp.devices)

    @property
    def dispatcher(self) -> Dispatcher:
        """The strategy, in its role of deciding what each device receives."""
        return self.exp.strategy

    def init_global(self) -> None:
        """The strategy's initial global state, at the largest rank any device trains."""
        rank = max(lora.rank for lora in self.device_lora.values())
        self.dispatcher.init_global(
            self.exp.trainer.module_shapes, rank, torch.Generator().manual_seed(self.seed)
        )

    def device_weight(self, device_id: int) -> float:
        if self.dispatcher.weighting == "samples":
            return float(self.exp.train_examples(device_id))
        return 1.0

    # --- what a device receives ------------------------------------------------------------------

    def prepare(
        self, round_no: int, device: Device, steps: int | None = None, task_key: int | None = None
    ) -> TaskOutcome:
        """Draw the batches, check memory, then get the starting adapter and count the downlink.

        ``round_no`` is the round (or the global version being built) the strategy sees;
        ``task_key`` (default: ``round_no``) keys the task's batches and random draws, so an
        asynchronous run gives each of a device's tasks its own; ``steps`` defaults to
        ``train.local_steps``.
        """
        exp, dispatcher = self.exp, self.dispatcher
        key = round_no if task_key is None else task_key
        assignment = dispatcher.assign(round_no, device.device_id, self.device_lora[device.device_id])
        lora = assignment.lora
        steps = steps or exp.settings.local_steps
        prepared = exp.trainer.executor.prepare(key, device, lora, steps, assignment.plan)
        outcome = TaskOutcome(device, TaskStatus.OK, 0, prepared=prepared)
        if not self.transport.fits(device, prepared.workload.peak_memory_bytes):
            outcome.status = TaskStatus.OOM  # never dispatched: nothing is downloaded or trained
            return outcome
        generator = torch.Generator().manual_seed(task_seed(self.seed, key, device.device_id, 2))
        dispatch = dispatcher.configure(round_no, device.device_id, lora, generator)
        clusters = exp.clusters.sent(assignment.plan, exp.trainer.shape) if exp.clusters is not None else None
        cluster_bytes = sum(payload_bytes(c) for c in clusters or [])
        outcome.task = ClientTask(
            key,
            device.device_id,
            steps,
            lora,
            dispatch.lora_state,
            dispatch.downlink_bytes + cluster_bytes,
            extra={"measure_importance": assignment.measure_importance},
            plan=assignment.plan,
            pruning_ratio=assignment.ratio,
            channel_means=None if assignment.plan is None else dispatcher.channel_means(),
            clusters=clusters,
        )
        outcome.downlink_bytes = outcome.task.downlink_bytes
        if clusters is not None:
            outcome.extra["cluster_downlink_bytes"] = cluster_bytes
        return outcome

    # --- what comes back -------------------------------------------------------------------------

    def receive(self, outcome: TaskOutcome) -> None:
        """A task's reply is in: note the host's training time, and check its update."""
        update = outcome.update
        if update is None:
            return
        self.state.train_wall_seconds += update.host_train_seconds
        self.recorder.host_timing(
            "train", round=update.round, device_id=update.device_id, seconds=update.host_train_seconds
        )
        self.validate(outcome)

    def validate(self, outcome: TaskOutcome) -> None:
        """Reject (never aggregate) an update that fails the server's checks; log and record why.

        Only an update that passed changes what the server keeps about its device (a HetLoRA device's
        lowered rank).
        """
        task, update = outcome.task, outcome.update
        assert task is not None and update is not None
        reason = check_update(
            update,
            task,
            self.exp.settings.server.max_update_norm,
            max_samples=self.exp.train_examples(task.device_id),
            shape=self.exp.trainer.shape,
        )
        if reason is not None:
            log.warning("round %s, device %s: update rejected: %s", task.round, task.device_id, reason)
            outcome.status, outcome.update = TaskStatus.REJECTED, None
            outcome.extra["reason"] = f"rejected: {reason}"
        elif update.lora_rank != task.lora.rank:  # the device shrank its own rank (HetLoRA)
            self.device_lora[update.device_id] = DeviceLora(update.lora_rank, task.lora.scaling)

    # --- aggregation -----------------------------------------------------------------------------

    def aggregate(
        self,
        round_no: int,
        start: float,
        accepted: list[TaskOutcome],
        updates: list[ClientUpdate] | None = None,
    ) -> float:
        """Aggregate ``updates`` (default: the accepted tasks' own, after the robust rule) and charge
        the server's time; returns its seconds on the run's clock."""
        exp = self.exp
        if updates is None:
            updates = self.robust([o for o in accepted if o.update is not None])
        nbytes = sum(o.uplink_bytes for o in accepted)
        wall = time.perf_counter()
        aggregate(exp.strategy, updates, exp.settings.aggregation_fan_in)
        if exp.clusters is not None:
            weights = [exp.strategy.weight_of(u) for u in updates]
            exp.clusters.aggregate(updates, weights, exp.trainer.shape)
        delta = exp.strategy.take_base_delta()
        if delta:
            self.merge_base(delta)
        wall = time.perf_counter() - wall
        self.state.aggregation_wall_seconds += wall
        seconds = self.transport.aggregation_seconds(nbytes, wall) if updates else 0.0
        self.recorder.event(AggregationEvent(round_no, start, start + seconds, seconds, len(updates), nbytes))
        return seconds

    def robust(self, accepted: list[TaskOutcome]) -> list[ClientUpdate]:
        """The accepted updates after the configured robust rule (``server.robust``)."""
        received = [
            (o.update, o.task.payload) for o in accepted if o.update is not None and o.task is not None
        ]
        return self.exp.settings.server.robust_rule(received)

    def merge_base(self, delta: dict[str, torch.Tensor]) -> None:
        """Add an aggregated weight change to the base model (FLoRA, FedSpine), and to the running sum."""
        self.exp.trainer.executor.merge_into_base(delta)
        for key, value in delta.items():
            self.base_delta[key] = self.base_delta.get(key, torch.zeros_like(value)) + value

    def momentum(self, before: LoraState, beta: float, momentum: LoraState | None) -> LoraState:
        """Server momentum on the global adapter: ``m <- beta m + (after - before)``, and the adapter
        becomes ``before + m``; returns the new ``m``."""
        strategy = self.exp.strategy
        assert isinstance(strategy, TruncatedGlobalAdapter), "server momentum needs a global adapter"
        after = strategy.global_lora()
        step = {m: {k: after[m][k] - before[m][k] for k in ("A", "B")} for m in after}
        if momentum is not None:
            step = {m: {k: beta * momentum[m][k] + step[m][k] for k in ("A", "B")} for m in step}
        strategy.set_global_lora({m: {k: before[m][k] + step[m][k] for k in ("A", "B")} for m in before})
        return step
