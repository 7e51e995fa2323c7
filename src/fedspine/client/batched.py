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
from contextlib import AbstractContextManager, contextmanager
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
    """One task of a batched run: its starting factors, scaling, batches, and its submodel if pruned.

    Attributes:
        state: starting ``{module: {"A": (r, in), "B": (out, r)}}`` in the dense model's coordinates
            (a pruned lane's factors are zero on its removed units); every lane adapts the same modules.
        scaling: the update's scale (``alpha / r`` or the strategy's).
        batches: one batch per local step.
        penalty: a regulariser over the lane's factors added to its loss (HetLoRA), or None.
        keep: for a pruned lane, per ``o_proj`` / ``down_proj`` module name, the 0/1 mask of its kept input
            columns: the removed KV groups' and MLP channels' outputs are zeroed there, which is the
            sliced submodel's computation on the dense weights.
        bias: per ``down_proj`` name, the compensation bias the sliced submodel's ``down_proj`` carries.
        flap: measure FLAP statistics (count, sum, sum of squares of the inputs of ``o_proj`` and
            ``down_proj`` over the lane's real tokens), read with :func:`flap_scores`.
        probe: a batch the trained lane is scored on (its loss is returned), or None.
    """

    state: LoraState
    scaling: float
    batches: list[Batch]
    penalty: Callable[[Factors], Tensor | None] | None = None
    keep: dict[str, Tensor] = field(default_factory=dict)
    bias: dict[str, Tensor] = field(default_factory=dict)
    flap: bool = False
    probe: Batch | None = None
    factors: dict[str, tuple[nn.Parameter, nn.Parameter]] = field(default_factory=dict, init=False)
    stats: dict[str, list[Any]] = field(default_factory=dict, init=False)
    mask: Tensor | None = field(default=None, init=False)
    """The real-token mask of the lane's rows in the current step (FLAP counts only these)."""


@dataclass
class LaneResult:
    """A lane's outcome: final factors (dense coordinates, on the CPU), local result, FLAP statistics,
    and the probe loss."""

    state: LoraState
    local: LocalResult
    stats: dict[str, list[Any]]
    probe_loss: float | None


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


def base_linear(model: nn.Module, name: str) -> nn.Linear:
    """The frozen ``nn.Linear`` named ``name`` in the base model (inside a peft LoRA layer if wrapped)."""
    base = _base_model(model)
    module = base.get_submodule(name)
    module = getattr(module, "base_layer", module)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is a {type(module).__name__}, not a linear layer")
    return module


def _base_model(model: nn.Module) -> nn.Module:
    """The base model inside a peft model; any other model itself."""
    get_base_model = getattr(model, "get_base_model", None)
    base: nn.Module = get_base_model() if get_base_model is not None else model
    return base


