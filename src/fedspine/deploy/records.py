"""Client tasks and updates as Flower records: what travels between the ServerApp and a ClientApp.

A task becomes a :class:`~flwr.app.RecordDict` with

* ``"lora"`` (ArrayRecord): the adapter the device starts from, one array per factor
  (``"<module>/A"``, ``"<module>/B"``; heterogeneous ranks travel at their own shapes);
* ``"base"`` (ArrayRecord, optional): the change merged into the base weights so far (FLoRA and
  FedSpine merge adapters into the base; a device rebuilds the current base from its own copy);
* ``"clusters"`` (ArrayRecord, optional): the cluster adapters the device chooses among
  (``personalize.method = "clustered"``), ``"<cluster>/<module>/A"``...;
* ``"task"`` (ConfigRecord): round, device, local steps, rank, scaling, pruning ratio, the pruning plan
  (JSON), extra settings (JSON) and the server's send time.

An update becomes ``"lora"`` (the trained factors, or ``"wire"``: the compressed payload that replaces
them), ``"importance"`` (per-unit scores in full coordinates, FedSpine), ``"cluster"`` (the trained
cluster adapter, with its index in ``"update"``) and ``"update"`` (scalars and the device's receive /
reply times). Decoding checks what it reads and raises
:class:`~fedspine.errors.DeployError` naming the field, so a malformed reply is rejected, never merged.

A reply is untrusted until :func:`read_update` has passed, and nothing is copied before its size is
known to be sound: the arrays of a reply together may not exceed a byte cap the server derives from
the task (:func:`max_reply_bytes`); each array's dtype (from an allow-list) and shape are read from its
``.npy`` header and must agree with its declared metadata and its data length before its data is
copied. What the arrays mean (factor shapes, importance per layer, scalars within range) is checked
next by :func:`~fedspine.algorithms.validation.check_update`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedspine.algorithms.wire import IMPORTANCE_KINDS, flatten_state, unflatten_state
from fedspine.client.evaluate import Evaluation
from fedspine.client.objectives import BatchResult, Objective
from fedspine.errors import DeployError, FedspineError
from fedspine.files import JSON
from fedspine.model.footprint import ModelShape
from fedspine.model.pruning import LayerKeep, PruningPlan
from fedspine.types import ClientTask, ClientUpdate, DeviceLora, LoraState

ALLOWED_DTYPES = frozenset(
    np.dtype(name).newbyteorder("<")
    for name in ("float32", "float16", "int8", "int16", "int32", "int64", "uint8")
)
"""What a reply's arrays may hold: fp32 factors and scores, and the codecs' integer parts."""
REPLY_SLACK_BYTES = 1 << 20
"""Room above the dense update for ``.npy`` headers and the codecs' small parts."""


@dataclass
class Timing:
    """Wall-clock stamps (Unix seconds) a device reports with its update."""

    received_at: float
    replied_at: float
    setup_seconds: float
    """Building the device's model and data in the fresh ClientApp process."""


def arrays(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord holding ``tensors`` under their own keys."""
    return ArrayRecord({key: Array(t.detach().cpu().contiguous()) for key, t in tensors.items()})


def tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord (copies: writable and owned by torch), each checked first.

    Raises:
        DeployError: an array is not a plain ``.npy`` of an allowed dtype whose header, declared
            metadata and data length agree.
    """
    return {key: _tensor(key, array) for key, array in record.items()}


def max_reply_bytes(task: ClientTask, shape: ModelShape | None) -> int:
    """The most bytes the arrays of a sound reply to ``task`` hold.

    Twice the task's factors at fp32 (a reply carries at most the factors, or a smaller compressed
    form), the full model's importance scores and channel means when the task asks for them, and
    :data:`REPLY_SLACK_BYTES`.
    """
    factors = sum(int(t.numel()) for f in task.payload.values() for t in f.values()) * 4
    if task.clusters:  # the trained cluster adapter comes back beside the shared one
        factors += sum(int(t.numel()) for f in task.clusters[0].values() for t in f.values()) * 4
    scores = 0
    if shape is not None and task.extra.get("measure_importance"):
        scores = shape.layers * (shape.kv_heads + 2 * shape.intermediate) * 4  # scores and channel means
    return 2 * factors + scores + REPLY_SLACK_BYTES


def _tensor(key: str, array: Array) -> torch.Tensor:
    data = array.data
    if array.stype != "numpy.ndarray" or not isinstance(data, bytes):
        raise DeployError(f"array {key!r} is not a numpy array (stype {array.stype!r})")
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buffer)
        else:
            raise ValueError(f"npy format {version}")
    except (ValueError, TypeError, SyntaxError) as exc:
        raise DeployError(f"array {key!r} has no readable .npy header: {exc}") from exc
    if dtype not in ALLOWED_DTYPES:
        raise DeployError(f"array {key!r} has dtype {dtype}; allowed: {sorted(map(str, ALLOWED_DTYPES))}")
    if fortran or str(dtype) != array.dtype or tuple(shape) != tuple(array.shape):
        raise DeployError(
            f"array {key!r}: header {dtype} {tuple(shape)} disagrees with its metadata "
            f"{array.dtype} {tuple(array.shape)}"
        )
    count = math.prod(shape)
    if len(data) - buffer.tell() != count * dtype.itemsize:
        raise DeployError(f"array {key!r}: {len(data) - buffer.tell()} data bytes for shape {tuple(shape)}")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=buffer.tell()).reshape(shape)
    return torch.from_numpy(values.copy())


