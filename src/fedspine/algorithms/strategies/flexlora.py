"""FlexLoRA (Bai et al., 2024): aggregate the full products, redistribute by truncated SVD.

The server forms ``dW = sum_k p_k s_k B_k A_k`` exactly (from stacked factors, never densely: the
SVD of the product comes from two thin QR factorisations and an SVD of a (sum r_k)-square core),
keeps its best rank-r_max factorisation as the global adapter, and device k receives the top r_k
singular components, which are the best rank-r_k approximation of dW.
"""

from __future__ import annotations

import dataclasses

import torch

from fedspine.algorithms.lora_math import lowrank_svd, truncate_rank
from fedspine.algorithms.strategies.base import STRATEGIES, Compensate, TruncatedGlobalAdapter
from fedspine.algorithms.strategies.stacked import StackedSum
from fedspine.types import ClientUpdate, LoraState


@STRATEGIES.register("flexlora")
class FlexLoRA(TruncatedGlobalAdapter):
    """Weighted sum of full LoRA products, truncated SVD back to each device's rank."""

    name = "flexlora"
    supports_compensation = False

    def rebase(
        self, update: ClientUpdate, start: LoraState, scale: float, compensate: Compensate | None = None
    ) -> ClientUpdate:
        """Exact in product space: ``B_now A_now + scale (s B A - s B_start A_start)`` as stacked factors.

        FlexLoRA's global factors come from an SVD, so factors of different versions are not in the
        same basis and cannot be subtracted; their products can. The rebased update has rank ``3 r``,
        which stacking aggregation takes as it is.
        """
        if compensate is not None:
            raise ValueError("flexlora aggregates products: stale updates cannot be compensated element-wise")
        state: LoraState = {}
        for module, f in update.lora_state.items():
            rank = f["A"].shape[0]
            cur_a, cur_b = truncate_rank(self._global[module]["A"], self._global[module]["B"], rank)
            state[module] = {
                "A": torch.cat([cur_a, f["A"].float(), start[module]["A"]]),
                "B": torch.cat(
                    [cur_b / update.lora_scaling, scale * f["B"].float(), -scale * start[module]["B"]], dim=1
                ),
            }
        return dataclasses.replace(update, lora_state=state)

    def init_partial(self) -> StackedSum:
        return StackedSum()

    def finalize(self, partial: StackedSum) -> None:
        if partial.weight <= 0:
            return
        self._global = {}
        for module, (a_s, b_s) in partial.stacked().items():
            a, b = lowrank_svd(a_s, b_s, self.rank)
            self._global[module] = {"A": a, "B": b}
