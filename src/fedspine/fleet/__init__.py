"""The simulated device fleet: catalog, cost model, fleet building, per-round jitter, summaries.

Pure Python: nothing here imports torch, transformers or peft.
"""

from fedspine.fleet.build import GroupSpec, build_fleet, split_counts
from fedspine.fleet.catalog import DEVICE_CATALOG, NETWORK_PRESETS, device_class, network_profile
from fedspine.fleet.cost import CostModel, Direction
from fedspine.fleet.jitter import compute_slowdown, is_available, link_rate_factor
from fedspine.fleet.summary import FleetSummaryRow, fleet_summary, fleet_table_rows

__all__ = [
    "DEVICE_CATALOG",
    "NETWORK_PRESETS",
    "CostModel",
    "Direction",
    "FleetSummaryRow",
    "GroupSpec",
    "build_fleet",
    "compute_slowdown",
    "device_class",
    "fleet_summary",
    "fleet_table_rows",
    "is_available",
    "link_rate_factor",
    "network_profile",
    "split_counts",
]
