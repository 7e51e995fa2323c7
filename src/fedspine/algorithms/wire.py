"""What travels on the wire: LoRA states serialised as safetensors, and their exact byte counts."""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedspine.types import ClientUpdate, LoraState


def flatten_state(state: LoraState) -> dict[str, torch.Tensor]:
    """``{module: {"A": a, "B": b}}`` -> ``{"module/A": a, "module/B": b}`` (contiguous tensors)."""
    flat: dict[str, torch.Tensor] = {}
    for module, factors in state.items():
        for name, tensor in factors.items():
            flat[f"{module}/{name}"] = tensor.contiguous()
    return flat


def unflatten_state(flat: dict[str, torch.Tensor]) -> LoraState:
    """Inverse of :func:`flatten_state`."""
    state: LoraState = {}
    for key, tensor in flat.items():
        module, _, name = key.rpartition("/")
        state.setdefault(module, {})[name] = tensor
    return state


def encode_state(state: LoraState) -> bytes:
    """Serialise a LoRA state to the bytes a device or the server would send."""
    return st_save(flatten_state(state))


def decode_state(payload: bytes) -> LoraState:
    """Parse bytes produced by :func:`encode_state`."""
    return unflatten_state(st_load(payload))


def payload_bytes(state: LoraState) -> int:
    """Exact size of the serialised payload: tensor data plus the safetensors header."""
    return len(encode_state(state))


def update_tensors(update: ClientUpdate) -> dict[str, torch.Tensor]:
    """Every tensor a device uploads: its LoRA factors (or their compressed payload), its cluster
    adapter with the cluster's index (``clustered``) and, when measured, its importance scores.

    The importance of the units a device pruned is not sent (it was not measured); the server knows
    the device's plan, so only the kept entries travel.
    """
    flat = dict(update.wire) if update.wire is not None else flatten_state(update.lora_state)
    if update.cluster_state is not None:
        flat.update({f"cluster/{k}": v for k, v in flatten_state(update.cluster_state).items()})
        flat["cluster/index"] = torch.tensor([update.cluster if update.cluster is not None else -1])
    if update.importance is not None:
        for kind in IMPORTANCE_KINDS:
            for layer, scores in enumerate(update.importance.get(kind) or []):
                kept = _kept(update.plan, layer, kind, scores.numel())
                flat[f"importance/{kind}/{layer}"] = (
                    scores.index_select(0, kept).to(torch.float32).contiguous()
                )
    return flat


IMPORTANCE_KINDS = ("heads", "channels", "means")
"""What a device measuring importance uploads per layer: KV-group and MLP-channel scores, and (for bias
compensation) the MLP channels' mean inputs."""


def _kept(plan: object, layer: int, kind: str, size: int) -> torch.Tensor:
    keep = plan.get(layer) if isinstance(plan, dict) else None
    if keep is None:
        return torch.arange(size)
    return torch.tensor(keep.kv_groups if kind == "heads" else keep.channels, dtype=torch.long)


def update_payload_bytes(update: ClientUpdate) -> int:
    """Exact size of the serialised upload (safetensors of :func:`update_tensors`)."""
    return len(st_save(update_tensors(update)))
