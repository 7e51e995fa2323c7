"""HetLoRA (Cho et al., EMNLP 2024): truncated distribution, local rank self-pruning, norm-weighted sums.

- The server keeps a global adapter at r_max; device k receives its first r_k components.
- On the device, a penalty ``lambda * (||A_tail||_F + ||B_tail||_F)`` on the last (1 - gamma) r_k
  components pushes the tail towards zero; after training, if the tail's share of ``||B A||`` is below
  ``threshold``, the device drops it and keeps rank ``floor(gamma r_k)`` from then on.
- Aggregation zero-pads to r_max and weights update k by ``||s_k B_k A_k||_F`` (larger, less sparse
  updates count more), normalised by the sum of the weights; the sums stay associative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedspine.algorithms.lora_math import delta_norm, self_pruned_rank, truncate_rank
from fedspine.algorithms.strategies.base import STRATEGIES, Weighting
from fedspine.algorithms.strategies.padded import PaddedAverage
from fedspine.types import ClientUpdate, DeviceLora, LoraState


@STRATEGIES.register("hetlora")
class HetLoRA(PaddedAverage):
    """Zero-padded averaging weighted by update norms, with local rank self-pruning."""

    name = "hetlora"

    def __init__(
        self,
        weighting: Weighting = "samples",
        gamma: float = 0.9,
        prune_threshold: float = 0.05,
        penalty: float = 1e-3,
    ) -> None:
        super().__init__(weighting)
        self.device_side = RankSelfPruning(gamma, prune_threshold, penalty)

    def weight_of(self, update: ClientUpdate) -> float:
        """``||s_k B_k A_k||_F`` summed over modules (the update's Frobenius norm)."""
        squares = sum(delta_norm(f["A"], f["B"]) ** 2 for f in update.lora_state.values())
        return update.lora_scaling * math.sqrt(squares)


@dataclass(frozen=True)
class RankSelfPruning:
    """HetLoRA's device side: a penalty ``weight * (||A_tail|| + ||B_tail||)`` on the last
    ``(1 - gamma) r`` components while training, then the tail dropped when its share of ``||B A||``
    is below ``threshold`` in every module."""

    gamma: float
    threshold: float
    weight: float

    def penalty(self, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        if self.weight <= 0 or not factors:
            return None
        rank = factors[0][0].shape[0]
        keep = max(1, math.floor(self.gamma * rank))
        if keep >= rank:
            return None
        tails = [a[keep:].norm() + b[:, keep:].norm() for a, b in factors]
        return self.weight * torch.stack(tails).sum()

    def finish(self, state: LoraState, lora: DeviceLora) -> LoraState:
        """Drop the tail of every module when it is small in all of them (one rank per device)."""
        ranks = [self_pruned_rank(f["A"], f["B"], self.gamma, self.threshold) for f in state.values()]
        new_rank = max(ranks) if ranks else lora.rank
        if new_rank >= lora.rank:
            return state
        return {
            m: dict(zip(("A", "B"), truncate_rank(f["A"], f["B"], new_rank), strict=True))
            for m, f in state.items()
        }
