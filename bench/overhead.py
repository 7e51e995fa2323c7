"""Framework overhead: host wall time of the federated loop over host time spent in local training.

Runs a short real experiment (SmolLM2-135M by default; ``--model tiny`` for a quick check) with one
small evaluation at the end, and prints ``wall_seconds / train_wall_seconds``. Everything that is not
local training counts as overhead: client sampling, batch drawing, cost model, LoRA state swaps,
payload serialisation, aggregation, records, and the final evaluation (also shown separately).

Usage:
    python bench/overhead.py [--model smollm2|tiny] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

import _benchpath  # noqa: F401  (must precede the fedspine imports)
from fedspine.api import run_experiment
from fedspine.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config_file = ROOT / "configs" / ("default.toml" if args.model == "smollm2" else "tiny.toml")
    overrides = [
        f"scheduler.rounds={args.rounds}",
        "scheduler.clients_per_round=3",
        "train.local_steps=4",
        f"eval.every={args.rounds}",
        "eval.at_start=false",
        "data.test_size=32",
    ]
    cfg = load_config(config_file, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_experiment(cfg, Path(tmp) / "run").summary.to_json()
    wall, train, evaluation = (
        summary["wall_seconds"],
        summary["train_wall_seconds"],
        summary["eval_wall_seconds"],
    )
    print(f"host: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"model {args.model}, {args.rounds} rounds x 3 clients x 4 steps")
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "wall_seconds",
                    "train_wall_seconds",
                    "eval_wall_seconds",
                    "aggregation_wall_seconds",
                    "setup_wall_seconds",
                )
            },
            indent=1,
        )
    )
    ratio = wall / train
    ratio_no_eval = (wall - evaluation) / train
    print(f"wall / train = {ratio:.4f}   (excluding the final evaluation: {ratio_no_eval:.4f})")
    print(
        f"RESULT overhead_ratio={ratio:.4f} overhead_ratio_excl_eval={ratio_no_eval:.4f} model={args.model}"
    )


if __name__ == "__main__":
    main()
