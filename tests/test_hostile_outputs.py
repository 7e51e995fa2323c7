"""A run directory is untrusted input: ``export``, ``report`` and ``compare`` read nothing outside it and
copy nothing out of it through a link, refuse what is planted in it (FIFOs, oversized or tampered
records, hostile flags) with one ``error:`` line naming the file or flag, and write nothing then.

Each case starts from a copy of one real finished run (built once for the module); compare cases
build a sweep directory (two arms x two seeds) from its ``summary.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedspine.cli import app
from fedspine.files import TEXT_LIMIT
from fedspine.metrics.summary import Summary
from tests.conftest import CONFIGS
from tests.hostile import refuse, snapshot

RUN_SETTINGS = [
    "scheduler.rounds=1",
    "data.max_examples=600",
    "data.test_size=40",
    "train.local_steps=2",
    "export.save=true",
    "export.speed=false",
]
SECRET = "the contents of a file outside the run\n"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    args = ["run", "--config", str(CONFIGS / "tiny.toml"), "--out", str(out)]
    args += [a for setting in RUN_SETTINGS for a in ("--set", setting)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def root(tmp_path: Path, finished_run: Path) -> Path:
    """A fresh copy of the run at ``root/run``, a sweep made of it at ``root/sweep`` and a folder
    outside both at ``root/outside`` holding a secret file."""
    shutil.copytree(finished_run, tmp_path / "run", symlinks=True)
    summary = json.loads((finished_run / "summary.json").read_text())
    for arm in ("fedit", "other"):
        for seed in (0, 1):
            (tmp_path / "sweep" / arm / f"seed-{seed}").mkdir(parents=True)
            _write_json(tmp_path / "sweep" / arm / f"seed-{seed}" / "summary.json", {**summary, "seed": seed})
    _write_json(tmp_path / "sweep" / "sweep.json", {"arms": ["fedit", "other"], "reference": "fedit"})
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text(SECRET)
    return tmp_path


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def _edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    _write_json(path, change(data) or data)


def _replace(path: Path) -> None:
    """Remove whatever is at ``path`` (to plant something else there)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _link(path: Path, target: Path) -> None:
    _replace(path)
    path.symlink_to(target)


def _fifo(path: Path) -> None:
    _replace(path)
    os.mkfifo(path)


def _huge(path: Path) -> None:
    """A sparse file one byte over the record cap (no disk is spent on it)."""
    with path.open("wb") as file:
        file.truncate(TEXT_LIMIT + 1)


def _system_folder(root: Path) -> Path:
    """Stands in for a system folder (``/etc``): files a run directory must never copy out."""
    system = root / "outside" / "etc"
    (system / "ssh").mkdir(parents=True)
    (system / "passwd").write_text("root:x:0:0\n")
    (system / "ssh" / "ssh_host_key").write_text("PRIVATE\n")
    return system


def _moved_outside(root: Path, relative: str) -> None:
    """Move ``run/<relative>`` outside the run and leave a link to it in its place."""
    source, target = root / "run" / relative, root / "outside" / Path(relative).name
    shutil.move(source, target)
    source.symlink_to(target)


def _personal_model_outside(root: Path) -> None:
    models = root / "run" / "models"
    shutil.copytree(models / "dense", root / "outside" / "device-0")
    (models / "personal").mkdir()
    (models / "personal" / "device-0").symlink_to(root / "outside" / "device-0")
    _edit_json(models / "manifest.json", lambda m: m["devices"]["0"].update(personal="personal/device-0"))


def _task_event_with(run: Path, **fields: Any) -> None:
    lines = (run / "events.jsonl").read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if json.loads(line)["event"] == "task")
    lines[index] = json.dumps({**json.loads(lines[index]), **fields})
    (run / "events.jsonl").write_text("\n".join(lines) + "\n")


def _deeply_nested(path: Path) -> None:
    path.write_text("[" * 200_000 + "]" * 200_000)


def _seed_summary(root: Path, change: Callable[[dict[str, Any]], Any], arm: str = "other") -> None:
    _edit_json(root / "sweep" / arm / "seed-1" / "summary.json", change)


def _outside_run(root: Path) -> Path:
    """A finished run outside the sweep (``outside/elsewhere/seed-5``, a seed no arm here has)."""
    run = root / "outside" / "elsewhere" / "seed-5"
    run.mkdir(parents=True)
    _write_json(run / "summary.json", {**json.loads((root / SUMMARY).read_text()), "seed": 5})
    return run


