"""How a task reaches its device and its update comes back: the engine's variable part besides the
scheduler.

The engine (synchronous rounds and asynchronous schedulers alike) hands every task to a
:class:`Transport` and takes back its end as soon as the transport knows it (the simulated fleet
knows it when it launches the task; a deployment learns it from :meth:`Transport.poll`): an
:class:`~fedspine.runtime.tasks.Arrive` when its reply is in (with an update, or without one when the
device failed), a :class:`~fedspine.runtime.tasks.Lost` when its device went offline first. A transport
receives plain values only (tasks, the base change, the version) and never reaches back into the
engine: the engine checks every update that arrives, whoever carried it.
:class:`~fedspine.runtime.simulated.SimulatedTransport` is the simulated fleet (the cost model's times
on a virtual clock, training on the host); a deployment's is ``fedspine.deploy.server.FlowerTransport``
(Flower messages, the wall clock).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from fedspine.runtime.tasks import Ended, RunningTask
from fedspine.types import Device

if TYPE_CHECKING:
    from fedspine.client.evaluate import Evaluation

Admission = Literal["ok", "offline", "declined"]
"""Whether a device takes a task offered now: it does, it is offline, or it declines this offer."""

BaseDelta = Mapping[str, torch.Tensor]
"""Everything merged into the base weights so far (FLoRA, FedSpine): what a device that keeps nothing
between tasks receives with each."""


@dataclass
class DeviceEvaluations:
    """A federated evaluation's answers: device id -> its evaluation, and the devices that gave none
    (device id -> why)."""

    evaluations: dict[int, Evaluation] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)


class Transport(Protocol):
    """Carries the engine's tasks to their devices and reports their ends."""

    devices_personalize: bool
    """Whether the devices build their personal models (``[personalize]``) themselves when they
    receive their final model (:meth:`hand_out`), and report them; else the engine builds them."""

    def reachable(self, round_no: int, start: float) -> list[int]:
        """The devices a synchronous round starting at ``start`` may sample."""
        ...

    def admit(self, device: Device, offer: int, now: float) -> Admission:
        """Whether ``device`` takes its ``offer``-th task at ``now``."""
        ...

    def fits(self, device: Device, peak_memory_bytes: int) -> bool:
        """Whether a task needing ``peak_memory_bytes`` fits in ``device``'s memory (else it is never
        sent: ``oom``)."""
        ...

    def launch(self, task: RunningTask, base_delta: BaseDelta, train_now: bool) -> list[Ended]:
        """Start ``task``; the ends known now (its own, in simulation), else its end comes back through
        :meth:`flush` or :meth:`poll`.

        ``train_now`` False lets a transport that trains on the host put that off until
        :meth:`deliver` (a synchronous round: the base cannot change before the task arrives, and a
        task that arrives too late to count is never trained).
        """
        ...

    def deliver(self, task: RunningTask, mates: Sequence[RunningTask]) -> None:
        """The engine takes ``task``'s arrival: its update must be there now. ``mates``: the other tasks
        of its round that will count unless an update is rejected (a transport that trains on the host
        may train them with it, in one batch)."""
        ...

    def flush(self) -> list[Ended]:
        """Every task of this instant has been launched: send them (together, where that is cheaper);
        the ends known now."""
        ...

    def poll(self) -> tuple[list[Ended], bool]:
        """The tasks that have ended since the last call, and whether tasks are out that only this
        transport can bring back."""
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

    def aggregation_seconds(self, nbytes: int, wall_seconds: float) -> float:
        """The time a server step's aggregation takes on the run's clock."""
        ...

    def evaluate_devices(self, version: int, base_delta: BaseDelta) -> DeviceEvaluations:
        """Federated evaluation of global ``version`` (loaded in the run's executor): each device that
        answers evaluates it, at its own plan, on its held-out data."""
        ...

    def hand_out(
        self, version: int, base_delta: BaseDelta, manifest: dict[str, Any]
    ) -> dict[int, dict[str, object]]:
        """Give every device its final model (``manifest``: the run's device models); what each device
        reports about the copy it now holds (device id -> report), or nothing where the run
        directory's models are the devices' own."""
        ...
