"""Atomic checkpoints and exact resume: a run killed and resumed ends as if never interrupted."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedspine.api import RoundRecord, resume_experiment, run_experiment
from fedspine.cli import app as cli
from fedspine.config import load_config
from fedspine.errors import CheckpointError
from fedspine.runtime.checkpoint import complete, verify
from fedspine.runtime.lock import run_lock

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
ARGS = ["scheduler.rounds=6", "export.speed=false", "export.save=false", "data.test_size=40"]
SAME = (
    "metric",
    "final_eval_loss",
    "evaluations",
    "tasks",
    "virtual_seconds",
    "uplink_bytes",
    "downlink_bytes",
)


def assert_same_run(a: Path, b: Path) -> None:
    """Same summary metrics and identical (virtual-time) records."""
    x, y = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in SAME:
        assert x[key] == y[key], key
    for name in ("events.jsonl", "rounds.csv"):
        assert (a / name).read_text() == (b / name).read_text(), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    run_experiment(load_config(TINY, ARGS), out)
    return out


def _start_run(out: Path, args: list[str]) -> subprocess.Popen[bytes]:
    """``fedspine run`` on the tiny config with ``args``, in a process of its own."""
    cmd = [str(Path(sys.executable).parent / "fedspine"), "run", "--config", str(TINY), "--out", str(out)]
    cmd += [a for arg in args for a in ("--set", arg)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_checkpoint(proc: subprocess.Popen[bytes], out: Path, round_no: int) -> Path:
    """Wait (up to 300 s) until checkpoint ``round_no`` is complete or the run ends; its manifest's path."""
    manifest = out / "checkpoints" / f"round-{round_no:06d}" / "MANIFEST.json"
    deadline = time.time() + 300
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    return manifest


def _sigkill_after_checkpoint(out: Path, args: list[str], round_no: int, delay_key: object) -> Path:
    """Run, SIGKILL it at a random moment just after checkpoint ``round_no``; its manifest's path."""
    proc = _start_run(out, args)
    try:
        manifest = _wait_for_checkpoint(proc, out, round_no)
        time.sleep(random.Random(delay_key).uniform(0.0, 0.05))  # somewhere early in what follows
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "summary.json").exists()
    return manifest


@pytest.mark.parametrize("kill_after", [1, 3])
def test_a_run_killed_with_sigkill_resumes_to_the_same_result(
    uninterrupted: Path, tmp_path: Path, kill_after: int
) -> None:
    """Kill the CLI at a random moment after checkpoint ``kill_after`` is complete, then resume."""
    out = tmp_path / "run"
    _sigkill_after_checkpoint(out, ARGS, kill_after, kill_after)
    result = CliRunner().invoke(cli, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert_same_run(uninterrupted, out)


ASYNC = {  # FedBuff keeps updates in flight across every checkpoint; FedCompass here loses devices
    "fedbuff": ["scheduler.name=fedbuff", "scheduler.rounds=6"],
    "fedcompass-sessions": [
        "scheduler.name=fedcompass",
        "scheduler.rounds=6",
        "fleet.trace.kind=sessions",
        "fleet.trace.mean_online_seconds=0.05",
        "fleet.trace.mean_offline_seconds=0.02",
    ],
}


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(ASYNC))
def test_an_async_run_killed_with_sigkill_resumes_to_the_same_result(tmp_path: Path, name: str) -> None:
    """Checkpoints of an event-driven run hold its queue, tasks in flight and buffered updates."""
    args = [*ARGS[1:], *ASYNC[name]]
    run_experiment(load_config(TINY, args), tmp_path / "full")
    out = tmp_path / "run"
    manifest = _sigkill_after_checkpoint(out, args, 2, name)
    state = (manifest.parent / "state.json").read_text()
    assert "fedspine.runtime.tasks:RunningTask" in state, "the checkpoint holds no task in flight"
    result = CliRunner().invoke(cli, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert_same_run(tmp_path / "full", out)
    events = _events(out)
    statuses = {e["status"] for e in events if e["event"] == "task"}
    steps = [e for e in events if e["event"] == "server_step"]
    assert len(steps) == 6 and any(tau > 0 for e in steps for tau in e["staleness"])
    if "sessions" in name:
        assert "dropped" in statuses


class _Crash(Exception):
    pass


def _crash_after(round_no: int):  # type: ignore[no-untyped-def]
    def on_round(record: RoundRecord, _evaluation: object) -> None:
        if record.round == round_no + 1:  # during the next round's bookkeeping: its checkpoint is not written
            raise _Crash

    return on_round


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy.name=fedspine"],  # masks, importance, the bandit's statistics
        ["strategy.name=flora"],  # adapters merged into the base weights
        ["compression.codec=topk", "compression.feedback=ef21"],  # error-feedback memories
        ["strategy.name=hetlora", "lora.ranks=[2, 4, 8, 2, 4, 8]"],  # ranks devices shrank
    ],
    ids=["fedspine", "flora", "ef21", "hetlora"],
)
def test_every_kind_of_state_survives_a_crash(tmp_path: Path, overrides: list[str]) -> None:
    cfg = load_config(TINY, [*ARGS, *overrides])
    run_experiment(cfg, tmp_path / "full")
    with pytest.raises(_Crash):
        run_experiment(cfg, tmp_path / "crashed", on_round=_crash_after(2))
    assert (tmp_path / "crashed" / "FAILED").exists()
    said: list[str] = []
    resume_experiment(tmp_path / "crashed", on_status=said.append)
    assert [m.split()[-1] for m in said if m.startswith("resuming")] == ["2"], said  # the newest loaded
    assert not (tmp_path / "crashed" / "FAILED").exists()
    assert_same_run(tmp_path / "full", tmp_path / "crashed")


