"""Server-side checks of a client update before it may be aggregated.

An update is checked against the task that produced it: the adapter the device received fixes
which modules it may upload and their shapes (a device may lower its rank, never raise it; a pruned
device's factors have its submodel's shapes), the factors must be floating point and finite, their
change must stay under a norm bound when one is set, and importance scores (FedSpine) must have
one score per unit of the full model, finite and non-negative. :func:`check_update` returns the
reason for rejecting the update, or None.

The scalars a device reports are checked as strictly as its factors, because each one steers the
aggregate: ``lora_scaling`` multiplies the factors (it must be the scaling the task sent: a device
cannot choose its own), ``num_samples`` is the update's weight (``1..`` the device's partition size,
when the server knows it), and the loss, the probe loss (the bandit's reward) and the host seconds
must be finite and non-negative.
"""

from __future__ import annotations

import math

import torch

from fedspine.algorithms.lora_math import cut_to
from fedspine.algorithms.wire import IMPORTANCE_KINDS
from fedspine.model.footprint import ModelShape
from fedspine.types import ClientTask, ClientUpdate


def check_update(
    update: ClientUpdate,
    task: ClientTask,
    max_norm: float = 0.0,
    *,
    max_samples: int | None = None,
    shape: ModelShape | None = None,
) -> str | None:
    """Why ``update`` must not be aggregated, or None if it may be.

    ``max_norm`` (0 = unbounded) bounds the L2 norm of the update's change against the adapter the
    device received, over all factors together. ``max_samples`` (the device's partition size)
    bounds the sample count it reports; ``shape`` (the full model's) fixes how many importance scores
    each layer must have.
    """
    if update.round != task.round or update.device_id != task.device_id:
        return f"answers round {update.round} of device {update.device_id}, not the task's"
    if update.plan != task.plan:
        return "trained under a different pruning plan than the task's"
    reason = _check_scalars(update, task, max_samples)
    if reason is not None:
        return reason
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
    clustered = _check_cluster(update, task)
    if isinstance(clustered, str):
        return clustered
    squared += clustered
    if not math.isfinite(squared):
        return "the change of its factors overflows"
    if max_norm > 0 and math.sqrt(squared) > max_norm:
        return f"change norm {math.sqrt(squared):.4g} exceeds server.max_update_norm {max_norm:g}"
    if update.importance is not None:
        return _check_importance(update.importance, shape)
    return None


def _check_cluster(update: ClientUpdate, task: ClientTask) -> str | float:
    """Why the update's cluster adapter is unacceptable, or its squared change: it must be the one the
    device said it chose among those it was sent, with their modules and shapes (none without clusters)."""
    if not task.clusters:
        if update.cluster is not None or update.cluster_state is not None:
            return "uploaded a cluster adapter the task did not send"
        return 0.0
    index, state = update.cluster, update.cluster_state
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(task.clusters):
        return f"cluster {index!r} outside 0..{len(task.clusters) - 1}"
    start = task.clusters[index]
    if not state or set(state) != set(start):
        return "its cluster adapter's modules differ from those it was sent"
    squared = 0.0
    for module, factors in state.items():
        reason = _check_factors(f"cluster {module}", factors, start[module], int(start[module]["A"].shape[0]))
        if reason is not None:
            return reason
        squared += sum(
            float((factors[k].float() - start[module][k].float()).pow(2).sum()) for k in ("A", "B")
        )
    return squared


def _check_scalars(update: ClientUpdate, task: ClientTask, max_samples: int | None) -> str | None:
    if update.lora_scaling != task.lora.scaling:
        return f"lora_scaling {update.lora_scaling!r} is not the task's {task.lora.scaling!r}"
    if update.num_samples < 1 or (max_samples is not None and update.num_samples > max_samples):
        bound = "" if max_samples is None else f"..{max_samples} (the device's partition)"
        return f"num_samples {update.num_samples} outside 1{bound or '..'}"
    for name, value in (
        ("train_loss", update.train_loss),
        ("host_train_seconds", update.host_train_seconds),
        ("probe_loss", update.probe_loss),
    ):
        if value is not None and not (math.isfinite(value) and value >= 0):
            return f"{name} {value!r} is not finite and >= 0"
    if update.tokens < 0:
        return f"tokens {update.tokens} < 0"
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


def _check_importance(importance: dict[str, list[torch.Tensor]], shape: ModelShape | None) -> str | None:
    heads, channels = importance.get("heads"), importance.get("channels")
    if heads is None or channels is None or len(heads) != len(channels):
        return "importance must hold heads and channels for every layer"
    if shape is not None and len(heads) != shape.layers:
        return f"importance for {len(heads)} layers; the model has {shape.layers}"
    means = importance.get("means")
    if means is not None and len(means) != len(channels):
        return f"channel means for {len(means)} layers; the scores are for {len(channels)}"
    unknown = set(importance) - set(IMPORTANCE_KINDS)
    if unknown:
        return f"unknown importance kinds {sorted(unknown)}"
    sizes = {
        "heads": None if shape is None else shape.kv_heads,
        "channels": None if shape is None else shape.intermediate,
        "means": None if shape is None else shape.intermediate,
    }
    for kind, scores in (("heads", heads), ("channels", channels), ("means", means or [])):
        for layer, s in enumerate(scores):
            if not isinstance(s, torch.Tensor) or not s.is_floating_point() or s.dim() != 1:
                return f"importance {kind}[{layer}] must be a floating-point vector"
            if sizes[kind] is not None and s.numel() != sizes[kind]:
                return f"importance {kind}[{layer}] has {s.numel()} scores; the layer has {sizes[kind]} units"
            if not bool(torch.isfinite(s).all()):
                return f"importance {kind}[{layer}] must be finite"
            if kind != "means" and bool((s < 0).any()):
                return f"importance {kind}[{layer}] must be non-negative"
    return None
