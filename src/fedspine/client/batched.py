"""Several client tasks trained in lockstep on one shared base model (mLoRA's idea, for a simulator).

A sequential simulator trains one client's small batch at a time, which leaves a GPU launch-bound. Here
the tasks that start together are *lanes*: every step concatenates the active lanes' batches into one,
runs one forward and one backward through the frozen base, and adds each lane's own LoRA update to its
rows of every adapted layer. Each lane keeps its own factors, scaling, optimizer and gradient clipping,
its own data order and number of steps (a lane whose steps are done leaves the batch), so a lane ends
with the factors it would have had trained alone, up to floating-point summation order.

The lanes' factors are separate tensors, so the sum of the lanes' losses gives each lane exactly its own
gradient; lanes of different ranks need no padding. LoRA dropout is not applied (the batched path
requires ``lora.dropout = 0``, which the config checks).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fedspine.client.objectives import Objective
from fedspine.client.train import LocalResult, make_optimizer
from fedspine.data.batching import IGNORE_INDEX, Batch
from fedspine.types import LoraState

Factors = list[tuple[Tensor, Tensor]]
"""A lane's ``(A, B)`` per adapted module, in the order of the lane state's modules."""


@dataclass
class Lane:
    """One task of a batched run: its starting factors, scaling, batches and optional penalty.

    Attributes:
        state: starting ``{module: {"A": (r, in), "B": (out, r)}}``; the modules every lane adapts.
        scaling: the update's scale (``alpha / r`` or the strategy's).
        batches: one batch per local step.
        penalty: a regulariser over the lane's factors added to its loss (HetLoRA), or None.
    """

    state: LoraState
    scaling: float
    batches: list[Batch]
    penalty: Callable[[Factors], Tensor | None] | None = None
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, init=False)


def concat_batches(batches: Sequence[Batch], padding_side: Literal["left", "right"], pad_id: int) -> Batch:
    """One batch holding ``batches``' rows in order, padded to the longest on ``padding_side``.

    Padding has attention mask 0 and label ``IGNORE_INDEX``; position ids count real tokens only, so a
    row's positions do not depend on how much it was padded.
    """
    width = max(int(b.input_ids.shape[1]) for b in batches)

    def pad(t: Tensor, value: int) -> Tensor:
        extra = width - int(t.shape[1])
        if not extra:
            return t
        filler = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
        return torch.cat([filler, t] if padding_side == "left" else [t, filler], dim=1)

    attention_mask = torch.cat([pad(b.attention_mask, 0) for b in batches])
    has_labels = batches[0].labels is not None
    has_index = batches[0].label_index is not None
    return Batch(
        input_ids=torch.cat([pad(b.input_ids, pad_id) for b in batches]),
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(dim=-1) - 1).clamp(min=0),
        label_index=torch.cat([b.label_index for b in batches if b.label_index is not None])
        if has_index
        else None,
        labels=torch.cat([pad(b.labels, IGNORE_INDEX) for b in batches if b.labels is not None])
        if has_labels
        else None,
        num_tokens=sum(b.num_tokens for b in batches),
    )


def base_linear(model: Any, name: str) -> nn.Linear:
    """The frozen ``nn.Linear`` named ``name`` in the base model (inside a peft LoRA layer if wrapped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = base.get_submodule(name)
    module = getattr(module, "base_layer", module)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is a {type(module).__name__}, not a linear layer")
    return module


@contextmanager
def lane_updates(model: nn.Module, names: Sequence[str], rows: list[tuple[Lane, slice]]) -> Iterator[None]:
    """While active, every named linear adds ``scaling · B (A x)`` of each lane to that lane's rows."""

    def hook_for(name: str) -> Callable[..., Tensor]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            x = inputs[0]
            deltas = []
            for lane, span in rows:
                a, b = lane.factors[name]
                deltas.append(((x[span].to(a.dtype) @ a.t()) @ b.t()) * lane.scaling)  # as peft orders it
            return output + torch.cat(deltas).to(output.dtype)

        return hook

    handles = [base_linear(model, n).register_forward_hook(hook_for(n)) for n in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def train_lanes(
    model: Any,
    objective: Objective,
    lanes: Sequence[Lane],
    *,
    optimizer: str,
    lr: float,
    weight_decay: float,
    max_grad_norm: float,
    padding_side: Literal["left", "right"],
    pad_id: int,
) -> list[tuple[LoraState, LocalResult]]:
    """Train every lane for its own number of steps; each lane's final factors and local result.

    ``model``'s own weights are never changed; a peft model's adapters are switched off for the run.
    ``host_seconds`` of a lane is its share of the wall time, by the tokens it trained.
    """
    if not lanes:
        return []
    names = list(lanes[0].state)
    param = next(model.parameters())
    optimizers = []
    for lane in lanes:
        if list(lane.state) != names:
            raise ValueError("every lane must adapt the same modules")
        lane.factors = {
            n: (
                nn.Parameter(lane.state[n]["A"].detach().to(param.device, torch.float32).clone()),
                nn.Parameter(lane.state[n]["B"].detach().to(param.device, torch.float32).clone()),
            )
            for n in names
        }
        optimizers.append(make_optimizer(_params(lane), optimizer, lr, weight_decay))
    losses: list[list[float]] = [[] for _ in lanes]
    disable = model.disable_adapter() if hasattr(model, "disable_adapter") else _nothing()
    start = time.perf_counter()
    model.train()
    with disable:
        for step in range(max(len(lane.batches) for lane in lanes)):
            active = [i for i, lane in enumerate(lanes) if step < len(lane.batches)]
            batches = [lanes[i].batches[step].to(param.device) for i in active]
            rows, row = [], 0
            for i, b in zip(active, batches, strict=True):
                rows.append((lanes[i], slice(row, row + b.size)))
                row += b.size
            for i in active:
                optimizers[i].zero_grad(set_to_none=True)
            with lane_updates(model, names, rows):
                sums, counts = objective.example_losses(model, concat_batches(batches, padding_side, pad_id))
            total = sums.new_zeros(())
            for i, (lane, span) in zip(active, rows, strict=True):
                loss = sums[span].sum() / counts[span].sum().clamp(min=1)
                losses[i].append(float(loss.detach()))
                extra = lane.penalty(_factors(lane)) if lane.penalty is not None else None
                total = total + (loss if extra is None else loss + extra)
            total.backward()
            for i in active:
                if max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(_params(lanes[i]), max_grad_norm)
                optimizers[i].step()
    model.eval()
    seconds = time.perf_counter() - start
    tokens = [sum(b.num_tokens for b in lane.batches) for lane in lanes]
    results = []
    for lane, lane_losses, lane_tokens in zip(lanes, losses, tokens, strict=True):
        state = {n: {"A": a.detach().cpu(), "B": b.detach().cpu()} for n, (a, b) in lane.factors.items()}
        mean = sum(lane_losses) / len(lane_losses) if lane_losses else float("nan")
        share = seconds * lane_tokens / max(sum(tokens), 1)
        first = lane_losses[0] if lane_losses else float("nan")
        results.append((state, LocalResult(mean, len(lane_losses), share, first_loss=first)))
        lane.factors = {}
    return results


def _factors(lane: Lane) -> Factors:
    return list(lane.factors.values())


def _params(lane: Lane) -> list[Any]:
    return [p for pair in lane.factors.values() for p in pair]


@contextmanager
def _nothing() -> Iterator[None]:
    yield


__all__ = ["Factors", "Lane", "base_linear", "concat_batches", "lane_updates", "train_lanes"]
