"""End to end through the CLI: a tiny run writes every record, is deterministic, bad input starts nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedspine.cli import app
from tests.conftest import CONFIGS

runner = CliRunner()
FAST = [
    "--set",
    "data.max_examples=600",
    "--set",
    "data.test_size=60",
    "--set",
    "scheduler.rounds=2",
    "--set",
    "train.local_steps=2",
]
RUN_FILES = [
    "config.toml",
    "events.jsonl",
    "rounds.csv",
    "summary.json",
    "report.html",
    "plots/metric_vs_time.png",
    "plots/round_breakdown.png",
    "plots/bytes_per_round.png",
]


def _run(out: Path, *extra: str) -> dict:
    result = runner.invoke(
        app, ["run", "--config", str(CONFIGS / "tiny.toml"), "--out", str(out), *FAST, *extra]
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    a, b = tmp_path_factory.mktemp("a") / "run", tmp_path_factory.mktemp("b") / "run"
    _run(a)
    _run(b)
    return a, b


def test_run_writes_every_record(two_runs: tuple[Path, Path]) -> None:
    run_dir, _ = two_runs
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (
        "task",
        "metric",
        "chance_level",
        "rounds",
        "virtual_seconds",
        "wall_seconds",
        "train_wall_seconds",
        "uplink_bytes",
        "downlink_bytes",
        "target",
        "time_to_target_seconds",
    ):
        assert key in summary, key
    assert summary["metric"]["name"] == "accuracy"
    assert 0.0 < summary["chance_level"] < 1.0
    assert summary["rounds"] == 2
    assert summary["virtual_seconds"] > 0
    assert 0 < summary["train_wall_seconds"] <= summary["wall_seconds"]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    tasks = [e for e in events if e["event"] == "task"]
    assert tasks and all(e["compute_seconds"] > 0 and e["uplink_bytes"] > 0 for e in tasks)
    assert sum(e["uplink_bytes"] for e in tasks) == summary["uplink_bytes"]
    assert [e["round"] for e in events if e["event"] == "aggregation"] == [1, 2]


def test_same_seed_gives_identical_metrics_and_events(two_runs: tuple[Path, Path]) -> None:
    a, b = two_runs
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["metric"] == sb["metric"]
    assert sa["evaluations"] == sb["evaluations"]
    assert (a / "events.jsonl").read_text() == (b / "events.jsonl").read_text()
    assert (a / "rounds.csv").read_text() == (b / "rounds.csv").read_text()


def test_another_seed_gives_other_events(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    _run(tmp_path / "c", "--set", "run.seed=1")
    assert (tmp_path / "c" / "events.jsonl").read_text() != (two_runs[0] / "events.jsonl").read_text()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.lrr=1", "train.lrr"),
        ("train.lr=fast", "train.lr"),
        ("strategy.name=fedavgx", "strategy.name"),
        ("scheduler.name=nope", "scheduler.name"),
        ("fleet.groups.0.device_class=toaster", "fleet.groups[0].device_class"),
        ("data.partition=random", "data.partition"),
    ],
)
def test_bad_config_exits_2_names_the_key_and_writes_nothing(
    tmp_path: Path, override: str, named: str
) -> None:
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["run", "--config", str(CONFIGS / "tiny.toml"), "--out", str(out), "--set", override]
    )
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert not out.exists()


def test_existing_run_directory_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    result = runner.invoke(app, ["run", "--config", str(CONFIGS / "tiny.toml"), "--out", str(out)])
    assert result.exit_code == 2
    assert (out / "summary.json").read_text() == "{}"


def test_fleet_command_prints_the_table() -> None:
    result = runner.invoke(app, ["fleet", "--config", str(CONFIGS / "fleet80.toml")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "80 devices" in result.output
    assert "jetson_agx_orin" in result.output


def test_console_script_runs_in_a_fresh_process(tmp_path: Path) -> None:
    """The installed entry point, as a user types it (exit code 2 on a bad key)."""
    exe = Path(sys.executable).with_name("fedspine")
    proc = subprocess.run(
        [str(exe), "run", "--set", "eval.evry=2", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "eval.evry" in proc.stderr


@pytest.mark.parametrize("strategy", ["fedit", "zeropad", "hetlora", "flexlora", "flora"])
def test_every_strategy_runs_from_the_cli_with_heterogeneous_ranks(tmp_path: Path, strategy: str) -> None:
    ranks = ["--set", "lora.ranks=[8, 8, 4, 4, 2, 2]"] if strategy != "fedit" else []
    summary = _run(
        tmp_path / "run", "--set", f"strategy.name={strategy}", "--set", "scheduler.rounds=1", *ranks
    )
    assert summary["strategy"] == strategy
    assert summary["uplink_bytes"] > 0
    assert summary["tasks"]["ok"] == 4
