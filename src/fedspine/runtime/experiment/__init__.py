"""Turn a :class:`~fedspine.config.Config` into the objects of a run (the only place that reads config).

By concern: :mod:`.algorithms` (strategy, ranks, policy, scheduler, staleness, codec), :mod:`.fleet`
(devices, availability), :mod:`.data` (examples, task, split, objective) and :mod:`.model` (loading,
shape checks, the task-workload helper); this module assembles them into an :class:`Experiment`.

The cheap checks come first (registered names, the fleet) so that a bad config fails in
milliseconds, before the model is loaded, and before anything is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedspine.algorithms.clusters import ClusterAdapters
from fedspine.algorithms.compression import UplinkChannel
from fedspine.algorithms.policies import POLICIES
from fedspine.algorithms.schedulers import Scheduler
from fedspine.algorithms.staleness import Identity, StaleUpdateHandler
from fedspine.algorithms.strategies import FedSpine, Strategy
from fedspine.algorithms.strategies.base import DeviceSide, PlainTraining
from fedspine.client.evaluate import EvalSet
from fedspine.client.objectives import Objective
from fedspine.client.personal import PrivateAdapters
from fedspine.config import Config
from fedspine.data import EncodedDataset
from fedspine.data.tasks import Task
from fedspine.errors import ConfigError
from fedspine.fleet.availability import AlwaysOnline, AvailabilityTrace
from fedspine.model.footprint import ModelShape, model_shape
from fedspine.model.importance import Scores
from fedspine.model.lora import apply_lora, module_shapes
from fedspine.model.pruning import magnitude_scores
from fedspine.runtime.executor import InProcessExecutor, LocalTraining, logits_positions
from fedspine.runtime.experiment.algorithms import (
    build_device_lora,
    build_pruning_strategy,
    build_robust_rule,
    build_scheduler,
    build_stale_handler,
    build_strategy,
    build_uplink,
    check_robustness,
    fedspine_settings,
    strategy_class,
)
from fedspine.runtime.experiment.data import (
    DeclaredData,
    NodeData,
    build_task,
    load_examples,
    load_node_examples,
    local_test_sets,
    node_partition,
    objective_for,
    split_and_partition,
    task_name,
)
from fedspine.runtime.experiment.fleet import build_fleet_from_config, build_trace
from fedspine.runtime.experiment.model import (
    TaskWorkloads,
    check_dense_layers,
    check_fits_before_loading,
    check_fleet_fits,
    load_model,
    resolve_device,
)
from fedspine.runtime.ray_executor import RayExecutor, start_replicas
from fedspine.runtime.settings import Attack, ExportSettings, PersonalSettings, RunSettings, ServerRules
from fedspine.types import Device, DeviceLora

Status = Callable[[str], None]


@dataclass
class Experiment:
    """Everything a run needs, built and validated."""

    settings: RunSettings
    devices: list[Device]
    strategy: Strategy
    scheduler: Scheduler
    trainer: Trainer
    """The devices' data, the model with LoRA and the executor that trains it."""
    test_set: EvalSet
    """The trainer's ``test_data`` batched once, by length, for every evaluation."""
    device_lora: dict[int, DeviceLora]
    task_name: str
    chance_level: float
    trace: AvailabilityTrace = field(default_factory=AlwaysOnline)
    stale_handler: StaleUpdateHandler = field(default_factory=Identity)
    uplink: UplinkChannel | None = None
    """Compressed uploads (None: the factors travel as they are)."""
    declared: dict[int, DeclaredData] | None = None
    """A deployment whose nodes bring their own data: what each device's node declared (None: the
    devices' data is :attr:`partitions`)."""
    clusters: ClusterAdapters | None = None
    """The server's cluster adapters (``personalize.method = "clustered"``)."""

    def train_examples(self, device_id: int) -> int:
        """How many examples ``device_id`` trains on (its partition, or what its node declared)."""
        if self.declared is None:
            return len(self.trainer.partitions[device_id])
        declared = self.declared.get(device_id)
        return 0 if declared is None else declared.examples


