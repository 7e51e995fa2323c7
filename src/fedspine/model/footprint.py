"""What training a model costs, in FLOPs, bytes and memory, from its shape alone (no torch).

These figures feed the simulator's cost model (algorithms.md §10.3); they are estimates from
well-known counting rules, not measurements. Every constant below says where it comes from.

Counting rules (per token unless noted; ``N`` = parameters of the linear layers inside the blocks):

* Frozen linear layers under LoRA: forward ``2N`` + activation gradients ``2N`` = ``4N`` (no weight
  gradients). Embedding lookups cost no FLOPs.
* LoRA adapters, ``P = r · (in + out)`` per adapted matrix: forward ``2P``, activation gradients ``2P``,
  weight gradients ``2P`` = ``6P``.
* Attention scores per layer and sequence of length ``s``: ``QKᵀ`` and ``softmax · V`` cost
  ``2 · 2 · s² · heads · head_dim`` forward, twice that backward. Counted over the full ``s × s`` square
  (the CPU/math and most mobile kernels do not skip the masked half).
* LM head: ``2 · hidden · vocab`` per position that computes logits, forward + input gradient (frozen).
  LM training computes logits at every position; classification only at the last one
  (``logits_to_keep=1``). The softmax / cross-entropy (a few ops per vocab entry) is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fedspine.errors import ModelError
from fedspine.types import TrainWorkload

FROZEN_MATMUL_PASSES = 2
"""Matmul passes over a frozen weight per step: forward + activation gradient (no weight gradient)."""
LORA_MATMUL_PASSES = 3
"""Matmul passes over a LoRA weight per step: forward + activation gradient + weight gradient."""
ATTENTION_BACKWARD_FACTOR = 2
"""Backward of the attention scores costs twice the forward (gradients w.r.t. both operands)."""
WEIGHT_READS_PER_STEP = 2
"""Times every weight is read from memory per step: forward + backward (roofline memory term)."""
LORA_BYTES_PER_PARAM = 16
"""fp32 LoRA weight + gradient + two AdamW moments = 4 · 4 bytes per LoRA parameter."""
LOGITS_BYTES = 4
"""Logits are upcast to fp32 for the loss."""
LOGITS_COPIES = 2
"""Logits and their gradient (softmax output) alive together at the loss."""

LLAMA_FAMILY = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "olmo",
        "olmo2",
        "smollm3",
        "granite",
        "phi3",
        "cohere",
        "stablelm",
        "internlm2",
    }
)
"""Architectures whose blocks are attention (q, k, v, o) + gated MLP (gate, up, down)."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer with a gated MLP (Llama family).

    Attributes:
        hidden: model width d.
        layers: number of transformer blocks.
        heads: query heads.
        kv_heads: key/value heads (grouped-query attention when < heads).
        head_dim: width of one head.
        intermediate: MLP width (gate/up output, down input).
        vocab: vocabulary size (embedding rows, LM head outputs).
        tied_embeddings: whether the LM head shares the embedding matrix.
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "kv_heads", "head_dim", "vocab"):
            if getattr(self, name) < 1:
                raise ModelError(f"ModelShape.{name} must be >= 1, got {getattr(self, name)}")
        if self.intermediate < 0:
            raise ModelError(f"ModelShape.intermediate must be >= 0, got {self.intermediate}")

    @property
    def attention_params_per_layer(self) -> int:
        """q and o (hidden ↔ heads·head_dim) + k and v (hidden → kv_heads·head_dim)."""
        return self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)

    @property
    def mlp_params_per_layer(self) -> int:
        """gate, up and down projections."""
        return 3 * self.hidden * self.intermediate

    @property
    def block_matmul_params(self) -> int:
        """``N``: parameters of all linear layers inside the blocks (no embeddings, no LM head)."""
        return self.layers * (self.attention_params_per_layer + self.mlp_params_per_layer)


@dataclass(frozen=True)
class TokenCount:
    """Sequences processed, when only totals are known (attention then uses the mean length)."""

    num_sequences: int
    tokens: int


def model_shape(hf_config: object, num_parameters: int | None = None) -> ModelShape:
    """Reads a ``ModelShape`` from a Hugging Face config.

    Llama-family configs are read exactly. For other architectures the standard config attributes
    (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``vocab_size``; transformers maps
    e.g. GPT-2's ``n_embd`` onto them) give the attention part, and, when ``num_parameters`` (the model's
    real parameter count) is given, ``intermediate`` is chosen so that the shape has that many
    parameters: the MLP is then an equivalent gated MLP with the same FLOPs, whatever its real form.

    Args:
        hf_config: a ``transformers.PretrainedConfig`` (any object with those attributes).
        num_parameters: total parameter count of the model, for the fallback.

    Raises:
        ModelError: a required attribute is missing and no parameter count allows a fallback.
    """
    shape = _shape_from_attributes(hf_config)
    if getattr(hf_config, "model_type", None) in LLAMA_FAMILY or num_parameters is None:
        if shape.intermediate <= 0:
            raise ModelError(f"config {type(hf_config).__name__} has no MLP width; pass num_parameters")
        return shape
    return _calibrated_to_count(shape, num_parameters)


