"""Turn a :class:`~fedspine.config.Config` into the objects of a run (the only place that reads config).

The cheap checks come first (registered names, the fleet) so that a bad config fails in
milliseconds, before the model is loaded, and before anything is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedspine.algorithms.schedulers as schedulers
import fedspine.algorithms.strategies as strategies
from fedspine.algorithms.compression import ErrorFeedback, UplinkChannel, make_codec
from fedspine.algorithms.policies import (
    POLICIES,
    Arm,
    FixedPolicy,
    OraclePolicy,
    Policy,
    PooledUCB,
    RandomPolicy,
    SlidingWindowUCB,
)
from fedspine.algorithms.schedulers import Limits, Scheduler, SyncScheduler
from fedspine.algorithms.staleness import Identity, StalenessFunction, StaleUpdateHandler, make_handler
from fedspine.algorithms.strategies import FedSpine, Strategy
from fedspine.algorithms.strategies.fedspine import PRESETS
from fedspine.client.evaluate import EvalSet
from fedspine.client.objectives import ClassificationObjective, LanguageModelingObjective, Objective
from fedspine.config import BIBLE_GENRE_WORDS, BIBLE_PROMPT, Config
from fedspine.data import (
    ClassificationTask,
    EncodedDataset,
    Example,
    LanguageModelingTask,
    load_source,
    partition,
    top_labels,
    train_test_split,
    with_label,
)
from fedspine.errors import ConfigError, DataError, FleetError, ModelError
from fedspine.fleet import GroupSpec, build_fleet
from fedspine.fleet.availability import AlwaysOnline, AvailabilityTrace, make_trace
from fedspine.fleet.cost import CostModel
from fedspine.model.footprint import ModelShape, model_shape, train_workload
from fedspine.model.load import default_cache_dir, resolve_model, resolve_model_config
from fedspine.model.lora import apply_lora, module_shapes
from fedspine.model.pruning import PruningPlan, magnitude_scores, pruned_workload
from fedspine.runtime.executor import LocalTraining, SimExecutor
from fedspine.types import Device, DeviceLora, TrainWorkload

Status = Callable[[str], None]


@dataclass
class Experiment:
    """Everything a run needs, built and validated."""

    config: Config
    devices: list[Device]
    strategy: Strategy
    scheduler: Scheduler
    executor: SimExecutor
    objective: Objective
    test_data: EncodedDataset
    test_set: EvalSet
    """``test_data`` batched once, by length, for every evaluation."""
    partitions: list[np.ndarray]
    device_lora: dict[int, DeviceLora]
    module_shapes: dict[str, tuple[int, int]]
    task_name: str
    chance_level: float
    shape: ModelShape
    tokenizer: Any = None
    trace: AvailabilityTrace = field(default_factory=AlwaysOnline)
    stale_handler: StaleUpdateHandler = field(default_factory=Identity)
    uplink: UplinkChannel | None = None
    """Compressed uploads (None: the factors travel as they are)."""


def build_strategy(cfg: Config) -> Strategy:
    """The configured strategy; its own sub-table (e.g. ``[strategy.hetlora]``) supplies its parameters.

    The pruning strategies (fedspine, prune_then_tune, fedmp) share ``[strategy.fedspine]``.
    """
    factory = strategies.STRATEGIES.get(cfg.strategy.name, "strategy.name")
    table = "fedspine" if cfg.strategy.name in PRESETS else cfg.strategy.name
    params = getattr(cfg.strategy, table, None)
    is_table = dataclasses.is_dataclass(params) and not isinstance(params, type)
    kwargs = dataclasses.asdict(params) if is_table else {}  # type: ignore[arg-type]
    return factory(weighting=cfg.strategy.weighting, **kwargs)


def build_device_lora(cfg: Config, devices: Sequence[Device], strategy: Strategy) -> dict[int, DeviceLora]:
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
    cfg: Config,
    strategy: FedSpine,
    devices: Sequence[Device],
    device_lora: dict[int, DeviceLora],
    predict_seconds: Callable[[int, Arm], float],
    relative_work: Callable[[Arm], float],
) -> Policy:
    """The (extra ratio, rank) policy of a pruning strategy; presets fix it (prune_then_tune, fedmp).

    Arms' ratios are *extra* pruning beyond the schedule's floor (:meth:`FedSpine.ratio_of`).
    """
    f = cfg.strategy.fedspine
    name = strategy.settings.policy
    POLICIES.get(name, "strategy.fedspine.policy")
    ratios, ranks = f.extra_ratios, f.ranks
    if name == "fixed":
        extra = 0.0 if f.fixed_ratio < 0 else f.fixed_ratio - f.target_sparsity
        return FixedPolicy(
            ratios,
            ranks,
            {d.device_id: extra for d in devices},
            {i: lo.rank for i, lo in device_lora.items()},
        )
    if name == "random":
        return RandomPolicy(ratios, ranks, cfg.run.seed)
    if name == "oracle":
        return OraclePolicy(ratios, ranks, [d.device_id for d in devices], predict_seconds)
    bandit: Policy = (
        PooledUCB(ratios, ranks, relative_work, f.window, f.ucb_c)
        if name == "pooled"
        else SlidingWindowUCB(ratios, ranks, f.window, f.ucb_c)
    )
    bandit.explore = f.explore
    return bandit


class _TimePredictor:
    """Predicted task time of a device at an arm, from its profile (what only the oracle may read).

    A class rather than a closure, so a checkpoint can save the policy that holds it.
    """

    def __init__(
        self,
        cfg: Config,
        strategy: FedSpine,
        executor: SimExecutor,
        devices: Sequence[Device],
    ) -> None:
        self.cfg, self.strategy, self.executor = cfg, strategy, executor
        self.by_id = {d.device_id: d for d in devices}

    def __call__(self, device_id: int, arm: Arm) -> float:
        cfg, strategy = self.cfg, self.strategy
        device = self.by_id[device_id]
        plan = strategy.plan_for(strategy.ratio_of(arm))
        workload = pruned_workload(
            plan,
            self.executor.shape,
            seq_lens=[cfg.data.max_length] * cfg.train.batch_size * cfg.train.local_steps,
            lora_rank=arm.rank,
            num_lora_targets=len(cfg.lora.target_modules),
            logits_positions=self.executor.logits_positions,
            dtype_bytes=device.device_class.train_dtype_bytes,
            batch_size=cfg.train.batch_size,
            steps=cfg.train.local_steps,
        )
        cost = CostModel.for_device(device)
        upload = 4 * arm.rank * sum(o + i for o, i in strategy.kept_shapes(plan).values())
        return cost.train_seconds(workload, 1.0) + cost.transfer_seconds(upload, "up", 1.0)


class _RelativeWork:
    """Training FLOPs relative to the dense model at the largest rank (model knowledge only).

    Called with an arm (the policy's prediction: the arm's ratio once the schedule reached its target)
    or through :meth:`of_plan` with the plan a task actually trained (the strategy's observation).
    """

    def __init__(self, cfg: Config, strategy: FedSpine, executor: SimExecutor) -> None:
        self.cfg, self.strategy, self.executor = cfg, strategy, executor
        self.dense: float | None = None

    def _flops(self, plan: PruningPlan | None, rank: int) -> float:
        cfg = self.cfg
        return pruned_workload(
            plan,
            self.executor.shape,
            seq_lens=[cfg.data.max_length] * cfg.train.batch_size,
            lora_rank=rank,
            num_lora_targets=len(cfg.lora.target_modules),
            logits_positions=self.executor.logits_positions,
        ).flops

    def of_plan(self, plan: PruningPlan, rank: int) -> float:
        if self.dense is None:
            self.dense = self._flops(None, max(self.cfg.strategy.fedspine.ranks))
        return self._flops(plan, rank) / self.dense

    def __call__(self, arm: Arm) -> float:
        return self.of_plan(self.strategy.plan_for(self.strategy.ratio_of(arm)), arm.rank)


def build_scheduler(cfg: Config, num_devices: int, strategy: Strategy) -> Scheduler:
    """The configured scheduler.

    Synchronous: ``clients_per_round`` falls back to a fraction of the fleet. Asynchronous: the
    scheduler's own table supplies its parameters; combinations the strategy cannot run are
    rejected here, naming the key.
    """
    cls = schedulers.SCHEDULERS.get(cfg.scheduler.name, "scheduler.name")
    s = cfg.scheduler
    if cls is SyncScheduler:
        k = s.clients_per_round or max(1, round(s.clients_fraction * num_devices))
        return SyncScheduler(s.rounds, min(k, num_devices), s.over_selection, s.deadline_seconds)
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


def check_robustness(cfg: Config, strategy: Strategy, device_lora: dict[int, DeviceLora]) -> None:
    """Robust rules and attacks that cannot apply to this run are config errors."""
    rule = cfg.server.robust
    if rule in ("median", "trimmed_mean"):
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


def build_trace(cfg: Config) -> AvailabilityTrace:
    """The configured availability trace."""
    t = cfg.fleet.trace
    return make_trace(
        t.kind,
        cfg.run.seed,
        t.period_seconds,
        t.online_fraction,
        t.mean_online_seconds,
        t.mean_offline_seconds,
    )


def build_fleet_from_config(cfg: Config) -> list[Device]:
    """The fleet described by ``cfg.fleet`` (errors name ``fleet.groups[i].<field>``)."""
    groups = [GroupSpec(g.device_class, g.count, g.network, g.availability) for g in cfg.fleet.groups]
    return build_fleet(groups, cfg.run.seed)


def load_examples(cfg: Config, rng: np.random.Generator) -> list[Example]:
    """Read the data source, attach labels (classification) and subsample."""
    d = cfg.data
    examples = load_source(d.source, d.path, "data.source")
    if d.task == "classification":
        if d.label_key in examples[0].meta:
            examples = with_label(examples, d.label_key)
        elif any(ex.label is None for ex in examples):
            raise ConfigError(
                "data.label_key", f"examples have neither a label nor the meta key '{d.label_key}'"
            )
        if d.max_labels:
            examples = top_labels(examples, d.max_labels)
    if d.max_examples and len(examples) > d.max_examples:
        keep = np.sort(rng.choice(len(examples), d.max_examples, replace=False))
        examples = [examples[i] for i in keep]
    needed = d.test_size + len(cfg.fleet.groups)
    if len(examples) < needed:
        raise DataError(f"data source '{d.source}' has {len(examples)} examples; need at least {needed}")
    return examples


def build_task(cfg: Config, examples: Sequence[Example]) -> ClassificationTask | LanguageModelingTask:
    """The task object that encodes examples for the model."""
    d = cfg.data
    if d.task == "lm":
        return LanguageModelingTask(d.prompt_template or "{text}")
    labels = sorted({ex.label for ex in examples if ex.label is not None})
    if len(labels) < 2:
        raise DataError(
            f"classification needs at least two labels; data.label_key '{d.label_key}' of this data "
            f"gives {labels or 'none'}"
        )
    # The default verbalizer and prompt are the Bible genre task's: another source that does not
    # set its own gets its labels as words and the task's generic prompt.
    bible_defaults = d.source == "bible"
    label_words = d.label_words if bible_defaults or d.label_words != BIBLE_GENRE_WORDS else {}
    prompt = d.prompt_template if bible_defaults or d.prompt_template != BIBLE_PROMPT else ""
    unknown = sorted(set(label_words) - set(labels))
    if unknown:
        raise ConfigError(f"data.label_words.{unknown[0]}", f"not a label of this data; labels: {labels}")
    words = [label_words.get(label, label) for label in labels]
    template = prompt or ClassificationTask(labels).prompt_template
    return ClassificationTask(labels, words, template, d.label_prefix)


def check_dense_layers(cfg: Config, shape: ModelShape) -> None:
    """``strategy.fedspine.dense_layers`` must name layers of the model (negative: from the end)."""
    for i, layer in enumerate(cfg.strategy.fedspine.dense_layers):
        if not -shape.layers <= layer < shape.layers:
            raise ConfigError(
                f"strategy.fedspine.dense_layers[{i}]",
                f"layer {layer} does not exist; the model has layers 0..{shape.layers - 1} "
                f"(or -1..-{shape.layers})",
            )


def split_and_partition(
    cfg: Config, examples: Sequence[Example], num_devices: int, rng: np.random.Generator
) -> tuple[list[Example], list[Example], list[np.ndarray]]:
    """Hold out the global test set, then split the rest across devices."""
    d = cfg.data
    labels = [ex.label or "" for ex in examples] if d.task == "classification" else None
    train_idx, test_idx = train_test_split(len(examples), d.test_size / len(examples), rng, stratify=labels)
    train = [examples[i] for i in train_idx]
    test = [examples[i] for i in test_idx]
    groups = [ex.meta.get(d.partition_key, "") for ex in train] if d.partition == "natural" else None
    parts = partition(
        d.partition,
        num_clients=num_devices,
        rng=rng,
        key="data.partition",
        n=len(train),
        labels=[ex.label or "" for ex in train] if d.partition == "dirichlet" else None,
        groups=groups,
        alpha=d.dirichlet_alpha if d.partition == "dirichlet" else d.quantity_alpha,
    )
    return train, test, parts


def check_fleet_fits(devices: Sequence[Device], shape: ModelShape, cfg: Config) -> None:
    """Fail early when no device can hold even one local step of the model."""

    def workload_for(d: Device) -> TrainWorkload:
        return train_workload(
            shape,
            seq_lens=[cfg.data.max_length] * cfg.train.batch_size,
            lora_rank=cfg.lora.rank,
            num_lora_targets=len(cfg.lora.target_modules),
            logits_positions="all",
            dtype_bytes=d.device_class.train_dtype_bytes,
            batch_size=cfg.train.batch_size,
            steps=1,
        )

    if not any(CostModel.for_device(d).fits(workload_for(d).peak_memory_bytes) for d in devices):
        biggest = max(d.device_class.memory_bytes for d in devices)
        need = min(workload_for(d).peak_memory_bytes for d in devices)
        raise FleetError(
            f"no device in the fleet can hold the model: it needs {need / 2**30:.2f} GiB, "
            f"the largest device has {biggest / 2**30:.2f} GiB"
        )


def check_config(cfg: Config) -> None:
    """The checks that need no data and no model: registered names, the fleet, ranks, the scheduler,
    robustness, the availability trace, the codec. Milliseconds; raises what :func:`build_experiment`
    would raise for them.

    Raises:
        ConfigError: a name or combination the config cannot run.
        FleetError: the fleet is empty or unknown.
    """
    strategy = build_strategy(cfg)
    devices = build_fleet_from_config(cfg)
    device_lora = build_device_lora(cfg, devices, strategy)
    build_scheduler(cfg, len(devices), strategy)
    check_robustness(cfg, strategy, device_lora)
    if isinstance(strategy, FedSpine):
        POLICIES.get(strategy.settings.policy, "strategy.fedspine.policy")
    build_trace(cfg)
    build_stale_handler(cfg)
    build_uplink(cfg)


def build_experiment(cfg: Config, status: Status | None = None) -> Experiment:
    """Validate names and the fleet, load data and model, and assemble the run."""
    say = status or (lambda _msg: None)
    torch.set_num_threads(cfg.run.threads)
    strategy = build_strategy(cfg)
    devices = build_fleet_from_config(cfg)
    device_lora = build_device_lora(cfg, devices, strategy)
    scheduler = build_scheduler(cfg, len(devices), strategy)
    check_robustness(cfg, strategy, device_lora)
    rng = np.random.default_rng(cfg.run.seed)
    say(f"loading data source '{cfg.data.source}'")
    examples = load_examples(cfg, rng)
    task = build_task(cfg, examples)
    train, test, parts = split_and_partition(cfg, examples, len(devices), rng)
    say(f"loading model '{cfg.model.source}'")
    _check_fits_before_loading(cfg, devices)
    model, tokenizer = _load_model(cfg)
    shape = model_shape(model.config, model.num_parameters())
    check_dense_layers(cfg, shape)
    check_fleet_fits(devices, shape, cfg)
    train_data = task.encode(train, tokenizer, cfg.data.max_length)
    test_data = task.encode(test, tokenizer, cfg.data.max_length)
    objective = _objective(train_data)
    initial_scores = magnitude_scores(model) if strategy.prunes else None
    peft_model = apply_lora(
        model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, seed=cfg.run.seed
    )
    t = cfg.train
    executor = SimExecutor(
        peft_model,
        objective,
        strategy,
        train_data,
        parts,
        LocalTraining(t.batch_size, t.lr, t.optimizer, t.weight_decay, t.max_grad_norm),
        shape,
        len(cfg.lora.target_modules),
        cfg.run.seed,
    )
    executor.target_modules = list(cfg.lora.target_modules)
    executor.lora_dropout = cfg.lora.dropout
    executor.eval_dtype = cfg.eval.dtype
    if isinstance(strategy, FedSpine):
        assert initial_scores is not None
        executor.importance = strategy.settings.importance
        predict = _TimePredictor(cfg, strategy, executor, devices)
        work = _RelativeWork(cfg, strategy, executor)
        policy = build_policy(cfg, strategy, devices, device_lora, predict, work)
        strategy.setup(shape, initial_scores, policy, cfg.scheduler.rounds)
        strategy.work_model = work.of_plan
    return Experiment(
        config=cfg,
        devices=devices,
        strategy=strategy,
        scheduler=scheduler,
        executor=executor,
        objective=objective,
        test_data=test_data,
        test_set=EvalSet.from_dataset(test_data, cfg.eval.batch_size),
        partitions=parts,
        device_lora=device_lora,
        module_shapes=module_shapes(peft_model),
        task_name=_task_name(cfg),
        chance_level=task.chance_level(test_data),
        shape=shape,
        tokenizer=tokenizer,
        trace=build_trace(cfg),
        stale_handler=build_stale_handler(cfg),
        uplink=build_uplink(cfg),
    )


def _model_args(cfg: Config) -> tuple[str, str | None, Path, dict[str, int]]:
    m = cfg.model
    cache = Path(m.cache_dir) if m.cache_dir else default_cache_dir()
    tiny = {
        "hidden": m.tiny.hidden,
        "layers": m.tiny.layers,
        "heads": m.tiny.heads,
        "kv_heads": m.tiny.kv_heads,
        "intermediate": m.tiny.intermediate,
        "seed": cfg.run.seed,
    }
    return m.source, m.path or None, cache, tiny


def _load_model(cfg: Config) -> tuple[Any, Any]:
    return resolve_model(*_model_args(cfg), cfg.model.dtype)


def _check_fits_before_loading(cfg: Config, devices: Sequence[Device]) -> None:
    """Reject a fleet that cannot hold the model from its config alone, before reading weights.

    Architectures whose shape needs the real parameter count are checked after loading instead.
    """
    try:
        shape = model_shape(resolve_model_config(*_model_args(cfg)))
    except ModelError:
        return
    check_fleet_fits(devices, shape, cfg)


def _objective(train_data: EncodedDataset) -> Objective:
    if train_data.label_token_ids is not None:
        return ClassificationObjective(train_data.label_token_ids)
    return LanguageModelingObjective()


def _task_name(cfg: Config) -> str:
    d = cfg.data
    if d.task == "classification":
        return f"{d.source}-{d.label_key} classification"
    return f"{d.source} language modelling"
