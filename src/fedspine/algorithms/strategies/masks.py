"""FedSpine's masks: which units a device at pruning ratio p keeps, and how the sparsity floor rises.

A :class:`PruningMasks` holds what the server knows about the model alone — its shape, its adapted
modules and the global importance of every layer's units — and the schedule. The strategy updates the
importance from the devices' scores; the policy's time and work predictors read plans from the same
object. It is built before either of them, so neither needs the other to exist first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from fedspine.algorithms.policies import Arm
from fedspine.algorithms.strategies.base import ModuleShapes
from fedspine.model.footprint import ModelShape
from fedspine.model.pruning import (
    COLUMN_MODULES,
    MODULE_NAME,
    LayerKeep,
    PruningPlan,
    dense_layer_indices,
    layer_index_map,
    plan_from_scores,
)

MAX_RATIO = 0.95
"""No device prunes more than this of a layer's units."""


class PruningMasks:
    """The global unit order of every pruned layer and the sparsity schedule.

    Args:
        shape: the dense model's shape.
        module_shapes: ``(out, in)`` of every adapted module, named as in the model.
        initial_scores: per layer, the starting importance of KV groups and MLP channels (e.g.
            magnitude), replaced by the devices' measurements as they arrive.
        rounds: the run's horizon (the cubic schedule's default length is half of it).
        target_sparsity: the final fraction of every pruned layer's units removed.
        schedule: how the floor rises after calibration: ``cubic`` over ``prune_rounds`` (0: half of
            ``rounds``), or the target at once (``oneshot``).
        dense_layers: layers never pruned (negative: from the end), or ``auto``
            (:func:`~fedspine.model.pruning.dense_layer_indices`).
        channel_multiple: kept MLP channel counts round to a multiple of this.
        granularity: MLP channels only, KV groups too, or ``auto`` (KV groups with >= 8 of them).
        measured: whether ``initial_scores`` already are the importance (magnitude): no calibration.

    Raises:
        ValueError: a module that is not a Llama-family decoder projection.
    """

    def __init__(
        self,
        shape: ModelShape,
        module_shapes: ModuleShapes,
        initial_scores: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
        rounds: int,
        *,
        target_sparsity: float,
        schedule: Literal["cubic", "oneshot"] = "cubic",
        prune_rounds: int = 0,
        dense_layers: Sequence[int] | Literal["auto"] = "auto",
        channel_multiple: int = 1,
        granularity: Literal["auto", "channels", "heads_and_channels"] = "auto",
        measured: bool = False,
    ) -> None:
        self.target_sparsity = target_sparsity
        self.schedule = schedule
        self.prune_rounds = prune_rounds
        self.dense_layers = dense_layers
        self.channel_multiple = channel_multiple
        self.shape = shape
        self.module_shapes = dict(module_shapes)
        self.rounds = rounds
        self.module_info: dict[str, tuple[int, str]] = {}
        """Per adapted module, its (layer, projection name)."""
        for module in module_shapes:
            match = MODULE_NAME.search(module)
            if match is None:
                raise ValueError(f"fedspine prunes Llama-family decoder projections; cannot place '{module}'")
            self.module_info[module] = (int(match.group(1)), match.group(2))
        heads, channels = initial_scores
        self.head_scores = [_unit_mean(h.float()) for h in heads]
        self.channel_scores = [_unit_mean(c.float()) for c in channels]
        auto_heads = granularity == "auto" and shape.kv_heads >= 8
        self.prune_heads = granularity == "heads_and_channels" or auto_heads
        self.observed = measured
        """Whether the importance has been measured (until then devices train densely: calibration)."""
        self.first_pruned_round: int | None = None
        self.channel_means: list[torch.Tensor] | None = None
        """Per layer, the devices' mean input of every MLP channel (None until measured)."""
        self._plans: dict[float, PruningPlan] = {}

    def sparsity(self, round_no: int) -> float:
        """The schedule's sparsity floor in ``round_no``, counted from the first pruned round."""
        if self.schedule == "oneshot":
            return self.target_sparsity
        start = self.first_pruned_round or 1
        horizon = self.prune_rounds or max(1, (self.rounds + 1) // 2)
        progress = min((round_no - start + 1) / horizon, 1.0)
        return self.target_sparsity * (1.0 - (1.0 - progress) ** 3)

    def ratio_of(self, arm: Arm, round_no: int | None = None) -> float:
        """The pruning ratio of ``arm``: the floor in ``round_no`` (None: the target) plus its extra ratio."""
        floor = self.target_sparsity if round_no is None else self.sparsity(round_no)
        return min(floor + arm.ratio, MAX_RATIO)

    def plan_for(self, ratio: float) -> PruningPlan:
        """The nested plan that prunes ``ratio`` of every pruned layer by the current global importance."""
        key = round(ratio, 6)
        if key not in self._plans:
            plan = plan_from_scores(
                self.head_scores,
                self.channel_scores,
                ratio,
                dense_layer_indices(self.dense_layers, self.shape.layers),
                self.channel_multiple,
            )
            if not self.prune_heads:
                every = tuple(range(self.shape.kv_heads))
                plan = {layer: LayerKeep(every, keep.channels) for layer, keep in plan.items()}
            self._plans[key] = plan
        return self._plans[key]

    def rescored(self) -> None:
        """The importance changed: plans are recomputed, and pruning may begin."""
        self._plans.clear()
        self.observed = True

    def module_index(self, plan: PruningPlan, module: str) -> tuple[int, torch.Tensor] | None:
        """``(dim, kept indices)`` of ``module`` under ``plan`` (dim 0 rows, 1 columns), None if dense."""
        layer, proj = self.module_info[module]
        keep = plan.get(layer)
        if keep is None:
            return None
        return (1 if proj in COLUMN_MODULES else 0), layer_index_map(keep, self.shape)[proj]

    def is_column(self, module: str) -> bool:
        """Whether ``module``'s pruned units are input columns (o/down) rather than output rows."""
        return self.module_info[module][1] in COLUMN_MODULES

    def kept_shapes(self, plan: PruningPlan) -> ModuleShapes:
        """``(out, in)`` of every adapted module of the submodel ``plan`` describes."""
        shapes = {}
        for module, (out_f, in_f) in self.module_shapes.items():
            index = self.module_index(plan, module)
            if index is None:
                shapes[module] = (out_f, in_f)
            else:
                dim, kept = index
                shapes[module] = (kept.numel(), in_f) if dim == 0 else (out_f, kept.numel())
        return shapes

    def ratio_of_plan(self, plan: PruningPlan) -> float:
        """The channel ratio ``plan`` prunes from its pruned layers (0 for the dense model)."""
        if not plan:
            return 0.0
        keep = next(iter(plan.values()))
        return 1.0 - len(keep.channels) / self.shape.intermediate


def _unit_mean(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` scaled to mean 1 (all-zero scores become all ones)."""
    mean = scores.mean()
    return scores / mean if mean > 0 else torch.ones_like(scores)


__all__ = ["MAX_RATIO", "PruningMasks"]
