"""LoRA adapters through peft, and the LoRA state that travels between devices and the server.

A ``LoraState`` maps a module name of the base model (e.g. ``"model.layers.0.self_attn.q_proj"``) to
``{"A": tensor (r, in), "B": tensor (out, r)}``; the adapter computes ``W x + scaling · B A x`` with
``scaling = alpha / r``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedspine.errors import ModelError
from fedspine.types import LoraState

ADAPTER = "default"
"""Name of the single adapter fedspine trains."""


def apply_lora(
    model: PreTrainedModel,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    seed: int = 0,
) -> PeftModel:
    """Wraps ``model`` with fresh LoRA adapters (A random, B zero); only the adapters are trainable.

    The base model is modified in place (peft swaps the target layers); the global torch RNG is untouched.
    The returned model keeps the base model's train/eval mode: call ``.train()`` before training so that
    LoRA dropout is active.

    Args:
        model: a causal LM.
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
        dropout: dropout on the adapter input during training.
        target_modules: module name suffixes to adapt, e.g. ``["q_proj", "v_proj"]``.
        seed: seeds the initialisation of A.
    """
    if rank < 1:
        raise ModelError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; floats work (scaling = alpha / r)
        lora_dropout=dropout,
        target_modules=list(target_modules),
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 reads a property that transformers 5 deprecated; nothing for us to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as err:  # peft: "Target modules ... not found in the base model"
            raise ModelError(f"cannot apply LoRA to {list(target_modules)}: {err}") from err
    return peft_model


def _lora_layers(peft_model: PeftModel, adapter: str = ADAPTER) -> Iterator[tuple[str, LoraLayer]]:
    """Yields ``(name in the base model, layer)`` for every LoRA layer, in module order."""
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            yield name, module


def adapter_factors(
    peft_model: PeftModel, adapter: str = ADAPTER
) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """The (A, B) weights of ``adapter`` in every LoRA layer, in module order."""
    return [_a_b(layer, adapter) for _, layer in _lora_layers(peft_model, adapter)]


def _a_b(layer: LoraLayer, adapter: str = ADAPTER) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """The A (r, in) and B (out, r) weights of the adapter in ``layer``."""
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if not (isinstance(a, torch.nn.Parameter) and isinstance(b, torch.nn.Parameter)):
        raise ModelError(f"unexpected LoRA layer {type(layer).__name__}: A/B are not plain weights")
    return a, b


def lora_module_names(peft_model: PeftModel) -> list[str]:
    """Names (in the base model) of the modules carrying a LoRA adapter, in module order."""
    return [name for name, _ in _lora_layers(peft_model)]


def get_lora_state(peft_model: PeftModel, adapter: str = ADAPTER) -> LoraState:
    """Returns detached copies of every adapter, on the CPU: ``{name: {"A": (r, in), "B": (out, r)}}``."""
    state: LoraState = {}
    for name, layer in _lora_layers(peft_model, adapter):
        a, b = _a_b(layer, adapter)
        state[name] = {"A": a.detach().to("cpu", copy=True), "B": b.detach().to("cpu", copy=True)}
    return state


def set_lora_state(peft_model: PeftModel, state: LoraState, adapter: str = ADAPTER) -> None:
    """Copies ``state`` into the adapters in place (dtype and device follow the model).

    Other keys in a module's entry (e.g. a per-module scaling a strategy carries) are ignored.

    Raises:
        ModelError: the module names differ, or a tensor's shape does not match the adapter.
    """
    layers = dict(_lora_layers(peft_model, adapter))
    if set(layers) != set(state):
        missing, extra = sorted(set(layers) - set(state)), sorted(set(state) - set(layers))
        raise ModelError(
            f"LoRA state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            a, b = _a_b(layer, adapter)
            _copy_checked(a, state[name], name, "A")
            _copy_checked(b, state[name], name, "B")


def _copy_checked(param: torch.Tensor, entry: dict[str, torch.Tensor], name: str, key: str) -> None:
    if key not in entry:
        raise ModelError(f"LoRA state of {name} has no '{key}'")
    value = entry[key]
    if tuple(value.shape) != tuple(param.shape):
        raise ModelError(
            f"LoRA {key} of {name} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}"
        )
    param.copy_(value)


def lora_scaling(peft_model: PeftModel) -> float:
    """The factor ``alpha / r`` that multiplies ``B A`` (shared by every adapted module)."""
    scalings = {float(layer.scaling[ADAPTER]) for _, layer in _lora_layers(peft_model)}
    if len(scalings) != 1:
        raise ModelError(f"expected one LoRA scaling for all modules, found {sorted(scalings)}")
    return scalings.pop()


def lora_rank(peft_model: PeftModel) -> int:
    """The LoRA rank r of the adapters (shared by every adapted module)."""
    ranks = {int(layer.r[ADAPTER]) for _, layer in _lora_layers(peft_model)}
    if len(ranks) != 1:
        raise ModelError(f"expected one LoRA rank for all modules, found {sorted(ranks)}")
    return ranks.pop()


def zero_lora_state_like(state: LoraState) -> LoraState:
    """A state with the same modules, keys, shapes and dtypes as ``state``, all zeros."""
    return {
        name: {
            key: torch.zeros_like(value) for key, value in entry.items() if isinstance(value, torch.Tensor)
        }
        for name, entry in state.items()
    }


def state_num_bytes(state: LoraState) -> int:
    """Bytes of all tensors in ``state`` (``numel · element_size``), i.e. its uncompressed size."""
    return sum(
        value.numel() * value.element_size()
        for entry in state.values()
        for value in entry.values()
        if isinstance(value, torch.Tensor)
    )


def module_shapes(peft_model: PeftModel) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of every adapted module, by name in the base model."""
    shapes = {}
    for name, layer in _lora_layers(peft_model):
        a, b = _a_b(layer)
        shapes[name] = (int(b.shape[0]), int(a.shape[1]))
    return shapes


