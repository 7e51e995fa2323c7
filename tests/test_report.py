"""Report layer: loading a run directory, the figures, the HTML page and the formatting helpers."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedspine.errors import FedspineError
from fedspine.metrics.summary import Metric, Summary
from fedspine.report import (
    ReportError,
    device_stats,
    format_bytes,
    format_duration,
    load_run,
    merge_device_stats,
    plot_device_time,
    write_report,
)
from fedspine.report.load import ROUND_COLUMNS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("metric_vs_time.png", "round_breakdown.png", "bytes_per_round.png", "device_time.png")
# Device ids chosen so that they cannot be mistaken for any other number on the page.
DEVICES = {101: ("raspberry_pi_4", "wifi"), 205: ("jetson_orin_nano", "ethernet"), 307: ("pixel_7", "lte")}
OOM_DEVICE = (412, "raspberry_pi_4", "lte")
CONFIG = '[task]\nname = "<b>bible & co</b>"\n\n[strategy]\nname = "fedit"\n'


def _task(round_number: int, device_id: int, start: float, status: str = "ok") -> dict[str, Any]:
    device_class, network = DEVICES.get(device_id, OOM_DEVICE[1:])
    ran = status in ("ok", "late")
    return {
        "event": "task",
        "round": round_number,
        "device_id": device_id,
        "device_class": device_class,
        "network": network,
        "status": status,
        "virtual_start": start,
        "virtual_end": start + 12.5,
        "downlink_seconds": 0.4 if ran else 0.0,
        "compute_seconds": 11.0 if ran else 0.0,
        "uplink_seconds": 1.1 if ran and status == "ok" else 0.0,
        "downlink_bytes": 1_500_000,
        "uplink_bytes": 1_500_000 if status == "ok" else 0,
        "tokens": 3000,
        "num_samples": 64,
        "local_steps": 8,
        "lora_rank": 8,
        "pruning_ratio": 0.0,
        "train_loss": 1.2,
        "peak_memory_bytes": 123,
    }


def _events(evaluated: bool) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    if evaluated:
        events.append(
            {
                "event": "evaluation",
                "round": 0,
                "virtual_time": 0.0,
                "metric": "accuracy",
                "value": 0.18,
                "loss": 2.0,
            }
        )
    for round_number in (1, 2, 3):
        start = (round_number - 1) * 13.0
        late = {2: 307}.get(round_number)
        for device_id in DEVICES:
            events.append(_task(round_number, device_id, start, "late" if device_id == late else "ok"))
        if round_number == 3:
            events.append(_task(3, OOM_DEVICE[0], start, "oom"))
        events.append(
            {
                "event": "aggregation",
                "round": round_number,
                "virtual_start": start + 12.5,
                "virtual_end": start + 12.6,
                "aggregation_seconds": 0.1,
                "num_updates": 3,
                "uplink_bytes": 4_500_000,
            }
        )
        if evaluated:
            events.append(
                {
                    "event": "evaluation",
                    "round": round_number,
                    "virtual_time": start + 12.6,
                    "metric": "accuracy",
                    "value": 0.18 + 0.34 * round_number / 3,
                    "loss": 1.5,
                }
            )
    return events


def _round_rows(evaluated: bool) -> list[dict[str, Any]]:
    rows = []
    for round_number in (1, 2, 3):
        start = (round_number - 1) * 13.0
        metric = 0.18 + 0.34 * round_number / 3 if evaluated else ""
        rows.append(
            {
                "round": round_number,
                "virtual_start": start,
                "virtual_end": start + 12.6,
                "round_seconds": 13.0,
                "aggregation_seconds": 0.1,
                "downlink_seconds": 0.4,
                "training_seconds": 11.0,
                "uplink_seconds": 1.5,
                "selected": 3 + (round_number == 3),
                "aggregated": 3 - (round_number == 2),
                "late": int(round_number == 2),
                "oom": int(round_number == 3),
                "uplink_bytes": 4_500_000,
                "downlink_bytes": 4_500_000,
                "train_loss": 1.2,
                "metric": metric,
                "eval_loss": 1.5 if evaluated else "",
            }
        )
    return rows


def _summary(evaluated: bool) -> dict[str, Any]:
    return {
        "task": "bible-genre classification",
        "metric": {"name": "accuracy", "value": 0.52 if evaluated else None},
        "chance_level": 0.19,
        "rounds": 3,
        "virtual_seconds": 38.6,
        "wall_seconds": 300.1,
        "train_wall_seconds": 280.0,
        "uplink_bytes": 13_500_000,
        "downlink_bytes": 13_500_000,
        "target": 0.4,
        "time_to_target_seconds": 25.6 if evaluated else None,
        "strategy": "fedit",
        "scheduler": "sync",
        "model": "smollm2",
        "num_devices": 4,
        "seed": 0,
        "initial_metric": 0.18 if evaluated else None,
        "devices": [
            {
                "device_id": device_id,
                "device_class": device_class,
                "network": network,
                "tasks": 3,
                "compute_seconds": 33.0,
                "uplink_bytes": 4_500_000,
            }
            for device_id, (device_class, network) in DEVICES.items()
        ],
    }


def make_run_dir(path: Path, evaluated: bool = True) -> Path:
    """Writes the four files of a small synthetic run (3 rounds, one late and one oom task)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.toml").write_text(CONFIG, encoding="utf-8")
    (path / "summary.json").write_text(json.dumps(_summary(evaluated)), encoding="utf-8")
    lines = [json.dumps(event) for event in _events(evaluated)]
    (path / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (path / "rounds.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=ROUND_COLUMNS)
        writer.writeheader()
        writer.writerows(_round_rows(evaluated))
    return path


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"


def test_write_report_renders_summary_devices_config_and_plots(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run")

    report = write_report(run_dir)

    assert report == run_dir / "report.html"
    page = report.read_text(encoding="utf-8")
    assert "0.52" in page and "0.19" in page
    assert "fedit" in page and "smollm2" in page and "bible-genre classification" in page
    for device_id in [*DEVICES, OOM_DEVICE[0]]:
        assert f'<td class="num">{device_id}</td>' in page
    assert "&lt;b&gt;bible &amp; co&lt;/b&gt;" in page and "<b>bible" not in page
    assert "8 ok · 1 late · 1 oom" in page
    assert "<script" not in page and "http" not in page
    for name in PLOTS:
        assert f'src="plots/{name}"' in page
        _assert_png(run_dir / "plots" / name)


def test_report_without_evaluation_still_renders(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run", evaluated=False)

    page = write_report(run_dir).read_text(encoding="utf-8")

    assert "not evaluated yet" in page and "not reached" in page
    for name in PLOTS:
        _assert_png(run_dir / "plots" / name)


@pytest.mark.parametrize("name", ["summary.json", "rounds.csv", "events.jsonl", "config.toml"])
def test_missing_file_is_named_in_the_error(tmp_path: Path, name: str) -> None:
    run_dir = make_run_dir(tmp_path / "run")
    (run_dir / name).unlink()

    with pytest.raises(ReportError, match=name) as caught:
        write_report(run_dir)

    assert isinstance(caught.value, FedspineError)
    assert not (run_dir / "report.html").exists()


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("summary.json", "{not json", "invalid JSON"),
        ("summary.json", "[1, 2]", "JSON object"),
        ("summary.json", json.dumps({"task": "t"}), "missing key"),
        ("events.jsonl", '{"event": "task", "round": 1}\n', "line 1"),
        ("events.jsonl", '{"event": "evaluation"}\n{oops\n', "line 1"),
        ("rounds.csv", "round,virtual_start\n1,0.0\n", "missing column"),
        ("rounds.csv", ",".join(ROUND_COLUMNS) + "\n" + "x," * 16 + "x\n", "line 2"),
    ],
)
def test_corrupt_file_is_named_in_the_error(tmp_path: Path, name: str, content: str, problem: str) -> None:
    run_dir = make_run_dir(tmp_path / "run")
    (run_dir / name).write_text(content, encoding="utf-8")

    with pytest.raises(ReportError, match=name) as caught:
        load_run(run_dir)

    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("rounds", "3", "key 'rounds' must be a number"),
        ("virtual_seconds", None, "key 'virtual_seconds' must be a number"),
        ("target", "high", "key 'target' must be a number or null"),
        ("strategy", 7, "key 'strategy' must be text"),
        ("seed", True, "key 'seed' must be a number or null"),
        ("devices", {"0": {}}, "key 'devices' must be a JSON list"),
        ("metric", {"name": "accuracy", "value": "0.5"}, "key 'metric' must be"),
        ("metric", {"name": "accuracy", "value": math.nan}, "key 'metric' must be"),
        ("uplink_bytes", -1, "key 'uplink_bytes' must be a number from 0"),
        ("rounds", 2.5, "key 'rounds' must be a whole number"),
        ("rounds", 10**400, "key 'rounds' must be a number from 0"),
        ("wall_seconds", math.inf, "key 'wall_seconds' must be a finite number"),
        ("seed", -3, "key 'seed' must be a number from 0"),
        ("devices", [{"device_id": 1, "uplink_bytes": "lots"}], "key 'devices[0].uplink_bytes' must be"),
        ("devices", [{"network": "wifi"}], "key 'devices[0].device_id' is missing"),
        ("evaluations", [{"virtual_time": 1.0}], "key 'evaluations[0].value' is missing"),
        ("federated", {"value": 0.5, "count": 3, "worst_decile": 0.4, "devices": {"a": 1}}, "device ids"),
        ("personal", {"devices": {"1": "high"}}, "key 'personal.devices.1' must be a number"),
        ("device_models", {"models": [], "devices": {}}, "key 'device_models.dense_base' is missing"),
    ],
)
def test_a_summary_with_a_wrong_type_is_refused_naming_the_key(key: str, value: Any, problem: str) -> None:
    data = {**_summary(evaluated=True), key: value}
    with pytest.raises(ValueError, match=re.escape(problem)):
        Summary.from_json(data)