def run_settings(cfg: Config) -> RunSettings:
    """The loose values of ``cfg`` that the engine, the summary and the export read."""
    attack, server, export = cfg.fleet.attack, cfg.server, cfg.export
    return RunSettings(
        seed=cfg.run.seed,
        local_steps=cfg.train.local_steps,
        rounds=cfg.scheduler.rounds,
        synchronous=cfg.scheduler.synchronous,
        eval_at_start=cfg.eval.at_start,
        eval_every=cfg.eval.every,
        eval_target=cfg.eval.target,
        eval_dtype=cfg.eval.dtype,
        checkpoint_every=cfg.run.checkpoint_every,
        keep_checkpoints=cfg.run.keep_checkpoints,
        aggregation_fan_in=cfg.strategy.aggregation_fan_in,
        jitter_scale=cfg.fleet.jitter_scale,
        attack=Attack(attack.kind, frozenset(attack.devices), attack.factor),
        server=ServerRules(
            server.max_update_norm,
            server.robust,
            build_robust_rule(cfg),
            server.clip_norm,
            server.trim_fraction,
            server.aggregation_gbps,
            server.aggregation_overhead_seconds,
        ),
        export=ExportSettings(export.save, export.speed, export.generate_tokens),
        strategy_name=cfg.strategy.name,
        scheduler_name=cfg.scheduler.name,
        model_name=cfg.model.source if cfg.model.source != "local" else cfg.model.path,
        eval_mode=cfg.eval.mode,
        personalize=PersonalSettings(
            cfg.personalize.method,
            cfg.personalize.steps,
            cfg.personalize.rank,
            cfg.lora.alpha,
            cfg.personalize.importance,
        ),
    )


def batch_clients(cfg: Config, device: torch.device, fleet_size: int) -> int:
    """``executor.batch_clients`` resolved: "auto" (0) trains a whole round in one batch on a GPU, and
    one task at a time on a CPU (a step is compute-bound there) or with LoRA dropout."""
    if cfg.executor.batch_clients:
        return cfg.executor.batch_clients
    return 1 if device.type == "cpu" or cfg.lora.dropout > 0 else max(fleet_size, 1)


def check_config(cfg: Config) -> None:
    """The checks that need no data and no model: registered names, the fleet, ranks, the scheduler,
    robustness, the availability trace, the codec. Milliseconds; raises what :func:`build_experiment`
    would raise for them.

    Raises:
        ConfigError: a name or combination the config cannot run.
        FleetError: the fleet is empty or unknown.
    """
    resolve_device(cfg)
    cls = strategy_class(cfg)
    check_personalize(cfg, cls)
    if issubclass(cls, FedSpine):
        POLICIES.get(fedspine_settings(cfg).policy, "strategy.fedspine.policy")
    else:
        build_strategy(cfg)  # its table's parameters are checked by its constructor
    devices = build_fleet_from_config(cfg)
    device_lora = build_device_lora(cfg, devices, cls)
    build_scheduler(cfg, len(devices), cls)
    check_robustness(cfg, cls, device_lora)
    build_trace(cfg)
    build_stale_handler(cfg)
    build_uplink(cfg)


def check_personalize(cfg: Config, cls: type[Strategy]) -> None:
    """``[personalize]`` against the strategy and the executor.

    Raises:
        ConfigError: ``mask`` without a pruning strategy, or personalization on Ray workers.
    """
    method = cfg.personalize.method
    if method == "mask" and not cls.prunes:
        raise ConfigError(
            "personalize.method",
            f"'mask' chooses each device's units of a pruned model; strategy '{cfg.strategy.name}' does "
            "not prune (use fedspine, prune_then_tune or fedmp, or finetune / split)",
        )
    if method == "clustered" and build_robust_rule(cfg).combines:
        raise ConfigError(
            "personalize.method",
            f"server.robust = {cfg.server.robust!r} combines the updates into one and would lose which "
            'cluster each trained; use server.robust = "none" or "clip" with clustered',
        )
    if method != "none" and cfg.executor.name != "simulation":
        raise ConfigError(
            "personalize.method",
            f'{method!r} trains the devices\' personal state in-process; set executor.name = "simulation"',
        )


