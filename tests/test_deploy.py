"""Flower deployment: records, the server/client pair (in-process grid), the deploy CLI, and a real
TLS + node-authentication deployment on loopback (SuperLink and SuperNodes as processes)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import signal
import stat
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.app import Array, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest
from flwr.supercore.routers.runtime.responses import router as responses_router
from flwr.supercore.routers.runtime.router import router as runtime_router
from typer.testing import CliRunner

from fedspine.api import RunResult, load_global_adapter, run_experiment
from fedspine.cli import app as cli
from fedspine.config import Config, load_config, to_toml, tomllib
from fedspine.deploy.records import Timing, read_task, read_update, task_record, update_record
from fedspine.deploy.server import serve
from fedspine.deploy.settings import (
    BIND_KEY,
    CONFIG_KEY,
    DATA_KEY,
    NODES_KEY,
    OUT_KEY,
    RESUME_KEY,
    config_from_run,
    device_id_from_node,
    node_bindings,
)
from fedspine.deploy.setup import write_app
from fedspine.errors import CheckpointError, ConfigError, DeployError
from fedspine.model.pruning import LayerKeep
from fedspine.runtime import checkpoint as checkpoints
from fedspine.types import ClientTask, ClientUpdate, DeviceLora
from tests.deployment import CONNECTION, DEVICE_CONNECTION, Loopback, alive, descendants, write_node_files
from tests.flower_fakes import FakeGrid

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"
QUIET = ["export.save=false", "export.speed=false", "data.test_size=40", "eval.at_start=false"]


def tiny(*overrides: str) -> Config:
    return load_config(TINY, [*QUIET, *overrides])


def run_fake(
    cfg: Config,
    out: Path,
    grid_hook: object = None,
    bind: str = "",
    resume: bool = False,
    data_paths: dict[int, str] | None = None,
    model_root: str | None = None,
    workers: dict[int, str] | None = None,
) -> tuple[RunResult, FakeGrid]:
    """A run over the in-process grid: the nodes derive the shared partitions, or, with ``data_paths``
    (device -> file), read their own files."""
    run_config: dict[str, str | int | float | bool] = {
        CONFIG_KEY: to_toml(cfg),
        OUT_KEY: str(out),
        NODES_KEY: 5.0,
        BIND_KEY: bind,
        RESUME_KEY: resume,
        DATA_KEY: "shared" if data_paths is None else "local",
    }
    grid = FakeGrid(run_config, sum(g.count for g in cfg.fleet.groups), data_paths, model_root, workers)
    if grid_hook is not None:
        grid.tamper = grid_hook  # type: ignore[assignment]
    return serve(grid, Context(1, 0, {}, RecordDict(), dict(run_config))), grid  # type: ignore[arg-type]


def assert_same_state(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys() and a
    for module in a:
        for name in a[module]:
            torch.testing.assert_close(a[module][name], b[module][name], rtol=1e-5, atol=1e-6)


# --- records ----------------------------------------------------------------------------------------


def _state(rank: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    return {"m.q_proj": {"A": torch.randn(rank, 8, generator=g), "B": torch.randn(6, rank, generator=g)}}


def test_a_task_travels_as_records_and_back_unchanged() -> None:
    plan = {0: LayerKeep((0, 2), (1, 3, 4)), 1: LayerKeep((1,), (0,))}
    task = ClientTask(3, 5, 4, DeviceLora(2, 2.0), _state(2), 123, {"measure_importance": False}, plan, 0.3)
    base = {"model.layers.0.mlp.down_proj": torch.randn(4, 5)}
    back, base_back, sent = read_task(task_record(task, base, 17.5))
    assert (back.round, back.device_id, back.local_steps, back.lora, back.downlink_bytes) == (
        3,
        5,
        4,
        task.lora,
        123,
    )
    assert back.plan == plan and back.extra == task.extra and back.pruning_ratio == pytest.approx(0.3)
    assert_same_state(back.payload, task.payload)
    torch.testing.assert_close(
        base_back["model.layers.0.mlp.down_proj"], base["model.layers.0.mlp.down_proj"]
    )
    assert sent == 17.5


def test_an_update_travels_with_its_compressed_payload_importance_and_timing() -> None:
    task = ClientTask(2, 1, 4, DeviceLora(4, 2.0), _state(4), 0, plan={0: LayerKeep((0,), (1,))})
    wire = {
        "m.q_proj/A/values": torch.randn(3),
        "m.q_proj/A/indices": torch.tensor([0, 5, 9], dtype=torch.int16),
    }
    importance = {"heads": [torch.rand(2), torch.rand(2)], "channels": [torch.rand(4), torch.rand(4)]}
    update = ClientUpdate(
        2, 1, 50, {}, 0, 1.25, 640, 0.5, 4, 2.0, importance=importance, probe_loss=None, wire=wire
    )
    back, timing = read_update(update_record(update, Timing(10.0, 12.5, 0.75)), task)
    assert back.wire is not None and back.wire.keys() == wire.keys()
    assert back.wire["m.q_proj/A/indices"].dtype == torch.int16
    assert torch.equal(back.wire["m.q_proj/A/indices"], wire["m.q_proj/A/indices"])
    assert back.probe_loss is None and back.plan == task.plan and back.train_loss == 1.25
    assert back.importance is not None and torch.equal(
        back.importance["channels"][1], importance["channels"][1]
    )
    assert (timing.received_at, timing.replied_at, timing.setup_seconds) == (10.0, 12.5, 0.75)


def test_malformed_records_raise_a_deploy_error_naming_the_field() -> None:
    task = ClientTask(2, 1, 4, DeviceLora(4, 2.0), _state(4), 0)
    good = update_record(ClientUpdate(2, 1, 5, _state(4), 0, 1.0, 10, 0.1, 4, 2.0), Timing(0, 1, 0))
    with pytest.raises(DeployError, match=r"update\.round"):
        read_update(good, ClientTask(3, 1, 4, DeviceLora(4, 2.0), _state(4), 0))
    missing = RecordDict({"update": good.config_records["update"]})
    with pytest.raises(DeployError, match="'lora' ArrayRecord"):
        read_update(missing, task)
    bad = RecordDict(
        {"lora": good.array_records["lora"], "update": ConfigRecord({"round": 2, "device_id": "x"})}
    )
    with pytest.raises(DeployError, match=r"update\.device_id must be an integer"):
        read_update(bad, task)
    with pytest.raises(DeployError, match="'task' ConfigRecord"):
        read_task(RecordDict())


def test_run_and_node_settings_are_checked() -> None:
    assert device_id_from_node({"device-id": 3}) == 3
    assert device_id_from_node({"partition-id": 2, "num-partitions": 4}) == 2  # Flower's simulation engine
    with pytest.raises(DeployError, match="device-id"):
        device_id_from_node({"device-id": -1})
    with pytest.raises(DeployError, match=CONFIG_KEY):
        config_from_run({})
    with pytest.raises(ConfigError, match=CONFIG_KEY):
        config_from_run({CONFIG_KEY: "[run\nname ="})
    cfg, _ = config_from_run({CONFIG_KEY: to_toml(tiny())})
    assert cfg == tiny()
    on_ray = dataclasses.replace(tiny(), executor=dataclasses.replace(tiny().executor, name="ray"))
    with pytest.raises(ConfigError, match="SuperNodes"):
        config_from_run({CONFIG_KEY: to_toml(on_ray)})


# --- the server and client pair on an in-process grid ------------------------------------------------


def test_a_node_builds_what_trains_and_not_the_servers_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployed node needs the trainer, its fleet and its codec; the strategy's masks and the
    scheduler's state live on the SuperLink's side (the rounds below check that what it trains matches)."""
    import fedspine.runtime.experiment as experiment

    def server_side(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a node built the server's pruning strategy")

    monkeypatch.setattr(experiment, "build_pruning_strategy", server_side)
    cfg = tiny("strategy.name=fedspine", "compression.codec=topk")
    node = experiment.build_node(cfg)
    assert len(node.devices) == len(experiment.build_fleet_from_config(cfg))
    assert node.uplink is not None and not hasattr(node, "strategy")
    assert node.trainer.executor.device_side.__class__.__name__ == "PlainTraining"


@pytest.mark.parametrize(
    ("strategy", "rounds"),
    [("fedit", 1), ("flora", 2), ("fedspine", 2), ("hetlora", 2)],
)
def test_flower_rounds_match_the_simulator(tmp_path: Path, strategy: str, rounds: int) -> None:
    """Same config and seed: the same updates, aggregated into the same global state.

    FLoRA and FedSpine merge into the base weights: their second round trains on the merged base,
    which a device only has if the server's base delta reached it. HetLoRA devices train their own
    ranks and may shrink them.
    """
    ranks = ["lora.ranks=[2, 4, 8, 2, 4, 8]"] if strategy == "hetlora" else []
    cfg = tiny(
        f"strategy.name={strategy}", f"scheduler.rounds={rounds}", "scheduler.clients_per_round=6", *ranks
    )
    flower, _ = run_fake(cfg, tmp_path / "flower")
    sim = run_experiment(cfg, tmp_path / "sim")
    assert flower.summary.executor == "flower" and sim.summary.executor == "simulation"
    assert flower.summary.tasks["ok"] == sim.summary.tasks["ok"] == 6 * rounds
    assert flower.summary.final_eval_loss == pytest.approx(sim.summary.final_eval_loss, rel=1e-5)
    losses = [
        [float(r["train_loss"]) for r in csv.DictReader((run.run_dir / "rounds.csv").open())]
        for run in (flower, sim)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    if strategy in ("fedit", "hetlora"):
        assert_same_state(load_global_adapter(flower.run_dir), load_global_adapter(sim.run_dir))


def test_error_feedback_state_lives_on_the_device_across_rounds(tmp_path: Path) -> None:
    """EF21 over two rounds: the device's estimate persists in the node's context.state."""
    cfg = tiny(
        "scheduler.rounds=2",
        "scheduler.clients_per_round=6",
        "compression.codec=topk",
        "compression.feedback=ef21",
    )
    flower, grid = run_fake(cfg, tmp_path / "flower")
    sim = run_experiment(cfg, tmp_path / "sim")
    assert_same_state(load_global_adapter(flower.run_dir), load_global_adapter(sim.run_dir))
    assert flower.summary.uplink_bytes == sim.summary.uplink_bytes
    assert all("fedspine.ef.estimate" in c.state.array_records for c in grid.contexts.values())


def test_a_malformed_or_failed_reply_is_rejected_logged_and_counted(tmp_path: Path) -> None:
    seen: list[int] = []

    def tamper(reply: Message) -> Message:
        seen.append(1)
        if len(seen) == 7:  # the first task reply (after 6 node queries): drop its update record
            del reply.content.config_records["update"]
        if len(seen) == 8:  # the second: the device reports an error
            return Message(Error(code=0, reason="out of memory on the device"), reply_to=_original(reply))
        return reply

    cfg = tiny("scheduler.rounds=1", "scheduler.clients_per_round=6")
    result, _ = run_fake(cfg, tmp_path / "flower", tamper)
    assert result.summary.tasks["dropped"] == 2 and result.summary.tasks["ok"] == 4
    events = (result.run_dir / "events.jsonl").read_text()
    assert "malformed update: the message has no 'update' ConfigRecord" in events
    assert "device error: out of memory on the device" in events
    assert '"num_updates": 4' in events


def _tampered_reply(reply: Message, device: int, mutate: dict[int, Callable[[RecordDict], None]]) -> Message:
    if device in mutate:
        mutate[device](reply.content)
    return reply


def _set_update(**fields: object) -> Callable[[RecordDict], None]:
    def apply(content: RecordDict) -> None:
        record = dict(content.config_records["update"])
        record.update(fields)
        content["update"] = ConfigRecord(record)  # type: ignore[arg-type]

    return apply


def _set_array(record: str, key: str, array: Array) -> Callable[[RecordDict], None]:
    """Set ``key`` of the reply's ArrayRecord ``record``; ``*`` in ``key`` stands for the first
    module there."""

    def apply(content: RecordDict) -> None:
        arrays = content.array_records[record]
        module = next(iter(arrays)).split("/")[0]
        arrays[key.replace("*", module)] = array

    return apply


def _index_out_of_range(content: RecordDict) -> None:
    """The first top-k payload keeps its length, one index points far outside the factor."""
    wire = content.array_records["wire"]
    key = next(k for k in wire if k.endswith("/index"))
    index = wire[key].numpy().copy()
    index[0] = 30000
    wire[key] = Array(index)


def _mutate_replies(first_round: dict[int, Callable[[RecordDict], None]]) -> Callable[[Message], Message]:
    """A tamper hook that applies ``first_round[device]`` to that device's round-1 reply."""

    def tamper(reply: Message) -> Message:
        if reply.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        update = reply.content.config_records["update"]
        return _tampered_reply(reply, int(update["device_id"]), first_round if update["round"] == 1 else {})  # type: ignore[arg-type]

    return tamper


def _rejections(result: RunResult) -> dict[int, str]:
    """Device -> reason of its dropped or rejected round-1 task."""
    events = [json.loads(line) for line in (result.run_dir / "events.jsonl").read_text().splitlines()]
    return {
        e["device_id"]: e.get("reason", "")
        for e in events
        if e.get("event") == "task" and e.get("round") == 1 and e.get("status") in ("dropped", "rejected")
    }


def test_replies_that_used_to_crash_or_poison_the_server_are_dropped_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    """The review's reproductions on FedSpine's first (importance-measuring) round: a string-dtype
    factor, importance for an extra layer, a scaling the task did not send, a sample count beyond the
    device's partition, an infinite probe loss beside importance, and a factor over the byte cap. Each
    drops its own task; the second round runs all six devices."""
    big = Array(np.zeros((1024, 1024), np.float32))
    first_round = {
        0: _set_array("lora", "*/A", Array(np.array(["ab", "cd"]))),
        1: lambda c: (
            _set_array("importance", "heads/2", Array(np.ones(2, np.float32)))(c),  # tiny: layers 0, 1
            _set_array("importance", "channels/2", Array(np.ones(2, np.float32)))(c),
            _set_array("importance", "means/2", Array(np.ones(2, np.float32)))(c),  # compensation is on
        ),
        2: _set_update(lora_scaling=1e4),
        3: _set_update(num_samples=10**9),
        4: _set_update(probe_loss=float("inf")),
        5: _set_array("lora", "*/B", big),
    }
    cfg = tiny("strategy.name=fedspine", "scheduler.rounds=2", "scheduler.clients_per_round=6")
    result, _ = run_fake(cfg, tmp_path / "flower", _mutate_replies(first_round))
    reasons = _rejections(result)
    assert sorted(reasons) == [0, 1, 2, 3, 4, 5], reasons
    assert "dtype <U2" in reasons[0]
    assert "importance for 3 layers; the model has 2" in reasons[1]
    assert "lora_scaling 10000.0 is not the task's" in reasons[2]
    assert "num_samples 1000000000 outside" in reasons[3]
    assert "probe_loss inf" in reasons[4]
    assert "at most" in reasons[5] and "fit this task" in reasons[5]
    assert result.summary.tasks["ok"] == 6  # round 2: every device, untouched


def test_compressed_replies_are_checked_before_decoding_and_a_rejected_rank_changes_nothing(
    tmp_path: Path,
) -> None:
    """Top-k payloads with an index outside the factor or a claimed 16384 x 16384 shape, and ranks
    1000 and 0, drop their tasks without touching the server's state: round 2 trains every device at
    the rank it had (HetLoRA would keep a lowered rank only from an accepted update)."""
    first_round = {
        0: _index_out_of_range,
        1: _set_array("wire", "*/A/shape", Array(np.array([16384, 16384], np.int32))),
        2: _set_update(lora_rank=1000),
        3: _set_update(lora_rank=0),
        4: _set_update(train_loss=float("nan")),
    }
    cfg = tiny(
        "strategy.name=hetlora",
        "lora.ranks=[2, 4, 8, 2, 4, 8]",
        "scheduler.rounds=2",
        "scheduler.clients_per_round=6",
        "compression.codec=topk",
    )
    result, _ = run_fake(cfg, tmp_path / "flower", _mutate_replies(first_round))
    reasons = _rejections(result)
    assert sorted(reasons) == [0, 1, 2, 3, 4], reasons
    assert "index outside" in reasons[0]
    assert "does not fit the factor sent" in reasons[1]
    assert "rank 1000 outside" in reasons[2] and "rank 0 outside" in reasons[3]
    assert "train_loss nan" in reasons[4]
    assert result.summary.tasks["ok"] == 1 + 6


def test_node_discovery_leaves_out_nodes_with_bad_claims(tmp_path: Path) -> None:
    """A query reply without a device id, one claiming device -1, and one claiming a device another
    node claimed first: those nodes are logged and not used; the run goes on with the others."""

    def tamper(reply: Message) -> Message:
        if reply.metadata.message_type != MessageType.QUERY:
            return reply
        node = reply.metadata.src_node_id
        if node == 1:
            del reply.content.config_records["node"]
        elif node == 2:
            reply.content["node"] = ConfigRecord({"device_id": -1})
        elif node == 4:
            reply.content["node"] = ConfigRecord({"device_id": 2})  # node 3 is device 2
        return reply

    cfg = tiny("scheduler.rounds=1", "scheduler.clients_per_round=6")
    result, _ = run_fake(cfg, tmp_path / "flower", tamper)
    events = [json.loads(line) for line in (result.run_dir / "events.jsonl").read_text().splitlines()]
    nodes = next(e["nodes"] for e in events if e.get("event") == "deployment")
    assert nodes == {"2": 3, "4": 5, "5": 6}
    assert result.summary.tasks["ok"] == 3


def test_bound_nodes_are_their_devices_whatever_they_claim(tmp_path: Path) -> None:
    """With node -> device bindings, a bound node claiming another device and unbound nodes are left
    out; self-asserted ids no longer decide who is who."""

    def tamper(reply: Message) -> Message:
        if reply.metadata.message_type == MessageType.QUERY and reply.metadata.src_node_id == 2:
            reply.content["node"] = ConfigRecord({"device_id": 5})  # bound to device 1
        return reply

    cfg = tiny("scheduler.rounds=1", "scheduler.clients_per_round=6")
    result, _ = run_fake(cfg, tmp_path / "flower", tamper, bind="1=0,2=1,3=2")
    events = [json.loads(line) for line in (result.run_dir / "events.jsonl").read_text().splitlines()]
    assert next(e["nodes"] for e in events if e.get("event") == "deployment") == {"0": 1, "2": 3}
    assert result.summary.tasks["ok"] == 2
    assert node_bindings({BIND_KEY: " 7=3, 8=0"}) == {7: 3, 8: 0}
    for bad in ("7=3,8=3", "7=3,7=4", "x=1", "7"):
        with pytest.raises(DeployError, match=BIND_KEY):
            node_bindings({BIND_KEY: bad})
    with pytest.raises(ConfigError, match="device 9"):
        write_app(tmp_path / "app", cfg, tmp_path / "run", bindings=["1=9"])


def _original(reply: Message) -> Message:
    """A stand-in for the instruction a reply answers (only its metadata is used)."""
    msg = Message(RecordDict(), reply.metadata.src_node_id, "train")
    msg.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    msg.metadata.__dict__["_src_node_id"] = 0
    return msg


class ServerKilled(BaseException):
    """Stands for the ServerApp's process dying: nothing in fedspine catches it."""


def _records(run_dir: Path) -> tuple[list[dict[str, str]], list[tuple[int, int, str]]]:
    """What a deployment must reproduce: per round the aggregated count and train loss, and every
    task's (round, device, status); wall-clock times differ from run to run."""
    rounds = [
        {k: r[k] for k in ("round", "selected", "aggregated", "train_loss", "metric")}
        for r in csv.DictReader((run_dir / "rounds.csv").open())
    ]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    tasks = [(e["round"], e["device_id"], e["status"]) for e in events if e["event"] == "task"]
    return rounds, tasks


def test_a_deployment_killed_after_a_checkpoint_resumes_to_the_same_result(tmp_path: Path) -> None:
    """The ServerApp dies while round 2's replies come in; started again with ``resume = true`` it
    continues from round 1's checkpoint, and its records and final state equal an uninterrupted run's.
    FLoRA merges into the base weights, which the checkpoint and every later task must carry."""
    cfg = tiny(
        "strategy.name=flora", "scheduler.rounds=3", "scheduler.clients_per_round=3", "run.checkpoint_every=1"
    )
    whole, _ = run_fake(cfg, tmp_path / "whole")
    replies = 0

    def die_in_round_2(reply: Message) -> Message:
        nonlocal replies
        replies += reply.metadata.message_type == MessageType.TRAIN
        if replies == 5:
            raise ServerKilled
        return reply

    with pytest.raises(ServerKilled):
        run_fake(cfg, tmp_path / "resumed", die_in_round_2)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["round-000001"]
    resumed, _ = run_fake(cfg, tmp_path / "resumed", resume=True)
    assert _records(resumed.run_dir) == _records(whole.run_dir)
    assert resumed.summary.tasks == whole.summary.tasks
    for key in ("final_eval_loss", "uplink_bytes", "downlink_bytes"):
        assert getattr(resumed.summary, key) == getattr(whole.summary, key), key
    values = [[e["value"] for e in run.summary.evaluations] for run in (resumed, whole)]
    assert values[0] == values[1] and len(values[0]) == 3
    with pytest.raises(CheckpointError, match="already finished"):
        run_fake(cfg, tmp_path / "resumed", resume=True)


def test_a_deployment_resume_that_cannot_be_honoured_is_refused(tmp_path: Path) -> None:
    cfg = tiny("scheduler.rounds=1")
    with pytest.raises(CheckpointError, match=r"no config\.toml"):
        run_fake(cfg, tmp_path / "nothing", resume=True)
    done, _ = run_fake(cfg, tmp_path / "run")
    with pytest.raises(DeployError, match="differs"):
        run_fake(tiny("scheduler.rounds=2"), done.run_dir, resume=True)
    ef21 = tiny("scheduler.rounds=1", "compression.codec=topk", "compression.feedback=ef21")
    (done.run_dir / "config.toml").write_text(to_toml(ef21))
    with pytest.raises(ConfigError, match=r"compression\.feedback"):
        run_fake(ef21, done.run_dir, resume=True)


ASYNC_SCHEDULERS = pytest.mark.parametrize(
    "scheduler",
    [
        ["scheduler.name=fedbuff", "scheduler.concurrency=4", "scheduler.fedbuff.buffer_size=2"],
        ["scheduler.name=fedcompass", "scheduler.fedcompass.q_min=1", "scheduler.fedcompass.q_max=2"],
    ],
    ids=["fedbuff", "fedcompass"],
)
"""FedBuff and FedCompass, small enough for the tiny fleet."""


@ASYNC_SCHEDULERS
def test_asynchronous_schedulers_run_over_flower_with_staleness_recorded(
    tmp_path: Path, scheduler: list[str]
) -> None:
    """Each dispatched task is a message; a reply is an arrival when pulled. A malformed reply is
    dropped and its device offered work again; staleness is recorded as in simulation."""
    cfg = tiny(*scheduler, "scheduler.rounds=4", "scheduler.max_updates=8", "train.local_steps=2")
    bad = {"left": 1}

    def one_malformed(reply: Message) -> Message:
        if reply.metadata.message_type == MessageType.TRAIN and bad["left"]:
            bad["left"] -= 1
            del reply.content.config_records["update"]
        return reply

    flower, _ = run_fake(cfg, tmp_path / "flower", one_malformed)
    summary = flower.summary
    assert summary.executor == "flower" and summary.scheduler == cfg.scheduler.name
    assert summary.updates is not None
    assert summary.tasks["dropped"] == 1 and summary.tasks["ok"] >= summary.updates["applied"] > 0
    events = [json.loads(line) for line in (flower.run_dir / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "server_step"]
    assert 0 < len(steps) <= 4 and [e["round"] for e in steps] == list(range(1, len(steps) + 1))
    assert any(tau > 0 for e in steps for tau in e["staleness"])  # updates built on an older version
    dropped = [e for e in events if e["event"] == "task" and e["status"] == "dropped"]
    assert "malformed update" in dropped[0]["reason"]
    rounds = list(csv.DictReader((flower.run_dir / "rounds.csv").open()))
    assert rounds and all(r["max_staleness"] != "" for r in rounds)
    for e in (e for e in events if e["event"] == "task" and e["status"] == "ok"):  # measured times
        assert e["compute_seconds"] >= e["train_seconds"] > 0 and e["uplink_bytes"] > 0


@ASYNC_SCHEDULERS
def test_an_asynchronous_deployment_killed_after_a_checkpoint_resumes_with_its_tasks_out_dropped(
    tmp_path: Path, scheduler: list[str]
) -> None:
    """The ServerApp of an asynchronous run dies after its first server step's checkpoint. Started
    again with ``resume = true``, it continues from that checkpoint: the tasks that were out went to
    the dead server, so they end as ``dropped`` (with the reason) and their devices get new work
    (replies already pulled, queued in the checkpoint, still arrive); the run then takes all its
    server steps, each update applied once."""
    cfg = tiny(
        *scheduler,
        "scheduler.rounds=4",
        "scheduler.max_updates=8",
        "train.local_steps=2",
        "run.checkpoint_every=1",
    )
    out = tmp_path / "run"

    def die_after_first_checkpoint(reply: Message) -> Message:
        if (out / "checkpoints" / "round-000001").is_dir():
            raise ServerKilled
        return reply

    with pytest.raises(ServerKilled):
        run_fake(cfg, out, die_after_first_checkpoint)
    resumed, _ = run_fake(cfg, out, resume=True)
    assert resumed.summary.updates is not None
    applied_count = resumed.summary.updates["applied"]
    assert 4 <= applied_count <= 8  # four server steps (FedBuff: of two updates each)
    assert [int(r["round"]) for r in csv.DictReader((out / "rounds.csv").open())] == [1, 2, 3, 4]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    restarted = [e for e in events if e["event"] == "task" and "server restarted" in e.get("reason", "")]
    assert restarted and all(e["status"] == "dropped" and e["uplink_bytes"] == 0 for e in restarted)
    applied = [t for e in events if e["event"] == "server_step" for t in e["task_ids"]]
    assert len(applied) == len(set(applied)) == applied_count
    assert not {e["task_id"] for e in restarted} & set(applied)


# --- the deploy CLI ---------------------------------------------------------------------------------


def test_deploy_commands_write_certificates_keys_app_and_connection(tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(
        cli, ["deploy", "certs", str(tmp_path / "certs"), "--host", "localhost", "--host", "10.0.0.5"]
    )
    assert done.exit_code == 0, done.output
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert stat.S_IMODE(os.stat(tmp_path / "certs" / "server.key").st_mode) == 0o600

    done = runner.invoke(cli, ["deploy", "keys", str(tmp_path / "keys"), "--nodes", "3"])
    assert done.exit_code == 0, done.output
    for i in range(3):
        private = load_ssh_private_key((tmp_path / "keys" / f"node{i}").read_bytes(), None)
        public = load_ssh_public_key((tmp_path / "keys" / f"node{i}.pub").read_bytes())
        assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]

    args = ["deploy", "app", str(tmp_path / "app"), "--records", str(tmp_path / "run"), "-c", str(TINY)]
    done = runner.invoke(cli, [*args, "--set", "scheduler.rounds=7"])
    assert done.exit_code == 0, done.output
    project = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    app_config = project["tool"]["flwr"]["app"]["config"]
    # the nodes bring their own data: the app fixes the label set the server's data source has
    genres = sorted({"law", "history", "wisdom", "prophets", "gospels", "epistles"})
    expected = load_config(TINY, ["scheduler.rounds=7", f"data.labels={genres}"])
    assert config_from_run(app_config)[0] == expected and app_config[DATA_KEY] == "local"
    assert app_config[OUT_KEY] == str((tmp_path / "run").resolve())
    shared = runner.invoke(cli, ["deploy", "app", str(tmp_path / "app2"), *args[3:], "--shared-data"])
    assert shared.exit_code == 0, shared.output
    app2 = tomllib.loads((tmp_path / "app2" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config_from_run(app2)[0] == load_config(TINY) and app2[DATA_KEY] == "shared"
    bad = runner.invoke(cli, [*args, "--set", "scheduler.roundz=7"])
    assert bad.exit_code == 2 and "scheduler.roundz" in bad.output

    ca = tmp_path / "certs" / "ca.crt"
    done = runner.invoke(
        cli,
        ["deploy", "connection", str(tmp_path / "home"), "--address", "h:1", "--root-certificates", str(ca)],
    )
    assert done.exit_code == 0, done.output
    flwr_config = tomllib.loads((tmp_path / "home" / "config.toml").read_text())
    assert flwr_config["superlink"]["default"] == "fedspine"
    assert flwr_config["superlink"]["fedspine"] == {"address": "h:1", "root-certificates": str(ca.resolve())}


def test_key_files_are_created_never_overwritten_or_followed_and_the_ca_key_is_kept_apart(
    tmp_path: Path,
) -> None:
    runner = CliRunner()
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "node0").write_text("old")
    (keys / "node0").chmod(0o644)  # a world-readable leftover
    target = tmp_path / "elsewhere"
    target.write_text("do not touch")
    (keys / "node1").symlink_to(target)

    refused = runner.invoke(cli, ["deploy", "keys", str(keys), "--nodes", "2"])
    assert refused.exit_code == 1 and "--force" in refused.output
    assert (keys / "node0").read_text() == "old" and not (keys / "node0.pub").exists()  # nothing written

    done = runner.invoke(cli, ["deploy", "keys", str(keys), "--nodes", "2", "--force"])
    assert done.exit_code == 0, done.output
    for name in ("node0", "node1"):
        assert not (keys / name).is_symlink()
        assert stat.S_IMODE(os.stat(keys / name).st_mode) == 0o600
        load_ssh_private_key((keys / name).read_bytes(), None)
    assert target.read_text() == "do not touch"  # the link was replaced, its target never written

    certs = tmp_path / "certs"
    done = runner.invoke(cli, ["deploy", "certs", str(certs)])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in certs.iterdir()) == ["ca.crt", "server.key", "server.pem"]  # no ca.key
    ca = (certs / "ca.crt").read_bytes()
    again = runner.invoke(cli, ["deploy", "certs", str(certs)])
    assert again.exit_code == 1 and "--force" in again.output and (certs / "ca.crt").read_bytes() == ca
    inside = runner.invoke(cli, ["deploy", "certs", str(certs), "--force", "--ca-key", str(certs / "ca.key")])
    assert inside.exit_code == 1 and "keep the CA key out" in inside.output
    kept = tmp_path / "private" / "ca.key"
    done = runner.invoke(cli, ["deploy", "certs", str(certs), "--force", "--ca-key", str(kept)])
    assert done.exit_code == 0 and (certs / "ca.crt").read_bytes() != ca
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600


def test_an_insecure_connection_must_be_asked_for(tmp_path: Path) -> None:
    runner = CliRunner()
    home = tmp_path / "home"
    neither = runner.invoke(cli, ["deploy", "connection", str(home), "--address", "h:1"])
    assert neither.exit_code == 1 and "--insecure" in neither.output
    assert not (home / "config.toml").exists()
    done = runner.invoke(cli, ["deploy", "connection", str(home), "--address", "h:1", "--insecure"])
    assert done.exit_code == 0, done.output
    assert tomllib.loads((home / "config.toml").read_text())["superlink"]["fedspine"] == {
        "address": "h:1",
        "insecure": True,
    }


@pytest.mark.parametrize(
    "args",
    [
        ["--control", "nonsense"],
        ["--control", "127.0.0.1:0"],
        ["--control", "127.0.0.1:70000"],
        ["--control", "127.0.0.1:9093", "--insecure", "--host", "127.0.0.1", "--port", "9093"],
    ],
    ids=["no-port", "port-0", "port-too-large", "same-as-public"],
)
def test_a_bad_control_address_is_one_line_and_starts_nothing(args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["deploy", "superlink", *args])
    assert result.exit_code == 2 and result.output.startswith("error:"), result.output
    assert "--control" in result.output and "Traceback" not in result.output


# --- a real deployment on loopback --------------------------------------------------------------------

DEPLOY = [
    "scheduler.clients_per_round=2",
    'fleet.groups=[{device_class = "jetson_orin_nano", count = 2, network = "wifi"}]',
    "eval.at_start=true",
]


THREE_NODES = [
    'fleet.groups=[{device_class = "jetson_orin_nano", count = 3, network = "wifi"}]',
    "scheduler.clients_per_round=3",
    "scheduler.rounds=2",
    "eval.at_start=true",
    "eval.mode=both",
]


@pytest.fixture(scope="module")
def loopback(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A TLS SuperLink with node authentication and three registered SuperNodes (devices 0, 1, 2; the
    two-device fleets leave device 2's node out), each with its own data file (:func:`write_node_files`:
    device 2's is malformed), which runs with ``node-data = "shared"`` do not read; node 1 hands its
    messages to a warm worker (``fedspine deploy worker``), the others answer in their own processes."""
    dep = Loopback(tmp_path_factory.mktemp("loopback"))
    try:
        dep.start_superlink()
        pairs = dep.keys(["node0", "node1", "node2", "rogue"])
        for _, public in pairs[:3]:
            dep.register(public)
        files = write_node_files(dep.root)  # each node's own data (device 2's is broken)
        dep.start_worker("worker1", dep.root / "worker1.sock")  # node 1 answers through a warm worker
        for i, (private, _) in enumerate(pairs[:3]):
            worker = str(dep.root / "worker1.sock") if i == 1 else ""
            dep.start_supernode(f"node{i}", private, i, data_path=files[i], worker=worker)
        dep.wait_connected(["node0", "node1", "node2"])
        dep.rogue_key = pairs[3][0]  # type: ignore[attr-defined]
        yield dep
    finally:
        pids = [p.pid for p in dep.procs.values()]
        dep.close()
        assert not [pid for pid in pids if alive(pid)], "a deployment process outlived the test"


def _flower_run(dep: Loopback, cfg: Config, name: str) -> Path:
    out = dep.root / name
    write_app(dep.root / f"{name}-app", cfg, out, round_timeout=300, wait_for_nodes=60, shared_data=True)
    done = dep.run_app(dep.root / f"{name}-app")
    assert done.returncode == 0, done.stdout + done.stderr
    # `flwr run` exits 0 even when the ServerApp fails: the records are what shows success
    assert (out / "summary.json").exists(), done.stdout + done.stderr
    return out


def test_two_rounds_over_tls_with_authenticated_supernodes(loopback: Loopback, tmp_path: Path) -> None:
    out = _flower_run(loopback, tiny("scheduler.rounds=2", *DEPLOY), "two-rounds")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["executor"] == "flower" and summary["tasks"]["ok"] == 4
    evaluations = summary["evaluations"]
    assert [e["round"] for e in evaluations] == [0, 1, 2]
    assert evaluations[-1]["loss"] != evaluations[0]["loss"]  # the global model changed
    adapter = load_global_adapter(out)
    assert sum(float(f["B"].norm()) for f in adapter.values()) > 0  # LoRA B starts at zero
    for name in ("events.jsonl", "rounds.csv", "report.html", "config.toml"):
        assert (out / name).exists()
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    tasks = [e for e in events if e["event"] == "task"]
    assert len(tasks) == 4 and all(e["status"] == "ok" for e in tasks)
    for e in tasks:  # wall-clock breakdown, measured
        assert e["downlink_seconds"] > 0 and e["compute_seconds"] >= e["train_seconds"] > 0
        assert e["uplink_seconds"] >= 0 and e["uplink_bytes"] > 0
        assert math.isclose(
            e["virtual_end"] - e["virtual_start"],
            e["downlink_seconds"] + e["compute_seconds"] + e["uplink_seconds"],
            rel_tol=1e-6,
        )


def test_three_supernodes_train_on_their_own_files_and_evaluate_on_them(loopback: Loopback) -> None:
    """Each node reads its own JSONL (different label mixes); the server records every device's
    evaluation; the node whose file is malformed has its tasks dropped with the reason, and the run
    finishes; every device with data saves its final model on its node, measured, and the server's
    manifest lists what each holds."""
    cfg = tiny(*THREE_NODES, "export.save=true", "export.speed=true", "export.generate_tokens=4")
    out = loopback.root / "node-data"
    write_app(loopback.root / "node-data-app", cfg, out, round_timeout=300, wait_for_nodes=60)
    done = loopback.run_app(loopback.root / "node-data-app")
    assert (out / "summary.json").exists(), done.stdout + done.stderr + loopback.log("node2")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    data = next(e for e in events if e["event"] == "deployment")["data"]
    assert data["0"]["examples"] == data["1"]["examples"] == 32 and "device2.jsonl:2" in data["2"]["error"]
    tasks = [e for e in events if e["event"] == "task"]
    assert sorted((t["device_id"], t["status"]) for t in tasks) == [
        (0, "ok"), (0, "ok"), (1, "ok"), (1, "ok"), (2, "dropped"), (2, "dropped"),
    ]  # fmt: skip
    assert all("invalid JSON" in t["reason"] for t in tasks if t["device_id"] == 2)
    federated = [e for e in events if e["event"] == "federated_evaluation"]
    assert [e["round"] for e in federated] == [0, 1, 2]
    for record in federated:
        assert sorted(record["devices"]) == ["0", "1"] and record["count"] == 16
    # the devices see different label mixes, so the same global model scores differently on them
    first = federated[0]["devices"]
    assert first["0"]["loss"] != first["1"]["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["federated"]["devices"]) == ["0", "1"]
    manifest = json.loads((out / "models" / "manifest.json").read_text())
    for device in (0, 1):
        held = manifest["devices"][str(device)]["on_device"]
        assert Path(held["dir"]).is_relative_to(loopback.root / "models" / f"node{device}")
        assert (Path(held["dir"]) / "config.json").is_file() and held["tokens_per_second"] > 0
        assert held["parameters"] == manifest["models"][0]["parameters"]
    assert "device refused" in manifest["devices"]["2"]["on_device"]["error"]


def test_one_flower_round_gives_the_simulators_global_state(loopback: Loopback, tmp_path: Path) -> None:
    cfg = tiny("scheduler.rounds=1", *DEPLOY)
    out = _flower_run(loopback, cfg, "parity")
    sim = run_experiment(cfg, tmp_path / "sim")
    assert_same_state(load_global_adapter(out), load_global_adapter(sim.run_dir))


@pytest.mark.slow
def test_a_killed_serverapp_restarted_with_resume_continues_from_its_checkpoint(
    loopback: Loopback, tmp_path: Path
) -> None:
    """SIGKILL the ServerApp process once round 1 is checkpointed, then ``flwr run`` the same app with
    ``resume=true``: the run finishes from round 2 on, with the simulator's global state (as an
    uninterrupted deployment has)."""
    cfg = tiny("scheduler.rounds=3", "run.checkpoint_every=1", *DEPLOY)
    out, app = loopback.root / "killed", loopback.root / "killed-app"
    write_app(app, cfg, out, round_timeout=300, wait_for_nodes=60, shared_data=True)
    first = loopback.start_app(app, "killed-run")
    checkpoint = out / "checkpoints" / "round-000001"
    deadline = time.time() + 300
    while not (checkpoint.is_dir() and checkpoints.verify(checkpoint) is None):
        assert time.time() < deadline and first.poll() is None, loopback.log("killed-run")
        time.sleep(0.2)
    servers = loopback.processes("flwr-serverapp")
    assert servers, "no ServerApp process found"
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    first.kill()
    first.wait(timeout=30)
    assert not (out / "summary.json").exists()

    # the nodes may still be training the killed run's round 2 (they run one task at a time)
    done = loopback.run_app(app, "resume=true", "wait-for-nodes=300.0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "summary.json").exists(), done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [e["round"] for e in summary["evaluations"]] == [0, 1, 2, 3]
    assert summary["tasks"]["ok"] == 6
    assert [r["round"] for r in csv.DictReader((out / "rounds.csv").open())] == ["1", "2", "3"]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "deployment" for e in events) == 2  # node discovery again on restart
    sim = run_experiment(cfg, tmp_path / "sim")
    assert_same_state(load_global_adapter(out), load_global_adapter(sim.run_dir))


@pytest.mark.slow
@pytest.mark.parametrize(
    "scheduler",
    [
        ["scheduler.name=fedbuff", "scheduler.concurrency=3", "scheduler.fedbuff.buffer_size=2"],
        ["scheduler.name=fedcompass", "scheduler.fedcompass.q_min=1", "scheduler.fedcompass.q_max=2"],
    ],
    ids=["fedbuff", "fedcompass"],
)
def test_asynchronous_schedulers_over_three_supernodes(
    loopback: Loopback, tmp_path: Path, scheduler: list[str]
) -> None:
    fleet = 'fleet.groups=[{device_class = "jetson_orin_nano", count = 3, network = "wifi"}]'
    cfg = tiny(*DEPLOY, fleet, *scheduler, "scheduler.rounds=3", "scheduler.max_updates=5")
    out = _flower_run(loopback, cfg, f"async-{cfg.scheduler.name}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["executor"] == "flower" and summary["updates"]["applied"] >= 3
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert len(next(e for e in events if e["event"] == "deployment")["nodes"]) == 3
    steps = [e for e in events if e["event"] == "server_step"]
    assert [e["round"] for e in steps] == list(range(1, len(steps) + 1)) and len(steps) <= 3
    assert all(len(e["staleness"]) == len(e["task_ids"]) for e in steps)
    assert {e["device_id"] for e in events if e["event"] == "task"} == {0, 1, 2}  # every node got work
    tasks = [e for e in events if e["event"] == "task" and e["status"] == "ok"]
    # node 1 answers through a warm worker, faster than the others: a speed-aware scheduler may fill
    # its few updates before a slow node's task is back, so not every node must be applied
    assert len({e["device_id"] for e in tasks}) >= 2
    assert all(e["compute_seconds"] >= e["train_seconds"] > 0 for e in tasks)


def test_a_supernode_whose_key_is_not_registered_is_refused(loopback: Loopback) -> None:
    proc = loopback.start_supernode("rogue", loopback.rogue_key, 0, max_wait_time=20)  # type: ignore[attr-defined]
    assert proc.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in loopback.log("rogue")
    assert "SuperNode ID" not in loopback.log("rogue")


def test_a_device_cannot_register_a_key_or_start_an_app(loopback: Loopback, tmp_path: Path) -> None:
    """What a device holds (the CA certificate, the SuperLink's public address) does not reach the
    Control API: registering a key, starting an app and listing runs are refused; the operator's
    control address still registers keys."""
    key = loopback.keys(["intruder"])[0][1]
    app = tmp_path / "app"
    cfg = tiny("scheduler.rounds=1", *DEPLOY)
    write_app(app, cfg, tmp_path / "records", round_timeout=60, wait_for_nodes=5)
    attempts = [
        ("supernode", "register", str(key), DEVICE_CONNECTION, "--format", "json"),
        ("run", str(app), DEVICE_CONNECTION, "--format", "json"),
        ("ls", DEVICE_CONNECTION, "--format", "json"),
    ]
    for args in attempts:
        done = loopback.flwr(*args)
        assert "403 Forbidden" in done.stdout + done.stderr, (args, done.stdout, done.stderr)
        assert '"success": false' in done.stdout, args  # (flwr exits 0 either way in json mode)
    assert not (tmp_path / "records").exists()  # no app ran
    assert loopback.log("superlink").count("refused POST '/v1/control/") >= len(attempts)
    assert loopback.register(key) > 0  # the operator, on the control address


SERVER_TASK = AcquireTaskRequest(supported_task_types=["flwr-serverapp"])
REFUSED = b"not served on the devices' address\n"


def runtime_routes() -> list[str]:
    """Every route of Flower's Runtime API (the SuperExec's and the ServerApps' API)."""
    return sorted({route.path for route in [*runtime_router.routes, *responses_router.routes]})  # type: ignore[attr-defined]


def test_a_device_cannot_reach_the_runtime_api(loopback: Loopback) -> None:
    """The SuperLink as docs/deploy.md starts it: a client with what a device holds (``ca.crt``, the
    devices' address), no key and no token, gets 403 and nothing else from every Runtime API route
    (``acquire-task`` handed out a run's server task: its app, records path and node ids), by any
    method, and from paths written around the check; the operator's address answers the same request
    (the refusal is the address's, not a malformed request's), and the devices' Fleet API still works
    (the fixture's SuperNodes connected through it)."""
    routes = runtime_routes()
    assert "/v1/runtime/acquire-task" in routes and len(routes) >= 20
    around = [
        "/v1/fleet/../runtime/acquire-task",
        "/v1/fleet/%2e%2e/runtime/acquire-task",
        "//v1/runtime/acquire-task",
        "/v1/fleet//../../v1/runtime/acquire-task",
        "/v1/runtime/acquire-task/",
        "/docs",
        "/openapi.json",
    ]
    for path in [*routes, *around]:
        for method in ("POST", "GET"):
            answer = loopback.https(loopback.port, method, path, SERVER_TASK.SerializeToString())
            assert answer == (403, REFUSED), (method, path, answer)
    with pytest.raises(httpx.HTTPStatusError, match="403"):
        loopback.runtime_client(loopback.port).AcquireTask(SERVER_TASK)
    assert loopback.https(loopback.port, "GET", "/health")[0] == 200
    # on the operator's address the same client is answered (no task type: nothing is claimed)
    assert (
        not loopback.runtime_client(loopback.control_port).AcquireTask(AcquireTaskRequest()).HasField("task")
    )
    assert loopback.log("superlink").count("refused POST '/v1/runtime/acquire-task' on the devices'") >= 2
    # the SuperLink's SuperExec (the SuperNodes run their own) reaches the Runtime API on the control address
    superlink = loopback.procs["superlink"].pid
    commands = []
    for pid in descendants(superlink):
        with contextlib.suppress(OSError):  # a helper that has just exited
            commands.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))
    superexecs = [c for c in commands if any(part.endswith(b"flower-superexec") for part in c[:2])]
    assert superexecs and all(
        c[c.index(b"--runtime-api-address") + 1] == f"127.0.0.1:{loopback.control_port}".encode()
        for c in superexecs
    ), superexecs


def test_a_waiting_server_task_is_handed_out_only_on_the_control_address(tmp_path: Path) -> None:
    """With no SuperExec (``--isolation process``) a started run's server task waits to be claimed, as
    it does for a moment in every deployment: however often a client asks on the devices' address, it
    is refused; on the control address (where an operator's own ``flower-superexec`` connects) the
    same request gets the task, whose app names the records path (what the attack took)."""
    with Loopback(tmp_path) as dep:
        dep.start_superlink("--isolation", "process")
        app, records = tmp_path / "app", tmp_path / "records"
        write_app(app, tiny("scheduler.rounds=1", *DEPLOY), records, wait_for_nodes=5, shared_data=True)
        started = dep.flwr("run", str(app), CONNECTION, "--format", "json")
        run_id = int(json.loads(started.stdout)["run-id"])
        attacker = dep.runtime_client(dep.port)
        for _ in range(10):
            with pytest.raises(httpx.HTTPStatusError, match="403"):
                attacker.AcquireTask(SERVER_TASK)
        claimed = dep.runtime_client(dep.control_port).AcquireTask(SERVER_TASK)
        assert claimed.task.run_id == run_id and claimed.token  # it was there to be taken
        given = dep.runtime_client(dep.control_port, claimed.token).PullTaskInput(PullTaskInputRequest())
        with zipfile.ZipFile(io.BytesIO(given.fab.content)) as fab:
            assert str(records.resolve()) in fab.read("pyproject.toml").decode()
        assert not records.exists()
