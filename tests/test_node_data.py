"""Deployed devices with their own data: each node reads its file (the server never does), refuses its
tasks when the file is bad, and evaluates the global model on a held-out slice of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedspine.client.evaluate import Evaluation
from fedspine.client.objectives import ClassificationObjective
from fedspine.data import BIBLE_GENRES
from fedspine.deploy.records import evaluation_record, read_evaluation, refusal_reason
from fedspine.deploy.server import declared_data
from fedspine.errors import ConfigError, DataError, DeployError
from fedspine.metrics.records import read_events
from tests.deployment import write_node_files
from tests.test_deploy import run_fake, tiny

GENRES = sorted(BIBLE_GENRES)
THREE = [
    'fleet.groups=[{device_class = "jetson_orin_nano", count = 3, network = "wifi"}]',
    "scheduler.clients_per_round=3",
    "scheduler.rounds=2",
    "eval.mode=both",
    f"data.labels={GENRES}",
]


def test_nodes_train_on_their_own_files_and_a_broken_file_drops_only_its_tasks(tmp_path: Path) -> None:
    paths = write_node_files(tmp_path)
    result, _ = run_fake(tiny(*THREE), tmp_path / "run", data_paths=paths)
    events = read_events(tmp_path / "run")

    deployment = next(e for e in events if e["event"] == "deployment")
    held = 8  # round(0.2 * 40)
    for device in (0, 1):
        assert deployment["data"][str(device)] == {"examples": 40 - held, "eval_examples": held, "error": ""}
    assert "device2.jsonl:2" in deployment["data"]["2"]["error"]  # the file and line the node names

    tasks = [e for e in events if e["event"] == "task"]
    assert len(tasks) == 6  # 3 devices x 2 rounds
    for task in tasks:
        if task["device_id"] == 2:
            assert task["status"] == "dropped"
            assert task["reason"].startswith("device refused:") and "invalid JSON" in task["reason"]
        else:
            assert task["status"] == "ok"
            # the cost model's prediction for the device's class and link, beside the measured times
            assert task["predicted_train_seconds"] > 0 and task["predicted_uplink_seconds"] > 0
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Cost model vs measured" in report and "Federated evaluation" in report

    federated = [e for e in events if e["event"] == "federated_evaluation"]
    assert [e["round"] for e in federated] == [1, 2]  # (no evaluation at the start here)
    for record in federated:
        assert set(record["devices"]) == {"0", "1"}  # a node whose data is unusable is not asked
        assert all(d["count"] == held for d in record["devices"].values())
        assert record["failed"] == {}
    assert result.summary.federated is not None
    assert set(result.summary.federated["devices"]) == {"0", "1"}
    assert result.summary.tasks["ok"] == 4 and result.summary.tasks["dropped"] == 2
    by_device = {d["device_id"]: d for d in result.summary.devices}
    assert by_device[0]["train_examples"] == 32 and by_device[2]["train_examples"] == 0


def test_a_node_without_a_data_path_refuses_its_tasks_and_the_run_goes_on(tmp_path: Path) -> None:
    paths = write_node_files(tmp_path)
    del paths[2]
    result, _ = run_fake(tiny(*THREE), tmp_path / "run", data_paths=paths)
    tasks = [e for e in read_events(tmp_path / "run") if e["event"] == "task" and e["device_id"] == 2]
    assert tasks and all("names no 'data-path'" in t["reason"] for t in tasks)
    assert result.summary.tasks["ok"] == 4


def test_a_label_the_run_does_not_know_is_a_data_error_of_that_node(tmp_path: Path) -> None:
    paths = write_node_files(tmp_path)
    Path(paths[2]).write_text('{"text": "Hello there", "label": "poetry"}\n{"text": "Hi", "label": "law"}\n')
    run_fake(tiny(*THREE), tmp_path / "run", data_paths=paths)
    deployment = next(e for e in read_events(tmp_path / "run") if e["event"] == "deployment")
    assert "['poetry']" in deployment["data"]["2"]["error"]


def test_local_data_needs_the_runs_labels_before_anything_starts(tmp_path: Path) -> None:
    paths = write_node_files(tmp_path)
    cfg = tiny(*[o for o in THREE if not o.startswith("data.labels")])
    with pytest.raises(ConfigError, match=r"data\.labels"):
        run_fake(cfg, tmp_path / "run", data_paths=paths)
    assert not (tmp_path / "run").exists()


def test_an_evaluation_that_lies_is_left_out_with_the_reason(tmp_path: Path) -> None:
    paths = write_node_files(tmp_path)

    def inflate(reply: Message) -> Message:
        if "evaluation" in reply.content.config_records and reply.metadata.src_node_id == 1:
            record = reply.content.config_records["evaluation"]
            record["correct"] = int(record["count"]) + 5  # more right answers than examples
        return reply

    result, _ = run_fake(tiny(*THREE), tmp_path / "run", grid_hook=inflate, data_paths=paths)
    federated = [e for e in read_events(tmp_path / "run") if e["event"] == "federated_evaluation"]
    for record in federated:
        assert set(record["devices"]) == {"1"}  # device 0 (node 1) lied; device 2 has no usable data
        assert "evaluation.correct" in record["failed"]["0"]
    assert result.summary.federated is not None and set(result.summary.federated["devices"]) == {"1"}


def test_evaluation_records_are_checked_and_the_metric_is_the_servers() -> None:
    objective = ClassificationObjective([1, 2])
    sound = evaluation_record(3, 1, Evaluation("accuracy", 0.99, 1.5, 10, correct=4))
    got = read_evaluation(sound, 3, 1, 10, objective)
    assert got.metric == pytest.approx(0.4) and got.count == 10 and got.correct == 4  # not the 0.99 sent
    for key, value, match in (
        ("round", 4, "evaluation.round"),
        ("device_id", 2, "evaluation.device_id"),
        ("count", 11, "outside 1..10"),
        ("count", 0, "outside 1..10"),
        ("correct", -1, "evaluation.correct"),
        ("loss", float("nan"), "evaluation.loss"),
        ("loss", "1.0", "must be a number"),
    ):
        bad = evaluation_record(3, 1, Evaluation("accuracy", 0.4, 1.5, 10, correct=4))
        bad.config_records["evaluation"][key] = value
        with pytest.raises(DeployError, match=match):
            read_evaluation(bad, 3, 1, 10, objective)
    with pytest.raises(DeployError, match="no 'evaluation'"):
        read_evaluation(RecordDict(), 3, 1, 10, objective)
    refusal = RecordDict({"refusal": ConfigRecord({"reason": "bad\x1b[31m file" + "x" * 900})})
    reason = refusal_reason(refusal)
    assert reason is not None and "\x1b" not in reason and len(reason) == 500


def test_declared_counts_are_checked() -> None:
    declared = declared_data(
        {
            0: ConfigRecord({"device_id": 0, "examples": 30, "eval_examples": 8}),
            1: ConfigRecord({"device_id": 1, "examples": -3, "eval_examples": 8}),
            2: ConfigRecord({"device_id": 2, "examples": 10**12, "eval_examples": 0}),
            3: ConfigRecord({"device_id": 3, "data_error": "no file"}),
            4: ConfigRecord({"device_id": 4}),
        }
    )
    assert (declared[0].examples, declared[0].eval_examples, declared[0].error) == (30, 8, "")
    for device in (1, 2, 4):
        assert declared[device].examples == 0 and "malformed" in declared[device].error
    assert declared[3].error == "no file"


def test_node_files_are_read_as_the_run_labels_them(tmp_path: Path) -> None:
    from fedspine.runtime.experiment import load_node_examples

    cfg = tiny(f"data.labels={GENRES}")
    by_key = tmp_path / "node.csv"
    by_key.write_text("text,genre\nIn the beginning,law\nBlessed are the meek,gospels\n")
    assert [ex.label for ex in load_node_examples(cfg, by_key)] == ["law", "gospels"]
    for name, text, match in (
        ("node.txt", "x", "must be a .jsonl or .csv"),
        ("missing.jsonl", None, "not found"),
        ("nolabel.jsonl", '{"text": "a"}\n', "example 1 has no label"),
    ):
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(DataError, match=match):
            load_node_examples(cfg, path)
    with pytest.raises(ConfigError, match=r"data\.labels"):
        load_node_examples(tiny(), by_key)


@pytest.mark.parametrize("strategy", ["fedit", "fedspine"])
def test_every_device_leaves_with_its_model_saved_and_measured_on_its_node(
    tmp_path: Path, strategy: str
) -> None:
    from transformers import AutoModelForCausalLM

    paths = write_node_files(tmp_path)
    saving = [
        "export.save=true",
        "export.speed=true",
        "export.generate_tokens=4",
        f"strategy.name={strategy}",
    ]
    cfg = tiny(*THREE, *saving)
    nodes = tmp_path / "nodes"
    result, _ = run_fake(cfg, tmp_path / "run", data_paths=paths, model_root=str(nodes))
    manifest = json.loads((tmp_path / "run" / "models" / "manifest.json").read_text())
    parameters = {m["dir"]: m["parameters"] for m in manifest["models"]}
    for device in (0, 1):
        entry = manifest["devices"][str(device)]
        held = entry["on_device"]
        saved = Path(held["dir"])
        assert saved.is_relative_to(nodes / f"node{device}") and (saved / "config.json").is_file()
        assert held["parameters"] == parameters[entry["model"]] and held["tokens_per_second"] > 0
        model = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True)
        assert sum(p.numel() for p in model.parameters()) == held["parameters"]
    assert "device refused" in manifest["devices"]["2"]["on_device"]["error"]
    assert result.summary.device_models is not None
    assert result.summary.device_models["devices"]["0"]["on_device"]["parameters"] > 0


def test_a_device_reporting_another_model_is_recorded_as_an_error(tmp_path: Path) -> None:
    paths = write_node_files(tmp_path)

    def shrink(reply: Message) -> Message:
        if "model" in reply.content.config_records:
            record = reply.content.config_records["model"]
            record["parameters"] = int(record["parameters"]) - 1
        return reply

    run_fake(
        tiny(*THREE), tmp_path / "run", grid_hook=shrink, data_paths=paths, model_root=str(tmp_path / "n")
    )
    manifest = json.loads((tmp_path / "run" / "models" / "manifest.json").read_text())
    for device in (0, 1):
        assert "parameters" in manifest["devices"][str(device)]["on_device"]["error"]


def test_a_warm_worker_answers_for_its_nodes_with_the_same_results(tmp_path: Path) -> None:
    """Nodes that name a worker hand it their messages: the model is built once in it, the run's global
    state equals that of nodes answering in their own processes, and error-feedback state travels."""
    import threading

    import torch

    from fedspine.api import load_global_adapter
    from fedspine.deploy.worker import Worker, call, key_path

    paths = write_node_files(tmp_path)
    cfg = tiny(*THREE, "compression.codec=topk", "compression.feedback=ef")
    socket = tmp_path / "w.sock"
    worker = Worker(socket)
    assert (
        oct(socket.stat().st_mode & 0o777) == "0o600"
        and oct(key_path(socket).stat().st_mode & 0o777) == "0o600"
    )
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        warm, grid = run_fake(
            cfg, tmp_path / "warm", data_paths=paths, workers={0: str(socket), 1: str(socket)}
        )
    finally:
        worker.stop()
        thread.join(timeout=30)
    assert not thread.is_alive() and not socket.exists() and not key_path(socket).exists()
    cold, _ = run_fake(cfg, tmp_path / "cold", data_paths=paths)
    assert worker.handled >= 2 * 2 + 2  # queries, tasks (2 rounds) and final models of devices 0 and 1
    warm_state, cold_state = load_global_adapter(warm.run_dir), load_global_adapter(cold.run_dir)
    for module in cold_state:
        for name in ("A", "B"):
            torch.testing.assert_close(warm_state[module][name], cold_state[module][name])
    assert "fedspine.ef.error" in grid.contexts[1].state.array_records  # the feedback memory came back
    with pytest.raises(DeployError, match="cannot be reached"):
        call(str(socket), "query", RecordDict(), grid.contexts[1])


def test_a_worker_refuses_a_connection_without_its_key(tmp_path: Path) -> None:
    import threading
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    from fedspine.deploy.worker import Worker

    socket = tmp_path / "w.sock"
    worker = Worker(socket)
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        with (
            pytest.raises((AuthenticationError, EOFError, OSError)),
            Client(str(socket), "AF_UNIX", authkey=b"x" * 32) as c,
        ):
            c.send(("query", RecordDict(), None))
            c.recv()
        assert worker.handled == 0
        with pytest.raises(DeployError, match="exists"):
            Worker(socket)
    finally:
        worker.stop()
        thread.join(timeout=30)


@pytest.mark.parametrize(
    ("strategy", "method"),
    [("fedit", "split"), ("fedspine", "finetune"), ("fedspine", "mask"), ("fedspine", "clustered")],
)
def test_deployed_devices_build_their_personal_models_on_their_own_data(
    tmp_path: Path, strategy: str, method: str
) -> None:
    """Each node builds its personal model from its own file (a split node's private adapter lives in
    its state across rounds), saves it as its model and reports it beside the global model; the server
    checks the counts and computes the metrics."""
    from transformers import AutoModelForCausalLM

    paths = write_node_files(tmp_path)
    cfg = tiny(*THREE, f"strategy.name={strategy}", f"personalize.method={method}", "export.save=true")
    nodes = tmp_path / "nodes"
    result, grid = run_fake(cfg, tmp_path / "run", data_paths=paths, model_root=str(nodes))
    personal = result.summary.personal
    assert personal is not None and personal["method"] == method
    assert set(personal["devices"]) == {"0", "1"}  # device 2's data is unusable: it has no model
    [event] = [e for e in read_events(tmp_path / "run") if e["event"] == "personal_evaluation"]
    for device in ("0", "1"):
        said = event["devices"][device]
        assert said["count"] == 8 and said["loss"] != said["global_loss"] and said["extra_seconds"] > 0
    manifest = json.loads((tmp_path / "run" / "models" / "manifest.json").read_text())
    parameters = {m["dir"]: m["parameters"] for m in manifest["models"]}
    for device in (0, 1):
        entry = manifest["devices"][str(device)]
        held = entry["on_device"]
        assert held["personal"]["value"] == personal["devices"][str(device)]
        model = AutoModelForCausalLM.from_pretrained(held["dir"], trust_remote_code=True)
        assert sum(p.numel() for p in model.parameters()) == parameters[entry["model"]]
    if method == "clustered":  # the cluster adapters travel: down with every task, the chosen one up
        tasks = [e for e in read_events(tmp_path / "run") if e["event"] == "task" and e["status"] == "ok"]
        assert tasks and all(t["cluster"] in (0, 1) and t["cluster_uplink_bytes"] > 0 for t in tasks)
        assert personal["extra_uplink_bytes"] == sum(t["cluster_uplink_bytes"] for t in tasks)
    if method == "split":  # the private adapter is node state, never a message
        kept = {node - 1 for node, c in grid.contexts.items() if "fedspine.private" in c.state.array_records}
        assert kept == {0, 1}  # device 2 never trained


def test_a_personal_report_that_lies_is_left_out_and_the_model_is_kept(tmp_path: Path) -> None:
    paths = write_node_files(tmp_path)

    def inflate(reply: Message) -> Message:
        if "personal" in reply.content.config_records:
            record = reply.content.config_records["personal"]
            record["correct"] = int(record["count"]) + 1
        return reply

    cfg = tiny(*THREE, "personalize.method=finetune")
    result, _ = run_fake(
        cfg, tmp_path / "run", grid_hook=inflate, data_paths=paths, model_root=str(tmp_path / "n")
    )
    assert result.summary.personal is None  # no device's personal report passed the checks
    manifest = json.loads((tmp_path / "run" / "models" / "manifest.json").read_text())
    for device in (0, 1):
        held = manifest["devices"][str(device)]["on_device"]
        assert "outside 0..8" in held["personal_error"] and held["parameters"] > 0


def test_a_cluster_adapter_the_server_cannot_place_is_rejected_and_changes_nothing(tmp_path: Path) -> None:
    paths = write_node_files(tmp_path)

    def elsewhere(reply: Message) -> Message:
        if (
            "update" in reply.content.config_records
            and reply.content.config_records["update"]["device_id"] == 0
        ):
            reply.content.config_records["update"]["cluster"] = 7
        return reply

    cfg = tiny(*THREE, "personalize.method=clustered")
    run_fake(cfg, tmp_path / "run", grid_hook=elsewhere, data_paths=paths, model_root=str(tmp_path / "n"))
    tasks = [e for e in read_events(tmp_path / "run") if e["event"] == "task"]
    for task in tasks:
        if task["device_id"] == 0:
            assert task["status"] == "rejected" and "cluster 7 outside 0..1" in task["reason"]
        elif task["device_id"] == 1:
            assert task["status"] == "ok"


@pytest.mark.parametrize("strategy", ["fedit", "flora"])
def test_the_model_a_node_saves_is_the_servers_global_model(tmp_path: Path, strategy: str) -> None:
    """Not the node's own last adapter: FLoRA keeps no global adapter (its knowledge is in the merged
    base), so a node that merged whatever adapter it trained last would save its own update."""
    from safetensors.torch import load_file

    paths = write_node_files(tmp_path)
    cfg = tiny(*THREE, f"strategy.name={strategy}", "export.save=true")
    run_fake(cfg, tmp_path / "run", data_paths=paths, model_root=str(tmp_path / "nodes"))
    manifest = json.loads((tmp_path / "run" / "models" / "manifest.json").read_text())
    server = load_file(str(tmp_path / "run" / "models" / "dense" / "model.safetensors"))
    for device in (0, 1):
        node = load_file(
            str(Path(manifest["devices"][str(device)]["on_device"]["dir"]) / "model.safetensors")
        )
        assert node.keys() == server.keys()
        for key, value in server.items():
            torch.testing.assert_close(node[key], value, rtol=1e-5, atol=1e-6, msg=key)
