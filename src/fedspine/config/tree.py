"""The whole configuration tree: :class:`Config`, one field per section.

The sections are imported at run time (not only for type checking): :func:`typing.get_type_hints`
resolves the field annotations in this module when a config is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedspine.config.fleet import FleetSection
from fedspine.config.limits import _check
from fedspine.config.model import DataSection, LoraSection, ModelSection
from fedspine.config.run import EvalSection, ExportSection, PersonalizeSection, RunSection
from fedspine.config.scheduling import CompressionSection, SchedulerSection, ServerSection
from fedspine.config.training import ExecutorSection, StrategySection, TrainSection


@dataclass(frozen=True)
class Config:
    """The whole run."""

    run: RunSection = field(default_factory=RunSection)
    """Identity and reproducibility."""
    model: ModelSection = field(default_factory=ModelSection)
    """Base model."""
    lora: LoraSection = field(default_factory=LoraSection)
    """LoRA adapters."""
    data: DataSection = field(default_factory=DataSection)
    """Dataset, task and partitioning."""
    fleet: FleetSection = field(default_factory=FleetSection)
    """Simulated devices."""
    train: TrainSection = field(default_factory=TrainSection)
    """Local training."""
    executor: ExecutorSection = field(default_factory=ExecutorSection)
    """How the simulator trains client tasks."""
    strategy: StrategySection = field(default_factory=StrategySection)
    """Aggregation strategy."""
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    """Scheduling of client tasks."""
    server: ServerSection = field(default_factory=ServerSection)
    """The aggregation server."""
    compression: CompressionSection = field(default_factory=CompressionSection)
    """Uplink compression and error feedback."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Global evaluation."""
    personalize: PersonalizeSection = field(default_factory=PersonalizeSection)
    """Personal models."""
    export: ExportSection = field(default_factory=ExportSection)
    """The device models handed out at the end."""

    def __post_init__(self) -> None:
        _check(len(self.fleet.groups) > 0, "fleet.groups", "the fleet needs at least one device group")
        _check(
            self.executor.batch_clients <= 1 or self.lora.dropout == 0,
            "executor.batch_clients",
            "batched clients train without LoRA dropout: set lora.dropout = 0 or executor.batch_clients = 1",
        )
