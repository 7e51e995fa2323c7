"""The statistics of comparisons, against values computed by hand."""

from __future__ import annotations

import math

import pytest

from fedspine.metrics.stats import (
    best_value,
    describe_reached,
    paired_difference,
    paired_ratio,
    reached_summary,
    t_interval,
    time_to_target,
)

T_975_DF2 = 4.302652729911275
"""Student-t 97.5% quantile with 2 degrees of freedom (tables: 4.303)."""
T_975_DF1 = 12.706204736174698
"""... with 1 degree of freedom (tables: 12.706)."""


def test_t_interval_of_three_values_matches_the_hand_computation() -> None:
    # mean 2, sample sd sqrt(((1-2)^2 + 0 + (3-2)^2) / 2) = 1, half width t * 1 / sqrt(3)
    interval = t_interval([1.0, 2.0, 3.0])
    half = T_975_DF2 / math.sqrt(3)
    assert interval.mean == pytest.approx(2.0)
    assert interval.low == pytest.approx(2.0 - half)
    assert interval.high == pytest.approx(2.0 + half)
    assert interval.n == 3
    assert interval.half_width == pytest.approx(half)  # 2.4841


def test_t_interval_needs_two_values_and_finite_ones() -> None:
    single = t_interval([0.5])
    assert single.mean == 0.5 and single.n == 1 and math.isnan(single.low) and math.isnan(single.high)
    assert t_interval([]).n == 0
    with pytest.raises(ValueError, match="finite"):
        t_interval([1.0, math.inf])
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], confidence=1.0)


def test_a_narrower_confidence_gives_a_narrower_interval() -> None:
    values = [0.40, 0.45, 0.47, 0.52]
    assert t_interval(values, 0.90).half_width < t_interval(values, 0.95).half_width


def test_paired_difference_uses_per_seed_differences_over_common_seeds() -> None:
    reference = {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.10}
    other = {0: 0.60, 1: 0.80, 2: 0.70, 5: 0.99}  # seeds 3 and 5 are not shared: ignored
    # differences 0.1, 0.2, 0.0: mean 0.1, sd 0.1, half width t(2) * 0.1 / sqrt(3) = 0.24841
    interval = paired_difference(reference, other)
    assert interval.n == 3
    assert interval.mean == pytest.approx(0.1)
    assert interval.half_width == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3))
    assert not interval.excludes(0.0)


def test_pairing_removes_what_the_seeds_share() -> None:
    # Seeds move both arms together; the arm is better by 0.02 on every seed.
    reference = {0: 0.30, 1: 0.50, 2: 0.70}
    other = {s: v + 0.02 for s, v in reference.items()}
    unpaired = t_interval(list(other.values())).low - t_interval(list(reference.values())).high
    paired = paired_difference(reference, other)
    assert unpaired < 0  # the unpaired intervals overlap
    assert paired.mean == pytest.approx(0.02) and paired.half_width == pytest.approx(0.0, abs=1e-12)
    assert paired.excludes(0.0)


def test_paired_difference_skips_seeds_where_either_value_is_missing() -> None:
    interval = paired_difference({0: 10.0, 1: None, 2: 30.0}, {0: 12.0, 1: 5.0, 2: None})
    assert interval.n == 1 and interval.mean == pytest.approx(2.0)


def test_paired_ratio_is_a_geometric_mean_with_a_log_scale_interval() -> None:
    # speed-ups 2 and 8: log mean = (ln 2 + ln 8) / 2 = ln 4; sd of logs = (ln 8 - ln 2) / sqrt(2)
    ratio = paired_ratio({0: 100.0, 1: 400.0}, {0: 50.0, 1: 50.0})
    half_log = T_975_DF1 * (math.log(8) - math.log(2)) / math.sqrt(2) / math.sqrt(2)
    assert ratio.mean == pytest.approx(4.0)
    assert ratio.low == pytest.approx(math.exp(math.log(4) - half_log))
    assert ratio.high == pytest.approx(math.exp(math.log(4) + half_log))
    assert paired_ratio({0: 10.0}, {0: None}).n == 0


def test_time_to_target_and_best_value() -> None:
    evals = [
        {"virtual_time": 0.0, "value": 0.20},
        {"virtual_time": 50.0, "value": 0.41},
        {"virtual_time": 90.0, "value": 0.39},
        {"virtual_time": 120.0, "value": 0.45},
    ]
    assert time_to_target(evals, 0.40, higher_is_better=True) == 50.0
    assert time_to_target(evals, 0.46, higher_is_better=True) is None
    assert time_to_target(evals, None, higher_is_better=True) is None
    perplexity = [{"virtual_time": 0.0, "value": 30.0}, {"virtual_time": 10.0, "value": 12.0}]
    assert time_to_target(perplexity, 15.0, higher_is_better=False) == 10.0
    assert best_value(evals, True) == 0.45 and best_value(perplexity, False) == 12.0
    assert best_value([], True) is None


def test_runs_that_never_reach_the_target_are_counted_never_averaged() -> None:
    partly = reached_summary([100.0, None, 140.0])
    assert partly.reached == 2 and partly.not_reached == 1 and partly.runs == 3
    assert partly.interval.mean == pytest.approx(120.0)  # over the two that reached it, not 3
    text = describe_reached(partly, lambda i: f"{i.mean:.0f} s")
    assert text == "120 s; not reached (1 of 3)"
    assert describe_reached(reached_summary([None, None, None]), str) == "not reached (3 of 3)"
    assert describe_reached(reached_summary([5.0, 7.0]), lambda i: f"{i.mean:.0f} s") == "6 s"
