"""Local training and aggregation: ``[train]``, ``[executor]`` and ``[strategy]`` (hetlora, fedspine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedspine.config.limits import MAX_MULTIPLIER, MAX_RANK, MAX_STEPS, _at_most, _check


@dataclass(frozen=True)
class TrainSection:
    """Local training on each device."""

    local_steps: int = 8
    """Optimizer steps per client task."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 2e-3
    """Learning rate of the local optimizer."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Local optimizer (state is fresh each task, as on a real device)."""
    weight_decay: float = 0.0
    """Weight decay of the local optimizer."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""

    def __post_init__(self) -> None:
        _check(self.local_steps >= 1, "train.local_steps", "must be >= 1")
        _at_most(self.local_steps, MAX_STEPS, "train.local_steps", "a task that long would never end")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _at_most(self.batch_size, 1 << 16, "train.batch_size", "examples per step; more exhausts memory")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _at_most(self.lr, 10, "train.lr", "larger steps diverge at once")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 = off)")


@dataclass(frozen=True)
class ExecutorSection:
    """Where and how the simulator trains client tasks: this process, or the workers of a Ray cluster."""

    name: Literal["simulation", "ray"] = "simulation"
    """Train in this process, or on Ray workers that each hold a replica of the model (same records)."""
    address: str = ""
    """Ray cluster to join ("auto", "host:port"); empty: start a local Ray instance for the run."""
    workers: int = 2
    """Ray workers (model replicas)."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker (the worker's torch threads are run.threads)."""
    gpus_per_worker: float = 0.0
    """GPUs Ray reserves per worker (a worker with one trains on it: run.device = "auto")."""

    batch_clients: int = 0
    """Tasks of a synchronous round trained together, one forward/backward over all their batches with
    an adapter each (1 = one by one; 0 = auto: one by one on a CPU, where a step is compute-bound and
    batching gains little, so records stay bit-identical). Needs lora.dropout = 0 when above 1."""

    def __post_init__(self) -> None:
        _check(self.batch_clients >= 0, "executor.batch_clients", "must be >= 0 (0 = auto, 1 = one by one)")
        _check(self.workers >= 1, "executor.workers", "must be >= 1")
        _at_most(self.workers, 1024, "executor.workers", "more processes than any host runs")
        _check(self.cpus_per_worker >= 0, "executor.cpus_per_worker", "must be >= 0")
        _check(self.gpus_per_worker >= 0, "executor.gpus_per_worker", "must be >= 0")


@dataclass(frozen=True)
class HetLoRASection:
    """HetLoRA's local rank self-pruning."""

    gamma: float = 0.9
    """A device that prunes keeps floor(gamma * rank) components."""
    prune_threshold: float = 0.05
    """Prune when the tail's share of ||B A|| is below this."""
    penalty: float = 1e-3
    """Weight of the tail-norm penalty in the local loss."""

    def __post_init__(self) -> None:
        _check(0 < self.gamma < 1, "strategy.hetlora.gamma", "must be in (0, 1)")
        _check(self.prune_threshold >= 0, "strategy.hetlora.prune_threshold", "must be >= 0")
        _check(self.penalty >= 0, "strategy.hetlora.penalty", "must be >= 0")


