"""Synchronous against asynchronous scheduling on a fleet with a wide spread of device speeds.

Schedulers (same config, seed, fleet, data split and strategy; each applies the same number of
client updates, so the host trains about as much for each):

* ``sync``: synchronous rounds of ``k = 4`` devices, waiting for the slowest;
* ``sync-deadline``: 1.5x over-selection (6 devices, the first 4 arrivals count) and a 60 s deadline;
* ``fedasync``: 4 devices training at once, each update applied on arrival (alpha 0.6, polynomial
  staleness weight);
* ``fedbuff``: 8 devices training at once, a server step every 4 arrivals;
* ``fedcompass``: every device training, 2-8 local steps assigned from observed speed, arrival groups.

The default fleet's devices differ by far more than 10x in time per local step (the script prints
the measured spread). Prints per scheduler the final metric, the virtual time to the config's target
(or, if some scheduler never reaches it, to the highest value every scheduler reached), the virtual
time of the whole run and the staleness of applied updates. The last line is ``RESULT ...`` with
``best_speedup_vs_sync``: sync's time to target over the fastest asynchronous scheduler's, among those
whose final metric is within 3 points of sync's (150 test verses: one standard error is about 4 points).

Usage:
    python bench/async.py                    # 24 updates each, FedIT, SmolLM2 (about 35 min on 2 cores)
    python bench/async.py --strategy flora   # any LoRA strategy
    python bench/async.py --quick            # 8 updates, 3 local steps, 60 test verses
    python bench/async.py --config configs/tiny.toml --quick   # seconds; a smoke test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from transformers.utils import logging as hf_logging

from _benchpath import first_time, host_line, run_summary  # first: keeps bench/ off sys.path
from _benchpath import fmt_time as _t
from fedspine.config import load_config

K = 4
"""Updates per synchronous round."""

METHODS: dict[str, list[str]] = {
    "sync": ["scheduler.name=sync"],
    "sync-deadline": ["scheduler.name=sync", "scheduler.over_selection=0.5", "scheduler.deadline_seconds=60"],
    "fedasync": ["scheduler.name=fedasync", "scheduler.concurrency=4", f"eval.every={K}"],
    "fedbuff": ["scheduler.name=fedbuff", "scheduler.concurrency=8", f"scheduler.fedbuff.buffer_size={K}"],
    "fedcompass": ["scheduler.name=fedcompass", "eval.every=2"],
}
TOLERANCE = 0.03
"""An asynchronous scheduler counts for the speed-up if its final metric is within this of sync's."""


def run_one(config: Path | None, method: str, args: argparse.Namespace) -> dict[str, Any]:
    updates = 8 if args.quick else args.updates
    overrides = [*METHODS[method], f"run.seed={args.seed}", f"strategy.name={args.strategy}"]
    overrides += ["export.save=false", "export.speed=false", f"scheduler.clients_per_round={K}"]
    if method.startswith("sync"):
        overrides += [f"scheduler.rounds={max(1, updates // K)}"]
    else:
        overrides += [f"scheduler.rounds={updates}", f"scheduler.max_updates={updates}"]
    if args.quick:
        overrides += ["train.local_steps=3", "data.test_size=60", "scheduler.fedcompass.q_max=3"]
    cfg = load_config(config, overrides)
    return run_summary(cfg)


def speed_spread(summary: dict[str, Any]) -> float:
    """Slowest over fastest device in virtual compute seconds per task (sync: equal steps per task)."""
    per_task = [d["compute_seconds"] / d["tasks"] for d in summary["devices"] if d.get("tasks")]
    return max(per_task) / min(per_task) if per_task and min(per_task) > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--updates", type=int, default=24, help="client updates each scheduler applies")
    parser.add_argument("--strategy", default="fedit", help="LoRA strategy (fedit, flora, fedspine, ...)")
    parser.add_argument("--config", type=Path, default=None, help="base config (default: the built-in one)")
    parser.add_argument("--only", nargs="*", choices=list(METHODS), default=list(METHODS))
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    print(host_line(f"strategy {args.strategy}"))
    results: dict[str, dict[str, Any]] = {}
    for method in args.only:
        started = time.perf_counter()
        results[method] = s = run_one(args.config, method, args)
        curve = ", ".join(f"{e['virtual_time']:.0f}s:{e['value']:.3f}" for e in s["evaluations"])
        print(f"{method}: done in {time.perf_counter() - started:.0f} s (host); {curve}", flush=True)

    target = next(iter(results.values()))["target"] or 0.0
    if any(first_time(s, target) is None for s in results.values()):
        target = min(max(e["value"] for e in s["evaluations"]) for s in results.values())
        print(f"\nnot every scheduler reached the config target; using the common target {target:.4f}")
    if "sync" in results:
        spread = speed_spread(results["sync"])
        print(f"device speed spread (slowest / fastest compute per task): {spread:.0f}x")
    print(
        f"\n{'scheduler':14} {'final':>7} {'t(target)':>12} {'virtual':>10} {'applied':>8} "
        f"{'dispatched':>10} {'mean tau':>8} {'max tau':>7} {'uplink MB':>9}"
    )
    for method, s in results.items():
        updates = s.get("updates") or {}
        applied = updates.get("applied", s["tasks"]["ok"])
        dispatched = updates.get("dispatched", sum(s["tasks"].values()))
        stale = s.get("staleness") or {"mean": 0.0, "max": 0.0}
        print(
            f"{method:14} {s['metric']['value']:7.4f} {_t(first_time(s, target)):>12} "
            f"{s['virtual_seconds']:9.1f}s {applied:8d} {dispatched:10d} "
            f"{stale['mean']:8.2f} {stale['max']:7.0f} "
            f"{s['uplink_bytes'] / 1e6:9.1f}"
        )
    print(f"target {target:.4f}; chance level {next(iter(results.values()))['chance_level']:.4f}")
    print("\nupdates that arrived, per device class (who the model learned from):")
    for method, s in results.items():
        by_class: dict[str, int] = {}
        for d in s["devices"]:
            by_class[d["device_class"]] = by_class.get(d["device_class"], 0) + int(d.get("ok", 0))
        print(f"  {method:14} " + ", ".join(f"{c} {n}" for c, n in sorted(by_class.items())))

    line = [f"target={target:.4f}"]
    if "sync" in results:
        sync = results["sync"]
        t_sync = first_time(sync, target)
        best: tuple[float, str] | None = None
        for method, s in results.items():
            t = first_time(s, target)
            if method == "sync" or t is None or t_sync is None or t <= 0:
                continue
            line.append(f"{method}_speedup={t_sync / t:.3f}")
            if s["metric"]["value"] >= sync["metric"]["value"] - TOLERANCE and (best is None or t < best[0]):
                best = (t, method)
        if best is not None and t_sync is not None:
            speedup = t_sync / best[0]
            print(f"best scheduler at equal final metric: {best[1]}, {speedup:.2f}x faster to target")
            line += [f"best={best[1]}", f"best_speedup_vs_sync={t_sync / best[0]:.3f}"]
        else:
            line.append("best_speedup_vs_sync=nan")
    line += [f"{m}_final={s['metric']['value']:.4f}" for m, s in results.items()]
    print("RESULT " + " ".join(line))


if __name__ == "__main__":
    main()
