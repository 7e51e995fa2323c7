"""The simulated fleet: ``[fleet]``, its device groups, availability trace and attackers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from fedspine.config.limits import MAX_DEVICES, MAX_MULTIPLIER, MAX_SECONDS, _at_most, _check


@dataclass(frozen=True)
class FleetGroup:
    """A group of identical devices."""

    device_class: str = "raspberry_pi_4"
    """Catalog name of the hardware (see `fedspine fleet`); not used when `profile` is set."""
    count: int = 1
    """Number of devices in the group."""
    network: str | dict[str, float] = "wifi"
    """A network preset name, or a mix of presets with fractions summing to 1, e.g. {wifi = 0.5, 5g = 0.5}."""
    availability: float = 1.0
    """Probability that a device of the group accepts work when sampled (per round, or per async offer)."""
    profile: str = ""
    """A device profile file (TOML, e.g. written by `fedspine calibrate`) that describes the hardware
    instead of a catalog class; a relative path is read from the working directory."""


DEFAULT_FLEET = (
    FleetGroup("raspberry_pi_4", 2, "ethernet"),
    FleetGroup("raspberry_pi_5", 2, "wifi"),
    FleetGroup("jetson_orin_nano", 2, "wifi"),
    FleetGroup("jetson_agx_orin", 1, "ethernet"),
    FleetGroup("phone_flagship", 2, "5g"),
    FleetGroup("laptop", 1, "wifi"),
)
"""The default experiment's fleet: ten devices spanning a >50x compute spread and three link kinds."""


@dataclass(frozen=True)
class AttackSection:
    """Devices that upload corrupted updates (robustness studies; off by default)."""

    kind: Literal["none", "scale", "sign_flip", "nonfinite"] = "none"
    """``scale``: change times ``factor``; ``sign_flip``: times ``-factor``; ``nonfinite``: NaN factors."""
    devices: list[int] = field(default_factory=list)
    """Ids of the attacking devices."""
    factor: float = 10.0
    """Magnitude of the scaled or sign-flipped change."""

    def __post_init__(self) -> None:
        _at_most(abs(self.factor), MAX_MULTIPLIER, "fleet.attack.factor", "larger changes overflow float32")
        for i, d in enumerate(self.devices):
            _check(d >= 0, f"fleet.attack.devices[{i}]", f"must be a device id >= 0, got {d}")


@dataclass(frozen=True)
class TraceSection:
    """When devices are online, over virtual time (see `fedspine.fleet.availability`)."""

    kind: Literal["always", "periodic", "sessions"] = "always"
    """always online; periodic charging windows; or random sessions (exponential on/off spells)."""
    period_seconds: float = 3600.0
    """Period of the charging windows (periodic)."""
    online_fraction: float = 0.5
    """Share of each period a device is online (periodic)."""
    mean_online_seconds: float = 600.0
    """Mean length of an online session (sessions)."""
    mean_offline_seconds: float = 300.0
    """Mean length of an offline spell (sessions)."""

    def __post_init__(self) -> None:
        _check(self.period_seconds > 0, "fleet.trace.period_seconds", "must be > 0")
        _at_most(self.period_seconds, MAX_SECONDS, "fleet.trace.period_seconds", "longer than any run")
        _check(0 < self.online_fraction <= 1, "fleet.trace.online_fraction", "must be in (0, 1]")
        _check(self.mean_online_seconds > 0, "fleet.trace.mean_online_seconds", "must be > 0")
        _at_most(
            self.mean_online_seconds, MAX_SECONDS, "fleet.trace.mean_online_seconds", "longer than any run"
        )
        _check(self.mean_offline_seconds > 0, "fleet.trace.mean_offline_seconds", "must be > 0")
        _at_most(
            self.mean_offline_seconds, MAX_SECONDS, "fleet.trace.mean_offline_seconds", "longer than any run"
        )


@dataclass(frozen=True)
class FleetSection:
    """The simulated fleet."""

    groups: list[FleetGroup] = field(default_factory=lambda: [dataclasses.replace(g) for g in DEFAULT_FLEET])
    """Device groups; devices are numbered in group order."""
    jitter_scale: float = 1.0
    """Multiplies every device class's per-round slowdown sigma (0 = no compute jitter)."""
    trace: TraceSection = field(default_factory=TraceSection)
    """Availability over time; a device that goes offline during a task loses it."""
    attack: AttackSection = field(default_factory=AttackSection)
    """Devices that upload corrupted updates."""

    def __post_init__(self) -> None:
        for i, group in enumerate(self.groups):
            key = f"fleet.groups[{i}]"
            _check(
                1 <= group.count <= MAX_DEVICES,
                f"{key}.count",
                f"must be in 1..{MAX_DEVICES}, got {group.count}",
            )
            _check(0 < group.availability <= 1, f"{key}.availability", "must be in (0, 1]")
        _check(self.jitter_scale >= 0, "fleet.jitter_scale", "must be >= 0")
        _at_most(
            self.jitter_scale,
            10,
            "fleet.jitter_scale",
            "it multiplies every class's spread; more underflows a slowdown to 0",
        )
        total = sum(g.count for g in self.groups)
        _check(total <= MAX_DEVICES, "fleet.groups", f"hold {total} devices; at most {MAX_DEVICES}")
