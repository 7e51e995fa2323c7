"""Client tasks trained on a Ray cluster, for fleets that outgrow one machine (``executor.name = "ray"``).

Each Ray worker is an actor holding one replica of the run's model, built once from the run's config
(pfl-research's pattern: a model per worker, updated in place). The driver keeps its own
:class:`~fedspine.runtime.executor.InProcessExecutor` for everything but training — drawing a task's batches,
evaluation, export — and sends the tasks that start together to the workers in contiguous shares; each
worker trains its share as the in-process executor would (one by one, or batched on a GPU).

Placement cannot change a result: every replica starts from the same seed, and whatever changes the
base weights on the driver (a FLoRA merge, FedSpine's merged adapter, a restored checkpoint) is applied
to every replica, in the same order, before the next task trains. A task's update depends only on the
task and that base, and a worker uses the run's ``run.threads``, so a run gives the records it gives
in-process. Ray ships with the ``flower`` extra; no other transport is involved.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedspine.config import Config, from_dict, to_dict
from fedspine.errors import ConfigError
from fedspine.runtime.executor import InProcessExecutor, PreparedTask
from fedspine.types import ClientTask, ClientUpdate

TrainerFactory = Callable[[Config], InProcessExecutor]
"""Builds the in-process trainer of a run's config (``runtime.experiment.make_executor``)."""


class Replica:
    """A Ray actor's state: the in-process trainer of the run's config."""

    def __init__(self, config: dict[str, Any], make_executor: TrainerFactory) -> None:
        self.executor = make_executor(from_dict(config))

    def run_many(self, tasks: list[ClientTask], prepared: list[PreparedTask]) -> list[ClientUpdate]:
        return self.executor.run_many(tasks, prepared)

    def merge_into_base(self, deltas: dict[str, torch.Tensor]) -> None:
        self.executor.merge_into_base(deltas)

    def set_base_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.executor.set_base_weights(weights)


def start_replicas(cfg: Config, make_executor: TrainerFactory) -> list[Any]:
    """Connect to (or, with an empty ``executor.address``, start) Ray and build one replica per worker,
    each with ``make_executor`` (passed by reference: the workers import it).

    Raises:
        ConfigError: Ray is not installed, or the cluster cannot be reached.
    """
    try:
        import ray
    except ImportError as error:
        raise ConfigError("executor.name", "Ray is not installed; pip install 'fedspine[flower]'") from error
    section = cfg.executor
    if not section.address:
        # Ray renices its workers to 15 by default, to keep a driver responsive; here the workers do the
        # run's work, and beside any other load at nice 0 they would starve (10x slower, measured).
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray.init(
            address=section.address or None,
            ignore_reinit_error=True,
            log_to_driver=False,
            include_dashboard=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError("executor.address", f"cannot reach Ray at {section.address!r}: {error}") from error
    actor = ray.remote(num_cpus=section.cpus_per_worker, num_gpus=section.gpus_per_worker)(Replica)
    config = to_dict(cfg)
    replicas: list[Any] = [actor.remote(config, make_executor) for _ in range(section.workers)]
    ray.get([r.__ray_ready__.remote() for r in replicas])  # built (or failed) before the run starts
    return replicas


class RayExecutor(InProcessExecutor):
    """A :class:`InProcessExecutor` whose client tasks train on Ray workers (``replicas``)."""

    def __init__(self, *args: Any, replicas: Sequence[Any], owns_ray: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replicas = list(replicas)
        self.owns_ray = owns_ray
        """Ray was started for this run (``executor.address`` empty): :meth:`close` shuts it down."""

    @property
    def trains_together(self) -> bool:
        return True  # the tasks that start together are spread over the workers

    def run(self, task: ClientTask, prepared: PreparedTask) -> ClientUpdate:
        return self.run_many([task], [prepared])[0]

    def run_many(self, tasks: Sequence[ClientTask], prepared: Sequence[PreparedTask]) -> list[ClientUpdate]:
        """Contiguous shares of ``tasks`` to the workers, trained in parallel; the updates in order."""
        import ray

        count = len(self.replicas)
        share = -(-len(tasks) // count)  # ceil
        refs = [
            replica.run_many.remote(list(tasks[i : i + share]), list(prepared[i : i + share]))
            for replica, i in zip(self.replicas, range(0, len(tasks), share), strict=False)
        ]
        return [update for part in ray.get(refs) for update in part]

    def merge_into_base(self, deltas: dict[str, torch.Tensor]) -> None:
        super().merge_into_base(deltas)
        self._everywhere("merge_into_base", deltas)

    def set_base_weights(self, weights: dict[str, torch.Tensor]) -> None:
        super().set_base_weights(weights)
        self._everywhere("set_base_weights", weights)

    def _everywhere(self, method: str, value: Any) -> None:
        import ray

        shared = ray.put(value)
        ray.get([getattr(replica, method).remote(shared) for replica in self.replicas])

    def close(self) -> None:
        """Release the workers; shut Ray down if this run started it."""
        import ray

        for replica in self.replicas:
            ray.kill(replica)
        self.replicas = []
        if self.owns_ray:
            ray.shutdown()


__all__ = ["RayExecutor", "Replica", "start_replicas"]
