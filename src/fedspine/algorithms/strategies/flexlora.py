"""FlexLoRA (Bai et al., 2024): aggregate the full products, redistribute by truncated SVD.

The server forms ``dW = sum_k p_k s_k B_k A_k`` exactly (from stacked factors, never densely: the
SVD of the product comes from two thin QR factorisations and an SVD of a (sum r_k)-square core),
keeps its best rank-r_max factorisation as the global adapter, and device k receives the top r_k
singular components, which are the best rank-r_k approximation of dW.
"""

from __future__ import annotations

from fedspine.algorithms.lora_math import lowrank_svd
from fedspine.algorithms.strategies.base import STRATEGIES, TruncatedGlobalAdapter
from fedspine.algorithms.strategies.stacked import StackedAggregation, StackedSum


@STRATEGIES.register("flexlora")
class FlexLoRA(StackedAggregation, TruncatedGlobalAdapter):
    """Weighted sum of full LoRA products, truncated SVD back to each device's rank."""

    name = "flexlora"

    def finalize(self, partial: StackedSum) -> None:
        if partial.weight <= 0:
            return
        self._global = {}
        for module, (a_s, b_s) in partial.stacked().items():
            a, b = lowrank_svd(a_s, b_s, self.rank)
            self._global[module] = {"A": a, "B": b}
