"""FedSpine against its baselines at equal sparsity, across seeds.

Runs the sweep ``bench/sweeps/fedspine.toml`` (the default fleet and Bible genre task, 8 synchronous
rounds, target sparsity 0.3, 600 test verses): dense ``fedit``; ``prune_then_tune`` (one calibration
round, one-shot pruning, frozen mask); ``fedmp`` (every device at the target ratio); FedSpine with a
``random`` policy, its per-device bandit (``fedspine``) and the ``pooled`` bandit. Pruning methods are
evaluated on the global model pruned at the target sparsity; the comparison also shows the metric and
parameters of the models the devices deploy. The target is 95% of FedIT's mean final accuracy.

The last line is ``RESULT …``: FedSpine's speed-up to the target over FedIT (geometric mean over the
seeds where both reached it, with interval), and its paired final-accuracy differences to FedIT and to
prune-then-tune.

Usage:
    python bench/fedspine.py --workers 2              # 18 runs
    python bench/fedspine.py --config configs/tiny.toml --quick --only fedit prune_then_tune fedspine
"""

from __future__ import annotations

from _benchpath import interval_pairs, run_bench_sweep, sweep_parser  # first: keeps bench/ off sys.path

QUICK = {
    "scheduler.rounds": 3,
    "train.local_steps": 2,
    "data.test_size": 60,
    "data.max_examples": 600,
    "export.speed": False,
}


def main() -> None:
    args = sweep_parser(__doc__.splitlines()[0], "fedspine").parse_args()
    comparison = run_bench_sweep("fedspine", args, QUICK)
    arms = {a.arm: a for a in comparison.arms}
    paired = {p.arm: p for p in comparison.paired}
    line = [f"target={comparison.target.value:.4f}"]
    if "fedspine" in paired:
        line += interval_pairs("speedup_vs_fedit", paired["fedspine"].speedup, 3)
        line += interval_pairs("delta_vs_fedit", paired["fedspine"].final)
    if "fedspine" in arms and "prune_then_tune" in arms:
        from fedspine.metrics.stats import paired_difference
        from fedspine.report.compare import per_seed

        def final(run: object) -> float:
            return float(run.summary["metric"]["value"])  # type: ignore[attr-defined]

        runs = comparison.runs
        delta = paired_difference(per_seed(runs["prune_then_tune"], final), per_seed(runs["fedspine"], final))
        line += interval_pairs("delta_vs_prune_then_tune", delta)
    line += [f"{a.arm}_acc={a.final.mean:.4f}" for a in comparison.arms]
    print("RESULT " + " ".join(line))


if __name__ == "__main__":
    main()
