"""A whole sweep: prepare its directory, run what is not finished, compare what is."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedspine import api
from fedspine.errors import ConfigError, FedspineError
from fedspine.report.compare import SWEEP_FILE, read_plan
from fedspine.sweep.runner import (
    Event,
    RunOutcome,
    RunSpec,
    is_finished,
    run_local,
    run_ray,
    write_runs_file,
)
from fedspine.sweep.spec import Sweep


@dataclass
class SweepResult:
    """A finished sweep: every run's outcome and the comparison files (none if no run finished)."""

    out: Path
    outcomes: list[RunOutcome]
    comparison_files: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def available_cores() -> int:
    """CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_budget(workers: int, threads: int | None, ray: bool) -> int:
    """torch threads per run: ``threads``, else cores // workers locally (1 per run on Ray).

    Raises:
        ConfigError: ``workers`` or ``threads`` below 1, or local workers x threads above the cores.
    """
    if workers < 1:
        raise ConfigError("--workers", f"must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError("--threads", f"must be >= 1, got {threads}")
    if ray:
        return threads or 1
    cores = available_cores()
    budget = threads or max(1, cores // workers)
    if workers * budget > cores:
        raise ConfigError(
            "--threads",
            f"{workers} workers x {budget} threads exceed this machine's {cores} cores (torch threads "
            "fighting over cores make every run slower); lower --workers or --threads",
        )
    return budget


def plan_runs(sweep: Sweep, out: Path, threads: int) -> list[RunSpec]:
    """Every (arm, seed) of ``sweep`` as a run under ``out``, seed-major: a sweep stopped early has
    every arm at its first seeds, so its finished runs are already paired comparisons."""
    from fedspine.config import to_toml

    return [
        RunSpec(arm.name, seed, out / arm.name / f"seed-{seed}", to_toml(sweep.config(arm, seed, threads)))
        for seed in sweep.seeds
        for arm in sweep.arms
    ]


def check_arms(sweep: Sweep, arms: Sequence[str] | None) -> set[str]:
    """The names of the arms to run: ``arms``, or all of the sweep's when None.

    Raises:
        ConfigError: ``arms`` is empty or names an arm the sweep does not have.
    """
    known = [a.name for a in sweep.arms]
    if arms is None:
        return set(known)
    unknown = [a for a in arms if a not in known]
    if unknown or not arms:
        raise ConfigError(
            "--arm",
            f"unknown arm(s) {', '.join(unknown) or '(none given)'}; the sweep's arms are {', '.join(known)}",
        )
    return set(arms)


def prepare_out(sweep: Sweep, out: Path, resume: bool) -> None:
    """Create ``out`` with ``sweep.json``; with ``resume``, check it was made from the same sweep.

    Raises:
        ConfigError: ``out`` holds something else (without ``resume``), or another sweep's runs.
    """
    plan = sweep.plan()
    plan_path = out / SWEEP_FILE
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError("--out", f"{out} is a file or a link, not a sweep directory")
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise ConfigError(
                "--out", f"{out} exists and is not empty; pass --resume to continue it, or choose a new one"
            )
        if plan_path.exists() or plan_path.is_symlink():
            _check_same(sweep, _read_plan(plan_path), plan, out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f".{SWEEP_FILE}.partial"
    partial.write_text(json.dumps(plan, indent=2, default=str) + "\n", encoding="utf-8")
    partial.replace(plan_path)


def _read_plan(path: Path) -> dict[str, Any]:
    """The ``sweep.json`` a sweep directory was made with (:func:`~fedspine.report.compare.read_plan`,
    which reads it as untrusted input), with its arm fingerprints."""
    plan = read_plan(path.parent)
    if not isinstance(plan.get("fingerprints", {}), dict):
        raise ConfigError("--resume", f"{path}: not a sweep plan (its 'fingerprints' is not an object)")
    return plan


def _check_same(sweep: Sweep, old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    """Refuse to resume ``out`` with other settings.

    An arm whose fingerprint changed is still the same when each of its finished runs' ``config.toml``,
    read by today's code, is the config that run would get now (threads aside): a key added to the
    config since then reads as its default, which is the behaviour the run had (a new key's default
    keeps what the code did before it; the golden records check that of engine changes).
    """
    old_prints, new_prints = old.get("fingerprints") or {}, new["fingerprints"]
    changed = [a for a in new_prints if a in old_prints and old_prints[a] != new_prints[a]]
    different = [a for a in changed if not _finished_runs_match(sweep, a, out)]
    if different:
        raise ConfigError(
            "--resume",
            f"{out} was made with other settings for arm(s) {', '.join(different)} (the sweep file or its "
            "base config changed); use a new --out",
        )


def _finished_runs_match(sweep: Sweep, arm_name: str, out: Path) -> bool:
    """Whether every finished run of ``arm_name`` under ``out`` ran the config it would get now."""
    from dataclasses import replace

    from fedspine.config import load_config

    arm = next(a for a in sweep.arms if a.name == arm_name)
    for seed in sweep.seeds:
        run_dir = out / arm_name / f"seed-{seed}"
        if not is_finished(run_dir):
            continue
        try:
            ran = load_config(run_dir / "config.toml")
        except (OSError, FedspineError):
            return False
        now = sweep.config(arm, seed, ran.run.threads)
        if replace(ran, run=replace(ran.run, threads=now.run.threads)) != now:
            return False
    return True


def run_sweep(
    sweep: Sweep,
    out: Path,
    workers: int = 1,
    threads: int | None = None,
    resume: bool = False,
    ray_address: str | None = None,
    on_event: Event | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    arms: Sequence[str] | None = None,
) -> SweepResult:
    """Run every (arm, seed) of ``sweep`` under ``out``, then compare them.

    ``arms``: run only these arms' unfinished runs now (the comparison still covers every finished
    run): a sweep larger than one sitting runs its most telling arms first, or on several machines.
    ``on_plan(to_run, already_finished)`` is told the counts before any run starts; ``on_event`` is
    told each run's start and end.

    Raises:
        ConfigError: bad ``workers``/``threads``, an arm the sweep does not have, or ``out`` holds
            something else (see :func:`prepare_out`).
    """
    budget = thread_budget(workers, threads, ray_address is not None)
    chosen = check_arms(sweep, arms)
    prepare_out(sweep, out, resume)
    specs = plan_runs(sweep, out, budget)
    done = [s for s in specs if is_finished(s.run_dir)]
    todo = [s for s in specs if not is_finished(s.run_dir) and s.arm in chosen]
    if on_plan is not None:
        on_plan(len(todo), len(done))
    notify = on_event or (lambda *_: None)
    outcomes = [RunOutcome(s.arm, s.seed, "skipped") for s in done]
    finished: list[RunOutcome] = []

    def record(kind: str, spec: RunSpec, outcome: RunOutcome | None) -> None:
        if outcome is not None:
            finished.append(outcome)
            write_runs_file(out, outcomes + finished)
        notify(kind, spec, outcome)

    if todo:
        if ray_address is not None:
            run_ray(todo, ray_address, budget, record)
        else:
            run_local(todo, workers, record)
    outcomes += finished
    write_runs_file(out, outcomes)
    result = SweepResult(out, outcomes)
    if any(o.status != "failed" for o in outcomes):
        _, result.comparison_files = api.compare_runs([out], out=out)
    return result
