"""Compressed uploads with and without error feedback, on a fleet where every device is on 5G.

On 5G the uplink (7.5 Mbit/s here) is the bottleneck of a round. Every setting runs the same config,
seed, fleet, data split and client sampling; only what the devices upload differs:

* ``none``: the fp32 LoRA factors (the reference);
* ``topk``, ``topk+ef``, ``topk+ef21``, ``topk+econtrol``: top-10% of each factor's change, with no
  feedback, EF, EF21 or EControl (eta 0.2);
* ``topk5+ef21``: top-5% with EF21 (past 10x fewer bytes);
* ``sign+ef``: scaled sign (1 bit per coordinate) with EF;
* ``qsgd``: QSGD with 16 levels (unbiased: no feedback);
* ``int8``: int8 with an absmax scale.

Prints per setting the uplink bytes and their reduction against ``none``, the final metric and its
difference, and the virtual time to the config's target (or to the highest value every setting
reached) and its ratio to ``none``. The last line is ``RESULT ...``; ``best`` is the setting with the
largest byte reduction among those that lose at most 1 point of the metric.

Usage:
    python bench/compression.py                 # 5 rounds each, FedIT, SmolLM2 (about 65 min on 2 cores)
    python bench/compression.py --strategy flora
    python bench/compression.py --config configs/tiny.toml --quick   # seconds; a smoke test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from transformers.utils import logging as hf_logging

from _benchpath import first_time, host_line, run_summary  # first: keeps bench/ off sys.path
from fedspine.config import load_config

SETTINGS: dict[str, list[str]] = {
    "none": [],
    "topk": ["compression.codec=topk"],
    "topk+ef": ["compression.codec=topk", "compression.feedback=ef"],
    "topk+ef21": ["compression.codec=topk", "compression.feedback=ef21"],
    "topk+econtrol": ["compression.codec=topk", "compression.feedback=econtrol"],
    "topk5+ef21": ["compression.codec=topk", "compression.ratio=0.05", "compression.feedback=ef21"],
    "sign+ef": ["compression.codec=sign", "compression.feedback=ef"],
    "qsgd": ["compression.codec=qsgd", "compression.levels=16"],
    "int8": ["compression.codec=int8"],
}
MAX_LOSS = 0.01
"""A setting counts for ``best`` if it loses at most this much of the final metric."""


def run_one(config: Path | None, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    base = load_config(config)
    overrides = [f"fleet.groups[{i}].network=5g" for i in range(len(base.fleet.groups))]
    overrides += ["compression.ratio=0.1", *SETTINGS[setting], f"run.seed={args.seed}"]
    overrides += [f"strategy.name={args.strategy}", "export.save=false", "export.speed=false"]
    if args.quick:
        overrides += ["scheduler.rounds=2", "train.local_steps=3", "data.test_size=60"]
    cfg = load_config(config, overrides)
    return run_summary(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategy", default="fedit", help="LoRA strategy (fedit, flora, fedspine, ...)")
    parser.add_argument("--config", type=Path, default=None, help="base config (default: the built-in one)")
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    print(host_line(f"strategy {args.strategy}; every device on 5G"))
    settings = ["none", *(s for s in args.only if s != "none")]
    results: dict[str, dict[str, Any]] = {}
    for setting in settings:
        started = time.perf_counter()
        results[setting] = s = run_one(args.config, setting, args)
        curve = ", ".join(f"{e['virtual_time']:.0f}s:{e['value']:.3f}" for e in s["evaluations"])
        print(f"{setting}: done in {time.perf_counter() - started:.0f} s (host); {curve}", flush=True)

    ref = results["none"]
    target = ref["target"] or 0.0
    if any(first_time(s, target) is None for s in results.values()):
        target = min(max(e["value"] for e in s["evaluations"]) for s in results.values())
        print(f"\nnot every setting reached the config target; using the common target {target:.4f}")
    t_ref = first_time(ref, target)
    print(
        f"\n{'setting':14} {'uplink MB':>9} {'reduction':>9} {'final':>7} {'delta':>7} "
        f"{'t(target)':>10} {'t ratio':>7} {'virtual':>9}"
    )
    line = [f"target={target:.4f}"]
    best: tuple[float, str] | None = None
    for setting, s in results.items():
        reduction = ref["uplink_bytes"] / s["uplink_bytes"]
        delta = s["metric"]["value"] - ref["metric"]["value"]
        t = first_time(s, target)
        ratio = t / t_ref if t is not None and t_ref else None
        print(
            f"{setting:14} {s['uplink_bytes'] / 1e6:9.1f} {reduction:8.1f}x {s['metric']['value']:7.4f} "
            f"{delta:+7.4f} {'-' if t is None else f'{t:.0f} s':>10} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>7} {s['virtual_seconds']:8.0f}s"
        )
        key = setting.replace("+", "_")
        line += [f"{key}_reduction={reduction:.2f}", f"{key}_delta={delta:+.4f}"]
        if setting != "none" and delta >= -MAX_LOSS and (best is None or reduction > best[0]):
            best = (reduction, setting)
    if best is not None:
        print(f"best within {MAX_LOSS:.2f} of the reference: {best[1]}, {best[0]:.1f}x fewer uplink bytes")
        line += [f"best={best[1].replace('+', '_')}", f"best_reduction={best[0]:.2f}"]
    else:
        line.append("best_reduction=nan")
    print("RESULT " + " ".join(line))


if __name__ == "__main__":
    main()
