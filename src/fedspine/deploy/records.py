"""Client tasks and updates as Flower records: what travels between the ServerApp and a ClientApp.

A task becomes a :class:`~flwr.app.RecordDict` with

* ``"lora"`` (ArrayRecord): the adapter the device starts from, one array per factor
  (``"<module>/A"``, ``"<module>/B"``; heterogeneous ranks travel at their own shapes);
* ``"base"`` (ArrayRecord, optional): the change merged into the base weights so far (FLoRA and
  FedSpine merge adapters into the base; a device rebuilds the current base from its own copy);
* ``"task"`` (ConfigRecord): round, device, local steps, rank, scaling, pruning ratio, the pruning plan
  (JSON), extra settings (JSON) and the server's send time.

An update becomes ``"lora"`` (the trained factors, or ``"wire"``: the compressed payload that replaces
them), ``"importance"`` (per-unit scores in full coordinates, FedSpine) and ``"update"`` (scalars and
the device's receive / reply times). Decoding checks what it reads and raises
:class:`~fedspine.errors.DeployError` naming the field, so a malformed reply is rejected, never merged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedspine.algorithms.wire import flatten_state, unflatten_state
from fedspine.errors import DeployError, FedspineError
from fedspine.model.pruning import LayerKeep, PruningPlan
from fedspine.types import ClientTask, ClientUpdate, DeviceLora


@dataclass
class Timing:
    """Wall-clock stamps (Unix seconds) a device reports with its update."""

    received_at: float
    replied_at: float
    setup_seconds: float
    """Building the device's model and data in the fresh ClientApp process."""


def arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord holding ``tensors`` under their own keys."""
    return ArrayRecord({key: Array(t.detach().cpu().contiguous()) for key, t in tensors.items()})


def tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord (copies: writable and owned by torch)."""
    return {key: torch.from_numpy(array.numpy().copy()) for key, array in record.items()}


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


def task_record(task: ClientTask, base_delta: dict[str, torch.Tensor], sent_at: float) -> RecordDict:
    """The message content that asks a device to run ``task``."""
    content = RecordDict()
    content["lora"] = arrays(flatten_state(task.payload))
    if base_delta:
        content["base"] = arrays(base_delta)
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
                for kind in ("heads", "channels")
                for layer, s in enumerate(update.importance[kind])
            }
        )
    content["update"] = ConfigRecord(
        {
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


def read_update(content: RecordDict, task: ClientTask) -> tuple[ClientUpdate, Timing]:
    """The update (and the device's timing) from :func:`update_record`'s content.

    Checks it answers ``task`` (round and device); the plan is the task's own.
    """
    cfg = _config(content, "update")
    for key, expected in (("round", task.round), ("device_id", task.device_id)):
        if _int(cfg, "update", key) != expected:
            raise DeployError(f"update.{key} is {cfg[key]!r}, the task's is {expected}")
    wire = tensors(content.array_records["wire"]) if "wire" in content.array_records else None
    state = unflatten_state(tensors(_arrays(content, "lora"))) if wire is None else {}
    importance = None
    if "importance" in content.array_records:
        scores = tensors(content.array_records["importance"])
        layers = len(scores) // 2
        importance = {kind: [scores[f"{kind}/{i}"] for i in range(layers)] for kind in ("heads", "channels")}
    probe_loss = _float(cfg, "update", "probe_loss")
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
    )
    timing = Timing(
        _float(cfg, "update", "received_at"),
        _float(cfg, "update", "replied_at"),
        _float(cfg, "update", "setup_seconds"),
    )
    return update, timing


def _extra(cfg: ConfigRecord) -> dict[str, Any]:
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
    value: Any = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DeployError(f"{record}.{key} must be an integer, got {value!r}")
    return value


def _float(cfg: ConfigRecord, record: str, key: str) -> float:
    value: Any = cfg.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise DeployError(f"{record}.{key} must be a number, got {value!r}")
    return float(value)
