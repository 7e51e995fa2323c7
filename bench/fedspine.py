"""FedSpine against its baselines on one fleet, task and seed, at equal sparsity.

Methods (all on the default fleet and Bible genre task, same seed, so fleet, data split, client
sampling and batches are identical):

* ``fedit``: FedIT on the dense model (no pruning), the time reference;
* ``prune_then_tune``: one calibration round, then one-shot pruning to the target sparsity with a
  frozen mask, then FedIT-style tuning;
* ``fedmp``: every device at the target ratio under FedSpine's schedule and moving masks (FedMP-like
  fixed ratios);
* ``random``: FedSpine with a random (ratio, rank) policy;
* ``fedspine``: FedSpine with its per-device sliding-window UCB bandit;
* ``pooled``: FedSpine with the pooled UCB policy (progress shared across the fleet);
* ``fedspine-floor``, ``pooled-floor`` (with ``--only``): the two bandits exploring from the
  schedule's floor instead of the most pruned arm.

Every pruning method is evaluated on the global model pruned at the same target sparsity (equal
sparsity); devices may deploy more pruned models (their policy's choice), reported as the mean
deployed sparsity. Prints, per method, the final accuracy, the virtual time to the config's target
accuracy and to the *common target* (the highest accuracy every method reached), the bytes moved,
and the deployed models' size and CPU generation speed. The last line is ``RESULT …``:
``speedup_vs_fedit`` is FedIT's time to target over FedSpine's (the config target when both reach it,
otherwise the common target), ``delta_vs_prune_then_tune`` FedSpine's final accuracy minus
prune-then-tune's.

Usage:
    python bench/fedspine.py                  # 8 rounds each (about 7 min per method on 2 CPU cores)
    python bench/fedspine.py --quick          # 3 rounds, 3 local steps, 60 test verses: under 10 min
    python bench/fedspine.py --config configs/tiny.toml --quick   # seconds; a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from transformers.utils import logging as hf_logging

from _benchpath import first_time, host_line, run_summary  # first: keeps bench/ off sys.path
from _benchpath import fmt_time as _t
from fedspine.config import load_config

METHODS: dict[str, list[str]] = {
    "fedit": ["strategy.name=fedit"],
    "prune_then_tune": ["strategy.name=prune_then_tune"],
    "fedmp": ["strategy.name=fedmp"],
    "random": ["strategy.name=fedspine", "strategy.fedspine.policy=random"],
    "fedspine": ["strategy.name=fedspine", "strategy.fedspine.policy=swucb"],
    "pooled": ["strategy.name=fedspine", "strategy.fedspine.policy=pooled"],
    "fedspine-floor": [
        "strategy.name=fedspine",
        "strategy.fedspine.policy=swucb",
        "strategy.fedspine.explore=floor",
    ],
    "pooled-floor": [
        "strategy.name=fedspine",
        "strategy.fedspine.policy=pooled",
        "strategy.fedspine.explore=floor",
    ],
}


def run_one(config: Path | None, method: str, quick: bool, seed: int, sparsity: float) -> dict[str, Any]:
    overrides = [*METHODS[method], f"run.seed={seed}", "export.save=false"]
    overrides += [f"strategy.fedspine.target_sparsity={sparsity}"]
    if quick:
        overrides += ["scheduler.rounds=3", "train.local_steps=3", "data.test_size=60", "export.speed=false"]
    else:
        overrides += ["scheduler.rounds=8"]
    cfg = load_config(config, overrides)
    return run_summary(cfg)


def deployed(summary: dict[str, Any]) -> tuple[float, float, float | None]:
    """Mean deployed sparsity, mean deployed parameters (M) and mean tokens/s over the fleet's devices."""
    models = summary["device_models"]
    by_dir = {m["dir"]: m for m in models["models"]}
    chosen = [by_dir[d["model"]] for d in models["devices"].values()]
    ratios = [d["ratio"] for d in models["devices"].values()]
    speeds = [m["tokens_per_second"] for m in chosen if m["tokens_per_second"]]
    return (
        statistics.fmean(ratios),
        statistics.fmean(m["parameters"] for m in chosen) / 1e6,
        statistics.fmean(speeds) if speeds else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sparsity", type=float, default=0.3, help="target sparsity of every pruning method")
    parser.add_argument("--config", type=Path, default=None, help="base config (default: the built-in one)")
    default = [m for m in METHODS if not m.endswith("-floor")]
    parser.add_argument("--only", nargs="*", choices=list(METHODS), default=default)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    print(host_line())
    results: dict[str, dict[str, Any]] = {}
    for method in args.only:
        started = time.perf_counter()
        results[method] = run_one(args.config, method, args.quick, args.seed, args.sparsity)
        print(f"{method}: done in {time.perf_counter() - started:.0f} s (host)", flush=True)

    target = next(iter(results.values()))["target"] or 0.0
    common = min(max(e["value"] for e in s["evaluations"]) for s in results.values())
    print(f"\nconfig target {target}, common target {common:.4f} (highest accuracy every method reached)")
    print(
        f"{'method':16} {'final acc':>9} {'t(target)':>12} {'t(common)':>12} {'virtual':>9} "
        f"{'uplink MB':>9} {'downlink MB':>11} {'deployed sp.':>12} {'params M':>8} {'tok/s':>6}"
    )
    for method, s in results.items():
        sparsity, params, speed = deployed(s)
        print(
            f"{method:16} {s['metric']['value']:9.4f} {_t(first_time(s, target)):>12} "
            f"{_t(first_time(s, common)):>12} {s['virtual_seconds']:8.1f}s {s['uplink_bytes'] / 1e6:9.1f} "
            f"{s['downlink_bytes'] / 1e6:11.1f} {sparsity:12.2f} {params:8.1f} "
            f"{'-' if speed is None else f'{speed:.1f}':>6}"
        )
    print(f"chance level {next(iter(results.values()))['chance_level']:.4f}")

    line = []
    if "fedit" in results and "fedspine" in results:
        fedit, spine = results["fedit"], results["fedspine"]
        use = target if first_time(fedit, target) and first_time(spine, target) else common
        a, b = first_time(fedit, use), first_time(spine, use)
        speedup = a / b if a is not None and b else None
        print(
            f"FedSpine vs FedIT: time to {use:.4f}: {_t(a)} vs {_t(b)} -> speed-up "
            f"{'n/a' if speedup is None else f'{speedup:.2f}x'}"
        )
        line.append(
            f"speedup_vs_fedit={'nan' if speedup is None else f'{speedup:.3f}'} speedup_target={use:.4f}"
        )
    if "fedspine" in results and "prune_then_tune" in results:
        delta = results["fedspine"]["metric"]["value"] - results["prune_then_tune"]["metric"]["value"]
        line.append(f"delta_vs_prune_then_tune={delta:+.4f}")
    line += [f"{m}_acc={s['metric']['value']:.4f}" for m, s in results.items()]
    print("RESULT " + " ".join(line))


if __name__ == "__main__":
    main()
