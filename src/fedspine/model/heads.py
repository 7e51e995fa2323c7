"""Output heads cut to a few tokens, for evaluating classification without the full vocabulary.

A verbalizer classifier reads only the logits of its label words at the last position. The full head
of SmolLM2 multiplies every hidden state by a 49,152 x 576 matrix to produce logits of which six are
read; cutting the head to the label rows computes exactly those six (the model's own forward, so any
scaling or soft-capping it applies after the head still applies).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class LabelHead(nn.Linear):
    """An output head holding only the rows of some tokens: logit ``k`` is token ``token_ids[k]``'s."""

    def __init__(self, head: nn.Linear, token_ids: Sequence[int]) -> None:
        index = torch.as_tensor(list(token_ids), dtype=torch.long, device=head.weight.device)
        super().__init__(
            head.in_features,
            len(index),
            bias=head.bias is not None,
            device=head.weight.device,
            dtype=head.weight.dtype,
        )
        with torch.no_grad():
            self.weight.copy_(head.weight.index_select(0, index))  # (K, H)
            if head.bias is not None:
                self.bias.copy_(head.bias.index_select(0, index))  # (K,)
        self.requires_grad_(False)
        self.token_ids = tuple(int(i) for i in index.tolist())


def cut_output_head(model: PreTrainedModel, token_ids: Sequence[int]) -> None:
    """Replace ``model``'s output head by a :class:`LabelHead` over ``token_ids`` (in place).

    Tied input embeddings are untouched: the new head owns a copy of the rows. Call it on a copy of the
    model that nothing else uses.

    Raises:
        TypeError: the model's output embeddings are not a linear layer.
    """
    head = model.get_output_embeddings()
    if isinstance(head, LabelHead):
        return
    if not isinstance(head, nn.Linear):
        raise TypeError(f"cannot cut an output head of type {type(head).__name__}")
    model.set_output_embeddings(LabelHead(head, token_ids))


def label_head(model: nn.Module) -> LabelHead | None:
    """The model's :class:`LabelHead`, or None when it has its full head."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    return head if isinstance(head, LabelHead) else None
