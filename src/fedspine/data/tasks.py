"""Tasks: how examples become token ids and labels, and which metric judges the model.

Two kinds share the small :class:`Task` protocol:

* :class:`ClassificationTask` — verbalizer style for causal LMs: the prompt is left-padded so the last
  position predicts the first token of a label word; metric: accuracy.
* :class:`LanguageModelingTask` — next-token loss on the text (plain data) or on the response only
  (instruction data); metric: perplexity, ``exp`` of the mean token loss.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from fedspine.data.batching import IGNORE_INDEX, EncodedDataset, pad_token_id
from fedspine.data.sources import Example
from fedspine.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEXT_FIELD = "{text}"
DEFAULT_CLASSIFICATION_PROMPT = "Text: {text}\nCategory:"


class Task(Protocol):
    """What the client and the evaluator need from a task."""

    @property
    def metric_name(self) -> str:
        """``"accuracy"`` or ``"perplexity"``."""
        ...

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger metric is better."""
        ...

    def encode(
        self, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int
    ) -> EncodedDataset:
        """Tokenise ``examples`` into sequences of at most ``max_length`` tokens."""
        ...

    def chance_level(self, test: EncodedDataset) -> float:
        """The metric of a trivial predictor on ``test``, to read results against."""
        ...


def _split_template(template: str) -> tuple[str, str]:
    """Split a prompt template into the text before and after its single ``{text}``."""
    if template.count(TEXT_FIELD) != 1:
        raise ValueError(f"prompt_template must contain {TEXT_FIELD} exactly once, got {template!r}")
    prefix, suffix = template.split(TEXT_FIELD)
    return prefix, suffix


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (one batched tokenizer call)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def label_logits(logits: torch.Tensor, label_token_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the label words at the last position of left-padded prompts.

    Args:
        logits: (B, T, V) causal LM logits.
        label_token_ids: (C,) token id of each class's label word.

    Returns:
        (B, C) class scores; ``argmax(-1)`` is the predicted class index.
    """
    return logits[:, -1, :].index_select(-1, label_token_ids.to(logits.device))  # (B, C)


class ClassificationTask:
    """Classify a text by the label word a causal LM puts after a prompt such as ``"...\\nCategory:"``.

    Args:
        labels: class names; a class's index is its position here.
        label_words: the word the model should say for each class (default: the labels).
        prompt_template: prompt with one ``{text}``; the label word follows it.
        label_prefix: put before each label word when it is tokenised (a space for BPE tokenizers;
            ``""`` with a prompt ending in a space, for byte tokenizers that split the space off).
    """

    metric_name = "accuracy"
    higher_is_better = True

    def __init__(
        self,
        labels: Sequence[str],
        label_words: Sequence[str] | None = None,
        prompt_template: str = DEFAULT_CLASSIFICATION_PROMPT,
        label_prefix: str = " ",
    ) -> None:
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be non-empty and distinct, got {list(labels)}")
        words = list(labels if label_words is None else label_words)
        if len(words) != len(labels):
            raise ValueError(f"{len(words)} label_words for {len(labels)} labels")
        self.labels = list(labels)
        self.label_words = words
        self.prompt_template = prompt_template
        self.label_prefix = label_prefix
        self._prefix, self._suffix = _split_template(prompt_template)
        self._index = {label: i for i, label in enumerate(self.labels)}

    def __repr__(self) -> str:
        return f"ClassificationTask(labels={self.labels}, prompt_template={self.prompt_template!r})"

    def label_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """First token of each label word (with ``label_prefix``), one per class.

        Raises:
            DataError: a label word is empty, or two classes share their first token.
        """
        firsts: dict[int, str] = {}
        encoded = _tokenize(tokenizer, [self.label_prefix + w for w in self.label_words])
        for word, ids in zip(self.label_words, encoded, strict=True):
            if not ids:
                raise DataError(f"label word {word!r} encodes to no tokens")
            if ids[0] in firsts:
                raise DataError(
                    f"label words {firsts[ids[0]]!r} and {word!r} start with the same token {ids[0]}; "
                    f"choose label_words whose first tokens differ{self._prefix_hint(tokenizer, ids[0])}"
                )
            firsts[ids[0]] = word
        return list(firsts)

    def _prefix_hint(self, tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
        """A hint for tokenizers (e.g. byte-level) that make the label prefix a token of its own."""
        if self.label_prefix and _tokenize(tokenizer, [self.label_prefix])[0] == [token_id]:
            return (
                f" (this tokenizer splits off {self.label_prefix!r}: end the prompt with it, label_prefix='')"
            )
        return ""

    def label_index(self, examples: Sequence[Example]) -> list[int]:
        """(N,) class index of each example.

        Raises:
            DataError: an example has no label or one outside ``labels``.
        """
        indices = []
        for i, ex in enumerate(examples):
            index = self._index.get(ex.label) if ex.label is not None else None
            if index is None:
                raise DataError(f"example {i} has label {ex.label!r}, not one of {self.labels}")
            indices.append(index)
        return indices

    def encode(
        self, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int
    ) -> EncodedDataset:
        """Tokenise prompts, left-padded; a too long text loses its end, never the template's suffix."""
        label_index = self.label_index(examples)
        prompts = [self._prefix + ex.text + self._suffix for ex in examples]
        input_ids = _tokenize(tokenizer, prompts)
        too_long = [i for i, ids in enumerate(input_ids) if len(ids) > max_length]
        cut = self._truncated([examples[i].text for i in too_long], tokenizer, max_length)
        for i, ids in zip(too_long, cut, strict=True):
            input_ids[i] = ids
        return EncodedDataset(
            input_ids=input_ids,
            pad_id=pad_token_id(tokenizer),
            padding_side="left",
            vocab_size=len(tokenizer),
            label_index=label_index,
            label_token_ids=self.label_token_ids(tokenizer),
        )

    def _truncated(
        self, texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int
    ) -> list[list[int]]:
        """prefix + text + suffix, tokenised part by part, with the text cut to fit ``max_length``."""
        prefix_ids, suffix_ids = _tokenize(tokenizer, [self._prefix, self._suffix])
        budget = max_length - len(prefix_ids) - len(suffix_ids)
        if budget < 1 and texts:
            raise DataError(f"max_length {max_length} leaves no room for text in {self.prompt_template!r}")
        return [prefix_ids + ids[:budget] + suffix_ids for ids in _tokenize(tokenizer, texts)]

    def chance_level(self, test: EncodedDataset) -> float:
        """Accuracy of the best constant predictor: the share of the most frequent class in ``test``."""
        if not test.label_index:
            raise DataError("chance level of an empty or unlabelled test set")
        return Counter(test.label_index).most_common(1)[0][1] / len(test.label_index)


class LanguageModelingTask:
    """Next-token prediction; the loss covers only what the model should produce.

    Instruction examples (``target`` set): prompt = the template filled with ``text``, loss on
    ``target``. Plain examples: prompt = the template's part before ``{text}``, loss on the text and the
    part after it. An end-of-sequence token ends every target, so the model learns to stop.

    Args:
        prompt_template: template with one ``{text}``; the default uses the text as is.
        append_eos: whether to end each target with the tokenizer's end-of-sequence token.
    """

    metric_name = "perplexity"
    higher_is_better = False

    def __init__(self, prompt_template: str = TEXT_FIELD, append_eos: bool = True) -> None:
        self.prompt_template = prompt_template
        self.append_eos = append_eos
        self._prefix, self._suffix = _split_template(prompt_template)

    def __repr__(self) -> str:
        return f"LanguageModelingTask(prompt_template={self.prompt_template!r})"

    def _prompt_and_target(self, example: Example) -> tuple[str, str]:
        if example.target is not None:
            return self._prefix + example.text + self._suffix, example.target
        return self._prefix, example.text + self._suffix

    def encode(
        self, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int
    ) -> EncodedDataset:
        """Tokenise prompt + target, right-padded; labels are ``IGNORE_INDEX`` on the prompt."""
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        pairs = [self._prompt_and_target(ex) for ex in examples]
        prompts = _tokenize(tokenizer, [p for p, _ in pairs])
        eos = [tokenizer.eos_token_id] if self.append_eos and tokenizer.eos_token_id is not None else []
        targets = [ids + eos for ids in _tokenize(tokenizer, [t for _, t in pairs])]
        input_ids, labels = [], []
        for prompt, target in (fit_lengths(p, t, max_length) for p, t in zip(prompts, targets, strict=True)):
            input_ids.append(prompt + target)
            labels.append([IGNORE_INDEX] * len(prompt) + target)
        return EncodedDataset(input_ids, pad_token_id(tokenizer), "right", len(tokenizer), labels=labels)

    def chance_level(self, test: EncodedDataset) -> float:
        """Perplexity of the uniform predictor: the vocabulary size (``len(tokenizer)``)."""
        return float(test.vocab_size)


def fit_lengths(prompt: list[int], target: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut prompt + target to ``max_length`` tokens, keeping at least half of the room for the target.

    The target loses its end; the prompt loses its start (the end of a prompt matters most).
    """
    if len(prompt) + len(target) <= max_length:
        return prompt, target
    target_keep = min(len(target), max(max_length - len(prompt), max_length // 2))
    prompt_keep = max_length - target_keep
    return prompt[len(prompt) - prompt_keep :], target[:target_keep]
