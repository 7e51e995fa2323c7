"""Statistics of comparisons across seeds: means, confidence intervals, paired differences, time to target.

Every interval here is a two-sided Student-t interval, ``mean ± t(1 - (1 - c) / 2, n - 1) · s / √n``,
with ``s`` the sample standard deviation (``ddof = 1``). With the 3-5 seeds a comparison affords, a
percentile bootstrap has too few distinct resamples (10 for n = 3) and covers the mean less often than
it claims; the t-interval is exact for normal errors and conservative at small n, so it is the one used.
An interval needs at least two values: with one, its bounds are NaN (a smoke test, not a claim).

Paired statistics take, for each seed both arms ran, the difference (or the log-ratio) of the two runs
and put an interval on its mean: the seed fixes fleet, data split, sampling and initialisation, so
pairing removes the variation the arms share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
"""Confidence level of every interval unless stated otherwise."""


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval over ``n`` values (``low``/``high`` NaN when n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the interval's width (NaN when n < 2)."""
        return (self.high - self.low) / 2

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval (False when the interval is undefined)."""
        return not math.isnan(self.low) and not self.low <= value <= self.high


NO_VALUES = Interval(math.nan, math.nan, math.nan, 0)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Student-t confidence interval of the mean of independent ``values``.

    Raises:
        ValueError: a value is not finite, or ``confidence`` is not in (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    data = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(data)):
        raise ValueError(f"every value must be finite, got {values}")
    n = len(data)
    if n == 0:
        return NO_VALUES
    mean = float(data.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    from scipy import stats as scipy_stats  # imported on first use: it takes a noticeable time

    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * data.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def common_seeds(*by_seed: Mapping[int, object]) -> list[int]:
    """Seeds present in every mapping, ascending."""
    if not by_seed:
        return []
    return sorted(set.intersection(*(set(m) for m in by_seed)))


def paired_difference(
    reference: Mapping[int, float | None],
    other: Mapping[int, float | None],
    confidence: float = CONFIDENCE,
) -> Interval:
    """Interval of the mean of ``other[s] - reference[s]`` over the seeds where both have a value."""
    seeds = [s for s in common_seeds(reference, other) if reference[s] is not None and other[s] is not None]
    return t_interval([float(other[s]) - float(reference[s]) for s in seeds], confidence)  # type: ignore[arg-type]


def paired_ratio(
    numerator: Mapping[int, float | None],
    denominator: Mapping[int, float | None],
    confidence: float = CONFIDENCE,
) -> Interval:
    """Geometric mean of ``numerator[s] / denominator[s]`` over seeds where both are positive.

    The interval is the t-interval of the log-ratios, exponentiated (a speed-up of 2x and of 0.5x are
    equally far from 1).
    """
    seeds = [
        s
        for s in common_seeds(numerator, denominator)
        if (numerator[s] or 0) > 0 and (denominator[s] or 0) > 0
    ]
    logs = t_interval([math.log(float(numerator[s]) / float(denominator[s])) for s in seeds], confidence)  # type: ignore[arg-type]
    return Interval(
        math.exp(logs.mean) if logs.n else math.nan, math.exp(logs.low), math.exp(logs.high), logs.n
    )


@dataclass(frozen=True)
class Reached:
    """A time to target over runs: the interval over the runs that reached it, and how many did."""

    interval: Interval
    """Over the runs that reached the target (``n`` of them; ``NO_VALUES`` when none did)."""
    runs: int

    @property
    def reached(self) -> int:
        """How many runs reached the target."""
        return self.interval.n

    @property
    def not_reached(self) -> int:
        """How many runs never reached it."""
        return self.runs - self.interval.n


def reached_summary(times: Sequence[float | None], confidence: float = CONFIDENCE) -> Reached:
    """Summarise times to target where None means "never reached": those are counted, never averaged."""
    return Reached(t_interval([t for t in times if t is not None], confidence), len(times))


def describe_reached(summary: Reached, describe: Callable[[Interval], object]) -> str:
    """Text for a time to target: ``describe(interval)`` over the runs that reached it, and the rest as
    "not reached (k of n)" — never a number for a run that did not reach the target."""
    if summary.runs == 0:
        return "no runs"
    if summary.reached == 0:
        return f"not reached ({summary.runs} of {summary.runs})"
    text = str(describe(summary.interval))
    if summary.not_reached:
        text += f"; not reached ({summary.not_reached} of {summary.runs})"
    return text


def time_to_target(
    evaluations: Sequence[Mapping[str, Any]], target: float | None, higher_is_better: bool
) -> float | None:
    """Virtual time of the first evaluation that reaches ``target`` (None: never, or no target)."""
    if target is None or target <= 0:
        return None
    for entry in evaluations:
        value = float(entry["value"])
        if (value >= target) if higher_is_better else (value <= target):
            return float(entry["virtual_time"])
    return None


def best_value(evaluations: Sequence[Mapping[str, Any]], higher_is_better: bool) -> float | None:
    """The best metric a run's evaluations reached (None when it has none)."""
    values = [float(e["value"]) for e in evaluations if e.get("value") is not None]
    if not values:
        return None
    return max(values) if higher_is_better else min(values)
