"""The event-driven engine of the asynchronous schedulers (FedAsync, FedBuff, FedCompass).

Events on the run's clock: a task's arrival, a task lost when its device goes offline, a
scheduler's timer, a device coming back online. The scheduler turns events into server steps and task
orders; the engine's :class:`~fedspine.runtime.transport.Transport` carries tasks to devices and
their updates back (the simulated fleet, or Flower in a deployment); the engine does everything else
(as described here for the simulated fleet):

* **dispatch**: a device that is offline (availability trace) or declines the offer (its per-offer
  ``availability`` draw) does not start; it is offered work again when it comes back online, or
  after the next aggregation. A task that does not fit in memory fails (``oom``). Otherwise the
  device receives the current global state and trains *now*, on the host, exactly as in a synchronous
  round (the base it trains on is the current one); its arrival is scheduled from the cost model. A
  device that goes offline before its upload completes loses the task (``dropped``): its time is
  spent, its update never reaches the server (it is not even trained on the host when the loss
  comes before the end of its compute).
* **server steps**: each arrival is rebased onto the current global state with its change scaled by
  ``lr * s(tau)`` (``Strategy.rebase``, the stale-update handler's scale and compensation), then the
  strategy aggregates the step's updates as in a synchronous round; server momentum, when set, acts on
  the global adapter. Every update is applied at most once (an internal check raises otherwise); the
  summary's ``updates`` counts dispatched, applied and unapplied updates.
* **stopping**: after ``scheduler.rounds`` aggregations, ``max_updates`` applied updates or
  ``max_virtual_seconds``; tasks still running are recorded as ``cancelled``, buffered arrivals as
  unapplied.

Each of a device's tasks draws its batches and jitter from its own key (the device's task count), and
events at equal times keep their insertion order, so a run is deterministic for its seed.
"""

from __future__ import annotations

import random
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fedspine.algorithms.schedulers import Arrival, AsyncScheduler, ServerStep, TaskOrder
from fedspine.client.evaluate import Evaluation
from fedspine.metrics.records import RoundRecord, RunRecorder
from fedspine.runtime import checkpoint as checkpoints
from fedspine.runtime.build import Experiment
from fedspine.runtime.engine import Engine, ProgressCallback, RunState, TaskOutcome
from fedspine.runtime.executor import task_seed
from fedspine.runtime.transport import RunningTask, Transport
from fedspine.sim.clock import EventQueue
from fedspine.types import ClientUpdate, LoraState, TaskResult, TaskStatus


@dataclass
class LoopState:
    """Everything the event loop keeps between two events; a checkpoint saves it with the run."""

    queue: EventQueue[tuple[str, Any]] = field(default_factory=EventQueue)
    """Pending arrivals, losses, scheduler timers and devices coming back online."""
    version: int = 0
    """Server steps taken: the global version."""
    applied: int = 0
    dispatched: int = 0
    running: dict[int, RunningTask] = field(default_factory=dict)
    arrived: dict[int, tuple[RunningTask, ClientUpdate]] = field(default_factory=dict)
    """Arrived updates the scheduler has not applied yet, by task id."""
    busy: set[int] = field(default_factory=set)
    offline: set[int] = field(default_factory=set)
    """Devices waiting for their trace to bring them back online."""
    declined: set[int] = field(default_factory=set)
    """Devices that declined an offer: offered work again after an aggregation, or when idle."""
    failed: set[int] = field(default_factory=set)
    """Devices whose task did not fit in memory: offered work again after an aggregation."""
    offers: dict[int, int] = field(default_factory=dict)
    """Offers made to each device so far (keys its next task's batches and draws)."""
    momentum: LoraState | None = None
    recent_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=20))
    since: dict[str, float] = field(default_factory=dict)
    """Counts since the last server step, for its record."""
    last_aggregation_end: float = 0.0
    last_evaluated: int = -1
    checkpointed: int = 0
    """The version of the newest checkpoint."""


