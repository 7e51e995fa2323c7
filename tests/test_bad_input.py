"""Bad input from the command line: a clear error naming the thing, a non-zero exit code, and no
output that claims success (no summary.json, no report)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedspine.cli import app as cli
from fedspine.config import BIBLE_GENRE_WORDS
from fedspine.metrics.records import read_events

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


# --- the review's command-line cases: each exits 1 or 2 with one line naming the thing; nothing written

REVIEW_VALUES = [
    "model.tiny.heads=0",
    "model.tiny.kv_heads=0",
    "model.tiny.hidden=-64",
    "run.seed=100000000000000000000000",
    "data.max_labels=-1",
    "data.max_examples=-7",
    "server.aggregation_gbps=0",
    "scheduler.over_selection=inf",
    "eval.batch_size=0",
    "server.aggregation_overhead_seconds=nan",
    "train.weight_decay=nan",
    "train.lr=inf",
    "lora.alpha=inf",
    'run.name="../../escaped"',
    "fleet.groups[0].count=100000000",
    "eval.target=nan",
    "train.max_grad_norm=-1",
    "run.threads=100000",
]


def _one_error_line(output: str) -> bool:
    """One ``error:`` message (the console may wrap it), at most status lines before it, no traceback."""
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    return "Traceback" not in output and len(errors) == 1 and output.count("error:") == 1


@pytest.mark.parametrize("bad", REVIEW_VALUES)
def test_each_out_of_range_or_non_finite_value_exits_2_naming_its_key(tmp_path: Path, bad: str) -> None:
    code, output, out = _run(tmp_path, bad)
    assert code == 2 and bad.split("=")[0] in output and _one_error_line(output), output
    assert not out.exists() and not (tmp_path.parent / "escaped").exists()


def test_layers_the_model_does_not_have_exit_2_and_write_nothing(tmp_path: Path) -> None:
    code, output, out = _run(tmp_path, "strategy.name=fedspine", "strategy.fedspine.dense_layers=[1000]")
    assert code == 2 and "strategy.fedspine.dense_layers[0]" in output and _one_error_line(output), output
    assert not out.exists()


def test_single_label_data_is_refused_rather_than_scored_at_accuracy_one(tmp_path: Path) -> None:
    data = tmp_path / "one.jsonl"
    data.write_text("".join(f'{{"text": "verse {i}", "label": "law"}}\n' for i in range(80)))
    code, output, out = _run(tmp_path, "data.source=jsonl", f"data.path={data}", "data.label_key=label")
    assert code == 1 and "at least two labels" in output and _one_error_line(output), output
    assert not out.exists()


def test_an_unterminated_csv_quote_is_named_as_such(tmp_path: Path) -> None:
    data = tmp_path / "bad.csv"
    data.write_text('text,label\n"first verse,law\nsecond,gospels\n')
    code, output, out = _run(tmp_path, "data.source=csv", f"data.path={data}", "data.label_key=label")
    assert code == 1 and "malformed CSV" in output and "quotes" in output, output
    assert not out.exists()


def test_another_source_does_not_inherit_the_bible_label_words(tmp_path: Path) -> None:
    """Switching the source without naming label words uses its labels, not the Bible's genres;
    the data loads before any progress bar is shown."""
    data = tmp_path / "quotes.jsonl"
    data.write_text("".join(f'{{"text": "line {i}", "character": "{"ab"[i % 2]}"}}\n' for i in range(120)))
    bible_words = [f'{label} = "{word}"' for label, word in BIBLE_GENRE_WORDS.items()]
    code, output, _ = _run(
        tmp_path,
        "data.source=jsonl",
        f"data.path={data}",
        "data.label_key=character",
        "data.test_size=20",
        "data.label_words={" + ", ".join(bible_words) + "}",  # the built-in default, as if not set
    )
    assert code == 0, output
    assert "label_words" not in output


@pytest.mark.parametrize("where", ["file", "under_file", "unwritable"])
def test_an_out_that_cannot_be_a_run_directory_exits_with_one_line(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    # sysfs refuses new directories even to root (tests may run as root, for whom mode bits do not)
    unwritable = Path("/sys/fedspine-test-run")
    if where == "unwritable" and not Path("/sys/kernel").is_dir():
        pytest.skip("needs sysfs for a directory that even root cannot create")
    out = {"file": blocker, "under_file": blocker / "run", "unwritable": unwritable}[where]
    args = ["run", "--config", TINY, "--out", str(out), *[a for q in QUICK for a in ("--set", q)]]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code in (1, 2) and _one_error_line(result.output), result.output
    assert "round" not in result.output  # no progress bar before the error
    assert blocker.read_text() == "not a directory" and not unwritable.exists()


@pytest.mark.parametrize("kind", ["directory", "binary"])
def test_a_config_that_is_a_directory_or_binary_exits_2(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "config.toml"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(bytes(range(256)))
    result = CliRunner().invoke(cli, ["run", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and str(path) in result.output and _one_error_line(result.output), (
        result.output
    )
    assert not (tmp_path / "run").exists()


def test_a_run_that_aggregated_nothing_exits_1_and_keeps_its_records(tmp_path: Path) -> None:
    code, output, out = _run(tmp_path, "server.max_update_norm=1e-12")  # every update is rejected
    assert code == 1 and "no update was aggregated" in output, output
    assert (out / "events.jsonl").exists() and "rejected: change norm" in (out / "events.jsonl").read_text()


def test_a_failing_report_leaves_a_complete_run_and_says_how_to_rebuild_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_run_dir: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("fedspine.api.write_report", broken)
    code, output, out = _run(tmp_path)
    assert code == 0 and "fedspine report" in output and "disk full" in output, output
    assert (out / "summary.json").exists() and not (out / "FAILED").exists()


@pytest.mark.timeout(300)
def test_an_asynchronous_run_whose_every_update_is_rejected_ends_with_the_same_error(tmp_path: Path) -> None:
    """Every device of a FedBuff run sends NaN factors: the run offered new tasks forever; now it stops
    after 5 rejected tasks per device in a row and exits 1 as a synchronous run does, records kept."""
    alike = [
        f"fleet.groups[{g}].{key}" for g in range(3) for key in ("device_class=laptop", "network=ethernet")
    ]
    every = "fleet.attack.devices=[0, 1, 2, 3, 4, 5]"
    code, output, out = _run(
        tmp_path,
        "scheduler.name=fedbuff",
        "train.local_steps=1",
        "fleet.attack.kind=nonfinite",
        every,
        *alike,
    )
    assert code == 1 and "no update was aggregated" in output, output
    rejected = (out / "events.jsonl").read_text().count('"rejected"')
    assert 30 <= rejected <= 45, rejected  # 5 per device in a row; devices alike, so about 30


@pytest.mark.timeout(300)
def test_an_asynchronous_run_with_some_honest_devices_does_not_stall(tmp_path: Path) -> None:
    """Fast devices' rejections must not stop a run whose slow honest devices are still training."""
    code, output, out = _run(
        tmp_path,
        "scheduler.name=fedbuff",
        "scheduler.fedbuff.buffer_size=2",
        "fleet.attack.kind=nonfinite",
        "fleet.attack.devices=[2, 3, 4, 5]",  # the honest devices are the slowest (two Raspberry Pi 4)
        "fleet.groups[0].network=4g",  # ... on a slow link: their first update comes after 60 rejections
    )
    assert code == 0, output
    statuses = [e.get("status") for e in read_events(out) if e.get("status") in ("ok", "rejected")]
    assert statuses.index("ok") > 30  # more rejections before the first update than 5 per device