def make_executor(cfg: Config) -> InProcessExecutor:
    """The in-process trainer of ``cfg`` (a Ray worker's replica): its data, model and executor only,
    none of the run's server side (scheduler, strategy state, codecs, trace)."""
    cfg = dataclasses.replace(cfg, executor=dataclasses.replace(cfg.executor, name="simulation"))
    cls = strategy_class(cfg)
    device_side = PlainTraining() if cls.prunes else build_strategy(cfg).device_side
    devices = build_fleet_from_config(cfg)
    return build_trainer(cfg, devices, device_side).executor


@dataclass
class Trainer:
    """What trains, and what the run's server side builds on: the devices' data, the model with LoRA
    and the executor that trains it."""

    executor: InProcessExecutor
    objective: Objective
    task: Task
    train_data: EncodedDataset
    test_data: EncodedDataset
    partitions: list[np.ndarray]
    local_tests: dict[int, EvalSet]
    shape: ModelShape
    module_shapes: dict[str, tuple[int, int]]
    tokenizer: Any
    initial_scores: Scores | None
    """The dense model's magnitude scores, for a pruning strategy's masks (None: it does not prune)."""
    private: PrivateAdapters | None


def build_trainer(
    cfg: Config,
    devices: list[Device],
    device_side: DeviceSide,
    status: Status | None = None,
    node: NodeData | None = None,
) -> Trainer:
    """Load the data and the model, and build the executor that trains ``devices``' tasks with
    ``device_side`` (the strategy's part of local training). ``node``: as :func:`build_experiment`."""
    say = status or (lambda _msg: None)
    device = resolve_device(cfg)
    cls = strategy_class(cfg)
    rng = np.random.default_rng(cfg.run.seed)
    if node is None:
        say(f"loading data source '{cfg.data.source}'")
        examples = load_examples(cfg, rng)
        task = build_task(cfg, examples)
        train, test, parts = split_and_partition(cfg, examples, len(devices), rng)
    else:
        task = build_task(cfg, node.examples)
        train, test, parts = node.examples, [], node_partition(node, len(devices))
    say(f"loading model '{cfg.model.source}'")
    check_fits_before_loading(cfg, devices)
    model, tokenizer = load_model(cfg, device)
    shape = model_shape(model.config, model.num_parameters())
    check_dense_layers(cfg, shape)
    check_fleet_fits(devices, shape, cfg)
    train_data = task.encode(train, tokenizer, cfg.data.max_length)
    test_data = task.encode(test, tokenizer, cfg.data.max_length)
    parts, local_tests = local_test_sets(cfg, train_data, parts)
    objective = objective_for(train_data)
    initial_scores = magnitude_scores(model) if cls.prunes else None
    if initial_scores is not None:
        initial_scores = ([s.cpu() for s in initial_scores[0]], [s.cpu() for s in initial_scores[1]])
    peft_model = apply_lora(
        model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, seed=cfg.run.seed
    )
    shapes = module_shapes(peft_model)
    t, personal = cfg.train, cfg.personalize
    personal_lora = None
    if personal.method in ("split", "clustered"):
        personal_lora = DeviceLora(personal.rank, cfg.lora.alpha / personal.rank)
    private = None
    if personal.method == "split":
        private = PrivateAdapters(shapes, personal.rank, cfg.lora.alpha, cfg.run.seed)
    on_ray: dict[str, Any] = {}
    if cfg.executor.name == "ray":
        on_ray = {"replicas": start_replicas(cfg, make_executor), "owns_ray": not cfg.executor.address}
    executor = (RayExecutor if on_ray else InProcessExecutor)(
        peft_model,
        objective,
        device_side,
        train_data,
        parts,
        LocalTraining(t.batch_size, t.lr, t.optimizer, t.weight_decay, t.max_grad_norm),
        shape,
        list(cfg.lora.target_modules),
        cfg.run.seed,
        importance=cfg.strategy.fedspine.importance if cls.prunes else "magnitude",
        lora_dropout=cfg.lora.dropout,
        eval_dtype=cfg.eval.dtype,
        measure_means=cls.prunes and cfg.strategy.fedspine.compensates,
        batch_clients=batch_clients(cfg, device, len(devices)),
        personal_lora=personal_lora,
        private=private,
        cluster_count=personal.clusters if personal.method == "clustered" else 0,
        **on_ray,
    )
    return Trainer(
        executor,
        objective,
        task,
        train_data,
        test_data,
        parts,
        local_tests,
        shape,
        shapes,
        tokenizer,
        initial_scores,
        private,
    )


