"""Asynchronous server steps on the event loop (FedAsync, FedBuff, FedCompass): tasks one device at a
time, and the server steps the scheduler takes from their arrivals.

* **tasks** (:class:`~fedspine.algorithms.schedulers.TaskOrder`, and filling): a device that is
  offline (availability trace) or declines the offer (its per-offer ``availability`` draw) does not
  start; it is offered work again when it comes back online, or after the next aggregation. A task
  that does not fit in memory fails (``oom``). Otherwise the device receives the current global state
  and trains *now* (the base it trains on is the current one); its arrival is scheduled by the
  transport. A device that goes offline before its upload completes loses the task (``dropped``):
  its time is spent, its update never reaches the server.
* **server steps**: each arrival is rebased onto the current global state with its change scaled by
  ``lr * s(tau)`` (``Strategy.rebase``, the stale-update handler's scale and compensation), then the
  strategy aggregates the step's updates; server momentum, when set, acts on the global adapter.
  Every update is applied at most once (an internal check raises otherwise).
"""

from __future__ import annotations

import random
import statistics

from fedspine.algorithms.schedulers import Arrival, Cohort, ServerStep, TaskOrder
from fedspine.algorithms.strategies.base import Dispatcher, Rebaser
from fedspine.metrics.events import ServerStepEvent
from fedspine.runtime.executor import task_seed
from fedspine.runtime.ledger import Ledger
from fedspine.runtime.regime import Regime
from fedspine.runtime.tasks import RunningTask
from fedspine.types import TaskResult, TaskStatus


class Steps(Regime):
    """Tasks that start and end on their own; server steps when the scheduler says."""

    def open(self, order: Cohort) -> None:
        raise RuntimeError(f"scheduler '{self.scheduler.name}' ordered a cohort; only synchronous rounds do")

    def fill(self) -> None:
        """Keep ``concurrency`` devices training (schedulers that fill), each pick drawn at random
        among the idle devices."""
        scheduler, loop = self.scheduler, self.loop
        if not scheduler.fills:
            return
        while len(loop.busy) < scheduler.concurrency:
            unavailable = loop.busy | loop.offline | loop.declined | loop.failed
            idle = sorted(d.device_id for d in self.exp.devices if d.device_id not in unavailable)
            if not idle:
                return
            pick = random.Random(task_seed(self.server.seed, loop.dispatched, len(loop.busy))).choice(idle)
            self.start(TaskOrder(pick, scheduler.local_steps))

    def start(self, order: TaskOrder) -> None:
        loop, now = self.loop, self.clock.now
        device = self.exp.devices[order.device_id]
        d = device.device_id
        offer = loop.offers[d] = loop.offers.get(d, 0) + 1
        reach = self.transport.admit(device, offer, now)
        if reach != "ok":
            if reach == "offline":
                self.go_offline(d)
            else:
                loop.declined.add(d)
            self.scheduler.on_lost(now, d)
            return
        task_id = loop.dispatched
        loop.dispatched += 1
        self.count("selected")
        outcome = self.server.prepare(loop.version + 1, device, order.steps, task_key=offer)
        task = RunningTask(task_id, outcome, loop.version, now)
        if outcome.status == TaskStatus.OOM:
            self._end(task)
            loop.failed.add(d)
            self.scheduler.on_lost(now, d)
            return
        loop.busy.add(d)
        loop.running[task_id] = task
        self.queue(self.transport.launch(task, self.server.base_delta, train_now=True))
        self.count("downlink_bytes", outcome.downlink_bytes)

    def arrive(self, task: RunningTask) -> list[ServerStep]:
        o, now, device = task.outcome, self.clock.now, task.outcome.device.device_id
        self.take_off(task)
        self.server.receive(o)
        self._end(task)
        if o.update is None:
            return self.scheduler.on_lost(now, device)
        self.loop.recent_seconds.append(o.arrival_seconds)
        self.loop.arrived[task.task_id] = (task, o.update)
        arrival = Arrival(task.task_id, device, task.version, self.server.device_weight(device), now)
        return self.scheduler.on_arrival(now, arrival)

    def lost(self, task: RunningTask) -> list[ServerStep]:
        device = task.outcome.device.device_id
        self.take_off(task)
        self._end(task)
        self.go_offline(device)
        return self.scheduler.on_lost(self.clock.now, device)

    def _end(self, task: RunningTask) -> None:
        """Record a task as it ends, and tell the strategy."""
        o, loop = task.outcome, self.loop
        self.ledger.task(task.version, task.start, o, task_id=task.task_id)
        if o.update is not None:
            loop.fruitless.clear()
        else:
            loop.fruitless[o.device.device_id] = loop.fruitless.get(o.device.device_id, 0) + 1
        self.count(o.status)
        self.count("uplink_bytes", o.uplink_bytes)
        cap = statistics.median(loop.recent_seconds) if loop.recent_seconds else 0.0
        result = TaskResult(o.device.device_id, o.status, o.end_seconds, o.update, o.compute_seconds)
        dispatcher: Dispatcher = self.exp.strategy
        dispatcher.end_round(loop.version, [result], cap)

    def apply(self, step: ServerStep) -> None:
        """Rebase and scale the step's updates, aggregate them, and record the new version."""
        exp, loop, server = self.exp, self.loop, self.server
        rebaser: Rebaser = exp.strategy
        entries = []
        for arrival in step.arrivals:
            if arrival.task_id not in loop.arrived:
                raise RuntimeError(f"update of task {arrival.task_id} applied twice or never arrived")
            entries.append(loop.arrived.pop(arrival.task_id))
        step_weight = sum(a.weight for a in step.arrivals)
        lr = step.lr * (step_weight / server.total_weight if step.normalize == "fleet" else 1.0)
        handler = exp.stale_handler
        compensate = handler.compensate if handler.needs_drift else None
        staleness = [loop.version - task.version for task, _ in entries]
        rebased = []
        for (task, update), tau in zip(entries, staleness, strict=True):
            assert task.outcome.task is not None
            start_state = task.outcome.task.payload
            rebased.append(rebaser.rebase(update, start_state, lr * handler.scale(tau), compensate))
        before = rebaser.global_lora() if step.momentum > 0 else None
        accepted = [task.outcome for task, _ in entries]
        agg_seconds = server.aggregate(loop.version + 1, self.clock.now, accepted, rebased)
        if before is not None:
            loop.momentum = server.momentum(before, step.momentum, loop.momentum)
        loop.version += 1
        loop.applied += len(entries)
        start = loop.last_aggregation_end
        self.clock.advance_to(self.clock.now + agg_seconds)
        loop.last_aggregation_end = self.clock.now
        since, loop.since = loop.since, {}
        now = self.clock.now
        record = Ledger.step_record(loop.version, start, now, accepted, agg_seconds, staleness, since)
        task_ids = [a.task_id for a in step.arrivals]
        server.recorder.event(ServerStepEvent(loop.version, task_ids, staleness, lr))
        self.conclude(record)
        self.offer_again()
