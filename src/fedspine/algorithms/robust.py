"""Robust aggregation of LoRA updates: norm clipping, coordinate-wise median and trimmed mean.

All three act on an update's *change*: its factors minus the adapter its device received (for a
device that lowered its rank, the received factors cut to its rank). Clipping rescales one update's
change to an L2 bound (over all its factors) and suits every strategy. The median and the trimmed
mean replace the round's updates by one: the common starting adapter plus the per-coordinate median
(or mean of the values left after dropping the ``trim`` fraction at each end) of the changes. They
need updates of equal shapes from one starting adapter: a global adapter at one rank (FedIT,
zero-padding, HetLoRA and FlexLoRA with equal ranks) in synchronous rounds.

Each rule is registered by name in :data:`ROBUST_RULES` (``server.robust``): a factory that takes the
``[server]`` table's ``clip_norm`` and ``trim_fraction`` and returns a :data:`RobustRule`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from fedspine.algorithms.lora_math import cut_to
from fedspine.registry import Registry
from fedspine.types import ClientUpdate, LoraState

Received = Sequence[tuple[ClientUpdate, LoraState]]
"""A server step's accepted updates, each with the adapter its device started from."""


class RobustRule(Protocol):
    """What the server aggregates instead of a step's accepted updates."""

    @property
    def combines(self) -> bool:
        """Whether it replaces a step's updates by one (needs a synchronous step, a global adapter
        and equal ranks, and loses which device, or cluster, each update came from)."""
        ...

    def __call__(self, received: Received) -> list[ClientUpdate]: ...


ROBUST_RULES: Registry[Callable[[float, float], RobustRule]] = Registry("robust rule")
"""``server.robust`` name -> ``(clip_norm, trim_fraction) -> rule``."""


def _start(start: LoraState, module: str, name: str, like: torch.Tensor) -> torch.Tensor:
    return cut_to(start[module][name], like)


def change_norm(update: ClientUpdate, start: LoraState) -> float:
    """L2 norm of the update's change over all its factors."""
    total = 0.0
    for module, factors in update.lora_state.items():
        for name, value in factors.items():
            total += float((value.float() - _start(start, module, name, value)).pow(2).sum())
    return math.sqrt(total)


def clip(update: ClientUpdate, start: LoraState, max_norm: float) -> ClientUpdate:
    """The update with its change scaled down to L2 norm ``max_norm`` (unchanged when within)."""
    norm = change_norm(update, start)
    if norm <= max_norm:
        return update
    return _scale_change(update, start, max_norm / norm)


def combine(updates: Sequence[ClientUpdate], start: LoraState, rule: str, trim: float = 0.2) -> ClientUpdate:
    """One update: ``start`` plus the coordinate-wise ``median`` or ``trimmed_mean`` of the changes.

    Carries the summed sample count, so weighted strategies give it the whole round's weight.
    """
    if not updates:
        raise ValueError("nothing to combine")
    first = updates[0]
    for u in updates[1:]:
        if u.lora_state.keys() != first.lora_state.keys() or any(
            u.lora_state[m][n].shape != first.lora_state[m][n].shape
            for m in first.lora_state
            for n in ("A", "B")
        ):
            raise ValueError(f"{rule} needs updates of equal shapes; device {u.device_id} differs")
    state: LoraState = {}
    for module, factors in first.lora_state.items():
        state[module] = {}
        for name, value in factors.items():
            base = _start(start, module, name, value)
            changes = torch.stack([u.lora_state[module][name].float() - base for u in updates])
            state[module][name] = base + _robust_mean(changes, rule, trim)
    return dataclasses.replace(
        first, device_id=-1, lora_state=state, num_samples=sum(u.num_samples for u in updates), wire=None
    )


def _robust_mean(stacked: torch.Tensor, rule: str, trim: float) -> torch.Tensor:
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if rule == "median":
        mid = n // 2
        return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    if rule == "trimmed_mean":
        k = math.floor(trim * n)
        return ordered[k : n - k].mean(dim=0)
    raise ValueError(f"unknown robust rule {rule!r}; allowed: median, trimmed_mean")


@dataclass(frozen=True)
class NoRule:
    """The updates as they are."""

    combines: ClassVar[bool] = False

    def __call__(self, received: Received) -> list[ClientUpdate]:
        return [u for u, _ in received]


@dataclass(frozen=True)
class Clip:
    """Each update's change clipped to L2 norm ``max_norm`` (:func:`clip`)."""

    max_norm: float
    combines: ClassVar[bool] = False

    def __call__(self, received: Received) -> list[ClientUpdate]:
        return [clip(u, start, self.max_norm) for u, start in received]


@dataclass(frozen=True)
class Combine:
    """The step's updates replaced by one (:func:`combine`): the coordinate-wise ``rule``."""

    rule: str
    trim: float
    combines: ClassVar[bool] = True

    def __call__(self, received: Received) -> list[ClientUpdate]:
        if not received:
            return []
        return [combine([u for u, _ in received], received[0][1], self.rule, self.trim)]


ROBUST_RULES.register("none")(lambda clip_norm, trim: NoRule())
ROBUST_RULES.register("clip")(lambda clip_norm, trim: Clip(clip_norm))
ROBUST_RULES.register("median")(lambda clip_norm, trim: Combine("median", trim))
ROBUST_RULES.register("trimmed_mean")(lambda clip_norm, trim: Combine("trimmed_mean", trim))


def corrupt(update: ClientUpdate, start: LoraState, kind: str, factor: float) -> ClientUpdate:
    """What an attacking device uploads instead of ``update`` (robustness studies).

    ``scale``: the change times ``factor``; ``sign_flip``: times ``-factor``; ``nonfinite``: NaN factors.
    """
    if kind == "nonfinite":
        state = {
            m: {n: torch.full_like(v, float("nan")) for n, v in f.items()}
            for m, f in update.lora_state.items()
        }
        return dataclasses.replace(update, lora_state=state)
    return _scale_change(update, start, {"scale": factor, "sign_flip": -factor}[kind])


def _scale_change(update: ClientUpdate, start: LoraState, c: float) -> ClientUpdate:
    state = {
        module: {
            name: _start(start, module, name, v) * (1 - c) + c * v.float() for name, v in factors.items()
        }
        for module, factors in update.lora_state.items()
    }
    return dataclasses.replace(update, lora_state=state)
