"""Library entry points behind the CLI: run an experiment end to end, describe a fleet, write a report.

Usage:
    >>> from fedspine.config import load_config
    >>> from fedspine.api import run_experiment
    >>> result = run_experiment(load_config(Path("configs/tiny.toml")), Path("runs/tiny"))
    >>> result.summary.metric
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fedspine.algorithms.wire import decode_state, encode_state
from fedspine.client.evaluate import Evaluation
from fedspine.config import Config, config_differences, from_dict, load_config, to_toml, tomllib
from fedspine.errors import CheckpointError, ConfigError, RunFailedError
from fedspine.fleet import fleet_table_rows
from fedspine.metrics.records import SUMMARY_FILE, RoundRecord, RunRecorder
from fedspine.metrics.summary import Summary
from fedspine.report.compare import Comparison, compare, find_runs, select_arms
from fedspine.report.compare_write import check_out_dir, write_comparison
from fedspine.report.html import write_report
from fedspine.runtime import checkpoint as checkpoints
from fedspine.runtime.checkpoint import load_latest
from fedspine.runtime.engine import Engine
from fedspine.runtime.experiment import Experiment, build_experiment, build_fleet_from_config
from fedspine.runtime.export import copy_device_models, export_models, record_hand_out
from fedspine.runtime.lock import is_empty_run_dir, run_lock
from fedspine.runtime.summary import make_summary
from fedspine.types import LoraState

__all__ = [
    "Comparison",
    "Evaluation",
    "RoundCallback",
    "RoundRecord",
    "RunResult",
    "compare_runs",
    "export_device_models",
    "fleet_rows",
    "load_global_adapter",
    "resume_experiment",
    "run_experiment",
    "write_report",
]

GLOBAL_ADAPTER = "global_adapter.safetensors"
"""The final global LoRA adapter (scaling 1) in a run directory; absent for strategies that keep none."""

RoundCallback = Callable[[RoundRecord, "Evaluation | None"], None]
EngineFactory = Callable[[Experiment, RunRecorder], Engine]
"""Builds the engine that runs an experiment (default: the simulator's, by scheduler)."""

log = logging.getLogger("fedspine")


@dataclass
class RunResult:
    """A finished run: its directory and its summary (what ``summary.json`` holds)."""

    run_dir: Path
    summary: Summary


def _run_dir(config: Config, out: Path | None) -> Path:
    if out is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{config.run.name}-{stamp}"
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory; choose a new run directory")
    if out.exists() and not is_empty_run_dir(out):
        raise ConfigError("--out", f"run directory {out} already exists and is not empty; choose a new one")
    return out


def run_experiment(
    config: Config,
    out: Path | None = None,
    on_round: RoundCallback | None = None,
    on_status: Callable[[str], None] | None = None,
    engine: EngineFactory = Engine,
    executor: str = "simulation",
) -> RunResult:
    """Build everything (validating names first: nothing is written on bad input), run, report.

    ``engine`` builds the engine (a deployment passes its own); ``executor`` names it in the summary.
    ``summary.json`` is written last; a run directory without it did not finish.
    """
    status = on_status or (lambda _msg: None)
    run_dir = _run_dir(config, out)
    with run_lock(run_dir):
        _run_dir(config, run_dir)  # again under the lock: another run may have filled it meanwhile
        started = time.perf_counter()
        experiment = build_experiment(config, status)
        setup_seconds = time.perf_counter() - started
        (run_dir / "config.toml").write_text(to_toml(config), encoding="utf-8")
        recorder = RunRecorder(run_dir)
        name = config.executor.name if executor == "simulation" else executor
        try:
            return _execute(
                experiment, recorder, engine(experiment, recorder), setup_seconds, on_round, status, name
            )
        finally:
            experiment.trainer.executor.close()


def resume_experiment(
    run_dir: Path,
    on_round: RoundCallback | None = None,
    on_status: Callable[[str], None] | None = None,
    engine: EngineFactory = Engine,
    executor: str = "simulation",
) -> RunResult:
    """Continue an interrupted run from its newest complete checkpoint, with its own ``config.toml``.

    The records are cut back to where the checkpoint was taken and continue from there; the finished
    run's records and ``summary.json`` metrics equal those of a run that was never interrupted.
    ``engine`` and ``executor`` are as in :func:`run_experiment` (a deployment passes its own).
    """
    if not (run_dir / "config.toml").is_file():  # checked before the lock, which would create a file
        raise CheckpointError(f"{run_dir} is not a run directory (no config.toml)")
    with run_lock(run_dir):
        return _resume(run_dir, on_round, on_status or (lambda _msg: None), engine, executor)


def _check_config_unchanged(run_dir: Path, config: Config) -> None:
    """Refuse to resume when ``config.toml`` was edited after the newest checkpoint was taken: the
    checkpoint's state (ranks, masks, rounds done) would silently win, and the records would describe
    a run that never happened."""
    recorded = checkpoints.recorded_config(run_dir)
    if recorded is None:
        return
    try:
        before = from_dict(tomllib.loads(recorded))
    except (tomllib.TOMLDecodeError, ConfigError) as exc:
        raise CheckpointError(f"the newest checkpoint's recorded config does not load ({exc})") from exc
    changed = config_differences(before, config)
    if changed:
        raise CheckpointError(
            f"{run_dir / 'config.toml'} was edited after the checkpoint was taken ({'; '.join(changed)}); "
            "restore those values to resume, or start a new run with the new config"
        )


def _resume(
    run_dir: Path,
    on_round: RoundCallback | None,
    status: Callable[[str], None],
    engine_factory: EngineFactory,
    executor: str,
) -> RunResult:
    if (run_dir / SUMMARY_FILE).exists():
        raise CheckpointError(f"{run_dir} already finished (it has {SUMMARY_FILE}); nothing to resume")
    config = load_config(run_dir / "config.toml")  # present: resume_experiment checked it
    _check_config_unchanged(run_dir, config)
    started = time.perf_counter()
    experiment = build_experiment(config, status)
    try:
        snapshot = load_latest(run_dir, experiment)
        setup_seconds = time.perf_counter() - started
        unit = "round" if config.scheduler.synchronous else "server step"
        status(f"resuming {run_dir} after {unit} {snapshot.round}")
        (run_dir / "FAILED").unlink(missing_ok=True)
        recorder = RunRecorder.resume(run_dir, snapshot.engine.positions, snapshot.engine.rounds)
        engine = engine_factory(experiment, recorder)
        engine.restore(snapshot)
        name = config.executor.name if executor == "simulation" else executor
        return _execute(experiment, recorder, engine, setup_seconds, on_round, status, name)
    finally:
        experiment.trainer.executor.close()


def _execute(
    experiment: Experiment,
    recorder: RunRecorder,
    engine: Engine,
    setup_seconds: float,
    on_round: RoundCallback | None,
    status: Callable[[str], None],
    executor: str,
) -> RunResult:
    """Run the engine, export the device models, write the summary and the report."""
    run, run_dir = experiment.settings, recorder.run_dir
    try:
        unit = "rounds" if run.synchronous else "aggregations"
        status(f"running {run.rounds} {unit} on {len(experiment.devices)} devices -> {run_dir}")
        loop_started = time.perf_counter()
        state = engine.run(on_round)
        loop_seconds = time.perf_counter() - loop_started
        status("measuring and saving the device models")
        models = export_models(experiment, run_dir, state.personal)
        handed = engine.hand_out(models)
        if handed:
            record_hand_out(run_dir, models, handed)
    except BaseException:
        recorder.close()
        (run_dir / "FAILED").write_text("the run did not finish; see the error printed by fedspine\n")
        raise
    recorder.close()
    save_global_adapter(experiment.strategy.global_lora(), run_dir / GLOBAL_ADAPTER)
    summary = make_summary(experiment, state, recorder.rounds, loop_seconds, setup_seconds, executor, models)
    recorder.write_summary(summary)
    try:
        write_report(run_dir)
    except Exception as exc:  # the run is complete; the report can be rebuilt from its records
        log.warning("the report could not be written (%s); rebuild it with: fedspine report %s", exc, run_dir)
        status(f"warning: no report ({exc}); rebuild it with: fedspine report {run_dir}")
    if summary.tasks["ok"] == 0:  # the records stay for inspection; the run did not train anything
        raise RunFailedError(
            f"no update was aggregated: every task was rejected, dropped, late or cancelled "
            f"({summary.tasks}); see the reasons in {run_dir / 'events.jsonl'}"
        )
    if state.stalled is not None:
        raise RunFailedError(
            f"the run stopped after {summary.rounds} of {run.rounds} aggregations: {state.stalled}; "
            f"see the reasons in {run_dir / 'events.jsonl'}"
        )
    return RunResult(run_dir=run_dir, summary=summary)


def save_global_adapter(state: LoraState, path: Path) -> None:
    """Write the global adapter (``module/A``, ``module/B`` tensors) atomically; nothing when empty."""
    if not state:
        return
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(encode_state(state))
    partial.replace(path)


def load_global_adapter(run_dir: Path) -> LoraState:
    """The global adapter a run saved (empty when the strategy keeps none)."""
    path = run_dir / GLOBAL_ADAPTER
    return decode_state(path.read_bytes()) if path.exists() else {}


def export_device_models(
    run_dir: Path, out: Path, device: int | None = None, global_model: bool = False
) -> list[Path]:
    """Copy a finished run's model for ``device`` (its personal model when the run saved one, unless
    ``global_model``), or all models and the manifest, to ``out``."""
    return copy_device_models(run_dir, out, device, global_model)


def fleet_rows(config: Config) -> list[dict[str, str]]:
    """The fleet of ``config`` as table rows (one per device class and network)."""
    return fleet_table_rows(build_fleet_from_config(config))


def compare_runs(
    paths: list[Path],
    reference: str | None = None,
    arms: list[str] | None = None,
    target: str | float | None = None,
    out: Path | None = None,
) -> tuple[Comparison, dict[str, Path]]:
    """Compare the arms of a sweep directory (or of run directories) and write the comparison files.

    ``out`` defaults to the sweep directory; comparing run directories needs it. Everything is read
    and checked before anything is written; nothing is read outside the directories named.

    Raises:
        ConfigError: an unknown arm or reference, a bad target, a path that holds no finished run, a
            malformed ``sweep.json``, no ``out`` for run directories, or an ``out`` that is not a
            directory.
        FedspineError: a run's file is not a regular file inside its directory, too large or
            malformed; ``comparison_plots`` is a link or a file.
    """
    if out is not None:
        check_out_dir(out)
    run_set = select_arms(find_runs(paths), arms)
    comparison = compare(run_set, reference, target)
    flag = "--out"
    if out is None:
        if len(paths) != 1 or (paths[0] / SUMMARY_FILE).exists():
            raise ConfigError(
                "--out", "name the directory for the comparison files when comparing run directories"
            )
        out, flag = paths[0], "PATH"
    return comparison, write_comparison(comparison, out, flag)
