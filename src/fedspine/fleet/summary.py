"""Per-(device class, network) summary of a fleet, as numbers and as table rows for the CLI."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedspine.types import Device

_GIB = 2**30


@dataclass(frozen=True)
class FleetSummaryRow:
    """Devices of one (class, network) pair and their nominal figures.

    Attributes:
        device_class: catalog name of the class.
        network: preset name of the link.
        count: devices with this pair.
        effective_tflops: ``mfu * peak_flops`` in TFLOP/s.
        memory_gbps: memory bandwidth in GB/s.
        memory_gib: usable memory in GiB.
        uplink_mbps: effective uplink in Mbit/s.
        downlink_mbps: effective downlink in Mbit/s.
        rtt_ms: round-trip time in milliseconds.
        mean_availability: mean probability of being online.
    """

    device_class: str
    network: str
    count: int
    effective_tflops: float
    memory_gbps: float
    memory_gib: float
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    mean_availability: float


def fleet_summary(devices: Sequence[Device]) -> list[FleetSummaryRow]:
    """One row per (class, network) pair, in order of first appearance."""
    groups: dict[tuple[str, str], list[Device]] = {}
    for device in devices:
        groups.setdefault((device.device_class.name, device.network.name), []).append(device)
    return [_summary_row(members) for members in groups.values()]


def _summary_row(members: list[Device]) -> FleetSummaryRow:
    cls, net = members[0].device_class, members[0].network
    return FleetSummaryRow(
        device_class=cls.name,
        network=net.name,
        count=len(members),
        effective_tflops=cls.mfu * cls.peak_flops / 1e12,
        memory_gbps=cls.memory_bandwidth / 1e9,
        memory_gib=cls.memory_bytes / _GIB,
        uplink_mbps=net.uplink_bps / 1e6,
        downlink_mbps=net.downlink_bps / 1e6,
        rtt_ms=net.rtt_seconds * 1e3,
        mean_availability=sum(d.availability for d in members) / len(members),
    )


def fleet_table_rows(devices: Sequence[Device]) -> list[dict[str, str]]:
    """:func:`fleet_summary` formatted as strings, keyed by column header, ready for a table."""
    return [
        {
            "device class": row.device_class,
            "network": row.network,
            "count": str(row.count),
            "TFLOPS (eff.)": f"{row.effective_tflops:.3g}",
            "mem GB/s": f"{row.memory_gbps:.3g}",
            "mem GiB": f"{row.memory_gib:.3g}",
            "UL Mbps": f"{row.uplink_mbps:.4g}",
            "DL Mbps": f"{row.downlink_mbps:.4g}",
            "RTT ms": f"{row.rtt_ms:.3g}",
            "availability": f"{row.mean_availability:.2f}",
        }
        for row in fleet_summary(devices)
    ]
