"""The simulation executor: runs a client task's real local training in this process.

The virtual clock is not touched here; the executor returns what happened (the update, its host
time, the workload it represents) and the engine charges virtual time from the cost model.

One peft model holds an adapter per (rank, scaling) in use, so devices with heterogeneous LoRA ranks
train exactly their own configuration on the shared base model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedspine.client.batched import Lane, LaneResult, base_linear, train_lanes
from fedspine.client.train import LocalResult, make_optimizer, train_local
from fedspine.data.batching import Batch, collate
from fedspine.model.importance import FlapMeter, TaylorMeter, make_meter
from fedspine.model.lora import (
    ADAPTER,
    activate_adapter,
    adapter_factors,
    apply_lora,
    ensure_adapter,
    get_lora_state,
    set_lora_state,
)
from fedspine.model.pruning import (
    PruningPlan,
    compensation_bias,
    layer_index_map,
    lora_between,
    pruned_workload,
    scatter_to_full,
)
from fedspine.runtime.replica import LocalTraining as LocalTraining
from fedspine.runtime.replica import ModelReplica, _device_of, adapter_name
from fedspine.runtime.replica import logits_positions as logits_positions
from fedspine.runtime.replica import task_seed as task_seed
from fedspine.types import ClientTask, ClientUpdate, Device, DeviceLora, LoraState, TrainWorkload


@dataclass
class PreparedTask:
    """A device's batches drawn and its cost known, before any training happens."""

    round: int
    device: Device
    lora: DeviceLora
    batches: list[Batch]
    workload: TrainWorkload
    num_samples: int
    probe: Batch | None = None
    """A held-out local batch (none of ``batches``' examples) the trained submodel is scored on."""
    without_personal: TrainWorkload | None = None
    """The task's workload without the device's personal adapter and its choice of cluster (None: it
    trains none), so that their own cost can be told apart."""


FORWARD_SHARE = 1.0 / 3.0
"""A forward pass's share of a training step's FLOPs and weight reads (the backward costs about twice
the forward)."""


