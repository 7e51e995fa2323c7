"""How a task reaches its device and its update comes back: the engine's variable part besides the
scheduler.

The engine (synchronous rounds and asynchronous schedulers alike) hands every task to a
:class:`Transport` and take back its end as an event on a queue: ``("arrive", task)`` when its reply
is in (with an update, or without one when the device failed), ``("lost", task)`` when its device
went offline first. :class:`SimulatedTransport` is the simulated fleet (the cost model's times on a
virtual clock, training on the host); a deployment's is ``fedspine.deploy.server.FlowerTransport``
(Flower messages, the wall clock).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from fedspine.fleet.jitter import is_available
from fedspine.sim.clock import EventQueue
from fedspine.types import Device, TaskStatus

if TYPE_CHECKING:
    from fedspine.client.evaluate import Evaluation
    from fedspine.runtime.engine import Engine, TaskOutcome

Events = EventQueue[tuple[str, Any]]
"""A queue of ``(kind, payload)`` events on the run's clock."""

Admission = Literal["ok", "offline", "declined"]
"""Whether a device takes a task offered now: it does, it is offline, or it declines this offer."""


@dataclass
class RunningTask:
    """A dispatched task, from its start until it arrives, is lost or is cancelled."""

    task_id: int
    outcome: TaskOutcome
    version: int
    """Global version the device received."""
    start: float
    """Dispatch time on the run's clock."""
    deadline: float = 0.0
    """Seconds after ``start`` after which the task is late (a synchronous round's deadline); 0: none."""


@dataclass
class DeviceEvaluations:
    """A federated evaluation's answers: device id -> its evaluation, and the devices that gave none
    (device id -> why)."""

    evaluations: dict[int, Evaluation] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)


