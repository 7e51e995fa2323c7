"""Sweeps: many settings x seeds as ordinary run directories, run in parallel, compared with intervals.

Usage:
    >>> from fedspine.sweep import load_sweep, run_sweep
    >>> result = run_sweep(load_sweep(Path("bench/sweeps/hetlora.toml")), Path("runs/hetlora"), workers=2)
    >>> result.comparison_files["md"]

``spec`` reads and checks a sweep file, ``run`` runs a sweep and compares it, ``runner`` executes
single runs (local processes or Ray). This package imports its submodules on first use, so a worker
process that only needs ``runner`` starts without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedspine.sweep.run import SweepResult, plan_runs, run_sweep, thread_budget
    from fedspine.sweep.runner import RunOutcome, RunSpec
    from fedspine.sweep.spec import Arm, Sweep, load_sweep

_LAZY = {
    "Arm": "fedspine.sweep.spec",
    "Sweep": "fedspine.sweep.spec",
    "load_sweep": "fedspine.sweep.spec",
    "RunOutcome": "fedspine.sweep.runner",
    "RunSpec": "fedspine.sweep.runner",
    "SweepResult": "fedspine.sweep.run",
    "plan_runs": "fedspine.sweep.run",
    "run_sweep": "fedspine.sweep.run",
    "thread_budget": "fedspine.sweep.run",
}

__all__ = [
    "Arm",
    "RunOutcome",
    "RunSpec",
    "Sweep",
    "SweepResult",
    "load_sweep",
    "plan_runs",
    "run_sweep",
    "thread_budget",
]


def __getattr__(name: str) -> Any:
    """Imports the named object's module on first access (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