@contextmanager
def lane_updates(model: nn.Module, names: Sequence[str], rows: list[tuple[Lane, slice]]) -> Iterator[None]:
    """While active, each lane's rows see its own model: every adapted linear (``names``) adds the lane's
    ``scaling · B (A x)``, a pruned lane's removed units are zeroed at the input of ``o_proj`` and
    ``down_proj``, its compensation bias is added to ``down_proj``, and FLAP statistics are counted."""
    masked = sorted({n for lane, _ in rows for n in (*lane.keep, *lane.bias)} | _flap_modules(model, rows))

    def pre_hook_for(name: str) -> Callable[..., tuple[Tensor, ...]]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            x = inputs[0]
            if any(name in lane.keep for lane, _ in rows):
                scale = torch.ones(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
                for lane, span in rows:
                    if name in lane.keep:
                        scale[span] = lane.keep[name].to(x.device, x.dtype)
                x = x * scale.view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
            for lane, span in rows:
                if lane.flap and lane.mask is not None:
                    _count(lane, name, x[span])
            return (x, *inputs[1:])

        return hook

    def hook_for(name: str) -> Callable[..., Tensor]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            x = inputs[0]
            parts = []
            for lane, span in rows:
                part = torch.zeros_like(output[span])
                if name in lane.factors:
                    a, b = lane.factors[name]
                    part = ((x[span].to(a.dtype) @ a.t()) @ b.t()) * lane.scaling  # as peft orders it
                if name in lane.bias:
                    part = part + lane.bias[name].to(part.device, part.dtype)
                parts.append(part)
            return output + torch.cat(parts).to(output.dtype)

        return hook

    handles = [base_linear(model, n).register_forward_pre_hook(pre_hook_for(n)) for n in masked]
    handles += [base_linear(model, n).register_forward_hook(hook_for(n)) for n in sorted({*names, *masked})]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _flap_modules(model: nn.Module, rows: list[tuple[Lane, slice]]) -> set[str]:
    """The ``o_proj`` / ``down_proj`` of every layer when a lane measures FLAP statistics."""
    if not any(lane.flap for lane, _ in rows):
        return set()
    base = _base_model(model)
    return {n for n, _ in base.named_modules() if n.endswith((".o_proj", ".down_proj")) and ".layers." in n}


def _count(lane: Lane, name: str, x: Tensor) -> None:
    """Add the lane's real tokens of ``x`` (its rows of a module's input) to its FLAP statistics, as
    :class:`~fedspine.model.importance.FlapMeter` counts them."""
    assert lane.mask is not None
    flat = x.detach().reshape(-1, x.shape[-1]).double()[lane.mask.reshape(-1).to(x.device)]
    stats = lane.stats.setdefault(name, [0, torch.zeros(flat.shape[1]), torch.zeros(flat.shape[1])])
    stats[0] += flat.shape[0]
    stats[1] += flat.sum(0).cpu().to(stats[1].dtype)
    stats[2] += flat.pow(2).sum(0).cpu().to(stats[2].dtype)


def train_lanes(
    model: nn.Module,
    objective: Objective,
    lanes: Sequence[Lane],
    *,
    optimizer: str,
    lr: float,
    weight_decay: float,
    max_grad_norm: float,
    padding_side: Literal["left", "right"],
    pad_id: int,
) -> list[LaneResult]:
    """Train every lane for its own number of steps, then score each lane's probe; one result per lane.

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
        lane.stats = {}
        optimizers.append(make_optimizer(_params(lane), optimizer, lr, weight_decay))
    losses: list[list[float]] = [[] for _ in lanes]
    disable_adapter = getattr(model, "disable_adapter", None)  # a peft model's
    disable: AbstractContextManager[None] = disable_adapter() if disable_adapter is not None else _nothing()
    start = time.perf_counter()
    model.train()
    with disable:
        for step in range(max(len(lane.batches) for lane in lanes)):
            active = [i for i, lane in enumerate(lanes) if step < len(lane.batches)]
            rows = _rows([lanes[i] for i in active], [lanes[i].batches[step] for i in active])
            for i in active:
                optimizers[i].zero_grad(set_to_none=True)
            batch = concat_batches([lanes[i].batches[step] for i in active], padding_side, pad_id)
            with lane_updates(model, names, rows):
                sums, counts = objective.example_losses(model, batch.to(param.device))
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
        probes = _probe_losses(model, objective, names, lanes, padding_side, pad_id, param.device)
    seconds = time.perf_counter() - start
    tokens = [sum(b.num_tokens for b in lane.batches) for lane in lanes]
    results = []
    for i, lane in enumerate(lanes):
        state = {n: {"A": a.detach().cpu(), "B": b.detach().cpu()} for n, (a, b) in lane.factors.items()}
        mean = sum(losses[i]) / len(losses[i]) if losses[i] else float("nan")
        share = seconds * tokens[i] / max(sum(tokens), 1)
        first = losses[i][0] if losses[i] else float("nan")
        local = LocalResult(mean, len(losses[i]), share, first_loss=first)
        results.append(LaneResult(state, local, lane.stats, probes.get(i)))
        lane.factors, lane.stats, lane.mask = {}, {}, None
    return results


def _rows(lanes: Sequence[Lane], batches: Sequence[Batch]) -> list[tuple[Lane, slice]]:
    """Each lane's rows in the concatenation of ``batches``; sets the lanes' real-token masks."""
    rows, row = [], 0
    for lane, batch in zip(lanes, batches, strict=True):
        rows.append((lane, slice(row, row + batch.size)))
        lane.mask = batch.attention_mask.bool()
        row += batch.size
    return rows


@torch.no_grad()
def _probe_losses(
    model: nn.Module,
    objective: Objective,
    names: Sequence[str],
    lanes: Sequence[Lane],
    padding_side: Literal["left", "right"],
    pad_id: int,
    device: torch.device,
) -> dict[int, float]:
    """Mean loss of each trained lane on its probe batch, in one forward (nothing is counted)."""
    scored = [i for i, lane in enumerate(lanes) if lane.probe is not None]
    if not scored:
        return {}
    probes = [lanes[i].probe for i in scored]
    rows = _rows([lanes[i] for i in scored], probes)  # type: ignore[arg-type]
    for lane, _ in rows:
        lane.mask = None  # a probe is scored, not measured
    batch = concat_batches(probes, padding_side, pad_id)  # type: ignore[arg-type]
    with lane_updates(model, names, rows):
        sums, counts = objective.example_losses(model, batch.to(device))
    return {
        i: float(sums[span].sum() / counts[span].sum().clamp(min=1))
        for i, (_, span) in zip(scored, rows, strict=True)
    }


def _factors(lane: Lane) -> Factors:
    return list(lane.factors.values())


def _params(lane: Lane) -> list[nn.Parameter]:
    return [p for pair in lane.factors.values() for p in pair]


@contextmanager
def _nothing() -> Iterator[None]:
    yield


__all__ = ["Factors", "Lane", "LaneResult", "base_linear", "concat_batches", "lane_updates", "train_lanes"]