def test_a_torn_checkpoint_is_detected_and_never_loaded(uninterrupted: Path, tmp_path: Path) -> None:
    cfg = load_config(TINY, ARGS)
    out = tmp_path / "run"
    with pytest.raises(_Crash):
        run_experiment(cfg, out, on_round=_crash_after(2))
    newest = out / "checkpoints" / "round-000002"
    state = newest / "state.json"
    state.write_bytes(state.read_bytes()[:-100])  # torn: shorter than its manifest says
    assert "does not match its checksum" in str(verify(newest))
    (out / "checkpoints" / ".tmp-round-000003").mkdir()  # an unfinished write is ignored too
    assert [d.name for d in complete(out)] == ["round-000001"]
    resume_experiment(out)  # from round 1, not from the torn round 2
    assert_same_run(uninterrupted, out)


def test_resume_refuses_what_it_cannot_continue(uninterrupted: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="already finished"):
        resume_experiment(uninterrupted)
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints")
    result = CliRunner().invoke(cli, ["run", "--resume", str(run)])
    assert result.exit_code == 1 and "no complete checkpoint" in " ".join(result.output.split())
    (run / "checkpoints" / "round-000001").mkdir(parents=True)  # no manifest: never finished
    with pytest.raises(CheckpointError, match="no manifest"):
        resume_experiment(run)
    result = CliRunner().invoke(cli, ["run", "--resume", str(run), "--set", "train.lr=1"])
    assert result.exit_code == 2 and "--resume" in result.output


def test_checkpoints_are_kept_to_the_newest_few(uninterrupted: Path) -> None:
    names = sorted(d.name for d in (uninterrupted / "checkpoints").iterdir())
    assert names == ["round-000004", "round-000005"]  # every round but the last, newest 2 kept


