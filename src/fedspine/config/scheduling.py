"""Who trains when and what reaches the server: ``[scheduler]``, ``[compression]``, ``[server]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedspine.config.limits import MAX_DEVICES, MAX_MULTIPLIER, MAX_SECONDS, MAX_STEPS, _at_most, _check


@dataclass(frozen=True)
class StalenessSection:
    """How asynchronous schedulers treat stale updates (see `fedspine.algorithms.staleness`)."""

    handler: Literal["weight", "identity", "dcasgd"] = "weight"
    """Scale a stale update by s(staleness), apply it as is, or DC-ASGD-compensate it (global adapters)."""
    function: Literal["polynomial", "constant", "hinge"] = "polynomial"
    """s(tau): (tau + 1)^-a, 1, or 1 up to b then 1 / (a (tau - b) + 1)."""
    a: float = 0.5
    """Exponent (polynomial) or slope (hinge) of s."""
    b: float = 4.0
    """Hinge point of s, in aggregations."""
    dcasgd_lambda: float = 4.0
    """DC-ASGD's variance-control factor lambda."""

    def __post_init__(self) -> None:
        _check(self.a >= 0, "scheduler.staleness.a", "must be >= 0")
        _at_most(self.a, MAX_MULTIPLIER, "scheduler.staleness.a", "larger values overflow the weight")
        _check(self.b >= 0, "scheduler.staleness.b", "must be >= 0")
        _at_most(self.b, MAX_MULTIPLIER, "scheduler.staleness.b", "larger values overflow the weight")
        _check(self.dcasgd_lambda >= 0, "scheduler.staleness.dcasgd_lambda", "must be >= 0")
        _at_most(
            self.dcasgd_lambda,
            MAX_MULTIPLIER,
            "scheduler.staleness.dcasgd_lambda",
            "larger values overflow the weight",
        )


@dataclass(frozen=True)
class FedAsyncSection:
    """FedAsync: every update is applied on arrival."""

    alpha: float = 0.6
    """Mixing weight: w <- w + alpha s(tau) delta."""

    def __post_init__(self) -> None:
        _check(0 < self.alpha <= 1, "scheduler.fedasync.alpha", "must be in (0, 1]")


@dataclass(frozen=True)
class FedBuffSection:
    """FedBuff: aggregate every K arrivals with a server optimizer step."""

    buffer_size: int = 4
    """K, updates per server step."""
    server_lr: float = 1.0
    """Server learning rate eta."""
    server_momentum: float = 0.0
    """Server momentum beta (needs a strategy with a global adapter: fedit, zeropad, hetlora)."""

    def __post_init__(self) -> None:
        _check(self.buffer_size >= 1, "scheduler.fedbuff.buffer_size", "must be >= 1")
        _at_most(self.buffer_size, MAX_DEVICES, "scheduler.fedbuff.buffer_size", "more than a fleet holds")
        _check(self.server_lr > 0, "scheduler.fedbuff.server_lr", "must be > 0")
        _at_most(
            self.server_lr, 10, "scheduler.fedbuff.server_lr", "a larger server step overflows the adapter"
        )
        _check(0 <= self.server_momentum < 1, "scheduler.fedbuff.server_momentum", "must be in [0, 1)")


@dataclass(frozen=True)
class FedCompassSection:
    """FedCompass: per-device local steps in [q_min, q_max] so that devices arrive in groups."""

    q_min: int = 2
    """Fewest local optimizer steps a device is given."""
    q_max: int = 8
    """Most local optimizer steps a device is given (also the first task of every device)."""
    latest_time_factor: float = 1.5
    """lambda: a group is aggregated at the latest lambda x its expected duration after it formed."""
    speed_momentum: float = 0.9
    """Weight of a new speed observation in the device's speed estimate."""
    alpha: float = 0.9
    """Server step: w <- w + alpha sum_j s(tau_j) (n_j / N) delta_j."""

    def __post_init__(self) -> None:
        key = "scheduler.fedcompass."
        _check(self.q_min >= 1, key + "q_min", "must be >= 1")
        _check(self.q_max >= self.q_min, key + "q_max", "must be >= q_min")
        _at_most(self.q_max, MAX_STEPS, key + "q_max", "local steps; a task that long would never end")
        _check(self.latest_time_factor >= 1, key + "latest_time_factor", "must be >= 1")
        _at_most(self.latest_time_factor, MAX_MULTIPLIER, key + "latest_time_factor", "overflows the timers")
        _check(0 < self.speed_momentum <= 1, key + "speed_momentum", "must be in (0, 1]")
        _check(0 < self.alpha <= 1, key + "alpha", "must be in (0, 1]")