def ensure_adapter(peft_model: PeftModel, name: str, rank: int, alpha: float) -> None:
    """Add adapter ``name`` (same targets and dropout as the default one) unless it exists.

    One model holds an adapter per (rank, alpha) in use, so devices with heterogeneous ranks train
    with exactly their own rank and scaling on the shared in-process base model.
    """
    if name in peft_model.peft_config:
        return
    base = peft_model.peft_config[ADAPTER]
    if not isinstance(base, LoraConfig):
        raise ModelError(f"adapter {ADAPTER!r} is a {type(base).__name__}, not a LoRA adapter")
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # floats work (scaling = alpha / r)
        lora_dropout=base.lora_dropout,
        target_modules=base.target_modules,
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        peft_model.add_adapter(name, config)


def activate_adapter(peft_model: PeftModel, name: str) -> None:
    """Make ``name`` the adapter used in forward passes, and the only trainable one."""
    peft_model.set_adapter(name)


def add_to_base_weights(peft_model: PeftModel, deltas: dict[str, torch.Tensor]) -> None:
    """Merge ``W <- W + delta`` into the frozen base weights of the named adapted modules (FLoRA)."""
    layers = dict(_lora_layers(peft_model))
    with torch.no_grad():
        for name, delta in deltas.items():
            if name not in layers:
                raise ModelError(f"cannot merge into {name}: not an adapted module")
            base: Any = layers[name].get_base_layer()
            base.weight.add_(delta.to(base.weight.device, base.weight.dtype))


def base_weights(peft_model: PeftModel, names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the base weights of the named adapted modules, on the CPU."""
    layers: dict[str, Any] = dict(_lora_layers(peft_model))
    return {name: layers[name].get_base_layer().weight.detach().to("cpu", copy=True) for name in names}


def set_base_weights(peft_model: PeftModel, weights: dict[str, torch.Tensor]) -> None:
    """Overwrite the base weights of the named adapted modules (exactly, e.g. from a checkpoint)."""
    layers: dict[str, Any] = dict(_lora_layers(peft_model))
    with torch.no_grad():
        for name, value in weights.items():
            if name not in layers:
                raise ModelError(f"cannot set the base weight of {name}: not an adapted module")
            layers[name].get_base_layer().weight.copy_(value)


def lora_parameter_count(peft_model: PeftModel) -> int:
    """Number of LoRA parameters (all A and B entries) in the model."""
    return sum(a.numel() + b.numel() for a, b in (_a_b(layer) for _, layer in _lora_layers(peft_model)))


def plain_copy(peft_model: PeftModel) -> PreTrainedModel:
    """A copy of the base model without any adapter (adapters are dropped, not merged)."""
    plain: PreTrainedModel = copy.deepcopy(peft_model).unload()
    plain.requires_grad_(False)
    return plain


def merged_model(peft_model: PeftModel) -> PreTrainedModel:
    """A plain model with ``W + scaling · B A`` folded in, built on a copy (``peft_model`` is untouched)."""
    merged: PreTrainedModel = copy.deepcopy(peft_model).merge_and_unload()
    merged.requires_grad_(False)
    return merged


def merged_state_dict(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The merged model's state dict (keys of the plain base model)."""
    return dict(merged_model(peft_model).state_dict())


def merge_and_export(
    peft_model: PeftModel, out_dir: Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Saves the merged model (and tokenizer) so that ``AutoModelForCausalLM.from_pretrained`` reloads it.

    Args:
        peft_model: the trained model; not modified.
        out_dir: target directory (created).
        tokenizer: saved beside the weights when given.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged_model(peft_model).save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


__all__ = [
    "ADAPTER",
    "activate_adapter",
    "add_to_base_weights",
    "apply_lora",
    "ensure_adapter",
    "get_lora_state",
    "lora_module_names",
    "lora_parameter_count",
    "lora_rank",
    "lora_scaling",
    "merge_and_export",
    "merged_model",
    "merged_state_dict",
    "module_shapes",
    "plain_copy",
    "set_lora_state",
    "state_num_bytes",
    "zero_lora_state_like",
]
