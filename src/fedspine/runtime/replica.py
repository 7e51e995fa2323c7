"""One in-process replica of the model: the executor's model side.

:class:`ModelReplica` holds the shared peft model, its adapters (one per rank and scaling in use) and
its base weights, and makes the plain copies of it that devices deploy, the server evaluates and
personal models start from; :class:`~fedspine.runtime.executor.InProcessExecutor` adds the training of client
tasks on it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel

from fedspine.algorithms.strategies.base import DeviceSide
from fedspine.client.evaluate import EvalSet, Evaluation, evaluate, prepare_eval_model
from fedspine.client.objectives import Objective
from fedspine.client.personal import PrivateAdapters
from fedspine.client.train import make_optimizer, train_local
from fedspine.data.batching import Batch, EncodedDataset, iterate_batches
from fedspine.model.footprint import ModelShape
from fedspine.model.importance import ActivationTaylorMeter, FlapMeter
from fedspine.model.lora import (
    ADAPTER,
    activate_adapter,
    add_to_base_weights,
    apply_lora,
    base_weights,
    ensure_adapter,
    merged_model,
    plain_copy,
    set_base_weights,
    set_lora_state,
)
from fedspine.model.pruning import PruningPlan, prune_model
from fedspine.types import Device, DeviceLora, LoraState


@dataclass(frozen=True)
class LocalTraining:
    """Flat local-training settings (built from ``config.train``)."""

    batch_size: int
    lr: float
    optimizer: str
    weight_decay: float
    max_grad_norm: float


def task_seed(seed: int, *parts: int) -> int:
    """A stable 31-bit seed for (run seed, round, device...) that does not depend on hash salting."""
    return zlib.crc32(np.array([seed, *parts], dtype=np.int64).tobytes()) & 0x7FFFFFFF


def adapter_name(lora: DeviceLora) -> str:
    """Name of the peft adapter that trains at ``lora``'s rank and scaling."""
    return f"r{lora.rank}_s{lora.scaling:g}".replace(".", "p")


def logits_positions(objective: Objective) -> Literal["all", "last"]:
    """Where a training step needs logits: the last position for classification, every one otherwise."""
    return "last" if objective.metric_name == "accuracy" else "all"


