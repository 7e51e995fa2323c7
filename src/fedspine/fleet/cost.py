"""The cost model: pure functions from (workload, device class, link) to virtual seconds.

Compute time is a roofline (``algorithms.md`` §10.3): the larger of the compute-bound time at the
class's effective throughput (``mfu * peak_flops``) and the memory-bound time at its bandwidth.
Transfer time is ``handshakes * rtt + bits / rate`` (§10.1). Random per-round factors (slowdown, link
rate) come from :mod:`fedspine.fleet.jitter` and are passed in, so this module stays deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedspine.types import Device, DeviceClass, NetworkProfile, TrainWorkload

Direction = Literal["up", "down"]


@dataclass(frozen=True)
class CostModel:
    """Virtual-time costs of one device class on one link.

    Attributes:
        device_class: the hardware that trains.
        network: the link between the device and the server.
    """

    device_class: DeviceClass
    network: NetworkProfile

    @classmethod
    def for_device(cls, device: Device) -> CostModel:
        """The cost model of one fleet member."""
        return cls(device.device_class, device.network)

    @property
    def effective_flops(self) -> float:
        """FLOP/s reachable in training: ``mfu * peak_flops``."""
        return self.device_class.mfu * self.device_class.peak_flops

    def train_seconds(self, workload: TrainWorkload, slowdown: float = 1.0) -> float:
        """Seconds of local training, roofline of compute and memory time.

        Args:
            workload: FLOPs and bytes moved of the whole local task.
            slowdown: per-round multiplier (thermal throttling, background load); 1.0 = nominal.

        Returns:
            ``max(flops / effective_flops, bytes_moved / memory_bandwidth) * slowdown``.

        Raises:
            ValueError: ``slowdown`` is not positive.
        """
        if slowdown <= 0:
            raise ValueError(f"slowdown must be > 0, got {slowdown}")
        compute_s = workload.flops / self.effective_flops
        memory_s = workload.bytes_moved / self.device_class.memory_bandwidth
        return max(compute_s, memory_s) * slowdown

    def transfer_seconds(self, nbytes: int, direction: Direction, rate_factor: float = 1.0) -> float:
        """Seconds to move ``nbytes`` over the link; 0 bytes means no transfer and 0 seconds.

        Args:
            nbytes: payload size in bytes.
            direction: ``"up"`` (device to server) or ``"down"`` (server to device).
            rate_factor: multiplier of the link rate this transfer sees (e.g. U(0.8, 1.2) jitter).

        Returns:
            ``handshakes * rtt + nbytes * 8 / (rate * rate_factor)``.

        Raises:
            ValueError: negative ``nbytes``, non-positive ``rate_factor`` or unknown ``direction``.
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if rate_factor <= 0:
            raise ValueError(f"rate_factor must be > 0, got {rate_factor}")
        rate_bps = self.link_bps(direction) * rate_factor
        if nbytes == 0:
            return 0.0
        return self.network.handshakes * self.network.rtt_seconds + nbytes * 8 / rate_bps

    def link_bps(self, direction: Direction) -> float:
        """Nominal link rate in bits/s for a direction (``"up"`` or ``"down"``)."""
        if direction == "up":
            return self.network.uplink_bps
        if direction == "down":
            return self.network.downlink_bps
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")

    def fits(self, memory_bytes: int) -> bool:
        """Whether a task needing ``memory_bytes`` at peak fits in the device's usable memory."""
        return memory_bytes <= self.device_class.memory_bytes
