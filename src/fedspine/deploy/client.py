"""The device side of a Flower deployment: run exactly the simulator's local training for one task.

A ClientApp process builds what trains from the run's config
(:func:`~fedspine.runtime.experiment.build_node`: the simulator's trainer, same model and LoRA setup for
the seed, without the server's side), takes its device identity from the node config (``device-id``),
and answers ``train`` messages with the trained update and ``evaluate`` messages with its results on its
held-out examples. Its training data is, by default, its own file (``data-path`` in the node config,
read only here); with the run-config key ``node-data = "shared"`` a testbed's node derives its partition
of the config's data source, as the simulator does. A node whose data cannot be read refuses its tasks
with the reason; the run goes on without it. The error-feedback memory of a compressed uplink lives in
the node's persistent ``context.state``, so it survives across rounds although Flower starts a fresh
process per message.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ConfigRecord, ConfigRecordValues, Context, Message, MessageType, RecordDict
from transformers import PreTrainedModel

from fedspine.algorithms.compression import FeedbackState
from fedspine.algorithms.wire import flatten_state, unflatten_state
from fedspine.client.evaluate import evaluate as evaluate_model
from fedspine.client.personal import PrivateAdapters
from fedspine.config import Config
from fedspine.data import held_out_size
from fedspine.deploy.records import (
    Timing,
    arrays,
    evaluation_record,
    personal_record,
    read_task,
    reason_text,
    refusal_record,
    tensors,
    update_record,
)
from fedspine.deploy.settings import (
    MODEL_ACTION,
    MODEL_DIR_KEY,
    config_from_run,
    data_mode,
    data_path_from_node,
    device_id_from_node,
)
from fedspine.errors import DataError, DeployError
from fedspine.model.pruning import add_zero_mlp_biases
from fedspine.runtime.executor import task_seed
from fedspine.runtime.experiment import DeployedNode, NodeData, build_node, load_node_examples
from fedspine.runtime.experiment.data import holds_out
from fedspine.runtime.export import describe_model, device_model, save_model
from fedspine.runtime.personal import personal_model
from fedspine.types import ClientTask


@dataclass
class _Built:
    node: DeployedNode
    base_applied: dict[str, torch.Tensor] = field(default_factory=dict)
    """The base-weight change (the server's running sum) this process's model carries."""
    initial: dict[str, torch.Tensor] = field(default_factory=dict)
    """The initial weights of every module whose base has been changed here."""


_CACHE: dict[str, _Built] = {}
"""Nodes built in this process, by config digest (a simulation engine reuses its workers)."""


def _data_file(context: Context) -> Path | None:
    """This node's own data file, or None when the run's nodes share the config's data source."""
    if data_mode(context.run_config) == "shared":
        return None
    return Path(data_path_from_node(context.node_config))


def _built(config: Config, text: str, device_id: int, data_file: Path | None) -> _Built:
    """The node for this config (and this node's data file, as it is now), built once per process.

    Raises:
        DataError: the node's data file is missing, unreadable or malformed.
    """
    key = hashlib.sha256(text.encode()).hexdigest()
    if data_file is not None:
        try:
            stat = data_file.stat()
        except OSError as exc:
            raise DataError(f"cannot read the node's data file {data_file}: {exc.strerror}") from None
        key += f"|{data_file.resolve()}|{stat.st_mtime_ns}|{stat.st_size}"
    if key not in _CACHE:
        _CACHE.clear()  # one run at a time per process: free the previous model
        node = None if data_file is None else NodeData(device_id, load_node_examples(config, data_file))
        _CACHE[key] = _Built(build_node(config, node))
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
    executor = built.node.trainer.executor
    built.initial.update(executor.base_weights([k for k in changed if k not in built.initial]))
    executor.set_base_weights(
        {k: built.initial[k] + base[k] if k in base else built.initial[k] for k in changed}
    )
    built.base_applied = {k: v.clone() for k, v in base.items()}


@dataclass
class _Received:
    """A task this node may run: the run's config, the task, the base change it carries, the built run."""

    config: Config
    task: ClientTask
    base: dict[str, torch.Tensor]
    built: _Built


def _receive(content: RecordDict, context: Context) -> _Received:
    """Read a task addressed to this node and build (or reuse) the run it belongs to; the base is not
    synced yet.

    Raises:
        DataError: the node's data cannot be used (the caller refuses the task with the reason).
        DeployError: the task is malformed or addressed to another device.
    """
    config, text = config_from_run(context.run_config)
    device_id = device_id_from_node(context.node_config)
    task, base, _sent_at = read_task(content)
    if task.device_id != device_id:
        raise DeployError(f"task for device {task.device_id} reached the node of device {device_id}")
    return _Received(config, task, base, _built(config, text, device_id, _data_file(context)))


def answer_train(content: RecordDict, context: Context) -> RecordDict:
    """Answer a ``train`` message: local training of the task on this node's device."""
    received_at, started = time.time(), time.perf_counter()
    try:
        received = _receive(content, context)
    except DataError as exc:
        return refusal_record(str(exc))
    task, built = received.task, received.built
    _sync_base(built, received.base)
    setup_seconds = time.perf_counter() - started
    exp = built.node
    device = exp.devices[task.device_id]
    prepared = exp.trainer.executor.prepare(task.round, device, task.lora, task.local_steps, task.plan)
    if exp.trainer.private is not None:
        _load_private(context, exp.trainer.private, task.device_id)
    update = exp.trainer.executor.run(task, prepared)
    if exp.trainer.private is not None:
        context.state[PRIVATE_KEY] = arrays(flatten_state(exp.trainer.private.of(task.device_id)))
    if exp.uplink is not None:
        state = _load_feedback(context)
        draws = torch.Generator().manual_seed(task_seed(exp.settings.seed, task.round, task.device_id, 4))
        update.wire = exp.uplink.send(state, update, task.payload, draws)
        _save_feedback(context, state)
    timing = Timing(received_at, time.time(), setup_seconds)
    return update_record(update, timing)


def answer_evaluate(content: RecordDict, context: Context) -> RecordDict:
    """Answer an ``evaluate`` message: the global model the task carries (at the task's plan) on this
    device's held-out examples."""
    try:
        received = _receive(content, context)
    except DataError as exc:
        return refusal_record(str(exc))
    task, built = received.task, received.built
    eval_set = built.node.trainer.local_tests.get(task.device_id)
    if eval_set is None:
        mode = received.config.eval.mode
        return refusal_record(f"no held-out examples (eval.mode {mode!r}, or too little data)")
    _sync_base(built, received.base)
    executor = built.node.trainer.executor
    executor.load_global(task.payload)
    result = executor.evaluate(eval_set, task.plan, task.channel_means)
    return evaluation_record(task.round, task.device_id, result)


def answer_final_model(content: RecordDict, context: Context) -> RecordDict:
    """Answer a ``query.model`` message: build the device's final model from the global state the task
    carries (pruned by the task's plan), measure it, save it as a Hugging Face directory under the
    node's ``model-dir``, and report what it holds."""
    try:
        received = _receive(content, context)
    except DataError as exc:
        return refusal_record(str(exc))
    config, task, device_id = received.config, received.task, received.task.device_id
    _sync_base(received.built, received.base)
    exp = received.built.node
    exp.trainer.executor.load_global(task.payload)
    model = device_model(exp.trainer.executor, task.plan, task.channel_means)
    personal = None
    if config.personalize.method != "none":
        model, personal = _personalize(exp, context, task, model)
    e = config.export
    train = exp.trainer.executor.train_data
    report = describe_model(model, train.input_ids[0], train.pad_id, e.generate_tokens if e.speed else 0)
    out = model_dir(context, config.run.name) / safe_name(str(task.extra.get("model", "model")))
    if e.save:
        save_model(model, exp.trainer.tokenizer, out, task.plan, task.channel_means)
    record: dict[str, ConfigRecordValues] = {
        "device_id": device_id,
        "dir": str(out) if e.save else "",
        "parameters": int(report["parameters"]),
        "bytes": int(report["bytes"]),
        "tokens_per_second": float(report["tokens_per_second"] or 0.0),
    }
    reply = RecordDict({"model": ConfigRecord(record)})
    if personal is not None:
        reply["personal"] = personal
    return reply


def _personalize(
    exp: DeployedNode, context: Context, task: ClientTask, deployed: PreTrainedModel
) -> tuple[PreTrainedModel, ConfigRecord | None]:
    """This device's personal model (``[personalize]``) built from ``deployed`` (the global model at its
    plan, loaded in the executor) on its own data, and its report: the personal and the global model
    on its held-out examples, and the seconds building it took here (None without held-out examples).
    Its private adapter (``split``) comes from the node's state."""
    device = exp.devices[task.device_id]
    if exp.trainer.private is not None:
        _load_private(context, exp.trainer.private, task.device_id)
    started = time.perf_counter()
    built = personal_model(exp, device, task.plan, task.channel_means, clusters=task.clusters)
    seconds = time.perf_counter() - started
    if built is None:
        return deployed, None
    mine = built.model
    if task.channel_means is not None:
        add_zero_mlp_biases(mine)  # the same structure as the global device model (stock config)
    eval_set = exp.trainer.local_tests.get(task.device_id)
    if eval_set is None:
        return mine, None
    ready = exp.trainer.executor.ready
    results = [
        evaluate_model(ready(copy.deepcopy(m)), exp.trainer.objective, eval_set.batches)
        for m in (mine, deployed)
    ]
    return mine, personal_record(results[0], results[1], seconds)


def model_dir(context: Context, run_name: str) -> Path:
    """Where this node keeps the models runs give it: node config ``model-dir`` (default
    ``~/.fedspine/models``), one folder per run."""
    root = context.node_config.get(MODEL_DIR_KEY)
    base = Path(root) if isinstance(root, str) and root.strip() else Path.home() / ".fedspine" / "models"
    return base / safe_name(f"{run_name}-{context.run_id}")


def safe_name(text: str) -> str:
    """``text`` as one path component: letters, digits, ``.``, ``_`` and ``-`` only."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in text).strip(".")
    return name or "model"


def answer_query(content: RecordDict, context: Context) -> RecordDict:
    """Answer a ``query`` message: tell the server which device this node is and, when it brings its
    own data, how many examples it trains on and holds out (or why its data cannot be used)."""
    device_id = device_id_from_node(context.node_config)
    said: dict[str, ConfigRecordValues] = {"device_id": device_id}
    if data_mode(context.run_config) == "local":
        config, _ = config_from_run(context.run_config)
        try:
            examples = len(load_node_examples(config, data_path_from_node(context.node_config)))
        except DataError as exc:
            said["data_error"] = reason_text(str(exc))
        else:
            e = config.eval
            held = held_out_size(examples, e.local_fraction, e.local_max_examples) if holds_out(config) else 0
            said.update(examples=examples - held, eval_examples=held)
    return RecordDict({"node": ConfigRecord(said)})


ANSWERS: dict[str, Callable[[RecordDict, Context], RecordDict]] = {
    MessageType.TRAIN: answer_train,
    MessageType.EVALUATE: answer_evaluate,
    MessageType.QUERY: answer_query,
    MODEL_ACTION: answer_final_model,
}
"""The answer to each message type a node handles."""


def answer(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply content to a message of type ``kind`` (see :data:`ANSWERS`)."""
    if kind not in ANSWERS:
        raise DeployError(f"this node does not handle {kind!r} messages")
    return ANSWERS[kind](content, context)


def train(message: Message, context: Context) -> Message:
    """Handle a ``train`` message in this process."""
    return Message(answer_train(message.content, context), reply_to=message)


def evaluate(message: Message, context: Context) -> Message:
    """Handle an ``evaluate`` message in this process."""
    return Message(answer_evaluate(message.content, context), reply_to=message)


def final_model(message: Message, context: Context) -> Message:
    """Handle a ``query.model`` message in this process."""
    return Message(answer_final_model(message.content, context), reply_to=message)


def query(message: Message, context: Context) -> Message:
    """Handle a ``query`` message in this process."""
    return Message(answer_query(message.content, context), reply_to=message)


PRIVATE_KEY = "fedspine.private"
"""Where a node keeps its device's private adapter (``split``) in its persistent state."""


def _load_private(context: Context, private: PrivateAdapters, device_id: int) -> None:
    """Put the private adapter this node keeps (if any yet) into ``private``, for ``device_id``."""
    if PRIVATE_KEY in context.state.array_records:
        private.states[device_id] = unflatten_state(tensors(context.state.array_records[PRIVATE_KEY]))
    else:
        private.states.pop(device_id, None)


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
