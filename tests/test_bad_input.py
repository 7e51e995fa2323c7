"""Bad input from the command line: a clear error naming the thing, a non-zero exit code, and no
output that claims success (no summary.json, no report)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedspine.cli import app as cli

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml")
QUICK = ["scheduler.rounds=1", "data.test_size=40", "export.save=false", "export.speed=false"]


def _run(tmp_path: Path, *overrides: str) -> tuple[int, str, Path]:
    out = tmp_path / "run"
    args = ["run", "--config", TINY, "--out", str(out)]
    for item in [*QUICK, *overrides]:
        args += ["--set", item]
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output, out


def _claims_nothing(out: Path) -> bool:
    return not (out / "summary.json").exists() and not (out / "report.html").exists()


def test_a_missing_model_directory_is_named(tmp_path: Path) -> None:
    code, output, out = _run(tmp_path, "model.source=local", f"model.path={tmp_path / 'nope'}")
    assert code == 1 and "nope" in output and _claims_nothing(out)


def test_a_corrupt_model_directory_is_named(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{ not json")
    code, output, out = _run(tmp_path, "model.source=local", f"model.path={model}")
    assert code == 1 and "model" in output and _claims_nothing(out)


def test_a_malformed_dataset_row_is_named_with_its_line(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{oops\n')
    code, output, out = _run(tmp_path, "data.source=jsonl", f"data.path={data}", "data.label_key=label")
    assert code == 1 and "data.jsonl:3" in output and _claims_nothing(out)


def test_an_unknown_device_class_lists_the_known_ones(tmp_path: Path) -> None:
    code, output, out = _run(tmp_path, "fleet.groups[0].device_class=pdp11")
    assert code == 2 and "fleet.groups[0].device_class" in output and "raspberry_pi_4" in output
    assert not out.exists()


def test_a_fleet_where_no_device_holds_the_model_fails_before_loading_it(tmp_path: Path) -> None:
    code, output, out = _run(
        tmp_path, "model.tiny.hidden=16384", "model.tiny.layers=64", "model.tiny.intermediate=65536"
    )
    assert code == 1 and "no device in the fleet can hold the model" in output
    assert not out.exists()


@pytest.mark.parametrize("bad", ["train.lr=-1", "scheduler.rounds=0", "server.robust=mean"])
def test_bad_values_exit_2_and_write_nothing(tmp_path: Path, bad: str) -> None:
    code, output, out = _run(tmp_path, bad)
    assert code == 2 and bad.split("=")[0] in output and not out.exists()
