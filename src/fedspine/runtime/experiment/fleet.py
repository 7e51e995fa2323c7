"""Building a run's fleet and its availability trace from the config."""

from __future__ import annotations

from fedspine.config import Config
from fedspine.fleet import GroupSpec, build_fleet
from fedspine.fleet.availability import AvailabilityTrace, make_trace
from fedspine.fleet.profile import load_profile
from fedspine.types import Device


def build_trace(cfg: Config) -> AvailabilityTrace:
    """The configured availability trace."""
    t = cfg.fleet.trace
    return make_trace(
        t.kind,
        cfg.run.seed,
        t.period_seconds,
        t.online_fraction,
        t.mean_online_seconds,
        t.mean_offline_seconds,
    )


def build_fleet_from_config(cfg: Config) -> list[Device]:
    """The fleet described by ``cfg.fleet`` (errors name ``fleet.groups[i].<field>``)."""
    groups = [
        GroupSpec(
            g.device_class,
            g.count,
            g.network,
            g.availability,
            load_profile(g.profile, f"fleet.groups[{i}].profile") if g.profile else None,
        )
        for i, g in enumerate(cfg.fleet.groups)
    ]
    return build_fleet(groups, cfg.run.seed)