class ModelReplica:
    """The shared in-process model and the copies made of it (deployed, evaluated, personal models)."""

    def __init__(
        self,
        model: PeftModel,
        objective: Objective,
        device_side: DeviceSide,
        train_data: EncodedDataset,
        partitions: Sequence[np.ndarray],
        training: LocalTraining,
        shape: ModelShape,
        target_modules: Sequence[str],
        seed: int,
        importance: str = "magnitude",
        lora_dropout: float = 0.0,
        eval_dtype: str = "model",
        measure_means: bool = False,
        batch_clients: int = 1,
        personal_lora: DeviceLora | None = None,
        private: PrivateAdapters | None = None,
        cluster_count: int = 0,
    ) -> None:
        self.model = model
        self.objective = objective
        self.device_side = device_side
        self.train_data = train_data
        self.partitions = partitions
        self.training = training
        self.shape = shape
        self.target_modules = list(target_modules)
        self.lora_targets = len(self.target_modules)
        self.seed = seed
        self.logits_positions = logits_positions(objective)
        self._global_adapter: str | None = ADAPTER
        self.importance = importance
        """Importance the devices measure while training pruned submodels (taylor, flap, magnitude)."""
        self.lora_dropout = lora_dropout
        self.eval_dtype = eval_dtype
        """Dtype of the copies evaluated (``eval.dtype``)."""
        self.measure_means = measure_means
        """Devices that measure FLAP importance also report their MLP channels' mean inputs (for bias
        compensation)."""
        self.batch_clients = batch_clients
        """How many tasks :meth:`run_many` trains in one batch (1: one by one)."""
        self.private = private
        """The devices' private adapters (``personalize.method = "split"``), trained beside the shared
        one in every task; None: devices train the shared adapter only."""
        self.personal_lora = personal_lora
        """Rank and scaling of the adapter a device trains beside the shared one (its private adapter,
        or its cluster's with ``clustered``); None: none."""
        self.cluster_count = cluster_count
        """How many cluster adapters each task chooses among (``clustered``; 0: none)."""

    def _cycle(self, indices: np.ndarray, rng: np.random.Generator, steps: int) -> Iterator[Batch]:
        produced = 0
        while produced < steps:
            size = self.training.batch_size
            for batch in iterate_batches(self.train_data, indices, size, rng, shuffle=True):
                yield batch
                produced += 1
                if produced == steps:
                    return

    def pruned_model(
        self, plan: PruningPlan, channel_means: list[torch.Tensor] | None = None
    ) -> PreTrainedModel:
        """A plain (adapter-free) copy of the current base model, pruned by ``plan`` (with the removed
        MLP channels' mean outputs kept as biases when ``channel_means`` are given)."""
        return prune_model(plain_copy(self.model), plan, inplace=True, channel_means=channel_means)

    def _activate(self, lora: DeviceLora) -> str:
        name = adapter_name(lora)
        ensure_adapter(self.model, name, lora.rank, lora.alpha)
        activate_adapter(self.model, name)
        return name

    def load_global(self, state: LoraState) -> None:
        """Put the global adapter (scaling 1) into the model; an empty state means base weights only."""
        if not state:
            self._global_adapter = None
            return
        rank = int(next(iter(state.values()))["A"].shape[0])
        self._global_adapter = self._activate(DeviceLora(rank=rank, scaling=1.0))
        set_lora_state(self.model, state, self._global_adapter)

    def merge_into_base(self, deltas: dict[str, torch.Tensor]) -> None:
        """Add aggregated weight deltas to the shared base weights (FLoRA)."""
        add_to_base_weights(self.model, deltas)

    def base_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Copies of the shared base weights of the named modules."""
        return base_weights(self.model, names)

    def set_base_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Overwrite the shared base weights of the named modules (restoring a checkpoint)."""
        set_base_weights(self.model, weights)

    def deployed_model(
        self, plan: PruningPlan | None = None, channel_means: list[torch.Tensor] | None = None
    ) -> PreTrainedModel:
        """A plain copy of the model a device deploys: the global adapter loaded by :meth:`load_global`
        merged in (none: the base as it is); with a pruning ``plan`` the base pruned instead (pruning
        strategies keep no adapter), compensated with ``channel_means``."""
        if plan is not None:
            return self.pruned_model(plan, channel_means)
        if self._global_adapter is None:
            return plain_copy(self.model)
        return merged_model(self.model)

    def eval_model(
        self, plan: PruningPlan | None = None, channel_means: list[torch.Tensor] | None = None
    ) -> PreTrainedModel:
        """:meth:`deployed_model`, ready for :func:`evaluate`."""
        return self.ready(self.deployed_model(plan, channel_means))

    def ready(self, model: PreTrainedModel) -> PreTrainedModel:
        """``model`` (a copy nothing else uses) ready for :func:`evaluate` in ``eval.dtype``."""
        return prepare_eval_model(model, self.objective, self.eval_dtype)

    def evaluate(
        self,
        eval_set: EvalSet,
        plan: PruningPlan | None = None,
        channel_means: list[torch.Tensor] | None = None,
    ) -> Evaluation:
        """Evaluate the model with the global adapter loaded by :meth:`load_global` (pruned by ``plan``,
        compensated with ``channel_means``)."""
        return evaluate(self.eval_model(plan, channel_means), self.objective, eval_set.batches)

    def evaluate_many(
        self,
        eval_sets: Sequence[EvalSet],
        plan: PruningPlan | None = None,
        channel_means: list[torch.Tensor] | None = None,
    ) -> list[Evaluation]:
        """:meth:`evaluate` on each of ``eval_sets``, with one copy of the evaluated model."""
        model = self.eval_model(plan, channel_means)
        return [evaluate(model, self.objective, s.batches) for s in eval_sets]

    # --- personal models (``[personalize]``) ---------------------------------------------------------

    def local_batches(self, device: Device, steps: int, key: int) -> list[Batch]:
        """``steps`` batches of ``device``'s training examples, drawn for the task keyed ``key``."""
        rng = np.random.default_rng(task_seed(self.seed, key, device.device_id))
        return list(self._cycle(self.partitions[device.device_id], rng, steps))

    def finetuned(
        self,
        device: Device,
        batches: list[Batch],
        rank: int,
        alpha: float,
        key: int,
        plan: PruningPlan | None = None,
        channel_means: list[torch.Tensor] | None = None,
    ) -> PreTrainedModel:
        """``device``'s deployed model (:meth:`deployed_model`) after a fresh adapter of ``rank`` trained
        on it for one step per batch, merged in."""
        model = apply_lora(
            self.deployed_model(plan, channel_means),
            rank,
            alpha,
            self.lora_dropout,
            self.target_modules,
            seed=task_seed(self.seed, key, device.device_id, 3),
        )
        torch.manual_seed(task_seed(self.seed, key, device.device_id, 1))
        params = [p for p in model.parameters() if p.requires_grad]
        t = self.training
        train_local(
            model,
            self.objective,
            batches,
            make_optimizer(params, t.optimizer, t.lr, t.weight_decay),
            t.max_grad_norm,
        )
        return _merged(model)

    def with_adapter(
        self,
        state: LoraState,
        rank: int,
        alpha: float,
        plan: PruningPlan | None = None,
        channel_means: list[torch.Tensor] | None = None,
    ) -> PreTrainedModel:
        """The deployed model with the adapter ``state`` (in that model's coordinates: ``plan``'s
        submodel; scaling ``alpha / rank``) merged in."""
        model = apply_lora(self.deployed_model(plan, channel_means), rank, alpha, 0.0, self.target_modules)
        set_lora_state(model, state)
        return _merged(model)

    def local_importance(
        self, model: nn.Module, batches: list[Batch], kind: str = "flap", compensated: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Scores of ``model``'s KV groups and MLP channels on ``batches`` and its MLP channels' mean
        inputs there: ``(heads, channels, means)`` per layer. ``kind``: ``taylor`` (the first-order
        change of the task loss, :class:`ActivationTaylorMeter`: a backward pass per batch; with
        ``compensated``, of replacing a channel by its mean) or ``flap`` (forward passes only)."""
        flap = FlapMeter(model, self.shape.head_dim)
        taylor = ActivationTaylorMeter(model, self.shape.head_dim) if kind == "taylor" else None
        device = _device_of(model)
        with (
            flap,
            taylor if taylor is not None else nullcontext(),
            torch.set_grad_enabled(taylor is not None),
        ):
            for batch in batches:
                flap.before_forward(batch)
                loss = self.objective.loss(model, batch.to(device))
                if taylor is not None:
                    loss.backward()
        means = flap.channel_means()
        heads, channels = taylor.result(means if compensated else None) if taylor else flap.result()
        return heads, channels, means


def _device_of(model: nn.Module) -> torch.device:
    device: torch.device = next(model.parameters()).device
    return device


def _merged(model: PeftModel) -> PreTrainedModel:
    """A peft model's adapter folded into its weights: a plain, frozen model."""
    plain: PreTrainedModel = model.merge_and_unload()
    plain.requires_grad_(False)
    return plain
