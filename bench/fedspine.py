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
prune-then-tune and to fedmp (global model at the target sparsity) and to FedIT on the deployed models,
the speed-up of its rounds over FedIT's (virtual time of the whole run: the bound on the speed-up to
the target were every round to progress as much as FedIT's), and the deployed models against the
dense one per device class: parameter ratio and host decode speed ratio (each run measures the dense
and the pruned models back to back on the host; the worst class in the RESULT line), and per arm the
share of each device class's tasks that ended late or dropped (a deadline's cost; the worst class in
the RESULT line).

``--sweep fleet80`` reads ``bench/sweeps/fleet80.toml`` instead (FedIT and FedSpine on the 80-device
fleet, 3 seeds) and ``--sweep fleet-paper`` ``bench/sweeps/fleet-paper.toml`` (the paper's 80 Jetsons,
8 arms with FedIT and FedSpine under a deadline, 5 seeds); each prints the same figures for the arms it
has, and FedSpine with a deadline against FedIT with the same deadline.

Usage:
    python bench/fedspine.py --workers 2              # 30 runs
    python bench/fedspine.py --sweep fleet80 --workers 2   # 6 runs on the 80-device fleet
    python bench/fedspine.py --sweep fleet-paper --resume  # 40 runs on the paper's fleet
    python bench/fedspine.py --config configs/tiny.toml --quick --only fedit prune_then_tune fedspine
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from _benchpath import interval_pairs, run_bench_sweep, sweep_parser  # first: keeps bench/ off sys.path
from fedspine.metrics.stats import Interval, paired_difference, paired_ratio, t_interval
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


def virtual_seconds(run: Any) -> float:
    """A run's virtual time for all its rounds."""
    return float(run.summary.virtual_seconds)


def deployed_ratios(run: Any) -> dict[str, dict[str, float]]:
    """Per device class, the mean over its devices of the deployed model's parameters and host decode
    speed relative to the dense model's (``params``, ``speed``; a ratio absent where not measured)."""
    manifest = run.summary.device_models or {}
    dense = manifest.get("dense_base") or {}
    models = {m.get("dir"): m for m in manifest.get("models") or []}
    classes = {str(d["device_id"]): d.get("device_class", "?") for d in run.summary.devices}
    ratios: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for device, deployed in (manifest.get("devices") or {}).items():
        model = models.get(deployed.get("model"), {})
        for name, key in (("params", "parameters"), ("speed", "tokens_per_second")):
            if model.get(key) and dense.get(key):
                ratios[classes.get(device, "?")][name].append(float(model[key]) / float(dense[key]))
    return {c: {k: sum(v) / len(v) for k, v in r.items()} for c, r in ratios.items()}


def by_class(runs: list[Any]) -> dict[str, dict[str, Interval]]:
    """``deployed_ratios`` per device class and ratio, as intervals over the runs (seeds)."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for device_class, ratios in deployed_ratios(run).items():
            for name, value in ratios.items():
                values[device_class][name].append(value)
    return {c: {k: t_interval(v) for k, v in r.items()} for c, r in sorted(values.items())}


def print_by_class(arm: str, table: dict[str, dict[str, Interval]]) -> None:
    """The deployed models of ``arm`` against dense, one line per device class."""
    print(f"\n{arm}: deployed model / dense, per device class (mean [95% interval] over seeds)")
    for device_class, ratios in table.items():
        cells = []
        for name in ("params", "speed"):
            r = ratios.get(name)
            cells.append(f"{name} {r.mean:.3f} [{r.low:.3f}, {r.high:.3f}] (n={r.n})" if r else f"{name} n/a")
        print(f"  {device_class:<18} " + "  ".join(cells))


def missed_shares(run: Any) -> dict[str, float]:
    """Per device class, the share of its tasks that ended late or dropped (a deadline's cost: work
    the class did that never counted)."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for device in run.summary.devices:
        missed_tasks = counts[device.get("device_class", "?")]
        missed_tasks[0] += int(device.get("late", 0)) + int(device.get("dropped", 0))
        missed_tasks[1] += int(device.get("tasks", 0))
    return {c: missed / tasks for c, (missed, tasks) in sorted(counts.items()) if tasks}


