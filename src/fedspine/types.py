"""Plain value types shared by every layer: devices, links, workloads, client tasks and updates.

Tensors are typed as ``Any`` here so that this module (and the torch-free layers that import it)
never imports torch; the algorithm layers hold ``torch.Tensor`` values in those fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class TaskStatus(str, Enum):
    """How a client task ended. A ``str``: records and counters hold the plain value (``"ok"``)."""

    OK = "ok"
    """Its update arrived in time and passed the server's checks."""
    LATE = "late"
    """It missed the round's deadline (synchronous rounds); its work is wasted."""
    OOM = "oom"
    """The device cannot hold the task's model: never dispatched."""
    DROPPED = "dropped"
    """Lost: the device went offline, failed, or did not reply in time (deployments)."""
    CANCELLED = "cancelled"
    """Still running when the run ended (asynchronous schedulers)."""
    REJECTED = "rejected"
    """Arrived, but failed the server's checks (non-finite, too large, malformed)."""

    __str__ = str.__str__  # "ok", not "TaskStatus.OK", wherever it is formatted or written


# A LoRA state: module name -> {"A": tensor (r, in), "B": tensor (out, r)} plus scaling per module.
LoraState = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class DeviceClass:
    """A kind of hardware, with effective figures taken from published measurements.

    Attributes:
        name: catalog key, e.g. ``"jetson_orin_nano"``.
        description: human-readable name of the hardware.
        peak_flops: peak dense FLOP/s in the precision training runs in.
        mfu: model-FLOPs utilisation reachable in training (fraction of ``peak_flops``).
        memory_bandwidth: sustained memory bandwidth, bytes/s.
        memory_bytes: memory available to the training process, bytes.
        train_dtype_bytes: bytes per weight/activation element while training (2 = fp16/bf16).
        slowdown_sigma: sigma of the per-round lognormal slowdown (thermal throttling, background load).
        source: where the figures come from.
    """

    name: str
    description: str
    peak_flops: float
    mfu: float
    memory_bandwidth: float
    memory_bytes: int
    train_dtype_bytes: int
    slowdown_sigma: float
    source: str


@dataclass(frozen=True)
class NetworkProfile:
    """An application-level link between a device and the server.

    Attributes:
        name: preset key, e.g. ``"wifi"``.
        uplink_bps: effective uplink throughput, bits/s.
        downlink_bps: effective downlink throughput, bits/s.
        rtt_seconds: round-trip time, seconds.
        handshakes: round trips paid per transfer before data flows.
        rate_jitter: each transfer's rate is multiplied by U(1 - rate_jitter, 1 + rate_jitter).
    """

    name: str
    uplink_bps: float
    downlink_bps: float
    rtt_seconds: float
    handshakes: float
    rate_jitter: float


@dataclass(frozen=True)
class Device:
    """One member of the simulated fleet."""

    device_id: int
    device_class: DeviceClass
    network: NetworkProfile
    availability: float
    """Probability that the device is online when a round samples clients."""


@dataclass(frozen=True)
class TrainWorkload:
    """What one local training task costs on a device, derived from the model it actually trains.

    Attributes:
        flops: floating-point operations of all local steps (forward + backward).
        bytes_moved: bytes read/written from memory over all steps (roofline memory term).
        peak_memory_bytes: peak memory the task needs on the device.
        tokens: tokens processed (for records).
    """

    flops: float
    bytes_moved: float
    peak_memory_bytes: int
    tokens: int


@dataclass(frozen=True)
class DeviceLora:
    """A device's LoRA configuration: its rank and its scaling ``alpha / rank``."""

    rank: int
    scaling: float

    @property
    def alpha(self) -> float:
        """LoRA alpha (``scaling * rank``)."""
        return self.scaling * self.rank


@dataclass
class ClientTask:
    """What the server asks one device to do in one round."""

    round: int
    device_id: int
    local_steps: int
    lora: DeviceLora
    payload: LoraState
    """Global LoRA state the device starts from (what travels on the downlink)."""
    downlink_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)
    plan: Any = None
    """Pruning plan of the submodel the device trains (``fedspine.model.pruning.PruningPlan``), or None."""
    pruning_ratio: float = 0.0
    """Fraction of KV groups and MLP channels removed from every pruned layer."""
    channel_means: Any = None
    """Per layer, the mean input of every MLP channel (full coordinates) when pruning keeps a removed
    channel's mean output as a bias (FedSpine's ``compensate``); None: plain pruning."""
    clusters: list[LoraState] | None = None
    """The cluster adapters the device chooses among (``personalize.method = "clustered"``), in its
    submodel's coordinates; they travel on the downlink. None: no clusters."""


@dataclass
class ClientUpdate:
    """What one device sends back after local training."""

    round: int
    device_id: int
    num_samples: int
    lora_state: LoraState
    uplink_bytes: int
    train_loss: float
    tokens: int
    host_train_seconds: float
    """Host wall time of the real training (not virtual time)."""
    lora_rank: int = 0
    """Rank of the uploaded adapter (may be below the task's rank after HetLoRA self-pruning)."""
    lora_scaling: float = 1.0
    """The device's alpha / rank: the update is ``lora_scaling * B @ A``."""
    metrics: dict[str, float] = field(default_factory=dict)
    plan: Any = None
    """The pruning plan the factors were trained under; ``lora_state`` is in its pruned coordinates."""
    importance: Any = None
    """Per-unit importance observed on the device: ``{"heads": [(kv_heads,)], "channels": [(inter,)]}``
    per layer, in full coordinates (zero where pruned), or None."""
    probe_loss: float | None = None
    """Loss of the trained (sub)model on a held-out local batch it did not train on in this task, when
    measured (pruning strategies: the quality their policy learns from)."""
    wire: dict[str, Any] | None = None
    """The compressed payload tensors that travel instead of ``lora_state`` (None: uncompressed);
    ``lora_state`` then holds what the server reconstructs from them."""
    cluster: int | None = None
    """The cluster adapter the device chose (lowest loss on its data) and trained (``clustered``)."""
    cluster_state: LoraState | None = None
    """That adapter after training, in the task's coordinates (it travels, uncompressed)."""


@dataclass
class TaskResult:
    """What the server saw of one task: how it ended, when (seconds), and the update if it arrived.

    Given to the strategy at the end of a round or on each arrival (the FedSpine policy learns from it).
    """

    device_id: int
    status: TaskStatus
    seconds: float
    update: ClientUpdate | None
    compute_seconds: float | None = None
    """The part of ``seconds`` the device spent training, as it measured it (None: not reported)."""
