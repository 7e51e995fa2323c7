"""Import first in every bench script: drops this folder from ``sys.path``; and the shared helpers.

``bench/fedspine.py`` is named after the package, so while this folder is on the path (it is, for any
script run from it) ``import fedspine`` would find that script instead of the package. The helpers
import fedspine lazily, after the path is fixed.
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def run_summary(config: Any) -> dict[str, Any]:
    """Run ``config`` in a temporary directory; its ``summary.json`` contents."""
    from fedspine.api import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        return run_experiment(config, Path(tmp) / "run").summary


def first_time(summary: dict[str, Any], target: float) -> float | None:
    """Virtual time of a run's first evaluation at or above ``target`` (None: never)."""
    for entry in summary["evaluations"]:
        if entry["value"] >= target:
            return float(entry["virtual_time"])
    return None


def fmt_time(seconds: float | None) -> str:
    """A virtual time for a table, or "not reached"."""
    return "not reached" if seconds is None else f"{seconds:.1f} s"


def host_line(extra: str = "") -> str:
    """The machine a benchmark ran on, for its first printed line."""
    import torch

    line = f"host: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
    line += f"threads {torch.get_num_threads()}"
    return f"{line}; {extra}" if extra else line
