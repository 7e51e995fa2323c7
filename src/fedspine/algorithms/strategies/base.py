"""The strategy contract shared by every federated LoRA method.

Conventions. A device trains an adapter of its own rank r_k and scaling s_k = alpha_k / r_k and
uploads raw factors (A_k, B_k); its update to the weights is ``s_k B_k A_k``. A strategy's *global*
adapter, when it keeps one, stores the scaling folded into B (``B_g A_g`` is the update, scaling 1),
and each device receives it in its own parametrization: ``(A_g, B_g / s_k)`` at its rank.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Self

import torch

from fedspine.algorithms.lora_math import fresh_factors, truncate_rank
from fedspine.algorithms.wire import payload_bytes
from fedspine.model.pruning import PruningPlan
from fedspine.registry import Registry
from fedspine.types import ClientUpdate, DeviceLora, LoraState, TaskResult

Weighting = Literal["samples", "uniform"]
Compensate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``compensate(delta, drift)``: a stale change corrected for the drift since it started (DC-ASGD)."""
ModuleShapes = dict[str, tuple[int, int]]
"""``(out_features, in_features)`` of every adapted module."""


@dataclass
class Dispatch:
    """What the server sends a device at the start of a task.

    Attributes:
        lora_state: the adapter the device starts from, in its own rank and scaling.
        downlink_bytes: exact bytes a real device must receive (which can include more than the
            adapter, e.g. FLoRA's stacked factors to merge into its base weights).
    """

    lora_state: LoraState
    downlink_bytes: int


@dataclass(frozen=True)
class Assignment:
    """How a device trains in a task: its LoRA, and the pruned submodel (None = the dense model).

    Attributes:
        lora: rank and scaling of the adapter it trains.
        plan: the pruned submodel, or None.
        ratio: the pruning ratio the plan was built for.
        measure_importance: whether the device should measure and upload importance scores.
    """

    lora: DeviceLora
    plan: PruningPlan | None = None
    ratio: float = 0.0
    measure_importance: bool = False


