"""The engine: one event loop on the run's clock, for every scheduler and transport.

Events on the run's clock (:mod:`fedspine.runtime.tasks`): a task's arrival, a task lost when its
device goes offline, a scheduler's timer, a device coming back online, a synchronous round's cohort.
Four parts share the work:

* the **scheduler** (:mod:`fedspine.algorithms.schedulers`) turns events into server steps and
  orders;
* the **transport** (:class:`~fedspine.runtime.transport.Transport`) carries tasks to devices and
  their updates back: the simulated fleet, or Flower in a deployment;
* the run's **regime** (:mod:`fedspine.runtime.regime`) says what a task's end means: synchronous
  rounds (:class:`~fedspine.runtime.rounds.Rounds`) or asynchronous server steps
  (:class:`~fedspine.runtime.steps.Steps`);
* the **server** (:class:`~fedspine.runtime.server.Server`) configures what each device receives,
  checks what comes back, and aggregates.

The engine owns the event queue, the stopping rules, evaluation and checkpoints. A run stops after
``scheduler.rounds`` aggregations, ``max_updates`` applied updates or ``max_virtual_seconds``; tasks
still running are recorded as ``cancelled``, buffered arrivals as unapplied (the summary's
``updates`` counts dispatched, applied and unapplied updates).

Each task draws its batches and jitter from its own key (a round's number, or the device's offer
count), and events at equal times keep their insertion order, so a run is deterministic for its
seed. Everything that depends on the host's speed is kept out of the records that must be
reproducible. A checkpoint is taken between two events, after every ``run.checkpoint_every`` server
steps, with the event loop in it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from fedspine.algorithms.schedulers import Cohort, Order, Scheduler, ServerStep
from fedspine.client.evaluate import Evaluation
from fedspine.metrics.records import RoundRecord, RunRecorder
from fedspine.runtime import checkpoint as checkpoints
from fedspine.runtime.evaluation import Evaluator
from fedspine.runtime.experiment import Experiment
from fedspine.runtime.ledger import Ledger
from fedspine.runtime.personal import from_devices, personalize
from fedspine.runtime.regime import Regime
from fedspine.runtime.rounds import Rounds
from fedspine.runtime.server import Server
from fedspine.runtime.simulated import SimulatedTransport
from fedspine.runtime.state import LoopState, RunState
from fedspine.runtime.steps import Steps
from fedspine.runtime.tasks import Arrive, Ended, Event, Lost, Online, OpenCohort, Timer
from fedspine.runtime.transport import DeviceEvaluations, Transport
from fedspine.sim.clock import VirtualClock
from fedspine.types import DeviceLora, TaskStatus

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
        self.server = Server(experiment, self.transport, recorder, self.state)
        kind = Rounds if experiment.scheduler.orders_cohorts else Steps
        self.regime: Regime = kind(experiment, self.transport, self.server, self.clock, self._conclude)
        self._loop: LoopState | None = None
        """None until the run starts, or until :meth:`restore` brings back a checkpoint's."""
        self.on_round: ProgressCallback | None = None
        self._bind()

    def _bind(self) -> None:
        """The parts that write into the run's state (again after a restore replaced it)."""
        self.ledger = Ledger(self.recorder, self.state)
        self.evaluator = Evaluator(self.exp, self.transport, self.recorder, self.state)
        self.server.state = self.state
        if self._loop is not None:
            self.regime.bind(self._loop, self.ledger)

    def _evaluate(self, version: int) -> Evaluation | None:
        return self.evaluator.evaluate(version, self.clock.now, self.server.base_delta)

    def device_evaluations(self, version: int) -> DeviceEvaluations:
        """The devices' evaluations of global ``version`` (loaded in the executor) on their held-out
        data: asked of the transport once per version."""
        return self.evaluator.devices(version, self.server.base_delta)

    @property
    def device_lora(self) -> dict[int, DeviceLora]:
        """Each device's current LoRA rank and scaling (HetLoRA devices shrink theirs)."""
        return self.server.device_lora

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
            if self.regime.clock_follows_events():
                self.clock.advance_to(max(at, self.clock.now))
            self._handle(event)
            self._after_event()
            if not len(loop.queue) and not loop.running and loop.declined:
                self.regime.offer_again(failed=False)  # nothing else can happen: ask those who declined again
                self._after_event()
            self._maybe_checkpoint()
        self._finish()
        return self.state

    def _start_loop(self) -> None:
        """The initial global state, the first evaluation, and the scheduler's first orders."""
        self.server.init_global()
        self._loop = LoopState()
        self._bind()
        if self.exp.settings.eval_at_start:
            self._evaluate(0)
            self._loop.last_evaluated = 0
        self._dispatch(self.scheduler.start(0.0, [d.device_id for d in self.exp.devices]))
        self._after_event()

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
        engine = checkpoints.LoopSnapshot(
            self.clock.now,
            self.server.device_lora,
            self.state,
            self.recorder.rounds,
            self.recorder.positions(),
            self.loop,
        )
        objects = checkpoints.RunObjects.of(exp)
        base_delta = self.server.base_delta
        weights = exp.trainer.executor.base_weights(sorted(base_delta))
        snapshot = checkpoints.Snapshot(version, engine, objects, base_delta, weights)
        checkpoints.save(self.recorder.run_dir, exp, snapshot, exp.settings.keep_checkpoints)

    def restore(self, snapshot: checkpoints.Snapshot) -> None:
        """Continue from ``snapshot``: the checkpoint's objects replace the freshly built ones.

        Tasks that were out and can no longer come back (a deployment's, sent by the interrupted
        server; not those whose arrival was already queued) end now as ``dropped``, and their devices
        are offered work again.
        """
        snapshot.objects.restore(self.exp)
        self.exp.trainer.executor.set_base_weights(snapshot.base_weights)
        self.server.base_delta = dict(snapshot.base_delta)
        engine = snapshot.engine
        self.clock.advance_to(engine.clock)
        self.server.device_lora = engine.device_lora
        self.state = engine.state
        self._loop = engine.loop
        self._bind()
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
                self.regime.open(order)
            case Arrive(task):
                steps = self.regime.arrive(task)
            case Lost(task):
                steps = self.regime.lost(task)
            case Timer(key):
                steps = self.scheduler.on_timer(now, key)
            case Online(device):
                self.loop.offline.discard(device)
                self.scheduler.on_available(now, device)
        for step in steps:
            self.regime.apply(step)
            if self._done():
                break

    def _after_event(self) -> None:
        if self._done():
            return
        self._dispatch(self.scheduler.orders(self.clock.now, self.loop.version))
        self.regime.fill()
        self._queue(self.transport.flush())  # this instant's tasks are launched: send (train) them together
        for at, key in self.scheduler.take_timers():
            self.loop.queue.push(at, Timer(key))

    def _dispatch(self, orders: Sequence[Order]) -> None:
        for order in orders:
            if isinstance(order, Cohort):  # opened as an event, so a checkpoint can come before it
                self.loop.queue.push(self.clock.now, OpenCohort(order))
            else:
                self.regime.start(order)

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
        if not exp.trainer.local_tests or (
            exp.settings.personalize.method != "none" and self.transport.devices_personalize
        ):
            return None
        exp.trainer.executor.load_global(exp.strategy.global_lora())
        global_models = self.device_evaluations(self.loop.version).evaluations
        return personalize(exp, global_models, self.state, self.recorder)

    def hand_out(self, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Give every device its final model (``manifest``: the run's device models) through the
        transport; what each device reports about it. Where the devices build their personal models
        themselves, their reports become the summary's ``personal`` part."""
        reports = self.transport.hand_out(self.loop.version, self.server.base_delta, manifest)
        if self.transport.devices_personalize and self.exp.settings.personalize.method != "none":
            self.state.personal = from_devices(self.exp, self.state, self.recorder, reports)
        return reports
