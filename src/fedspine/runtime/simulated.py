"""The simulated fleet: each device's times from the cost model on the virtual clock, its training
on the host, and what the device does to its update before it leaves (an attack, the uplink codec).

:class:`SimulatedTransport` is the engine's transport in simulation. A task's downlink and compute
times come from the device's class and link (:class:`~fedspine.fleet.cost.CostModel`) with the run's
jitter draws; the task trains on the host (when it is launched, or when it is delivered); its
arrival, or its loss when the availability trace takes the device offline first, is reported on the
virtual clock as soon as the task is launched. Nothing is ever out, and time jumps to each event.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedspine.algorithms.robust import corrupt
from fedspine.algorithms.strategies.base import GlobalModel
from fedspine.client.evaluate import Evaluation
from fedspine.fleet.cost import CostModel
from fedspine.fleet.jitter import compute_slowdown, is_available, link_rate_factor
from fedspine.model.pruning import PruningPlan
from fedspine.runtime.executor import PreparedTask, task_seed
from fedspine.runtime.experiment import Experiment
from fedspine.runtime.tasks import Arrive, Ended, Lost, RunningTask, TaskOutcome, count_upload
from fedspine.runtime.transport import Admission, BaseDelta, DeviceEvaluations
from fedspine.types import ClientUpdate, Device, TaskStatus


def modelled_compute(
    device: Device, prepared: PreparedTask, seed: int, key: int, jitter_scale: float
) -> tuple[float, float | None]:
    """The cost model's training seconds of a prepared task on ``device`` (with the run's slowdown
    draw for task ``key``), and the share of them its personal adapter adds (None without one)."""
    cost = CostModel.for_device(device)
    slowdown = compute_slowdown(device, seed, key, jitter_scale)
    seconds = cost.train_seconds(prepared.workload, slowdown)
    if prepared.without_personal is None:
        return seconds, None
    return seconds, seconds - cost.train_seconds(prepared.without_personal, slowdown)


class SimulatedTransport:
    """The simulated fleet of ``exp``.

    Tasks launched to train at once (asynchronous dispatch) wait, when the executor trains tasks
    together, until :meth:`flush`: the engine launches every task of an instant before it flushes, and
    the base cannot change in between, so they train in one batch (or over the Ray workers) and their
    ends are reported in launch order, as one by one.
    """

    devices_personalize = False

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.seed = exp.settings.seed
        self._pending: list[RunningTask] = []

    # --- the device's side of a task ---------------------------------------------------------------

    def _time(self, o: TaskOutcome) -> None:
        """Charge the task's downlink and compute seconds from the cost model."""
        assert o.task is not None and o.prepared is not None
        device, key = o.device, o.task.round
        rate = link_rate_factor(device, self.seed, key, "down")
        o.downlink_seconds = CostModel.for_device(device).transfer_seconds(o.downlink_bytes, "down", rate)
        jitter = self.exp.settings.jitter_scale
        o.compute_seconds, personal = modelled_compute(device, o.prepared, self.seed, key, jitter)
        if personal is not None:
            o.extra["personal_seconds"] = personal

    def _train(self, outcomes: Sequence[TaskOutcome]) -> None:
        """Train tasks that start from the same base on the host, one by one or in one batch
        (``executor.batch_clients``), and send each update as its device would."""
        executor = self.exp.trainer.executor
        for o in outcomes:
            assert o.task is not None and o.prepared is not None
        if len(outcomes) > 1:
            updates = executor.run_many([o.task for o in outcomes], [o.prepared for o in outcomes])  # type: ignore[misc]
        else:
            o = outcomes[0]
            updates = [executor.run(o.task, o.prepared)]  # type: ignore[arg-type]
        for outcome, update in zip(outcomes, updates, strict=True):
            self._send(outcome, update)

    def _send(self, outcome: TaskOutcome, update: ClientUpdate) -> None:
        """Take a trained update through the device's attack and uplink codec; charge the uplink."""
        assert outcome.task is not None
        exp = self.exp
        attack = exp.settings.attack
        if attack.kind != "none" and update.device_id in attack.devices:
            update = corrupt(update, outcome.task.payload, attack.kind, attack.factor)
        if exp.uplink is not None:
            draws = torch.Generator().manual_seed(
                task_seed(self.seed, outcome.task.round, update.device_id, 4)
            )
            update = exp.uplink.transmit(update, outcome.task.payload, draws)
        count_upload(outcome, update)
        rate = link_rate_factor(outcome.device, self.seed, update.round, "up")
        cost = CostModel.for_device(outcome.device)
        outcome.uplink_seconds = cost.transfer_seconds(update.uplink_bytes, "up", rate)
        outcome.update = update

    def _computes(self, task: RunningTask) -> bool:
        """Whether the device stays online until its compute ends (else it never trains)."""
        o, now = task.outcome, task.start
        end = now + o.downlink_seconds + o.compute_seconds
        return self.exp.trace.offline_during(o.device.device_id, now, end) is None

    def _end(self, task: RunningTask) -> Ended:
        """The task's arrival, or its loss if its device goes offline first."""
        o, now = task.outcome, task.start
        lost = self.exp.trace.offline_during(o.device.device_id, now, now + o.arrival_seconds)
        if lost is not None:
            o.lose(lost - now)
            return lost, Lost(task)
        return now + o.arrival_seconds, Arrive(task)

    # --- the transport -----------------------------------------------------------------------------

    def reachable(self, round_no: int, start: float) -> list[int]:
        trace = self.exp.trace
        return [
            d.device_id
            for d in self.exp.devices
            if trace.online(d.device_id, start) and is_available(d, self.seed, round_no)
        ]

    def admit(self, device: Device, offer: int, now: float) -> Admission:
        if not self.exp.trace.online(device.device_id, now):
            return "offline"
        return "ok" if is_available(device, self.seed, offer) else "declined"

    def fits(self, device: Device, peak_memory_bytes: int) -> bool:
        return CostModel.for_device(device).fits(peak_memory_bytes)

    def launch(self, task: RunningTask, base_delta: BaseDelta, train_now: bool) -> list[Ended]:
        self._time(task.outcome)
        if train_now and self.exp.trainer.executor.trains_together:
            self._pending.append(task)
            return []
        if train_now and self._computes(task):
            self._train([task.outcome])  # trained now, on the base of the current version
        return [self._end(task)]

    def flush(self) -> list[Ended]:
        pending, self._pending = self._pending, []
        trained = [task.outcome for task in pending if self._computes(task)]
        if trained:
            self._train(trained)
        return [self._end(task) for task in pending]

    def deliver(self, task: RunningTask, mates: Sequence[RunningTask]) -> None:
        o = task.outcome
        if o.update is None and o.status == TaskStatus.OK:
            together = [o, *(m.outcome for m in mates)] if self.exp.trainer.executor.trains_together else [o]
            self._train(together)

    def poll(self) -> tuple[list[Ended], bool]:
        return [], False  # every end was known at launch

    def due(self, at: float) -> bool:
        return True

    def wait(self) -> None:
        raise AssertionError("the simulated transport never waits")  # poll() never says tasks are out

    def present(self, now: float) -> float:
        return now

    def resume_at(self, now: float) -> bool:
        return True  # their arrivals are in the checkpoint's queue

    def aggregation_seconds(self, nbytes: int, wall_seconds: float) -> float:
        """The cost model's time for ``nbytes`` of updates, not the host's."""
        server = self.exp.settings.server
        return server.aggregation_overhead_seconds + nbytes / (server.aggregation_gbps * 1e9)

    def evaluate_devices(self, version: int, base_delta: BaseDelta) -> DeviceEvaluations:
        """Every device with a held-out slice evaluates, online or not, off the virtual clock: the
        curve measures the model, not which devices happened to be reachable."""
        exp = self.exp
        model: GlobalModel = exp.strategy
        means = model.channel_means()
        groups: list[tuple[PruningPlan | None, list[int]]] = []  # devices sharing a plan share one copy
        for device in sorted(exp.trainer.local_tests):
            plan = model.device_eval_plan(device)
            for known, members in groups:
                if known == plan:
                    members.append(device)
                    break
            else:
                groups.append((plan, [device]))
        results: dict[int, Evaluation] = {}
        for plan, members in groups:
            evaluations = exp.trainer.executor.evaluate_many(
                [exp.trainer.local_tests[d] for d in members], plan, means
            )
            results.update(zip(members, evaluations, strict=True))
        return DeviceEvaluations(dict(sorted(results.items())))

    def hand_out(
        self, version: int, base_delta: BaseDelta, manifest: dict[str, Any]
    ) -> dict[int, dict[str, object]]:
        return {}  # a simulated device's model is the one in the run directory
