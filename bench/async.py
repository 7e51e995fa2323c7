"""Synchronous against asynchronous scheduling on a fleet with a wide spread of device speeds.

Runs the sweep ``bench/sweeps/async.toml`` (FedIT on the default fleet and task; every arm applies 24
client updates; 3 seeds, 600 test verses) and prints its comparison:

* ``sync``: synchronous rounds of 4 devices, waiting for the slowest;
* ``sync-deadline``: 1.5x over-selection (6 devices, the first 4 arrivals count) and a 60 s deadline;
* ``fedasync``: 4 devices training at once, each update applied on arrival (alpha 0.6, polynomial
  staleness weight);
* ``fedbuff``: 8 devices training at once, a server step every 4 arrivals.

Per scheduler: final accuracy, virtual time to 0.40 (with how many seeds reached it), each with its
95% interval, and every scheduler paired against ``sync`` on the same seeds. The last line is
``RESULT …``: per scheduler its speed-up to the target over sync (geometric mean over the seeds where
both reached it) with interval and its final-accuracy difference; ``best`` is the fastest scheduler
whose mean final accuracy is within 3 points of sync's.

Usage:
    python bench/async.py --workers 2             # 12 runs (about 2 h on 2 cores)
    python bench/async.py --config configs/tiny.toml --quick   # a smoke test
"""

from __future__ import annotations

from _benchpath import interval_pairs, run_bench_sweep, sweep_parser  # first: keeps bench/ off sys.path

QUICK = {"train.local_steps": 2, "data.test_size": 60, "data.max_examples": 600}
QUICK_ARMS = {  # 8 updates each instead of 24
    "sync": {"scheduler.rounds": 2},
    "sync-deadline": {"scheduler.rounds": 2},
    "fedasync": {"scheduler.rounds": 8, "scheduler.max_updates": 8},
    "fedbuff": {"scheduler.rounds": 8, "scheduler.max_updates": 8},
}
TOLERANCE = 0.03
"""A scheduler counts for ``best`` if its mean final accuracy is within this of sync's."""


def main() -> None:
    args = sweep_parser(__doc__.splitlines()[0], "async").parse_args()
    comparison = run_bench_sweep("async", args, QUICK, QUICK_ARMS)
    line = [f"target={comparison.target.value}"]
    best = None
    for paired in comparison.paired:
        line += interval_pairs(f"{paired.arm}_speedup", paired.speedup, 3)
        line += interval_pairs(f"{paired.arm}_delta", paired.final)
        fast = paired.speedup.n and paired.final.mean >= -TOLERANCE
        if fast and (best is None or paired.speedup.mean > best.speedup.mean):
            best = paired
    if best is not None:
        line += [f"best={best.arm}", f"best_speedup_vs_sync={best.speedup.mean:.3f}"]
    else:
        line.append("best_speedup_vs_sync=nan")
    line += [f"{a.arm}_final={a.final.mean:.4f}" for a in comparison.arms]
    print("RESULT " + " ".join(line))


if __name__ == "__main__":
    main()
