"""Range checks shared by the sections: the bounds on values that are typos, and ``_check``."""

from __future__ import annotations

import re

from fedspine.errors import ConfigError


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


MAX_DEVICES = 100_000
"""More devices than any fleet study uses; a larger count is a typo (and would exhaust memory)."""
MAX_SECONDS = 1e9
"""About 32 years of virtual time: a longer duration is a typo, and sums of such durations overflow the
virtual clock to infinity."""
MAX_STEPS = 100_000
"""Local steps (and rounds) past this are a typo: a run that long would not end on any fleet."""
MAX_RANK = 65_536
"""Wider than any adapted layer of a model this runs on: a larger rank is a typo."""
MAX_MULTIPLIER = 1e4
"""Scalings, learning rates and factors past this overflow float training or aggregation in a step."""


def _at_most(value: float, limit: float, key: str, why: str) -> None:
    """Upper bounds on magnitudes that bound work or overflow, with the reason in the message."""
    _check(value <= limit, key, f"must be <= {limit:g} ({why}), got {value:g}")


MAX_THREADS = 1024
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")
