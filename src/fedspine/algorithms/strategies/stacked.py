"""Exact aggregation by stacking along the rank dimension: the partial of FLoRA and FlexLoRA.

Update k contributes the blocks ``w_k s_k A_k`` and ``B_k``; concatenating them gives
``B_s A_s = sum_k w_k s_k B_k A_k`` with no cross terms. Partials are concatenations plus the weight
sum, so they merge associatively (a LIFL tree gives the flat result, up to the order of the blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedspine.algorithms.lora_math import stack_factors
from fedspine.types import ClientUpdate

Blocks = dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]


@dataclass
class StackedSum:
    """Partial: per module, the list of (A_k, B_k, w_k s_k) blocks, and sum_k w_k."""

    blocks: Blocks = field(default_factory=dict)
    weight: float = 0.0

    def add(self, update: ClientUpdate, weight: float) -> StackedSum:
        """Append one update's blocks."""
        for module, f in update.lora_state.items():
            self.blocks.setdefault(module, []).append((f["A"], f["B"], weight * update.lora_scaling))
        self.weight += weight
        return self

    def merge(self, other: StackedSum) -> StackedSum:
        """Concatenate another partial's blocks."""
        for module, blocks in other.blocks.items():
            self.blocks.setdefault(module, []).extend(blocks)
        self.weight += other.weight
        return self

    def stacked(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module, ``(A_s, B_s)`` with the weights normalised: ``B_s A_s = sum_k p_k s_k B_k A_k``."""
        out = {}
        for module, blocks in self.blocks.items():
            a_s, b_s = stack_factors(blocks)  # fresh tensors, so A_s is normalised in place
            out[module] = (a_s.div_(self.weight), b_s)
        return out
