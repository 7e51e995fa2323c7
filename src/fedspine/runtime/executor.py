"""The simulation executor: runs a client task's real local training in this process.

The virtual clock is not touched here; the executor returns what happened (the update, its host
time, the workload it represents) and the engine charges virtual time from the cost model.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedspine.client.objectives import Objective
from fedspine.client.train import make_optimizer, train_local
from fedspine.data.batching import Batch, iterate_batches
from fedspine.model.footprint import ModelShape, train_workload
from fedspine.model.lora import get_lora_state, set_lora_state
from fedspine.types import ClientTask, ClientUpdate, Device, LoraState, TrainWorkload


@dataclass(frozen=True)
class LocalTraining:
    """Flat local-training settings (built from ``config.train``)."""

    batch_size: int
    lr: float
    optimizer: str
    weight_decay: float
    max_grad_norm: float


@dataclass
class PreparedTask:
    """A task with its batches drawn and its cost known, before any training happens."""

    task: ClientTask
    device: Device
    batches: list[Batch]
    workload: TrainWorkload
    num_samples: int


def task_seed(seed: int, *parts: int) -> int:
    """A stable 31-bit seed for (run seed, round, device...) that does not depend on hash salting."""
    return zlib.crc32(np.array([seed, *parts], dtype=np.int64).tobytes()) & 0x7FFFFFFF


class SimExecutor:
    """Trains client tasks on one shared in-process model, swapping LoRA states in and out."""

    def __init__(
        self,
        model: Any,
        objective: Objective,
        train_data: Any,
        partitions: Sequence[np.ndarray],
        training: LocalTraining,
        shape: ModelShape,
        lora_targets: int,
        seed: int,
    ) -> None:
        self.model = model
        self.objective = objective
        self.train_data = train_data
        self.partitions = partitions
        self.training = training
        self.shape = shape
        self.lora_targets = lora_targets
        self.seed = seed
        self.logits_positions: Literal["all", "last"] = (
            "last" if objective.metric_name == "accuracy" else "all"
        )

    def prepare(self, task: ClientTask, device: Device) -> PreparedTask:
        """Draw the task's batches (deterministic for the seed) and compute its workload."""
        indices = self.partitions[task.device_id]
        rng = np.random.default_rng(task_seed(self.seed, task.round, task.device_id))
        batches = list(self._cycle(indices, rng, task.local_steps))
        seq_lens = [int(n) for b in batches for n in b.attention_mask.sum(-1).tolist()]
        workload = train_workload(
            self.shape,
            seq_lens=seq_lens,
            lora_rank=task.lora_rank,
            num_lora_targets=self.lora_targets,
            logits_positions=self.logits_positions,
            dtype_bytes=device.device_class.train_dtype_bytes,
            batch_size=self.training.batch_size,
            steps=len(batches),
        )
        return PreparedTask(task, device, batches, workload, num_samples=len(indices))

    def _cycle(self, indices: np.ndarray, rng: np.random.Generator, steps: int) -> Iterator[Batch]:
        produced = 0
        while produced < steps:
            for batch in iterate_batches(
                self.train_data, indices, self.training.batch_size, rng, shuffle=True
            ):
                yield batch
                produced += 1
                if produced == steps:
                    return

    def run(self, prepared: PreparedTask) -> ClientUpdate:
        """Train: load the task's starting state, run the local steps, read the new state."""
        task = prepared.task
        set_lora_state(self.model, task.payload)
        torch.manual_seed(task_seed(self.seed, task.round, task.device_id, 1))
        params = [p for p in self.model.parameters() if p.requires_grad]
        t = self.training
        optimizer = make_optimizer(params, t.optimizer, t.lr, t.weight_decay)
        result = train_local(self.model, self.objective, prepared.batches, optimizer, t.max_grad_norm)
        return ClientUpdate(
            round=task.round,
            device_id=task.device_id,
            num_samples=prepared.num_samples,
            lora_state=get_lora_state(self.model),
            uplink_bytes=0,  # set by the engine from the encoded payload
            train_loss=result.mean_loss,
            tokens=prepared.workload.tokens,
            host_train_seconds=result.host_seconds,
        )

    def load_global(self, state: LoraState) -> None:
        """Put the global adapter into the model (for evaluation)."""
        set_lora_state(self.model, state)