def plan_to_json(plan: PruningPlan | None) -> str:
    if plan is None:
        return ""
    return json.dumps({str(layer): [list(k.kv_groups), list(k.channels)] for layer, k in plan.items()})


def plan_from_json(text: str) -> PruningPlan | None:
    if not text:
        return None
    try:
        raw = json.loads(text)
        return {int(layer): LayerKeep(tuple(kv), tuple(ch)) for layer, (kv, ch) in raw.items()}
    except (ValueError, TypeError, AttributeError, FedspineError) as exc:
        raise DeployError(f"task.plan is not a pruning plan: {exc}") from exc


def task_record(task: ClientTask, base_delta: Mapping[str, torch.Tensor], sent_at: float) -> RecordDict:
    """The message content that asks a device to run ``task``."""
    content = RecordDict()
    content["lora"] = arrays(flatten_state(task.payload))
    if base_delta:
        content["base"] = arrays(base_delta)
    if task.channel_means is not None:
        content["means"] = arrays({str(layer): m for layer, m in enumerate(task.channel_means)})
    if task.clusters:
        content["clusters"] = arrays(
            {
                f"{i}/{key}": t
                for i, state in enumerate(task.clusters)
                for key, t in flatten_state(state).items()
            }
        )
    content["task"] = ConfigRecord(
        {
            "round": task.round,
            "device_id": task.device_id,
            "local_steps": task.local_steps,
            "rank": task.lora.rank,
            "scaling": float(task.lora.scaling),
            "pruning_ratio": float(task.pruning_ratio),
            "plan": plan_to_json(task.plan),
            "extra": json.dumps(task.extra),
            "downlink_bytes": task.downlink_bytes,
            "sent_at": sent_at,
        }
    )
    return content


def read_task(content: RecordDict) -> tuple[ClientTask, dict[str, torch.Tensor], float]:
    """``(task, base delta, sent_at)`` from :func:`task_record`'s content."""
    cfg = _config(content, "task")
    task = ClientTask(
        round=_int(cfg, "task", "round"),
        device_id=_int(cfg, "task", "device_id"),
        local_steps=_int(cfg, "task", "local_steps"),
        lora=DeviceLora(_int(cfg, "task", "rank"), _float(cfg, "task", "scaling")),
        payload=unflatten_state(tensors(_arrays(content, "lora"))),
        downlink_bytes=_int(cfg, "task", "downlink_bytes"),
        extra=_extra(cfg),
        plan=plan_from_json(str(cfg.get("plan", ""))),
        pruning_ratio=_float(cfg, "task", "pruning_ratio"),
    )
    if "means" in content.array_records:
        task.channel_means = _layers(tensors(content.array_records["means"]), "means")
    if "clusters" in content.array_records:
        task.clusters = _clusters(tensors(content.array_records["clusters"]))
    base = tensors(content.array_records["base"]) if "base" in content.array_records else {}
    return task, base, _float(cfg, "task", "sent_at")