def _required(hf_config: object, name: str) -> int:
    value = getattr(hf_config, name, None)
    if not isinstance(value, int):
        raise ModelError(f"config {type(hf_config).__name__} has no integer '{name}'")
    return value


def _shape_from_attributes(hf_config: object) -> ModelShape:
    hidden = _required(hf_config, "hidden_size")
    heads = _required(hf_config, "num_attention_heads")
    intermediate = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 0
    return ModelShape(
        hidden=hidden,
        layers=_required(hf_config, "num_hidden_layers"),
        heads=heads,
        kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hidden // heads,
        intermediate=int(intermediate),
        vocab=_required(hf_config, "vocab_size"),
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
    )


def _calibrated_to_count(shape: ModelShape, num_parameters: int) -> ModelShape:
    """Picks ``intermediate`` so that ``model_parameter_count`` matches ``num_parameters``."""
    without_mlp = model_parameter_count(_with_intermediate(shape, 0))
    mlp_per_layer = max(0, num_parameters - without_mlp) / shape.layers
    return _with_intermediate(shape, round(mlp_per_layer / (3 * shape.hidden)))


def _with_intermediate(shape: ModelShape, intermediate: int) -> ModelShape:
    fields = {**shape.__dict__, "intermediate": intermediate}
    return ModelShape(**fields)


def model_parameter_count(shape: ModelShape) -> int:
    """All parameters: embeddings, blocks (linear layers + two RMSNorms each), final norm, LM head."""
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
    norms = shape.hidden * (2 * shape.layers + 1)
    return embeddings + shape.block_matmul_params + norms


def weight_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """Bytes of all base weights stored with ``dtype_bytes`` per element."""
    return model_parameter_count(shape) * dtype_bytes


def lora_params_estimate(shape: ModelShape, lora_rank: int, num_lora_targets: int) -> int:
    """LoRA parameters when each of ``num_lora_targets`` matrices per layer is treated as hidden × hidden.

    Exact for q_proj/o_proj; it overstates k/v under GQA and understates MLP targets. LoRA is well under
    1% of the FLOPs, so the approximation only matters for the optimizer memory term.
    """
    return shape.layers * num_lora_targets * lora_rank * 2 * shape.hidden


def activation_elements_per_token_layer(shape: ModelShape, seq_len: int) -> int:
    """Elements one block saves for backward, per token, with frozen weights (a Llama block).

    Counted from what autograd keeps: the two RMSNorm inputs and outputs (4 · hidden), q (heads · head_dim)
    and k, v (2 · kv_heads · head_dim), the attention probabilities (heads · seq_len, as the math SDPA
    kernel stores them; flash kernels do not), the attention output fed to o_proj (heads · head_dim), and
    in the MLP gate, up, silu(gate) and their product (4 · intermediate). For SmolLM2 at seq 48 this is
    ≈ 18 · hidden (10,416 elements).
    """
    attn = (2 * shape.heads + 2 * shape.kv_heads) * shape.head_dim + shape.heads * seq_len
    return 4 * shape.hidden + attn + 4 * shape.intermediate


def _seq_lens(seq_lens: Sequence[int] | TokenCount) -> tuple[int, int, float, int]:
    """Returns (num_sequences, tokens, Σ s², longest)."""
    if isinstance(seq_lens, TokenCount):
        n, tokens = seq_lens.num_sequences, seq_lens.tokens
        if n < 1 or tokens < n:
            raise ModelError(
                f"TokenCount needs num_sequences >= 1 and tokens >= num_sequences, got {seq_lens}"
            )
        return n, tokens, n * (tokens / n) ** 2, math.ceil(tokens / n)
    if not seq_lens or min(seq_lens) < 1:
        raise ModelError("seq_lens must hold at least one sequence, every length >= 1")
    return len(seq_lens), sum(seq_lens), float(sum(s * s for s in seq_lens)), max(seq_lens)


