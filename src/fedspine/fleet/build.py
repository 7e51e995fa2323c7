"""Build the simulated fleet from flat group specifications (the config layer calls this).

Devices are numbered 0..N-1 in group order. A group's network is one preset, or a mix of presets whose
fractions are turned into exact counts by largest-remainder rounding and then shuffled deterministically
from the seed, so a 50/50 mix of 10 devices is always 5 and 5, never an i.i.d. 7/3.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedspine.errors import ConfigError
from fedspine.fleet.catalog import device_class, network_profile
from fedspine.types import Device, DeviceClass

_MIX_TOLERANCE = 1e-6


@dataclass(frozen=True)
class GroupSpec:
    """A group of identical devices.

    Attributes:
        device_class: catalog name, e.g. ``"jetson_orin_nano"``.
        count: number of devices in the group (>= 1).
        network: a preset name, or a mix ``{"wifi": 0.5, "5g": 0.5}`` of fractions summing to 1.
        availability: probability a device is online when a round samples clients, in (0, 1].
    """

    device_class: str
    count: int
    network: str | Mapping[str, float]
    availability: float = 1.0
    profile: DeviceClass | None = None
    """A measured device class (a profile file) that replaces the catalog's ``device_class``."""


def build_fleet(groups: Sequence[GroupSpec], seed: int) -> list[Device]:
    """Expand group specifications into devices numbered 0..N-1 in group order.

    Args:
        groups: the fleet's groups, in config order.
        seed: run seed; fixes which devices of a mixed group get which network.

    Raises:
        ConfigError: an empty fleet, or a group field out of range or unknown, named as
            ``fleet.groups[i].<field>``.
    """
    if not groups:
        raise ConfigError("fleet.groups", "the fleet needs at least one group")
    devices: list[Device] = []
    for index, group in enumerate(groups):
        devices.extend(_build_group(group, index, seed, first_id=len(devices)))
    return devices


def _build_group(group: GroupSpec, index: int, seed: int, first_id: int) -> list[Device]:
    """The devices of one group, validated, with ids starting at ``first_id``."""
    key = f"fleet.groups[{index}]"
    cls = group.profile or device_class(group.device_class, f"{key}.device_class")
    if isinstance(group.count, bool) or not isinstance(group.count, int) or group.count < 1:
        raise ConfigError(f"{key}.count", f"must be an integer >= 1, got {group.count!r}")
    if not 0.0 < group.availability <= 1.0:
        raise ConfigError(f"{key}.availability", f"must be in (0, 1], got {group.availability!r}")
    rng = random.Random(f"fleet:{seed}:{index}")
    names = _network_names(group.network, group.count, rng, f"{key}.network")
    return [
        Device(first_id + i, cls, network_profile(name, f"{key}.network"), group.availability)
        for i, name in enumerate(names)
    ]


def _network_names(network: str | Mapping[str, float], count: int, rng: random.Random, key: str) -> list[str]:
    """One preset name per device: all the same, or a mix in exact proportions, shuffled."""
    if isinstance(network, str):
        network_profile(network, key)
        return [network] * count
    counts = split_counts(_checked_mix(network, key), count)
    names = [name for name, n in counts.items() for _ in range(n)]
    rng.shuffle(names)
    return names


def _checked_mix(mix: Mapping[str, float], key: str) -> dict[str, float]:
    """Validate a network mix: known presets, non-negative fractions summing to 1."""
    if not mix:
        raise ConfigError(key, "a network mix needs at least one preset")
    for name, fraction in mix.items():
        network_profile(name, key)
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or fraction < 0:
            raise ConfigError(key, f"fraction of {name!r} must be a number >= 0, got {fraction!r}")
    total = math.fsum(mix.values())
    if abs(total - 1.0) > _MIX_TOLERANCE:
        raise ConfigError(key, f"network fractions must sum to 1, got {total:g}")
    return dict(mix)


def split_counts(fractions: Mapping[str, float], count: int) -> dict[str, int]:
    """Split ``count`` items by ``fractions`` (summing to 1) with largest-remainder rounding.

    Every name gets ``floor(fraction * count)``; the items left over go one each to the largest
    remainders, ties to the name listed first. The counts sum to ``count`` exactly.
    """
    total = math.fsum(fractions.values())
    quotas = {name: fraction * count / total for name, fraction in fractions.items()}
    counts = {name: math.floor(quota) for name, quota in quotas.items()}
    # sorted() is stable with reverse=True too, so equal remainders keep the listed order.
    by_remainder = sorted(quotas, key=lambda name: quotas[name] - counts[name], reverse=True)
    for name in by_remainder[: count - sum(counts.values())]:
        counts[name] += 1
    return counts
