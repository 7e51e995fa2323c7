"""Evaluation of a model on batches: summed loss and the task metric."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fedspine.client.objectives import BatchResult, Objective


@dataclass
class Evaluation:
    """Metric and mean loss over an evaluation set."""

    metric_name: str
    metric: float
    loss: float
    count: int


@torch.no_grad()
def evaluate(model: Any, objective: Objective, batches: Iterable[Any]) -> Evaluation:
    """Evaluate ``model`` (in eval mode, no dropout) over all ``batches``."""
    model.eval()
    total = BatchResult(0.0, 0, 0)
    for batch in batches:
        result = objective.evaluate(model, batch)
        total = BatchResult(
            total.loss_sum + result.loss_sum, total.count + result.count, total.correct + result.correct
        )
    return Evaluation(
        metric_name=objective.metric_name,
        metric=objective.metric(total),
        loss=total.loss_sum / max(total.count, 1),
        count=total.count,
    )
