"""The strategy contract shared by every federated LoRA method."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

from fedspine.registry import Registry
from fedspine.types import ClientUpdate, LoraState

Weighting = Literal["samples", "uniform"]


class Strategy(ABC):
    """Configures client tasks and aggregates their updates into the global state.

    Aggregation is written as ``init_partial / accumulate / merge / finalize`` over partial sums
    (see :mod:`fedspine.algorithms.aggregate`), so hierarchical aggregation is the same code.
    """

    name: str = ""

    def __init__(self, weighting: Weighting = "samples") -> None:
        self.weighting = weighting

    def update_weight(self, update: ClientUpdate) -> float:
        """Aggregation weight of an update before normalisation."""
        return float(update.num_samples) if self.weighting == "samples" else 1.0

    @abstractmethod
    def init_global(self, lora_state: LoraState) -> None:
        """Start from the initial adapter state (identical on every device)."""

    @abstractmethod
    def configure(self, round: int, device_id: int) -> LoraState:
        """The state device ``device_id`` starts from in ``round`` (what the downlink carries)."""

    @abstractmethod
    def global_lora(self) -> LoraState:
        """The current global adapter, used for evaluation and export."""

    @abstractmethod
    def init_partial(self) -> Any:
        """An empty partial aggregate."""

    @abstractmethod
    def accumulate(self, partial: Any, update: ClientUpdate) -> Any:
        """Fold one update into ``partial``."""

    @abstractmethod
    def merge(self, left: Any, right: Any) -> Any:
        """Combine two partials."""

    @abstractmethod
    def finalize(self, partial: Any) -> None:
        """Replace the global state with the aggregate held in ``partial``."""


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
