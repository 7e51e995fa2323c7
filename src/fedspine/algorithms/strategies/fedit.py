"""FedIT (Zhang et al., "Towards building the FederatedGPT"): FedAvg of A and B at one shared rank.

Devices warm-start from the averaged adapter. Unlike the FLoRA repository's FedIT branch (which, by a
typo, keeps only the first client's adapter), every update is averaged with its sample weight.
"""

from __future__ import annotations

from fedspine.algorithms.strategies.base import STRATEGIES
from fedspine.algorithms.strategies.padded import PaddedAverage


@STRATEGIES.register("fedit")
class FedIT(PaddedAverage):
    """Sample-weighted FedAvg of A and B; every device trains at the same rank."""

    name = "fedit"
    uniform_rank_only = True