class DeviceSide(Protocol):
    """What a strategy changes in a device's local training: the server never calls it, a device
    (the simulator's executor, a deployed ClientApp) does."""

    def penalty(self, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        """An extra local loss term over the device's (A, B) parameters, or None."""
        ...

    def finish(self, state: LoraState, lora: DeviceLora) -> LoraState:
        """Post-process the trained adapter before upload (e.g. rank self-pruning)."""
        ...


@dataclass(frozen=True)
class PlainTraining:
    """Local training as it is: no extra loss term, the trained adapter uploaded as it is."""

    def penalty(self, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        return None

    def finish(self, state: LoraState, lora: DeviceLora) -> LoraState:
        return state


class Partial(Protocol):
    """A partial aggregate: sums of weighted updates that merge associatively (stacked blocks, padded
    factor sums, coverage-normalised blocks)."""

    def add(self, update: ClientUpdate, weight: float) -> Self:
        """Fold in one update with ``weight``; returns the partial."""

    def merge(self, other: Self) -> Self:
        """Fold in another partial of the same kind; returns the partial."""


class Dispatcher(Protocol):
    """What a device receives: the LoRA and submodel it trains, and the adapter it starts from."""

    weighting: Weighting

    def init_global(self, shapes: ModuleShapes, rank: int, generator: torch.Generator) -> None: ...

    def begin_round(self, round: int, device_ids: Sequence[int]) -> None: ...

    def assign(self, round: int, device_id: int, lora: DeviceLora) -> Assignment: ...

    def configure(
        self, round: int, device_id: int, lora: DeviceLora, generator: torch.Generator
    ) -> Dispatch: ...

    def channel_means(self) -> list[torch.Tensor] | None: ...

    def end_round(self, round: int, results: Sequence[TaskResult], deadline: float) -> None: ...


class Rebaser(Protocol):
    """How an update that started from an older global state is applied to the current one."""

    def global_lora(self) -> LoraState: ...

    def rebase(
        self, update: ClientUpdate, start: LoraState, scale: float, compensate: Compensate | None = None
    ) -> ClientUpdate: ...


class GlobalModel(Protocol):
    """The model the server evaluates and hands out: its adapter and its pruned submodels."""

    def global_lora(self) -> LoraState: ...

    def eval_plan(self) -> PruningPlan | None: ...

    def device_eval_plan(self, device_id: int) -> PruningPlan | None: ...

    def channel_means(self) -> list[torch.Tensor] | None: ...


class Strategy(ABC):
    """Configures client tasks and aggregates their updates into the global state.

    A strategy plays four roles, each a small protocol its users are typed against: what a device
    receives (:class:`Dispatcher`), how updates aggregate
    (:class:`~fedspine.algorithms.aggregate.Aggregator`, with :meth:`weight_of` and
    :meth:`take_base_delta`), how an update from an older global state is applied (:class:`Rebaser`),
    and the model that is evaluated and handed out (:class:`GlobalModel`). This base class gives the
    defaults most strategies share.

    Aggregation is written as ``init_partial / accumulate / merge / finalize`` over partial sums
    (see :mod:`fedspine.algorithms.aggregate`), so hierarchical aggregation is the same code.
    """

    name: str = ""
    uniform_rank_only = False
    """True for methods that need every device at one rank (FedIT)."""
    prunes = False
    """True for methods that train pruned submodels (FedSpine and its baselines)."""
    has_global_adapter = False
    """True for methods that keep a global adapter devices start from (FedIT, zero-padding, HetLoRA,
    FlexLoRA); False for those that merge fresh adapters into the base (FLoRA, FedSpine)."""
    supports_compensation = False
    """True when stale updates can be compensated element-wise (DC-ASGD): they live in the
    coordinates of an averaged global adapter."""

    def __init__(self, weighting: Weighting = "samples") -> None:
        self.weighting = weighting
        self.device_side: DeviceSide = PlainTraining()
        """What the strategy changes in local training (HetLoRA's rank self-pruning)."""

    def update_weight(self, update: ClientUpdate) -> float:
        """Aggregation weight of an update before normalisation."""
        return float(update.num_samples) if self.weighting == "samples" else 1.0

    def weight_of(self, update: ClientUpdate) -> float:
        """The weight :meth:`accumulate` gives an update (HetLoRA: its norm): :meth:`update_weight`."""
        return self.update_weight(update)

    @abstractmethod
    def init_global(self, shapes: ModuleShapes, rank: int, generator: torch.Generator) -> None:
        """Create the initial global state for adapted modules of ``shapes`` at global ``rank``."""

    @abstractmethod
    def configure(self, round: int, device_id: int, lora: DeviceLora, generator: torch.Generator) -> Dispatch:
        """The adapter device ``device_id`` starts from in ``round``, and the bytes it downloads."""

    @abstractmethod
    def global_lora(self) -> LoraState:
        """The current global adapter at scaling 1 (empty when the strategy keeps none, e.g. FLoRA)."""

    def begin_round(self, round: int, device_ids: Sequence[int]) -> None:  # noqa: B027 (optional hook)
        """The devices selected for a synchronous round, before any of them is assigned."""

    def assign(self, round: int, device_id: int, lora: DeviceLora) -> Assignment:
        """The LoRA and submodel device ``device_id`` trains in ``round`` (before :meth:`configure`).

        Deciding and dispatching are two calls on purpose: between them the engine checks that the
        assigned submodel fits the device's memory, and a task that does not fit is never configured,
        so it changes none of the state :meth:`configure` keeps about what each device holds.
        """
        return Assignment(lora)

    def eval_plan(self) -> PruningPlan | None:
        """The pruning plan of the model to evaluate (None = dense)."""
        return None

    def device_eval_plan(self, device_id: int) -> PruningPlan | None:
        """The pruning plan of the model ``device_id`` evaluates on its own data (None = dense): the
        global model as :meth:`eval_plan` has it, unless the strategy sizes each device's model."""
        return self.eval_plan()

    def channel_means(self) -> list[torch.Tensor] | None:
        """Per layer, the mean MLP channel inputs whose removed channels pruned models keep as a bias
        (FedSpine with ``compensate``); None: pruning removes channels without compensation."""
        return None

    def end_round(self, round: int, results: Sequence[TaskResult], deadline: float) -> None:  # noqa: B027
        """Observe the round's task outcomes (e.g. rewards for a policy)."""

    def take_base_delta(self) -> dict[str, torch.Tensor] | None:
        """Weight deltas to merge into the base model after the last aggregation (once), if any."""
        return None

    def rebase(
        self, update: ClientUpdate, start: LoraState, scale: float, compensate: Compensate | None = None
    ) -> ClientUpdate:
        """The update as if its device had started from the current global state, its change scaled.

        Asynchronous schedulers apply an update to a newer global state than the one its device
        started from (``start``, the adapter it received). Here (fresh adapters merged into the base:
        FLoRA, FedSpine) the factors are the change ``s B A`` to the base the device trained on, and
        the same change is applied to the current base: rebasing only scales ``B``. A FedSpine update
        keeps its plan, so it lands on the units it trained, in full coordinates, even if the mask
        has moved since.
        """
        if compensate is not None:
            raise ValueError(
                f"{self.name} merges fresh adapters into the base: nothing to compensate against"
            )
        state = {m: {"A": f["A"], "B": f["B"] * scale} for m, f in update.lora_state.items()}
        return dataclasses.replace(update, lora_state=state)

    # --- aggregation -----------------------------------------------------------------------------

    @abstractmethod
    def init_partial(self) -> Any:
        """An empty partial aggregate: the strategy's choice of aggregator. The default
        :meth:`accumulate` and :meth:`merge` need a :class:`Partial`; FedSpine folds updates itself."""

    def accumulate(self, partial: Any, update: ClientUpdate) -> Any:
        """Fold one update into ``partial``, with the weight :meth:`weight_of` gives it."""
        return partial.add(update, self.weight_of(update))

    def merge(self, left: Any, right: Any) -> Any:
        """Combine two partials."""
        return left.merge(right)

    @abstractmethod
    def finalize(self, partial: Any) -> None:
        """Replace the global state with the aggregate held in ``partial``."""


class TruncatedGlobalAdapter(Strategy):
    """Keeps a global adapter at the largest rank; device k receives its first r_k components."""

    has_global_adapter = True
    supports_compensation = True

    def init_global(self, shapes: ModuleShapes, rank: int, generator: torch.Generator) -> None:
        self.rank = rank
        self._global: LoraState = {}
        for module, (out_f, in_f) in shapes.items():
            a, b = fresh_factors(out_f, in_f, rank, generator)
            self._global[module] = {"A": a, "B": b}

    def configure(self, round: int, device_id: int, lora: DeviceLora, generator: torch.Generator) -> Dispatch:
        if lora.rank > self.rank:
            raise ValueError(f"device rank {lora.rank} exceeds the global rank {self.rank}")
        state = {}
        for module, f in self._global.items():
            a, b = truncate_rank(f["A"], f["B"], lora.rank)
            state[module] = {"A": a, "B": b / lora.scaling}
        return Dispatch(state, payload_bytes(state))

    def global_lora(self) -> LoraState:
        return self._global

    def set_global_lora(self, state: LoraState) -> None:
        """Replace the global adapter (scaling 1), e.g. after a server optimizer step."""
        self._global = state

    def rebase(
        self, update: ClientUpdate, start: LoraState, scale: float, compensate: Compensate | None = None
    ) -> ClientUpdate:
        """``current + scale * (uploaded - start)`` on each factor, in the device's parametrization.

        ``current`` is the global adapter as the device would receive it now (its first ``r`` components,
        ``B`` divided by its scaling); an update with a smaller rank than it started with (HetLoRA) is
        compared with the same components of ``start``. ``compensate(delta, drift)`` (DC-ASGD) sees
        ``drift = current - start``.
        """
        state: LoraState = {}
        for module, f in update.lora_state.items():
            rank = f["A"].shape[0]
            cur_a, cur_b = truncate_rank(self._global[module]["A"], self._global[module]["B"], rank)
            cur_b = cur_b / update.lora_scaling
            start_a, start_b = start[module]["A"][:rank], start[module]["B"][:, :rank]
            delta_a, delta_b = f["A"].float() - start_a, f["B"].float() - start_b
            if compensate is not None:
                delta_a = compensate(delta_a, cur_a - start_a)
                delta_b = compensate(delta_b, cur_b - start_b)
            state[module] = {"A": cur_a + scale * delta_a, "B": cur_b + scale * delta_b}
        return dataclasses.replace(update, lora_state=state)


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def scaled_copy(state: LoraState, a_scale: float = 1.0, b_scale: float = 1.0) -> LoraState:
    """``{m: {"A": a_scale A, "B": b_scale B}}`` as new fp32 tensors."""
    return {
        m: {"A": f["A"].to(torch.float32) * a_scale, "B": f["B"].to(torch.float32) * b_scale}
        for m, f in state.items()
    }
