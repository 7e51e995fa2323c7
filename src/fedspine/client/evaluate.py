"""Evaluation of a model on a held-out set: summed loss and the task metric.

Evaluation is what makes a comparison large enough to trust (600 test examples for a standard error
near 2 points of accuracy), so it is built to be cheap:

* the held-out set is tokenised once and batched once, by length (:class:`EvalSet`), so batches carry
  almost no padding and every evaluation reuses the same tensors;
* it runs under ``torch.inference_mode`` on a plain copy of the model (LoRA merged, see the executor),
  prepared by the objective: a classifier's head is cut to its label words;
* optionally in a narrower dtype (``eval.dtype``) than the model trains in.

Sorting changes which examples share a batch, never which examples are counted; the summed loss and
correct count do not depend on the order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedspine.client.objectives import BatchResult, Objective
from fedspine.data.batching import Batch, EncodedDataset, collate

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EVAL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes ``eval.dtype`` may name (``"model"``: evaluate in the model's own dtype)."""


@dataclass
class Evaluation:
    """Metric and mean loss over an evaluation set."""

    metric_name: str
    metric: float
    loss: float
    count: int
    """Examples (classification) or predicted tokens (language modelling) scored."""
    correct: int = 0
    """Examples classified correctly (classification)."""


def pooled(objective: Objective, evaluations: Iterable[Evaluation]) -> Evaluation:
    """One evaluation over the union of the sets ``evaluations`` were measured on (count-weighted:
    pooled accuracy, or the perplexity of the pooled mean loss)."""
    total = BatchResult(0.0, 0, 0)
    for e in evaluations:
        total = BatchResult(
            total.loss_sum + e.loss * e.count, total.count + e.count, total.correct + e.correct
        )
    return _evaluation(objective, total)


def _evaluation(objective: Objective, total: BatchResult) -> Evaluation:
    return Evaluation(
        metric_name=objective.metric_name,
        metric=objective.metric(total),
        loss=total.loss_sum / max(total.count, 1),
        count=total.count,
        correct=total.correct,
    )


@dataclass(frozen=True)
class EvalSet:
    """A held-out set, padded into batches once and reused by every evaluation.

    Attributes:
        batches: the examples sorted by token count (stable), ``batch_size`` per batch.
        count: number of examples.
    """

    batches: tuple[Batch, ...]
    count: int

    @classmethod
    def from_dataset(
        cls, data: EncodedDataset, batch_size: int, indices: np.ndarray | None = None
    ) -> EvalSet:
        """Sort ``data`` (or its examples at ``indices``) by length; pad it into batches of ``batch_size``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chosen = np.arange(len(data)) if indices is None else np.asarray(indices, dtype=np.int64)
        order = chosen[np.argsort(data.lengths()[chosen], kind="stable")]
        batches = tuple(
            collate(data, order[start : start + batch_size].tolist())
            for start in range(0, len(order), batch_size)
        )
        return cls(batches=batches, count=len(order))

    def padding_fraction(self) -> float:
        """Share of the batched positions that are padding."""
        positions = sum(b.attention_mask.numel() for b in self.batches)
        return 1.0 - sum(b.num_tokens for b in self.batches) / max(positions, 1)


def prepare_eval_model(model: PreTrainedModel, objective: Objective, dtype: str = "model") -> PreTrainedModel:
    """Ready ``model`` for :func:`evaluate` in place: cast to ``dtype``, let the objective cut its head.

    ``model`` must be a copy that nothing else uses (its head and dtype change).
    """
    if dtype != "model":
        module: nn.Module = model  # as nn.Module: transformers' decorated .to() confuses mypy
        module.to(EVAL_DTYPES[dtype])
    objective.prepare_eval(model)
    model.requires_grad_(False)
    return model


@torch.inference_mode()
def evaluate(model: nn.Module, objective: Objective, batches: Iterable[Batch]) -> Evaluation:
    """Evaluate ``model`` (in eval mode, no dropout) over all ``batches``."""
    model.eval()
    device = next(model.parameters()).device
    total = BatchResult(0.0, 0, 0)
    for batch in batches:
        result = objective.evaluate(model, batch.to(device))
        total = BatchResult(
            total.loss_sum + result.loss_sum, total.count + result.count, total.correct + result.correct
        )
    return _evaluation(objective, total)
