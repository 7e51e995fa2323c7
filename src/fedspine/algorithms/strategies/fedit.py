"""FedIT: FedAvg of the LoRA factors A and B, each averaged separately (Zhang et al., FederatedGPT).

With p_k the normalised weight of update k: A = sum_k p_k A_k and B = sum_k p_k B_k. Devices
warm-start from the averaged adapter. Note (sum p B)(sum p A) != sum p B A: the cross terms are the
aggregation error that FLoRA's stacking removes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedspine.algorithms.strategies.base import STRATEGIES, Strategy
from fedspine.types import ClientUpdate, LoraState


@dataclass
class WeightedSum:
    """Partial FedAvg: sum_k w_k * state_k (fp32) and sum_k w_k."""

    sums: LoraState
    weight: float


def _scaled_add(into: LoraState, state: LoraState, scale: float) -> LoraState:
    for module, factors in state.items():
        target = into.setdefault(module, {})
        for name, tensor in factors.items():
            scaled = tensor.detach().to(torch.float32) * scale
            target[name] = target[name] + scaled if name in target else scaled
    return into


@STRATEGIES.register("fedit")
class FedIT(Strategy):
    """Sample-weighted FedAvg of A and B at one shared rank."""

    name = "fedit"

    def init_global(self, lora_state: LoraState) -> None:
        self._global = {m: {k: t.detach().clone() for k, t in f.items()} for m, f in lora_state.items()}

    def configure(self, round: int, device_id: int) -> LoraState:
        return self._global

    def global_lora(self) -> LoraState:
        return self._global

    def init_partial(self) -> WeightedSum:
        return WeightedSum(sums={}, weight=0.0)

    def accumulate(self, partial: WeightedSum, update: ClientUpdate) -> WeightedSum:
        weight = self.update_weight(update)
        return WeightedSum(_scaled_add(partial.sums, update.lora_state, weight), partial.weight + weight)

    def merge(self, left: WeightedSum, right: WeightedSum) -> WeightedSum:
        return WeightedSum(_scaled_add(left.sums, right.sums, 1.0), left.weight + right.weight)

    def finalize(self, partial: WeightedSum) -> None:
        if partial.weight <= 0:
            return  # nothing arrived: the global state stays as it was
        scale = 1.0 / partial.weight
        self._global = {
            m: {k: (t * scale).to(self._global[m][k].dtype) for k, t in f.items()}
            for m, f in partial.sums.items()
        }
