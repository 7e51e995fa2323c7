"""Server-side checks of a client update before it may be aggregated.

An update is checked against the task that produced it: the adapter the device received fixes
which modules it may upload and their shapes (a device may lower its rank, never raise it; a pruned
device's factors have its submodel's shapes), the factors must be floating point and finite, their
change must stay under a norm bound when one is set, and importance scores (FedSpine) must have
one score per unit of the full model, finite and non-negative. :func:`check_update` returns the
reason for rejecting the update, or None.
"""

from __future__ import annotations

import math

import torch

from fedspine.algorithms.lora_math import cut_to
from fedspine.types import ClientTask, ClientUpdate


def check_update(update: ClientUpdate, task: ClientTask, max_norm: float = 0.0) -> str | None:
    """Why ``update`` must not be aggregated, or None if it may be.

    ``max_norm`` (0 = unbounded) bounds the L2 norm of the update's change against the adapter the
    device received, over all factors together.
    """
    if update.round != task.round or update.device_id != task.device_id:
        return f"answers round {update.round} of device {update.device_id}, not the task's"
    if update.plan != task.plan:
        return "trained under a different pruning plan than the task's"
    if not update.lora_state:
        return "uploaded no LoRA factors"
    if set(update.lora_state) != set(task.payload):
        unknown = sorted(set(update.lora_state) - set(task.payload))[:3]
        missing = sorted(set(task.payload) - set(update.lora_state))[:3]
        return f"LoRA modules differ from the task's (unexpected {unknown}, missing {missing})"
    if not (1 <= update.lora_rank <= task.lora.rank):
        return f"rank {update.lora_rank} outside 1..{task.lora.rank}"
    squared = 0.0
    for module, factors in update.lora_state.items():
        start = task.payload[module]
        reason = _check_factors(module, factors, start, update.lora_rank)
        if reason is not None:
            return reason
        for name in ("A", "B"):
            base = cut_to(start[name], factors[name])
            squared += float((factors[name].float() - base).pow(2).sum())
    if not math.isfinite(squared):
        return "the change of its factors overflows"
    if max_norm > 0 and math.sqrt(squared) > max_norm:
        return f"change norm {math.sqrt(squared):.4g} exceeds server.max_update_norm {max_norm:g}"
    if update.importance is not None:
        return _check_importance(update.importance)
    if update.probe_loss is not None and not (math.isfinite(update.probe_loss) and update.probe_loss >= 0):
        return f"probe_loss {update.probe_loss!r} is not a finite loss >= 0"
    return None


def _check_factors(
    module: str, factors: dict[str, torch.Tensor], start: dict[str, torch.Tensor], rank: int
) -> str | None:
    if set(factors) != {"A", "B"}:
        return f"{module}: factors {sorted(factors)}, expected A and B"
    a, b = factors["A"], factors["B"]
    for name, tensor in (("A", a), ("B", b)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            return f"{module}.{name} is not a floating-point tensor"
        if not bool(torch.isfinite(tensor).all()):
            return f"{module}.{name} has NaN or Inf entries"
    expected_a = (rank, start["A"].shape[1])
    expected_b = (start["B"].shape[0], rank)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        return (
            f"{module}: shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
            f"expected A {expected_a}, B {expected_b} at rank {rank}"
        )
    return None


def _check_importance(importance: dict[str, list[torch.Tensor]]) -> str | None:
    heads, channels = importance.get("heads"), importance.get("channels")
    if heads is None or channels is None or len(heads) != len(channels):
        return "importance must hold heads and channels for every layer"
    for kind, scores in (("heads", heads), ("channels", channels)):
        for layer, s in enumerate(scores):
            if s.dim() != 1 or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
                return f"importance {kind}[{layer}] must be a finite, non-negative vector"
    return None