def test_a_summary_round_trips_through_json_and_reads_missing_detail_as_empty() -> None:
    summary = Summary.from_json(_summary(evaluated=True))
    assert summary.metric == Metric("accuracy", 0.52, higher_is_better=True)
    assert (summary.rounds, summary.uplink_bytes, summary.seed) == (3, 13_500_000, 0)
    assert summary.tasks == {} and summary.updates is None and summary.evaluations == []
    assert summary.eval_wall_seconds == 0.0 and summary.executor is None
    assert Summary.from_json(json.loads(json.dumps(summary.to_json()))) == summary
    assert list(summary.to_json())[:3] == ["task", "metric", "chance_level"]  # the file's key order


def test_load_run_parses_rounds_as_floats_and_keeps_events(tmp_path: Path) -> None:
    run = load_run(make_run_dir(tmp_path / "run", evaluated=False))

    assert [row["round"] for row in run.rounds] == [1.0, 2.0, 3.0]
    assert all(isinstance(value, float) for row in run.rounds for value in row.values())
    assert math.isnan(run.rounds[0]["metric"])
    assert len(run.events_of("task")) == 10 and len(run.events_of("evaluation")) == 0
    assert run.metric_name == "accuracy" and run.metric_value is None
    assert run.config_text == CONFIG


