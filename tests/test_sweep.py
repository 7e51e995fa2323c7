"""Sweeps: the sweep file, bad input before anything runs, parallel runs, kill and resume, Ray."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

from fedspine.cli import app
from fedspine.config import tomllib
from fedspine.errors import ConfigError
from fedspine.runtime.experiment import check_config
from fedspine.sweep import load_sweep, plan_runs, thread_budget
from fedspine.sweep.spec import parse_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
FEDSPINE = str(Path(sys.executable).parent / "fedspine")
SMALL = """
base = "{tiny}"
seeds = 3
target = 0.2
[set]
"data.max_examples" = 600
"data.test_size" = 60
"scheduler.rounds" = {rounds}
"train.local_steps" = {steps}
"export.speed" = false
"export.save" = false
[arms.fedit]
"strategy.name" = "fedit"
[arms.flora]
"strategy.name" = "flora"
"""


def _sweep_file(tmp_path: Path, rounds: int = 2, text: str = SMALL, steps: int = 2) -> Path:
    path = tmp_path / "small.toml"
    path.write_text(text.format(tiny=TINY, rounds=rounds, steps=steps), encoding="utf-8")
    return path


# --- the sweep file ---------------------------------------------------------------------------


def test_named_arms_grid_and_seeds_become_runs(tmp_path: Path) -> None:
    data = {
        "base": str(TINY),
        "seeds": [3, 5],
        "arms": {"a": {"strategy": {"name": "fedit"}}, "b": {"strategy.name": "flora"}},
        "grid": {"train.lr": [1e-3, 2e-3]},
    }
    sweep = parse_sweep(data, tmp_path, "x")
    assert [a.name for a in sweep.arms] == ["a,lr=0.001", "a,lr=0.002", "b,lr=0.001", "b,lr=0.002"]
    runs = plan_runs(sweep, tmp_path / "out", threads=1)
    assert len(runs) == 8 and runs[0].run_dir == tmp_path / "out" / "a,lr=0.001" / "seed-3"
    assert [(r.arm, r.seed) for r in runs[3:5]] == [("b,lr=0.002", 3), ("a,lr=0.001", 5)]  # seed-major
    config = sweep.config(sweep.arms[3], seed=5, threads=1)
    assert (config.strategy.name, config.train.lr, config.run.seed, config.run.threads) == (
        "flora",
        2e-3,
        5,
        1,
    )
    assert config.fleet.groups[0].device_class == "raspberry_pi_4"  # the rest comes from the base


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('seeds = 2\n[arms.a]\n"strategy.nme" = "fedit"\n', "arms.a.strategy.nme"),
        ('seeds = 2\n[arms.a]\n"strategy.name" = "fedxx"\n', "arms.a.strategy.name"),
        ('seeds = 2\n[grid]\n"train.lr" = []\n', "grid.train.lr"),
        ("seeds = 2\n[arms]\n", "arms"),
        ("seeds = 0\n[arms.a]\n", "seeds"),
        ("seed = 2\n[arms.a]\n", "seed"),
        ('[arms.a]\n"run.seed" = 3\n', "arms.a.run.seed"),
        ('reference = "b"\n[arms.a]\n', "reference"),
        ('[arms."a/b"]\n', "arms.a/b"),
    ],
)
def test_a_bad_sweep_file_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'base = "{TINY}"\n' + text, encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_sweep(path)
    assert raised.value.key == key


def test_a_bad_sweep_file_exits_2_before_any_run(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'base = "{TINY}"\n[arms.a]\n"strategy.name" = "fedit"\n[arms.b]\n"lora.rnk" = 4\n')
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sweep", str(path), "--out", str(out)])
    assert result.exit_code == 2
    assert "arms.b.lora.rnk" in result.output
    assert not out.exists()


def test_workers_times_threads_may_not_exceed_the_cores() -> None:
    assert thread_budget(1, None, ray=False) >= 1
    with pytest.raises(ConfigError, match="--threads"):
        thread_budget(1, 10_000, ray=False)
    with pytest.raises(ConfigError, match="--workers"):
        thread_budget(0, None, ray=False)
    assert thread_budget(64, None, ray=True) == 1


# --- running ----------------------------------------------------------------------------------


def _table(out: Path) -> list[dict[str, str]]:
    """comparison.csv without the host-time columns (the only ones a machine's load changes)."""
    with (out / "comparison.csv").open() as f:
        return [
            {k: v for k, v in row.items() if not k.startswith("host_seconds")} for row in csv.DictReader(f)
        ]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie left for a container's init to reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "out"
    cmd = [FEDSPINE, "sweep", str(_sweep_file(tmp, rounds=4, steps=6)), "--out", str(out), "--workers", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_a_sweep_writes_every_run_directory_and_the_comparison(uninterrupted: Path) -> None:
    for arm in ("fedit", "flora"):
        for seed in range(3):
            run = uninterrupted / arm / f"seed-{seed}"
            summary = json.loads((run / "summary.json").read_text())
            assert summary["seed"] == seed and summary["strategy"] == arm
            assert (run / "report.html").is_file() and (run / "config.toml").is_file()
    for name in ("comparison.csv", "comparison.md", "comparison.html", "sweep.json", "runs.json"):
        assert (uninterrupted / name).is_file()
    rows = _table(uninterrupted)
    assert [r["arm"] for r in rows] == ["fedit", "flora"] and all(r["seeds"] == "3" for r in rows)
    statuses = {r["status"] for r in json.loads((uninterrupted / "runs.json").read_text())}
    assert statuses == {"finished"}


@pytest.mark.slow  # a sweep of worker processes, killed and resumed (about 80 s)
def test_a_sweep_killed_with_sigkill_resumes_to_the_same_table(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    sweep_file = _sweep_file(tmp_path, rounds=4, steps=6)  # rounds long enough to be caught mid-run
    cmd = [FEDSPINE, "sweep", str(sweep_file), "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 300
        # Kill once a run is finished and another has a checkpoint but no summary yet: mid-sweep, mid-run.
        while time.time() < deadline and proc.poll() is None:
            workers = sorted(set(workers) | set(_children(proc.pid)))
            finished = list(out.glob("*/seed-*/summary.json"))
            checkpointed = [
                p
                for p in out.glob("*/seed-*/checkpoints/round-*/MANIFEST.json")
                if not (p.parents[2] / "summary.json").exists()
            ]
            # a run with two rounds still to go: a worker takes a moment to notice its sweep is gone,
            # and a run in its last round could finish in that moment
            latest: dict[Path, int] = {}
            for p in checkpointed:
                latest[p.parents[2]] = max(latest.get(p.parents[2], 0), int(p.parent.name.split("-")[1]))
            if finished and any(r <= 2 for r in latest.values()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the sweep finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert len(list(out.glob("*/seed-*/summary.json"))) < 6
    deadline = time.time() + 5.0  # a worker notices its parent is gone within 0.1 s
    while time.time() < deadline and [pid for pid in workers if _alive(pid)]:
        time.sleep(0.1)
    alive = [pid for pid in workers if _alive(pid)]
    assert not alive, f"worker processes outlived the killed sweep: {alive}"
    interrupted = {
        (p.parents[2].parent.name, p.parents[2].name)
        for p in out.glob("*/seed-*/checkpoints/round-*/MANIFEST.json")
        if not (p.parents[2] / "summary.json").exists()
    }
    assert interrupted, "no run was caught between a checkpoint and its end"
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    statuses = {
        (r["arm"], f"seed-{r['seed']}"): r["status"] for r in json.loads((out / "runs.json").read_text())
    }
    assert "skipped" in statuses.values()
    assert all(statuses[run] == "resumed" for run in interrupted), statuses
    assert _table(out) == _table(uninterrupted)


def test_resume_refuses_a_directory_made_from_other_settings(uninterrupted: Path, tmp_path: Path) -> None:
    changed = _sweep_file(tmp_path, rounds=3, steps=6)
    result = CliRunner().invoke(app, ["sweep", str(changed), "--out", str(uninterrupted), "--resume"])
    assert result.exit_code == 2 and "other settings" in result.output
    result = CliRunner().invoke(app, ["sweep", str(changed), "--out", str(uninterrupted)])
    assert result.exit_code == 2 and "--resume" in result.output


def test_resume_accepts_runs_recorded_before_a_config_key_existed(
    uninterrupted: Path, tmp_path: Path
) -> None:
    """A run whose config.toml lacks a key added since (it reads as its default) is the same run; one
    whose recorded value differs is not."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    plan = json.loads((out / "sweep.json").read_text())
    plan["fingerprints"] = {arm: "0" * 16 for arm in plan["fingerprints"]}  # as an older schema's
    (out / "sweep.json").write_text(json.dumps(plan))
    for config in out.glob("*/seed-*/config.toml"):
        data = tomllib.loads(config.read_text())
        del data["eval"]["mode"], data["eval"]["local_fraction"]  # keys the old code did not have
        config.write_text(tomli_w.dumps(data))
    sweep_file = _sweep_file(tmp_path, rounds=4, steps=6)
    result = CliRunner().invoke(app, ["sweep", str(sweep_file), "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    statuses = {r["status"] for r in json.loads((out / "runs.json").read_text())}
    assert statuses == {"skipped"}  # nothing ran again
    config = out / "flora" / "seed-1" / "config.toml"
    data = tomllib.loads(config.read_text())
    data["train"]["lr"] = 1e-9  # a recorded value that differs: another run
    config.write_text(tomli_w.dumps(data))
    (out / "sweep.json").write_text(json.dumps(plan))  # the older schema's fingerprints again
    result = CliRunner().invoke(app, ["sweep", str(sweep_file), "--out", str(out), "--resume"])
    assert (
        result.exit_code == 2 and "flora" in result.output and "fedit" not in result.output.split("arm(s)")[1]
    )


def test_a_failing_run_is_recorded_and_the_others_finish(tmp_path: Path) -> None:
    """An arm whose data file is missing fails at run time; the sweep finishes the rest and exits 1."""
    text = (
        SMALL.replace("seeds = 3", "seeds = 1")
        + '[arms.broken]\n"data.source" = "jsonl"\n"data.path" = "/nonexistent.jsonl"\n'
    )
    sweep_file = _sweep_file(tmp_path, text=text)
    out = tmp_path / "out"
    result = subprocess.run(
        [FEDSPINE, "sweep", str(sweep_file), "--out", str(out), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "broken/seed-0" in result.stderr
    runs = {r["arm"]: r for r in json.loads((out / "runs.json").read_text())}
    assert runs["broken"]["status"] == "failed" and runs["broken"]["error"]
    assert runs["fedit"]["status"] == runs["flora"]["status"] == "finished"
    assert [r["arm"] for r in _table(out)] == ["fedit", "flora"]


def test_arm_runs_only_the_named_arms_and_a_later_resume_adds_the_others(tmp_path: Path) -> None:
    sweep_file = _sweep_file(tmp_path, rounds=1, text=SMALL.replace("seeds = 3", "seeds = 1"), steps=1)
    out = tmp_path / "out"
    unknown = CliRunner().invoke(app, ["sweep", str(sweep_file), "--out", str(out), "--arm", "flroa"])
    assert unknown.exit_code == 2 and "--arm" in unknown.output and "fedit, flora" in unknown.output
    assert not out.exists()
    first = CliRunner().invoke(app, ["sweep", str(sweep_file), "--out", str(out), "--arm", "flora"])
    assert first.exit_code == 0, first.output
    assert (out / "flora" / "seed-0" / "summary.json").is_file() and not (out / "fedit").exists()
    assert [r["arm"] for r in _table(out)] == ["flora"]
    rest = CliRunner().invoke(
        app, ["sweep", str(sweep_file), "--out", str(out), "--resume", "--arm", "fedit"]
    )
    assert rest.exit_code == 0, rest.output
    assert [r["arm"] for r in _table(out)] == ["fedit", "flora"]


# --- Ray --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_ray(temp_dir: str, port: int) -> None:
    """Stop only the Ray instance this test started (``ray stop`` would stop every one on the host)."""
    marks = (temp_dir.encode(), f":{port}".encode())
    ours = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if any(mark in cmdline.read_bytes() for mark in marks):
                ours.add(int(cmdline.parent.name))
        except OSError:
            continue
    ours |= {child for pid in ours for child in _children(pid)}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(pid) for pid in ours):
            time.sleep(0.2)


@pytest.mark.slow  # starts a local Ray cluster (about 85 s)
@pytest.mark.skipif(
    shutil.which("ray", path=str(Path(sys.executable).parent)) is None, reason="Ray not installed"
)
def test_the_ray_path_gives_the_summaries_of_the_process_pool(tmp_path: Path) -> None:
    text = SMALL.replace("seeds = 3", "seeds = 2").replace('[arms.flora]\n"strategy.name" = "flora"\n', "")
    sweep_file = _sweep_file(tmp_path, text=text)
    ray = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [ray, "start", "--head", "--num-cpus=1", f"--port={port}", "--node-ip-address=127.0.0.1"]
    start += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_tmp}"]
    started = subprocess.run(start, capture_output=True, text=True, env=env, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        on_ray = subprocess.run(
            [
                FEDSPINE,
                "sweep",
                str(sweep_file),
                "--out",
                str(tmp_path / "ray-out"),
                "--ray",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
    finally:
        _stop_ray(ray_tmp, port)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    local = subprocess.run(
        [FEDSPINE, "sweep", str(sweep_file), "--out", str(tmp_path / "local"), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    keys = ("metric", "evaluations", "virtual_seconds", "uplink_bytes", "downlink_bytes", "tasks", "devices")
    for seed in range(2):
        a = json.loads((tmp_path / "ray-out" / "fedit" / f"seed-{seed}" / "summary.json").read_text())
        b = json.loads((tmp_path / "local" / "fedit" / f"seed-{seed}" / "summary.json").read_text())
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


@pytest.mark.parametrize("path", sorted((ROOT / "bench" / "sweeps").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_sweep_file_plans_runs_that_pass_the_config_checks(path: Path) -> None:
    sweep = load_sweep(path)
    assert sweep.arms
    for arm in sweep.arms:
        check_config(sweep.config(arm, sweep.seeds[0]))
