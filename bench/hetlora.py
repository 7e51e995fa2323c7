"""Heterogeneous LoRA ranks: FedIT, zero-padding, HetLoRA, FlexLoRA and FLoRA across seeds.

Runs the sweep ``bench/sweeps/hetlora.toml`` (the default fleet and Bible genre task with ranks 4/8/16
by device class, ``configs/hetero.toml``; FedIT at rank 4, the smallest rank every device affords;
3 seeds, 600 test verses) and prints its comparison: per strategy the final accuracy, the virtual time
to 0.40 and the bytes moved, each with its 95% interval over seeds, and every strategy paired against
zero-padding on the same seeds. The last line is ``RESULT …``: the best strategy by mean final
accuracy, every strategy's mean, and its paired difference to zero-padding with the interval.

Usage:
    python bench/hetlora.py --workers 2              # 15 runs (about 2 h on 2 cores)
    python bench/hetlora.py --workers 2 --resume     # continue an interrupted sweep
    python bench/hetlora.py --config configs/tiny.toml --quick   # a smoke test
"""

from __future__ import annotations

from _benchpath import interval_pairs, run_bench_sweep, sweep_parser  # first: keeps bench/ off sys.path

QUICK = {"scheduler.rounds": 2, "train.local_steps": 2, "data.test_size": 60, "data.max_examples": 600}


def main() -> None:
    args = sweep_parser(__doc__.splitlines()[0], "hetlora").parse_args()
    comparison = run_bench_sweep("hetlora", args, QUICK)
    line = [f"best={max(comparison.arms, key=lambda a: a.final.mean).arm}"]
    line += [f"{a.arm}_final={a.final.mean:.4f}" for a in comparison.arms]
    for paired in comparison.paired:
        line += interval_pairs(f"{paired.arm}_vs_{comparison.reference}", paired.final)
    print("RESULT " + " ".join(line))


if __name__ == "__main__":
    main()
