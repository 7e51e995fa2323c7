"""Comparisons over run directories: grouping, per-arm intervals, paired differences, the files."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedspine.cli import app
from fedspine.errors import ConfigError
from fedspine.report.compare import compare, find_runs, mean_curve, select_arms
from fedspine.report.compare_write import write_comparison

T_975_DF2 = 4.302652729911275


def _summary(
    seed: int, final: float, times: list[float], values: list[float], uplink: float
) -> dict[str, Any]:
    evaluations = [
        {"round": i, "virtual_time": t, "value": v}
        for i, (t, v) in enumerate(zip(times, values, strict=True))
    ]
    return {
        "task": "toy",
        "strategy": "fedit",
        "seed": seed,
        "metric": {"name": "accuracy", "value": final, "higher_is_better": True},
        "chance_level": 0.25,
        "target": 0.4,
        "time_to_target_seconds": None,
        "rounds": len(times) - 1,
        "virtual_seconds": times[-1],
        "wall_seconds": 10.0 + seed,
        "train_wall_seconds": 8.0,
        "uplink_bytes": uplink,
        "downlink_bytes": uplink,
        "evaluations": evaluations,
    }


def _write(run_dir: Path, summary: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    """Two arms x three seeds; "fast" reaches 0.4 on two seeds, "base" on all three."""
    root = tmp_path / "sweep"
    base = {0: (0.50, 100.0), 1: (0.60, 200.0), 2: (0.49, 150.0)}  # seed: (final, time to 0.4)
    fast = {0: (0.60, 50.0), 1: (0.80, 50.0), 2: (0.39, None)}
    for arm, table in (("base", base), ("fast", fast)):
        for seed, (final, ttt) in table.items():
            reach = ttt if ttt is not None else 250.0
            values = [0.2, 0.41 if ttt is not None else 0.3, final]
            _write(
                root / arm / f"seed-{seed}",
                _summary(seed, final, [0.0, reach, 300.0], values, 1000.0 * (seed + 1)),
            )
    (root / "base" / "seed-3").mkdir()  # a run that never finished: counted as missing
    (root / "sweep.json").write_text(json.dumps({"arms": ["base", "fast"], "reference": "base"}))
    return root


def test_a_sweep_directory_is_grouped_by_arm_and_counts_unfinished_runs(sweep_dir: Path) -> None:
    runs = find_runs([sweep_dir])
    assert list(runs.arms) == ["base", "fast"]
    assert sorted(r.seed for r in runs.arms["fast"]) == [0, 1, 2]
    assert runs.missing == {"base": 1}


def test_per_arm_intervals_and_paired_differences_match_hand_computation(sweep_dir: Path) -> None:
    result = compare(find_runs([sweep_dir]))
    base, fast = result.arms
    # base finals 0.5, 0.6, 0.49: mean 0.53, deviations -0.03, 0.07, -0.04: sd sqrt(0.0074 / 2)
    assert base.final.mean == pytest.approx(0.53)
    assert base.final.half_width == pytest.approx(T_975_DF2 * math.sqrt(0.0037) / math.sqrt(3))
    # time to 0.4: base reached on all seeds (100, 200, 150); fast on two (50, 50)
    assert base.time_to_target.reached == 3 and base.time_to_target.interval.mean == pytest.approx(150.0)
    assert fast.time_to_target.reached == 2 and fast.time_to_target.not_reached == 1
    assert fast.time_to_target.interval.mean == pytest.approx(50.0)
    (paired,) = result.paired
    # final differences per seed: +0.1, +0.2, -0.1: mean 0.2 / 3, squared deviations sum to 0.07 / 1.5
    assert paired.final.mean == pytest.approx(0.2 / 3)
    assert paired.final.half_width == pytest.approx(T_975_DF2 * math.sqrt(0.07 / 3) / math.sqrt(3))
    # speed-up only over seeds where both reached: 100/50 and 200/50 -> geometric mean sqrt(8)
    assert paired.speedup.n == 2 and paired.speedup.mean == pytest.approx(math.sqrt(8))
    assert paired.time_to_target.mean == pytest.approx(((50 - 100) + (50 - 200)) / 2)
    assert result.target.value == pytest.approx(0.4)
    # late: the mean of the last three evaluations (0.2, 0.41 or 0.3, final) per run
    assert base.late.mean == pytest.approx((0.2 + 0.41 + 0.53) / 3)
    assert paired.late.mean == pytest.approx((0.1 + 0.2 + (0.3 + 0.39 - 0.41 - 0.49)) / 9)


def test_late_averages_the_last_three_evaluations_in_time_order(tmp_path: Path) -> None:
    summary = _summary(0, 0.5, [0.0, 10.0, 20.0, 30.0, 40.0], [0.1, 0.2, 0.3, 0.4, 0.5], 1.0)
    summary["evaluations"].reverse()  # a summary's order is not trusted: time decides
    _write(tmp_path / "run", summary)
    [arm] = compare(find_runs([tmp_path / "run"])).arms
    assert arm.late.mean == pytest.approx(0.4) and arm.final.mean == pytest.approx(0.5)


def test_a_relative_target_is_a_fraction_of_an_arms_mean_final(sweep_dir: Path) -> None:
    result = compare(find_runs([sweep_dir]), target="0.5*fast")  # 0.5 x mean(0.6, 0.8, 0.39)
    assert result.target.value == pytest.approx(0.5 * 1.79 / 3)
    assert result.arms[1].time_to_target.reached == 3
    with pytest.raises(ConfigError, match="unknown arm 'nope'"):
        compare(find_runs([sweep_dir]), target="0.9*nope")
    with pytest.raises(ConfigError, match="FRACTION"):
        compare(find_runs([sweep_dir]), target="x*fast")


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("nan", "not a finite number > 0"),
        ("-0.4", "not a finite number > 0"),
        ("1.05*fast", "at most 1 when higher is better"),
        ("0*fast", "not a finite number > 0"),
        ("0.9*fast*fast", "unknown arm"),
    ],
)
def test_a_target_that_cannot_be_reached_sensibly_is_refused_naming_the_flag(
    sweep_dir: Path, target: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)) as caught:
        compare(find_runs([sweep_dir]), target=target)
    assert caught.value.key == "--target"


def test_when_lower_is_better_a_relative_target_is_at_least_the_arms_mean(tmp_path: Path) -> None:
    """Perplexity: ``1.05*base`` (5% worse than base's mean) is a target; ``0.95*base`` is one base
    itself does not reach on average, refused. A null evaluation value (a non-finite metric) is skipped."""
    for seed, final in ((0, 12.0), (1, 10.0)):
        summary = _summary(seed, final, [0.0, 50.0, 100.0], [30.0, 11.0, final], 1000.0)
        summary["metric"] = {"name": "perplexity", "value": final, "higher_is_better": False}
        summary["evaluations"].append({"round": 3, "virtual_time": 120.0, "value": None})
        _write(tmp_path / "base" / f"seed-{seed}", summary)
    runs = find_runs([tmp_path])
    result = compare(runs, target="1.05*base")
    assert result.target.value == pytest.approx(1.05 * 11.0)
    assert result.arms[0].time_to_target.reached == 2  # both reach 11.0 <= 11.55 at 50 s
    assert result.arms[0].late.mean == pytest.approx(((30 + 11 + 12) / 3 + (30 + 11 + 10) / 3) / 2)
    with pytest.raises(ConfigError, match="at least 1 when lower is better"):
        compare(runs, target="0.95*base")


def test_a_malformed_sweep_plan_is_refused_naming_the_file_and_key(sweep_dir: Path) -> None:
    for plan, key in [([1], "sweep.json"), ({"arms": ["../base"]}, "arms"), ({"target": [0.4]}, "target")]:
        (sweep_dir / "sweep.json").write_text(json.dumps(plan))
        with pytest.raises(ConfigError, match=key) as caught:
            find_runs([sweep_dir])
        assert "sweep.json" in str(caught.value)


def test_the_files_say_not_reached_k_of_n_and_the_csv_has_the_columns(
    sweep_dir: Path, tmp_path: Path
) -> None:
    files = write_comparison(compare(find_runs([sweep_dir])), tmp_path / "out")
    rows = {row["arm"]: row for row in csv.DictReader(files["csv"].open())}
    for column in ("arm", "seeds", "final_mean", "final_ci_low", "final_ci_high", "ttt_mean", "ttt_ci_low"):
        assert column in rows["base"]
    assert {"ttt_ci_high", "reached", "uplink_bytes_mean", "downlink_bytes_mean", "host_seconds_mean"} <= set(
        rows["base"]
    )
    assert rows["fast"]["reached"] == "2" and float(rows["fast"]["ttt_mean"]) == pytest.approx(50.0)
    assert rows["base"]["seeds"] == "3" and rows["base"]["missing"] == "1"
    assert float(rows["fast"]["diff_final_mean"]) == pytest.approx(0.2 / 3)
    assert rows["base"]["diff_final_mean"] == ""  # the reference is not paired with itself
    assert float(rows["base"]["late_mean"]) == pytest.approx((0.2 + 0.41 + 0.53) / 3)
    assert float(rows["fast"]["diff_late_mean"]) == pytest.approx(0.01)
    assert "last 3 mean" in files["md"].read_text()
    markdown = files["md"].read_text()
    assert "not reached (1 of 3)" in markdown
    page = files["html"].read_text()
    assert "comparison_plots/curves.png" in page and "comparison_plots/paired_final.png" in page
    assert (tmp_path / "out" / "comparison_plots" / "curves.png").stat().st_size > 1000


def test_the_curve_steps_through_each_seeds_last_evaluation(sweep_dir: Path) -> None:
    curve = mean_curve(find_runs([sweep_dir]).arms["base"])
    assert curve.times[0] == 0.0 and curve.times[-1] == 300.0
    assert curve.mean[0] == pytest.approx(0.2)
    assert curve.mean[-1] == pytest.approx(0.53)
    assert all(lo <= m <= hi for lo, m, hi in zip(curve.low, curve.mean, curve.high, strict=True))


def test_run_directories_pair_by_seed_and_arms_can_be_selected(sweep_dir: Path) -> None:
    paths = [sweep_dir / "base" / "seed-0", sweep_dir / "fast" / "seed-0", sweep_dir / "fast" / "seed-1"]
    runs = find_runs(paths)
    assert {a: len(r) for a, r in runs.arms.items()} == {"base": 1, "fast": 2}
    assert list(select_arms(runs, ["fast"]).arms) == ["fast"]
    with pytest.raises(ConfigError, match="unknown arm 'slow'"):
        select_arms(runs, ["slow"])
    with pytest.raises(ConfigError, match="already has a run with seed 0"):
        find_runs([sweep_dir / "base" / "seed-0", sweep_dir / "base" / "seed-0"])


def test_compare_cli_exits_2_on_an_unknown_arm_and_writes_nothing(sweep_dir: Path) -> None:
    result = CliRunner().invoke(app, ["compare", str(sweep_dir), "--arms", "base,ghost"])
    assert result.exit_code == 2
    assert "ghost" in result.output
    assert not (sweep_dir / "comparison.csv").exists()
    result = CliRunner().invoke(app, ["compare", str(sweep_dir), "--reference", "ghost"])
    assert result.exit_code == 2 and "ghost" in result.output


def test_compare_cli_writes_the_three_files(sweep_dir: Path) -> None:
    result = CliRunner().invoke(app, ["compare", str(sweep_dir)])
    assert result.exit_code == 0, result.output
    assert all((sweep_dir / f"comparison.{ext}").is_file() for ext in ("csv", "md", "html"))
    result = CliRunner().invoke(
        app, ["compare", str(sweep_dir / "base" / "seed-0"), str(sweep_dir / "fast" / "seed-0")]
    )
    assert result.exit_code == 2 and "--out" in result.output


def test_personal_models_are_compared_per_arm_and_paired_when_the_runs_have_them(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    personal = {  # arm: per seed (personal mean, global mean on the same slices)
        "none": {0: (0.40, 0.40), 1: (0.50, 0.50), 2: (0.45, 0.45)},
        "split": {0: (0.60, 0.41), 1: (0.65, 0.49), 2: (0.70, 0.44)},
    }
    for arm, table in personal.items():
        for seed, (mine, global_) in table.items():
            summary = _summary(seed, global_, [0.0, 300.0], [0.2, global_], 1000.0)
            summary["personal"] = {
                "method": arm,
                "value": mine,
                "worst_decile": mine - 0.2,
                "global_value": global_,
                "global_worst_decile": global_ - 0.3,
                "extra_time_fraction": 0.05 if arm == "split" else 0.0,
                "extra_uplink_bytes": 0,
                "extra_downlink_bytes": 0,
            }
            _write(root / arm / f"seed-{seed}", summary)
    (root / "sweep.json").write_text(json.dumps({"arms": ["none", "split"], "reference": "none"}))
    result = compare(find_runs([root]))
    none, split = result.arms
    assert split.personal.mean == pytest.approx(0.65) and split.personal_worst_decile.mean == pytest.approx(
        0.45
    )
    assert split.personal_lift.mean == pytest.approx((0.19 + 0.16 + 0.26) / 3)
    assert split.personal_global.mean == pytest.approx((0.41 + 0.49 + 0.44) / 3)
    assert split.personal_global_worst_decile.mean == pytest.approx((0.41 + 0.49 + 0.44) / 3 - 0.3)
    assert none.personal_lift.mean == pytest.approx(0.0) and split.personal_extra_time.mean == pytest.approx(
        0.05
    )
    (paired,) = result.paired
    assert paired.personal.n == 3 and paired.personal.mean == pytest.approx(0.2)  # +0.2, +0.15, +0.25
    paths = write_comparison(result, tmp_path / "out")
    rows = list(csv.DictReader(paths["csv"].open()))
    assert float(rows[1]["diff_personal_mean"]) == pytest.approx(0.2) and rows[0]["diff_personal_mean"] == ""
    assert float(rows[1]["personal_lift_mean"]) == pytest.approx(0.61 / 3)
    assert float(rows[1]["personal_global_worst_decile_mean"]) == pytest.approx(1.34 / 3 - 0.3)
    assert "## Personal models" in paths["md"].read_text()


def test_runs_without_personal_models_leave_those_columns_empty(sweep_dir: Path, tmp_path: Path) -> None:
    paths = write_comparison(compare(find_runs([sweep_dir])), tmp_path / "out")
    rows = list(csv.DictReader(paths["csv"].open()))
    assert all(row["personal_mean"] == "" and row["personal_lift_mean"] == "" for row in rows)
    assert "Personal models" not in paths["md"].read_text()