@dataclass(frozen=True)
class SchedulerSection:
    """Who trains when (see `fedspine.algorithms.schedulers`)."""

    name: str = "sync"
    """Registered scheduler: sync, fedasync, fedbuff, fedcompass."""
    rounds: int = 5
    """Synchronous rounds, or aggregations (global versions) of an asynchronous scheduler."""
    clients_per_round: int = 4
    """Updates aggregated per round (0 = use clients_fraction); sync only."""
    clients_fraction: float = 0.5
    """Fraction of the fleet aggregated per round when clients_per_round = 0."""
    over_selection: float = 0.0
    """Select (1 + over_selection) x as many devices and keep the first to arrive (FedScale)."""
    deadline_seconds: float = 0.0
    """Virtual-time round deadline; updates arriving later are lost (0 = no deadline)."""
    keep: Literal["first_k", "all_in_time"] = "first_k"
    """Which in-time updates a sync round aggregates: the first ``clients_per_round`` to arrive
    (FedScale), or every one that meets ``deadline_seconds`` (so a straggler that prunes itself fast
    enough still counts; needs a deadline)."""
    concurrency: int = 0
    """Devices training at once under fedasync and fedbuff (0 = the whole fleet)."""
    max_updates: int = 0
    """Asynchronous schedulers stop after applying this many updates (0 = no limit)."""
    max_virtual_seconds: float = 0.0
    """Asynchronous schedulers stop at this virtual time (0 = no limit)."""
    staleness: StalenessSection = field(default_factory=StalenessSection)
    """Stale-update handling of the asynchronous schedulers."""
    fedasync: FedAsyncSection = field(default_factory=FedAsyncSection)
    """Parameters of fedasync."""
    fedbuff: FedBuffSection = field(default_factory=FedBuffSection)
    """Parameters of fedbuff."""
    fedcompass: FedCompassSection = field(default_factory=FedCompassSection)
    """Parameters of fedcompass."""

    @property
    def synchronous(self) -> bool:
        """Rounds with a cohort and a deadline (``sync``), not an event-driven asynchronous scheduler."""
        return self.name == "sync"

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "scheduler.rounds", "must be >= 1")
        _at_most(self.rounds, MAX_STEPS, "scheduler.rounds", "a run that long would not end")
        _check(self.clients_per_round >= 0, "scheduler.clients_per_round", "must be >= 0")
        _check(0 < self.clients_fraction <= 1, "scheduler.clients_fraction", "must be in (0, 1]")
        _check(self.over_selection >= 0, "scheduler.over_selection", "must be >= 0")
        _at_most(self.over_selection, 10, "scheduler.over_selection", "eleven times the cohort at most")
        _check(self.deadline_seconds >= 0, "scheduler.deadline_seconds", "must be >= 0")
        _at_most(self.deadline_seconds, MAX_SECONDS, "scheduler.deadline_seconds", "longer than any run")
        _check(
            self.keep == "first_k" or self.deadline_seconds > 0,
            "scheduler.keep",
            "'all_in_time' keeps the updates that meet scheduler.deadline_seconds: set a deadline",
        )
        _check(self.concurrency >= 0, "scheduler.concurrency", "must be >= 0")
        _check(self.max_updates >= 0, "scheduler.max_updates", "must be >= 0")
        _check(self.max_virtual_seconds >= 0, "scheduler.max_virtual_seconds", "must be >= 0")
        _at_most(
            self.max_virtual_seconds, MAX_SECONDS, "scheduler.max_virtual_seconds", "longer than any run"
        )


@dataclass(frozen=True)
class CompressionSection:
    """Compressed uploads (see `fedspine.algorithms.compression`): what a device sends of its change."""

    codec: Literal["none", "topk", "randk", "sign", "qsgd", "int8"] = "none"
    """none; top-k or random-k coordinates; scaled sign; QSGD with `levels` levels; int8."""
    ratio: float = 0.1
    """Fraction of coordinates kept by topk and randk."""
    levels: int = 16
    """QSGD's number of levels s."""
    feedback: Literal["none", "ef", "ef21", "econtrol"] = "none"
    """Error feedback, with state on each device across rounds."""
    eta: float = 0.2
    """EControl's feedback strength."""

    def __post_init__(self) -> None:
        _check(0 < self.ratio <= 1, "compression.ratio", "must be in (0, 1]")
        _check(1 <= self.levels <= 65535, "compression.levels", "must be in 1..65535")
        _check(0 <= self.eta <= 1, "compression.eta", "must be in [0, 1]")


@dataclass(frozen=True)
class ServerSection:
    """The aggregation server."""

    aggregation_gbps: float = 4.0
    """Server aggregation throughput in GB/s of update data (charges aggregation virtual time)."""
    aggregation_overhead_seconds: float = 0.05
    """Fixed virtual cost per aggregation (scheduling, deserialisation)."""
    max_update_norm: float = 0.0
    """Reject an update whose change (L2, all factors) exceeds this (0 = no bound). Shapes, dtypes,
    finiteness, rank and plan are always checked."""
    robust: str = "none"
    """Robust aggregation, a rule registered in :data:`~fedspine.algorithms.robust.ROBUST_RULES`
    (``none``, ``clip``, ``median``, ``trimmed_mean``): clip each update's change to ``clip_norm``, or
    replace the average by the coordinate-wise median / trimmed mean of the changes (global-adapter
    strategies, equal ranks, sync)."""
    clip_norm: float = 1.0
    """L2 bound of each update's change for ``robust = "clip"``."""
    trim_fraction: float = 0.2
    """Fraction of updates dropped at each end, per coordinate, for ``robust = "trimmed_mean"``."""

    def __post_init__(self) -> None:
        _check(
            1e-3 <= self.aggregation_gbps <= 1e6,
            "server.aggregation_gbps",
            f"must be in [0.001, 1e6] (a server's memory rate in GB/s), got {self.aggregation_gbps:g}",
        )
        _check(self.aggregation_overhead_seconds >= 0, "server.aggregation_overhead_seconds", "must be >= 0")
        _at_most(
            self.aggregation_overhead_seconds, 3600, "server.aggregation_overhead_seconds", "an hour per step"
        )
        _check(self.max_update_norm >= 0, "server.max_update_norm", "must be >= 0 (0 = no bound)")
        _check(self.clip_norm > 0, "server.clip_norm", "must be > 0")
        _check(0 <= self.trim_fraction < 0.5, "server.trim_fraction", "must be in [0, 0.5)")