def test_a_second_process_on_a_run_directory_exits_at_once_and_the_first_finishes_intact(
    uninterrupted: Path, tmp_path: Path
) -> None:
    """While a run holds its directory, another ``run --out`` into it and a ``--resume`` of it exit 1
    without writing; the first run's records equal an uninterrupted run's."""
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "fedspine"), "run", "--config", str(TINY), "--out", str(out)]
    cmd += [a for arg in ARGS for a in ("--set", arg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "config.toml").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the first run ended before the second could start"
        runner = CliRunner()
        second = runner.invoke(cli, ["run", "--config", str(TINY), "--out", str(out), "--set", ARGS[0]])
        assert second.exit_code == 2 and "not empty" in second.output, second.output
        resumed = runner.invoke(cli, ["run", "--resume", str(out)])
        assert resumed.exit_code == 1 and "another fedspine process" in resumed.output, resumed.output
        assert proc.wait(timeout=600) == 0
    finally:
        proc.kill()
        proc.wait()
    assert_same_run(uninterrupted, out)


def test_two_runs_that_both_found_the_directory_empty_cannot_both_write(tmp_path: Path) -> None:
    """The race the emptiness check alone loses: a run holds the lock of a still-empty directory."""
    out = tmp_path / "run"
    with run_lock(out):
        second = CliRunner().invoke(cli, ["run", "--config", str(TINY), "--out", str(out), "--set", ARGS[0]])
        assert second.exit_code == 1 and "another fedspine process" in second.output, second.output
        assert [p.name for p in out.iterdir()] == [".lock"]  # the second wrote nothing
    with pytest.raises(CheckpointError), run_lock(tmp_path / "fails"):
        raise CheckpointError("bad input")
    assert not (tmp_path / "fails").exists()  # a directory the lock created is removed when nothing started


def test_a_checkpoint_that_does_not_load_falls_back_to_the_older_one(tmp_path: Path) -> None:
    """The newest checkpoint verifies against a recomputed manifest but its state does not load; an
    unexpected file makes another one torn: resume takes the next older checkpoint, and ends as an
    uninterrupted run."""
    cfg = load_config(TINY, ARGS)
    run_experiment(cfg, tmp_path / "full")
    with pytest.raises(_Crash):
        run_experiment(cfg, tmp_path / "crashed", on_round=_crash_after(3))
    checkpoints = sorted((tmp_path / "crashed" / "checkpoints").glob("round-*"))
    assert len(checkpoints) == 2
    newest = checkpoints[-1]
    _replace_state(newest, b'{"$object": "fedspine.config:Config", "$id": 0, "fields": {}}')
    assert verify(newest) is None
    extra = tmp_path / "extra"
    shutil.copytree(checkpoints[0], extra)
    (extra / "notes.txt").write_text("x")
    assert "notes.txt" in str(verify(extra))
    resume_experiment(tmp_path / "crashed")
    assert_same_run(tmp_path / "full", tmp_path / "crashed")


def test_records_shorter_than_the_checkpoint_refuse_to_resume(tmp_path: Path) -> None:
    """A lost tail of events.jsonl (page cache lost at power failure) is not padded with zero bytes."""
    cfg = load_config(TINY, ARGS)
    with pytest.raises(_Crash):
        run_experiment(cfg, tmp_path / "crashed", on_round=_crash_after(2))
    events = tmp_path / "crashed" / "events.jsonl"
    events.write_bytes(events.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="records were lost"):
        resume_experiment(tmp_path / "crashed")
    assert b"\x00" not in events.read_bytes()


def test_sigterm_leaves_a_failed_marker_and_the_run_resumes(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start_run(out, ARGS)
    try:
        _wait_for_checkpoint(proc, out, 1)
        assert proc.poll() is None, "the run finished before it could be terminated"
        proc.terminate()
        assert proc.wait(timeout=120) != 0
    finally:
        proc.kill()
        proc.wait()
    assert (out / "FAILED").exists() and not (out / "summary.json").exists()
    result = CliRunner().invoke(cli, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert_same_run(uninterrupted, out)


def _replace_state(checkpoint: Path, state: bytes) -> None:
    """Swap a checkpoint's state and recompute its manifest, as someone who can write the directory could."""
    (checkpoint / "state.json").write_bytes(state)
    manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
    manifest["files"]["state.json"] = hashlib.sha256(state).hexdigest()
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))
    assert verify(checkpoint) is None


class _Payload:
    """What an attacker pickles: unpickling it would create a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def test_a_crafted_checkpoint_cannot_run_code(tmp_path: Path) -> None:
    """A checkpoint holds no pickle. States crafted to run ``os.system`` (a pickle payload, and JSON
    naming ``os:system`` as a class, as a method, or through a fedspine module that imports ``os``), with
    recomputed manifests: no checkpoint loads, resume exits with why, and nothing runs."""
    cfg = load_config(TINY, ARGS)
    with pytest.raises(_Crash):
        run_experiment(cfg, tmp_path / "crashed", on_round=_crash_after(3))
    checkpoints = sorted((tmp_path / "crashed" / "checkpoints").glob("round-*"))
    for checkpoint in checkpoints:
        for path in checkpoint.iterdir():
            assert not path.read_bytes().startswith(b"\x80"), f"{path.name} is a pickle"
    marker = tmp_path / "pwned"
    command = {"$tuple": [f"touch {marker}"], "$id": 1}
    crafted = [
        pickle.dumps({"engine": _Payload(marker)}),
        json.dumps({"$object": "os:system", "$id": 0, "fields": {"command": command}}).encode(),
        json.dumps({"$object": "fedspine.runtime.checkpoint:os", "$id": 0, "fields": {}}).encode(),
        json.dumps({"$method": "system", "self": {"$object": "os:x", "$id": 1}, "$id": 0}).encode(),
    ]
    for state in crafted:
        for checkpoint in checkpoints:
            _replace_state(checkpoint, state)
        with pytest.raises(CheckpointError, match="no complete checkpoint"):
            resume_experiment(tmp_path / "crashed")
        assert not marker.exists()
