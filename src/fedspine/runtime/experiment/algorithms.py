"""Building a run's algorithms from its config: the strategy, each device's LoRA rank, FedSpine's
policy and its time and work predictors, the scheduler, the stale-update handler and the uplink codec."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import fedspine.algorithms.schedulers as schedulers
import fedspine.algorithms.strategies as strategies
from fedspine.algorithms.compression import ErrorFeedback, UplinkChannel, make_codec
from fedspine.algorithms.policies import (
    POLICIES,
    Arm,
    FixedPolicy,
    OraclePolicy,
    PacedPolicy,
    Policy,
    PooledUCB,
    RandomPolicy,
    SlidingWindowUCB,
)
from fedspine.algorithms.robust import ROBUST_RULES, RobustRule
from fedspine.algorithms.schedulers import Limits, Scheduler, SyncScheduler
from fedspine.algorithms.staleness import StalenessFunction, StaleUpdateHandler, make_handler
from fedspine.algorithms.strategies import FedSpine, Strategy
from fedspine.algorithms.strategies.base import ModuleShapes, Weighting
from fedspine.algorithms.strategies.masks import PruningMasks
from fedspine.algorithms.strategies.presets import PRESETS
from fedspine.config import Config, FedSpineSection
from fedspine.errors import ConfigError
from fedspine.fleet.cost import CostModel
from fedspine.model.footprint import ModelShape
from fedspine.model.importance import Scores
from fedspine.model.pruning import PruningPlan
from fedspine.runtime.experiment.model import TaskWorkloads
from fedspine.types import Device, DeviceLora


def strategy_class(cfg: Config) -> type[Strategy]:
    """The configured strategy's class: what the checks before the model loads need (its capabilities)."""
    return strategies.STRATEGIES.get(cfg.strategy.name, "strategy.name")


def build_strategy(cfg: Config) -> Strategy:
    """The configured strategy; its own sub-table (e.g. ``[strategy.hetlora]``) supplies its parameters.

    The pruning strategies need the model: :func:`build_pruning_strategy`.
    """
    cls = strategy_class(cfg)
    if issubclass(cls, FedSpine):
        raise TypeError(f"'{cfg.strategy.name}' prunes the model: build it with build_pruning_strategy")
    params = getattr(cfg.strategy, cfg.strategy.name, None)
    is_table = dataclasses.is_dataclass(params) and not isinstance(params, type)
    kwargs = dataclasses.asdict(params) if is_table else {}  # type: ignore[arg-type]
    return cls(weighting=cfg.strategy.weighting, **kwargs)


def build_pruning_strategy(
    cfg: Config,
    shape: ModelShape,
    shapes: ModuleShapes,
    initial_scores: Scores,
    workloads: TaskWorkloads,
    devices: Sequence[Device],
    device_lora: dict[int, DeviceLora],
) -> FedSpine:
    """fedspine, prune_then_tune or fedmp: the masks from the model, then the policy and its predictors
    (which read plans from the masks), then the strategy. They share ``[strategy.fedspine]``."""
    settings = fedspine_settings(cfg)
    masks = pruning_masks(settings, shape, shapes, initial_scores, cfg.scheduler.rounds)
    predict = TimePredictor(masks, workloads, devices, cfg.train.local_steps)
    work = RelativeWork(masks, workloads, max(settings.ranks))
    deadline = cfg.scheduler.deadline_seconds if cfg.scheduler.name == "sync" else 0.0
    policy = build_policy(settings, cfg.run.seed, devices, device_lora, predict, work, deadline)
    return pruning_strategy(cfg.strategy.name, cfg.strategy.weighting, settings, masks, policy, work.of_plan)


def fedspine_settings(cfg: Config) -> FedSpineSection:
    """``[strategy.fedspine]`` with the configured pruning method's preset applied (:data:`PRESETS`)."""
    if cfg.strategy.name not in PRESETS:
        raise TypeError(f"'{cfg.strategy.name}' is not a pruning method")
    preset, section = PRESETS[cfg.strategy.name], cfg.strategy.fedspine
    return dataclasses.replace(
        section,
        schedule=preset.schedule or section.schedule,
        freeze_mask=section.freeze_mask if preset.freeze_mask is None else preset.freeze_mask,
        policy=preset.policy or section.policy,
    )


def pruning_masks(
    settings: FedSpineSection,
    shape: ModelShape,
    shapes: ModuleShapes,
    initial_scores: Scores,
    rounds: int,
) -> PruningMasks:
    """The unit order and schedule ``settings`` (``[strategy.fedspine]``, preset applied) describe."""
    return PruningMasks(
        shape,
        shapes,
        initial_scores,
        rounds,
        target_sparsity=settings.target_sparsity,
        schedule=settings.schedule,
        prune_rounds=settings.prune_rounds,
        dense_layers=settings.dense_layers,
        channel_multiple=settings.channel_multiple,
        granularity=settings.granularity,
        measured=settings.importance == "magnitude",
    )