def update_record(update: ClientUpdate, timing: Timing) -> RecordDict:
    """The reply content carrying ``update`` (its compressed payload when it has one)."""
    content = RecordDict()
    if update.wire is not None:
        content["wire"] = arrays(update.wire)
    else:
        content["lora"] = arrays(flatten_state(update.lora_state))
    if update.importance is not None:
        content["importance"] = arrays(
            {
                f"{kind}/{layer}": s
                for kind in IMPORTANCE_KINDS
                for layer, s in enumerate(update.importance.get(kind) or [])
            }
        )
    if update.cluster_state is not None:
        content["cluster"] = arrays(flatten_state(update.cluster_state))
    content["update"] = ConfigRecord(
        {
            "cluster": -1 if update.cluster is None else update.cluster,
            "round": update.round,
            "device_id": update.device_id,
            "num_samples": update.num_samples,
            "train_loss": float(update.train_loss),
            "tokens": update.tokens,
            "host_train_seconds": float(update.host_train_seconds),
            "lora_rank": update.lora_rank,
            "lora_scaling": float(update.lora_scaling),
            "probe_loss": float("nan") if update.probe_loss is None else float(update.probe_loss),
            "received_at": timing.received_at,
            "replied_at": timing.replied_at,
            "setup_seconds": timing.setup_seconds,
        }
    )
    return content


def read_update(
    content: RecordDict, task: ClientTask, max_bytes: int | None = None
) -> tuple[ClientUpdate, Timing]:
    """The update (and the device's timing) from :func:`update_record`'s content.

    Checks it answers ``task`` (round and device), that its arrays together hold at most
    ``max_bytes`` (None: no cap) before decoding any, and each array as :func:`tensors` does; the plan
    is the task's own.
    """
    cfg = _config(content, "update")
    for key, expected in (("round", task.round), ("device_id", task.device_id)):
        if _int(cfg, "update", key) != expected:
            raise DeployError(f"update.{key} is {cfg[key]!r}, the task's is {expected}")
    if max_bytes is not None:
        size = sum(len(a.data) for r in content.array_records.values() for a in r.values())
        if size > max_bytes:
            raise DeployError(f"the reply's arrays hold {size} bytes; at most {max_bytes} fit this task")
    wire = tensors(content.array_records["wire"]) if "wire" in content.array_records else None
    state = unflatten_state(tensors(_arrays(content, "lora"))) if wire is None else {}
    importance = None
    if "importance" in content.array_records:
        importance = _importance(tensors(content.array_records["importance"]))
    probe_loss = _float(cfg, "update", "probe_loss")
    cluster_state = None
    if "cluster" in content.array_records:
        cluster_state = unflatten_state(tensors(content.array_records["cluster"]))
    update = ClientUpdate(
        round=task.round,
        device_id=task.device_id,
        num_samples=_int(cfg, "update", "num_samples"),
        lora_state=state,
        uplink_bytes=0,
        train_loss=_float(cfg, "update", "train_loss"),
        tokens=_int(cfg, "update", "tokens"),
        host_train_seconds=_float(cfg, "update", "host_train_seconds"),
        lora_rank=_int(cfg, "update", "lora_rank"),
        lora_scaling=_float(cfg, "update", "lora_scaling"),
        plan=task.plan,
        importance=importance,
        probe_loss=None if math.isnan(probe_loss) else probe_loss,
        wire=wire,
        cluster=_int(cfg, "update", "cluster") if cluster_state is not None else None,
        cluster_state=cluster_state,
    )
    timing = Timing(
        _float(cfg, "update", "received_at"),
        _float(cfg, "update", "replied_at"),
        _float(cfg, "update", "setup_seconds"),
    )
    return update, timing


MAX_REASON_CHARS = 500
"""A device's stated reason (a refusal, a data error) is cut to this many characters."""


def refusal_record(reason: str) -> RecordDict:
    """A reply saying the device will not run the task, and why (e.g. its data file is malformed)."""
    return RecordDict({"refusal": ConfigRecord({"reason": reason[:MAX_REASON_CHARS]})})


def refusal_reason(content: RecordDict) -> str | None:
    """The reason of a :func:`refusal_record` reply (None: the reply is not a refusal)."""
    if "refusal" not in content.config_records:
        return None
    return reason_text(content.config_records["refusal"].get("reason"))


def reason_text(value: object) -> str:
    """A device's stated reason as printable text of at most :data:`MAX_REASON_CHARS` characters."""
    text = value if isinstance(value, str) else repr(value)
    return "".join(c if c.isprintable() else "?" for c in text[:MAX_REASON_CHARS])


