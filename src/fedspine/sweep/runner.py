"""Running a sweep: every (arm, seed) becomes an ordinary run directory ``DIR/<arm>/seed-<k>/``.

Runs go through a queue to local worker processes (``python -m fedspine.sweep.runner``: one fresh
process per run, ``workers`` at a time, each with ``threads`` torch threads) or to a Ray cluster (one
task per run, ``num_cpus = threads``). There is no scheduling beyond that queue.

A run is executed by :func:`execute_run`, in the worker:

* finished (``summary.json``): skipped;
* interrupted with a complete checkpoint: resumed (``fedspine run --resume``);
* interrupted before any checkpoint: its directory is cleared and it starts again;
* new: started.

A failure is caught and returned with its error; it never stops the other runs. The worker holds an
exclusive lock on ``DIR/<arm>/.seed-<k>.lock`` while it runs, so two sweeps can never write one run
directory; a local worker also exits when the sweep process that started it dies (SIGKILL included),
so a resumed sweep never races with a worker of the killed one. Each run's own output (warnings,
tracebacks) goes to ``DIR/<arm>/seed-<k>.log``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from fedspine.config import load_config
from fedspine.errors import CheckpointError, ConfigError
from fedspine.files import InputFileError, read_text

RUNS_FILE = "runs.json"
"""Per run of a sweep: status, host seconds, error (rewritten as runs finish)."""

Status = Literal["finished", "resumed", "skipped", "failed"]


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: where it goes and its resolved config (TOML text)."""

    arm: str
    seed: int
    run_dir: Path
    config_text: str

    @property
    def label(self) -> str:
        return f"{self.arm}/seed-{self.seed}"

    @property
    def log_path(self) -> Path:
        return self.run_dir.parent / f"{self.run_dir.name}.log"

    @property
    def lock_path(self) -> Path:
        return self.run_dir.parent / f".{self.run_dir.name}.lock"


@dataclass
class RunOutcome:
    """How one run ended."""

    arm: str
    seed: int
    status: Status
    seconds: float = 0.0
    error: str = ""


def is_finished(run_dir: Path) -> bool:
    """Whether a run directory holds a complete ``summary.json`` (written last and atomically)."""
    try:
        json.loads(read_text(run_dir / "summary.json", within=run_dir))
    except (InputFileError, ValueError):
        return False
    return True


# --- in the worker ------------------------------------------------------------------------------


@contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created) for the block; waits for a previous holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def execute_run(spec: RunSpec) -> RunOutcome:
    """Run (or resume, or skip) one run of a sweep; never raises for a failing run."""
    started = time.perf_counter()
    try:
        with run_lock(spec.lock_path):
            status = _execute(spec)
    except BaseException as error:  # a run's failure is recorded, never propagated
        if isinstance(error, KeyboardInterrupt):
            raise
        traceback.print_exc()
        return RunOutcome(spec.arm, spec.seed, "failed", time.perf_counter() - started, _one_line(error))
    return RunOutcome(spec.arm, spec.seed, status, time.perf_counter() - started)


def _execute(spec: RunSpec) -> Status:
    from fedspine import api

    if is_finished(spec.run_dir):
        return "skipped"
    if (spec.run_dir / "config.toml").exists():
        try:
            api.resume_experiment(spec.run_dir)
            return "resumed"
        except (CheckpointError, ConfigError) as error:  # nothing to resume from: start again
            print(f"not resumable ({error}); starting {spec.label} again", flush=True)
    if spec.run_dir.exists():
        shutil.rmtree(spec.run_dir)
    config = load_config(_write_config(spec))
    api.run_experiment(config, spec.run_dir)
    return "finished"


def _config_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.toml"


def _write_config(spec: RunSpec) -> Path:
    """The run's resolved config, kept beside the run directory (``run_experiment`` wants it empty)."""
    path = _config_path(spec.run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.config_text, encoding="utf-8")
    return path


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


# --- local worker processes ---------------------------------------------------------------------


