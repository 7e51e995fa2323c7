"""How a scheduler's tasks become server steps: the part of the event loop that differs between
synchronous rounds (:class:`~fedspine.runtime.rounds.Rounds`) and asynchronous server steps
(:class:`~fedspine.runtime.steps.Steps`).

The engine owns the event queue, the stopping rules and checkpoints, and hands each task event to its
run's regime; a regime decides what the task's end means and takes the server steps it leads to
through the :class:`~fedspine.runtime.server.Server`. A regime keeps no state of its own: everything
it changes lives in the run's :class:`~fedspine.runtime.state.LoopState`, which checkpoints save.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from fedspine.algorithms.schedulers import Cohort, Scheduler, ServerStep, TaskOrder
from fedspine.metrics.records import RoundRecord
from fedspine.runtime.experiment import Experiment
from fedspine.runtime.ledger import Ledger
from fedspine.runtime.server import Server
from fedspine.runtime.state import LoopState
from fedspine.runtime.tasks import Ended, Online, RunningTask
from fedspine.runtime.transport import Transport
from fedspine.sim.clock import VirtualClock

Conclude = Callable[[RoundRecord], None]
"""What the engine does after every server step (evaluate when due, write and report its record)."""


class Regime(ABC):
    """The run's tasks and server steps for one kind of scheduler; the shared parts here."""

    def __init__(
        self,
        exp: Experiment,
        transport: Transport,
        server: Server,
        clock: VirtualClock,
        conclude: Conclude,
    ) -> None:
        self.exp = exp
        self.transport = transport
        self.server = server
        self.clock = clock
        self.conclude = conclude
        self._loop: LoopState | None = None
        self._ledger: Ledger | None = None

    def bind(self, loop: LoopState, ledger: Ledger) -> None:
        """The loop state and ledger the regime writes into (again after a restore replaced them)."""
        self._loop, self._ledger = loop, ledger

    @property
    def loop(self) -> LoopState:
        assert self._loop is not None, "the event loop has not started"
        return self._loop

    @property
    def ledger(self) -> Ledger:
        assert self._ledger is not None, "the event loop has not started"
        return self._ledger

    @property
    def scheduler(self) -> Scheduler:
        scheduler: Scheduler = self.exp.scheduler
        return scheduler

    # --- what differs ----------------------------------------------------------------------------

    @abstractmethod
    def open(self, order: Cohort) -> None:
        """A cohort's turn came (synchronous rounds)."""

    @abstractmethod
    def start(self, order: TaskOrder) -> None:
        """Give one device a task now (asynchronous schedulers)."""

    @abstractmethod
    def arrive(self, task: RunningTask) -> list[ServerStep]:
        """A task's reply reached the server (with an update, or without one when the server's checks
        rejected it or a deployed device failed); the server steps the scheduler asks for."""

    @abstractmethod
    def lost(self, task: RunningTask) -> list[ServerStep]:
        """A task's device went offline before its update was in."""

    @abstractmethod
    def apply(self, step: ServerStep) -> None:
        """Take a server step the scheduler asked for."""

    def fill(self) -> None:  # noqa: B027 (schedulers that fill keep devices busy)
        """Hand out the tasks that keep the scheduler's ``concurrency`` devices busy."""

    def clock_follows_events(self) -> bool:
        """Whether the clock moves to each event's time (False while a round is open: its close sets
        the clock)."""
        return True

    # --- shared ----------------------------------------------------------------------------------

    def queue(self, ended: list[Ended]) -> None:
        for at, event in ended:
            self.loop.queue.push(at, event)

    def take_off(self, task: RunningTask) -> None:
        """``task`` is no longer running."""
        del self.loop.running[task.task_id]
        self.loop.busy.discard(task.outcome.device.device_id)

    def count(self, key: str, amount: float = 1) -> None:
        """Add to the counts the next server step's record carries."""
        self.loop.since[key] = self.loop.since.get(key, 0) + amount

    def go_offline(self, device: int) -> None:
        self.loop.offline.add(device)
        back = self.exp.trace.next_change(device, self.clock.now)
        if back != float("inf"):
            self.loop.queue.push(back, Online(device))

    def offer_again(self, failed: bool = True) -> None:
        """Offer work again to the devices that declined (and, with ``failed``, to those whose task did
        not fit in memory)."""
        waiting = self.loop.declined | self.loop.failed if failed else set(self.loop.declined)
        self.loop.declined -= waiting
        self.loop.failed -= waiting
        for device in sorted(waiting):
            self.scheduler.on_available(self.clock.now, device)