def train_flops(
    shape: ModelShape,
    seq_lens: Sequence[int] | TokenCount,
    lora_rank: int,
    num_lora_targets: int,
    logits_positions: Literal["all", "last"] = "all",
) -> float:
    """FLOPs of LoRA training (forward + backward) over all the given sequences (module rules above)."""
    num_sequences, tokens, sum_sq, _ = _seq_lens(seq_lens)
    dense = 2 * FROZEN_MATMUL_PASSES * shape.block_matmul_params * tokens
    lora = 2 * LORA_MATMUL_PASSES * lora_params_estimate(shape, lora_rank, num_lora_targets) * tokens
    attention_fwd = 4 * shape.layers * shape.heads * shape.head_dim * sum_sq
    attention = attention_fwd * (1 + ATTENTION_BACKWARD_FACTOR)
    positions = tokens if logits_positions == "all" else num_sequences
    head = 2 * FROZEN_MATMUL_PASSES * shape.hidden * shape.vocab * positions
    return float(dense + lora + attention + head)


def train_workload(
    shape: ModelShape,
    seq_lens: Sequence[int] | TokenCount,
    lora_rank: int,
    num_lora_targets: int,
    logits_positions: Literal["all", "last"] = "all",
    dtype_bytes: int = 4,
    batch_size: int = 8,
    steps: int = 1,
) -> TrainWorkload:
    """What ``steps`` local LoRA steps over the given sequences cost on a device.

    Args:
        shape: the (possibly pruned) model the device trains.
        seq_lens: the length of every sequence processed, all steps together (pass padded lengths if the
            trainer pads), or a ``TokenCount`` when only totals are known.
        lora_rank: LoRA rank r.
        num_lora_targets: adapted matrices per layer (e.g. 2 for q_proj, v_proj).
        logits_positions: ``"all"`` (language modelling) or ``"last"`` (classification, ``logits_to_keep=1``).
        dtype_bytes: bytes per weight/activation element on the device (2 for fp16/bf16).
        batch_size: sequences per step (peak activation memory).
        steps: optimizer steps (each reads every weight ``WEIGHT_READS_PER_STEP`` times).

    Returns:
        FLOPs, bytes moved, peak memory and tokens of the task.
    """
    if logits_positions not in ("all", "last"):
        raise ModelError(f"logits_positions must be 'all' or 'last', got {logits_positions!r}")
    if batch_size < 1 or steps < 1 or lora_rank < 0 or num_lora_targets < 0 or dtype_bytes < 1:
        raise ModelError("batch_size, steps, dtype_bytes must be >= 1; lora_rank, num_lora_targets >= 0")
    _, tokens, _, longest = _seq_lens(seq_lens)
    return TrainWorkload(
        flops=train_flops(shape, seq_lens, lora_rank, num_lora_targets, logits_positions),
        bytes_moved=float(weight_bytes(shape, dtype_bytes) * WEIGHT_READS_PER_STEP * steps),
        peak_memory_bytes=peak_memory_bytes(
            shape, batch_size, longest, lora_rank, num_lora_targets, logits_positions, dtype_bytes
        ),
        tokens=tokens,
    )


def peak_memory_bytes(
    shape: ModelShape,
    batch_size: int,
    seq_len: int,
    lora_rank: int,
    num_lora_targets: int,
    logits_positions: Literal["all", "last"] = "all",
    dtype_bytes: int = 4,
) -> int:
    """Peak bytes of one step of ``batch_size × seq_len``: weights, LoRA state, saved activations, logits."""
    lora = lora_params_estimate(shape, lora_rank, num_lora_targets) * LORA_BYTES_PER_PARAM
    per_token = activation_elements_per_token_layer(shape, seq_len) * shape.layers
    activations = batch_size * seq_len * per_token * dtype_bytes
    positions = seq_len if logits_positions == "all" else 1
    logits = batch_size * positions * shape.vocab * LOGITS_BYTES * LOGITS_COPIES
    return weight_bytes(shape, dtype_bytes) + lora + activations + logits


def combine_workloads(parts: Sequence[tuple[TrainWorkload, float]]) -> TrainWorkload:
    """The fraction-weighted sum of workloads of uniform models (see ``pruning.pruned_shapes``).

    Each part is the workload of the whole model at one layer width, weighted by the fraction of layers
    that have that width; the fractions sum to 1, so per-model terms (embeddings, LM head) count once.
    """
    total = sum(weight for _, weight in parts)
    if not parts or abs(total - 1.0) > 1e-9:
        raise ModelError(f"workload fractions must sum to 1, got {total}")
    return TrainWorkload(
        flops=sum(w.flops * f for w, f in parts),
        bytes_moved=sum(w.bytes_moved * f for w, f in parts),
        peak_memory_bytes=round(sum(w.peak_memory_bytes * f for w, f in parts)),
        tokens=parts[0][0].tokens,
    )


__all__ = [
    "ModelShape",
    "TokenCount",
    "activation_elements_per_token_layer",
    "combine_workloads",
    "lora_params_estimate",
    "model_parameter_count",
    "model_shape",
    "peak_memory_bytes",
    "train_flops",
    "train_workload",
    "weight_bytes",
]