def _exit_with_parent(parent_pid: int, interval_seconds: float = 0.1) -> None:
    """Exit this process as soon as the process that started it is gone (any signal, SIGKILL too)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def worker_main(argv: Sequence[str]) -> int:
    """``python -m fedspine.sweep.runner RUN_DIR ARM SEED PARENT_PID``: one run in a fresh process.

    The resolved config is read from beside the run directory (written by the sweep); the outcome is
    written there as JSON. The process exits when the sweep that started it dies.
    """
    run_dir, arm, seed, parent_pid = Path(argv[0]), argv[1], int(argv[2]), int(argv[3])
    _exit_with_parent(parent_pid)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    spec = RunSpec(arm, seed, run_dir, _config_path(run_dir).read_text(encoding="utf-8"))
    outcome = execute_run(spec)
    partial = _outcome_path(run_dir).with_suffix(".partial")
    partial.write_text(json.dumps(asdict(outcome)), encoding="utf-8")
    partial.replace(_outcome_path(run_dir))
    return 0


def _outcome_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.outcome.json"


Event = Callable[[str, RunSpec, "RunOutcome | None"], None]
"""Progress callback: ``("started" | "ended", spec, outcome or None)``."""


def _start(spec: RunSpec) -> subprocess.Popen[bytes]:
    """Start a worker process for ``spec``; its output goes to the run's log."""
    spec.run_dir.parent.mkdir(parents=True, exist_ok=True)
    _write_config(spec)
    _outcome_path(spec.run_dir).unlink(missing_ok=True)
    command = [sys.executable, "-m", "fedspine.sweep.runner", str(spec.run_dir), spec.arm, str(spec.seed)]
    with spec.log_path.open("ab") as log:
        return subprocess.Popen([*command, str(os.getpid())], stdout=log, stderr=subprocess.STDOUT)


def run_local(specs: Sequence[RunSpec], workers: int, on_event: Event) -> list[RunOutcome]:
    """Run ``specs`` in fresh worker processes, ``workers`` at a time; outcomes in completion order."""
    pending = deque(specs)
    running: dict[subprocess.Popen[bytes], RunSpec] = {}
    outcomes: list[RunOutcome] = []
    try:
        while pending or running:
            while pending and len(running) < workers:
                spec = pending.popleft()
                running[_start(spec)] = spec
                on_event("started", spec, None)
            time.sleep(0.2)
            for process in [p for p in running if p.poll() is not None]:
                spec = running.pop(process)
                outcome = _read_outcome(spec, process.returncode)
                outcomes.append(outcome)
                on_event("ended", spec, outcome)
    finally:
        for process in running:
            process.terminate()
        for process in running:
            process.wait()
    return outcomes


def _read_outcome(spec: RunSpec, returncode: int) -> RunOutcome:
    try:
        return RunOutcome(**json.loads(_outcome_path(spec.run_dir).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        error = f"the worker process died ({how}); see {spec.log_path}"
        return RunOutcome(spec.arm, spec.seed, "failed", 0.0, error)


# --- Ray ----------------------------------------------------------------------------------------


def _ray_run(spec: RunSpec) -> RunOutcome:
    """A Ray task: the run's output goes to its log, as in a local worker."""
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    with spec.log_path.open("a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        return execute_run(spec)


def run_ray(specs: Sequence[RunSpec], address: str, threads: int, on_event: Event) -> list[RunOutcome]:
    """Run ``specs`` as Ray tasks on the cluster at ``address`` ("auto": the one this machine is in).

    Every node must see ``DIR`` at the same path (a shared filesystem) and have fedspine installed.
    """
    try:
        import ray
    except ImportError as error:
        raise ConfigError("--ray", "Ray is not installed; pip install 'fedspine[flower]'") from error
    ray.init(address=address, log_to_driver=False, ignore_reinit_error=True)
    try:
        task = ray.remote(num_cpus=threads, max_calls=1, max_retries=0)(_ray_run)
        refs = {task.remote(spec): spec for spec in specs}
        for spec in specs:
            on_event("started", spec, None)
        outcomes = []
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
            for ref in ready:
                spec = refs.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as error:  # the task's worker died, or Ray failed it
                    outcome = RunOutcome(spec.arm, spec.seed, "failed", 0.0, _one_line(error))
                outcomes.append(outcome)
                on_event("ended", spec, outcome)
        return outcomes
    finally:
        ray.shutdown()


def write_runs_file(out: Path, outcomes: Sequence[RunOutcome]) -> None:
    """``DIR/runs.json``: every run's status, host seconds and error (atomically)."""
    partial = out / f".{RUNS_FILE}.partial"
    rows = sorted((asdict(o) for o in outcomes), key=lambda r: (r["arm"], r["seed"]))
    partial.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    partial.replace(out / RUNS_FILE)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
