"""Personal models (``[personalize]``): every method runs with FedIT and FedSpine, is measured on each
device's own held-out data beside the global model, resumes exactly, and keeps private state private."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from fedspine.algorithms.clusters import ClusterAdapters
from fedspine.algorithms.validation import check_update
from fedspine.algorithms.wire import update_payload_bytes
from fedspine.api import run_experiment
from fedspine.cli import app
from fedspine.client.evaluate import evaluate
from fedspine.client.personal import PrivateAdapters
from fedspine.config import Config, load_config, to_toml
from fedspine.deploy.settings import CONFIG_KEY, config_from_run
from fedspine.errors import ConfigError
from fedspine.metrics.records import read_events as _all_events
from fedspine.model.footprint import ModelShape
from fedspine.model.pruning import LayerKeep
from fedspine.runtime.experiment import build_experiment, check_config
from fedspine.runtime.server import Server
from fedspine.runtime.tasks import TaskOutcome
from fedspine.types import ClientTask, ClientUpdate, DeviceLora
from tests.conftest import CONFIGS, run_and_resume_from_first_checkpoint
from tests.test_federated_eval import FAST as FEDERATED_FAST

FAST = [*FEDERATED_FAST, "eval.mode=both"]
METHODS = [
    (strategy, method)
    for strategy in ("fedit", "fedspine")
    for method in ("none", "finetune", "split", "clustered", "mask")
    if (strategy, method) != ("fedit", "mask")
]


def read_events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in _all_events(run_dir) if e["event"] == kind]


def _cli(out: Path, *overrides: str) -> dict[str, Any]:
    args = ["run", "--config", str(CONFIGS / "tiny.toml"), "--out", str(out)]
    args += [a for o in (*FAST, *overrides) for a in ("--set", o)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    summary["cli_output"] = result.output
    return summary


@pytest.mark.parametrize(("strategy", "method"), METHODS)
def test_each_method_runs_from_the_cli_and_is_measured_on_the_devices_own_data(
    tmp_path: Path, strategy: str, method: str
) -> None:
    out = tmp_path / "run"
    summary = _cli(out, f"strategy.name={strategy}", f"personalize.method={method}")
    personal = summary["personal"]
    assert personal["method"] == method and personal["metric"] == "accuracy"
    # the global model on the devices' slices is what the final federated evaluation measured
    assert personal["global_devices"] == summary["federated"]["devices"]
    assert set(personal["devices"]) == set(personal["global_devices"]) and len(personal["devices"]) >= 5
    values = list(personal["devices"].values())
    assert personal["value"] == pytest.approx(sum(values) / len(values))
    assert all(0.0 <= v <= 1.0 for v in values) and personal["worst_decile"] <= personal["value"]
    [event] = read_events(out, "personal_evaluation")
    devices = event["devices"]
    assert {d: e["value"] for d, e in devices.items()} == personal["devices"]
    assert personal["extra_device_seconds"] == pytest.approx(
        sum(e["extra_seconds"] for e in devices.values())
    )
    if method == "none":
        assert personal["devices"] == personal["global_devices"] and personal["extra_device_seconds"] == 0
    else:  # every device's model is its own: its loss on its own examples is not the global model's
        assert all(e["loss"] != e["global_loss"] for e in devices.values())
        assert all(e["extra_seconds"] > 0 for e in devices.values())
        assert personal["extra_time_fraction"] > 0
    assert "Personal models" in (out / "report.html").read_text()
    assert f"personal ({method})" in summary["cli_output"]  # the CLI's closing table shows it
    travelled = personal["extra_uplink_bytes"], personal["extra_downlink_bytes"]
    if method == "clustered":  # cluster adapters travel (both clusters go down, the chosen one comes up)
        tasks = [t for t in read_events(out, "task") if t["status"] == "ok"]
        assert travelled == (
            sum(t["cluster_uplink_bytes"] for t in tasks),
            sum(t["cluster_downlink_bytes"] for t in tasks),
        )
        assert 0 < travelled[0] < travelled[1] and {t["cluster"] for t in tasks} == {0, 1}
    else:
        assert travelled == (0, 0)


def test_finetune_is_charged_as_training_its_steps(tmp_path: Path) -> None:
    """More fine-tuning steps cost proportionally more device time, and move the personal models more."""
    short = _cli(tmp_path / "a", "personalize.method=finetune", "personalize.steps=2")["personal"]
    long = _cli(tmp_path / "b", "personalize.method=finetune", "personalize.steps=8")["personal"]
    assert long["global_devices"] == short["global_devices"]  # the same run up to personalization
    assert long["extra_device_seconds"] == pytest.approx(4 * short["extra_device_seconds"], rel=0.35)


def test_methods_that_personalize_after_training_leave_the_global_run_unchanged(tmp_path: Path) -> None:
    """What lets the personalization sweep drop its "none" arms: a mask run trains and records the
    global model a run without personalization does (finetune's global numbers not depending on its
    steps: test_finetune_is_charged_as_training_its_steps)."""
    plain = _cli(tmp_path / "a", "strategy.name=fedspine", "personalize.method=none")
    masked = _cli(tmp_path / "b", "strategy.name=fedspine", "personalize.method=mask")
    assert masked["personal"]["global_devices"] == plain["personal"]["global_devices"]

    def run_part(summary: dict[str, Any]) -> dict[str, Any]:
        varies = ("personal", "cli_output", "run_dir")
        return {k: v for k, v in summary.items() if k not in varies and "wall" not in k and "host" not in k}

    assert run_part(masked) == run_part(plain)


def _spy_on_updates(monkeypatch: pytest.MonkeyPatch) -> list[tuple[TaskOutcome, dict[str, Any]]]:
    """Every update the server receives, with its device's private adapter just after the task."""
    seen: list[tuple[TaskOutcome, dict[str, Any]]] = []
    validate = Server.validate

    def spy(self: Server, outcome: TaskOutcome) -> None:
        private = self.exp.trainer.private
        state = private.states.get(outcome.device.device_id, {}) if private is not None else {}
        seen.append((outcome, {m: {k: t.clone() for k, t in e.items()} for m, e in state.items()}))
        validate(self, outcome)

    monkeypatch.setattr(Server, "validate", spy)
    return seen