def test_device_stats_count_statuses_and_summary_overrides_events(tmp_path: Path) -> None:
    events = _events(evaluated=True)

    from_events = {stats.device_id: stats for stats in device_stats(events)}
    merged = {
        stats.device_id: stats for stats in merge_device_stats([{"device_id": 101, "tasks": 7}], events)
    }

    assert from_events[307].statuses == {"ok": 2, "late": 1}
    assert from_events[412].statuses == {"oom": 1} and from_events[412].compute_seconds == 0.0
    assert from_events[101].compute_seconds == pytest.approx(33.0)
    assert from_events[101].communication_seconds == pytest.approx(4.5)
    assert merged[101].tasks == 7 and merged[205].tasks == 3


def test_plot_device_time_accepts_events_directly(tmp_path: Path) -> None:
    out = plot_device_time(_events(evaluated=True), tmp_path / "nested" / "device_time.png")

    _assert_png(out)


def test_report_layer_imports_neither_torch_nor_pyplot(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run")
    code = (
        "import sys; from pathlib import Path; from fedspine.report import write_report;"
        f"write_report(Path({str(run_dir)!r}));"
        "bad = {'torch', 'matplotlib.pyplot'} & set(sys.modules); assert not bad, bad"
    )

    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0 s"),
        (0.35, "350 ms"),
        (12.5, "12.5 s"),
        (59.96, "1 min 00 s"),
        (125, "2 min 05 s"),
        (3599.6, "1 h 00 min"),
        (3720, "1 h 02 min"),
        (3 * 86400 + 4 * 3600, "3 d 04 h"),
    ],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


@pytest.mark.parametrize(
    ("num_bytes", "expected"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1234, "1.2 kB"),
        (999_960, "1.0 MB"),
        (6_170_000, "6.2 MB"),
        (1.5e9, "1.5 GB"),
    ],
)
def test_format_bytes(num_bytes: float, expected: str) -> None:
    assert format_bytes(num_bytes) == expected


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_format_helpers_reject_impossible_values(bad: float) -> None:
    with pytest.raises(ValueError):
        format_duration(bad)
    with pytest.raises(ValueError):
        format_bytes(bad)
