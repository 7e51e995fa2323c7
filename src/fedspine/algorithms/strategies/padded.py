"""Averaging A and B separately over a rank-padded global adapter: FedIT, zero-padding and HetLoRA.

The global adapter has rank r_max. Device k receives its first r_k components (HetLoRA's truncated
distribution), trains, and its factors are zero-padded back to r_max and averaged with weight w_k:
``A = sum_k w_k pad(A_k) / sum_k w_k`` and ``B = sum_k w_k pad(s_k B_k) / sum_k w_k``. Averaging the
factors separately is not averaging the updates: (sum p B)(sum p A) != sum p B A.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedspine.algorithms.lora_math import fresh_factors, pad_rank, truncate_rank
from fedspine.algorithms.strategies.base import Dispatch, ModuleShapes, Strategy
from fedspine.algorithms.wire import payload_bytes
from fedspine.types import ClientUpdate, DeviceLora, LoraState


@dataclass
class PaddedSum:
    """Partial: sum_k w_k pad(A_k), sum_k w_k pad(s_k B_k), and sum_k w_k."""

    sums: LoraState = field(default_factory=dict)
    weight: float = 0.0


def _add(into: LoraState, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if module in into:
        into[module]["A"] = into[module]["A"] + a
        into[module]["B"] = into[module]["B"] + b
    else:
        into[module] = {"A": a, "B": b}


class PaddedAverage(Strategy):
    """Zero-pad every update to the global rank and average A and B separately."""

    def init_global(self, shapes: ModuleShapes, rank: int, generator: torch.Generator) -> None:
        self.rank = rank
        self._global: LoraState = {}
        for module, (out_f, in_f) in shapes.items():
            a, b = fresh_factors(out_f, in_f, rank, generator)
            self._global[module] = {"A": a, "B": b}

    def configure(self, round: int, device_id: int, lora: DeviceLora, generator: torch.Generator) -> Dispatch:
        if lora.rank > self.rank:
            raise ValueError(f"device rank {lora.rank} exceeds the global rank {self.rank}")
        state = {}
        for module, f in self._global.items():
            a, b = truncate_rank(f["A"], f["B"], lora.rank)
            state[module] = {"A": a, "B": b / lora.scaling}
        return Dispatch(state, payload_bytes(state))

    def global_lora(self) -> LoraState:
        return self._global

    def weight_of(self, update: ClientUpdate) -> float:
        """Aggregation weight of an update (HetLoRA overrides it with the update's norm)."""
        return self.update_weight(update)

    def init_partial(self) -> PaddedSum:
        return PaddedSum()

    def accumulate(self, partial: PaddedSum, update: ClientUpdate) -> PaddedSum:
        w = self.weight_of(update)
        for module, f in update.lora_state.items():
            a, b = pad_rank(
                f["A"].to(torch.float32), f["B"].to(torch.float32) * update.lora_scaling, self.rank
            )
            _add(partial.sums, module, w * a, w * b)
        partial.weight += w
        return partial

    def merge(self, left: PaddedSum, right: PaddedSum) -> PaddedSum:
        for module, f in right.sums.items():
            _add(left.sums, module, f["A"], f["B"])
        left.weight += right.weight
        return left

    def finalize(self, partial: PaddedSum) -> None:
        if partial.weight <= 0:
            return  # nothing arrived: the global adapter stays as it was
        self._global = {
            m: {"A": f["A"] / partial.weight, "B": f["B"] / partial.weight} for m, f in partial.sums.items()
        }
