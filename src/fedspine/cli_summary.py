"""The table ``fedspine run`` prints at the end of a run: its metric, time, traffic and outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedspine.metrics.summary import Summary
from fedspine.report.formatting import format_bytes, format_duration


def print_summary(summary: Summary, run_dir: Path) -> None:
    """Print the run's summary table (on stdout)."""
    metric, ttt, chance = summary.metric, summary.time_to_target_seconds, summary.chance_level
    value = "not evaluated" if metric.value is None else f"{metric.value:.4f}"
    rows = [
        (metric.name, value if chance is None else f"{value}  (chance {chance:.4f})"),
        ("rounds" if summary.scheduler == "sync" else "aggregations", str(summary.rounds)),
        ("client tasks", ", ".join(f"{n} {status}" for status, n in summary.tasks.items() if n)),
        *_updates_row(summary),
        ("virtual time", format_duration(summary.virtual_seconds)),
        ("time to target", "not reached" if ttt is None else format_duration(ttt)),
        (
            "uplink / downlink",
            f"{format_bytes(summary.uplink_bytes)} / {format_bytes(summary.downlink_bytes)}",
        ),
        ("host wall / training", f"{summary.wall_seconds:.1f} s / {summary.train_wall_seconds:.1f} s"),
        *_models_row(summary.device_models),
        *_personal_rows(summary),
        ("run directory", str(run_dir)),
    ]
    table = Table(title=f"{summary.strategy} on {summary.task}", show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def _personal_rows(summary: Summary) -> list[tuple[str, str]]:
    """The devices' metric on their own held-out data: the federated evaluation's pool, and the
    personal models against the global one (mean over devices, worst decile)."""
    rows = []
    federated = summary.federated
    if federated and federated.get("value") is not None:
        rows.append(("on the devices' data", f"{federated['value']:.4f} pooled over {federated['count']}"))
    personal = summary.personal
    if personal:
        spent = personal.get("extra_time_fraction")
        cost = "" if spent is None else f"; +{spent:.1%} device time"
        rows.append(
            (
                f"personal ({personal['method']})",
                f"mean {personal['global_value']:.4f} -> {personal['value']:.4f}, worst decile "
                f"{personal['global_worst_decile']:.4f} -> {personal['worst_decile']:.4f}{cost}",
            )
        )
    return rows


def _updates_row(summary: Summary) -> list[tuple[str, str]]:
    """Updates dispatched, applied and left in buffers, and (asynchronous runs) their staleness."""
    updates, stale = summary.updates, summary.staleness
    if not updates:
        return []
    text = f"{updates['applied']} applied of {updates['dispatched']} dispatched"
    text += f", {updates['unapplied_at_end']} buffered at the end"
    if stale:
        text += f"; staleness mean {stale['mean']:.2f}, max {stale['max']:.0f}"
    return [("updates", text)]


def _models_row(models: dict[str, Any] | None) -> list[tuple[str, str]]:
    """One summary line for the device models: how many, their size and metric against the dense base."""
    if not models or not models.get("models"):
        return []
    dense = models["dense_base"]["parameters"] / 1e6
    parts = [f"{m['dir']}: {m['parameters'] / 1e6:.1f} M params, {m['metric']:.4f}" for m in models["models"]]
    return [("device models", f"{'; '.join(parts)} (dense {dense:.1f} M); see models/")]