class Transport(Protocol):
    """Carries the engine's tasks to their devices and their ends back onto the engine's event queue."""

    devices_personalize: bool
    """Whether the devices build their personal models (``[personalize]``) themselves when they
    receive their final model (:meth:`hand_out`), and report them; else the engine builds them."""

    def reachable(self, engine: Engine, round_no: int, start: float) -> list[int]:
        """The devices a synchronous round starting at ``start`` may sample."""
        ...

    def admit(self, engine: Engine, device: Device, offer: int) -> Admission:
        """Whether ``device`` takes its ``offer``-th task now."""
        ...

    def launch(self, engine: Engine, task: RunningTask, events: Events, train_now: bool) -> None:
        """Start ``task``; its end reaches ``events`` now or through :meth:`collect`.

        ``train_now`` False lets a transport that trains on the host put that off until
        :meth:`deliver` (a synchronous round: the base cannot change before the task arrives, and a
        task that arrives too late to count is never trained).
        """
        ...

    def deliver(self, engine: Engine, task: RunningTask) -> None:
        """The engine takes ``task``'s arrival: its update must be there now."""
        ...

    def flush(self, engine: Engine) -> None:
        """The tasks launched since the last event have all been launched: finish launching them."""
        ...

    def collect(self, engine: Engine, events: Events) -> bool:
        """Queue what has come back; True while tasks are out that only this transport can bring back."""
        ...

    def due(self, at: float) -> bool:
        """Whether the event at time ``at`` can be handled now."""
        ...

    def wait(self) -> None:
        """Let time pass until something may have come back."""
        ...

    def present(self, now: float) -> float:
        """The run's clock reading now, given the engine's ``now`` (a wall clock runs on by itself)."""
        ...

    def resume_at(self, now: float) -> bool:
        """A checkpoint taken at ``now`` on the run's clock has been restored; whether the tasks that
        were out then still come back (False: they went to the interrupted run)."""
        ...

    def aggregation_seconds(self, engine: Engine, nbytes: int, wall_seconds: float) -> float:
        """The time a server step's aggregation takes on the run's clock."""
        ...

    def evaluate_devices(self, engine: Engine, version: int) -> DeviceEvaluations:
        """Federated evaluation of global ``version`` (loaded in the engine's executor): each device
        that answers evaluates it, at its own plan, on its held-out data."""
        ...

    def hand_out(self, engine: Engine, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Give every device its final model (``manifest``: the run's device models); what each device
        reports about the copy it now holds (device id -> report), or nothing where the run
        directory's models are the devices' own."""
        ...


class SimulatedTransport:
    """The simulated fleet: a task trains on the host (when it is launched, or when it is delivered);
    its arrival, or its loss when the availability trace takes the device offline first, is queued on
    the virtual clock from the cost model. Nothing is ever out of the queue, and time jumps to each
    event.

    Tasks launched to train at once (asynchronous dispatch) wait, when the executor trains tasks together,
    until :meth:`flush`: the engine launches every task of an instant before it flushes, and the base
    cannot change in between, so they train in one batch (or over the Ray workers) and their events are
    queued in launch order, as one by one.
    """

    devices_personalize = False

    def __init__(self) -> None:
        self._pending: list[tuple[Engine, RunningTask, Events]] = []

    def reachable(self, engine: Engine, round_no: int, start: float) -> list[int]:
        trace = engine.exp.trace
        return [
            d.device_id
            for d in engine.exp.devices
            if trace.online(d.device_id, start) and is_available(d, engine.seed, round_no)
        ]

    def admit(self, engine: Engine, device: Device, offer: int) -> Admission:
        if not engine.exp.trace.online(device.device_id, engine.clock.now):
            return "offline"
        return "ok" if is_available(device, engine.seed, offer) else "declined"

    def launch(self, engine: Engine, task: RunningTask, events: Events, train_now: bool) -> None:
        if train_now and engine.exp.executor.trains_together:
            self._pending.append((engine, task, events))
            return
        if train_now and self._computes(engine, task):
            engine.train(task.outcome)  # trained now, on the base of the current version
        self._queue(engine, task, events)

    def flush(self, engine: Engine) -> None:
        pending, self._pending = self._pending, []
        trained = [task.outcome for _, task, _ in pending if self._computes(engine, task)]
        if len(trained) > 1:
            engine.train_together(trained)
        elif trained:
            engine.train(trained[0])
        for owner, task, events in pending:
            self._queue(owner, task, events)

    @staticmethod
    def _computes(engine: Engine, task: RunningTask) -> bool:
        """Whether the device stays online until its compute ends (else it never trains)."""
        o, now = task.outcome, task.start
        end = now + o.downlink_seconds + o.compute_seconds
        return engine.exp.trace.offline_during(o.device.device_id, now, end) is None

    @staticmethod
    def _queue(engine: Engine, task: RunningTask, events: Events) -> None:
        """Queue the task's arrival, or its loss if its device goes offline first."""
        o, now = task.outcome, task.start
        lost = engine.exp.trace.offline_during(o.device.device_id, now, now + o.arrival_seconds)
        if lost is not None:
            o.lose(lost - now)
            events.push(lost, ("lost", task))
        else:
            events.push(now + o.arrival_seconds, ("arrive", task))

    def deliver(self, engine: Engine, task: RunningTask) -> None:
        o = task.outcome
        if o.update is None and o.status == TaskStatus.OK:
            together = engine.batch_with(o)
            if len(together) > 1:
                engine.train_together(together)
            else:
                engine.train(o)

    def collect(self, engine: Engine, events: Events) -> bool:
        return False

    def due(self, at: float) -> bool:
        return True

    def wait(self) -> None:
        raise AssertionError("the simulated transport never waits")  # collect() is never True

    def present(self, now: float) -> float:
        return now

    def resume_at(self, now: float) -> bool:
        return True  # their arrivals are in the checkpoint's queue

    def aggregation_seconds(self, engine: Engine, nbytes: int, wall_seconds: float) -> float:
        """The cost model's time for ``nbytes`` of updates, not the host's."""
        server = engine.exp.settings.server
        return server.aggregation_overhead_seconds + nbytes / (server.aggregation_gbps * 1e9)

    def evaluate_devices(self, engine: Engine, version: int) -> DeviceEvaluations:
        """Every device with a held-out slice evaluates, online or not, off the virtual clock: the
        curve measures the model, not which devices happened to be reachable."""
        exp = engine.exp
        strategy = exp.strategy
        means = strategy.channel_means()
        groups: list[tuple[Any, list[int]]] = []  # devices sharing a plan share one evaluated copy
        for device in sorted(exp.local_tests):
            plan = strategy.device_eval_plan(device)
            for known, members in groups:
                if known == plan:
                    members.append(device)
                    break
            else:
                groups.append((plan, [device]))
        results: dict[int, Evaluation] = {}
        for plan, members in groups:
            evaluations = exp.executor.evaluate_many([exp.local_tests[d] for d in members], plan, means)
            results.update(zip(members, evaluations, strict=True))
        return DeviceEvaluations(dict(sorted(results.items())))

    def hand_out(self, engine: Engine, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
        return {}  # a simulated device's model is the one in the run directory
