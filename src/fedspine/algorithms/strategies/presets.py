"""FedSpine's baselines as data: pruning methods that are fixed settings of FedSpine's machinery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedspine.algorithms.strategies.base import STRATEGIES
from fedspine.algorithms.strategies.fedspine import FedSpine


@dataclass(frozen=True)
class Preset:
    """What a pruning method fixes of FedSpine's settings (None: the configured value)."""

    schedule: Literal["cubic", "oneshot"] | None = None
    freeze_mask: bool | None = None
    policy: Literal["fixed"] | None = None


PRESETS: dict[str, Preset] = {
    "fedspine": Preset(),
    "prune_then_tune": Preset(schedule="oneshot", freeze_mask=True, policy="fixed"),
    "fedmp": Preset(freeze_mask=False, policy="fixed"),
}
"""The pruning methods: FedSpine, and its baselines as fixed settings of the same machinery (the keys
of ``[strategy.fedspine]`` they override), each registered as a strategy name of :class:`FedSpine`.

``prune_then_tune`` prunes once to the target sparsity after the calibration round and keeps that
mask; ``fedmp`` gives every device a fixed ratio under FedSpine's schedule, the mask moving with the
importance the devices measure every round (FedMP re-prunes as it trains).
"""
for _name in PRESETS:
    if _name != FedSpine.name:
        STRATEGIES.register(_name)(FedSpine)


__all__ = ["PRESETS", "Preset"]
