"""Heterogeneous LoRA ranks: FedIT, zero-padding, HetLoRA, FlexLoRA and FLoRA on one fleet and task.

Every strategy runs ``configs/hetero.toml`` (the default fleet and Bible genre task, ranks 4/8/16 by
device class) with the same seed, so fleet, data split, client sampling and batches are identical.
FedIT needs one rank for every device: it runs at rank 4, the smallest rank all devices afford.
Prints, per strategy, the final accuracy, the virtual time to the target accuracy, and the bytes
moved; the last line is ``RESULT …``.

Usage:
    python bench/hetlora.py            # 5 rounds each (about 5-6 min per strategy on a 2-core CPU)
    python bench/hetlora.py --quick    # 3 rounds, 6 local steps, 100 test verses
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

import _benchpath  # noqa: F401  (must precede the fedspine imports)
from fedspine.api import run_experiment
from fedspine.config import load_config

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["fedit", "zeropad", "hetlora", "flexlora", "flora"]


def run_one(name: str, quick: bool, seed: int) -> dict:
    overrides = [f"strategy.name={name}", f"run.seed={seed}"]
    if name == "fedit":
        overrides += ["lora.class_ranks={}", "lora.rank=4", "lora.alpha=8.0"]
    if quick:
        overrides += ["scheduler.rounds=3", "train.local_steps=6", "data.test_size=100"]
    cfg = load_config(ROOT / "configs" / "hetero.toml", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        return run_experiment(cfg, Path(tmp) / "run").summary


def _fmt_time(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds:8.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", choices=STRATEGIES, default=STRATEGIES)
    args = parser.parse_args()
    print(f"host: {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    results = {}
    for name in args.only:
        started = time.perf_counter()
        results[name] = run_one(name, args.quick, args.seed)
        print(f"{name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    target = next(iter(results.values()))["target"]
    header = f"{'strategy':10} {'accuracy':>9} {'time to ' + str(target):>16} {'uplink MB':>10}"
    print(f"\n{header} {'downlink MB':>12}")
    for name, s in results.items():
        up, down = s["uplink_bytes"] / 1e6, s["downlink_bytes"] / 1e6
        ttt = _fmt_time(s["time_to_target_seconds"])
        print(f"{name:10} {s['metric']['value']:9.4f} {ttt:>16} {up:10.1f} {down:12.1f}")
    print(f"chance level {next(iter(results.values()))['chance_level']:.4f}")
    pairs = " ".join(f"{n}_acc={s['metric']['value']:.4f}" for n, s in results.items())
    ttts = " ".join(f"{n}_ttt={s['time_to_target_seconds']}" for n, s in results.items())
    best = max(results, key=lambda n: results[n]["metric"]["value"])
    print(f"RESULT best={best} {pairs} {ttts}")


if __name__ == "__main__":
    main()
