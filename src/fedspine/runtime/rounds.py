"""Synchronous rounds on the event loop: the :class:`~fedspine.algorithms.schedulers.Cohort` orders of
a :class:`~fedspine.algorithms.schedulers.SyncScheduler`.

A round samples the reachable devices, configures every task, launches them and takes their arrivals
in time order. An arrival after the deadline, or after the k-th valid one, cannot be among the
aggregated updates: it is ``late``, and the simulated transport never trains it (its work is lost in
the fleet; the result is identical). When every task of the cohort has ended, the scheduler's plan
says which arrivals count; they are aggregated as they are (they all started from the current
version), the round's tasks are recorded in selection order, and the clock moves to the round's
close plus aggregation. The open round is the loop state's :class:`~fedspine.runtime.state.OpenRound`.
"""

from __future__ import annotations

import random

from fedspine.algorithms.schedulers import Cohort, ServerStep, SyncScheduler, TaskOrder
from fedspine.runtime.executor import task_seed
from fedspine.runtime.ledger import Ledger
from fedspine.runtime.regime import Regime
from fedspine.runtime.state import OpenRound
from fedspine.runtime.tasks import RunningTask, TaskOutcome
from fedspine.types import TaskResult, TaskStatus


class Rounds(Regime):
    """One cohort at a time; its close is the round's server step."""

    @property
    def rounds(self) -> SyncScheduler:
        scheduler = self.exp.scheduler
        assert isinstance(scheduler, SyncScheduler), "only synchronous schedulers order cohorts"
        return scheduler

    def clock_follows_events(self) -> bool:
        return self.loop.round is None

    def open(self, order: Cohort) -> None:
        """Sample the round's cohort, prepare every task, and launch the ones that fit in memory.

        Tasks are launched in the order of their arrivals (known in simulation) and trained only when
        they arrive in time to count (:meth:`SyncScheduler.admits`): the base cannot change while the
        round is open.
        """
        exp, loop, round_no = self.exp, self.loop, order.round
        self.clock.advance_to(self.transport.present(self.clock.now))  # a wall clock ran on
        start = self.clock.now
        online = self.transport.reachable(round_no, start)
        selected = self.rounds.select(online, random.Random(task_seed(self.server.seed, round_no)))
        self.server.dispatcher.begin_round(round_no, selected)
        outcomes = [self.server.prepare(round_no, exp.devices[d]) for d in selected]
        cohort = loop.round = OpenRound(round_no, start, outcomes)
        runnable = [o for o in outcomes if o.status == TaskStatus.OK]
        loop.dispatched += len(outcomes) - len(runnable)  # out of memory: never sent
        for o in runnable:
            task = RunningTask(loop.dispatched, o, round_no - 1, start, self.rounds.deadline_seconds)
            loop.dispatched += 1
            loop.running[task.task_id] = task
            cohort.out.add(task.task_id)
            self.queue(self.transport.launch(task, self.server.base_delta, train_now=False))
        if not cohort.out:
            self._close(cohort)

    def start(self, order: TaskOrder) -> None:
        raise RuntimeError("a synchronous scheduler orders cohorts, not single tasks")

    def arrive(self, task: RunningTask) -> list[ServerStep]:
        o, cohort = task.outcome, self._cohort(task)
        if o.status == TaskStatus.OK:
            if self.rounds.admits(o.arrival_seconds, cohort.arrivals):
                self.transport.deliver(task, self._mates(cohort, o))
                self.server.receive(o)
                if o.status == TaskStatus.OK:
                    cohort.arrivals.append(o.arrival_seconds)
            else:
                o.status = TaskStatus.LATE
        self._end(cohort, task)
        return []

    def lost(self, task: RunningTask) -> list[ServerStep]:
        self._end(self._cohort(task), task)  # a round samples among the devices online at its start
        return []

    def apply(self, step: ServerStep) -> None:
        raise RuntimeError("a synchronous round's server step is its close")

    def _cohort(self, task: RunningTask) -> OpenRound:
        self.take_off(task)
        cohort = self.loop.round
        assert cohort is not None and task.task_id in cohort.out, f"task {task.task_id} is in no open round"
        return cohort

    def _end(self, cohort: OpenRound, task: RunningTask) -> None:
        cohort.out.discard(task.task_id)
        if not cohort.out:
            self._close(cohort)

    def _close(self, cohort: OpenRound) -> None:
        """Every task of the round has ended: keep the arrivals the plan keeps and take the server step."""
        loop, round_no, start, outcomes = self.loop, cohort.round, cohort.start, cohort.outcomes
        loop.round = None
        arrivals = {o.device.device_id: o.arrival_seconds for o in outcomes if o.status == TaskStatus.OK}
        plan = self.rounds.plan(arrivals, launched=len(outcomes))
        for o in outcomes:
            if o.status == TaskStatus.OK and o.device.device_id in plan.late:
                o.status = TaskStatus.LATE
        accepted = [o for d in plan.accepted for o in outcomes if o.device.device_id == d]
        for o in outcomes:
            self.ledger.task(round_no, start, o)
        results = [
            TaskResult(o.device.device_id, o.status, o.arrival_seconds, o.update, o.compute_seconds)
            for o in outcomes
        ]
        self.server.dispatcher.end_round(round_no, results, self.rounds.deadline_seconds)
        agg_seconds = self.server.aggregate(round_no, start + plan.close_seconds, accepted)
        self.clock.advance_to(start + plan.close_seconds + agg_seconds)
        loop.version += 1
        loop.applied += len(accepted)
        loop.last_aggregation_end = self.clock.now
        self.conclude(Ledger.round_record(round_no, start, self.clock.now, outcomes, accepted, agg_seconds))

    def _mates(self, cohort: OpenRound, first: TaskOutcome) -> list[RunningTask]:
        """The tasks of ``first``'s round to train in one batch with it (``first`` is the round's next
        arrival): those that will be aggregated unless an update is rejected — still out, not lost,
        within the deadline, the earliest arrivals up to the round's capacity. A later one, admitted after a
        rejection, trains alone when it arrives, as it would one by one."""
        deadline, running = self.rounds.deadline_seconds, self.loop.running
        waiting = sorted(
            (
                task
                for task in (running[t] for t in cohort.out if t in running)
                if task.outcome is not first
                and task.outcome.status == TaskStatus.OK
                and task.outcome.update is None
                and task.outcome.lost_seconds is None
                and (deadline <= 0 or task.outcome.arrival_seconds <= deadline)
            ),
            key=lambda task: (task.outcome.arrival_seconds, task.outcome.device.device_id),
        )
        places = self.rounds.capacity - len(cohort.arrivals)
        return waiting[: max(places, 1) - 1]
