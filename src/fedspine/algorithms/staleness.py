"""Stale updates: staleness functions and the handlers that turn a stale update into one to apply.

An update is *stale* by ``tau`` when ``tau`` aggregations happened between the version the device
started from and the one it is applied to (algorithms.md §3-§5).

Staleness functions ``s(tau)`` (FedAsync, FedBuff, FedCompass):

* ``constant``: ``s = 1``;
* ``polynomial``: ``s = (tau + 1) ** (-a)`` (a = 0.5 gives FedBuff's ``1 / sqrt(1 + tau)``). The
  original FedCompass code has ``(tau + 1) ** a``, which *up*-weights stale updates; this is the
  corrected form;
* ``hinge``: ``s = 1`` for ``tau <= b``, else ``1 / (a (tau - b) + 1)``.

Handlers (``StaleUpdateHandler``) see an update as the *change* ``delta`` it made to the state it
started from, and return the scale to apply it with and, optionally, a compensated change:

* ``identity``: apply as is;
* ``weight``: scale by ``s(tau)``;
* ``dcasgd``: DC-ASGD's first-order compensation ``delta + lambda * delta * delta * (w_now - w_start)``
  (element-wise). It needs the drift of the parameters the update is expressed in, so it applies to
  strategies that keep a global adapter (FedIT, zero-padding, HetLoRA), not to those that merge
  fresh adapters into the base (FLoRA, FedSpine).

A further handler, the gradient-inversion conversion of "FL with unlimited staleness" (estimate the
device's data from its stale update, then re-run its local training from the current model), fits the
same interface with access to the stale base version; it is practical for small models only and is not
provided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

StalenessKind = Literal["constant", "polynomial", "hinge"]


@dataclass(frozen=True)
class StalenessFunction:
    """``s(tau)``: the weight of an update that is ``tau`` aggregations old."""

    kind: StalenessKind = "polynomial"
    a: float = 0.5
    b: float = 4.0

    def __call__(self, tau: int) -> float:
        if tau < 0:
            raise ValueError(f"staleness must be >= 0, got {tau}")
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((tau + 1) ** (-self.a))
        if self.kind == "hinge":
            return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)
        raise ValueError(f"unknown staleness function {self.kind!r}; allowed: constant, polynomial, hinge")


class StaleUpdateHandler:
    """How a stale update is applied: a scale, and optionally a compensated change."""

    needs_drift = False
    """True when :meth:`compensate` needs the drift of the parameters since the update started."""

    def scale(self, tau: int) -> float:
        """Multiplier of the update's change."""
        return 1.0

    def compensate(self, delta: torch.Tensor, drift: torch.Tensor) -> torch.Tensor:
        """The change to apply instead of ``delta``, given ``drift = w_now - w_start``."""
        return delta


class Identity(StaleUpdateHandler):
    """Apply stale updates as they are."""


@dataclass
class StalenessWeight(StaleUpdateHandler):
    """Scale a stale update's change by ``s(tau)``."""

    function: StalenessFunction

    def scale(self, tau: int) -> float:
        return self.function(tau)


@dataclass
class DCASGD(StaleUpdateHandler):
    """Delay compensation (Zheng et al., 2017): ``delta + lambda * delta^2 * drift``, element-wise."""

    lam: float = 4.0
    needs_drift = True

    def compensate(self, delta: torch.Tensor, drift: torch.Tensor) -> torch.Tensor:
        return delta + self.lam * delta * delta * drift


def make_handler(name: str, function: StalenessFunction, lam: float = 4.0) -> StaleUpdateHandler:
    """The handler called ``name`` (``identity``, ``weight``, ``dcasgd``)."""
    if name == "identity":
        return Identity()
    if name == "weight":
        return StalenessWeight(function)
    if name == "dcasgd":
        return DCASGD(lam)
    raise ValueError(f"unknown stale-update handler {name!r}; allowed: identity, weight, dcasgd")
