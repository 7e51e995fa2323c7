"""The report's figures, one PNG each.

Figures are drawn on `matplotlib.figure.Figure` objects with an explicit Agg canvas, so nothing here
touches pyplot's global state or the process-wide backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from fedspine.report.devices import device_stats
from fedspine.report.output import write_output

_DPI = 110
_MAX_DEVICE_LABELS = 60
_PHASES = (
    ("aggregation_seconds", "aggregation", "#7f7f7f"),
    ("downlink_seconds", "downlink", "#1f77b4"),
    ("training_seconds", "training", "#2ca02c"),
    ("uplink_seconds", "uplink", "#ff7f0e"),
)
_DIRECTIONS = (  # (bar offset, rounds.csv column, label, color)
    (-0.2, "uplink_bytes", "uplink", "#ff7f0e"),
    (0.2, "downlink_bytes", "downlink", "#1f77b4"),
)


def plot_metric_vs_time(
    evals: Sequence[Mapping[str, Any]], target: float | None, chance_level: float | None, out: Path
) -> Path:
    """Plots the evaluation metric against virtual time, with the target and chance level as lines.

    Args:
        evals: ``evaluation`` events (``virtual_time``, ``value``, optionally ``metric``).
        target: The target metric, or None when the run has none.
        chance_level: The metric a random guess reaches, or None when unknown.
        out: Path of the PNG to write.

    Returns:
        ``out``.
    """
    figure, axes = _new_figure(7.5, 4.0)
    points = sorted((float(e["virtual_time"]), float(e["value"])) for e in evals)
    scale, unit = _time_scale(max((time for time, _ in points), default=0.0))
    if points:
        times, values = zip(*points, strict=True)
        axes.plot(np.array(times) / scale, values, marker="o", color="#1f77b4", label="evaluation")
    else:
        axes.text(0.5, 0.5, "no evaluation yet", transform=axes.transAxes, ha="center", color="#777777")
    if target is not None:
        axes.axhline(target, color="#2ca02c", linestyle="--", label=f"target {target:.4g}")
    if chance_level is not None:
        axes.axhline(chance_level, color="#d62728", linestyle=":", label=f"chance {chance_level:.4g}")
    axes.set_xlabel(f"virtual time ({unit})")
    axes.set_ylabel(str(evals[0].get("metric", "metric")) if evals else "metric")
    axes.set_title("Metric vs virtual time")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="best", frameon=False)
    return _save(figure, out)


def plot_round_breakdown(rounds: Sequence[Mapping[str, float]], out: Path) -> Path:
    """Plots each round's duration as stacked aggregation / downlink / training / uplink bars.

    Args:
        rounds: ``rounds.csv`` rows.
        out: Path of the PNG to write.

    Returns:
        ``out``.
    """
    figure, axes = _new_figure(7.5, 4.0)
    round_numbers = np.array([row["round"] for row in rounds])
    longest = max((sum(_finite(row.get(key)) for key, _, _ in _PHASES) for row in rounds), default=0.0)
    scale, unit = _time_scale(longest)
    bottom = np.zeros(len(rounds))
    for key, label, color in _PHASES:
        heights = np.array([_finite(row.get(key)) for row in rounds]) / scale
        axes.bar(round_numbers, heights, bottom=bottom, label=label, color=color, width=0.8)
        bottom += heights
    axes.set_xlabel("round")
    axes.set_ylabel(f"virtual time ({unit})")
    axes.set_title("Where each round's time goes")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.legend(loc="outside lower center", frameon=False, ncols=len(_PHASES), fontsize="small")
    return _save(figure, out)


def plot_bytes_per_round(rounds: Sequence[Mapping[str, float]], out: Path) -> Path:
    """Plots uplink and downlink megabytes (10^6 bytes) per round as side-by-side bars.

    Args:
        rounds: ``rounds.csv`` rows.
        out: Path of the PNG to write.

    Returns:
        ``out``.
    """
    figure, axes = _new_figure(7.5, 4.0)
    round_numbers = np.array([row["round"] for row in rounds])
    for offset, key, label, color in _DIRECTIONS:
        megabytes = np.array([_finite(row.get(key)) for row in rounds]) / 1e6
        axes.bar(round_numbers + offset, megabytes, width=0.4, label=label, color=color)
    axes.set_xlabel("round")
    axes.set_ylabel("MB")
    axes.set_title("Bytes on the wire per round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.legend(loc="outside lower center", frameon=False, ncols=len(_DIRECTIONS), fontsize="small")
    return _save(figure, out)


def plot_device_time(devices: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """Plots, per device, total compute and communication seconds, colored by device class.

    Args:
        devices: ``Summary.devices`` entries or ``events.jsonl`` records (task events are summed).
        out: Path of the PNG to write.

    Returns:
        ``out``.
    """
    stats = sorted(device_stats(devices), key=lambda s: (s.device_class, s.device_id))
    labelled = len(stats) <= _MAX_DEVICE_LABELS
    figure, axes = _new_figure(7.5, 2.0 + 0.28 * len(stats) if labelled else 8.0)
    classes = sorted({s.device_class for s in stats})
    colors = {name: colormaps["tab10"](index % 10) for index, name in enumerate(classes)}
    longest = max((s.compute_seconds + s.communication_seconds for s in stats), default=0.0)
    scale, unit = _time_scale(longest)
    rows = np.arange(len(stats))
    compute = np.array([s.compute_seconds for s in stats]) / scale
    communication = np.array([s.communication_seconds for s in stats]) / scale
    class_colors = [colors[s.device_class] for s in stats]
    axes.barh(rows, compute, color=class_colors, height=0.7)
    axes.barh(rows, communication, left=compute, color=class_colors, alpha=0.35, hatch="//", height=0.7)
    axes.margins(y=0.01)
    if labelled:
        axes.set_yticks(rows, [f"device {s.device_id}" for s in stats], fontsize="small")
    else:  # Too many rows to label legibly: the class colors carry the story.
        axes.set_yticks([])
        axes.set_ylabel(f"{len(stats)} devices, grouped by class")
    axes.invert_yaxis()
    axes.set_xlabel(f"virtual time ({unit})")
    axes.set_title("Compute (solid) and communication (hatched) per device")
    axes.grid(axis="y", visible=False)
    axes.grid(axis="x", alpha=0.3)
    _legend_for_classes(figure, colors)
    return _save(figure, out)


def _legend_for_classes(figure: Figure, colors: Mapping[str, Any]) -> None:
    handles = [Patch(color=color, label=name) for name, color in colors.items()]
    handles.append(Patch(facecolor="white", edgecolor="#555555", hatch="//", label="communication"))
    figure.legend(handles=handles, loc="outside right upper", frameon=False, fontsize="small")


def _new_figure(width: float, height: float) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.spines[["top", "right"]].set_visible(False)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    return figure, axes


def _save(figure: Figure, out: Path) -> Path:
    """Write ``figure`` as a PNG at ``out`` (its directory created), replacing a link there rather
    than writing through it."""
    return write_output(Path(out), lambda file: figure.savefig(file, format="png"))


def _time_scale(longest_seconds: float) -> tuple[float, str]:
    """Picks the unit in which ``longest_seconds`` reads best: (seconds per unit, unit name)."""
    if longest_seconds >= 2 * 3600:
        return 3600.0, "hours"
    if longest_seconds >= 2 * 60:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _finite(value: float | None) -> float:
    return 0.0 if value is None or not math.isfinite(value) else float(value)


def plot_arm_curves(
    curves: Mapping[str, Any],
    target: float | None,
    chance_level: float | None,
    metric_name: str,
    out: Path,
) -> Path:
    """Plots each arm's mean metric against virtual time with its 95% band (a comparison's curves).

    Args:
        curves: Per arm, a :class:`~fedspine.report.compare.Curve` (``times``, ``mean``, ``low``, ``high``).
        target: The target metric, or None.
        chance_level: The chance level, or None.
        metric_name: Label of the y axis.
        out: Path of the PNG to write.

    Returns:
        ``out``.
    """
    figure, axes = _new_figure(8.0, 4.4)
    longest = max((c.times[-1] for c in curves.values() if c.times), default=0.0)
    scale, unit = _time_scale(longest)
    palette = colormaps["tab10"]
    for index, (arm, curve) in enumerate(curves.items()):
        if not curve.times:
            continue
        times = np.array(curve.times) / scale
        color = palette(index % 10)
        axes.step(times, curve.mean, where="post", color=color, label=arm)
        axes.fill_between(times, curve.low, curve.high, step="post", color=color, alpha=0.18, linewidth=0)
    if target is not None:
        axes.axhline(target, color="#d62728", linestyle="--", linewidth=1, label="target")
    if chance_level is not None:
        axes.axhline(chance_level, color="#7f7f7f", linestyle=":", linewidth=1, label="chance")
    axes.set_xlabel(f"virtual time ({unit})")
    axes.set_ylabel(metric_name)
    axes.legend(loc="best", fontsize="small", frameon=False)
    return _save(figure, out)


def plot_paired_differences(intervals: Mapping[str, Any], label: str, out: Path) -> Path:
    """Plots each arm's paired difference to the reference: mean and 95% interval, a line at zero.

    Args:
        intervals: Per arm, an :class:`~fedspine.metrics.stats.Interval`.
        label: Label of the x axis.
        out: Path of the PNG to write.

    Returns:
        ``out``.
    """
    arms = list(intervals)
    figure, axes = _new_figure(7.0, 0.9 + 0.45 * max(len(arms), 1))
    axes.grid(axis="y", visible=False)
    axes.grid(axis="x", alpha=0.3)
    for row, arm in enumerate(arms):
        interval = intervals[arm]
        if interval.n == 0:
            continue
        if interval.n > 1:
            axes.plot([interval.low, interval.high], [row, row], color="#1f77b4", linewidth=2)
        axes.plot([interval.mean], [row], marker="o", color="#1f77b4")
    axes.axvline(0.0, color="#555555", linewidth=1)
    axes.set_yticks(range(len(arms)), arms)
    axes.set_ylim(-0.6, len(arms) - 0.4)
    axes.invert_yaxis()
    axes.set_xlabel(label)
    return _save(figure, out)


def plot_arms_by_class(tasks: Sequence[Mapping[str, Any]], classes: Mapping[int, str], out: Path) -> Path:
    """Plots the pruning ratio (and LoRA rank) each device class trained at, task by task, over rounds.

    Args:
        tasks: ``task`` events with ``round``, ``device_id``, ``pruning_ratio``, ``lora_rank`` and
            ``status``; only tasks that arrived (``ok``) are drawn.
        classes: Device id -> device class name.
        out: Path of the PNG to write.

    Returns:
        ``out``.
    """
    done = [t for t in tasks if t.get("status") == "ok" and t.get("device_id") in classes]
    names = sorted({classes[int(t["device_id"])] for t in done})
    columns = min(3, max(len(names), 1))
    rows = max(1, math.ceil(len(names) / columns))
    figure = Figure(figsize=(3.2 * columns, 2.3 * rows + 0.6), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    ranks = sorted({int(t.get("lora_rank") or 0) for t in done}) or [0]
    sizes = {rank: 18 + 30 * i for i, rank in enumerate(ranks)}
    top = max([float(t.get("pruning_ratio") or 0.0) for t in done] + [0.5])
    for index, name in enumerate(names or ["no pruned task"]):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.spines[["top", "right"]].set_visible(False)
        mine = [t for t in done if classes[int(t["device_id"])] == name]
        for rank in ranks:
            points = [t for t in mine if int(t.get("lora_rank") or 0) == rank]
            axes.scatter(
                [int(t["round"]) for t in points],
                [float(t.get("pruning_ratio") or 0.0) for t in points],
                s=sizes[rank],
                alpha=0.6,
                label=f"rank {rank}",
            )
        axes.set_title(name, fontsize="small")
        axes.set_ylim(-0.02, top + 0.05)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if index % columns == 0:
            axes.set_ylabel("pruning ratio")
        if index == 0 and len(ranks) > 1:
            axes.legend(fontsize="x-small", frameon=False)
    figure.supxlabel("round (or aggregation)", fontsize="small")
    return _save(figure, out)