class AsyncEngine(Engine):
    """Runs an experiment whose scheduler is an :class:`AsyncScheduler`."""

    def __init__(
        self, experiment: Experiment, recorder: RunRecorder, transport: Transport | None = None
    ) -> None:
        super().__init__(experiment, recorder, transport)
        self._loop: LoopState | None = None
        """None until the run starts, or until :meth:`restore` brings back a checkpoint's."""
        self.on_round: ProgressCallback | None = None
        self.total_weight = sum(self._device_weight(d.device_id) for d in experiment.devices)

    @property
    def scheduler(self) -> AsyncScheduler:
        scheduler = self.exp.scheduler
        assert isinstance(scheduler, AsyncScheduler), "the event engine runs asynchronous schedulers"
        return scheduler

    @property
    def loop(self) -> LoopState:
        assert self._loop is not None, "the event loop has not started"
        return self._loop

    def run(self, on_round: ProgressCallback | None = None) -> RunState:
        self.on_round = on_round
        if self._loop is None:
            self._start_loop()
        loop = self.loop
        while not self._done() and self._next_event(loop.queue):
            at, (kind, payload) = loop.queue.pop()
            if self._time_limit() and at > self._time_limit():
                break
            self.clock.advance_to(max(at, self.clock.now))
            self._handle(kind, payload)
            self._after_event()
            if not len(loop.queue) and not loop.running and loop.declined:
                self._offer_again(failed=False)  # nothing else can happen: ask those who declined again
                self._after_event()
            self._maybe_checkpoint()
        self._finish()
        return self.state

    def _start_loop(self) -> None:
        """The initial global state, the first evaluation, and the scheduler's first orders."""
        exp = self.exp
        self._init_global()
        self._loop = LoopState()
        if exp.config.eval.at_start:
            self._evaluate(0)
            self._loop.last_evaluated = 0
        self._dispatch(self.scheduler.start(0.0, [d.device_id for d in exp.devices]))
        self._after_event()

    # --- checkpoints -----------------------------------------------------------------------------

    def _maybe_checkpoint(self) -> None:
        """Checkpoint between two events, after every ``run.checkpoint_every`` server steps."""
        loop, every = self.loop, self.exp.config.run.checkpoint_every
        if every and loop.version % every == 0 and loop.version > loop.checkpointed and not self._done():
            loop.checkpointed = loop.version
            self.checkpoint(loop.version)

    def _engine_state(self) -> dict[str, Any]:
        return {**super()._engine_state(), "loop": self.loop}

    def restore(self, snapshot: checkpoints.Snapshot) -> None:
        self._loop = snapshot.engine["loop"]
        super().restore(snapshot)

    def _reconnect(self) -> None:
        """After a restore: tasks that were out and can no longer come back (a deployment's, sent by
        the interrupted server; not those whose arrival was already queued) end now as ``dropped``,
        and their devices are offered work again."""
        if self.transport.resume_at(self.clock.now):
            return
        now = self.clock.now
        queued = {item[1].task_id for item in self.loop.queue.items() if item[0] in ("arrive", "lost")}
        for task in sorted(self.loop.running.values(), key=lambda t: t.task_id):
            if task.task_id in queued:
                continue
            task.outcome.lose(max(0.0, now - task.start))
            task.outcome.extra["reason"] = "the server restarted; the task went to the interrupted run"
            self.loop.queue.push(now, ("arrive", task))

    # --- events ----------------------------------------------------------------------------------

    def _handle(self, kind: str, payload: Any) -> None:
        now = self.clock.now
        if kind == "arrive":
            steps = self._arrive(payload)
        elif kind == "lost":
            steps = self._lost(payload)
        elif kind == "timer":
            steps = self.scheduler.on_timer(now, payload)
        else:  # "online"
            self.loop.offline.discard(payload)
            self.scheduler.on_available(now, payload)
            steps = []
        for step in steps:
            self._apply(step)
            if self._done():
                break

    def _after_event(self) -> None:
        if self._done():
            return
        self._dispatch(self.scheduler.orders(self.clock.now, self.loop.version))
        self._fill()
        for at, key in self.scheduler.take_timers():
            self.loop.queue.push(at, ("timer", key))

    def _arrive(self, task: RunningTask) -> list[ServerStep]:
        o = task.outcome
        device = o.device.device_id
        del self.loop.running[task.task_id]
        self.loop.busy.discard(device)
        if o.update is None:  # rejected by the server's checks, or a deployed device's failed reply
            self._end_task(task)
            return self.scheduler.on_lost(self.clock.now, device)
        self._end_task(task)
        self.loop.recent_seconds.append(o.arrival_seconds)
        self.loop.arrived[task.task_id] = (task, o.update)
        weight = self._device_weight(device)
        arrival = Arrival(task.task_id, device, task.version, weight, self.clock.now)
        return self.scheduler.on_arrival(self.clock.now, arrival)

    def _lost(self, task: RunningTask) -> list[ServerStep]:
        device = task.outcome.device.device_id
        del self.loop.running[task.task_id]
        self.loop.busy.discard(device)
        self._end_task(task)
        self._go_offline(device)
        return self.scheduler.on_lost(self.clock.now, device)

    def _end_task(self, task: RunningTask) -> None:
        o = task.outcome
        self._record_task(task.version, task.start, o, task_id=task.task_id)
        self._count(o.status)
        self._count("uplink_bytes", o.uplink_bytes)
        cap = statistics.median(self.loop.recent_seconds) if self.loop.recent_seconds else 0.0
        result = TaskResult(o.device.device_id, o.status, o.end_seconds, o.update)
        self.exp.strategy.end_round(self.loop.version, [result], cap)

    def _go_offline(self, device: int) -> None:
        self.loop.offline.add(device)
        back = self.exp.trace.next_change(device, self.clock.now)
        if back != float("inf"):
            self.loop.queue.push(back, ("online", device))

    # --- dispatch --------------------------------------------------------------------------------

    def _fill(self) -> None:
        """Keep ``concurrency`` devices training (schedulers that fill)."""
        if not self.scheduler.fills:
            return
        loop = self.loop
        while len(loop.busy) < self.scheduler.concurrency:
            unavailable = loop.busy | loop.offline | loop.declined | loop.failed
            idle = sorted(d.device_id for d in self.exp.devices if d.device_id not in unavailable)
            if not idle:
                return
            pick = random.Random(task_seed(self.seed, loop.dispatched, len(loop.busy))).choice(idle)
            self._dispatch([TaskOrder(pick, self.scheduler.local_steps)])

    def _dispatch(self, orders: list[TaskOrder]) -> None:
        for order in orders:
            self._start(order)

    def _start(self, order: TaskOrder) -> None:
        now = self.clock.now
        device = self.exp.devices[order.device_id]
        d = device.device_id
        offer = self.loop.offers[d] = self.loop.offers.get(d, 0) + 1
        reach = self.transport.admit(self, device, offer)
        if reach != "ok":
            if reach == "offline":
                self._go_offline(d)
            else:
                self.loop.declined.add(d)
            self._decline(d)
            return
        task_id = self.loop.dispatched
        self.loop.dispatched += 1
        self._count("selected")
        outcome = self._prepare(self.loop.version + 1, device, order.steps, task_key=offer)
        task = RunningTask(task_id, outcome, self.loop.version, now)
        if outcome.status == TaskStatus.OOM:
            self._end_task(task)
            self.loop.failed.add(d)
            self._decline(d)
            return
        self.loop.busy.add(d)
        self.loop.running[task_id] = task
        self.transport.launch(self, task, self.loop.queue, train_now=True)
        self._count("downlink_bytes", outcome.downlink_bytes)

    def _decline(self, device: int) -> None:
        self.scheduler.on_lost(self.clock.now, device)

    def _offer_again(self, failed: bool = True) -> None:
        waiting = self.loop.declined | self.loop.failed if failed else set(self.loop.declined)
        self.loop.declined -= waiting
        self.loop.failed -= waiting
        for device in sorted(waiting):
            self.scheduler.on_available(self.clock.now, device)

    # --- server steps ----------------------------------------------------------------------------

    def _apply(self, step: ServerStep) -> None:
        """Rebase and scale the step's updates, aggregate them, and record the new version."""
        exp = self.exp
        strategy = exp.strategy
        entries = []
        for arrival in step.arrivals:
            if arrival.task_id not in self.loop.arrived:
                raise RuntimeError(f"update of task {arrival.task_id} applied twice or never arrived")
            entries.append(self.loop.arrived.pop(arrival.task_id))
        step_weight = sum(a.weight for a in step.arrivals)
        lr = step.lr * (step_weight / self.total_weight if step.normalize == "fleet" else 1.0)
        handler = exp.stale_handler
        compensate = handler.compensate if handler.needs_drift else None
        staleness = [self.loop.version - task.version for task, _ in entries]
        rebased = []
        for (task, update), tau in zip(entries, staleness, strict=True):
            assert task.outcome.task is not None
            start_state = task.outcome.task.payload
            rebased.append(strategy.rebase(update, start_state, lr * handler.scale(tau), compensate))
        before = strategy.global_lora() if step.momentum > 0 else None
        accepted = [task.outcome for task, _ in entries]
        agg_seconds = self._aggregate(self.loop.version + 1, self.clock.now, accepted, rebased)
        if before is not None:
            self._server_momentum(before, step.momentum)
        self.loop.version += 1
        self.loop.applied += len(entries)
        start = self.loop.last_aggregation_end
        self.clock.advance_to(self.clock.now + agg_seconds)
        self.loop.last_aggregation_end = self.clock.now
        record = self._step_record(accepted, agg_seconds, start, staleness)
        self.recorder.event(
            "server_step",
            round=self.loop.version,
            task_ids=[a.task_id for a in step.arrivals],
            staleness=staleness,
            lr=lr,
        )
        evaluation = None
        if self.loop.version % exp.config.eval.every == 0 or self._done():
            evaluation = self._evaluate(self.loop.version)
            self.loop.last_evaluated = self.loop.version
            record.metric, record.eval_loss = evaluation.metric, evaluation.loss
        self.recorder.round(record)
        self._report(record, evaluation)
        self._offer_again()

    def _server_momentum(self, before: LoraState, beta: float) -> None:
        """``m <- beta m + (after - before)``; the global adapter becomes ``before + m``."""
        strategy: Any = self.exp.strategy
        after = strategy.global_lora()
        step = {m: {k: after[m][k] - before[m][k] for k in ("A", "B")} for m in after}
        if self.loop.momentum is None:
            self.loop.momentum = step
        else:
            old = self.loop.momentum
            self.loop.momentum = {m: {k: beta * old[m][k] + step[m][k] for k in ("A", "B")} for m in step}
        strategy.set_global_lora(
            {m: {k: before[m][k] + self.loop.momentum[m][k] for k in ("A", "B")} for m in before}
        )

    def _report(self, record: RoundRecord, evaluation: Evaluation | None) -> None:
        if self.on_round is not None:
            self.on_round(record, evaluation)

    def _step_record(
        self, accepted: list[TaskOutcome], agg_seconds: float, start: float, staleness: list[int]
    ) -> RoundRecord:
        since, self.loop.since = self.loop.since, {}
        return self._record(
            self.loop.version,
            start,
            agg_seconds,
            accepted[-1] if accepted else None,
            accepted,
            selected=int(since.get("selected", 0)),
            late=0,
            oom=int(since.get("oom", 0)),
            uplink_bytes=int(since.get("uplink_bytes", 0)),
            downlink_bytes=int(since.get("downlink_bytes", 0)),
            dropped=int(since.get("dropped", 0)),
            mean_staleness=statistics.fmean(staleness) if staleness else None,
            max_staleness=max(staleness) if staleness else None,
        )

    def _count(self, key: str, amount: float = 1) -> None:
        self.loop.since[key] = self.loop.since.get(key, 0) + amount

    # --- stopping --------------------------------------------------------------------------------

    def _time_limit(self) -> float:
        return self.scheduler.limits.max_virtual_seconds

    def _done(self) -> bool:
        limits = self.scheduler.limits
        return (
            self.loop.version >= limits.rounds
            or (limits.max_updates > 0 and self.loop.applied >= limits.max_updates)
            or (limits.max_virtual_seconds > 0 and self.clock.now >= limits.max_virtual_seconds)
        )

    def _finish(self) -> None:
        """Cancel what is still running, count what was never applied, evaluate the final model."""
        for task in sorted(self.loop.running.values(), key=lambda t: t.task_id):
            task.outcome.status = TaskStatus.CANCELLED
            task.outcome.lost_seconds = max(0.0, self.clock.now - task.start)
            task.outcome.update = None
            self._record_task(task.version, task.start, task.outcome, task_id=task.task_id)
        self.loop.running.clear()
        self.state.updates = {
            "dispatched": self.loop.dispatched,
            "applied": self.loop.applied,
            "unapplied_at_end": len(self.loop.arrived),
        }
        if self.loop.last_evaluated != self.loop.version or not self.state.evaluations:
            self._evaluate(self.loop.version)

    def _device_weight(self, device_id: int) -> float:
        if self.exp.config.strategy.weighting == "samples":
            return float(len(self.exp.partitions[device_id]))
        return 1.0


def make_engine(experiment: Any, recorder: Any, transport: Transport | None = None) -> Engine:
    """The engine the experiment's scheduler needs, over ``transport`` (default: the simulated fleet)."""
    if not experiment.config.scheduler.synchronous:
        return AsyncEngine(experiment, recorder, transport)
    return Engine(experiment, recorder, transport)
