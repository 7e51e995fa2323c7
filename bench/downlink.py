"""Downlink bytes per run: FedIT against FedSpine with the bounded adapter and with exact merges.

Every arm runs the same config and seed with the same selection of devices per round. Bytes do not
depend on how long a device trains or what it learns, only on which devices take part and what their
masks keep, so local training is cut to one step and evaluation to the end: the figures are those of
the full run's rounds at a fraction of its time. Ratios are FedSpine's bytes over FedIT's (the issue's
bound is 1.5).

Usage:
    python bench/downlink.py                                # configs/default.toml
    python bench/downlink.py --config configs/fleet-paper.toml --rounds 10
    python bench/downlink.py --config configs/fleet80.toml --rounds 10 --arms fedit fedspine
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _benchpath import host_line, run_summary  # first: keeps bench/ off sys.path
from fedspine.config import load_config

ARMS = {
    "fedit": ["strategy.name=fedit"],
    "fedspine": ["strategy.name=fedspine"],
    "fedspine_exact": ["strategy.name=fedspine", "strategy.fedspine.global_rank=0"],
}
"""FedIT; FedSpine as configured (global_rank "auto": the bounded adapter); FedSpine with exact merges."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/default.toml"))
    parser.add_argument("--rounds", type=int, default=0, help="rounds (0: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=sorted(ARMS))
    args = parser.parse_args()
    print(host_line())
    common = [
        f"run.seed={args.seed}",
        "train.local_steps=1",
        "data.test_size=60",
        "eval.every=100000",
        "export.save=false",
        "export.speed=false",
    ]
    if args.rounds:
        common.append(f"scheduler.rounds={args.rounds}")
    sent: dict[str, int] = {}
    for arm, overrides in ARMS.items():
        if arm not in args.arms:
            continue
        summary = run_summary(load_config(args.config, common + overrides))
        sent[arm] = int(summary["downlink_bytes"])
        tasks = sum(int(d["tasks"]) for d in summary["devices"])
        print(f"{arm:16s} {sent[arm] / 1e6:10.1f} MB  {sent[arm] / max(tasks, 1) / 1e6:8.3f} MB per task")
    ratios = {arm: sent[arm] / sent["fedit"] for arm in sent if arm != "fedit" and "fedit" in sent}
    for arm, ratio in ratios.items():
        print(f"{arm} / fedit: {ratio:.2f}x")
    line = " ".join(f"{arm}_ratio={ratio:.3f}" for arm, ratio in ratios.items())
    print(f"RESULT config={args.config.stem} seed={args.seed} fedit_bytes={sent.get('fedit', 0)} {line}")


if __name__ == "__main__":
    main()
