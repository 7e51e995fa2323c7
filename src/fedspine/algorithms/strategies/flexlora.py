"""FlexLoRA (Bai et al., 2024): aggregate the full products, redistribute by truncated SVD.

The server forms ``dW = sum_k p_k s_k B_k A_k`` exactly (from stacked factors, never densely: the
SVD of the product comes from two thin QR factorisations and an SVD of a (sum r_k)-square core),
keeps its best rank-r_max factorisation as the global adapter, and device k receives the top r_k
singular components, which are the best rank-r_k approximation of dW.
"""

from __future__ import annotations

import torch

from fedspine.algorithms.lora_math import fresh_factors, lowrank_svd, truncate_rank
from fedspine.algorithms.strategies.base import STRATEGIES, Dispatch, ModuleShapes, Strategy
from fedspine.algorithms.strategies.stacked import StackedSum
from fedspine.algorithms.wire import payload_bytes
from fedspine.types import ClientUpdate, DeviceLora, LoraState


@STRATEGIES.register("flexlora")
class FlexLoRA(Strategy):
    """Weighted sum of full LoRA products, truncated SVD back to each device's rank."""

    name = "flexlora"

    def init_global(self, shapes: ModuleShapes, rank: int, generator: torch.Generator) -> None:
        self.rank = rank
        self._global: LoraState = {}
        for module, (out_f, in_f) in shapes.items():
            a, b = fresh_factors(out_f, in_f, rank, generator)
            self._global[module] = {"A": a, "B": b}

    def configure(self, round: int, device_id: int, lora: DeviceLora, generator: torch.Generator) -> Dispatch:
        state = {}
        for module, f in self._global.items():
            a, b = truncate_rank(f["A"], f["B"], lora.rank)
            state[module] = {"A": a, "B": b / lora.scaling}
        return Dispatch(state, payload_bytes(state))

    def global_lora(self) -> LoraState:
        return self._global

    def init_partial(self) -> StackedSum:
        return StackedSum()

    def accumulate(self, partial: StackedSum, update: ClientUpdate) -> StackedSum:
        return partial.add(update, self.update_weight(update))

    def merge(self, left: StackedSum, right: StackedSum) -> StackedSum:
        return left.merge(right)

    def finalize(self, partial: StackedSum) -> None:
        if partial.weight <= 0:
            return
        self._global = {}
        for module, (a_s, b_s) in partial.stacked().items():
            a, b = lowrank_svd(a_s, b_s, self.rank)
            self._global[module] = {"A": a, "B": b}
