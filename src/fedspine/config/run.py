"""The run and what it hands out: ``[run]``, ``[eval]``, ``[personalize]``, ``[export]``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedspine.config.limits import (
    DEVICE_NAME,
    MAX_DEVICES,
    MAX_STEPS,
    MAX_THREADS,
    RUN_NAME,
    _at_most,
    _check,
)


@dataclass(frozen=True)
class RunSection:
    """Identity and reproducibility of the run."""

    name: str = "default"
    """Run name, used in the default output directory."""
    seed: int = 0
    """Seed for every random choice: fleet, data split, sampling, initialisation, jitter."""
    threads: int = 2
    """Host CPU threads torch may use for the real training."""
    device: str = "auto"
    """Where the model trains and is evaluated: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"."""
    checkpoint_every: int = 1
    """Write an atomic checkpoint every k rounds, or k server steps of an asynchronous run (0 = never)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""

    def __post_init__(self) -> None:
        _check(
            bool(RUN_NAME.match(self.name)),
            "run.name",
            f"must be letters, digits, '.', '_' or '-' (a folder name under runs/), got {self.name!r}",
        )
        _check(self.seed >= 0, "run.seed", f"must be >= 0, got {self.seed}")
        _check(
            1 <= self.threads <= MAX_THREADS,
            "run.threads",
            f"must be in 1..{MAX_THREADS}, got {self.threads}",
        )
        _check(
            bool(DEVICE_NAME.match(self.device)),
            "run.device",
            f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}",
        )
        _check(self.checkpoint_every >= 0, "run.checkpoint_every", "must be >= 0 (0 = never)")
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")


@dataclass(frozen=True)
class EvalSection:
    """Global evaluation on the held-out test set."""

    every: int = 1
    """Evaluate every k rounds (the last round is always evaluated)."""
    batch_size: int = 32
    """Evaluation batch size (examples are batched by length, so padding stays small)."""
    dtype: Literal["model", "float32", "bfloat16", "float16"] = "model"
    """Dtype of the evaluated copy; "model": the model's own. bfloat16 is ~1.7x faster on CPUs with
    AVX512-BF16 and flips a few predictions near ties (docs/results.md)."""
    at_start: bool = True
    """Also evaluate the initial model (round 0), so the curve starts from the pretrained metric."""
    target: float = 0.4
    """Metric target for time-to-target (0 = none; accuracy: higher is better, perplexity: lower)."""
    mode: Literal["central", "federated", "both"] = "central"
    """central: the server's held-out test set; federated: every device evaluates the global model (at its
    own deployed sparsity, for pruning strategies) on a held-out slice of its own data and the run's
    metric is their example-weighted mean; both: central is the run's metric, federated is recorded beside."""
    local_fraction: float = 0.2
    """Share of each device's examples held out for its own evaluation when `mode` is federated or both,
    or `personalize.method` is not none (at least one example per device with two or more); otherwise
    the devices train on all of them."""
    local_max_examples: int = 64
    """At most this many held-out examples per device (0 = no cap), so that evaluating every device
    costs about what the central test set does; the rest stays for training."""

    def __post_init__(self) -> None:
        _check(self.every >= 1, "eval.every", "must be >= 1")
        _check(
            0 < self.local_fraction < 1,
            "eval.local_fraction",
            f"must be in (0, 1), got {self.local_fraction}",
        )
        _check(self.local_max_examples >= 0, "eval.local_max_examples", "must be >= 0 (0 = no cap)")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _at_most(self.batch_size, 1 << 16, "eval.batch_size", "examples per batch; more exhausts memory")
        _check(self.target >= 0, "eval.target", "must be >= 0 (0 = none)")


@dataclass(frozen=True)
class PersonalizeSection:
    """Personal models: each device's final model tuned to its own data (see the guide's "Personal
    models"), measured on the held-out slice of its own examples."""

    method: Literal["none", "finetune", "split", "clustered", "mask"] = "none"
    """none: every device keeps the global model (at its deployed sparsity); finetune: after the run
    each device fine-tunes a fresh adapter on its deployed model for `steps` local steps; split: every
    task also trains a private adapter of rank `rank` that never leaves the device and persists across
    its tasks; clustered: `clusters` shared adapters of rank `rank`, each task trains and uploads the
    one with the lowest loss on the device's data (IFCA); mask (pruning strategies): each device keeps
    the units that matter on its own data (FLAP scores over `steps` local batches) at its deployed
    sparsity."""
    steps: int = 0
    """finetune: local steps; mask: local batches scored (0 = train.local_steps)."""
    rank: int = 8
    """Rank of the personal adapter (finetune, split, clustered); its scaling is lora.alpha / rank."""
    clusters: int = 2
    """clustered: how many cluster adapters."""
    importance: Literal["flap", "taylor"] = "flap"
    """mask: how a device scores its units on its own data. flap: activation variance x weight norm, the
    damage of removing a unit whose mean output is compensated (forward passes only); taylor: the
    first-order change of its own task loss (sees its labels; forward and backward passes)."""

    def __post_init__(self) -> None:
        _check(self.clusters >= 2, "personalize.clusters", f"must be >= 2, got {self.clusters}")
        _check(
            self.steps >= 0, "personalize.steps", f"must be >= 0 (0 = train.local_steps), got {self.steps}"
        )
        _check(self.rank >= 1, "personalize.rank", f"must be >= 1, got {self.rank}")
        _at_most(self.steps, MAX_STEPS, "personalize.steps", "a task that long would never end")
        _at_most(self.clusters, MAX_DEVICES, "personalize.clusters", "more than a fleet holds")


@dataclass(frozen=True)
class ExportSection:
    """The models every device gets at the end of a run (see `fedspine.runtime.export`)."""

    save: bool = True
    """Save each distinct device model as a Hugging Face directory under models/ (dense: the merged one)."""
    speed: bool = True
    """Measure each model's greedy generation speed on this host's CPU."""
    generate_tokens: int = 32
    """New tokens per speed measurement."""

    def __post_init__(self) -> None:
        _check(self.generate_tokens >= 1, "export.generate_tokens", "must be >= 1")
        _at_most(
            self.generate_tokens,
            4096,
            "export.generate_tokens",
            "decode speed is timed on these; more only waits",
        )
