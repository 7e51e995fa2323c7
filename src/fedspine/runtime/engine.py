"""The engine: one loop over synchronous rounds on the run's clock.

Per round: sample the reachable devices, configure their tasks, hand them to the
:class:`~fedspine.runtime.transport.Transport` and take their arrivals in time order (in
simulation: the real local training of the ones that can still matter, virtual time charged from the
cost model for downlink, compute and uplink), let the scheduler decide which arrivals count,
aggregate, and evaluate. Everything that depends on the host's speed is kept out of the records that
must be reproducible.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedspine.algorithms.aggregate import aggregate
from fedspine.algorithms.robust import clip, combine, corrupt
from fedspine.algorithms.schedulers import SyncScheduler
from fedspine.algorithms.validation import check_update
from fedspine.algorithms.wire import update_payload_bytes
from fedspine.client.evaluate import Evaluation
from fedspine.fleet.cost import CostModel
from fedspine.fleet.jitter import compute_slowdown, link_rate_factor
from fedspine.metrics.records import DeviceStats, RoundRecord, RunRecorder
from fedspine.runtime import checkpoint as checkpoints
from fedspine.runtime.build import Experiment
from fedspine.runtime.executor import PreparedTask, task_seed
from fedspine.runtime.transport import Events, RunningTask, SimulatedTransport, Transport
from fedspine.sim.clock import EventQueue, VirtualClock
from fedspine.types import ClientTask, ClientUpdate, Device, DeviceLora, TaskResult, TaskStatus


@dataclass
class TaskOutcome:
    """Virtual timing and result of one client task in a round (times relative to round start)."""

    device: Device
    status: TaskStatus
    downlink_bytes: int
    downlink_seconds: float = 0.0
    compute_seconds: float = 0.0
    uplink_seconds: float = 0.0
    uplink_bytes: int = 0
    update: ClientUpdate | None = None
    prepared: PreparedTask | None = None
    task: ClientTask | None = None
    lost_seconds: float | None = None
    """When the device went offline and lost the task (status ``dropped``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Executor-specific fields recorded with the task (e.g. a deployment's measured timings)."""

    @property
    def arrival_seconds(self) -> float:
        return self.downlink_seconds + self.compute_seconds + self.uplink_seconds

    def lose(self, at_seconds: float) -> None:
        """The device went offline ``at_seconds`` after the task started: the task ends there, lost."""
        self.status, self.lost_seconds = TaskStatus.DROPPED, at_seconds
        self.downlink_seconds = min(self.downlink_seconds, at_seconds)
        self.compute_seconds = max(0.0, min(self.compute_seconds, at_seconds - self.downlink_seconds))
        self.uplink_seconds = max(0.0, at_seconds - self.downlink_seconds - self.compute_seconds)
        self.uplink_bytes, self.update = 0, None

    @property
    def end_seconds(self) -> float:
        """When the task ended for the server: its arrival, or the moment it was lost."""
        return self.lost_seconds if self.lost_seconds is not None else self.arrival_seconds


@dataclass
class RunState:
    """What the engine accumulates while it runs."""

    evaluations: list[dict[str, Any]] = field(default_factory=list)
    train_wall_seconds: float = 0.0
    eval_wall_seconds: float = 0.0
    aggregation_wall_seconds: float = 0.0
    device_stats: dict[int, DeviceStats] = field(default_factory=dict)
    updates: dict[str, int] = field(default_factory=dict)
    """Update accounting of asynchronous runs: dispatched, applied, unapplied_at_end."""


log = logging.getLogger("fedspine.engine")

ProgressCallback = Callable[[RoundRecord, "Evaluation | None"], None]


class Engine:
    """Runs an :class:`Experiment` and writes its records into a run directory."""

    def __init__(
        self, experiment: Experiment, recorder: RunRecorder, transport: Transport | None = None
    ) -> None:
        self.exp = experiment
        self.recorder = recorder
        self.transport: Transport = transport or SimulatedTransport()
        self.clock = VirtualClock()
        self.state = RunState()
        self.seed = experiment.config.run.seed
        self.device_lora = dict(experiment.device_lora)
        """Each device's current LoRA rank and scaling (HetLoRA devices shrink theirs)."""
        self.base_delta: dict[str, torch.Tensor] = {}
        """Everything merged into the base weights so far (FLoRA, FedSpine)."""
        self.first_round = 1
        """The round to start from (after :meth:`restore`, the one after the checkpoint's)."""

    @property
    def _sync(self) -> SyncScheduler:
        scheduler = self.exp.scheduler
        assert isinstance(scheduler, SyncScheduler), "the round engine runs synchronous schedulers"
        return scheduler

    def run(self, on_round: ProgressCallback | None = None) -> RunState:
        """Run every round; returns the accumulated state for the summary."""
        exp = self.exp
        if self.first_round == 1:
            self._init_global()
            if exp.config.eval.at_start:
                self._evaluate(0)
        every, last = exp.config.run.checkpoint_every, exp.scheduler.rounds
        for round_no in range(self.first_round, last + 1):
            record, evaluation = self._round(round_no)
            if on_round is not None:
                on_round(record, evaluation)
            if every and round_no % every == 0 and round_no < last:
                self.checkpoint(round_no)
        return self.state

    def _init_global(self) -> None:
        """The strategy's initial global state, at the largest rank any device trains."""
        exp = self.exp
        rank = max(lora.rank for lora in self.device_lora.values())
        exp.strategy.init_global(exp.module_shapes, rank, torch.Generator().manual_seed(self.seed))

    # --- checkpoints -----------------------------------------------------------------------------

    def checkpoint(self, round_no: int) -> None:
        """Write an atomic checkpoint of everything needed to continue after ``round_no``."""
        exp = self.exp
        engine = self._engine_state()
        objects = {
            "strategy": exp.strategy,
            "scheduler": exp.scheduler,
            "uplink": exp.uplink,
            "stale_handler": exp.stale_handler,
        }
        weights = exp.executor.base_weights(sorted(self.base_delta))
        snapshot = checkpoints.Snapshot(round_no, engine, objects, self.base_delta, weights)
        checkpoints.save(self.recorder.run_dir, exp, snapshot, exp.config.run.keep_checkpoints)

    def _engine_state(self) -> dict[str, Any]:
        """The engine's own part of a checkpoint."""
        return {
            "clock": self.clock.now,
            "device_lora": self.device_lora,
            "state": self.state,
            "rounds": self.recorder.rounds,
            "positions": self.recorder.positions(),
        }

    def restore(self, snapshot: checkpoints.Snapshot) -> None:
        """Continue from ``snapshot``: the checkpoint's objects replace the freshly built ones."""
        exp = self.exp
        for name, obj in snapshot.objects.items():
            setattr(exp, name, obj)
        exp.executor.set_base_weights(snapshot.base_weights)
        self.base_delta = dict(snapshot.base_delta)
        engine = snapshot.engine
        self.clock.advance_to(engine["clock"])
        self.device_lora = engine["device_lora"]
        self.state = engine["state"]
        self.first_round = snapshot.round + 1
        self._reconnect()

    def _reconnect(self) -> None:
        """After a restore: tell the transport (a round's checkpoint has no task out)."""
        self.transport.resume_at(self.clock.now)

    # --- one round -------------------------------------------------------------------------------

    def _round(self, round_no: int) -> tuple[RoundRecord, Evaluation | None]:
        exp = self.exp
        self.clock.advance_to(self.transport.present(self.clock.now))  # a wall clock ran on
        start = self.clock.now
        online = self.transport.reachable(self, round_no, start)
        selected = self._sync.select(online, random.Random(task_seed(self.seed, round_no)))
        outcomes = self._run_tasks(round_no, start, [exp.devices[i] for i in selected])
        arrivals = {o.device.device_id: o.arrival_seconds for o in outcomes if o.status == TaskStatus.OK}
        plan = self._sync.plan(arrivals)
        for o in outcomes:
            if o.status == TaskStatus.OK and o.device.device_id in plan.late:
                o.status = TaskStatus.LATE
        accepted = [o for d in plan.accepted for o in outcomes if o.device.device_id == d]
        for o in outcomes:
            self._record_task(round_no, start, o)
        exp.strategy.end_round(
            round_no,
            [TaskResult(o.device.device_id, o.status, o.arrival_seconds, o.update) for o in outcomes],
            exp.scheduler.deadline_seconds,
        )
        agg_seconds = self._aggregate(round_no, start + plan.close_seconds, accepted)
        self.clock.advance_to(start + plan.close_seconds + agg_seconds)
        record = self._round_record(round_no, start, outcomes, accepted, agg_seconds)
        evaluation = None
        if round_no % exp.config.eval.every == 0 or round_no == exp.scheduler.rounds:
            evaluation = self._evaluate(round_no)
            record.metric, record.eval_loss = evaluation.metric, evaluation.loss
        self.recorder.round(record)
        return record, evaluation

    def _run_tasks(self, round_no: int, start: float, devices: list[Device]) -> list[TaskOutcome]:
        """Prepare every task, launch the ones that fit, and take their arrivals in time order.

        An arrival after the deadline, or after the k-th earliest complete arrival so far, cannot be
        among the aggregated updates: it is ``late``, and the simulated transport never trains it
        (its work is lost in the fleet; the result is identical). A task whose device goes offline
        first is ``dropped``.
        """
        self.exp.strategy.begin_round(round_no, [d.device_id for d in devices])
        outcomes = [self._prepare(round_no, d) for d in devices]
        runnable = sorted(
            (o for o in outcomes if o.status == TaskStatus.OK),
            key=lambda o: (o.arrival_seconds, o.device.device_id),
        )
        k, deadline = self._sync.clients_per_round, self._sync.deadline_seconds
        events: Events = EventQueue()
        for i, o in enumerate(runnable):
            task = RunningTask(i, o, round_no - 1, start, deadline)
            self.transport.launch(self, task, events, train_now=False)
        arrivals: list[float] = []
        while self._next_event(events):
            _, (kind, task) = events.pop()
            o = task.outcome
            if kind != "arrive" or o.status != TaskStatus.OK:
                continue
            bound = sorted(arrivals)[k - 1] if len(arrivals) >= k else float("inf")
            if (deadline > 0 and o.arrival_seconds > deadline) or o.arrival_seconds > bound:
                o.status = TaskStatus.LATE
                continue
            self.transport.deliver(self, task)
            if o.status == TaskStatus.OK:
                arrivals.append(o.arrival_seconds)
        return outcomes

    def _next_event(self, events: Events) -> bool:
        """Whether an event is due, after waiting for one while the transport has tasks out (a
        deployment); False when none can come."""
        while True:
            waiting = self.transport.collect(self, events)
            at = events.peek_time()
            if at is not None and self.transport.due(at):
                return True
            if at is None and not waiting:
                return False
            self.transport.wait()

    def _prepare(
        self, round_no: int, device: Device, steps: int | None = None, task_key: int | None = None
    ) -> TaskOutcome:
        """Draw the batches, check memory, then get the starting adapter and charge the downlink.

        ``round_no`` is the round (or the global version being built) the strategy sees;
        ``task_key`` (default: ``round_no``) keys the task's batches and random draws, so an
        asynchronous engine gives each of a device's tasks its own; ``steps`` defaults to
        ``train.local_steps``.
        """
        exp = self.exp
        key = round_no if task_key is None else task_key
        assignment = exp.strategy.assign(round_no, device.device_id, self.device_lora[device.device_id])
        lora = assignment.lora
        steps = steps or exp.config.train.local_steps
        prepared = exp.executor.prepare(key, device, lora, steps, assignment.plan)
        outcome = TaskOutcome(device, TaskStatus.OK, 0, prepared=prepared)
        cost = CostModel.for_device(device)
        if not cost.fits(prepared.workload.peak_memory_bytes):
            outcome.status = TaskStatus.OOM  # never dispatched: nothing is downloaded or trained
            return outcome
        generator = torch.Generator().manual_seed(task_seed(self.seed, key, device.device_id, 2))
        dispatch = exp.strategy.configure(round_no, device.device_id, lora, generator)
        outcome.task = ClientTask(
            key,
            device.device_id,
            steps,
            lora,
            dispatch.lora_state,
            dispatch.downlink_bytes,
            extra={"measure_importance": assignment.measure_importance},
            plan=assignment.plan,
            pruning_ratio=assignment.ratio,
        )
        outcome.downlink_bytes = dispatch.downlink_bytes
        rate = link_rate_factor(device, self.seed, key, "down")
        outcome.downlink_seconds = cost.transfer_seconds(dispatch.downlink_bytes, "down", rate)
        slowdown = compute_slowdown(device, self.seed, key, exp.config.fleet.jitter_scale)
        outcome.compute_seconds = cost.train_seconds(prepared.workload, slowdown)
        return outcome

    def train(self, outcome: TaskOutcome) -> None:
        """Train ``outcome``'s task on the host, as its device would, and check the update."""
        assert outcome.prepared is not None and outcome.task is not None
        update = self.exp.executor.run(outcome.task, outcome.prepared)
        attack = self.exp.config.fleet.attack
        if attack.kind != "none" and update.device_id in attack.devices:
            update = corrupt(update, outcome.task.payload, attack.kind, attack.factor)
        if self.exp.uplink is not None:
            draws = torch.Generator().manual_seed(
                task_seed(self.seed, outcome.task.round, update.device_id, 4)
            )
            update = self.exp.uplink.transmit(update, outcome.task.payload, draws)
        self.state.train_wall_seconds += update.host_train_seconds
        update.uplink_bytes = update_payload_bytes(update)
        device = outcome.device
        rate = link_rate_factor(device, self.seed, update.round, "up")
        outcome.uplink_bytes = update.uplink_bytes
        outcome.uplink_seconds = CostModel.for_device(device).transfer_seconds(
            update.uplink_bytes, "up", rate
        )
        outcome.update = update
        self.recorder.host_timing(
            "train", round=update.round, device_id=device.device_id, seconds=update.host_train_seconds
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
            self.exp.config.server.max_update_norm,
            max_samples=len(self.exp.partitions[task.device_id]),
            shape=self.exp.shape,
        )
        if reason is not None:
            log.warning(
                "round %s, device %s: update rejected: %s",
                task.round,
                outcome.device.device_id,
                reason,
            )
            outcome.status, outcome.update = TaskStatus.REJECTED, None
            outcome.extra["reason"] = f"rejected: {reason}"
        elif update.lora_rank != task.lora.rank:  # the device shrank its own rank (HetLoRA)
            self.device_lora[update.device_id] = DeviceLora(update.lora_rank, task.lora.scaling)

    def _aggregate(
        self,
        round_no: int,
        start: float,
        accepted: list[TaskOutcome],
        updates: list[ClientUpdate] | None = None,
    ) -> float:
        """Aggregate ``updates`` (default: the accepted tasks' own) and charge the server's time."""
        if updates is None:
            updates = self._robust([o for o in accepted if o.update is not None])
        nbytes = sum(o.uplink_bytes for o in accepted)
        wall = time.perf_counter()
        aggregate(self.exp.strategy, updates, self.exp.config.strategy.aggregation_fan_in)
        delta = self.exp.strategy.take_base_delta()
        if delta:
            self._merge_base(delta)
        wall = time.perf_counter() - wall
        self.state.aggregation_wall_seconds += wall
        seconds = self.transport.aggregation_seconds(self, nbytes, wall) if updates else 0.0
        self.recorder.event(
            "aggregation",
            round=round_no,
            virtual_start=start,
            virtual_end=start + seconds,
            aggregation_seconds=seconds,
            num_updates=len(updates),
            uplink_bytes=nbytes,
        )
        return seconds

    def _robust(self, accepted: list[TaskOutcome]) -> list[ClientUpdate]:
        """The accepted updates after the configured robust rule (``server.robust``)."""
        server = self.exp.config.server
        pairs = [(o.update, o.task.payload) for o in accepted if o.update is not None and o.task is not None]
        if server.robust == "clip":
            return [clip(u, start, server.clip_norm) for u, start in pairs]
        if server.robust in ("median", "trimmed_mean") and pairs:
            return [combine([u for u, _ in pairs], pairs[0][1], server.robust, server.trim_fraction)]
        return [u for u, _ in pairs]

    def _merge_base(self, delta: dict[str, torch.Tensor]) -> None:
        """Add an aggregated weight change to the base model (FLoRA, FedSpine), and to the running sum."""
        self.exp.executor.merge_into_base(delta)
        for key, value in delta.items():
            self.base_delta[key] = self.base_delta.get(key, torch.zeros_like(value)) + value

    # --- records ---------------------------------------------------------------------------------

    def _record_task(self, round_no: int, start: float, o: TaskOutcome, **extra: Any) -> None:
        prepared = o.prepared
        workload = prepared.workload if prepared else None
        self.recorder.event(
            "task",
            **o.extra,
            **extra,
            round=round_no,
            device_id=o.device.device_id,
            device_class=o.device.device_class.name,
            network=o.device.network.name,
            status=o.status,
            virtual_start=start,
            virtual_end=start + o.end_seconds,
            downlink_seconds=o.downlink_seconds,
            compute_seconds=o.compute_seconds,
            uplink_seconds=o.uplink_seconds,
            downlink_bytes=o.downlink_bytes,
            uplink_bytes=o.uplink_bytes,
            tokens=workload.tokens if workload else 0,
            num_samples=prepared.num_samples if prepared else 0,
            local_steps=len(prepared.batches) if prepared else 0,
            lora_rank=prepared.lora.rank if prepared else 0,
            pruning_ratio=o.task.pruning_ratio if o.task else 0.0,
            train_loss=o.update.train_loss if o.update else None,
            peak_memory_bytes=workload.peak_memory_bytes if workload else 0,
        )
        self._device_stats(o)

    def _device_stats(self, o: TaskOutcome) -> None:
        device = o.device
        stats = self.state.device_stats.setdefault(
            device.device_id, DeviceStats(device.device_id, device.device_class.name, device.network.name)
        )
        communication = o.downlink_seconds + o.uplink_seconds
        stats.add_task(o.status, o.compute_seconds, communication, o.uplink_bytes, o.downlink_bytes)

    def _round_record(
        self,
        round_no: int,
        start: float,
        outcomes: list[TaskOutcome],
        accepted: list[TaskOutcome],
        agg_seconds: float,
    ) -> RoundRecord:
        closer = max(accepted, key=lambda o: o.arrival_seconds) if accepted else None
        return self._record(
            round_no,
            start,
            agg_seconds,
            closer,
            accepted,
            selected=len(outcomes),
            late=sum(o.status == TaskStatus.LATE for o in outcomes),
            oom=sum(o.status == TaskStatus.OOM for o in outcomes),
            dropped=sum(o.status == TaskStatus.DROPPED for o in outcomes),
            uplink_bytes=sum(o.uplink_bytes for o in outcomes),
            downlink_bytes=sum(o.downlink_bytes for o in outcomes),
        )

    def _record(
        self,
        round_no: int,
        start: float,
        agg_seconds: float,
        closer: TaskOutcome | None,
        accepted: list[TaskOutcome],
        **counts: Any,
    ) -> RoundRecord:
        """A round's (or server step's) record ending now; ``closer`` is the update that closed it."""
        losses = [o.update.train_loss for o in accepted if o.update is not None]
        return RoundRecord(
            round=round_no,
            virtual_start=start,
            virtual_end=self.clock.now,
            round_seconds=self.clock.now - start,
            aggregation_seconds=agg_seconds,
            downlink_seconds=closer.downlink_seconds if closer else 0.0,
            training_seconds=closer.compute_seconds if closer else 0.0,
            uplink_seconds=closer.uplink_seconds if closer else 0.0,
            aggregated=len(accepted),
            train_loss=sum(losses) / len(losses) if losses else None,
            **counts,
        )

    def _evaluate(self, round_no: int) -> Evaluation:
        wall = time.perf_counter()
        self.exp.executor.load_global(self.exp.strategy.global_lora())
        evaluation = self.exp.executor.evaluate(self.exp.test_set, self.exp.strategy.eval_plan())
        self.state.eval_wall_seconds += time.perf_counter() - wall
        entry = {
            "round": round_no,
            "virtual_time": self.clock.now,
            "metric": evaluation.metric_name,
            "value": evaluation.metric,
            "loss": evaluation.loss,
        }
        self.state.evaluations.append(entry)
        self.recorder.event("evaluation", **entry)
        return evaluation