def evaluation_record(round_no: int, device_id: int, evaluation: Evaluation) -> RecordDict:
    """The reply to an evaluation task: the device's summed results on its held-out examples."""
    return RecordDict(
        {
            "evaluation": ConfigRecord(
                {
                    "round": round_no,
                    "device_id": device_id,
                    "loss": float(evaluation.loss),
                    "count": evaluation.count,
                    "correct": evaluation.correct,
                }
            )
        }
    )


def read_evaluation(
    content: RecordDict, round_no: int, device_id: int, max_count: int, objective: Objective
) -> Evaluation:
    """A device's evaluation from :func:`evaluation_record`'s content, checked: it answers this round
    and device, counts 1..``max_count`` examples (what the device declared it holds out), at most
    ``count`` of them correct, with a finite non-negative mean loss. The metric is the server's own,
    computed from those counts (a device cannot report an accuracy its counts do not give)."""
    cfg = _config(content, "evaluation")
    for key, expected in (("round", round_no), ("device_id", device_id)):
        if _int(cfg, "evaluation", key) != expected:
            raise DeployError(f"evaluation.{key} is {cfg[key]!r}, expected {expected}")
    return _results(cfg, "evaluation", "", max_count, objective)


def _results(cfg: ConfigRecord, record: str, prefix: str, max_count: int, objective: Objective) -> Evaluation:
    """The evaluation that ``record``'s ``count`` and ``<prefix>loss``, ``<prefix>correct`` give,
    checked: 1..``max_count`` examples, at most ``count`` correct, a finite non-negative mean loss. The
    metric is the server's own, computed from those counts."""
    count, correct = _int(cfg, record, "count"), _int(cfg, record, f"{prefix}correct")
    loss = _float(cfg, record, f"{prefix}loss")
    if not 1 <= count <= max_count:
        raise DeployError(f"{record}.count {count} is outside 1..{max_count}")
    if not 0 <= correct <= count:
        raise DeployError(f"{record}.{prefix}correct {correct} is outside 0..{count}")
    if not math.isfinite(loss) or loss < 0:
        raise DeployError(f"{record}.{prefix}loss {loss!r} is not a finite non-negative number")
    total = BatchResult(loss * count, count, correct)
    return Evaluation(objective.metric_name, objective.metric(total), loss, count, correct)


def personal_record(personal: Evaluation, global_model: Evaluation, seconds: float) -> ConfigRecord:
    """What a device reports with its final model about its personal model: its results and the global
    model's on the same held-out examples, and the seconds building it took on the device."""
    return ConfigRecord(
        {
            "count": personal.count,
            "loss": float(personal.loss),
            "correct": personal.correct,
            "global_loss": float(global_model.loss),
            "global_correct": global_model.correct,
            "seconds": float(seconds),
        }
    )


PersonalReport = TypedDict(
    "PersonalReport", {"evaluation": Evaluation, "global": Evaluation, "seconds": float}
)
"""A device's checked personal results: its personal model's and the global model's evaluations on its
held-out examples, and the seconds building the personal model took on the device."""


def read_personal_report(content: RecordDict, max_count: int, objective: Objective) -> PersonalReport | None:
    """A device's :func:`personal_record` (None when its reply has none), checked as an evaluation
    (:func:`read_evaluation`) for both models, with finite non-negative seconds: ``evaluation``,
    ``global`` (:class:`Evaluation` each) and ``seconds``."""
    if "personal" not in content.config_records:
        return None
    cfg = _config(content, "personal")
    seconds = _float(cfg, "personal", "seconds")
    if not math.isfinite(seconds) or seconds < 0:
        raise DeployError(f"personal.seconds {seconds!r} is not a finite non-negative number")
    return {
        "evaluation": _results(cfg, "personal", "", max_count, objective),
        "global": _results(cfg, "personal", "global_", max_count, objective),
        "seconds": seconds,
    }


MAX_MODEL_PARAMETERS = 10**13
"""The most parameters a device may report its model to have (a larger claim is malformed)."""


class ModelReport(TypedDict):
    """What a device reports about the final model it saved, checked (:func:`read_model_report`)."""

    dir: str
    parameters: int
    bytes: int
    tokens_per_second: float | None
    """None: not measured (a speed of 0)."""


