"""The device side of a Flower deployment: run exactly the simulator's local training for one task.

A ClientApp process builds the experiment from the run's config (the same code path as a simulated
run: same data split, partitions, model and LoRA setup for the seed), takes its device identity from
the node config (``device-id``), and answers ``train`` messages with the trained update. The
error-feedback memory of a compressed uplink lives in the node's persistent ``context.state``, so it
survives across rounds although Flower starts a fresh process per message.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedspine.algorithms.compression import FeedbackState
from fedspine.config import Config
from fedspine.deploy.records import Timing, arrays, read_task, tensors, update_record
from fedspine.deploy.settings import config_from_run, device_id_from_node
from fedspine.errors import DeployError
from fedspine.runtime.build import Experiment, build_experiment
from fedspine.runtime.executor import task_seed


@dataclass
class _Built:
    experiment: Experiment
    base_applied: dict[str, torch.Tensor] = field(default_factory=dict)
    """The base-weight change (the server's running sum) this process's model carries."""
    initial: dict[str, torch.Tensor] = field(default_factory=dict)
    """The initial weights of every module whose base has been changed here."""


_CACHE: dict[str, _Built] = {}
"""Experiments built in this process, by config digest (a simulation engine reuses its workers)."""


def _built(config: Config, text: str) -> _Built:
    key = hashlib.sha256(text.encode()).hexdigest()
    if key not in _CACHE:
        _CACHE.clear()  # one run at a time per process: free the previous model
        _CACHE[key] = _Built(build_experiment(config))
    return _CACHE[key]


def _sync_base(built: _Built, base: dict[str, torch.Tensor]) -> None:
    """Set the process's base weights to ``initial + base`` (``base``: the server's running sum).

    Computed from the initial weights, not from what this process merged before, so the result does
    not depend on the process's history (an earlier run of the same config, or a resumed run whose
    base is older than the last merge here): it is what a fresh process gets.
    """
    applied = built.base_applied
    changed = sorted(
        k
        for k in base.keys() | applied.keys()
        if k not in base or k not in applied or not torch.equal(base[k], applied[k])
    )
    if not changed:
        return
    executor = built.experiment.executor
    built.initial.update(executor.base_weights([k for k in changed if k not in built.initial]))
    executor.set_base_weights(
        {k: built.initial[k] + base[k] if k in base else built.initial[k] for k in changed}
    )
    built.base_applied = {k: v.clone() for k, v in base.items()}


def train(message: Message, context: Context) -> Message:
    """Handle a ``train`` message: local training of the task on this node's device."""
    received_at = time.time()
    config, text = config_from_run(context.run_config)
    device_id = device_id_from_node(context.node_config)
    task, base, _sent_at = read_task(message.content)
    if task.device_id != device_id:
        raise DeployError(f"task for device {task.device_id} reached the node of device {device_id}")
    started = time.perf_counter()
    built = _built(config, text)
    _sync_base(built, base)
    setup_seconds = time.perf_counter() - started
    exp = built.experiment
    device = exp.devices[device_id]
    prepared = exp.executor.prepare(task.round, device, task.lora, task.local_steps, task.plan)
    update = exp.executor.run(task, prepared)
    if exp.uplink is not None:
        state = _load_feedback(context)
        draws = torch.Generator().manual_seed(task_seed(exp.settings.seed, task.round, device_id, 4))
        update.wire = exp.uplink.send(state, update, task.payload, draws)
        _save_feedback(context, state)
    timing = Timing(received_at, time.time(), setup_seconds)
    return Message(update_record(update, timing), reply_to=message)


def query(message: Message, context: Context) -> Message:
    """Handle a ``query`` message: tell the server which device this node is."""
    content = RecordDict({"node": ConfigRecord({"device_id": device_id_from_node(context.node_config)})})
    return Message(content, reply_to=message)


def _load_feedback(context: Context) -> FeedbackState:
    records = context.state.array_records
    state = FeedbackState()
    if "fedspine.ef.error" in records:
        state.error = tensors(records["fedspine.ef.error"])
    if "fedspine.ef.estimate" in records:
        state.estimate = tensors(records["fedspine.ef.estimate"])
    return state


def _save_feedback(context: Context, state: FeedbackState) -> None:
    context.state["fedspine.ef.error"] = arrays(state.error)
    context.state["fedspine.ef.estimate"] = arrays(state.estimate)
