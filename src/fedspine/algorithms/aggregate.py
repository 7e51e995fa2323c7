"""Aggregation as associative partial sums, so a tree of aggregators equals a flat one.

A strategy exposes ``init_partial / accumulate / merge / finalize``. :func:`aggregate` runs them
either flat or as a LIFL-style tree (leaves of ``fan_in`` updates, merged level by level).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from fedspine.types import ClientUpdate

P = TypeVar("P")
"""A strategy's partial aggregate (stacked blocks, padded factor sums, coverage-normalised blocks)."""


class Aggregator(Protocol[P]):
    """The associative core of a strategy's aggregation."""

    def init_partial(self) -> P:
        """An empty partial aggregate."""

    def accumulate(self, partial: P, update: ClientUpdate) -> P:
        """Fold one client update into a partial."""

    def merge(self, left: P, right: P) -> P:
        """Combine two partials (associative, commutative up to float rounding)."""

    def finalize(self, partial: P) -> None:
        """Turn the complete partial into the new global state."""


def aggregate(aggregator: Aggregator[P], updates: Sequence[ClientUpdate], fan_in: int = 0) -> None:
    """Aggregate ``updates`` flat (``fan_in`` = 0) or through a tree with leaves of ``fan_in`` updates."""
    if fan_in <= 0 or len(updates) <= fan_in:
        partial = aggregator.init_partial()
        for update in updates:
            partial = aggregator.accumulate(partial, update)
        aggregator.finalize(partial)
        return
    level = [_leaf(aggregator, updates[i : i + fan_in]) for i in range(0, len(updates), fan_in)]
    while len(level) > 1:
        level = [_merge_group(aggregator, level[i : i + fan_in]) for i in range(0, len(level), fan_in)]
    aggregator.finalize(level[0])


def _leaf(aggregator: Aggregator[P], updates: Sequence[ClientUpdate]) -> P:
    partial = aggregator.init_partial()
    for update in updates:
        partial = aggregator.accumulate(partial, update)
    return partial


def _merge_group(aggregator: Aggregator[P], partials: Sequence[P]) -> P:
    merged = partials[0]
    for partial in partials[1:]:
        merged = aggregator.merge(merged, partial)
    return merged