@dataclass(frozen=True)
class FedSpineSection:
    """Prune-and-tune (fedspine, prune_then_tune, fedmp): importance, schedule and (ratio, rank) policy."""

    importance: Literal["flap", "taylor", "magnitude"] = "flap"
    """Unit importance: FLAP WIFV (on device, forward-only), LoRA-guided Taylor (on device) or magnitude."""
    granularity: Literal["auto", "channels", "heads_and_channels"] = "auto"
    """What is pruned: MLP channels, or KV groups too; auto prunes KV groups only with >= 8 of them."""
    target_sparsity: float = 0.3
    """Final fraction of the pruned units (MLP channels, and KV groups) removed from every pruned layer."""
    schedule: Literal["cubic", "oneshot"] = "cubic"
    """How the sparsity floor rises after calibration: cubic over `prune_rounds`, or the target at once."""
    prune_rounds: int = 3
    """Rounds over which the cubic schedule reaches the target (0 = half of scheduler.rounds)."""
    score_momentum: float = 0.9
    """Global importance EMA when the mask may move: I <- momentum * I + (1 - momentum) * observed."""
    freeze_mask: bool = True
    """Fix the unit order after the calibration round: masks only shrink, a pruned unit never returns."""
    dense_layers: list[int] | Literal["auto"] = "auto"
    """Layers never pruned, e.g. [0, 1, -1] (negative: from the end); "auto": the first tenth and the
    last layer of a model with >= 10 layers, none below. Models with dense layers are saved with a config
    listing each layer's widths (they load with trust_remote_code=True)."""
    channel_multiple: int = 1
    """Kept MLP channel counts round to a multiple of this (hardware-friendly widths)."""
    compensate: bool | Literal["auto"] = "auto"
    """FLAP's bias compensation: a pruned MLP channel's mean output (from the devices' measured mean
    inputs) is kept as a bias of down_proj. true needs importance = "flap"; "auto": on with flap."""
    policy: Literal["paced", "pooled", "swucb", "fixed", "random", "oracle"] = "paced"
    """Who picks each device's (extra pruning, LoRA rank): paced (the least pruned arm the device's
    observed speed keeps within the deadline, or the median device's time), a UCB bandit (pooled over the
    fleet, or per device), or a baseline (fixed, random, oracle: reads the device profiles)."""
    extra_ratios: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2])
    """Arms prune the schedule's floor plus one of these (the target, plus these, once it is reached)."""
    ranks: list[int] = field(default_factory=lambda: [4, 8])
    """LoRA ranks the policy may choose, at the device's alpha (the scale alpha / r keeps the update's
    size independent of the rank); the fixed policy uses each device's configured rank."""
    explore: Literal["safest", "floor"] = "safest"
    """A bandit's first arm: the most pruned, or the least pruned."""
    window: int = 20
    """Sliding window of the UCB bandits, in observations (per device, or per arm when pooled)."""
    ucb_c: float = 0.25
    """Exploration constant of the UCB bandits (rewards are about 1 at the fleet's mean quality)."""
    fixed_ratio: float = -1.0
    """Ratio of the fixed policy (-1 = target_sparsity; otherwise at least target_sparsity)."""
    global_rank: int | Literal["auto"] = "auto"
    """Rank of the model change devices download: the server sums every round's exact aggregate and
    the devices' base is the pretrained model plus the best rank-`global_rank` approximation of that
    sum (the residual stays on the server and counts in the next round's approximation). "auto": the
    largest rank a device trains, so a task downloads about what FedIT's does. 0: the exact sum, each
    device downloading every merge it missed as stacked factors (its downlink grows with the merges)."""

    @property
    def compensates(self) -> bool:
        """Whether removed channels' mean outputs are kept as biases (``compensate`` resolved)."""
        return self.compensate is True or (self.compensate == "auto" and self.importance == "flap")

    def __post_init__(self) -> None:
        key = "strategy.fedspine."
        _check(0 <= self.target_sparsity < 1, key + "target_sparsity", "must be in [0, 1)")
        _check(self.prune_rounds >= 0, key + "prune_rounds", "must be >= 0")
        _check(0 <= self.score_momentum < 1, key + "score_momentum", "must be in [0, 1)")
        _check(self.channel_multiple >= 1, key + "channel_multiple", "must be >= 1")
        _check(
            self.compensate is not True or self.importance == "flap",
            key + "compensate",
            "needs importance = 'flap' (the FLAP meter measures the mean inputs it compensates with)",
        )
        _check(
            bool(self.extra_ratios)
            and all(r >= 0 and self.target_sparsity + r < 1 for r in self.extra_ratios),
            key + "extra_ratios",
            "must be values >= 0 with target_sparsity + value < 1",
        )
        _check(bool(self.ranks) and all(r >= 1 for r in self.ranks), key + "ranks", "must be ranks >= 1")
        _check(self.window >= 1, key + "window", "must be >= 1")
        _check(self.ucb_c >= 0, key + "ucb_c", "must be >= 0")
        _at_most(self.ucb_c, MAX_MULTIPLIER, key + "ucb_c", "a bonus that large makes every choice random")
        _check(
            self.global_rank == "auto" or 0 <= self.global_rank <= MAX_RANK,
            key + "global_rank",
            f"must be 'auto' or a rank in [0, {MAX_RANK}] (0 = the exact sum of every merge)",
        )
        _check(
            self.fixed_ratio == -1.0 or self.target_sparsity <= self.fixed_ratio < 1,
            key + "fixed_ratio",
            "must be -1 or in [target_sparsity, 1)",
        )


@dataclass(frozen=True)
class StrategySection:
    """How updates are configured and aggregated (see `fedspine.algorithms.strategies`)."""

    name: str = "fedit"
    """Registered strategy: fedit, zeropad, hetlora, flexlora, flora, fedspine, prune_then_tune, fedmp."""
    weighting: Literal["samples", "uniform"] = "samples"
    """Aggregation weight of each update: its number of training samples, or equal."""
    aggregation_fan_in: int = 0
    """Aggregate through a tree of aggregators with this fan-in (LIFL-style; 0 = flat)."""
    hetlora: HetLoRASection = field(default_factory=HetLoRASection)
    """Parameters of the hetlora strategy."""
    fedspine: FedSpineSection = field(default_factory=FedSpineSection)
    """Parameters of the pruning strategies (fedspine, prune_then_tune, fedmp)."""

    def __post_init__(self) -> None:
        _check(
            self.aggregation_fan_in in (0,) or self.aggregation_fan_in >= 2,
            "strategy.aggregation_fan_in",
            "must be 0 (flat) or >= 2",
        )
