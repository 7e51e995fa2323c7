"""Encoded datasets and dynamically padded batches of torch tensors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from fedspine.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label value that the loss skips (Hugging Face and ``torch.nn.CrossEntropyLoss`` convention)."""


@dataclass(frozen=True)
class EncodedDataset:
    """Token ids of a dataset, unpadded; :func:`iterate_batches` pads each batch to its longest member.

    Exactly one of ``label_index`` (classification) and ``labels`` (language modelling) is set.

    Attributes:
        input_ids: N sequences of token ids, each of length 1..max_length.
        pad_id: token id used for padding.
        padding_side: ``"left"`` (classification: the last position ends every prompt) or ``"right"``.
        vocab_size: ``len(tokenizer)``, including added tokens.
        label_index: (N,) class index of each example, for classification.
        label_token_ids: (C,) token id of each class's label word, for classification.
        labels: N sequences aligned with ``input_ids``: the token to predict, or ``IGNORE_INDEX``.
    """

    input_ids: list[list[int]]
    pad_id: int
    padding_side: Literal["left", "right"]
    vocab_size: int
    label_index: list[int] | None = None
    label_token_ids: list[int] | None = None
    labels: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if (self.label_index is None) == (self.labels is None):
            raise ValueError(
                "set exactly one of label_index (classification) and labels (language modelling)"
            )
        if self.label_index is not None and len(self.label_index) != len(self.input_ids):
            raise ValueError("label_index must have one entry per sequence")
        if self.labels is not None and [len(s) for s in self.labels] != [len(s) for s in self.input_ids]:
            raise ValueError("labels must have the shape of input_ids")
        if any(not seq for seq in self.input_ids):
            raise DataError("an example encodes to zero tokens")

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        """(N,) number of tokens of each example."""
        return np.fromiter((len(s) for s in self.input_ids), dtype=np.int64, count=len(self.input_ids))


@dataclass(frozen=True)
class Batch:
    """A padded batch. Padding has ``attention_mask`` 0 and label ``IGNORE_INDEX``.

    Attributes:
        input_ids: (B, T) int64 token ids.
        attention_mask: (B, T) int64, 1 on tokens, 0 on padding.
        position_ids: (B, T) int64, 0, 1, ... over the real tokens (left padding would shift them).
        label_index: (B,) int64 class index, for classification.
        labels: (B, T) int64 token targets (unshifted, as Hugging Face causal LMs expect), for LM.
        num_tokens: number of non-padding tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    label_index: torch.Tensor | None
    labels: torch.Tensor | None
    num_tokens: int

    @property
    def size(self) -> int:
        """Number of examples B."""
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to ``device``."""
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            label_index=None if self.label_index is None else self.label_index.to(device),
            labels=None if self.labels is None else self.labels.to(device),
            num_tokens=self.num_tokens,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a Hugging Face causal LM (``labels`` included for LM batches)."""
        inputs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }
        if self.labels is not None:
            inputs["labels"] = self.labels
        return inputs


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, falling back to its end-of-sequence id."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    raise DataError("the tokenizer has neither a pad token nor an end-of-sequence token")


def collate(encoded: EncodedDataset, indices: Sequence[int] | np.ndarray) -> Batch:
    """Pad the examples at ``indices`` to the longest of them, on ``encoded.padding_side``."""
    seqs = [encoded.input_ids[i] for i in indices]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), encoded.pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)  # (B, T)
    labels = None if encoded.labels is None else torch.full_like(input_ids, IGNORE_INDEX)  # (B, T)
    for row, (i, seq) in enumerate(zip(indices, seqs, strict=True)):
        start = width - len(seq) if encoded.padding_side == "left" else 0
        input_ids[row, start : start + len(seq)] = torch.tensor(seq)
        attention_mask[row, start : start + len(seq)] = 1
        if labels is not None and encoded.labels is not None:
            labels[row, start : start + len(seq)] = torch.tensor(encoded.labels[i])
    label_index = None
    if encoded.label_index is not None:
        label_index = torch.tensor([encoded.label_index[i] for i in indices], dtype=torch.long)  # (B,)
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, T)
    num_tokens = int(attention_mask.sum())
    return Batch(input_ids, attention_mask, position_ids, label_index, labels, num_tokens)


def iterate_batches(
    encoded: EncodedDataset,
    indices: Sequence[int] | np.ndarray,
    batch_size: int,
    rng: np.random.Generator | None,
    shuffle: bool = True,
) -> Iterator[Batch]:
    """Yield padded batches over ``indices`` (the last one may be smaller), shuffled with ``rng``.

    Raises:
        ValueError: ``batch_size`` < 1, or ``shuffle`` without an ``rng``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.asarray(indices, dtype=np.int64)
    if shuffle:
        if rng is None:
            raise ValueError("shuffle=True needs an rng")
        order = rng.permutation(order)
    for start in range(0, len(order), batch_size):
        yield collate(encoded, order[start : start + batch_size].tolist())
