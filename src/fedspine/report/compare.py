"""Comparing arms across seeds: which runs belong together, and their statistics.

A comparison reads finished run directories, groups them into arms, and computes per arm the mean and
95% interval of each figure (:mod:`fedspine.metrics.stats`), and per arm against a reference arm the
paired differences over the seeds both ran.

Where runs come from:

* a sweep directory (``DIR/<arm>/seed-<k>/``, as ``fedspine sweep`` writes it): every arm folder, in
  the order of the sweep file when ``sweep.json`` is there; runs without ``summary.json`` (unfinished
  or failed) are counted as missing;
* any list of run directories: a run in a folder named ``seed-<k>`` belongs to the arm named by its
  parent folder, any other run is an arm of its own named by its folder. Runs are paired by the seed
  in their ``summary.json``.

A sweep or run directory is untrusted input: nothing is read outside it (a run folder, arm folder or
file whose links lead out is refused, naming it), ``sweep.json`` and every ``summary.json`` are read
through the size-capped regular-file reader and checked (:meth:`Summary.from_json`), and ``sweep.json``
may name only plain arm folders.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedspine.errors import ConfigError
from fedspine.files import CONFIG_LIMIT, check_inside, parse_json, read_text
from fedspine.metrics.stats import (
    NO_VALUES,
    Interval,
    Reached,
    best_value,
    paired_difference,
    paired_ratio,
    reached_summary,
    t_interval,
    time_to_target,
)
from fedspine.metrics.summary import Summary
from fedspine.report.load import SUMMARY_FILE, read_summary

SWEEP_FILE = "sweep.json"
"""The plan a sweep directory was made from (arm order, seeds, reference, target)."""
SEED_DIR = re.compile(r"seed-([0-9]{1,20})")
"""A seed folder's name (matched whole)."""
ARM_NAME = re.compile(r"[^/\\\x00]{1,200}")
"""An arm's folder name as ``sweep.json`` may give it: one path component (``.`` and ``..`` aside)."""


@dataclass(frozen=True)
class ArmRun:
    """One finished run of an arm."""

    arm: str
    seed: int
    run_dir: Path
    summary: Summary

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        """The run's evaluations (``virtual_time``, ``value``) that have a value (a non-finite metric
        is written as null)."""
        return [e for e in self.summary.evaluations if e["value"] is not None]

    @property
    def higher_is_better(self) -> bool:
        return self.summary.metric.higher_is_better


@dataclass(frozen=True)
class RunSet:
    """The runs of a comparison, grouped by arm in display order."""

    arms: dict[str, list[ArmRun]]
    missing: dict[str, int] = field(default_factory=dict)
    """Per arm, runs of the sweep that have no ``summary.json`` (not finished, or failed)."""
    plan: dict[str, Any] = field(default_factory=dict)
    """``sweep.json`` of a sweep directory (empty otherwise)."""
    plan_path: Path | None = None
    """Where ``plan`` was read from (None: no ``sweep.json``), for errors about its values."""


# --- finding runs -------------------------------------------------------------------------------


def find_runs(paths: Sequence[Path]) -> RunSet:
    """The runs under ``paths``: one sweep directory, or run directories (see the module docstring).

    Raises:
        ConfigError: a path is neither, two runs claim one (arm, seed), no run finished, or
            ``sweep.json`` is malformed.
        FedspineError: a file is not a regular file inside its directory, too large or malformed
            (:class:`~fedspine.report.load.ReportError`, :class:`~fedspine.files.InputFileError`).
    """
    if not paths:
        raise ConfigError("PATH", "name a sweep directory or at least one run directory")
    if len(paths) == 1 and not _has_summary(paths[0]):
        return _sweep_runs(paths[0])
    runs: dict[str, list[ArmRun]] = {}
    for path in paths:
        if not _has_summary(path):
            raise ConfigError(str(path), "not a finished run directory (it has no summary.json)")
        match = SEED_DIR.fullmatch(path.name)
        arm = path.parent.name if match else path.name
        _add(runs, _load(arm, path, path))
    return RunSet(arms=runs)


