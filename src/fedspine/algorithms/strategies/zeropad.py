"""Zero-padding (the heterogeneous-rank baseline in FLoRA): pad A_k and B_k to r_max, average separately."""

from __future__ import annotations

from fedspine.algorithms.strategies.base import STRATEGIES
from fedspine.algorithms.strategies.padded import PaddedAverage


@STRATEGIES.register("zeropad")
class ZeroPad(PaddedAverage):
    """Sample-weighted average of zero-padded factors; devices receive the first r_k components."""

    name = "zeropad"
