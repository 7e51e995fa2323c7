"""Device profiles: a device class measured on real hardware (``fedspine calibrate``), as a TOML file a
fleet group can name (``[[fleet.groups]] profile = "file.toml"``) instead of a catalog class.

A profile holds the :class:`~fedspine.types.DeviceClass` fields at its top level and, under
``[measured]``, what calibration measured (for the reader; the cost model does not read it). A
measured profile states the training throughput it reached as ``peak_flops`` with ``mfu = 1``: the
cost model's compute time for the calibrated workload is then the measured one. The file is read as
untrusted input: every field is checked, and an error names the file and the field.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path

import tomli_w

from fedspine.errors import ConfigError
from fedspine.files import CONFIG_LIMIT, InputFileError, read_text
from fedspine.types import DeviceClass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_NUMBERS = ("peak_flops", "mfu", "memory_bandwidth", "slowdown_sigma")
_INTEGERS = ("memory_bytes", "train_dtype_bytes")
_TEXT = ("name", "description", "source")
MAX_SLOWDOWN_SIGMA = 2.0
"""The log-spread of a device's per-round slowdown: at 2 its middle 95% already spans a factor of 2,500,
far past any measured throttling."""
MEASURED = "measured"
"""The table of a profile that records what calibration measured."""


def load_profile(path: str | Path, key: str = "profile") -> DeviceClass:
    """The device class a profile file describes.

    Raises:
        ConfigError: (named ``key``) the file is missing, not TOML, lacks a field, has an unknown one,
            or a value out of range.
    """
    path = Path(path)
    try:
        data = tomllib.loads(read_text(path, CONFIG_LIMIT))
    except InputFileError as exc:
        raise ConfigError(key, f"profile {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(key, f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {*_NUMBERS, *_INTEGERS, *_TEXT, MEASURED})
    if unknown:
        known = ", ".join(sorted({*_NUMBERS, *_INTEGERS, *_TEXT, MEASURED}))
        raise ConfigError(key, f"{path}: unknown field(s) {', '.join(unknown)}; known: {known}")
    text: dict[str, str] = {}
    numbers: dict[str, float] = {}
    integers: dict[str, int] = {}
    for name in _TEXT:
        value = data.get(name, "" if name != "name" else None)
        if not isinstance(value, str) or (name == "name" and not value.strip()):
            raise ConfigError(key, f"{path}: '{name}' must be text{' (not empty)' if name == 'name' else ''}")
        text[name] = value
    for name in _NUMBERS:
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(key, f"{path}: '{name}' must be a finite number, got {value!r}")
        numbers[name] = float(value)
    for name in _INTEGERS:
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"{path}: '{name}' must be an integer, got {value!r}")
        integers[name] = value
    fields: dict[str, str | float | int] = {**text, **numbers, **integers}
    checks = (
        (1e6 <= numbers["peak_flops"] <= 1e18, "peak_flops", "must be in [1e6, 1e18] FLOP/s"),
        (0 < numbers["mfu"] <= 1, "mfu", "must be in (0, 1]"),
        (1e6 <= numbers["memory_bandwidth"] <= 1e14, "memory_bandwidth", "must be in [1e6, 1e14] bytes/s"),
        (2**20 <= integers["memory_bytes"] <= 2**50, "memory_bytes", "must be in [1 MiB, 1 PiB]"),
        (integers["train_dtype_bytes"] in (1, 2, 4, 8), "train_dtype_bytes", "must be 1, 2, 4 or 8"),
        (
            0 <= numbers["slowdown_sigma"] <= MAX_SLOWDOWN_SIGMA,
            "slowdown_sigma",
            f"must be in [0, {MAX_SLOWDOWN_SIGMA}] (a larger spread underflows a round's slowdown to 0)",
        ),
    )
    for ok, name, message in checks:
        if not ok:
            raise ConfigError(key, f"{path}: '{name}' {message}, got {fields[name]!r}")
    if MEASURED in data and not isinstance(data[MEASURED], dict):
        raise ConfigError(key, f"{path}: '{MEASURED}' must be a table")
    return DeviceClass(
        name=text["name"],
        description=text["description"],
        peak_flops=numbers["peak_flops"],
        mfu=numbers["mfu"],
        memory_bandwidth=numbers["memory_bandwidth"],
        memory_bytes=integers["memory_bytes"],
        train_dtype_bytes=integers["train_dtype_bytes"],
        slowdown_sigma=numbers["slowdown_sigma"],
        source=text["source"],
    )


def profile_toml(device: DeviceClass, measured: Mapping[str, object], header: str = "") -> str:
    """A profile file for ``device``, with ``measured`` under ``[measured]`` and ``header`` as comments."""
    body: dict[str, object] = {
        "name": device.name,
        "description": device.description,
        "source": device.source,
        "peak_flops": device.peak_flops,
        "mfu": device.mfu,
        "memory_bandwidth": device.memory_bandwidth,
        "memory_bytes": device.memory_bytes,
        "train_dtype_bytes": device.train_dtype_bytes,
        "slowdown_sigma": device.slowdown_sigma,
        MEASURED: measured,
    }
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + tomli_w.dumps(body)


__all__ = ["MEASURED", "load_profile", "profile_toml"]
