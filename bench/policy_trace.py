"""What a FedSpine policy saw and chose, per device class: the evidence behind its arms.

Runs one config with each named policy and prints, per policy and device class, the tasks' mean
extra pruning, the share of tasks slower than the reward's cap ``D`` (for those, ``Q * D / T`` always
favours the lighter arm), the mean deployed ratio; and for the policy's observations, per arm, the
mean normalised probe quality with its spread across tasks (the signal a quality-learning bandit
ranks arms by) next to the arms' relative work.

Usage:
    python bench/policy_trace.py --config configs/fleet80.toml --rounds 6 --steps 2 --policies pooled paced
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from _benchpath import host_line  # first: keeps bench/ off sys.path
from fedspine.config import load_config
from fedspine.metrics.records import RunRecorder
from fedspine.runtime.engine import Engine
from fedspine.runtime.experiment import build_experiment


def trace(config: Path, policy: str, overrides: list[str]) -> dict[str, Any]:
    """Run ``config`` with ``policy``; the strategy's reward log, its classes and deployed arms."""
    cfg = load_config(config, [*overrides, "strategy.name=fedspine", f"strategy.fedspine.policy={policy}"])
    experiment = build_experiment(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        recorder = RunRecorder(Path(tmp) / "run")
        Engine(experiment, recorder).run()
        recorder.close()
    strategy = experiment.strategy
    classes = {d.device_id: d.device_class.name for d in experiment.devices}
    deployed = strategy.deployment(list(classes))  # type: ignore[attr-defined]
    work = {a: strategy.policy.observed.work(a) for a in strategy.policy.arms}  # type: ignore[attr-defined]
    return {"rewards": strategy.rewards, "classes": classes, "deployed": deployed, "work": work}  # type: ignore[attr-defined]


def report(policy: str, run: dict[str, Any]) -> dict[str, float]:
    """Print the per-class and per-arm tables; the deployed ratio per class."""
    by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in run["rewards"]:
        by_class[run["classes"][row["device_id"]]].append(row)
    deployed: dict[str, list[float]] = defaultdict(list)
    for device, arm in run["deployed"].items():
        deployed[run["classes"][device]].append(arm.ratio)
    print(f"\n{policy}: class, tasks, mean extra pruning, share of tasks slower than D, deployed ratio")
    result = {}
    for name in sorted(deployed):
        rows = by_class.get(name, [])
        slower = [r for r in rows if r["quality"] is not None and r["reward"] < r["quality"] - 1e-9]
        extra = statistics.fmean(r["extra_ratio"] for r in rows) if rows else float("nan")
        result[name] = statistics.fmean(deployed[name])
        print(
            f"  {name:20s} {len(rows):4d} {extra:6.3f} {len(slower) / max(len(rows), 1):6.2f} "
            f"{result[name]:6.3f}"
        )
    by_arm: dict[tuple[float, int], list[float]] = defaultdict(list)
    for row in run["rewards"]:
        if row["quality"] is not None:
            by_arm[(row["extra_ratio"], row["rank"])].append(row["quality"])
    print(f"{policy}: arm (extra, rank), relative work, tasks, probe quality mean, sd")
    for arm, work in sorted(run["work"].items()):
        values = by_arm.get((arm.ratio, arm.rank), [])
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        mean = statistics.fmean(values) if values else float("nan")
        print(f"  {arm.ratio:.2f}/{arm.rank:<3d} {work:6.3f} {len(values):4d} {mean:7.3f} {sd:7.3f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/fleet80.toml"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="local steps per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", nargs="+", default=["pooled", "paced"])
    args = parser.parse_args()
    print(host_line())
    overrides = [
        f"run.seed={args.seed}",
        f"scheduler.rounds={args.rounds}",
        f"train.local_steps={args.steps}",
        "data.test_size=60",
        "eval.every=100000",
        "export.save=false",
        "export.speed=false",
    ]
    line = []
    for policy in args.policies:
        deployed = report(policy, trace(args.config, policy, overrides))
        spread = max(deployed.values()) - min(deployed.values())
        line.append(f"{policy}_deployed_spread={spread:.3f}")
    print(f"RESULT config={args.config.stem} seed={args.seed} " + " ".join(line))


if __name__ == "__main__":
    main()