def pruning_strategy(
    name: str,
    weighting: Weighting,
    settings: FedSpineSection,
    masks: PruningMasks,
    policy: Policy,
    work_model: Callable[[PruningPlan, int], float] | None = None,
) -> FedSpine:
    """The pruning method ``name`` with ``settings`` (``[strategy.fedspine]``, preset applied)."""
    return FedSpine(
        weighting,
        masks,
        policy,
        work_model,
        name=name,
        measure_importance=settings.importance != "magnitude",
        freeze_mask=settings.freeze_mask,
        score_momentum=settings.score_momentum,
        compensate=settings.compensates,
        global_rank=settings.global_rank,
    )


def build_device_lora(
    cfg: Config, devices: Sequence[Device], strategy: type[Strategy]
) -> dict[int, DeviceLora]:
    """Each device's LoRA rank (per device, per class, or the default) and scaling."""
    lora = cfg.lora
    if lora.ranks and len(lora.ranks) != len(devices):
        raise ConfigError("lora.ranks", f"has {len(lora.ranks)} entries for {len(devices)} devices")
    if lora.alphas and len(lora.alphas) != len(devices):
        raise ConfigError("lora.alphas", f"has {len(lora.alphas)} entries for {len(devices)} devices")
    unknown = sorted(set(lora.class_ranks) - {d.device_class.name for d in devices})
    if unknown:
        raise ConfigError(f"lora.class_ranks.{unknown[0]}", "no device of this class in the fleet")
    table = {}
    for d in devices:
        rank = lora.ranks[d.device_id] if lora.ranks else lora.class_ranks.get(d.device_class.name, lora.rank)
        alpha = lora.alphas[d.device_id] if lora.alphas else lora.alpha / lora.rank * rank
        table[d.device_id] = DeviceLora(rank=rank, scaling=alpha / rank)
    if strategy.uniform_rank_only and len({v.rank for v in table.values()}) > 1:
        raise ConfigError(
            "lora.ranks",
            f"strategy '{strategy.name}' needs one rank for every device; "
            "use zeropad, hetlora, flexlora or flora for heterogeneous ranks",
        )
    return table


def build_policy(
    settings: FedSpineSection,
    seed: int,
    devices: Sequence[Device],
    device_lora: dict[int, DeviceLora],
    predict_seconds: Callable[[int, Arm], float],
    relative_work: Callable[[Arm], float],
    deadline: float = 0.0,
) -> Policy:
    """The (extra ratio, rank) policy of a pruning strategy (``settings`` with its preset applied);
    ``deadline``: the synchronous rounds' deadline in seconds (0: none), the paced policy's pace.

    Arms' ratios are *extra* pruning beyond the schedule's floor (:meth:`PruningMasks.ratio_of`).
    """
    name = settings.policy
    POLICIES.get(name, "strategy.fedspine.policy")
    ratios, ranks = settings.extra_ratios, settings.ranks
    if name == "fixed":
        extra = 0.0 if settings.fixed_ratio < 0 else settings.fixed_ratio - settings.target_sparsity
        return FixedPolicy(
            ratios,
            ranks,
            {d.device_id: extra for d in devices},
            {i: lo.rank for i, lo in device_lora.items()},
        )
    if name == "random":
        return RandomPolicy(ratios, ranks, seed)
    if name == "oracle":
        return OraclePolicy(ratios, ranks, [d.device_id for d in devices], predict_seconds)
    if name == "paced":
        paced = PacedPolicy(ratios, ranks, relative_work, settings.window, deadline)
        paced.explore = settings.explore
        return paced
    bandit: Policy = (
        PooledUCB(ratios, ranks, relative_work, settings.window, settings.ucb_c)
        if name == "pooled"
        else SlidingWindowUCB(ratios, ranks, settings.window, settings.ucb_c)
    )
    bandit.explore = settings.explore
    return bandit


class TimePredictor:
    """Predicted task time of a device at an arm, from its profile (what only the oracle may read).

    A class rather than a closure, so a checkpoint can save the policy that holds it.
    """

    def __init__(
        self, masks: PruningMasks, workloads: TaskWorkloads, devices: Sequence[Device], local_steps: int
    ) -> None:
        self.masks, self.workloads, self.local_steps = masks, workloads, local_steps
        self.by_id = {d.device_id: d for d in devices}

    def __call__(self, device_id: int, arm: Arm) -> float:
        device = self.by_id[device_id]
        plan = self.masks.plan_for(self.masks.ratio_of(arm))
        workload = self.workloads.of(plan, arm.rank, self.local_steps, device.device_class.train_dtype_bytes)
        cost = CostModel.for_device(device)
        upload = 4 * arm.rank * sum(o + i for o, i in self.masks.kept_shapes(plan).values())
        return cost.train_seconds(workload, 1.0) + cost.transfer_seconds(upload, "up", 1.0)