@dataclass(frozen=True)
class Case:
    """One hostile input: how to plant it under ``root``, the command (``{root}`` replaced), and what
    its one error line must name."""

    id: str
    plant: Callable[[Path], Any]
    args: tuple[str, ...]
    names: str


EXPORT = ("export", "{root}/run", "--out", "{root}/exported")
EXPORT_0 = (*EXPORT, "--device", "0")
REPORT = ("report", "{root}/run")
COMPARE = ("compare", "{root}/sweep")
MANIFEST = "run/models/manifest.json"
SUMMARY = "run/summary.json"


def _nothing(root: Path) -> None:
    return None


CASES = [
    # export: nothing outside the run is copied; the manifest is checked; --out is checked
    Case(
        "export-models-dense-links-to-a-system-folder",
        lambda r: _link(r / "run/models/dense", _system_folder(r)),
        EXPORT,
        "models/dense",
    ),
    Case(
        "export-device-config-json-links-to-a-secret",
        lambda r: _link(r / "run/models/dense/config.json", r / "outside/secret.txt"),
        EXPORT_0,
        "config.json",
    ),
    Case("export-a-fifo-in-a-model-directory", lambda r: _fifo(r / "run/models/dense/pipe"), EXPORT, "pipe"),
    Case(
        "export-into-its-own-source",
        _nothing,
        ("export", "{root}/run", "--out", "{root}/run/models/dense/sub"),
        "--out",
    ),
    Case("export-out-is-a-file", lambda r: (r / "exported").write_text("x"), EXPORT, "--out"),
    Case(
        "export-out-is-a-dangling-link",
        lambda r: (r / "exported").symlink_to(r / "nowhere"),
        EXPORT,
        "--out",
    ),
    Case("export-manifest-not-json", lambda r: (r / MANIFEST).write_text("{oops"), EXPORT, "manifest.json"),
    Case(
        "export-manifest-devices-a-list",
        lambda r: _edit_json(r / MANIFEST, lambda m: m.update(devices=[])),
        EXPORT,
        "devices",
    ),
    Case(
        "export-manifest-model-dir-a-number",
        lambda r: _edit_json(r / MANIFEST, lambda m: m["models"][0].update(dir=7)),
        EXPORT,
        "models[0].dir",
    ),
    Case(
        "export-manifest-device-ids-not-numbers",
        lambda r: _edit_json(r / MANIFEST, lambda m: m.update(devices={"x": m["devices"]["0"]})),
        (*EXPORT, "--device", "7"),
        "devices",
    ),
    Case(
        "export-manifest-device-model-a-list",
        lambda r: _edit_json(r / MANIFEST, lambda m: m["devices"]["0"].update(model=["dense"])),
        EXPORT_0,
        "devices.0.model",
    ),
    Case("export-manifest-over-the-cap", lambda r: _huge(r / MANIFEST), EXPORT, "manifest.json"),
    Case("export-manifest-a-fifo", lambda r: _fifo(r / MANIFEST), EXPORT, "manifest.json: is a FIFO"),
    Case(
        "export-manifest-links-outside",
        lambda r: _moved_outside(r, "models/manifest.json"),
        EXPORT,
        "manifest.json",
    ),
    Case("export-models-links-outside", lambda r: _moved_outside(r, "models"), EXPORT, "models"),
    Case("export-personal-model-links-outside", _personal_model_outside, EXPORT_0, "personal/device-0"),
    # report: nothing read outside the run, nothing written outside it, every record checked
    Case(
        "report-plots-links-outside",
        lambda r: ((r / "outside/plots").mkdir(), _link(r / "run/plots", r / "outside/plots")),
        REPORT,
        "plots",
    ),
    Case(
        "report-plots-is-a-file",
        lambda r: (_replace(r / "run/plots"), (r / "run/plots").write_text("x")),
        REPORT,
        "plots",
    ),
    Case(
        "report-summary-rounds-beyond-a-float",
        lambda r: (r / SUMMARY).write_text(
            (r / SUMMARY).read_text().replace('"rounds": 1', '"rounds": 1e400')
        ),
        REPORT,
        "summary.json",
    ),
    Case(
        "report-summary-device-id-text",
        lambda r: _edit_json(r / SUMMARY, lambda s: s["devices"][0].update(device_id="x")),
        REPORT,
        "devices[0].device_id",
    ),
    Case("report-summary-nested-too-deeply", lambda r: _deeply_nested(r / SUMMARY), REPORT, "summary.json"),
    Case("report-summary-a-fifo", lambda r: _fifo(r / SUMMARY), REPORT, "summary.json"),
    Case("report-summary-links-outside", lambda r: _moved_outside(r, "summary.json"), REPORT, "summary.json"),
    Case(
        "report-config-links-to-a-secret",
        lambda r: _link(r / "run/config.toml", r / "outside/secret.txt"),
        REPORT,
        "config.toml",
    ),
    Case("report-events-over-the-cap", lambda r: _huge(r / "run/events.jsonl"), REPORT, "over the 64 MiB"),
    Case(
        "report-summary-device-model-unlisted",
        lambda r: _edit_json(r / SUMMARY, lambda s: s["device_models"]["devices"]["0"].update(model="ghost")),
        REPORT,
        "device_models.devices.0.model",
    ),
    Case(
        "report-task-event-bytes-text",
        lambda r: _task_event_with(r / "run", uplink_bytes="many"),
        REPORT,
        "uplink_bytes",
    ),
    Case(
        "report-rounds-csv-inf",
        lambda r: (r / "run/rounds.csv").write_text(
            (r / "run/rounds.csv").read_text().replace("\n1,", "\n1e999,", 1)
        ),
        REPORT,
        "rounds.csv",
    ),
    # compare: targets and flags checked first; every summary and sweep.json checked
    *(
        Case(f"compare-target-{name}", _nothing, (*COMPARE, "--target", value), "--target")
        for name, value in [
            ("nan", "nan"),
            ("inf", "inf"),
            ("negative", "-1"),
            ("zero", "0"),
            ("unknown-arm", "0.95*nosucharm"),
            ("fraction-above-1", "2*fedit"),
            ("garbage", "garbage"),
        ]
    ),
    Case(
        "compare-out-is-a-file",
        lambda r: (r / "cmp").write_text("x"),
        (*COMPARE, "--out", "{root}/cmp"),
        "--out",
    ),
    Case(
        "compare-out-is-a-dangling-link",
        lambda r: (r / "cmp").symlink_to(r / "nowhere"),
        (*COMPARE, "--out", "{root}/cmp"),
        "--out",
    ),
    Case(
        "compare-plots-link-outside",
        lambda r: (r / "sweep/comparison_plots").symlink_to(r / "outside"),
        COMPARE,
        "comparison_plots",
    ),
    Case(
        "compare-metric-nan",
        lambda r: _seed_summary(r, lambda s: s["metric"].update(value=float("nan"))),
        COMPARE,
        "summary.json",
    ),
    Case(
        "compare-uplink-bytes-negative",
        lambda r: _seed_summary(r, lambda s: s.update(uplink_bytes=-5)),
        COMPARE,
        "uplink_bytes",
    ),
    Case(
        "compare-wall-seconds-huge",
        lambda r: _seed_summary(r, lambda s: s.update(wall_seconds=1e300)),
        COMPARE,
        "wall_seconds",
    ),
    Case(
        "compare-evaluation-time-text",
        lambda r: _seed_summary(r, lambda s: s["evaluations"][0].update(virtual_time="soon")),
        COMPARE,
        "evaluations[0].virtual_time",
    ),
    Case(
        "compare-seed-fractional", lambda r: _seed_summary(r, lambda s: s.update(seed=7.5)), COMPARE, "seed"
    ),
    Case(
        "compare-summary-nested-too-deeply",
        lambda r: _deeply_nested(r / "sweep/other/seed-1/summary.json"),
        COMPARE,
        "summary.json",
    ),
    Case(
        "compare-summary-links-outside",
        lambda r: _link(r / "sweep/other/seed-1/summary.json", _outside_run(r) / "summary.json"),
        COMPARE,
        "summary.json",
    ),
    Case(
        "compare-seed-folder-links-outside",
        lambda r: (r / "sweep/other/seed-5").symlink_to(_outside_run(r)),
        COMPARE,
        "seed-5",
    ),
    Case(
        "compare-arm-folder-links-outside",
        lambda r: (r / "sweep/elsewhere").symlink_to(_outside_run(r).parent),
        COMPARE,
        "elsewhere",
    ),
    Case(
        "compare-sweep-json-arms-a-string",
        lambda r: _write_json(r / "sweep/sweep.json", {"arms": "fedit"}),
        COMPARE,
        "sweep.json",
    ),
    Case(
        "compare-sweep-json-arm-outside",
        lambda r: (_outside_run(r), _write_json(r / "sweep/sweep.json", {"arms": ["../outside/elsewhere"]})),
        COMPARE,
        "sweep.json",
    ),
    Case(
        "compare-sweep-json-reference-a-number",
        lambda r: _write_json(r / "sweep/sweep.json", {"reference": 7}),
        COMPARE,
        "sweep.json",
    ),
    Case(
        "compare-sweep-json-target-nan",
        lambda r: _write_json(r / "sweep/sweep.json", {"target": "nan"}),
        COMPARE,
        "sweep.json",
    ),
    Case("compare-sweep-json-a-fifo", lambda r: _fifo(r / "sweep/sweep.json"), COMPARE, "sweep.json"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_run_directories_and_flags_are_refused_before_anything_is_written(
    root: Path, case: Case
) -> None:
    case.plant(root)
    refuse([arg.replace("{root}", str(root)) for arg in case.args], root, names=case.names)


KEPT = [  # refused before this change too; kept so
    Case("compare-unknown-arm", _nothing, (*COMPARE, "--arms", "fedit,ghost"), "--arms"),
    Case("compare-unknown-reference", _nothing, (*COMPARE, "--reference", "ghost"), "--reference"),
    Case(
        "compare-a-directory-with-no-runs",
        lambda r: (r / "empty").mkdir(),
        ("compare", "{root}/empty"),
        "no finished run",
    ),
    Case("export-unknown-device", _nothing, (*EXPORT, "--device", "99"), "--device"),
]


@pytest.mark.parametrize("case", KEPT, ids=[case.id for case in KEPT])
def test_unknown_names_and_empty_directories_stay_refused(root: Path, case: Case) -> None:
    case.plant(root)
    refuse([arg.replace("{root}", str(root)) for arg in case.args], root, names=case.names)


def _ok(root: Path, *args: str) -> None:
    result = CliRunner().invoke(app, [a.replace("{root}", str(root)) for a in args])
    assert result.exit_code == 0, result.output


def test_report_replaces_links_at_its_outputs_and_leaves_their_targets_alone(root: Path) -> None:
    """A link planted at ``report.html`` or at a plot is replaced by the new file (atomic rename),
    never written through; the new files are readable as a plain write leaves them."""
    run, outside = root / "run", root / "outside"
    _link(run / "report.html", outside / "secret.txt")
    _link(run / "plots" / "device_time.png", outside / "secret.txt")
    before = snapshot(outside)
    _ok(root, *REPORT)
    assert snapshot(outside) == before and (outside / "secret.txt").read_text() == SECRET
    umask = os.umask(0)
    os.umask(umask)
    for path in (run / "report.html", run / "plots" / "device_time.png"):
        assert path.is_file() and not path.is_symlink()
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert "<!DOCTYPE html>" in (run / "report.html").read_text()


def test_compare_replaces_links_at_its_outputs(root: Path) -> None:
    _link(root / "sweep" / "comparison.csv", root / "outside" / "secret.txt")
    _ok(root, *COMPARE)
    assert (root / "outside" / "secret.txt").read_text() == SECRET
    assert not (root / "sweep" / "comparison.csv").is_symlink()
    assert (root / "sweep" / "comparison.csv").read_text().startswith("arm,")


def test_compare_never_reads_runs_json(root: Path) -> None:
    """``runs.json`` (the sweep runner's log) is not an input of a comparison: a FIFO there, which
    would hang a reader, changes nothing."""
    _fifo(root / "sweep" / "runs.json")
    _ok(root, *COMPARE)
    assert (root / "sweep" / "comparison.md").is_file()


def test_export_copies_links_that_stay_inside_the_run_as_files(root: Path) -> None:
    dense = root / "run" / "models" / "dense"
    (dense / "the_config.toml").symlink_to(root / "run" / "config.toml")
    _ok(root, *EXPORT)
    copied = root / "exported" / "dense" / "the_config.toml"
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_text() == (root / "run" / "config.toml").read_text()
    assert json.loads((root / "exported" / "manifest.json").read_text())["devices"]["0"]["model"] == "dense"


HOSTILE_VALUES = ["3", [1], {}, True, None, -1, 0.5, 1e300, 10**30]


def test_every_summary_number_is_checked_or_sound(finished_run: Path) -> None:
    """Each top-level number of a real summary set to each hostile value: refused naming the key, or
    read as a finite number in range (a count whole and >= 0, a duration >= 0 and bounded)."""
    data = json.loads((finished_run / "summary.json").read_text())
    keys = [k for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert len(keys) >= 14
    for key in keys:
        for value in HOSTILE_VALUES:
            try:
                summary = Summary.from_json({**data, key: value})
            except ValueError as error:
                assert f"'{key}'" in str(error), (key, value, error)
                continue
            read = getattr(summary, key)
            assert read is None or (isinstance(read, (int, float)) and abs(read) <= 1e150), (key, value)
            assert (
                key in ("chance_level", "target", "initial_metric", "final_eval_loss")
                or read is None
                or read >= 0
            )