@pytest.mark.parametrize("strategy", ["fedit", "fedspine"])
def test_private_adapters_never_appear_in_uplink_payloads_or_byte_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    seen = _spy_on_updates(monkeypatch)
    # the private adapter has the shared one's rank, so only its values could give it away
    split = ["personalize.method=split", "personalize.rank=4", f"strategy.name={strategy}"]
    run_experiment(load_config(CONFIGS / "tiny.toml", [*FAST, *split]), tmp_path / "split")
    assert seen
    for outcome, private in seen:
        assert outcome.update is not None and outcome.task is not None and private
        sent = outcome.update.lora_state
        assert set(sent) == set(outcome.task.payload)  # the shared adapter's modules, nothing else
        for module, entry in sent.items():
            assert set(entry) <= {"A", "B", "scaling"}
            for key in ("A", "B"):
                assert entry[key].shape == outcome.task.payload[module][key].shape
                mine = private[module][key]
                assert not (entry[key].shape == mine.shape and torch.allclose(entry[key], mine))
        shared_only = {m: {k: outcome.task.payload[m][k] for k in ("A", "B")} for m in sent}
        assert outcome.uplink_bytes == update_payload_bytes(replace(outcome.update, lora_state=shared_only))
    if strategy == "fedit":  # the same tasks upload the same bytes with and without private adapters
        monkeypatch.undo()
        run_experiment(load_config(CONFIGS / "tiny.toml", [*FAST, "strategy.name=fedit"]), tmp_path / "none")
        tasks = [read_events(tmp_path / run, "task") for run in ("split", "none")]
        assert [t["uplink_bytes"] for t in tasks[0]] == [t["uplink_bytes"] for t in tasks[1]]
        assert all(t["uplink_bytes"] > 0 for t in tasks[0])


@pytest.mark.parametrize(
    ("strategy", "method"),
    [
        ("fedit", "none"),
        ("fedit", "split"),
        ("fedspine", "split"),
        ("fedspine", "mask"),
        ("fedit", "finetune"),
        ("fedspine", "finetune"),
        ("fedit", "clustered"),
        ("fedspine", "clustered"),
    ],
)
def test_a_personalized_run_resumes_to_the_same_records(tmp_path: Path, strategy: str, method: str) -> None:
    cfg = load_config(
        CONFIGS / "tiny.toml",
        [
            *FAST,
            "scheduler.rounds=3",
            "run.checkpoint_every=1",
            f"strategy.name={strategy}",
            f"personalize.method={method}",
        ],
    )
    whole, cut = run_and_resume_from_first_checkpoint(cfg, tmp_path)
    for kind in ("task", "personal_evaluation"):
        assert read_events(cut, kind) == read_events(whole, kind), kind
    a, b = (json.loads((run / "summary.json").read_text()) for run in (whole, cut))
    assert a["personal"] == b["personal"]