class RelativeWork:
    """Training FLOPs relative to the dense model at the largest rank (model knowledge only).

    Called with an arm (the policy's prediction: the arm's ratio once the schedule reached its target)
    or through :meth:`of_plan` with the plan a task actually trained (the strategy's observation).
    """

    def __init__(self, masks: PruningMasks, workloads: TaskWorkloads, max_rank: int) -> None:
        self.masks, self.workloads = masks, workloads
        self.dense = workloads.of(None, max_rank, 1).flops

    def of_plan(self, plan: PruningPlan, rank: int) -> float:
        return self.workloads.of(plan, rank, 1).flops / self.dense

    def __call__(self, arm: Arm) -> float:
        return self.of_plan(self.masks.plan_for(self.masks.ratio_of(arm)), arm.rank)


def build_scheduler(cfg: Config, num_devices: int, strategy: type[Strategy]) -> Scheduler:
    """The configured scheduler.

    Synchronous: ``clients_per_round`` falls back to a fraction of the fleet. Asynchronous: the
    scheduler's own table supplies its parameters; combinations the strategy cannot run are
    rejected here, naming the key.
    """
    cls = schedulers.SCHEDULERS.get(cfg.scheduler.name, "scheduler.name")
    s = cfg.scheduler
    if cls is SyncScheduler:
        k = s.clients_per_round or max(1, round(s.clients_fraction * num_devices))
        return SyncScheduler(s.rounds, min(k, num_devices), s.over_selection, s.deadline_seconds, s.keep)
    if s.staleness.handler == "dcasgd" and not strategy.supports_compensation:
        raise ConfigError(
            "scheduler.staleness.handler",
            f"'dcasgd' compensates element-wise in a global adapter's coordinates; strategy "
            f"'{strategy.name}' has none (allowed here: identity, weight)",
        )
    momentum = s.fedbuff.server_momentum if cfg.scheduler.name == "fedbuff" else 0.0
    if momentum > 0 and not strategy.supports_compensation:
        raise ConfigError(
            "scheduler.fedbuff.server_momentum",
            f"server momentum adds up global-adapter steps; strategy '{strategy.name}' merges into the "
            "base or keeps SVD factors (use fedit, zeropad or hetlora, or momentum 0)",
        )
    concurrency = min(s.concurrency, num_devices) if s.concurrency else num_devices
    limits = Limits(s.rounds, cfg.train.local_steps, concurrency, s.max_updates, s.max_virtual_seconds)
    table = getattr(s, cfg.scheduler.name, None)
    is_table = dataclasses.is_dataclass(table) and not isinstance(table, type)
    kwargs = dataclasses.asdict(table) if is_table else {}  # type: ignore[arg-type]
    scheduler: Scheduler = cls(limits, **kwargs)
    return scheduler


def build_robust_rule(cfg: Config) -> RobustRule:
    """The registered ``server.robust`` rule with its ``[server]`` parameters.

    Raises:
        ConfigError: the name is not registered (the error lists those that are).
    """
    server = cfg.server
    return ROBUST_RULES.get(server.robust, "server.robust")(server.clip_norm, server.trim_fraction)


def check_robustness(cfg: Config, strategy: type[Strategy], device_lora: dict[int, DeviceLora]) -> None:
    """Robust rules and attacks that cannot apply to this run are config errors."""
    rule = cfg.server.robust
    if build_robust_rule(cfg).combines:
        if not cfg.scheduler.synchronous:
            raise ConfigError(
                "server.robust", f"'{rule}' combines a round's updates: needs scheduler.name = 'sync'"
            )
        if not strategy.has_global_adapter:
            raise ConfigError(
                "server.robust",
                f"'{rule}' needs a strategy with a global adapter (fedit, zeropad, hetlora, flexlora), "
                f"not {cfg.strategy.name}; use 'clip'",
            )
        if len({lora.rank for lora in device_lora.values()}) > 1:
            raise ConfigError("server.robust", f"'{rule}' needs one LoRA rank on every device; use 'clip'")
    attack = cfg.fleet.attack
    for i, device in enumerate(attack.devices):
        if device >= len(device_lora):
            raise ConfigError(
                f"fleet.attack.devices[{i}]", f"device {device} is not in the fleet of {len(device_lora)}"
            )


def build_stale_handler(cfg: Config) -> StaleUpdateHandler:
    """The configured stale-update handler."""
    st = cfg.scheduler.staleness
    return make_handler(st.handler, StalenessFunction(st.function, st.a, st.b), st.dcasgd_lambda)


def build_uplink(cfg: Config) -> UplinkChannel | None:
    """The compressed uplink, or None when nothing is compressed."""
    c = cfg.compression
    if c.codec == "none" and c.feedback == "none":
        return None
    return UplinkChannel(ErrorFeedback(make_codec(c.codec, c.ratio, c.levels), c.feedback, c.eta))
