"""The engine: one event loop on the run's clock, for every scheduler and transport.

Events on the run's clock: a task's arrival, a task lost when its device goes offline, a scheduler's
timer, a device coming back online, a synchronous round's cohort. The scheduler turns events into
server steps and orders; the :class:`~fedspine.runtime.transport.Transport` carries tasks to devices
and their updates back (the simulated fleet, or Flower in a deployment); the engine does everything
else (as described here for the simulated fleet):

* **synchronous rounds** (:class:`~fedspine.algorithms.schedulers.Cohort` orders): sample the
  reachable devices, configure every task, launch them and take their arrivals in time order. An
  arrival after the deadline, or after the k-th valid one, cannot be among the aggregated updates: it
  is ``late``, and the simulated transport never trains it (its work is lost in the fleet; the result
  is identical). When every task of the cohort has ended, the scheduler's plan says which arrivals
  count; they are aggregated as they are (they all started from the current version), the round's
  tasks are recorded in selection order, and the clock moves to the round's close plus aggregation.
* **tasks** (:class:`~fedspine.algorithms.schedulers.TaskOrder`, and the engine's filling): a device
  that is offline (availability trace) or declines the offer (its per-offer ``availability`` draw)
  does not start; it is offered work again when it comes back online, or after the next aggregation.
  A task that does not fit in memory fails (``oom``). Otherwise the device receives the current
  global state and trains *now*, on the host (the base it trains on is the current one); its arrival
  is scheduled from the cost model. A device that goes offline before its upload completes loses the
  task (``dropped``): its time is spent, its update never reaches the server.
* **server steps** of the asynchronous schedulers: each arrival is rebased onto the current global
  state with its change scaled by ``lr * s(tau)`` (``Strategy.rebase``, the stale-update handler's
  scale and compensation), then the strategy aggregates the step's updates; server momentum, when
  set, acts on the global adapter. Every update is applied at most once (an internal check raises
  otherwise); the summary's ``updates`` counts dispatched, applied and unapplied updates.
* **stopping**: after ``scheduler.rounds`` aggregations, ``max_updates`` applied updates or
  ``max_virtual_seconds``; tasks still running are recorded as ``cancelled``, buffered arrivals as
  unapplied.

Each task draws its batches and jitter from its own key (a round's number, or the device's offer
count), and events at equal times keep their insertion order, so a run is deterministic for its
seed. Everything that depends on the host's speed is kept out of the records that must be
reproducible. A checkpoint is taken between two events, after every ``run.checkpoint_every`` server
steps, with the event loop in it.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedspine.algorithms.aggregate import aggregate
from fedspine.algorithms.robust import clip, combine
from fedspine.algorithms.schedulers import (
    Arrival,
    Cohort,
    Order,
    Scheduler,
    ServerStep,
    SyncScheduler,
    TaskOrder,
)
from fedspine.algorithms.validation import check_update
from fedspine.algorithms.wire import payload_bytes
from fedspine.client.evaluate import Evaluation
from fedspine.metrics.events import (
    AggregationEvent,
    ServerStepEvent,
)
from fedspine.metrics.records import RoundRecord, RunRecorder
from fedspine.runtime import checkpoint as checkpoints
from fedspine.runtime.build import Experiment
from fedspine.runtime.evaluation import Evaluator
from fedspine.runtime.executor import task_seed
from fedspine.runtime.ledger import Ledger
from fedspine.runtime.personal import from_devices, personalize
from fedspine.runtime.simulated import SimulatedTransport
from fedspine.runtime.state import LoopState, OpenRound, RunState
from fedspine.runtime.tasks import (
    Arrive,
    Ended,
    Event,
    Lost,
    Online,
    OpenCohort,
    RunningTask,
    TaskOutcome,
    Timer,
)
from fedspine.runtime.transport import DeviceEvaluations, Transport
from fedspine.sim.clock import VirtualClock
from fedspine.types import ClientTask, ClientUpdate, Device, DeviceLora, LoraState, TaskResult, TaskStatus

STALL_TASKS_PER_DEVICE = 5
"""An asynchronous run stops once every device has ended this many tasks without an update since
the last update arrived (counted per device: a fast failing device must not stop a run whose slow
devices are still training)."""


log = logging.getLogger("fedspine.engine")

ProgressCallback = Callable[[RoundRecord, "Evaluation | None"], None]


class Engine:
    """Runs an :class:`Experiment` and writes its records into a run directory."""

    def __init__(
        self, experiment: Experiment, recorder: RunRecorder, transport: Transport | None = None
    ) -> None:
        self.exp = experiment
        self.recorder = recorder
        self.transport: Transport = transport or SimulatedTransport(experiment)
        self.clock = VirtualClock()
        self.state = RunState()
        self.seed = experiment.settings.seed
        self.device_lora = dict(experiment.device_lora)
        """Each device's current LoRA rank and scaling (HetLoRA devices shrink theirs)."""
        self.base_delta: dict[str, torch.Tensor] = {}
        """Everything merged into the base weights so far (FLoRA, FedSpine)."""
        self._loop: LoopState | None = None
        """None until the run starts, or until :meth:`restore` brings back a checkpoint's."""
        self.on_round: ProgressCallback | None = None
        self._bind()
        self.total_weight = sum(self._device_weight(d.device_id) for d in experiment.devices)

    def _bind(self) -> None:
        """The parts that write into the run's state (again after a restore replaced it)."""
        self.ledger = Ledger(self.recorder, self.state)
        self.evaluator = Evaluator(self.exp, self.transport, self.recorder, self.state)

    def _evaluate(self, version: int) -> Evaluation | None:
        return self.evaluator.evaluate(version, self.clock.now, self.base_delta)

    def device_evaluations(self, version: int) -> DeviceEvaluations:
        """The devices' evaluations of global ``version`` (loaded in the executor) on their held-out
        data: asked of the transport once per version."""
        return self.evaluator.devices(version, self.base_delta)

    @property
    def scheduler(self) -> Scheduler:
        scheduler: Scheduler = self.exp.scheduler
        return scheduler

    @property
    def loop(self) -> LoopState:
        assert self._loop is not None, "the event loop has not started"
        return self._loop

    def run(self, on_round: ProgressCallback | None = None) -> RunState:
        """Run until the scheduler's limits; returns the accumulated state for the summary."""
        self.on_round = on_round
        if self._loop is None:
            self._start_loop()
        loop = self.loop
        while not self._done() and not self._stalled() and self._next_event():
            at, event = loop.queue.pop()
            if self._time_limit() and at > self._time_limit():
                break
            if loop.round is None:  # a round's events happen inside it: its close sets the clock
                self.clock.advance_to(max(at, self.clock.now))
            self._handle(event)
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
        if exp.settings.eval_at_start:
            self._evaluate(0)
            self._loop.last_evaluated = 0
        self._dispatch(self.scheduler.start(0.0, [d.device_id for d in exp.devices]))
        self._after_event()

    def _init_global(self) -> None:
        """The strategy's initial global state, at the largest rank any device trains."""
        exp = self.exp
        rank = max(lora.rank for lora in self.device_lora.values())
        exp.strategy.init_global(exp.module_shapes, rank, torch.Generator().manual_seed(self.seed))

    def _next_event(self) -> bool:
        """Whether an event is due, after waiting for one while the transport has tasks out (a
        deployment); False when none can come."""
        while True:
            waiting = self._collect()
            at = self.loop.queue.peek_time()
            if at is not None and self.transport.due(at):
                return True
            if at is None and not waiting:
                return False
            self.transport.wait()

    def _collect(self) -> bool:
        """Queue the task ends the transport has learnt of; whether it still has tasks out."""
        ended, waiting = self.transport.poll()
        self._queue(ended)
        return waiting

    def _queue(self, ended: list[Ended]) -> None:
        for at, event in ended:
            self.loop.queue.push(at, event)

    # --- checkpoints -----------------------------------------------------------------------------

    def _maybe_checkpoint(self) -> None:
        """Checkpoint between two events, after every ``run.checkpoint_every`` server steps."""
        loop, every = self.loop, self.exp.settings.checkpoint_every
        if every and loop.version % every == 0 and loop.version > loop.checkpointed and not self._done():
            loop.checkpointed = loop.version
            self.checkpoint(loop.version)

    def checkpoint(self, version: int) -> None:
        """Write an atomic checkpoint of everything needed to continue after server step ``version``."""
        exp = self.exp
        engine = {
            "clock": self.clock.now,
            "device_lora": self.device_lora,
            "state": self.state,
            "rounds": self.recorder.rounds,
            "positions": self.recorder.positions(),
            "loop": self.loop,
        }
        objects = {
            "strategy": exp.strategy,
            "scheduler": exp.scheduler,
            "uplink": exp.uplink,
            "stale_handler": exp.stale_handler,
            "private": exp.private,
            "clusters": exp.clusters,
        }
        weights = exp.executor.base_weights(sorted(self.base_delta))
        snapshot = checkpoints.Snapshot(version, engine, objects, self.base_delta, weights)
        checkpoints.save(self.recorder.run_dir, exp, snapshot, exp.settings.keep_checkpoints)

    def restore(self, snapshot: checkpoints.Snapshot) -> None:
        """Continue from ``snapshot``: the checkpoint's objects replace the freshly built ones.

        Tasks that were out and can no longer come back (a deployment's, sent by the interrupted
        server; not those whose arrival was already queued) end now as ``dropped``, and their devices
        are offered work again.
        """
        exp = self.exp
        for name, obj in snapshot.objects.items():
            setattr(exp, name, obj)
        exp.executor.private = exp.private  # the devices' private adapters live with their trainer
        exp.executor.set_base_weights(snapshot.base_weights)
        self.base_delta = dict(snapshot.base_delta)
        engine = snapshot.engine
        self.clock.advance_to(engine["clock"])
        self.device_lora = engine["device_lora"]
        self.state = engine["state"]
        self._bind()
        self._loop = engine["loop"]
        if self.transport.resume_at(self.clock.now):
            return
        now, loop = self.clock.now, self.loop
        queued = {e.task.task_id for e in loop.queue.items() if isinstance(e, Arrive | Lost)}
        for task in sorted(loop.running.values(), key=lambda t: t.task_id):
            if task.task_id in queued:
                continue
            task.outcome.lose(max(0.0, now - task.start))
            task.outcome.extra["reason"] = "the server restarted; the task went to the interrupted run"
            loop.queue.push(now, Arrive(task))

    # --- events ----------------------------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        now = self.clock.now
        steps: list[ServerStep] = []
        match event:
            case OpenCohort(order):
                self._open_round(order)
            case Arrive(task):
                steps = self._arrive(task)
            case Lost(task):
                steps = self._lost(task)
            case Timer(key):
                steps = self.scheduler.on_timer(now, key)
            case Online(device):
                self.loop.offline.discard(device)
                self.scheduler.on_available(now, device)
        for step in steps:
            self._apply(step)
            if self._done():
                break

    def _after_event(self) -> None:
        if self._done():
            return
        self._dispatch(self.scheduler.orders(self.clock.now, self.loop.version))
        self._fill()
        self._queue(self.transport.flush())  # this instant's tasks are launched: send (train) them together
        for at, key in self.scheduler.take_timers():
            self.loop.queue.push(at, Timer(key))

    def _arrive(self, task: RunningTask) -> list[ServerStep]:
        """A task's reply reached the server (with an update, or without one when the server's checks
        rejected it or a deployed device failed)."""
        o = task.outcome
        device = o.device.device_id
        cohort = self._ended(task)
        if cohort is not None:
            if o.status == TaskStatus.OK:
                if self._rounds.admits(o.arrival_seconds, cohort.arrivals):
                    self.transport.deliver(task, self._mates(cohort, o))
                    self._receive(o)
                    if o.status == TaskStatus.OK:
                        cohort.arrivals.append(o.arrival_seconds)
                else:
                    o.status = TaskStatus.LATE
            self._end_in_round(cohort, task)
            return []
        self._receive(o)
        self._end_task(task)
        if o.update is None:
            return self.scheduler.on_lost(self.clock.now, device)
        self.loop.recent_seconds.append(o.arrival_seconds)
        self.loop.arrived[task.task_id] = (task, o.update)
        weight = self._device_weight(device)
        arrival = Arrival(task.task_id, device, task.version, weight, self.clock.now)
        return self.scheduler.on_arrival(self.clock.now, arrival)

    def _lost(self, task: RunningTask) -> list[ServerStep]:
        """A task's device went offline before its update was in."""
        device = task.outcome.device.device_id
        cohort = self._ended(task)
        if cohort is not None:
            self._end_in_round(cohort, task)  # a round samples among the devices online at its start
            return []
        self._end_task(task)
        self._go_offline(device)
        return self.scheduler.on_lost(self.clock.now, device)

    def _ended(self, task: RunningTask) -> OpenRound | None:
        """``task`` is no longer running; the open round it belongs to, if any."""
        del self.loop.running[task.task_id]
        self.loop.busy.discard(task.outcome.device.device_id)
        cohort = self.loop.round
        return cohort if cohort is not None and task.task_id in cohort.out else None

    def _end_task(self, task: RunningTask) -> None:
        """Record a task outside a round as it ends, and tell the strategy."""
        o = task.outcome
        self.ledger.task(task.version, task.start, o, task_id=task.task_id)
        fruitless = self.loop.fruitless
        if o.update is not None:
            fruitless.clear()
        else:
            fruitless[o.device.device_id] = fruitless.get(o.device.device_id, 0) + 1
        self._count(o.status)
        self._count("uplink_bytes", o.uplink_bytes)
        cap = statistics.median(self.loop.recent_seconds) if self.loop.recent_seconds else 0.0
        result = TaskResult(o.device.device_id, o.status, o.end_seconds, o.update, o.compute_seconds)
        self.exp.strategy.end_round(self.loop.version, [result], cap)

    def _go_offline(self, device: int) -> None:
        self.loop.offline.add(device)
        back = self.exp.trace.next_change(device, self.clock.now)
        if back != float("inf"):
            self.loop.queue.push(back, Online(device))

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

    def _dispatch(self, orders: Sequence[Order]) -> None:
        for order in orders:
            if isinstance(order, Cohort):  # opened as an event, so a checkpoint can come before it
                self.loop.queue.push(self.clock.now, OpenCohort(order))
            else:
                self._start(order)

    def _start(self, order: TaskOrder) -> None:
        now = self.clock.now
        device = self.exp.devices[order.device_id]
        d = device.device_id
        offer = self.loop.offers[d] = self.loop.offers.get(d, 0) + 1
        reach = self.transport.admit(device, offer, now)
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
        self._queue(self.transport.launch(task, self.base_delta, train_now=True))
        self._count("downlink_bytes", outcome.downlink_bytes)

    def _decline(self, device: int) -> None:
        self.scheduler.on_lost(self.clock.now, device)

    def _offer_again(self, failed: bool = True) -> None:
        waiting = self.loop.declined | self.loop.failed if failed else set(self.loop.declined)
        self.loop.declined -= waiting
        self.loop.failed -= waiting
        for device in sorted(waiting):
            self.scheduler.on_available(self.clock.now, device)

    # --- synchronous rounds ----------------------------------------------------------------------

    @property
    def _rounds(self) -> SyncScheduler:
        scheduler = self.exp.scheduler
        assert isinstance(scheduler, SyncScheduler), "only synchronous schedulers order cohorts"
        return scheduler

    def _open_round(self, order: Cohort) -> None:
        """Sample the round's cohort, prepare every task, and launch the ones that fit in memory.

        Tasks are launched in the order of their arrivals (known in simulation) and trained only when
        they arrive in time to count (:meth:`SyncScheduler.admits`): the base cannot change while the
        round is open.
        """
        exp, loop, round_no = self.exp, self.loop, order.round
        self.clock.advance_to(self.transport.present(self.clock.now))  # a wall clock ran on
        start = self.clock.now
        online = self.transport.reachable(round_no, start)
        selected = self._rounds.select(online, random.Random(task_seed(self.seed, round_no)))
        exp.strategy.begin_round(round_no, selected)
        outcomes = [self._prepare(round_no, exp.devices[d]) for d in selected]
        cohort = loop.round = OpenRound(round_no, start, outcomes)
        runnable = [o for o in outcomes if o.status == TaskStatus.OK]
        loop.dispatched += len(outcomes) - len(runnable)  # out of memory: never sent
        for o in runnable:
            task = RunningTask(loop.dispatched, o, round_no - 1, start, self._rounds.deadline_seconds)
            loop.dispatched += 1
            loop.running[task.task_id] = task
            cohort.out.add(task.task_id)
            self._queue(self.transport.launch(task, self.base_delta, train_now=False))
        if not cohort.out:
            self._close_round(cohort)

    def _end_in_round(self, cohort: OpenRound, task: RunningTask) -> None:
        cohort.out.discard(task.task_id)
        if not cohort.out:
            self._close_round(cohort)

    def _close_round(self, cohort: OpenRound) -> None:
        """Every task of the round has ended: keep the arrivals the plan keeps and take the server step."""
        exp, round_no, start, outcomes = self.exp, cohort.round, cohort.start, cohort.outcomes
        self.loop.round = None
        arrivals = {o.device.device_id: o.arrival_seconds for o in outcomes if o.status == TaskStatus.OK}
        plan = self._rounds.plan(arrivals)
        for o in outcomes:
            if o.status == TaskStatus.OK and o.device.device_id in plan.late:
                o.status = TaskStatus.LATE
        accepted = [o for d in plan.accepted for o in outcomes if o.device.device_id == d]
        for o in outcomes:
            self.ledger.task(round_no, start, o)
        exp.strategy.end_round(
            round_no,
            [
                TaskResult(o.device.device_id, o.status, o.arrival_seconds, o.update, o.compute_seconds)
                for o in outcomes
            ],
            self._rounds.deadline_seconds,
        )
        agg_seconds = self._aggregate(round_no, start + plan.close_seconds, accepted)
        self.clock.advance_to(start + plan.close_seconds + agg_seconds)
        self.loop.version += 1
        self.loop.applied += len(accepted)
        self.loop.last_aggregation_end = self.clock.now
        record = Ledger.round_record(round_no, start, self.clock.now, outcomes, accepted, agg_seconds)
        self._conclude(record)

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
        since, self.loop.since = self.loop.since, {}
        record = Ledger.step_record(
            self.loop.version, start, self.clock.now, accepted, agg_seconds, staleness, since
        )
        self.recorder.event(
            ServerStepEvent(self.loop.version, [a.task_id for a in step.arrivals], staleness, lr)
        )
        self._conclude(record)
        self._offer_again()

    def _conclude(self, record: RoundRecord) -> None:
        """After a server step: evaluate when due, write the step's record and report it."""
        evaluation = None
        version = self.loop.version
        if version % self.exp.settings.eval_every == 0 or self._done():
            evaluation = self._evaluate(version)
            self.loop.last_evaluated = version
            if evaluation is not None:
                record.metric, record.eval_loss = evaluation.metric, evaluation.loss
        self.recorder.round(record)
        if self.on_round is not None:
            self.on_round(record, evaluation)

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

    def _stalled(self) -> bool:
        """Whether the run cannot make progress: every device's last :data:`STALL_TASKS_PER_DEVICE`
        tasks ended without an update, and none arrived since; the reason goes into the state."""
        counts = self.loop.fruitless
        if len(counts) < len(self.exp.devices) or min(counts.values()) < STALL_TASKS_PER_DEVICE:
            return False
        self.state.stalled = (
            f"every device ended at least {STALL_TASKS_PER_DEVICE} tasks in a row without an update "
            f"(rejected, lost or out of memory; {sum(counts.values())} tasks)"
        )
        return True

    def _finish(self) -> None:
        """Cancel what is still running, count what was never applied, evaluate the final model."""
        for task in sorted(self.loop.running.values(), key=lambda t: t.task_id):
            task.outcome.status = TaskStatus.CANCELLED
            task.outcome.lost_seconds = max(0.0, self.clock.now - task.start)
            task.outcome.update = None
            self.ledger.task(task.version, task.start, task.outcome, task_id=task.task_id)
        self.loop.running.clear()
        self.state.updates = {
            "dispatched": self.loop.dispatched,
            "applied": self.loop.applied,
            "unapplied_at_end": len(self.loop.arrived),
        }
        if self.loop.last_evaluated != self.loop.version or not self.state.evaluations:
            self._evaluate(self.loop.version)
        wall = time.perf_counter()
        self.state.personal = self._personalize()
        self.state.eval_wall_seconds += time.perf_counter() - wall

    def _personalize(self) -> dict[str, Any] | None:
        """In simulation, every device's personal model, built and evaluated beside the global one (the
        summary's ``personal`` part); None when the devices hold no data out, or when they build theirs
        as they receive their final model (a deployment: :meth:`hand_out`)."""
        exp = self.exp
        if not exp.local_tests or (
            exp.settings.personalize.method != "none" and self.transport.devices_personalize
        ):
            return None
        exp.executor.load_global(exp.strategy.global_lora())
        global_models = self.device_evaluations(self.loop.version).evaluations
        return personalize(exp, global_models, self.state, self.recorder)

    def hand_out(self, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Give every device its final model (``manifest``: the run's device models) through the
        transport; what each device reports about it. Where the devices build their personal models
        themselves, their reports become the summary's ``personal`` part."""
        reports = self.transport.hand_out(self.loop.version, self.base_delta, manifest)
        if self.transport.devices_personalize and self.exp.settings.personalize.method != "none":
            self.state.personal = from_devices(self.exp, self.state, self.recorder, reports)
        return reports

    def _device_weight(self, device_id: int) -> float:
        if self.exp.strategy.weighting == "samples":
            return float(self.exp.train_examples(device_id))
        return 1.0

    # --- tasks -----------------------------------------------------------------------------------

    def _prepare(
        self, round_no: int, device: Device, steps: int | None = None, task_key: int | None = None
    ) -> TaskOutcome:
        """Draw the batches, check memory, then get the starting adapter and count the downlink.

        ``round_no`` is the round (or the global version being built) the strategy sees;
        ``task_key`` (default: ``round_no``) keys the task's batches and random draws, so an
        asynchronous engine gives each of a device's tasks its own; ``steps`` defaults to
        ``train.local_steps``.
        """
        exp = self.exp
        key = round_no if task_key is None else task_key
        assignment = exp.strategy.assign(round_no, device.device_id, self.device_lora[device.device_id])
        lora = assignment.lora
        steps = steps or exp.settings.local_steps
        prepared = exp.executor.prepare(key, device, lora, steps, assignment.plan)
        outcome = TaskOutcome(device, TaskStatus.OK, 0, prepared=prepared)
        if not self.transport.fits(device, prepared.workload.peak_memory_bytes):
            outcome.status = TaskStatus.OOM  # never dispatched: nothing is downloaded or trained
            return outcome
        generator = torch.Generator().manual_seed(task_seed(self.seed, key, device.device_id, 2))
        dispatch = exp.strategy.configure(round_no, device.device_id, lora, generator)
        clusters = exp.clusters.sent(assignment.plan, exp.shape) if exp.clusters is not None else None
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
            channel_means=None if assignment.plan is None else exp.strategy.channel_means(),
            clusters=clusters,
        )
        outcome.downlink_bytes = outcome.task.downlink_bytes
        if clusters is not None:
            outcome.extra["cluster_downlink_bytes"] = cluster_bytes
        return outcome

    def _mates(self, cohort: OpenRound, first: TaskOutcome) -> list[RunningTask]:
        """The tasks of ``first``'s round to train in one batch with it (``first`` is the round's next
        arrival): those that will be aggregated unless an update is rejected — still out, not lost,
        within the deadline, the earliest arrivals up to the round's k. A later one, admitted after a
        rejection, trains alone when it arrives, as it would one by one."""
        deadline = self._rounds.deadline_seconds
        waiting = sorted(
            (
                task
                for task in (self.loop.running[t] for t in cohort.out if t in self.loop.running)
                if task.outcome is not first
                and task.outcome.status == TaskStatus.OK
                and task.outcome.update is None
                and task.outcome.lost_seconds is None
                and (deadline <= 0 or task.outcome.arrival_seconds <= deadline)
            ),
            key=lambda task: (task.outcome.arrival_seconds, task.outcome.device.device_id),
        )
        places = self._rounds.clients_per_round - len(cohort.arrivals)
        return waiting[: max(places, 1) - 1]

    def _receive(self, outcome: TaskOutcome) -> None:
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
        aggregate(self.exp.strategy, updates, self.exp.settings.aggregation_fan_in)
        clusters = self.exp.clusters
        if clusters is not None:
            weights = [self.exp.strategy.weight_of(u) for u in updates]
            clusters.aggregate(updates, weights, self.exp.shape)
        delta = self.exp.strategy.take_base_delta()
        if delta:
            self._merge_base(delta)
        wall = time.perf_counter() - wall
        self.state.aggregation_wall_seconds += wall
        seconds = self.transport.aggregation_seconds(nbytes, wall) if updates else 0.0
        self.recorder.event(AggregationEvent(round_no, start, start + seconds, seconds, len(updates), nbytes))
        return seconds

    def _robust(self, accepted: list[TaskOutcome]) -> list[ClientUpdate]:
        """The accepted updates after the configured robust rule (``server.robust``)."""
        server = self.exp.settings.server
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
