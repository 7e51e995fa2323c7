"""Averaging A and B separately over a rank-padded global adapter: FedIT, zero-padding and HetLoRA.

The global adapter has rank r_max. Device k receives its first r_k components (HetLoRA's truncated
distribution), trains, and its factors are zero-padded back to r_max and averaged with weight w_k:
``A = sum_k w_k pad(A_k) / sum_k w_k`` and ``B = sum_k w_k pad(s_k B_k) / sum_k w_k``. Averaging the
factors separately is not averaging the updates: (sum p B)(sum p A) != sum p B A.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedspine.algorithms.strategies.base import TruncatedGlobalAdapter
from fedspine.types import ClientUpdate, LoraState


@dataclass
class PaddedSum:
    """Partial: sum_k w_k pad(A_k), sum_k w_k pad(s_k B_k), and sum_k w_k.

    The sums are fp32 buffers at the global rank, (r_max, in) and (out, r_max), owned by the partial
    and updated in place; padding is implicit (update k adds into the first r_k rows / columns).
    """

    rank: int
    sums: LoraState = field(default_factory=dict)
    weight: float = 0.0

    def add(self, update: ClientUpdate, weight: float) -> PaddedSum:
        """Add ``weight`` pad(A) and, in scaling 1, ``weight`` s pad(B)."""
        _add_padded(self.sums, update.lora_state, self.rank, weight, weight * update.lora_scaling)
        self.weight += weight
        return self

    def merge(self, other: PaddedSum) -> PaddedSum:
        _add_padded(self.sums, other.sums, self.rank, 1.0, 1.0)
        self.weight += other.weight
        return self


def _zero_sums(a: torch.Tensor, b: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """Zero fp32 sums at ``rank`` for a module whose factors are shaped like ``a`` and ``b``."""
    return {
        "A": torch.zeros(rank, a.shape[1], dtype=torch.float32),  # (r_max, in)
        "B": torch.zeros(b.shape[0], rank, dtype=torch.float32),  # (out, r_max)
    }


def _targets(sums: LoraState, state: LoraState, rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per module of ``state``: the first r_k rows of its A sum and the first r_k columns of its B sum.

    Sums are created on first use. The slices are views, so adding into them adds the zero-padded
    factors without materialising the padding.
    """
    a_targets, b_targets = [], []
    for module, f in state.items():
        into = sums.get(module)
        if into is None:
            into = sums[module] = _zero_sums(f["A"], f["B"], rank)
        r = f["A"].shape[0]
        if r == rank:
            a_targets.append(into["A"])
            b_targets.append(into["B"])
        elif r < rank:
            a_targets.append(into["A"][:r])
            b_targets.append(into["B"][:, :r])
        else:
            raise ValueError(f"cannot pad rank {r} down to {rank}")
    return a_targets, b_targets


def _add_padded(sums: LoraState, state: LoraState, rank: int, a_weight: float, b_weight: float) -> None:
    """``sums[m]["A"] += a_weight pad(A_m)`` and ``sums[m]["B"] += b_weight pad(B_m)``, in place."""
    if not state:
        return
    a_targets, b_targets = _targets(sums, state, rank)
    # One call per list, not per tensor: for rank-8 adapters Python's per-call overhead was a quarter
    # of the time (bench/aggregate.py).
    torch._foreach_add_(a_targets, [f["A"] for f in state.values()], alpha=a_weight)
    torch._foreach_add_(b_targets, [f["B"] for f in state.values()], alpha=b_weight)


class PaddedAverage(TruncatedGlobalAdapter):
    """Zero-pad every update to the global rank and average A and B separately."""

    def init_partial(self) -> PaddedSum:
        return PaddedSum(self.rank)

    def finalize(self, partial: PaddedSum) -> None:
        if partial.weight <= 0:
            return  # nothing arrived: the global adapter stays as it was
        self._global = {
            m: {"A": f["A"] / partial.weight, "B": f["B"] / partial.weight} for m, f in partial.sums.items()
        }
