"""FLoRA (Wang et al., NeurIPS 2024): stack heterogeneous LoRA factors, merge into the base each round.

The server stacks ``p_k s_k A_k`` and ``B_k`` along the rank dimension, so ``B_s A_s`` equals
``sum_k p_k s_k B_k A_k`` exactly for any mix of ranks and alphas (the scaling is folded into the A
block, a generalisation of the reference code, where every client has alpha = 2 r). The product is
merged into the base weights, and every device starts each task from a fresh adapter (A random,
B = 0) on the merged base.

Bytes on the downlink: a device must receive the stacked factors of every aggregation since it last
took part (or the dense adapted weights, if that is smaller); the uplink carries its own factors.
"""

from __future__ import annotations

import torch

from fedspine.algorithms.lora_math import fresh_factors
from fedspine.algorithms.strategies.base import STRATEGIES, Dispatch, ModuleShapes, Strategy, Weighting
from fedspine.algorithms.strategies.stacked import StackedSum
from fedspine.algorithms.wire import payload_bytes
from fedspine.types import DeviceLora, LoraState


@STRATEGIES.register("flora")
class FLoRA(Strategy):
    """Exact stacking aggregation, merged into the base weights every round."""

    name = "flora"

    def __init__(self, weighting: Weighting = "samples") -> None:
        super().__init__(weighting)
        self._version = 0
        self._bytes_per_version: list[int] = []
        self._last_sync: dict[int, int] = {}
        self._pending: dict[str, torch.Tensor] | None = None

    def init_global(self, shapes: ModuleShapes, rank: int, generator: torch.Generator) -> None:
        self.shapes = shapes
        self._dense_bytes = sum(4 * out_f * in_f for out_f, in_f in shapes.values())

    def configure(self, round: int, device_id: int, lora: DeviceLora, generator: torch.Generator) -> Dispatch:
        state: LoraState = {}
        for module, (out_f, in_f) in self.shapes.items():
            a, b = fresh_factors(out_f, in_f, lora.rank, generator)
            state[module] = {"A": a, "B": b}
        missed = self._bytes_per_version[self._last_sync.get(device_id, 0) :]
        self._last_sync[device_id] = self._version
        return Dispatch(state, min(sum(missed), self._dense_bytes) if missed else 0)

    def global_lora(self) -> LoraState:
        return {}  # knowledge lives in the merged base weights

    def take_base_delta(self) -> dict[str, torch.Tensor] | None:
        pending, self._pending = self._pending, None
        return pending

    def init_partial(self) -> StackedSum:
        return StackedSum()

    def finalize(self, partial: StackedSum) -> None:
        if partial.weight <= 0:
            return
        stacked = partial.stacked()
        self._pending = {m: b_s @ a_s for m, (a_s, b_s) in stacked.items()}  # (out, in) per module
        wire = {m: {"A": a_s, "B": b_s} for m, (a_s, b_s) in stacked.items()}
        self._bytes_per_version.append(payload_bytes(wire))
        self._version += 1