class InProcessExecutor(ModelReplica):
    """Trains client tasks on one shared in-process model, swapping LoRA states in and out."""

    @property
    def trains_together(self) -> bool:
        """Whether tasks that start together are better handed over together (:meth:`run_many`)."""
        return self.batch_clients > 1

    def close(self) -> None:
        """Release what the executor holds outside this process (nothing here)."""

    def prepare(
        self,
        round_no: int,
        device: Device,
        lora: DeviceLora,
        local_steps: int,
        plan: PruningPlan | None = None,
    ) -> PreparedTask:
        """Draw the task's batches (deterministic for the seed) and compute its workload.

        With a pruning ``plan`` the workload is that of the pruned submodel.
        """
        indices = self.partitions[device.device_id]
        rng = np.random.default_rng(task_seed(self.seed, round_no, device.device_id))
        batches = list(self._cycle(indices, rng, local_steps))
        probe = self._probe(indices, batches, round_no, device.device_id) if plan is not None else None
        if self.personal_lora is None:
            workload = self.workload(device, batches, lora.rank, plan)
            return PreparedTask(round_no, device, lora, batches, workload, len(indices), probe)
        workload = self.workload(device, batches, lora.rank + self.personal_lora.rank, plan)
        if self.cluster_count and batches:  # one forward pass of the first batch per cluster to choose
            choosing = forward_only(self.workload(device, batches[:1], self.personal_lora.rank, plan))
            workload = dataclasses.replace(
                workload,
                flops=workload.flops + self.cluster_count * choosing.flops,
                bytes_moved=workload.bytes_moved + self.cluster_count * choosing.bytes_moved,
            )
        without = self.workload(device, batches, lora.rank, plan)
        return PreparedTask(round_no, device, lora, batches, workload, len(indices), probe, without)

    def workload(
        self, device: Device, batches: list[Batch], rank: int, plan: PruningPlan | None = None
    ) -> TrainWorkload:
        """What training ``batches`` with adapters of total rank ``rank`` costs ``device`` (on ``plan``'s
        submodel)."""
        return pruned_workload(
            plan,
            self.shape,
            seq_lens=[int(n) for b in batches for n in b.attention_mask.sum(-1).tolist()],
            lora_rank=rank,
            num_lora_targets=self.lora_targets,
            logits_positions=self.logits_positions,
            dtype_bytes=device.device_class.train_dtype_bytes,
            batch_size=self.training.batch_size,
            steps=len(batches),
        )

    def _probe(
        self, indices: np.ndarray, batches: list[Batch], round_no: int, device_id: int
    ) -> Batch | None:
        """A batch of the device's examples that this task does not train on (None if it trains on all).

        Drawn from the device's data only when the task prunes: scoring it is how the policy tells the
        quality of a submodel without rewarding what the device just memorised.
        """
        used = {
            tuple(row[mask.bool()].tolist())
            for b in batches
            for row, mask in zip(b.input_ids, b.attention_mask, strict=True)
        }
        rng = np.random.default_rng(task_seed(self.seed, round_no, device_id, 5))
        unused = [i for i in rng.permutation(indices) if tuple(self.train_data.input_ids[i]) not in used]
        if not unused:
            return None
        return collate(self.train_data, unused[: self.training.batch_size])

    def run(self, task: ClientTask, prepared: PreparedTask) -> ClientUpdate:
        """Train: load the task's starting adapter, run the local steps, read and post-process it."""
        if task.plan is not None:
            return self._run_pruned(task, prepared)
        name = self._activate(task.lora)
        set_lora_state(self.model, task.payload, name)
        personal = self._load_personal(self.model, task, prepared.batches, shared=name)
        torch.manual_seed(task_seed(self.seed, task.round, task.device_id, 1))
        params = [p for p in self.model.parameters() if p.requires_grad]
        t = self.training
        optimizer = make_optimizer(params, t.optimizer, t.lr, t.weight_decay)
        result = train_local(
            self.model, self.objective, prepared.batches, optimizer, t.max_grad_norm, self._penalty(name)
        )
        update = self._update(task, prepared, get_lora_state(self.model, name), result)
        if personal is not None:
            self._keep_personal(self.model, task, personal, update)
            activate_adapter(self.model, name)
        return update

    def _load_personal(
        self, model: Any, task: ClientTask, batches: list[Batch], shared: str = ADAPTER
    ) -> tuple[str, int | None] | None:
        """Load the device's personal adapter into ``model`` beside ``shared`` and make both trainable:
        its private adapter (split), or the cluster adapter with the lowest loss on its first batch
        (clustered; ties, as between untrained adapters, go to a draw keyed by the task). Its adapter
        name and cluster; None when the device trains the shared adapter only."""
        lora = self.personal_lora
        if lora is None:
            return None
        name = f"personal_{adapter_name(lora)}"
        ensure_adapter(model, name, lora.rank, lora.alpha)
        model.base_model.set_adapter([shared, name])
        cluster = None
        if task.clusters:
            losses = []
            with torch.no_grad():
                for state in task.clusters:
                    set_lora_state(model, state, name)
                    losses.append(float(self.objective.loss(model, batches[0].to(_device_of(model)))))
            best = [i for i, loss in enumerate(losses) if loss == min(losses)]
            cluster = best[task_seed(self.seed, task.round, task.device_id, 6) % len(best)]
            set_lora_state(model, task.clusters[cluster], name)
        else:
            assert self.private is not None, "a personal adapter is private or a cluster's"
            set_lora_state(model, self.private.of(task.device_id, task.plan, self.shape), name)
        return name, cluster

    def _keep_personal(
        self, model: Any, task: ClientTask, personal: tuple[str, int | None], update: ClientUpdate
    ) -> None:
        """After training: the device keeps its private adapter (never in ``update``), or ``update``
        carries its cluster's adapter to the server."""
        name, cluster = personal
        trained = get_lora_state(model, name)
        if cluster is None:
            assert self.private is not None
            self.private.keep(task.device_id, trained, task.plan, self.shape)
        else:
            update.cluster, update.cluster_state = cluster, trained

    def run_many(self, tasks: Sequence[ClientTask], prepared: Sequence[PreparedTask]) -> list[ClientUpdate]:
        """Train tasks that start from the same base, ``batch_clients`` at a time in one batch
        (:func:`~fedspine.client.batched.train_lanes`); the updates are :meth:`run`'s, up to the order
        of floating-point sums. A pruned submodel trains as a mask on the dense weights (its removed
        units zeroed, its compensation bias added), which is the sliced submodel's computation; a task
        that measures Taylor importance (it needs its own backward hooks) trains alone."""
        updates: dict[int, ClientUpdate] = {}
        together = (
            [i for i, task in enumerate(tasks) if self._batchable(task)] if self.batch_clients > 1 else []
        )
        for i, task in enumerate(tasks):
            if i not in together:
                updates[i] = self.run(task, prepared[i])
        t = self.training
        for first in range(0, len(together), self.batch_clients):
            group = together[first : first + self.batch_clients]
            lanes = [self.lane(tasks[i], prepared[i]) for i in group]
            results = train_lanes(
                self.model,
                self.objective,
                lanes,
                optimizer=t.optimizer,
                lr=t.lr,
                weight_decay=t.weight_decay,
                max_grad_norm=t.max_grad_norm,
                padding_side=self.train_data.padding_side,
                pad_id=self.train_data.pad_id,
            )
            for i, result in zip(group, results, strict=True):
                task = tasks[i]
                if task.plan is None:
                    updates[i] = self._update(task, prepared[i], result.state, result.local)
                else:
                    updates[i] = self._pruned_update(task, prepared[i], result)
        return [updates[i] for i in range(len(tasks))]

    def _meter_kind(self, task: ClientTask) -> str:
        """The importance a pruned task measures (``magnitude``: none on the device)."""
        return self.importance if task.extra.get("measure_importance", True) else "magnitude"

    def _batchable(self, task: ClientTask) -> bool:
        if self.personal_lora is not None:
            return False  # a lane trains one adapter
        return task.plan is None or self._meter_kind(task) != "taylor"

    def lane(self, task: ClientTask, prepared: PreparedTask) -> Lane:
        """A task as a lane of a batched run: its factors in dense coordinates and, if it trains a pruned
        submodel, the masks and compensation biases that make the dense weights compute it."""
        state = _factors_only(task.payload)
        if task.plan is None:
            return Lane(state, task.lora.scaling, prepared.batches, self.device_side.penalty)
        keep, bias = {}, {}
        for layer, kept in task.plan.items():
            prefix = _layer_prefix(layer)
            index = layer_index_map(kept, self.shape)
            for proj, width in (
                ("o_proj", self.shape.heads * self.shape.head_dim),
                ("down_proj", self.shape.intermediate),
            ):
                mask = torch.zeros(width)
                mask[index[proj]] = 1.0
                keep[f"{prefix}.{'self_attn' if proj == 'o_proj' else 'mlp'}.{proj}"] = mask
            if task.channel_means is not None:
                weight = base_linear(self.model, f"{prefix}.mlp.down_proj").weight
                bias[f"{prefix}.mlp.down_proj"] = compensation_bias(
                    weight, kept.channels, task.channel_means[layer]
                )
        return Lane(
            lora_between(state, task.plan, self.shape, "full"),
            task.lora.scaling,
            prepared.batches,
            self.device_side.penalty,
            keep=keep,
            bias=bias,
            flap=self._meter_kind(task) == "flap",
            probe=prepared.probe,
        )

    def _pruned_update(self, task: ClientTask, prepared: PreparedTask, result: LaneResult) -> ClientUpdate:
        """What :meth:`_run_pruned` returns, from a lane's result: its factors on the submodel, the FLAP
        scores (and channel means) in full coordinates, its probe loss."""
        assert task.plan is not None
        factors = result.state
        importance = None
        if self._meter_kind(task) == "flap":
            importance = self._lane_flap(result, factors, task.lora.scaling)
        return ClientUpdate(
            round=task.round,
            device_id=task.device_id,
            num_samples=prepared.num_samples,
            lora_state=lora_between(factors, task.plan, self.shape, "kept"),
            uplink_bytes=0,
            train_loss=result.local.mean_loss,
            tokens=prepared.workload.tokens,
            host_train_seconds=result.local.host_seconds,
            lora_rank=task.lora.rank,
            lora_scaling=task.lora.scaling,
            plan=task.plan,
            importance=importance,
            probe_loss=result.probe_loss,
        )

    def _lane_flap(
        self, result: LaneResult, factors: LoraState, scaling: float
    ) -> dict[str, list[torch.Tensor]]:
        """FLAP's scores of a lane, as :class:`FlapMeter` computes them on the sliced submodel: the
        variance of each input column over the lane's real tokens times the column's squared norm in
        ``W + s B A`` (zero on removed units, whose inputs were zero)."""
        heads, channels, means = [], [], []
        for layer in range(self.shape.layers):
            prefix = _layer_prefix(layer)
            scores = {}
            for proj, part in (("o_proj", "self_attn"), ("down_proj", "mlp")):
                name = f"{prefix}.{part}.{proj}"
                count, total, squares = result.stats[name]
                mean = total / count
                variance = (squares / count - mean.pow(2)).clamp_min(0.0)
                weight = base_linear(self.model, name).weight.detach().float()
                if name in factors:
                    a, b = factors[name]["A"].float(), factors[name]["B"].float()
                    weight = weight + scaling * b.to(weight.device) @ a.to(weight.device)
                scores[proj] = variance.float() * weight.cpu().pow(2).sum(0)
                if proj == "down_proj":
                    means.append((total / count).float())
            heads.append(scores["o_proj"].reshape(self.shape.kv_heads, -1).sum(1))
            channels.append(scores["down_proj"])
        importance = {"heads": heads, "channels": channels}
        if self.measure_means:
            importance["means"] = means
        return importance

    def _update(
        self, task: ClientTask, prepared: PreparedTask, trained: LoraState, result: LocalResult
    ) -> ClientUpdate:
        """The update of a task trained on the shared model: its factors, post-processed by the device."""
        state = self.device_side.finish(trained, task.lora)
        return ClientUpdate(
            round=task.round,
            device_id=task.device_id,
            num_samples=prepared.num_samples,
            lora_state=state,
            uplink_bytes=0,  # set by the engine from the encoded payload
            train_loss=result.mean_loss,
            tokens=prepared.workload.tokens,
            host_train_seconds=result.host_seconds,
            lora_rank=int(next(iter(state.values()))["A"].shape[0]) if state else task.lora.rank,
            lora_scaling=task.lora.scaling,
        )

    def _run_pruned(self, task: ClientTask, prepared: PreparedTask) -> ClientUpdate:
        """Train a fresh adapter on the pruned submodel; measure importance and its held-out loss."""
        model = apply_lora(
            self.pruned_model(task.plan, task.channel_means),
            task.lora.rank,
            task.lora.alpha,
            self.lora_dropout,
            self.target_modules,
            seed=task_seed(self.seed, task.round, task.device_id, 3),
        )
        set_lora_state(model, task.payload)
        personal = self._load_personal(model, task, prepared.batches)
        torch.manual_seed(task_seed(self.seed, task.round, task.device_id, 1))
        params = [p for p in model.parameters() if p.requires_grad]
        t = self.training
        optimizer = make_optimizer(params, t.optimizer, t.lr, t.weight_decay)
        measure = task.extra.get("measure_importance", True)
        meter = make_meter(self.importance if measure else "magnitude", model, self.shape.head_dim)
        hooks: dict[str, Any] = {}
        if isinstance(meter, TaylorMeter):
            hooks["after_backward"] = meter.after_backward
        if isinstance(meter, FlapMeter):
            hooks["before_forward"] = meter.before_forward
        with meter if isinstance(meter, FlapMeter) else nullcontext():
            result = train_local(model, self.objective, prepared.batches, optimizer, t.max_grad_norm, **hooks)
        probe_loss = None
        if prepared.probe is not None:
            with torch.no_grad():
                probe = prepared.probe.to(_device_of(model))
                probe_loss = float(self.objective.loss(model, probe))
        state = get_lora_state(model)
        importance = None
        if meter is not None:
            heads, channels = meter.result()
            importance = {
                "heads": _in_full(heads, task.plan, "heads", self.shape.kv_heads),
                "channels": _in_full(channels, task.plan, "channels", self.shape.intermediate),
            }
            if self.measure_means and isinstance(meter, FlapMeter):
                means = meter.channel_means()
                importance["means"] = _in_full(means, task.plan, "channels", self.shape.intermediate)
        update = ClientUpdate(
            round=task.round,
            device_id=task.device_id,
            num_samples=prepared.num_samples,
            lora_state=state,
            uplink_bytes=0,
            train_loss=result.mean_loss,
            tokens=prepared.workload.tokens,
            host_train_seconds=result.host_seconds,
            lora_rank=task.lora.rank,
            lora_scaling=task.lora.scaling,
            plan=task.plan,
            importance=importance,
            probe_loss=probe_loss,
        )
        if personal is not None:
            self._keep_personal(model, task, personal, update)
        return update

    def _penalty(self, name: str) -> Callable[[], torch.Tensor | None]:
        factors: list[tuple[torch.Tensor, torch.Tensor]] = list(adapter_factors(self.model, name))
        return lambda: self.device_side.penalty(factors)


