"""Reading a run directory and turning it into figures and a self-contained HTML report.

This layer reads files only: it imports the standard library, numpy, matplotlib and `fedspine.errors`,
never torch. `write_report` and the plot functions load matplotlib on first use, so that the CLI can
import the formatting helpers cheaply.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedspine.metrics.records import DeviceStats
from fedspine.report.devices import device_stats, merge_device_stats
from fedspine.report.formatting import format_bytes, format_duration
from fedspine.report.load import ReportError, RunData, load_run

if TYPE_CHECKING:
    from fedspine.report.html import write_report
    from fedspine.report.plots import (
        plot_bytes_per_round,
        plot_device_time,
        plot_metric_vs_time,
        plot_round_breakdown,
    )

_LAZY = {
    "write_report": "fedspine.report.html",
    "plot_bytes_per_round": "fedspine.report.plots",
    "plot_device_time": "fedspine.report.plots",
    "plot_metric_vs_time": "fedspine.report.plots",
    "plot_round_breakdown": "fedspine.report.plots",
}

__all__ = [
    "DeviceStats",
    "ReportError",
    "RunData",
    "device_stats",
    "format_bytes",
    "format_duration",
    "load_run",
    "merge_device_stats",
    "plot_bytes_per_round",
    "plot_device_time",
    "plot_metric_vs_time",
    "plot_round_breakdown",
    "write_report",
]


def __getattr__(name: str) -> Any:
    """Imports the matplotlib-backed names on first access (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
