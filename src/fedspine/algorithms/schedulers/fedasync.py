"""FedAsync (Xie et al., 2019) and FedBuff (Nguyen et al., 2022): asynchronous aggregation.

Both keep ``concurrency`` devices training; a device that reports gets a new task at once, from the
current global model.

* FedAsync applies every update as it arrives: ``w <- w + alpha s(tau) delta``, the delta form of the
  paper's mixing ``w <- (1 - alpha_t) w + alpha_t w_new`` (the two agree when the update is fresh; for
  a stale one, mixing would also pull ``w`` back towards the old version it started from).
* FedBuff buffers updates until ``K`` have arrived, then takes one server step
  ``w <- w + eta (beta m + sum_j p_j s(tau_j) delta_j)`` (server learning rate ``eta``, momentum
  ``beta``; ``p_j`` the buffer's weights).
"""

from __future__ import annotations

from fedspine.algorithms.schedulers.base import (
    SCHEDULERS,
    Arrival,
    Limits,
    Scheduler,
    ServerStep,
)


@SCHEDULERS.register("fedasync")
class FedAsync(Scheduler):
    """Apply each update on arrival with mixing weight ``alpha`` (times the staleness scale)."""

    name = "fedasync"

    def __init__(self, limits: Limits, alpha: float = 0.6) -> None:
        super().__init__(limits)
        self.alpha = alpha

    def on_arrival(self, now: float, arrival: Arrival) -> list[ServerStep]:
        return [ServerStep((arrival,), lr=self.alpha)]


@SCHEDULERS.register("fedbuff")
class FedBuff(Scheduler):
    """Aggregate every ``buffer_size`` arrivals with a server learning rate and momentum."""

    name = "fedbuff"

    def __init__(
        self,
        limits: Limits,
        buffer_size: int = 4,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
    ) -> None:
        super().__init__(limits)
        self.buffer_size = buffer_size
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self._buffer: list[Arrival] = []

    def on_arrival(self, now: float, arrival: Arrival) -> list[ServerStep]:
        self._buffer.append(arrival)
        if len(self._buffer) < self.buffer_size:
            return []
        step = ServerStep(tuple(self._buffer), lr=self.server_lr, momentum=self.server_momentum)
        self._buffer = []
        return [step]

    def pending(self) -> list[Arrival]:
        return list(self._buffer)