def read_model_report(content: RecordDict, device_id: int) -> ModelReport:
    """What a device reports about the final model it saved (:func:`fedspine.deploy.client.final_model`),
    checked: its device, counts within range, a finite non-negative speed, printable text."""
    cfg = _config(content, "model")
    if _int(cfg, "model", "device_id") != device_id:
        raise DeployError(f"model.device_id is {cfg['device_id']!r}, expected {device_id}")
    parameters, nbytes = _int(cfg, "model", "parameters"), _int(cfg, "model", "bytes")
    speed = _float(cfg, "model", "tokens_per_second")
    if not 1 <= parameters <= MAX_MODEL_PARAMETERS or not 1 <= nbytes <= 8 * MAX_MODEL_PARAMETERS:
        raise DeployError(f"model.parameters {parameters} or model.bytes {nbytes} is out of range")
    if not math.isfinite(speed) or speed < 0:
        raise DeployError(f"model.tokens_per_second {speed!r} is not a finite non-negative number")
    return {
        "dir": reason_text(cfg.get("dir", "")),
        "parameters": parameters,
        "bytes": nbytes,
        "tokens_per_second": speed or None,
    }


def _clusters(flat: dict[str, torch.Tensor]) -> list[LoraState]:
    """The cluster adapters of a task's ``"clusters"`` record (keys ``"<i>/<module>/<A|B>"``, i = 0..k-1)."""
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        index, _, rest = key.partition("/")
        if not index.isdigit() or not rest:
            raise DeployError(f"clusters: key {key!r} is not <cluster>/<module>/<factor>")
        grouped.setdefault(int(index), {})[rest] = tensor
    if sorted(grouped) != list(range(len(grouped))):
        raise DeployError("clusters must be numbered 0..k-1")
    return [unflatten_state(grouped[i]) for i in range(len(grouped))]


def _importance(scores: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Per kind, the scores of layers ``0..L-1`` (keys ``heads/<i>``, ``channels/<i>`` and, for bias
    compensation, ``means/<i>``)."""
    measured_means = any(k.startswith("means/") for k in scores)
    kinds = IMPORTANCE_KINDS if measured_means else IMPORTANCE_KINDS[:2]
    layers = len(scores) // len(kinds)
    expected = {f"{kind}/{i}" for kind in kinds for i in range(layers)}
    if set(scores) != expected:
        raise DeployError(f"importance must hold {'/'.join(kinds)}/<i> for the same layers 0..L-1")
    return {kind: [scores[f"{kind}/{i}"] for i in range(layers)] for kind in kinds}


def _layers(values: dict[str, torch.Tensor], what: str) -> list[torch.Tensor]:
    """``values`` keyed ``"0" .. "L-1"`` as a list of finite floating-point vectors."""
    if set(values) != {str(i) for i in range(len(values))}:
        raise DeployError(f"{what} must be keyed by the layers 0..L-1")
    out = [values[str(i)] for i in range(len(values))]
    if any(not v.is_floating_point() or v.dim() != 1 or not bool(torch.isfinite(v).all()) for v in out):
        raise DeployError(f"{what} must be finite floating-point vectors")
    return out


def _extra(cfg: ConfigRecord) -> dict[str, JSON]:
    try:
        extra = json.loads(str(cfg.get("extra", "{}")))
    except ValueError as exc:
        raise DeployError(f"task.extra is not JSON: {exc}") from exc
    if not isinstance(extra, dict):
        raise DeployError(f"task.extra must be a JSON object, got {type(extra).__name__}")
    return extra


def _config(content: RecordDict, name: str) -> ConfigRecord:
    if name not in content.config_records:
        raise DeployError(f"the message has no '{name}' ConfigRecord")
    return content.config_records[name]


def _arrays(content: RecordDict, name: str) -> ArrayRecord:
    if name not in content.array_records:
        raise DeployError(f"the message has no '{name}' ArrayRecord")
    return content.array_records[name]


def _int(cfg: ConfigRecord, record: str, key: str) -> int:
    value: object = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DeployError(f"{record}.{key} must be an integer, got {value!r}")
    return value


def _float(cfg: ConfigRecord, record: str, key: str) -> float:
    value: object = cfg.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise DeployError(f"{record}.{key} must be a number, got {value!r}")
    return float(value)
