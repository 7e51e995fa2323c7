"""FedSpine: federated prune-and-tune with a per-device (pruning ratio, LoRA rank) policy.

Specification: algorithms.md §1.4.

Round t, for each selected device i:

1. the policy picks an arm ``(e_i, r_i)``: the device prunes ``p_i = s_t + e_i``, the schedule's
   sparsity floor (cubic: ``s_t = s_final (1 - (1 - t / T_p)^3)``, or one-shot) plus an extra ratio,
   and trains LoRA rank ``r_i`` at the device's alpha (scale ``alpha / r_i``: the update's size does
   not depend on the rank, so rank arms differ in cost and capacity, not in learning rate);
2. the device's submodel keeps the top ``1 - p_i`` MLP channels (and KV groups, when the model has
   enough of them: ``granularity``) of every pruned layer by the global importance ``I`` (nested: a
   less pruned device's kept set contains a more pruned one's; with ``freeze_mask`` the order is fixed
   after calibration, so masks also only shrink over time);
3. it trains a fresh rank-``r_i`` LoRA on the physically pruned submodel, measures importance on its
   kept units, scores the trained submodel on a held-out local batch, and uploads factors (pruned
   coordinates) + importance + that loss;
4. the server scatters every update to full coordinates and aggregates **coverage-normalised**: a
   coordinate is averaged over the devices that kept it,
   ``dW[j] = sum_i w_i m_i[j] s_i (B_i A_i)[j] / sum_i w_i m_i[j]``, exactly, by stacking
   ``[P_1 B_1, ...] [w_1 s_1 A_1; ...]`` (FLoRA) and scaling B's rows (q/k/v/gate/up) or A's columns
   (o/down) by ``1 / coverage``; the server adds it to the exact sum ``S`` of every round's aggregate,
   and the base (full coordinates) becomes the pretrained weights plus ``G``, the best rank-``R``
   approximation of ``S`` (``global_rank``, by default the largest rank a device trains): a device
   downloads ``G``'s factors on the coordinates it keeps, about FedIT's downlink, however many rounds
   it missed, and what ``G`` leaves out stays in ``S`` for the next round (error feedback). With
   ``global_rank = 0`` the base carries ``S`` itself and a device downloads every merge it missed;
5. the global importance moves towards the devices' scores: ``I <- b I + (1 - b) I_obs`` on covered
   units, each device's scores rescaled so that their mean over its kept units equals ``I``'s there
   (importance scales differ between devices, only the order within a layer matters);
6. the policy observes each task's time ``T`` (and the part the device spent training) and reward
   ``Q * D / max(T, D)`` (``Q = exp(-loss)`` of the trained submodel on held-out local data, divided
   by the round's mean: the quality of what the arm trains, not how fast it recovered from its own
   pruning, 1 when the device held no batch out; ``D`` the deadline, or the round's median task time),
   or -1 for a task that ran out of memory or was late. The default policy (``paced``) uses only the
   times: each device plays the least pruned arm its measured speed keeps within the deadline, or
   within the median device's time.

Until the first importance scores arrive, devices train the dense model and measure importance (a
calibration round): measured on SmolLM2-135M, pruning 30% by weight magnitude raised the held-out loss
from 2.44 to 5.54, by FLAP or LoRA-guided Taylor scores from one local task's data to 2.26 and 2.27
(``bench/pruning_damage.py``). The schedule then starts from the first pruned round. With ``importance =
"magnitude"`` pruning starts at once.

In every synchronous round the selected device the policy predicts fastest at the floor trains exactly
the floor's mask (the round's anchor, :meth:`FedSpine.begin_round`), so every unit of the evaluated
model is trained every round, whatever arms the others play.

The global model is evaluated pruned at ``s_final`` from the first pruned round on (equal sparsity with
the baselines). At the end every device deploys the base pruned at ``s_final`` plus its policy's best
extra ratio. Prune-then-tune and FedMP-like fixed ratios are the same machinery with a one-shot
schedule and a frozen mask, or a fixed policy with a moving mask.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch

from fedspine.algorithms.lora_math import best_rank, fresh_factors, stack_factors
from fedspine.algorithms.policies import Arm, Outcome, Policy
from fedspine.algorithms.strategies.base import (
    STRATEGIES,
    Assignment,
    Dispatch,
    ModuleShapes,
    Strategy,
    Weighting,
)
from fedspine.algorithms.strategies.masks import PruningMasks
from fedspine.model.pruning import PruningPlan
from fedspine.types import ClientUpdate, DeviceLora, LoraState, TaskResult, TaskStatus

FLOAT_BYTES = 4
INDEX_BYTES = 4


K = TypeVar("K")
LayerSums = dict[int, torch.Tensor]
"""Per layer, a sum of per-unit values."""


@dataclass(frozen=True)
class BaseSync:
    """What a device receives before a task to bring its base up to the server's on its kept units.

    Attributes:
        device_id: the device.
        since, until: the merges ``since <= v < until`` it missed.
        plan: what it keeps now.
        previous: what it kept at its last task (None: it holds only the pretrained model).
    """

    device_id: int
    since: int
    until: int
    plan: PruningPlan
    previous: PruningPlan | None


@dataclass
class CoverageSum:
    """Partial: stacked full-coordinate blocks, per-coordinate coverage, and importance sums."""

    blocks: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = field(default_factory=dict)
    coverage: dict[str, torch.Tensor] = field(default_factory=dict)
    head_sums: dict[int, torch.Tensor] = field(default_factory=dict)
    head_cover: dict[int, torch.Tensor] = field(default_factory=dict)
    channel_sums: dict[int, torch.Tensor] = field(default_factory=dict)
    channel_cover: dict[int, torch.Tensor] = field(default_factory=dict)
    mean_sums: dict[int, torch.Tensor] = field(default_factory=dict)
    mean_cover: dict[int, torch.Tensor] = field(default_factory=dict)
    weight: float = 0.0

    def merge(self, other: CoverageSum) -> CoverageSum:
        for module, blocks in other.blocks.items():
            self.blocks.setdefault(module, []).extend(blocks)
        for mine, theirs in (
            (self.coverage, other.coverage),
            (self.head_sums, other.head_sums),
            (self.head_cover, other.head_cover),
            (self.channel_sums, other.channel_sums),
            (self.channel_cover, other.channel_cover),
            (self.mean_sums, other.mean_sums),
            (self.mean_cover, other.mean_cover),
        ):
            for key, value in theirs.items():
                mine[key] = mine[key] + value if key in mine else value.clone()  # type: ignore[index]
        self.weight += other.weight
        return self


def _add(table: dict[K, torch.Tensor], key: K, value: torch.Tensor) -> None:
    table[key] = table[key] + value if key in table else value.clone()


@STRATEGIES.register("fedspine")
class FedSpine(Strategy):
    """Iterative prune-and-tune with coverage-normalised exact aggregation merged into the base."""

    name = "fedspine"
    prunes = True

    def __init__(
        self,
        weighting: Weighting,
        masks: PruningMasks,
        policy: Policy,
        work_model: Callable[[PruningPlan, int], float] | None = None,
        *,
        name: str = "fedspine",
        measure_importance: bool = True,
        freeze_mask: bool = True,
        score_momentum: float = 0.9,
        compensate: bool = False,
        global_rank: int | Literal["auto"] = "auto",
    ) -> None:
        """
        Args:
            weighting: how updates are weighted.
            masks: the unit order and schedule.
            policy: who picks each device's (extra ratio, rank) arm; a fixed policy's ratios are the
                experiment (no round anchor overrides them).
            work_model: ``(plan, rank) -> training work`` relative to the dense model at the largest
                rank, from the model's FLOPs (None: every arm costs 1).
            name: the method these settings make (:data:`PRESETS`): fedspine, prune_then_tune, fedmp.
            measure_importance: devices measure unit importance on their data (FLAP, Taylor); False
                when the masks' initial scores are the importance (magnitude).
            freeze_mask: fix the unit order once importance is observed (masks only shrink).
            score_momentum: ``b`` of the global importance EMA while the mask may move.
            compensate: keep pruned MLP channels' mean outputs as biases (FLAP's compensation).
            global_rank: rank of the model change devices download (0: exact merges; ``auto``: the
                largest rank a device trains).
        """
        super().__init__(weighting)
        self.name = name
        self.masks = masks
        self.measure_importance = measure_importance
        self.freeze_mask = freeze_mask
        self.score_momentum = score_momentum
        self.compensate = compensate
        self.configured_rank = global_rank
        self.policy = policy
        self.work_model = work_model
        self._assigned: dict[int, tuple[Arm, PruningPlan]] = {}
        self._version = 0
        self._ranks_per_version: list[dict[str, int]] = []
        self._last_sync: dict[int, int] = {}
        self._last_plan: dict[int, PruningPlan] = {}
        self.sync_log: list[BaseSync] = []
        """Every :class:`BaseSync` dispatched, in order (what the downlink bytes are charged for)."""
        self._pending: dict[str, torch.Tensor] | None = None
        self.coverage: dict[tuple[str, int], torch.Tensor] = {}
        """Per (``"heads"`` or ``"channels"``, layer), how many accepted updates trained each unit since
        the first pruned round."""
        self._warmup: set[int] = set()
        self.rewards: list[dict[str, float | None]] = []
        """Every reward the policy observed: round, device, arm, ratio, reward, quality (a trace)."""
        self._anchor: int | None = None
        self.global_rank = 0
        """Rank of the change devices download (0: exact merges), resolved by :meth:`init_global`."""
        self.exact_sum: dict[str, torch.Tensor] = {}
        """With a bounded ``global_rank``: per module, the sum of every round's exact aggregate."""
        self.adapter: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        """With a bounded ``global_rank``: per module, ``(A, B)`` of the best rank-``global_rank``
        approximation of :attr:`exact_sum`, which is what the base carries beyond the pretrained model."""

    def init_global(self, shapes: ModuleShapes, rank: int, generator: torch.Generator) -> None:
        """Check the modules; resolve ``global_rank = "auto"`` to ``rank``, the largest a device trains."""
        if dict(shapes) != self.masks.module_shapes:
            raise ValueError("the engine's adapted modules differ from those the masks were built for")
        configured = self.configured_rank
        self.global_rank = rank if configured == "auto" else configured

    # --- schedule, masks, assignment --------------------------------------------------------------

    def plan_for(self, ratio: float) -> PruningPlan:
        """The nested plan that prunes ``ratio`` of every pruned layer (:meth:`PruningMasks.plan_for`)."""
        return self.masks.plan_for(ratio)

    def channel_means(self) -> list[torch.Tensor] | None:
        """With ``compensate``, the mean MLP channel inputs that pruned models keep as biases."""
        return self.masks.channel_means if self.compensate else None

    def begin_round(self, round: int, device_ids: Sequence[int]) -> None:
        """Pick the round's anchor: the selected device predicted fastest at the floor trains exactly the
        floor's mask (at the rank its policy picks), so every unit of the evaluated model is trained in
        every synchronous round, whatever the other devices' arms."""
        self._anchor = None
        if not device_ids or self.policy.name == "fixed":
            return  # a fixed policy's ratios are the experiment: none is overridden
        floor = Arm(0.0, min(a.rank for a in self.policy.arms))
        predicted = {d: self.policy.predicted_seconds(d, floor) for d in device_ids}
        known = {d: t for d, t in predicted.items() if t is not None}
        self._anchor = min(known, key=lambda d: (known[d], d)) if known else device_ids[0]

    def assign(self, round: int, device_id: int, lora: DeviceLora) -> Assignment:
        masks = self.masks
        if not masks.observed:
            # No device has measured importance yet: train the dense model and measure it (calibration).
            arm = Arm(0.0, self.policy.choose(device_id, 0.0).rank)
            ratio = 0.0
            self._warmup.add(device_id)
        else:
            masks.first_pruned_round = masks.first_pruned_round or round
            arm = self.policy.choose(device_id, 0.0)
            if device_id == self._anchor:
                arm = Arm(0.0, arm.rank)
            ratio = masks.ratio_of(arm, round)
        plan = self.plan_for(ratio)
        self._assigned[device_id] = (arm, plan)
        measure = self.measure_importance and not (self.freeze_mask and masks.observed)
        return Assignment(DeviceLora(arm.rank, lora.alpha / arm.rank), plan, ratio, measure)

    def eval_plan(self) -> PruningPlan | None:
        """The deployable model: pruned at the target sparsity once importance has been observed."""
        return self.plan_for(self.masks.target_sparsity) if self.masks.observed else None

    def device_eval_plan(self, device_id: int) -> PruningPlan | None:
        """The model ``device_id`` would deploy now (:meth:`deployment`), once importance is observed."""
        if not self.masks.observed:
            return None
        return self.plan_for(self.deployment([device_id])[device_id].ratio)

    def deployment(self, device_ids: Sequence[int]) -> dict[int, Arm]:
        """Each device's final model: the target sparsity plus its policy's best extra ratio, at the
        policy's best rank (as an arm of absolute ratio)."""
        deployed = {}
        for d in device_ids:
            best = self.policy.best(d, 0.0)
            deployed[d] = Arm(self.masks.ratio_of(best), best.rank)
        return deployed

    # --- dispatch --------------------------------------------------------------------------------

    def configure(self, round: int, device_id: int, lora: DeviceLora, generator: torch.Generator) -> Dispatch:
        _, plan = self._assigned[device_id]
        kept = self.masks.kept_shapes(plan)
        state: LoraState = {}
        for module, (out_f, in_f) in kept.items():
            a, b = fresh_factors(out_f, in_f, lora.rank, generator)
            state[module] = {"A": a, "B": b}
        sync = self.base_sync(device_id, plan)
        nbytes = self._downlink_bytes(sync, kept)
        self._last_sync[device_id] = self._version
        self._last_plan[device_id] = plan
        self.sync_log.append(sync)
        return Dispatch(state, nbytes)

    def base_sync(self, device_id: int, plan: PruningPlan) -> BaseSync:
        """What ``device_id`` must receive now for its base to equal the server's on what ``plan`` keeps.

        A device holds the pretrained dense model and, on the units it kept at its last task, every
        merge up to then. It needs the merges since then on the units it keeps now and kept then, and
        the server's current rows (or columns) of the units it keeps now but did not keep then.
        """
        return BaseSync(
            device_id,
            since=self._last_sync.get(device_id, 0),
            until=self._version,
            plan=plan,
            previous=self._last_plan.get(device_id),
        )

    def fresh_units(self, sync: BaseSync, module: str) -> torch.Tensor:
        """Rows (q/k/v/gate/up) or columns (o/down) of ``module`` kept now but not at the last sync."""
        out_f, in_f = self.masks.module_shapes[module]
        size = in_f if self.masks.is_column(module) else out_f
        if sync.previous is None or sync.until == 0:
            return torch.empty(0, dtype=torch.long)  # pretrained and never merged since: current
        now = self.masks.module_index(sync.plan, module)
        before = self.masks.module_index(sync.previous, module)
        kept_now = torch.arange(size) if now is None else now[1]
        kept_before = torch.arange(size) if before is None else before[1]
        return kept_now[~torch.isin(kept_now, kept_before)]

    def _downlink_bytes(self, sync: BaseSync, kept: ModuleShapes) -> int:
        """What the device must receive, in bytes, besides (with ``compensate``) every layer's channel
        means and, when its plan changed, the plan's indices.

        Bounded ``global_rank``: the adapter's factors on the kept coordinates, ``R (kept_out +
        kept_in)`` floats per module, unless the device already holds them (no merge since its last
        task and the same plan). Exact merges: every missed merge's stacked factors on the kept
        coordinates (capped by the kept dense weights) and the current base's newly kept rows or columns.
        """
        shape = self.masks.shape
        means = 0 if self.channel_means() is None else FLOAT_BYTES * shape.intermediate * shape.layers
        changed = sync.previous is not sync.plan
        indices = INDEX_BYTES * sum(len(k.kv_groups) + len(k.channels) for k in sync.plan.values())
        if self.global_rank > 0:
            current = sync.since == sync.until and not changed
            adapter = (
                0
                if current
                else sum(
                    FLOAT_BYTES * self.adapter[m][0].shape[0] * (o + i)
                    for m, (o, i) in kept.items()
                    if m in self.adapter
                )
            )
            return adapter + means + (indices if changed else 0)
        missed = self._ranks_per_version[sync.since : sync.until]
        merges = sum(
            FLOAT_BYTES * ranks.get(m, 0) * (o + i) for ranks in missed for m, (o, i) in kept.items()
        )
        merges = min(merges, sum(FLOAT_BYTES * o * i for o, i in kept.values()))
        if not changed:
            return merges + means
        fresh = 0
        for module, (out_f, in_f) in self.masks.module_shapes.items():
            rows = not self.masks.is_column(module)
            fresh += FLOAT_BYTES * self.fresh_units(sync, module).numel() * (in_f if rows else out_f)
        return merges + means + fresh + indices

    # --- aggregation -----------------------------------------------------------------------------

    def global_lora(self) -> LoraState:
        return {}  # carried by the base weights (the pretrained model plus the bounded adapter)

    def take_base_delta(self) -> dict[str, torch.Tensor] | None:
        pending, self._pending = self._pending, None
        return pending

    def init_partial(self) -> CoverageSum:
        return CoverageSum()

    def accumulate(self, partial: CoverageSum, update: ClientUpdate) -> CoverageSum:
        weight = self.update_weight(update)
        plan: PruningPlan = update.plan or {}
        for module, factors in update.lora_state.items():
            a, b = factors["A"].to(torch.float32), factors["B"].to(torch.float32)
            out_f, in_f = self.masks.module_shapes[module]
            index = self.masks.module_index(plan, module)
            if index is None:
                cover = torch.full((in_f if self.masks.is_column(module) else out_f,), weight)
            else:
                dim, kept = index
                size = out_f if dim == 0 else in_f
                if dim == 0:
                    b = b.new_zeros(out_f, b.shape[1]).index_copy_(0, kept, b)
                else:
                    a = a.new_zeros(a.shape[0], in_f).index_copy_(1, kept, a)
                cover = torch.zeros(size).index_fill_(0, kept, weight)
            partial.blocks.setdefault(module, []).append((a, b, weight * update.lora_scaling))
            _add(partial.coverage, module, cover)
        frozen = self.freeze_mask and self.masks.observed
        if update.importance is not None and not frozen:
            self._accumulate_importance(partial, update, plan, weight)
        if self.masks.observed and update.plan is not None:
            self._count_coverage(plan)
        partial.weight += weight
        return partial

    def _count_coverage(self, plan: PruningPlan) -> None:
        """Add one to every unit ``plan`` keeps (a dense layer keeps all of its units)."""
        shape = self.masks.shape
        for layer in range(shape.layers):
            keep = plan.get(layer)
            for kind, size, kept in (
                ("heads", shape.kv_heads, None if keep is None else keep.kv_groups),
                ("channels", shape.intermediate, None if keep is None else keep.channels),
            ):
                counts = self.coverage.setdefault((kind, layer), torch.zeros(size, dtype=torch.long))
                if kept is None:
                    counts += 1
                else:
                    counts[list(kept)] += 1

    def untrained_units(self, plan: PruningPlan) -> int:
        """How many units ``plan`` keeps that no accepted update trained since pruning began."""
        missing = 0
        shape = self.masks.shape
        for layer in range(shape.layers):
            keep = plan.get(layer)
            for kind, size, kept in (
                ("heads", shape.kv_heads, None if keep is None else keep.kv_groups),
                ("channels", shape.intermediate, None if keep is None else keep.channels),
            ):
                counts = self.coverage.get((kind, layer), torch.zeros(size, dtype=torch.long))
                index = list(range(size)) if kept is None else list(kept)
                missing += int((counts[index] == 0).sum())
        return missing

    def _accumulate_importance(
        self, partial: CoverageSum, update: ClientUpdate, plan: PruningPlan, w: float
    ) -> None:
        masks = self.masks
        kinds: list[
            tuple[
                str,
                list[torch.Tensor],
                list[torch.Tensor] | None,
                dict[int, torch.Tensor],
                dict[int, torch.Tensor],
            ]
        ] = [
            ("heads", update.importance["heads"], masks.head_scores, partial.head_sums, partial.head_cover),
            (
                "channels",
                update.importance["channels"],
                masks.channel_scores,
                partial.channel_sums,
                partial.channel_cover,
            ),
        ]
        if "means" in update.importance:  # channel means (compensation) are averaged as they are
            kinds.append(("means", update.importance["means"], None, partial.mean_sums, partial.mean_cover))
        for kind, observed, current, sums, cover in kinds:
            for layer, scores in enumerate(observed):
                keep = plan.get(layer)
                size = scores.numel()
                kept = (
                    torch.arange(size)
                    if keep is None
                    else torch.tensor(keep.kv_groups if kind == "heads" else keep.channels, dtype=torch.long)
                )
                mask = torch.zeros(size).index_fill_(0, kept, 1.0)
                scale: float | torch.Tensor = 1.0
                if current is not None:
                    seen = scores.float()[kept].mean()
                    scale = current[layer][kept].mean() / seen if seen > 0 else torch.tensor(0.0)
                _add(sums, layer, w * mask * scores.float() * scale)
                _add(cover, layer, w * mask)

    def finalize(self, partial: CoverageSum) -> None:
        if partial.weight <= 0:
            return
        deltas, ranks = {}, {}
        for module, blocks in partial.blocks.items():
            a_s, b_s = stack_factors(blocks)
            inverse = torch.where(partial.coverage[module] > 0, 1.0 / partial.coverage[module], 0.0)
            if self.masks.is_column(module):
                a_s.mul_(inverse[None, :])
            else:
                b_s.mul_(inverse[:, None])
            deltas[module] = b_s @ a_s
            ranks[module] = a_s.shape[0]
        self._pending = self._bounded(deltas) if self.global_rank > 0 else deltas
        self._ranks_per_version.append(ranks)
        self._version += 1
        self._update_importance(partial)

    def _bounded(self, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the round's exact aggregates to :attr:`exact_sum`; return the change that moves each
        module's base from the old adapter to the sum's new best rank-``global_rank`` approximation
        (error feedback: what the approximation leaves out stays in the sum)."""
        changes = {}
        for module, delta in deltas.items():
            total = self.exact_sum[module].add_(delta) if module in self.exact_sum else delta.clone()
            self.exact_sum[module] = total
            a, b = best_rank(total, self.global_rank)
            change = b @ a
            if module in self.adapter:
                old_a, old_b = self.adapter[module]
                change -= old_b @ old_a
            self.adapter[module] = (a, b)
            changes[module] = change
        return changes

    def _update_importance(self, partial: CoverageSum) -> None:
        beta = self.score_momentum
        masks = self.masks
        means_beta = beta  # the first measured channel means are taken as they are
        if partial.mean_sums and masks.channel_means is None:
            masks.channel_means = [torch.zeros(masks.shape.intermediate) for _ in range(masks.shape.layers)]
            means_beta = 0.0
        for sums, cover, values, momentum in (
            (partial.head_sums, partial.head_cover, masks.head_scores, beta),
            (partial.channel_sums, partial.channel_cover, masks.channel_scores, beta),
            (partial.mean_sums, partial.mean_cover, masks.channel_means or [], means_beta),
        ):
            for layer, total in sums.items():
                seen = cover[layer] > 0
                observed = total[seen] / cover[layer][seen]
                values[layer][seen] = momentum * values[layer][seen] + (1 - momentum) * observed
        if partial.head_sums or partial.channel_sums:
            masks.rescored()

    # --- policy feedback -------------------------------------------------------------------------

    def end_round(self, round: int, results: Sequence[TaskResult], deadline: float) -> None:
        """Turn the round's outcomes into rewards for the policy (see the module docstring)."""
        qualities = [
            math.exp(-r.update.probe_loss)
            for r in results
            if r.status == TaskStatus.OK and r.update is not None and r.update.probe_loss is not None
        ]
        mean_quality = statistics.fmean(qualities) if qualities else 0.0
        times = [r.seconds for r in results if r.status == TaskStatus.OK]
        cap = deadline if deadline > 0 else (statistics.median(times) if times else 0.0)
        for r in results:  # each device's task ends here: asynchronous schedulers report tasks one by one
            if r.device_id not in self._assigned:
                continue
            arm, plan = self._assigned.pop(r.device_id)
            if r.device_id in self._warmup:
                self._warmup.discard(r.device_id)
                continue  # a calibration task: the policy did not choose its ratio
            work = self.relative_work(plan, arm.rank)
            if r.status in (TaskStatus.OOM, TaskStatus.LATE):
                seconds = r.seconds if r.status != TaskStatus.OOM else 0.0
                outcome = Outcome(-1.0, seconds, None, cap, True, work, r.compute_seconds)
            elif r.status != TaskStatus.OK or r.update is None:
                continue
            else:  # without a probe (too little local data to hold a batch out) only the time counts
                probe = r.update.probe_loss
                quality = math.exp(-probe) / mean_quality if probe is not None and mean_quality > 0 else None
                reward = (1.0 if quality is None else quality) * cap / max(r.seconds, cap, 1e-9)
                outcome = Outcome(
                    reward, r.seconds, quality, cap, work=work, compute_seconds=r.compute_seconds
                )
            self.policy.observe(r.device_id, arm, outcome)
            self.rewards.append(
                {
                    "round": round,
                    "device_id": r.device_id,
                    "extra_ratio": arm.ratio,
                    "ratio": self.masks.ratio_of_plan(plan),
                    "rank": arm.rank,
                    "reward": outcome.reward,
                    "quality": outcome.quality,
                }
            )

    def relative_work(self, plan: PruningPlan, rank: int) -> float:
        """Training work of ``plan`` at ``rank`` relative to the dense model at the largest rank arm,
        from the model's shapes (what the server knows without any device profile)."""
        return self.work_model(plan, rank) if self.work_model is not None else 1.0


__all__ = ["BaseSync", "CoverageSum", "FedSpine"]
