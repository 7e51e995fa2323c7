"""A run's self-contained HTML report: summary table, figures, per-device table and resolved config.

The page has inline CSS, no scripts and no external assets; figures are PNGs in ``plots/`` beside it,
referenced by relative path, so the run directory can be copied or served as it is.
"""

from __future__ import annotations

import html
import statistics
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from fedspine.files import InputFileError, check_own_directory
from fedspine.metrics.records import DeviceStats
from fedspine.metrics.summary import Summary
from fedspine.report.devices import TASK_STATUSES, merge_device_stats
from fedspine.report.formatting import format_bytes, format_duration
from fedspine.report.load import ReportError, RunData, load_run
from fedspine.report.output import write_output_text
from fedspine.report.plots import (
    plot_arms_by_class,
    plot_bytes_per_round,
    plot_device_time,
    plot_metric_vs_time,
    plot_round_breakdown,
)

__all__ = ["ReportError", "RunData", "format_bytes", "format_duration", "load_run", "write_report"]

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"

PAGE_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       background: #fafafa; margin: 0; }
main { max-width: 980px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.2em; margin: 32px 0 8px; border-bottom: 1px solid #e5e5e5; padding-bottom: 4px; }
.sub, .note { color: #666; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 12px; border-bottom: 1px solid #eee; text-align: left; }
th { background: #f3f3f3; font-weight: 600; }
td.num, th.num { text-align: right; }
tbody tr:nth-child(even) { background: #fbfbfb; }
table.summary th { background: none; font-weight: normal; color: #555; }
figure { margin: 16px 0 24px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #666; font-size: 0.9em; }
pre { background: #f6f8fa; padding: 12px; overflow-x: auto; font-size: 13px; border-radius: 4px; }
"""


def write_report(run_dir: Path) -> Path:
    """Reads a run directory, draws ``plots/*.png`` and writes ``report.html`` beside them.

    Everything is read and checked, and the page rendered, before anything is written; each file is
    then replaced atomically (a link at ``report.html`` or at a plot is replaced, never written
    through). ``plots/`` must be a directory of the run, not a link: the report never writes outside.

    Args:
        run_dir: A directory written by the engine.

    Returns:
        The path of ``report.html``.

    Raises:
        ReportError: If an input file is missing or malformed, ``plots`` is a link or a file, or a
            figure cannot be drawn (the message names it).
        FedspineError: An output cannot be written.
    """
    run = load_run(Path(run_dir))
    plots = run.run_dir / PLOTS_DIR
    out = run.run_dir / REPORT_FILE
    try:
        check_own_directory(plots, run.run_dir)
    except InputFileError as error:
        raise ReportError(plots, error.reason) from error
    devices = merge_device_stats(run.summary.devices, run.events)
    figures = _figures(run, devices)
    page = _page(run, devices, [(caption, name) for caption, name, _ in figures])
    for _, name, draw in figures:
        try:
            draw(run.run_dir / name)
        except ValueError as error:  # e.g. more device classes than a PNG can hold
            raise ReportError(run.run_dir / name, f"cannot be drawn ({error})") from error
    return write_output_text(out, page)


Draw = Callable[[Path], Path]


def _figures(run: RunData, devices: Sequence[DeviceStats]) -> list[tuple[str, str, Draw]]:
    """(caption, path relative to the run directory, function that draws it there) per figure."""
    summary = run.summary
    evaluations = run.events_of("evaluation")
    figures: list[tuple[str, str, Draw]] = [
        (
            f"Evaluation {run.metric_name} against virtual time, with the target and chance level.",
            "metric_vs_time.png",
            partial(plot_metric_vs_time, evaluations, summary.target, summary.chance_level),
        ),
        (
            "Each round's virtual duration, split by phase (the device whose arrival closed the round).",
            "round_breakdown.png",
            partial(plot_round_breakdown, run.rounds),
        ),
        (
            "Bytes sent (uplink) and received (downlink) by the fleet in each round.",
            "bytes_per_round.png",
            partial(plot_bytes_per_round, run.rounds),
        ),
        (
            "Total compute and communication time per device, colored by device class.",
            "device_time.png",
            partial(plot_device_time, [vars(device) for device in devices]),
        ),
    ]
    tasks = run.events_of("task")
    if any(float(t.get("pruning_ratio") or 0.0) > 0 for t in tasks):
        classes = {int(d["device_id"]): str(d.get("device_class", "unknown")) for d in summary.devices}
        figures.append(
            (
                "The pruning ratio each device class trained at, task by task (marker size: LoRA rank).",
                "arms_by_class.png",
                partial(plot_arms_by_class, tasks, classes),
            )
        )
    return [(caption, f"{PLOTS_DIR}/{name}", draw) for caption, name, draw in figures]


def _page(run: RunData, devices: Sequence[DeviceStats], figures: Sequence[tuple[str, str]]) -> str:
    summary = run.summary
    title = f"{summary.strategy} · {summary.model} · {summary.task}"
    figure_html = "\n".join(
        f'<figure><img src="{_e(src)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'
        for caption, src in figures
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{PAGE_CSS}</style>
</head>
<body><main>
<h1>{_e(title)}</h1>
<p class="sub">{_e(_subtitle(run))}</p>
<h2>Summary</h2>
{_summary_table(run)}
<h2>Figures</h2>
{figure_html}
<h2>Devices</h2>
{_device_table(devices)}
{_models_section(summary.device_models)}
{_federated_section(summary.federated)}
{_personal_section(summary.personal)}
{_cost_model_section(run, devices)}
<h2>Resolved config</h2>
<pre>{_e(run.config_text)}</pre>
</main></body>
</html>
"""


def _subtitle(run: RunData) -> str:
    summary = run.summary
    parts = [f"run {run.run_dir.name}", f"scheduler {summary.scheduler}"]
    if summary.num_devices is not None:
        parts.append(f"{summary.num_devices} devices")
    if summary.seed is not None:
        parts.append(f"seed {summary.seed}")
    return " · ".join(parts)


def _summary_table(run: RunData) -> str:
    summary = run.summary
    rows = [(run.metric_name, _metric_cell(run)), ("chance level", _number(summary.chance_level))]
    if summary.initial_metric is not None:
        rows.append((f"initial {run.metric_name}", _number(summary.initial_metric)))
    rows += [
        ("target", _number(summary.target)),
        ("time to target (virtual)", _time_to_target(summary)),
        ("rounds", str(summary.rounds)),
        ("virtual time", format_duration(summary.virtual_seconds)),
        ("wall time", format_duration(summary.wall_seconds)),
        ("train wall time", format_duration(summary.train_wall_seconds)),
        ("overhead (wall / train)", _ratio(summary.wall_seconds, summary.train_wall_seconds)),
        ("bytes up", format_bytes(summary.uplink_bytes)),
        ("bytes down", format_bytes(summary.downlink_bytes)),
        ("tasks", _status_counts(run)),
    ]
    body = "\n".join(f"<tr><th>{_e(label)}</th><td>{_e(value)}</td></tr>" for label, value in rows)
    return f'<table class="summary">\n{body}\n</table>'


def _metric_cell(run: RunData) -> str:
    value, chance = run.metric_value, run.summary.chance_level
    if value is None:
        return "not evaluated yet"
    if chance is None:
        return _number(value)
    return f"{_number(value)} ({value - chance:+.4g} vs chance)"


def _time_to_target(summary: Summary) -> str:
    seconds = summary.time_to_target_seconds
    if seconds is not None:
        return format_duration(seconds)
    return "no target" if summary.target is None else "not reached"


def _status_counts(run: RunData) -> str:
    counts = dict.fromkeys(TASK_STATUSES, 0)
    for event in run.events_of("task"):
        counts[str(event["status"])] = counts.get(str(event["status"]), 0) + 1
    return " · ".join(f"{count} {status}" for status, count in counts.items() if count) or "none"


def _device_table(devices: Sequence[DeviceStats]) -> str:
    extra = sorted({status for d in devices for status in d.statuses} - set(TASK_STATUSES))
    statuses = [*TASK_STATUSES, *extra]
    headers = ["device", "class", "network", "tasks", "compute (s)", "communication (s)", "uplink"]
    headers += ["downlink", *statuses]
    head = "".join(
        f"<th>{_e(h)}</th>" if h in ("class", "network") else f'<th class="num">{_e(h)}</th>' for h in headers
    )
    rows = "\n".join(_device_row(device, statuses) for device in devices)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>"


def _device_row(device: DeviceStats, statuses: Sequence[str]) -> str:
    cells = [
        f'<td class="num">{device.device_id}</td>',
        f"<td>{_e(device.device_class)}</td>",
        f"<td>{_e(device.network)}</td>",
    ]
    numbers = [
        str(device.tasks),
        f"{device.compute_seconds:.1f}",
        f"{device.communication_seconds:.1f}",
        format_bytes(device.uplink_bytes),
        format_bytes(device.downlink_bytes),
        *(str(device.statuses.get(status, 0)) for status in statuses),
    ]
    cells += [f'<td class="num">{_e(number)}</td>' for number in numbers]
    return f"<tr>{''.join(cells)}</tr>"


def _federated_section(federated: dict[str, Any] | None) -> str:
    """The last federated evaluation: each device's metric on its own held-out data."""
    if not federated:
        return ""
    rows = "\n".join(
        f'<tr><td class="num">{_e(d)}</td><td class="num">{_number(v)}</td></tr>'
        for d, v in sorted(federated["devices"].items(), key=lambda item: int(item[0]))
    )
    pooled = f"pooled {_number(federated['value'])} over {federated['count']}"
    worst = f"worst decile {_number(federated['worst_decile'])}"
    return (
        f"<h2>Federated evaluation</h2>\n<p>Each device's metric on its own held-out examples, last "
        f'evaluation ({_e(pooled)}; {_e(worst)}).</p>\n<table>\n<thead><tr><th class="num">device</th>'
        f'<th class="num">metric</th></tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>'
    )


def _personal_section(personal: dict[str, Any] | None) -> str:
    """Each device's personal model beside the global one, on the device's own held-out examples."""
    if not personal or not isinstance(personal.get("devices"), dict):
        return ""
    mine, global_ = personal["devices"], personal.get("global_devices") or {}
    rows = "\n".join(
        f'<tr><td class="num">{_e(d)}</td><td class="num">{_number(_float(global_.get(d)))}</td>'
        f'<td class="num">{_number(_float(v))}</td></tr>'
        for d, v in sorted(mine.items(), key=lambda item: str(item[0]).zfill(12))
    )
    fraction = _float(personal.get("extra_time_fraction"))
    cost = "" if fraction is None else f"; personalization cost {fraction:.1%} of the devices' training time"
    means = (
        f"mean {_number(_float(personal.get('global_value')))} → {_number(_float(personal.get('value')))}, "
        f"worst decile {_number(_float(personal.get('global_worst_decile')))} → "
        f"{_number(_float(personal.get('worst_decile')))}{cost}"
    )
    return (
        f"<h2>Personal models</h2>\n<p>Method <code>{_e(personal.get('method'))}</code>: each device's final "
        f"model on its own held-out examples, beside the global model it would deploy ({_e(means)}).</p>\n"
        '<table>\n<thead><tr><th class="num">device</th><th class="num">global</th>'
        f'<th class="num">personal</th></tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>'
    )


def _float(value: object) -> float | None:
    """``value`` when it is a number (a summary file may hold anything)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _cost_model_section(run: RunData, devices: Sequence[DeviceStats]) -> str:
    """A deployment's measured times beside what the cost model predicts, per device (medians)."""
    tasks = [e for e in run.events_of("task") if "predicted_train_seconds" in e and e.get("train_seconds")]
    if not tasks:
        return ""
    classes = {d.device_id: d.device_class for d in devices}
    rows = []
    for device in sorted({int(e["device_id"]) for e in tasks}):
        mine = [e for e in tasks if int(e["device_id"]) == device]
        predicted = statistics.median(float(e["predicted_train_seconds"]) for e in mine)
        measured = statistics.median(float(e["train_seconds"]) for e in mine)
        error = statistics.median(
            float(e["predicted_train_seconds"]) / float(e["train_seconds"]) - 1 for e in mine
        )
        up = statistics.median(float(e["predicted_uplink_seconds"]) for e in mine)
        up_measured = statistics.median(float(e["uplink_seconds"]) for e in mine)
        cells = [str(device), classes.get(device, "?"), str(len(mine)), f"{predicted:.3f}", f"{measured:.3f}"]
        cells += [f"{error:+.0%}", f"{up:.3f}", f"{up_measured:.3f}"]
        rows.append("<tr>" + "".join(f'<td class="num">{_e(c)}</td>' for c in cells) + "</tr>")
    headers = ["device", "class", "tasks", "predicted train (s)", "measured train (s)", "error"]
    headers += ["predicted uplink (s)", "measured uplink (s)"]
    head = "".join(f'<th class="num">{_e(h)}</th>' for h in headers)
    return (
        "<h2>Cost model vs measured</h2>\n<p>Per device, medians over its tasks: the simulator's "
        "cost model for the device's class and link (nominal) against the deployment's measured "
        "training loop and uplink. Error: predicted / measured - 1.</p>\n"
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{chr(10).join(rows)}\n</tbody>\n</table>"
    )


def _models_section(models: Any) -> str:
    """Each device's final model beside the dense base: parameters, bytes, metric, generation speed."""
    if not isinstance(models, dict) or not models.get("devices"):
        return ""
    dense = models["dense_base"]
    by_dir = {m["dir"]: m for m in models["models"]}
    headers = [
        "device",
        "model",
        "sparsity",
        "LoRA rank",
        "parameters",
        "bytes",
        "metric",
        "tokens/s",
        "speed-up",
    ]
    head = "".join(f'<th class="num">{_e(h)}</th>' if h != "model" else f"<th>{h}</th>" for h in headers)
    rows = [_model_row("dense base", None, dense, dense)]
    for device, entry in sorted(models["devices"].items(), key=lambda kv: int(kv[0])):
        rows.append(_model_row(device, entry, by_dir[entry["model"]], dense))
    body = "\n".join(rows)
    note = '<p class="sub">tokens/s: greedy generation on the CPU that ran fedspine (median of 3).</p>'
    table = f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"
    return f"<h2>Device models</h2>\n{note}\n{table}"


def _model_row(label: str, entry: dict[str, Any] | None, model: dict[str, Any], dense: dict[str, Any]) -> str:
    speed, base_speed = model.get("tokens_per_second"), dense.get("tokens_per_second")
    cells = [
        label,
        "—" if entry is None else entry["model"],
        "0" if entry is None else f"{entry['ratio']:.2f}",
        "—" if entry is None else str(entry["rank"]),
        f"{model['parameters'] / 1e6:.2f} M",
        format_bytes(model["bytes"]),
        _number(model.get("metric")),
        _number(speed),
        _ratio(speed, base_speed) if speed and base_speed else "—",
    ]
    return (
        "<tr>"
        + "".join(
            f"<td>{_e(c)}</td>" if i == 1 else f'<td class="num">{_e(c)}</td>' for i, c in enumerate(cells)
        )
        + "</tr>"
    )


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}×" if denominator > 0 else "—"


def _e(value: object) -> str:
    return html.escape(str(value))
