"""FedSpine against its baselines at equal sparsity, across seeds.

Runs the sweep ``bench/sweeps/fedspine.toml`` (the default fleet and Bible genre task, 10 synchronous
rounds, target sparsity 0.3, 5 seeds, 600 test verses): dense ``fedit``; ``fedspine`` (the pooled
bandit); ``prune_then_tune`` (one calibration round, one-shot pruning, frozen mask); ``fedmp`` (every
device at the target, moving mask); FedSpine with a ``random`` policy and with the profile-reading
``oracle``. Pruning methods are evaluated on the global model pruned at the target sparsity; the
comparison also shows the metric and parameters of the models the devices deploy. The target is 95%
of FedIT's mean final accuracy.

The last line is ``RESULT …``: FedSpine's speed-up to the target over FedIT (geometric mean over the
seeds where both reached it, with interval), its paired final-accuracy differences to FedIT, to
prune-then-tune and to fedmp (global model at the target sparsity) and to FedIT on the deployed models.

Usage:
    python bench/fedspine.py --workers 2              # 30 runs
    python bench/fedspine.py --config configs/tiny.toml --quick --only fedit prune_then_tune fedspine
"""

from __future__ import annotations

from typing import Any

from _benchpath import interval_pairs, run_bench_sweep, sweep_parser  # first: keeps bench/ off sys.path
from fedspine.metrics.stats import paired_difference
from fedspine.report.compare import per_seed

QUICK = {
    "scheduler.rounds": 3,
    "train.local_steps": 2,
    "data.test_size": 60,
    "data.max_examples": 600,
    "export.speed": False,
}


def final(run: Any) -> float:
    """A run's final metric (the global model, at the target sparsity for pruning methods)."""
    return float(run.summary.metric.value or "nan")


def main() -> None:
    args = sweep_parser(__doc__.splitlines()[0], "fedspine").parse_args()
    comparison = run_bench_sweep("fedspine", args, QUICK)
    arms = {a.arm: a for a in comparison.arms}
    paired = {p.arm: p for p in comparison.paired}
    line = [f"target={comparison.target.value:.4f}"]
    if "fedspine" in paired:
        line += interval_pairs("speedup_vs_fedit", paired["fedspine"].speedup, 3)
        line += interval_pairs("delta_vs_fedit", paired["fedspine"].final)
    runs = comparison.runs
    for baseline in ("prune_then_tune", "fedmp"):
        if "fedspine" in arms and baseline in arms:
            delta = paired_difference(per_seed(runs[baseline], final), per_seed(runs["fedspine"], final))
            line += interval_pairs(f"delta_vs_{baseline}", delta)
    if "fedspine" in paired:
        line += interval_pairs("deployed_delta_vs_fedit", paired["fedspine"].deployed_metric)
    line += [f"{a.arm}_acc={a.final.mean:.4f}" for a in comparison.arms]
    print("RESULT " + " ".join(line))


if __name__ == "__main__":
    main()
