"""Local training of one client task: real forward/backward on this host, LoRA parameters only."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from fedspine.client.objectives import Objective
from fedspine.data.batching import Batch


@dataclass
class LocalResult:
    """Outcome of local training."""

    mean_loss: float
    steps: int
    host_seconds: float
    first_loss: float = float("nan")
    """Loss of the first batch before any update (the start of the progress measure)."""


def make_optimizer(
    params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """A fresh local optimizer; devices do not keep optimizer state between tasks."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train_local(
    model: nn.Module,
    objective: Objective,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float = 0.0,
    penalty: Callable[[], torch.Tensor | None] | None = None,
    after_backward: Callable[[], None] | None = None,
    before_forward: Callable[[Batch], None] | None = None,
) -> LocalResult:
    """Run one optimizer step per batch on the trainable (LoRA) parameters of ``model``.

    ``penalty``, when given, adds a regulariser to each step's loss (e.g. HetLoRA's tail norm); the
    reported loss is the task loss alone. ``after_backward``, when given, runs after each backward pass,
    before clipping and the optimizer step (e.g. to read gradients for importance scores);
    ``before_forward(batch)`` before each forward pass (e.g. to tell a meter which positions are padding).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    model.train()
    start = time.perf_counter()
    losses: list[float] = []
    for batch in batches:
        batch = batch.to(device)  # the model's device: a no-op on the CPU
        optimizer.zero_grad(set_to_none=True)
        if before_forward is not None:
            before_forward(batch)
        loss = objective.loss(model, batch)
        extra = penalty() if penalty is not None else None
        (loss if extra is None else loss + extra).backward()
        if after_backward is not None:
            after_backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    mean = sum(losses) / len(losses) if losses else float("nan")
    first = losses[0] if losses else float("nan")
    return LocalResult(mean, len(losses), time.perf_counter() - start, first_loss=first)