@pytest.mark.parametrize(("strategy", "method"), [("fedspine", "mask"), ("fedit", "split")])
def test_each_devices_personal_model_is_saved_and_exported_as_it_was_measured(
    tmp_path: Path, strategy: str, method: str
) -> None:
    """With ``export.save`` the run saves every device's personal model, the manifest names it, ``fedspine
    export --device`` copies it (``--global-model``: the global device model), and the saved model,
    loaded with plain transformers, scores on the device's held-out examples what the run recorded."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    overrides = [f"strategy.name={strategy}", f"personalize.method={method}", "export.save=true"]
    personal = _cli(run, *overrides)["personal"]
    assert personal["models"] == {d: f"personal/device-{d}" for d in personal["devices"]}
    manifest = json.loads((run / "models" / "manifest.json").read_text())
    assert {d: e["personal"] for d, e in manifest["devices"].items() if "personal" in e} == personal["models"]
    [event] = read_events(run, "personal_evaluation")
    exp = build_experiment(load_config(run / "config.toml"))
    device = sorted(personal["devices"])[0]

    def export(out: Path, *flags: str) -> Any:
        result = CliRunner().invoke(app, ["export", str(run), "--device", device, "--out", str(out), *flags])
        assert result.exit_code == 0, result.output
        return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)

    mine = evaluate(
        exp.trainer.executor.ready(export(tmp_path / "mine")),
        exp.trainer.objective,
        exp.trainer.local_tests[int(device)].batches,
    )
    assert mine.metric == pytest.approx(personal["devices"][device], abs=1e-9)
    assert mine.loss == pytest.approx(event["devices"][device]["loss"], rel=1e-5)
    shared = evaluate(
        exp.trainer.executor.ready(export(tmp_path / "global", "--global-model")),
        exp.trainer.objective,
        exp.trainer.local_tests[int(device)].batches,
    )
    assert shared.loss == pytest.approx(event["devices"][device]["global_loss"], rel=1e-5)

    everything = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "all")])
    assert everything.exit_code == 0, everything.output
    assert {p.name for p in (tmp_path / "all" / "personal").iterdir()} == {
        f"device-{d}" for d in personal["devices"]
    }
    manifest["devices"][device]["personal"] = "../../elsewhere"  # a manifest cannot point the copy out
    (run / "models" / "manifest.json").write_text(json.dumps(manifest))
    lying = CliRunner().invoke(app, ["export", str(run), "--device", device, "--out", str(tmp_path / "x")])
    assert (
        lying.exit_code != 0
        and "not a run's" in " ".join(lying.output.split())
        and not (tmp_path / "x").exists()
    )
    del manifest["devices"][device]["personal"]
    manifest["models"][0]["dir"] = "../../elsewhere"
    (run / "models" / "manifest.json").write_text(json.dumps(manifest))
    lying = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "y")])
    assert lying.exit_code != 0 and "not a run's" in " ".join(lying.output.split())
    assert not (tmp_path / "y").exists()


def test_a_private_adapter_starts_fresh_and_keeps_the_units_a_pruned_task_did_not_train() -> None:
    shape = ModelShape(
        layers=1, hidden=8, heads=2, kv_heads=2, head_dim=4, intermediate=6, vocab=10, tied_embeddings=True
    )
    shapes = {"model.layers.0.mlp.down_proj": (8, 6), "model.layers.0.self_attn.q_proj": (8, 8)}
    store = PrivateAdapters(shapes, rank=2, alpha=4.0, seed=3)
    first = store.of(0)
    assert torch.equal(
        first["model.layers.0.mlp.down_proj"]["A"], store.of(0)["model.layers.0.mlp.down_proj"]["A"]
    )
    assert not torch.equal(
        first["model.layers.0.mlp.down_proj"]["A"], store.of(1)["model.layers.0.mlp.down_proj"]["A"]
    )
    assert all(torch.count_nonzero(e["B"]) == 0 for e in first.values())
    plan = {0: LayerKeep((0, 1), (1, 4))}  # two of six MLP channels kept
    kept = store.of(0, plan, shape)
    assert kept["model.layers.0.mlp.down_proj"]["A"].shape == (2, 2)
    trained = {m: {k: t + 1.0 for k, t in e.items()} for m, e in kept.items()}
    store.keep(0, trained, plan, shape)
    after = store.states[0]["model.layers.0.mlp.down_proj"]["A"]
    before = first["model.layers.0.mlp.down_proj"]["A"]
    assert torch.equal(after[:, [1, 4]], before[:, [1, 4]] + 1.0)
    assert torch.equal(after[:, [0, 2, 3, 5]], before[:, [0, 2, 3, 5]])
    assert torch.equal(
        store.states[0]["model.layers.0.mlp.down_proj"]["B"], first["model.layers.0.mlp.down_proj"]["B"] + 1.0
    )


def test_personalization_settings_that_cannot_run_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"personalize\.method"):
        check_config(load_config(CONFIGS / "tiny.toml", ["personalize.method=mask"]))  # fedit does not prune
    with pytest.raises(ConfigError, match=r"personalize\.method"):
        check_config(load_config(CONFIGS / "tiny.toml", ["personalize.method=split", "executor.name=ray"]))
    with pytest.raises(ConfigError, match=r"personalize\.method"):
        load_config(CONFIGS / "tiny.toml", ["personalize.method=gating"])
    with pytest.raises(ConfigError, match=r"personalize\.method"):
        check_config(
            load_config(CONFIGS / "tiny.toml", ["personalize.method=clustered", "server.robust=median"])
        )
    with pytest.raises(ConfigError, match=r"personalize\.clusters"):
        load_config(CONFIGS / "tiny.toml", ["personalize.clusters=1"])
    for bad in ("personalize.rank=0", "personalize.steps=-1"):
        with pytest.raises(ConfigError, match=re.escape(bad.split("=")[0])):
            load_config(CONFIGS / "tiny.toml", [bad])
    for method in ("finetune", "split", "clustered", "mask"):  # every method runs deployed
        config_from_run(
            {CONFIG_KEY: to_toml(load_config(CONFIGS / "tiny.toml", [f"personalize.method={method}"]))}
        )


def _update(cluster: int | None, state: dict[str, Any] | None, plan: Any = None) -> ClientUpdate:
    return ClientUpdate(0, 0, 1, {}, 0, 0.0, 0, 0.0, plan=plan, cluster=cluster, cluster_state=state)


def test_each_cluster_averages_its_own_uploads_unit_by_unit() -> None:
    shape = ModelShape(
        layers=1, hidden=8, heads=2, kv_heads=2, head_dim=4, intermediate=6, vocab=10, tied_embeddings=True
    )
    module = "model.layers.0.mlp.down_proj"
    clusters = ClusterAdapters({module: (8, 6)}, count=2, rank=2, alpha=4.0, seed=0)
    before = [{k: t.clone() for k, t in s[module].items()} for s in clusters.states]
    assert not torch.equal(before[0]["A"], before[1]["A"]) and not before[0]["B"].any()
    one = {module: {"A": torch.ones(2, 6), "B": torch.ones(8, 2)}}
    three = {module: {"A": torch.full((2, 6), 3.0), "B": torch.full((8, 2), 3.0)}}
    pruned = {module: {"A": torch.full((2, 2), 9.0), "B": torch.full((8, 2), 9.0)}}  # kept channels 1, 4
    plan = {0: LayerKeep((0, 1), (1, 4))}
    updates = [_update(0, one), _update(0, three), _update(0, pruned, plan), _update(None, None)]
    clusters.aggregate(updates, [1.0, 3.0, 4.0, 1.0], shape)
    a = clusters.states[0][module]["A"]
    assert torch.allclose(
        a[:, [0, 2, 3, 5]], torch.full((2, 4), (1 + 9) / 4)
    )  # the pruned device did not train them
    assert torch.allclose(a[:, [1, 4]], torch.full((2, 2), (1 + 9 + 36) / 8))
    assert torch.allclose(clusters.states[0][module]["B"], torch.full((8, 2), (1 + 9 + 36) / 8))
    assert torch.equal(clusters.states[1][module]["A"], before[1]["A"])  # nobody chose cluster 1
    kept = clusters.sent(plan, shape)[1][module]["A"]
    assert torch.equal(kept, before[1]["A"][:, [1, 4]])


def test_the_server_rejects_a_cluster_adapter_it_did_not_send_or_cannot_place() -> None:
    module = "m"
    start = {module: {"A": torch.zeros(2, 3), "B": torch.zeros(4, 2)}}
    task = ClientTask(0, 0, 1, DeviceLora(2, 1.0), start, 0, clusters=[start, start])
    good = ClientUpdate(0, 0, 1, start, 0, 0.0, 0, 0.0, lora_rank=2, cluster=1, cluster_state=start)
    assert check_update(good, task) is None
    wide = {module: {"A": torch.zeros(3, 3), "B": torch.zeros(4, 3)}}
    nan = {module: {"A": torch.full((2, 3), float("nan")), "B": torch.zeros(4, 2)}}
    for bad, reason in [
        (replace(good, cluster=2), "cluster 2 outside"),
        (replace(good, cluster=None), "cluster None outside"),
        (replace(good, cluster_state={"other": start[module]}), "modules differ"),
        (replace(good, cluster_state=wide), "shapes"),
        (replace(good, cluster_state=nan), "NaN"),
    ]:
        assert reason in (check_update(bad, task) or ""), reason
    alone = ClientTask(0, 0, 1, DeviceLora(2, 1.0), start, 0)
    assert "did not send" in (check_update(good, alone) or "")
    far = {module: {"A": torch.full((2, 3), 10.0), "B": torch.zeros(4, 2)}}
    assert "max_update_norm" in (check_update(replace(good, cluster_state=far), task, max_norm=1.0) or "")


def test_a_devices_taylor_scores_see_its_labels_and_flap_scores_do_not(tiny_config: Config) -> None:
    """The mask's default importance is the first-order change of the device's own task loss: the
    same verses with other labels rank units differently; FLAP (activations only) cannot tell. A unit
    that cannot change the output (a zeroed down_proj column) scores zero."""
    from fedspine.runtime.experiment import build_experiment

    exp = build_experiment(tiny_config)
    executor = exp.trainer.executor
    model = executor.deployed_model()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 5] = 0.0
    batches = executor.local_batches(exp.devices[0], 2, 0)
    relabelled = [replace(b, label_index=(b.label_index + 1) % 6) for b in batches]
    taylor = [executor.local_importance(model, b, "taylor") for b in (batches, relabelled)]
    flap = [executor.local_importance(model, b, "flap") for b in (batches, relabelled)]
    assert all(torch.equal(x, y) for x, y in zip(flap[0][1], flap[1][1], strict=True))
    assert not all(torch.allclose(x, y) for x, y in zip(taylor[0][1], taylor[1][1], strict=True))
    assert taylor[0][1][0][5] == 0 and taylor[0][1][0].sum() > 0 and taylor[0][0][1].sum() > 0
    assert all(not p.requires_grad for p in model.parameters())  # the scoring left the model as it was


def test_with_compensation_a_channel_is_scored_by_replacing_it_with_its_mean(tiny_config: Config) -> None:
    """Removing a channel that bias compensation replaces by its mean ``m`` changes the loss by about
    ``sum over tokens of (x - m) dL/dx``, not ``sum x dL/dx``: a channel whose input barely varies costs
    nothing once compensated, however large its mean."""
    from fedspine.model.importance import ActivationTaylorMeter
    from fedspine.runtime.experiment import build_experiment

    exp = build_experiment(tiny_config)
    model = exp.trainer.executor.deployed_model()
    meter = ActivationTaylorMeter(model, exp.trainer.shape.head_dim)
    width = exp.trainer.shape.intermediate
    xg, g = torch.zeros(width), torch.zeros(width)
    xg[:3], g[:3] = torch.tensor([6.0, -2.0, 1.0]), torch.tensor([2.0, 1.0, -1.0])
    meter._sums[(0, "down_proj")] = [(xg, g)]
    means = [torch.zeros(width) for _ in range(exp.trainer.shape.layers)]
    means[0][:3] = torch.tensor([3.0, 1.0, 2.0])
    _, plain = meter.result()
    _, centered = meter.result(means)
    assert plain[0][:3].tolist() == [6.0, 2.0, 1.0]
    assert centered[0][:3].tolist() == [0.0, 3.0, 3.0]  # |6 - 3*2|, |-2 - 1*1|, |1 - 2*(-1)|
