"""Human-readable durations and byte counts, shared by the HTML report and the CLI summary table."""

from __future__ import annotations

import math

_BYTE_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def format_duration(seconds: float) -> str:
    """Formats a duration with the two most useful units.

    Args:
        seconds: A finite, non-negative duration in seconds.

    Returns:
        ``"0 s"``, ``"350 ms"``, ``"12.5 s"``, ``"2 min 05 s"``, ``"1 h 02 min"`` or ``"3 d 04 h"``.

    Raises:
        ValueError: If ``seconds`` is negative or not finite.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be finite and non-negative, got {seconds!r}")
    if seconds == 0:
        return "0 s"
    # Thresholds sit just below each unit's boundary so that rounding never prints "60.0 s" or "1000 ms".
    if seconds < 0.9995:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    total_seconds = round(seconds)
    if total_seconds < 3600:
        return f"{total_seconds // 60} min {total_seconds % 60:02d} s"
    total_minutes = round(seconds / 60)
    if total_minutes < 24 * 60:
        return f"{total_minutes // 60} h {total_minutes % 60:02d} min"
    total_hours = round(seconds / 3600)
    return f"{total_hours // 24} d {total_hours % 24:02d} h"


def format_bytes(num_bytes: float) -> str:
    """Formats a byte count with decimal (SI) units, as network links are rated.

    Args:
        num_bytes: A finite, non-negative number of bytes.

    Returns:
        ``"999 B"``, ``"1.2 kB"``, ``"6.2 MB"``, ``"1.5 GB"`` …

    Raises:
        ValueError: If ``num_bytes`` is negative or not finite.
    """
    if not math.isfinite(num_bytes) or num_bytes < 0:
        raise ValueError(f"byte count must be finite and non-negative, got {num_bytes!r}")
    if round(num_bytes) < 1000:
        return f"{num_bytes:.0f} B"
    value = float(num_bytes)
    unit_index = 0
    while round(value, 1) >= 1000 and unit_index < len(_BYTE_UNITS) - 1:
        value /= 1000
        unit_index += 1
    return f"{value:.1f} {_BYTE_UNITS[unit_index]}"
