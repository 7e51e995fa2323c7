"""The plain values a run's engine, summary and export read, taken out of the config once by the build.

Everything else a run needs is a built object (strategy, scheduler, codecs, executor) that received
its parameters through its constructor; these are the loose numbers and names that belong to no
object. Nothing outside :mod:`fedspine.runtime.experiment` reads the config.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedspine.algorithms.robust import RobustRule


@dataclass(frozen=True)
class Attack:
    """Simulated malicious devices: their updates are corrupted before upload (``fleet.attack``)."""

    kind: str
    """``none``, ``scale``, ``sign_flip`` or ``nonfinite``."""
    devices: frozenset[int]
    factor: float


@dataclass(frozen=True)
class ServerRules:
    """What the server does with arriving updates and what aggregating them costs (``[server]``)."""

    max_update_norm: float
    """Updates whose change is larger are rejected (0: no bound)."""
    robust: str
    """The rule's name (``server.robust``): ``none``, ``clip``, ``median`` or ``trimmed_mean``."""
    robust_rule: RobustRule
    """That rule, with its parameters (:data:`~fedspine.algorithms.robust.ROBUST_RULES`)."""
    clip_norm: float
    trim_fraction: float
    aggregation_gbps: float
    aggregation_overhead_seconds: float


@dataclass(frozen=True)
class ExportSettings:
    """The device models written at the end of a run (``[export]``)."""

    save: bool
    speed: bool
    generate_tokens: int


@dataclass(frozen=True)
class PersonalSettings:
    """How each device's personal model is made (``[personalize]``)."""

    method: str
    """none, finetune, split, clustered or mask."""
    steps: int
    """finetune: local steps; mask: local batches scored."""
    rank: int
    """Rank of the personal adapter (finetune, split, clustered)."""
    alpha: float
    """Its LoRA alpha (``lora.alpha``): scaling ``alpha / rank``."""
    importance: str = "flap"
    """mask: how a device scores its units (taylor or flap)."""


@dataclass(frozen=True)
class RunSettings:
    """A run's loose values: seed, cadences, names for the records, server rules, export."""

    seed: int
    local_steps: int
    """Local steps of a task whose scheduler does not say otherwise."""
    rounds: int
    """Rounds, or server steps of an asynchronous scheduler (for status lines)."""
    synchronous: bool
    eval_at_start: bool
    eval_every: int
    eval_target: float
    """Metric whose first crossing is the run's time to target (0: none)."""
    eval_dtype: str
    checkpoint_every: int
    keep_checkpoints: int
    aggregation_fan_in: int
    jitter_scale: float
    attack: Attack
    server: ServerRules
    export: ExportSettings
    strategy_name: str
    scheduler_name: str
    model_name: str
    """The model's source, or its directory for a local model."""
    eval_mode: str = "central"
    """``central``, ``federated`` or ``both`` (``eval.mode``)."""
    personalize: PersonalSettings = PersonalSettings("none", 0, 8, 16.0)
    """The personal models (``[personalize]``)."""


__all__ = ["Attack", "ExportSettings", "PersonalSettings", "RunSettings", "ServerRules"]
