"""Compressed uploads with and without error feedback, every device on 5G, across seeds.

Runs the sweep ``bench/sweeps/compression.toml`` (FedIT on the default fleet and task with every
device on 5G, whose 7.5 Mbit/s uplink is the bottleneck of a round; 3 seeds, 600 test verses) and
prints its comparison: per setting the final accuracy, the virtual time to 0.40 and the uplink bytes
with 95% intervals, and every setting paired against uncompressed uploads on the same seeds (final
accuracy difference, uplink ratio, speed-up to the target).

The last line is ``RESULT …``: per setting its uplink reduction (paired geometric mean) and final
accuracy difference with interval; ``best`` is the setting with the largest reduction whose mean loss
is at most 1 point, and ``best_loss_excluded`` says whether its interval also excludes losing more
than 1 point (1) or not (0).

Usage:
    python bench/compression.py --workers 2            # 12 runs (about 1.5 h on 2 cores)
    python bench/compression.py --config configs/tiny.toml --quick   # a smoke test
"""

from __future__ import annotations

from typing import Any

from _benchpath import interval_pairs, run_bench_sweep, sweep_parser  # first: keeps bench/ off sys.path

QUICK = {"scheduler.rounds": 2, "train.local_steps": 2, "data.test_size": 60, "data.max_examples": 600}
MAX_LOSS = 0.01
"""A setting counts for ``best`` if its mean final accuracy is at most this much below uncompressed."""


def every_device_on_5g(sweep: Any) -> Any:
    """The sweep with one ``fleet.groups[i].network = "5g"`` per group of its base config."""
    from dataclasses import replace

    from fedspine.config import load_config

    groups = load_config(sweep.base).fleet.groups
    common = {k: v for k, v in sweep.common.items() if not k.startswith("fleet.groups[")}
    common |= {f"fleet.groups[{i}].network": "5g" for i in range(len(groups))}
    return replace(sweep, common=common)


def main() -> None:
    args = sweep_parser(__doc__.splitlines()[0], "compression").parse_args()
    comparison = run_bench_sweep("compression", args, QUICK, adjust=every_device_on_5g)
    line = [f"reference={comparison.reference}"]
    best = None
    for paired in comparison.paired:
        key = paired.arm.replace("+", "_")
        reduction = 1 / paired.uplink_ratio.mean if paired.uplink_ratio.n else float("nan")
        line += [f"{key}_reduction={reduction:.2f}", *interval_pairs(f"{key}_delta", paired.final)]
        if paired.final.mean >= -MAX_LOSS and (best is None or reduction > best[0]):
            best = (reduction, paired)
    if best is not None:
        reduction, paired = best
        excluded = int(paired.final.n > 1 and paired.final.low >= -MAX_LOSS)
        line += [f"best={paired.arm}", f"best_reduction={reduction:.2f}", f"best_loss_excluded={excluded}"]
    print("RESULT " + " ".join(line))


if __name__ == "__main__":
    main()