@dataclass
class DeployedNode:
    """What a deployed device's node builds from the run's config: the trainer over its own data, the
    fleet (to know its device), and its uplink codec. No strategy, scheduler or server state: those
    live on the SuperLink's side."""

    settings: RunSettings
    devices: list[Device]
    trainer: Trainer
    uplink: UplinkChannel | None


def build_node(cfg: Config, node: NodeData | None = None) -> DeployedNode:
    """Check ``cfg`` as :func:`check_config` does, and build what a deployed node trains with: its
    devices' tasks run with the strategy's device side (plain training for pruning strategies, whose
    masks arrive with each task). ``node``: as :func:`build_experiment`."""
    torch.set_num_threads(cfg.run.threads)
    check_config(cfg)
    cls = strategy_class(cfg)
    devices = build_fleet_from_config(cfg)
    trainer = build_trainer(
        cfg, devices, PlainTraining() if cls.prunes else build_strategy(cfg).device_side, node=node
    )
    return DeployedNode(
        settings=run_settings(cfg),
        devices=devices,
        trainer=trainer,
        uplink=build_uplink(cfg),
    )


def build_experiment(cfg: Config, status: Status | None = None, node: NodeData | None = None) -> Experiment:
    """Validate names and the fleet, load data and model, and assemble the run.

    With ``node``, the run as one deployed device's node builds it: that device's own examples are its
    training data (less its held-out slice), the config's data source is never read, and the central
    test set is empty.
    """
    torch.set_num_threads(cfg.run.threads)
    resolve_device(cfg)
    cls = strategy_class(cfg)
    check_personalize(cfg, cls)
    devices = build_fleet_from_config(cfg)
    device_lora = build_device_lora(cfg, devices, cls)
    scheduler = build_scheduler(cfg, len(devices), cls)
    check_robustness(cfg, cls, device_lora)
    plain = None if cls.prunes else build_strategy(cfg)
    trainer = build_trainer(
        cfg, devices, PlainTraining() if plain is None else plain.device_side, status, node
    )
    strategy: Strategy
    if plain is None:
        assert trainer.initial_scores is not None
        workloads = TaskWorkloads.from_config(cfg, trainer.shape, logits_positions(trainer.objective))
        strategy = build_pruning_strategy(
            cfg, trainer.shape, trainer.module_shapes, trainer.initial_scores, workloads, devices, device_lora
        )
    else:
        strategy = plain
    personal = cfg.personalize
    clusters = None
    if personal.method == "clustered":
        clusters = ClusterAdapters(
            trainer.module_shapes, personal.clusters, personal.rank, cfg.lora.alpha, cfg.run.seed
        )
    test_data = trainer.test_data
    return Experiment(
        settings=run_settings(cfg),
        devices=devices,
        strategy=strategy,
        scheduler=scheduler,
        trainer=trainer,
        test_set=EvalSet.from_dataset(test_data, cfg.eval.batch_size),
        device_lora=device_lora,
        task_name=task_name(cfg),
        chance_level=trainer.task.chance_level(test_data) if len(test_data) else float("nan"),
        trace=build_trace(cfg),
        stale_handler=build_stale_handler(cfg),
        uplink=build_uplink(cfg),
        clusters=clusters,
    )


__all__ = [
    "DeclaredData",
    "DeployedNode",
    "Experiment",
    "NodeData",
    "Status",
    "Trainer",
    "build_device_lora",
    "build_experiment",
    "build_fleet_from_config",
    "build_node",
    "build_pruning_strategy",
    "build_scheduler",
    "build_strategy",
    "build_trainer",
    "check_config",
    "check_fleet_fits",
    "load_node_examples",
    "make_executor",
    "run_settings",
    "strategy_class",
]
