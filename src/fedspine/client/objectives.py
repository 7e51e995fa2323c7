"""Training objectives and metrics of the two task kinds, over a batch of the data layer.

Classification is verbalizer-style: the prompt is left-padded so that the last position predicts
the label word, and only that position's logits are computed (``logits_to_keep=1``), restricted
to the label words' token ids. Language modelling is next-token cross-entropy on the target tokens.

``prepare_eval`` readies a model copy for evaluation only: the classifier cuts its output head to the
label words (:mod:`fedspine.model.heads`), so evaluation never multiplies by the whole vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedspine.data.batching import Batch
from fedspine.model.heads import cut_output_head, label_head

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class BatchResult:
    """Summed loss and counts of one batch, so results over batches add up exactly."""

    loss_sum: float
    count: int
    """Examples (classification) or target tokens (LM) the loss is summed over."""
    correct: int = 0


class Objective(Protocol):
    """A task's loss and metric."""

    metric_name: str
    higher_is_better: bool

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean training loss of the batch (differentiable)."""

    def example_losses(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example, the summed loss and what it is summed over, both (B,): the mean training loss
        of any set of rows is their loss sum over their count (batched training of several clients)."""

    def evaluate(self, model: nn.Module, batch: Batch) -> BatchResult:
        """Summed loss and counts of the batch (no gradient)."""

    def metric(self, total: BatchResult) -> float:
        """The task metric from summed results."""

    def prepare_eval(self, model: PreTrainedModel) -> None:
        """Ready ``model`` (a copy used only for evaluation) for :meth:`evaluate`, in place."""


def _required(tensor: torch.Tensor | None, name: str) -> torch.Tensor:
    """A batch's ``label_index`` or ``labels``, which only batches of its own task kind hold."""
    if tensor is None:
        raise ValueError(f"the batch has no {name}: a batch of the other task kind")
    return tensor


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left padding: positions count real tokens only, as generate() does.   (B, T)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ClassificationObjective:
    """Cross-entropy over the label words' logits at the last prompt position; metric accuracy."""

    metric_name = "accuracy"
    higher_is_better = True

    def __init__(self, label_token_ids: Sequence[int]) -> None:
        self.label_token_ids = torch.tensor(list(label_token_ids), dtype=torch.long)

    def label_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Logits of the label words at the last position, shape (B, K)."""
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=_positions(batch.attention_mask),
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits
        head = label_head(model)
        if head is not None:  # a head cut to the label words by prepare_eval: column k is label k
            if head.token_ids != tuple(self.label_token_ids.tolist()):
                raise ValueError("the model's head is cut to other tokens than this task's label words")
            return logits[:, -1].float()  # (B, K)
        return logits[:, -1, self.label_token_ids.to(logits.device)].float()  # (B, K)

    def prepare_eval(self, model: PreTrainedModel) -> None:
        cut_output_head(model, self.label_token_ids.tolist())

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.label_logits(model, batch), _required(batch.label_index, "label_index"))

    def example_losses(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.label_logits(model, batch)
        losses = F.cross_entropy(logits, _required(batch.label_index, "label_index"), reduction="none")
        return losses, torch.ones_like(losses)

    def evaluate(self, model: nn.Module, batch: Batch) -> BatchResult:
        logits = self.label_logits(model, batch)
        label_index = _required(batch.label_index, "label_index")
        loss = F.cross_entropy(logits, label_index, reduction="sum")
        correct = int((logits.argmax(-1) == label_index).sum())
        return BatchResult(float(loss), len(label_index), correct)

    def metric(self, total: BatchResult) -> float:
        return total.correct / max(total.count, 1)


class LanguageModelingObjective:
    """Next-token cross-entropy on target tokens (labels != -100); metric perplexity."""

    metric_name = "perplexity"
    higher_is_better = False

    def _token_losses(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
        targets = _required(batch.labels, "labels")[:, 1:]  # (B, T-1): token t predicts t+1
        losses = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
        )
        return losses, (targets.flatten() != -100)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        losses, mask = self._token_losses(model, batch)
        return losses.sum() / mask.sum().clamp(min=1)

    def example_losses(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        losses, mask = self._token_losses(model, batch)
        rows = batch.input_ids.shape[0]
        return losses.view(rows, -1).sum(-1), mask.view(rows, -1).sum(-1).to(losses.dtype)

    def evaluate(self, model: nn.Module, batch: Batch) -> BatchResult:
        losses, mask = self._token_losses(model, batch)
        return BatchResult(float(losses.sum()), int(mask.sum()))

    def metric(self, total: BatchResult) -> float:
        return math.exp(min(total.loss_sum / max(total.count, 1), 50.0))

    def prepare_eval(self, model: PreTrainedModel) -> None:
        """Every position's full distribution is needed: nothing to cut."""