def print_missed(runs: dict[str, list[Any]]) -> dict[str, dict[str, Interval]]:
    """Every arm's late-or-dropped share per device class, as intervals over the seeds."""
    print("\ntasks late or dropped, per device class (share of the class's tasks, mean [95% interval])")
    tables = {}
    for arm, arm_runs in runs.items():
        values: dict[str, list[float]] = defaultdict(list)
        for run in arm_runs:
            for device_class, share in missed_shares(run).items():
                values[device_class].append(share)
        tables[arm] = {c: t_interval(v) for c, v in sorted(values.items())}
        cells = [f"{c} {i.mean:.3f} [{i.low:.3f}, {i.high:.3f}]" for c, i in tables[arm].items()]
        print(f"  {arm:<16} " + "; ".join(cells))
    return tables


def main() -> None:
    parser = sweep_parser(__doc__.splitlines()[0], "fedspine")
    parser.add_argument(
        "--sweep",
        choices=("fedspine", "fleet80", "fleet-paper"),
        default="fedspine",
        help="bench/sweeps/NAME.toml to run (default --out: runs/bench-NAME)",
    )
    args = parser.parse_args()
    comparison = run_bench_sweep(args.sweep, args, QUICK)
    arms = {a.arm: a for a in comparison.arms}
    paired = {p.arm: p for p in comparison.paired}
    line = [f"target={comparison.target.value:.4f}"]
    if "fedspine" in paired:
        line += interval_pairs("speedup_vs_fedit", paired["fedspine"].speedup, 3)
        line += interval_pairs("delta_vs_fedit", paired["fedspine"].final)
    runs = comparison.runs
    for baseline in ("prune_then_tune", "fedmp", "random", "oracle"):
        if "fedspine" in arms and baseline in arms:
            delta = paired_difference(per_seed(runs[baseline], final), per_seed(runs["fedspine"], final))
            line += interval_pairs(f"delta_vs_{baseline}", delta)
    if "fedspine" in paired:
        line += interval_pairs("deployed_delta_vs_fedit", paired["fedspine"].deployed_metric)
    if "fedspine" in runs and "fedit" in runs:
        # The rounds' own speed-up: what time to target would gain if every round progressed as FedIT's.
        rounds = paired_ratio(
            per_seed(runs["fedit"], virtual_seconds), per_seed(runs["fedspine"], virtual_seconds)
        )
        line += interval_pairs("rounds_speedup_vs_fedit", rounds, 3)
    if "fedspine_deadline" in runs and "fedit_deadline" in runs:
        rounds = paired_ratio(
            per_seed(runs["fedit_deadline"], virtual_seconds),
            per_seed(runs["fedspine_deadline"], virtual_seconds),
        )
        line += interval_pairs("deadline_rounds_speedup", rounds, 3)
        delta = paired_difference(
            per_seed(runs["fedit_deadline"], final), per_seed(runs["fedspine_deadline"], final)
        )
        line += interval_pairs("deadline_delta", delta)
    if "fedspine" in runs:
        table = by_class(runs["fedspine"])
        print_by_class("fedspine", table)
        for name, worst in (("params", max), ("speed", min)):
            found = [r[name].mean for r in table.values() if name in r]
            if found:
                line.append(f"deployed_{name}_ratio_worst_class={worst(found):.4f}")
    missed = print_missed(runs)
    for arm, table in missed.items():
        if table:
            line.append(f"{arm}_missed_share_worst_class={max(i.mean for i in table.values()):.4f}")
    line += [f"{a.arm}_acc={a.final.mean:.4f}" for a in comparison.arms]
    print("RESULT " + " ".join(line))


if __name__ == "__main__":
    main()
