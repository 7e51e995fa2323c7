"""What a device keeps for itself: its private adapter (``personalize.method = "split"``).

A private adapter trains beside the shared one in every task of its device and never leaves it: the
update the device uploads carries the shared adapter only. It persists across the device's tasks and
is what makes its final model its own (the deployed model with the private adapter merged in).

It is kept in the dense model's coordinates. A device that trains a pruned submodel (FedSpine) trains
the private adapter's kept part; the units its plan removes keep what they had, so a unit the device
trained in an earlier, less pruned task keeps that training.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch

from fedspine.algorithms.lora_math import fresh_adapter
from fedspine.model.footprint import ModelShape
from fedspine.model.pruning import PruningPlan, lora_between, lora_in_full
from fedspine.types import LoraState


class PrivateAdapters:
    """Each device's private adapter, created on its first task (A random, B zero, as peft does).

    Args:
        shapes: ``(out, in)`` of every adapted module of the dense model.
        rank: the private adapter's rank.
        alpha: its LoRA alpha (scaling ``alpha / rank``).
        seed: the run seed.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], rank: int, alpha: float, seed: int) -> None:
        self.shapes = dict(shapes)
        self.rank = rank
        self.alpha = alpha
        self.seed = seed
        self.states: dict[int, LoraState] = {}
        """Device id -> its private adapter, in dense coordinates."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def of(
        self, device_id: int, plan: PruningPlan | None = None, shape: ModelShape | None = None
    ) -> LoraState:
        """``device_id``'s adapter (a fresh one before its first task), cut to ``plan``'s submodel."""
        state = self.states.get(device_id)
        if state is None:
            seed = zlib.crc32(f"{self.seed}:{device_id}:private".encode())
            state = fresh_adapter(self.shapes, self.rank, torch.Generator().manual_seed(seed))
        if plan is None:
            return state
        assert shape is not None, "a pruned submodel's adapter needs the dense model's shape"
        return lora_between(state, plan, shape, "kept")

    def keep(
        self,
        device_id: int,
        trained: LoraState,
        plan: PruningPlan | None = None,
        shape: ModelShape | None = None,
    ) -> None:
        """Store ``device_id``'s adapter after a task that trained ``trained`` (on ``plan``'s submodel:
        the units it removes keep their previous values)."""
        trained = {m: {k: e[k].detach().float().cpu() for k in ("A", "B")} for m, e in trained.items()}
        if plan is None:
            self.states[device_id] = trained
            return
        assert shape is not None, "a pruned submodel's adapter needs the dense model's shape"
        before = self.of(device_id)
        placed, covered = lora_in_full(trained, plan, shape)
        self.states[device_id] = {
            m: {k: torch.where(covered[m][k] > 0, placed[m][k], before[m][k]) for k in ("A", "B")}
            for m in before
        }