def _has_summary(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds something named ``summary.json`` (a link or a FIFO too: reading it
    says what is wrong with it)."""
    return os.path.lexists(run_dir / SUMMARY_FILE)


def _sweep_runs(root: Path) -> RunSet:
    if not root.is_dir():
        raise ConfigError(str(root), "no such directory" if not root.exists() else "not a directory")
    plan = read_plan(root)
    order = list(plan.get("arms") or [])
    folders = sorted(p for p in root.iterdir() if p.is_dir() and any(_seed_dirs(p, root)))
    order += [p.name for p in folders if p.name not in order]
    runs: dict[str, list[ArmRun]] = {}
    missing: dict[str, int] = {}
    for arm in order:
        for run_dir in _seed_dirs(root / arm, root):
            if _has_summary(run_dir):
                _add(runs, _load(arm, run_dir, root))
            else:
                missing[arm] = missing.get(arm, 0) + 1
    if not runs:
        raise ConfigError(str(root), "holds no finished run (no <arm>/seed-<k>/summary.json)")
    plan_path = root / SWEEP_FILE if plan else None
    return RunSet(arms=runs, missing=missing, plan=plan, plan_path=plan_path)


def _seed_dirs(arm_dir: Path, root: Path) -> list[Path]:
    """The ``seed-<k>`` folders of an arm folder, in seed order; an arm or seed folder whose links
    lead out of the sweep directory ``root`` is refused before anything in it is read."""
    if not arm_dir.is_dir():
        return []
    check_inside(arm_dir, root)
    found = []
    for path in arm_dir.iterdir():
        match = SEED_DIR.fullmatch(path.name)
        if match and path.is_dir():
            check_inside(path, root)
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def read_plan(root: Path) -> dict[str, Any]:
    """``sweep.json`` of the sweep directory ``root`` (empty when there is none), checked: a JSON
    object whose ``arms`` are arm folder names, ``reference`` an arm name, ``target`` a number or text.

    Raises:
        ConfigError: malformed (naming the file and key).
        InputFileError: not a regular file inside ``root``, or too large.
    """
    path = root / SWEEP_FILE
    if not os.path.lexists(path):
        return {}
    try:
        plan = parse_json(read_text(path, CONFIG_LIMIT, within=root))
    except ValueError as error:
        raise ConfigError(str(path), f"unreadable sweep plan ({error})") from error
    if not isinstance(plan, dict):
        raise ConfigError(str(path), "expected a JSON object")
    arms = plan.get("arms")
    if arms is not None and not (isinstance(arms, list) and all(_is_arm_name(a) for a in arms)):
        raise ConfigError(f"{path}: arms", "expected a list of arm folder names (no '/', '.' or '..')")
    reference = plan.get("reference")
    if reference is not None and not _is_arm_name(reference):
        raise ConfigError(f"{path}: reference", f"expected an arm name, got {str(reference)[:60]!r}")
    target = plan.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float, str))):
        raise ConfigError(f"{path}: target", f'expected a number or "FRACTION*ARM", got {str(target)[:60]!r}')
    return plan


def _is_arm_name(name: object) -> bool:
    return isinstance(name, str) and name not in (".", "..") and ARM_NAME.fullmatch(name) is not None


def _load(arm: str, run_dir: Path, within: Path) -> ArmRun:
    summary = read_summary(run_dir / SUMMARY_FILE, within)
    return ArmRun(arm=arm, seed=summary.seed or 0, run_dir=run_dir, summary=summary)


def _add(runs: dict[str, list[ArmRun]], run: ArmRun) -> None:
    same = [r for r in runs.get(run.arm, []) if r.seed == run.seed]
    if same:
        raise ConfigError(
            str(run.run_dir), f"arm '{run.arm}' already has a run with seed {run.seed} ({same[0].run_dir})"
        )
    runs.setdefault(run.arm, []).append(run)


def select_arms(run_set: RunSet, arms: Sequence[str] | None) -> RunSet:
    """Keep ``arms`` (in that order); every name must be an arm of the run set.

    Raises:
        ConfigError: an unknown arm (the error lists the known ones).
    """
    if not arms:
        return run_set
    unknown = [a for a in arms if a not in run_set.arms]
    if unknown:
        raise ConfigError("--arms", f"unknown arm '{unknown[0]}'; arms here: {', '.join(run_set.arms)}")
    return RunSet(
        arms={a: run_set.arms[a] for a in arms},
        missing={a: n for a, n in run_set.missing.items() if a in arms},
        plan=run_set.plan,
        plan_path=run_set.plan_path,
    )


# --- statistics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The metric value time-to-target is measured at, and where it came from."""

    value: float | None
    source: str
    """How it was set, e.g. ``"0.4 (eval.target)"`` or ``"0.95 x fedit's mean final (0.532)"``."""


TARGET_HELP = (
    "a number > 0, or FRACTION*ARM (e.g. 0.95*fedit) with ARM an arm here and FRACTION in (0, 1] "
    "when higher is better, >= 1 when lower is better"
)


def parse_target(
    text: str | float | None,
    run_set: RunSet,
    final_means: Mapping[str, float],
    higher_is_better: bool = True,
    name: str = "--target",
) -> Target:
    """Resolve a target: a finite number > 0, ``"F*ARM"`` (F times ARM's mean final metric; F in
    (0, 1] when higher is better, >= 1 when lower is better: a level ARM reaches on average), or None
    (the runs' common ``eval.target``). ``name`` is where the text came from, for the error.

    Raises:
        ConfigError: naming ``name``: malformed text, a number that is not finite and > 0, an unknown
            arm or one without a final metric, or a fraction out of its range.
    """
    if text is None or text == "":
        targets = {r.summary.target for runs in run_set.arms.values() for r in runs}
        value = targets.pop() if len(targets) == 1 else None
        if value is None:
            return Target(None, "none (the runs set no common eval.target)")
        return Target(float(value), f"{value:g} (the runs' eval.target)")
    number, arm = target_form(text, name)
    if arm is None:
        return Target(number, f"{number:g}")
    fraction = number
    if (fraction > 1) if higher_is_better else (fraction < 1):
        side = "at most 1 when higher is better" if higher_is_better else "at least 1 when lower is better"
        raise ConfigError(name, f"the fraction must be {side}, got {fraction:g}; expected {TARGET_HELP}")
    if arm not in final_means:
        raise ConfigError(name, f"unknown arm {arm[:60]!r}; arms here: {', '.join(final_means)}")
    mean = final_means[arm]
    if not math.isfinite(mean):
        raise ConfigError(name, f"arm '{arm}' has no final metric to take a fraction of")
    return Target(fraction * mean, f"{fraction:g} x {arm}'s mean final metric ({mean:.4g})")


def target_form(text: object, name: str) -> tuple[float, str | None]:
    """A target's form, before any run is read: ``(value, None)`` for a finite number > 0, or
    ``(fraction, arm)`` for ``"FRACTION*ARM"`` with a finite fraction > 0.

    Raises:
        ConfigError: naming ``name``: not a number or ``FRACTION*ARM``, or a number not finite and > 0.
    """
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        raise ConfigError(name, f"expected {TARGET_HELP}, got {str(text)[:60]!r}")
    if not isinstance(text, str) or "*" not in text:
        return _target_number(text, name), None
    fraction_text, arm = (part.strip() for part in text.split("*", 1))
    return _target_number(fraction_text, name), arm


def _target_number(text: str | float, name: str) -> float:
    """``text`` as a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(name, f"expected {TARGET_HELP}, got {str(text)[:60]!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(name, f"{str(text)[:60]!r} is not a finite number > 0; expected {TARGET_HELP}")
    return value


@dataclass(frozen=True)
class ArmStats:
    """Per-arm statistics over its seeds (intervals from :func:`~fedspine.metrics.stats.t_interval`)."""

    arm: str
    seeds: list[int]
    missing: int
    final: Interval
    late: Interval
    """Mean of each run's last :data:`LATE_EVALUATIONS` evaluations (steadier than the last alone)."""
    best: Interval
    time_to_target: Reached
    virtual_seconds: Interval
    host_seconds: Interval
    uplink_bytes: Interval
    downlink_bytes: Interval
    deployed_metric: Interval
    """Mean over devices of the metric of the model each device deploys."""
    deployed_parameters: Interval
    """Mean over devices of the parameter count of the model each device deploys."""
    personal: Interval
    """Mean over devices of each device's personal model on its own held-out data (``[personalize]``)."""
    personal_worst_decile: Interval
    """The personal value a tenth of the devices do no better than."""
    personal_global: Interval
    """Mean over the same devices of the global model on the same examples (the baseline)."""
    personal_global_worst_decile: Interval
    """The global model's value a tenth of those devices do no better than."""
    personal_lift: Interval
    """Personal minus global model on the same examples (mean over devices), per run."""
    personal_extra_time: Interval
    """Device time personalization added, as a fraction of the devices' training time."""
    personal_extra_bytes: Interval
    """Bytes personalization added to the uplinks and downlinks (cluster adapters)."""


@dataclass(frozen=True)
class PairedStats:
    """An arm against the reference, over the seeds both ran (differences are arm - reference)."""

    arm: str
    final: Interval
    late: Interval
    best: Interval
    time_to_target: Interval
    """Over the seeds where both reached the target."""
    speedup: Interval
    """Reference's time to target over the arm's (geometric mean; > 1: the arm is faster)."""
    uplink_ratio: Interval
    """Arm's uplink bytes over the reference's (geometric mean)."""
    deployed_metric: Interval
    personal: Interval
    """Difference of the mean personal value."""


@dataclass(frozen=True)
class Comparison:
    """Everything the comparison files show."""

    metric_name: str
    higher_is_better: bool
    chance_level: float | None
    target: Target
    reference: str
    arms: list[ArmStats]
    paired: list[PairedStats]
    runs: dict[str, list[ArmRun]]


PerSeed = dict[int, float | None]


def per_seed(runs: Sequence[ArmRun], value: Callable[[ArmRun], float | None]) -> PerSeed:
    """``value`` of each run, by seed."""
    return {r.seed: value(r) for r in runs}


def _interval(values: PerSeed) -> Interval:
    finite = [float(v) for v in values.values() if v is not None and math.isfinite(v)]
    return t_interval(finite) if finite else NO_VALUES


def _final(run: ArmRun) -> float | None:
    value = run.summary.metric.value
    return None if value is None else float(value)


LATE_EVALUATIONS = 3
"""How many of a run's last evaluations its ``late`` value averages: a global model's metric can move
by several points from one round to the next (devices sampled per round see different data), so the
mean of the last few says more about where a run ended than the last evaluation alone."""


def _late(run: ArmRun) -> float | None:
    values = [float(e["value"]) for e in sorted(run.evaluations, key=lambda e: float(e["virtual_time"]))]
    values = values[-LATE_EVALUATIONS:]
    return sum(values) / len(values) if values else None


def _number(field: Callable[[Summary], float]) -> Callable[[ArmRun], float | None]:
    def read(run: ArmRun) -> float | None:
        return float(field(run.summary))

    return read


_uplink = _number(lambda s: s.uplink_bytes)


def _deployed(key: str) -> Callable[[ArmRun], float | None]:
    """Mean over devices of ``key`` of the model each device deploys (``summary.device_models``)."""

    def read(run: ArmRun) -> float | None:
        manifest = run.summary.device_models or {}
        models = {m.get("dir"): m for m in manifest.get("models") or []}
        values = [models.get(d.get("model"), {}).get(key) for d in (manifest.get("devices") or {}).values()]
        values = [float(v) for v in values if v is not None]
        return sum(values) / len(values) if values else None

    return read


def _personal(key: str) -> Callable[[ArmRun], float | None]:
    """``key`` of the run's personal evaluation (``summary.personal``); None without one."""

    def read(run: ArmRun) -> float | None:
        personal = run.summary.personal or {}
        pairs = {
            "lift": ("value", "global_value"),
            "extra_bytes": ("extra_uplink_bytes", "extra_downlink_bytes"),
        }
        if key not in pairs:
            return _finite(personal.get(key))
        first, second = (_finite(personal.get(k)) for k in pairs[key])
        if first is None or second is None:
            return None
        return first - second if key == "lift" else first + second

    return read


def _finite(value: object) -> float | None:
    """``value`` when it is a finite number (a summary file may hold anything)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def compare(run_set: RunSet, reference: str | None = None, target: str | float | None = None) -> Comparison:
    """The comparison of ``run_set``'s arms against ``reference`` (default: the sweep's, else the first arm).

    Raises:
        ConfigError: an unknown reference arm, or a malformed target.
    """
    arms = list(run_set.arms)
    first = run_set.arms[arms[0]][0]
    reference_from = "--reference" if reference else f"{run_set.plan_path}: reference"
    reference = reference or run_set.plan.get("reference") or arms[0]
    if reference not in run_set.arms:
        raise ConfigError(reference_from, f"unknown arm {reference[:60]!r}; arms here: {', '.join(arms)}")
    finals = {a: per_seed(runs, _final) for a, runs in run_set.arms.items()}
    means = {a: _interval(v).mean for a, v in finals.items()}
    target_from = "--target" if target is not None else f"{run_set.plan_path}: target"
    resolved = parse_target(
        target if target is not None else run_set.plan.get("target"),
        run_set,
        means,
        first.higher_is_better,
        target_from,
    )
    ttts = {
        a: per_seed(runs, lambda r: time_to_target(r.evaluations, resolved.value, r.higher_is_better))
        for a, runs in run_set.arms.items()
    }
    stats = [
        _arm_stats(a, runs, finals[a], ttts[a], run_set.missing.get(a, 0)) for a, runs in run_set.arms.items()
    ]
    ref_runs = run_set.arms[reference]
    paired = [
        _paired(a, runs, ref_runs, ttts[a], ttts[reference])
        for a, runs in run_set.arms.items()
        if a != reference
    ]
    return Comparison(
        metric_name=first.summary.metric.name,
        higher_is_better=first.higher_is_better,
        chance_level=first.summary.chance_level,
        target=resolved,
        reference=reference,
        arms=stats,
        paired=paired,
        runs=run_set.arms,
    )


def _arm_stats(arm: str, runs: Sequence[ArmRun], finals: PerSeed, ttts: PerSeed, missing: int) -> ArmStats:
    return ArmStats(
        arm=arm,
        seeds=sorted(r.seed for r in runs),
        missing=missing,
        final=_interval(finals),
        late=_interval(per_seed(runs, _late)),
        best=_interval(per_seed(runs, lambda r: best_value(r.evaluations, r.higher_is_better))),
        time_to_target=reached_summary(list(ttts.values())),
        virtual_seconds=_interval(per_seed(runs, _number(lambda s: s.virtual_seconds))),
        host_seconds=_interval(per_seed(runs, _number(lambda s: s.wall_seconds))),
        uplink_bytes=_interval(per_seed(runs, _uplink)),
        downlink_bytes=_interval(per_seed(runs, _number(lambda s: s.downlink_bytes))),
        deployed_metric=_interval(per_seed(runs, _deployed("metric"))),
        deployed_parameters=_interval(per_seed(runs, _deployed("parameters"))),
        personal=_interval(per_seed(runs, _personal("value"))),
        personal_worst_decile=_interval(per_seed(runs, _personal("worst_decile"))),
        personal_global=_interval(per_seed(runs, _personal("global_value"))),
        personal_global_worst_decile=_interval(per_seed(runs, _personal("global_worst_decile"))),
        personal_lift=_interval(per_seed(runs, _personal("lift"))),
        personal_extra_time=_interval(per_seed(runs, _personal("extra_time_fraction"))),
        personal_extra_bytes=_interval(per_seed(runs, _personal("extra_bytes"))),
    )


def _paired(
    arm: str, runs: Sequence[ArmRun], ref_runs: Sequence[ArmRun], ttt: PerSeed, ref_ttt: PerSeed
) -> PairedStats:
    def both(value: Callable[[ArmRun], float | None]) -> tuple[PerSeed, PerSeed]:
        return per_seed(ref_runs, value), per_seed(runs, value)

    best = lambda r: best_value(r.evaluations, r.higher_is_better)  # noqa: E731
    return PairedStats(
        arm=arm,
        final=paired_difference(*both(_final)),
        late=paired_difference(*both(_late)),
        best=paired_difference(*both(best)),
        time_to_target=paired_difference(ref_ttt, ttt),
        speedup=paired_ratio(ref_ttt, ttt),
        uplink_ratio=paired_ratio(
            per_seed(runs, _number(lambda s: s.uplink_bytes)),
            per_seed(ref_runs, _number(lambda s: s.uplink_bytes)),
        ),
        deployed_metric=paired_difference(*both(_deployed("metric"))),
        personal=paired_difference(*both(_personal("value"))),
    )


@dataclass(frozen=True)
class Curve:
    """An arm's metric against virtual time: mean and 95% band over seeds at each time.

    At time t a run's value is its last evaluation at or before t (the model it had then); the curve
    stops at the earliest end among the seeds, so every point averages every seed.
    """

    times: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]


def mean_curve(runs: Sequence[ArmRun]) -> Curve:
    """The metric-vs-virtual-time curve of an arm (see :class:`Curve`)."""
    series = [sorted((float(e["virtual_time"]), float(e["value"])) for e in r.evaluations) for r in runs]
    series = [s for s in series if s]
    if not series:
        return Curve([], [], [], [])
    end = min(s[-1][0] for s in series)
    start = max(s[0][0] for s in series)
    times = sorted({t for s in series for t, _ in s if start <= t <= end})
    out = Curve([], [], [], [])
    for t in times:
        interval = t_interval([_value_at(s, t) for s in series])
        out.times.append(t)
        out.mean.append(interval.mean)
        out.low.append(interval.low if interval.n > 1 else interval.mean)
        out.high.append(interval.high if interval.n > 1 else interval.mean)
    return out


def _value_at(series: Sequence[tuple[float, float]], time: float) -> float:
    """The value of the last point at or before ``time`` (``series`` sorted, starting at or before it)."""
    value = series[0][1]
    for t, v in series:
        if t > time:
            break
        value = v
    return value