def forward_only(workload: TrainWorkload) -> TrainWorkload:
    """The forward passes of ``workload``'s steps, without the backward passes and optimizer steps:
    :data:`FORWARD_SHARE` of its FLOPs and weight reads."""
    return dataclasses.replace(
        workload, flops=workload.flops * FORWARD_SHARE, bytes_moved=workload.bytes_moved * FORWARD_SHARE
    )


def _layer_prefix(layer: int) -> str:
    """The name of decoder layer ``layer`` in the base model (:func:`decoder_layers`' ``model.layers``)."""
    return f"model.layers.{layer}"


def _factors_only(state: LoraState) -> LoraState:
    """``state``'s A and B per module (a strategy's other per-module keys are not trained)."""
    return {name: {"A": entry["A"], "B": entry["B"]} for name, entry in state.items()}


def _in_full(values: list[torch.Tensor], plan: PruningPlan, kind: str, size: int) -> list[torch.Tensor]:
    """Per layer, ``values`` of the kept units (KV groups or MLP channels: ``kind``) placed in full
    coordinates of ``size`` units (zero where pruned)."""
    full = []
    for layer, v in enumerate(values):
        keep = plan.get(layer)
        if keep is None:
            full.append(v.float().cpu())
        else:
            kept = keep.kv_groups if kind == "heads" else keep.channels
            full.append(scatter_to_full(v.float().cpu(), torch.tensor(kept), size))
    return full
