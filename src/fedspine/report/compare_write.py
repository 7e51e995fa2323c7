"""The comparison files: ``comparison.csv`` (machine-readable), ``comparison.md`` and ``comparison.html``.

``comparison.csv`` has one row per arm. Every figure comes as ``<name>_mean``, ``<name>_ci_low`` and
``<name>_ci_high`` (the 95% t-interval over seeds; empty when fewer than two seeds). ``late`` is the
mean of each run's last evaluations (:data:`~fedspine.report.compare.LATE_EVALUATIONS`). ``ttt`` is the
virtual time to target over the seeds that reached it and ``reached`` how many did; paired columns
(``diff_*``, ``speedup_*``, ``uplink_ratio_*``) compare the arm with the reference arm on the seeds both
ran and are empty on the reference's own row.
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from fedspine.errors import ConfigError, FedspineError
from fedspine.files import check_own_directory
from fedspine.metrics.stats import CONFIDENCE, Interval, describe_reached
from fedspine.report.compare import LATE_EVALUATIONS, ArmStats, Comparison, PairedStats, mean_curve
from fedspine.report.formatting import format_bytes
from fedspine.report.output import write_output_text

CSV_FILE = "comparison.csv"
MD_FILE = "comparison.md"
HTML_FILE = "comparison.html"
PLOTS_DIR = "comparison_plots"

METHOD = (
    f"Intervals are {CONFIDENCE:.0%} Student-t intervals over seeds (mean ± t·s/√n); paired columns "
    "use the per-seed differences (ratios: geometric mean, interval on the log-ratios). A time to "
    "target averages the seeds that reached the target; the others are counted as not reached, never "
    "given a time."
)


def check_out_dir(out_dir: Path, flag: str = "--out") -> None:
    """Refuse an output directory that is not one (a file, or a link that leads to no directory), and
    one whose ``comparison_plots`` is a link or a file: the figures would land elsewhere. A link to a
    directory, named by the user, is followed like any path.

    Raises:
        ConfigError: ``out_dir`` itself, naming ``flag``.
        InputFileError: its ``comparison_plots``.
    """
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        kind = "a symbolic link that leads to no directory" if out_dir.is_symlink() else "not a directory"
        raise ConfigError(flag, f"{out_dir} exists and is {kind}")
    check_own_directory(out_dir / PLOTS_DIR, out_dir)


def write_comparison(comparison: Comparison, out_dir: Path, flag: str = "--out") -> dict[str, Path]:
    """Write the CSV, Markdown and HTML files (and the HTML's figures) into ``out_dir``, after checking
    it (:func:`check_out_dir`, ``flag`` naming it) and rendering every text; each file is replaced
    atomically, a link at its path replaced rather than written through."""
    check_out_dir(out_dir, flag)
    paths = {"csv": out_dir / CSV_FILE, "md": out_dir / MD_FILE, "html": out_dir / HTML_FILE}
    figures = _figures(comparison, out_dir / PLOTS_DIR)
    texts = {
        "csv": comparison_csv(comparison),
        "md": comparison_markdown(comparison),
        "html": comparison_html(
            comparison, {k: path.relative_to(out_dir) for k, (path, _) in figures.items()}
        ),
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(flag, f"{out_dir} cannot be created ({error.strerror or error})") from error
    for path, draw in figures.values():
        try:
            draw(path)
        except ValueError as error:  # e.g. more arms than a PNG can hold
            raise FedspineError(f"{path}: cannot be drawn ({error})") from error
    for kind, text in texts.items():
        write_output_text(paths[kind], text)
    return paths


# --- CSV ----------------------------------------------------------------------------------------


def _cells(name: str, interval: Interval | None) -> dict[str, str]:
    if interval is None:
        return {f"{name}_mean": "", f"{name}_ci_low": "", f"{name}_ci_high": ""}
    return {
        f"{name}_mean": _raw(interval.mean),
        f"{name}_ci_low": _raw(interval.low),
        f"{name}_ci_high": _raw(interval.high),
    }


def _raw(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else repr(round(float(value), 9))


def csv_row(arm: ArmStats, paired: PairedStats | None, reference: str) -> dict[str, str]:
    """One arm's row of ``comparison.csv``."""
    row = {"arm": arm.arm, "seeds": str(len(arm.seeds)), "seed_list": " ".join(map(str, arm.seeds))}
    row["missing"] = str(arm.missing)
    row |= _cells("final", arm.final) | _cells("late", arm.late) | _cells("best", arm.best)
    row |= _cells("ttt", arm.time_to_target.interval if arm.time_to_target.reached else None)
    row["reached"] = str(arm.time_to_target.reached)
    for name in ("virtual_seconds", "host_seconds", "uplink_bytes", "downlink_bytes"):
        row |= _cells(name, getattr(arm, name))
    row |= _cells("deployed_metric", arm.deployed_metric) | _cells(
        "deployed_parameters", arm.deployed_parameters
    )
    for name in PERSONAL_FIGURES:
        row |= _cells(name, getattr(arm, name))
    row["reference"] = reference
    row["pairs"] = str(paired.final.n) if paired else ""
    row |= _cells("diff_final", paired.final if paired else None)
    row |= _cells("diff_late", paired.late if paired else None)
    row |= _cells("diff_best", paired.best if paired else None)
    row |= _cells("diff_ttt", paired.time_to_target if paired else None)
    row["ttt_pairs"] = str(paired.time_to_target.n) if paired else ""
    row |= _cells("speedup", paired.speedup if paired else None)
    row |= _cells("uplink_ratio", paired.uplink_ratio if paired else None)
    row |= _cells("diff_deployed_metric", paired.deployed_metric if paired else None)
    row |= _cells("diff_personal", paired.personal if paired else None)
    return row


PERSONAL_FIGURES = (
    "personal",
    "personal_worst_decile",
    "personal_global",
    "personal_global_worst_decile",
    "personal_lift",
    "personal_extra_time",
    "personal_extra_bytes",
)
"""The personal models' figures (``summary.personal``), empty for runs without them."""


def comparison_csv(comparison: Comparison) -> str:
    """``comparison.csv`` as text."""
    paired = {p.arm: p for p in comparison.paired}
    rows = [csv_row(a, paired.get(a.arm), comparison.reference) for a in comparison.arms]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# --- text cells ---------------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _signed(value: float) -> str:
    return f"{value:+.3f}" if abs(value) < 100 else f"{value:+.1f}"


def interval_text(
    interval: Interval, fmt: Callable[[float], str] = _num, unit: str = "", noun: str = "seed"
) -> str:
    """``mean [low, high]``; ``mean (1 seed)`` without an interval; ``—`` without values."""
    if interval.n == 0:
        return "—"
    if interval.n == 1:
        return f"{fmt(interval.mean)}{unit} (1 {noun})"
    return f"{fmt(interval.mean)}{unit} [{fmt(interval.low)}, {fmt(interval.high)}]"


def _seconds(interval: Interval) -> str:
    return interval_text(interval, lambda v: f"{v:.1f}", " s")


def _ratio(interval: Interval, pairs: int) -> str:
    """A paired ratio; says over how many pairs when fewer than all (time to target: both reached)."""
    text = interval_text(interval, lambda v: f"{v:.2f}", "x", "pair")
    return text + (f" ({interval.n} pairs)" if 1 < interval.n < pairs else "")


def _bytes(interval: Interval) -> str:
    if interval.n == 0:
        return "—"
    spread = "" if interval.n < 2 else f" ± {format_bytes(interval.half_width)}"
    return f"{format_bytes(interval.mean)}{spread}"


def _host(interval: Interval) -> str:
    if interval.n == 0:
        return "—"
    return f"{interval.mean:.0f} s" + ("" if interval.n < 2 else f" ± {interval.half_width:.0f}")


def arm_cells(arm: ArmStats) -> list[str]:
    """The per-arm table's cells."""
    seeds = f"{len(arm.seeds)}" + (f" ({arm.missing} missing)" if arm.missing else "")
    return [
        arm.arm,
        seeds,
        interval_text(arm.final),
        interval_text(arm.late),
        interval_text(arm.best),
        describe_reached(arm.time_to_target, _seconds),
        _seconds(arm.virtual_seconds),
        _bytes(arm.uplink_bytes),
        _bytes(arm.downlink_bytes),
        _host(arm.host_seconds),
    ]


def personal_cells(arm: ArmStats, paired: PairedStats | None) -> list[str]:
    """The personal-models table's cells."""
    return [
        arm.arm,
        interval_text(arm.personal),
        interval_text(arm.personal_worst_decile),
        interval_text(arm.personal_global),
        interval_text(arm.personal_global_worst_decile),
        interval_text(arm.personal_lift, _signed),
        interval_text(arm.personal_extra_time, lambda v: f"{v:.1%}"),
        _bytes(arm.personal_extra_bytes),
        "—" if paired is None else interval_text(paired.personal, _signed, noun="pair"),
    ]


def _personal_rows(comparison: Comparison) -> list[list[str]]:
    """The personal-models table's rows (none when no run has personal models)."""
    if not any(a.personal.n for a in comparison.arms):
        return []
    paired = {p.arm: p for p in comparison.paired}
    return [personal_cells(a, paired.get(a.arm)) for a in comparison.arms]


def _personal_headers(comparison: Comparison) -> list[str]:
    metric = comparison.metric_name
    return [
        "arm",
        f"personal {metric} (mean over devices)",
        "worst decile",
        "global model on the same examples",
        "its worst decile",
        "lift over global",
        "extra device time",
        "extra bytes",
        f"Δ personal vs {comparison.reference}",
    ]


def paired_cells(paired: PairedStats) -> list[str]:
    """The paired table's cells."""
    pairs = paired.final.n
    ttt = interval_text(paired.time_to_target, lambda v: f"{v:+.1f}", " s", "pair")
    return [
        paired.arm,
        str(pairs),
        interval_text(paired.final, _signed, noun="pair"),
        interval_text(paired.late, _signed, noun="pair"),
        interval_text(paired.best, _signed, noun="pair"),
        _ratio(paired.speedup, pairs),
        ttt + (f" ({paired.time_to_target.n} pairs)" if 1 < paired.time_to_target.n < pairs else ""),
        _ratio(paired.uplink_ratio, pairs),
    ]


def _headers(comparison: Comparison) -> tuple[list[str], list[str]]:
    metric = comparison.metric_name
    late = f"last {LATE_EVALUATIONS} mean"
    arm_headers = ["arm", "seeds", f"final {metric}", late, f"best {metric}", "time to target (virtual)"]
    arm_headers += ["virtual time", "uplink", "downlink", "host time"]
    paired_headers = [
        "arm",
        "pairs",
        f"Δ final {metric}",
        f"Δ {late}",
        f"Δ best {metric}",
        "speed-up to target",
    ]
    paired_headers += ["Δ time to target", "uplink ratio"]
    return arm_headers, paired_headers


def _notes(comparison: Comparison) -> list[str]:
    notes = [METHOD, f"Target: {comparison.target.source}."]
    if comparison.chance_level is not None:
        notes.append(f"Chance level: {comparison.chance_level:.4f}.")
    return notes


# --- Markdown -----------------------------------------------------------------------------------


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def comparison_markdown(comparison: Comparison) -> str:
    """``comparison.md`` as text."""
    arm_headers, paired_headers = _headers(comparison)
    lines = [f"# Comparison of {len(comparison.arms)} arms ({comparison.metric_name})", ""]
    lines += _md_table(arm_headers, [arm_cells(a) for a in comparison.arms])
    if comparison.paired:
        lines += [
            "",
            f"## Paired against `{comparison.reference}` (arm − {comparison.reference}, same seeds)",
            "",
        ]
        lines += _md_table(paired_headers, [paired_cells(p) for p in comparison.paired])
    personal = _personal_rows(comparison)
    if personal:
        lines += ["", "## Personal models (each device's own held-out data)", ""]
        lines += _md_table(_personal_headers(comparison), personal)
    lines += ["", *_notes(comparison), ""]
    return "\n".join(lines)


# --- HTML ---------------------------------------------------------------------------------------


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def comparison_html(comparison: Comparison, figures: dict[str, Path]) -> str:
    """``comparison.html``: the tables, the curves with their bands and the paired-difference plot."""
    from fedspine.report.html import PAGE_CSS

    arm_headers, paired_headers = _headers(comparison)
    parts = [
        f"<h1>Comparison of {len(comparison.arms)} arms</h1>",
        f"<p class='sub'>{html.escape(comparison.metric_name)}; reference arm "
        f"<b>{html.escape(comparison.reference)}</b></p>",
        "<h2>Per arm</h2>",
        _html_table(arm_headers, [arm_cells(a) for a in comparison.arms]),
    ]
    if comparison.paired:
        parts += [
            f"<h2>Paired against {html.escape(comparison.reference)}</h2>",
            _html_table(paired_headers, [paired_cells(p) for p in comparison.paired]),
        ]
    personal = _personal_rows(comparison)
    if personal:
        parts += ["<h2>Personal models</h2>", _html_table(_personal_headers(comparison), personal)]
    captions = {
        "curves": "Metric against virtual time: mean over seeds, 95% band.",
        "paired": f"Final metric minus {comparison.reference}'s on the same seed: mean and 95% interval.",
    }
    for key, path in figures.items():
        parts.append(
            f"<figure><img src='{html.escape(path.as_posix())}' alt='{key}'>"
            f"<figcaption>{html.escape(captions[key])}</figcaption></figure>"
        )
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in _notes(comparison)]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>fedspine comparison</title>"
        f"<style>{PAGE_CSS}</style></head><body><main>{''.join(parts)}</main></body></html>\n"
    )


def _figures(comparison: Comparison, plots: Path) -> dict[str, tuple[Path, Callable[[Path], Path]]]:
    """Per figure of the HTML: its path under ``plots`` and the function that draws it there."""
    from fedspine.report.plots import plot_arm_curves, plot_paired_differences

    curves = {arm: mean_curve(runs) for arm, runs in comparison.runs.items()}
    figures: dict[str, tuple[Path, Callable[[Path], Path]]] = {
        "curves": (
            plots / "curves.png",
            partial(
                plot_arm_curves,
                curves,
                comparison.target.value,
                comparison.chance_level,
                comparison.metric_name,
            ),
        )
    }
    if comparison.paired:
        label = f"final {comparison.metric_name} − {comparison.reference}"
        intervals = {p.arm: p.final for p in comparison.paired}
        figures["paired"] = (plots / "paired_final.png", partial(plot_paired_differences, intervals, label))
    return figures
