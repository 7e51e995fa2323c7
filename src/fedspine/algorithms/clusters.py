"""Cluster adapters (``personalize.method = "clustered"``): IFCA's clusters, as small adapters beside
the shared model.

The server keeps ``k`` LoRA adapters. Every task carries all of them; the device picks the one with
the lowest loss on its own data (the first batch of the task; when they tie, as the untrained ones do
at the start, a draw keyed by the task picks), trains it beside the shared adapter, and uploads it with
the cluster's index. The server averages each cluster's uploads (weighted as the strategy weighs
updates), unit by unit over the devices that trained the unit: a device on a pruned submodel trains
its kept units only, and the others keep their value. A device's personal model is the model it
deploys with the adapter of its cluster merged in.

Clusters sit beside the shared model rather than replacing it (IFCA's weight-sharing variant), so they
compose with every strategy, FedSpine's merged-in base included, and cost each device ``k`` small
adapters on the downlink and one on the uplink.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedspine.algorithms.lora_math import fresh_adapter
from fedspine.model.footprint import ModelShape
from fedspine.model.pruning import PruningPlan, lora_between, lora_in_full
from fedspine.types import ClientUpdate, LoraState


class ClusterAdapters:
    """The server's ``count`` cluster adapters, in the dense model's coordinates.

    Args:
        shapes: ``(out, in)`` of every adapted module of the dense model.
        count: how many clusters.
        rank: each adapter's rank (its scaling is ``alpha / rank``).
        alpha: their LoRA alpha.
        seed: seeds the adapters' initialisation.
    """

    def __init__(
        self, shapes: Mapping[str, tuple[int, int]], count: int, rank: int, alpha: float, seed: int
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.rank = rank
        self.alpha = alpha
        self.states: list[LoraState] = [fresh_adapter(shapes, rank, generator) for _ in range(count)]

    def sent(self, plan: PruningPlan | None, shape: ModelShape) -> list[LoraState]:
        """What a task on ``plan``'s submodel (None: the dense model) receives: every adapter, cut to it."""
        if plan is None:
            return [_copy(s) for s in self.states]
        return [lora_between(s, plan, shape, "kept") for s in self.states]

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float], shape: ModelShape) -> None:
        """Average each cluster's uploads among ``updates`` (weighted), unit by unit over the devices
        that trained the unit; clusters and units nobody trained keep their value."""
        for index, old in enumerate(self.states):
            total: LoraState = {m: {k: torch.zeros_like(t) for k, t in e.items()} for m, e in old.items()}
            cover: LoraState = {m: {k: torch.zeros_like(t) for k, t in e.items()} for m, e in old.items()}
            for update, weight in zip(updates, weights, strict=True):
                if update.cluster != index or update.cluster_state is None:
                    continue
                placed, trained = lora_in_full(update.cluster_state, update.plan, shape)
                for m in old:
                    for k in ("A", "B"):
                        total[m][k] += weight * placed[m][k].float()
                        cover[m][k] += weight * trained[m][k]
            self.states[index] = {
                m: {
                    k: torch.where(cover[m][k] > 0, total[m][k] / cover[m][k].clamp_min(1e-30), old[m][k])
                    for k in ("A", "B")
                }
                for m in old
            }


def _copy(state: LoraState) -> LoraState:
    return {m: {k: t.clone() for k, t in e.items()} for m, e in state.items()}
