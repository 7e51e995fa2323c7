"""Import first in every bench script: drops this folder from ``sys.path``; and the shared helpers.

``bench/fedspine.py`` is named after the package, so while this folder is on the path (it is, for any
script run from it) ``import fedspine`` would find that script instead of the package. The helpers
import fedspine lazily, after the path is fixed.
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def run_summary(config: Any) -> dict[str, Any]:
    """Run ``config`` in a temporary directory; its ``summary.json`` contents."""
    from fedspine.api import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        return run_experiment(config, Path(tmp) / "run").summary.to_json()


def first_time(summary: dict[str, Any], target: float) -> float | None:
    """Virtual time of a run's first evaluation at or above ``target`` (None: never)."""
    for entry in summary["evaluations"]:
        if entry["value"] >= target:
            return float(entry["virtual_time"])
    return None


def fmt_time(seconds: float | None) -> str:
    """A virtual time for a table, or "not reached"."""
    return "not reached" if seconds is None else f"{seconds:.1f} s"


def host_line(extra: str = "") -> str:
    """The machine a benchmark ran on, for its first printed line."""
    import torch

    line = f"host: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
    line += f"threads {torch.get_num_threads()}"
    return f"{line}; {extra}" if extra else line


SWEEPS = _HERE / "sweeps"
ROOT = _HERE.parent


def sweep_parser(description: str, name: str) -> Any:
    """The command line every sweep-backed benchmark takes."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--out", type=Path, default=None, help=f"sweep directory (default: runs/bench-{name})"
    )
    parser.add_argument("--workers", type=int, default=1, help="runs at once (local processes)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--resume", action="store_true", help="continue the sweep directory")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the sweep file's)")
    parser.add_argument("--only", nargs="*", default=None, help="arms to run (default: all)")
    parser.add_argument("--config", type=Path, default=None, help="base config instead of the sweep file's")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 seeds, short runs")
    return parser


def run_bench_sweep(
    name: str,
    args: Any,
    quick: dict[str, Any],
    quick_arms: dict[str, dict[str, Any]] | None = None,
    adjust: Any = None,
) -> Any:
    """Run ``bench/sweeps/NAME.toml`` (adjusted by ``args``) and return its comparison.

    ``--quick`` adds ``quick`` to every arm (and ``quick_arms[arm]`` to that arm), runs 2 seeds and
    writes into a temporary directory unless ``--out`` is given. ``adjust(sweep)`` may rewrite the
    sweep once its base is known (e.g. per-group overrides for another ``--config``).
    """
    from dataclasses import replace

    from fedspine.api import compare_runs
    from fedspine.sweep import Arm, load_sweep, run_sweep
    from fedspine.sweep.spec import check_sweep

    sweep = load_sweep(SWEEPS / f"{name}.toml")
    arms = [a for a in sweep.arms if args.only is None or a.name in args.only]
    common = dict(sweep.common)
    seeds = sweep.seeds
    if args.quick:
        common |= quick
        arms = [Arm(a.name, {**a.overrides, **(quick_arms or {}).get(a.name, {})}) for a in arms]
        seeds = [0, 1]
    if args.seeds:
        seeds = list(range(args.seeds))
    reference = sweep.reference if sweep.reference in [a.name for a in arms] else None
    base = args.config.resolve() if args.config else sweep.base
    sweep = replace(sweep, base=base, common=common, arms=arms, seeds=seeds, reference=reference)
    if adjust is not None:
        sweep = adjust(sweep)
    check_sweep(sweep)
    out = args.out
    if out is None:
        out = (
            Path(tempfile.mkdtemp(prefix=f"bench-{name}-")) if args.quick else ROOT / "runs" / f"bench-{name}"
        )
    print(host_line(f"sweep {name}: {len(arms)} arms x {len(seeds)} seeds -> {out}"), flush=True)

    def report(kind: str, spec: Any, outcome: Any) -> None:
        if outcome is not None:
            extra = f": {outcome.error}" if outcome.error else ""
            print(f"{spec.label}: {outcome.status} in {outcome.seconds:.0f} s{extra}", flush=True)

    result = run_sweep(sweep, out, args.workers, args.threads, args.resume, None, report)
    if result.failed:
        raise SystemExit(f"{len(result.failed)} runs failed; see {out}/runs.json")
    comparison, files = compare_runs([out])
    print(files["md"].read_text(encoding="utf-8"))
    return comparison


def interval_pairs(prefix: str, interval: Any, digits: int = 4) -> list[str]:
    """``prefix=mean prefix_ci=low:high`` for a RESULT line (``nan`` where undefined)."""
    return [
        f"{prefix}={interval.mean:.{digits}f}",
        f"{prefix}_ci={interval.low:.{digits}f}:{interval.high:.{digits}f}",
    ]


def lm_loss(model: Any, exp: Any) -> float:
    """Next-token cross-entropy of ``model`` over the test verses' tokens (padding excluded)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for batch in exp.test_set.batches:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            targets = batch.input_ids[:, 1:].clone()
            targets[batch.attention_mask[:, 1:] == 0] = -100
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((targets != -100).sum())
    return total / max(count, 1)


def local_task_scores(
    exp: Any, cfg: Any, base: Any, seed: int, count: int = 8
) -> tuple[list[Any], dict[str, Any]]:
    """One local task's worth of device data (``count`` batches across the fleet's partitions) and the
    FLAP and LoRA-guided Taylor scores measured while an adapter trains on it."""
    import copy

    import numpy as np

    from fedspine.client.train import make_optimizer, train_local
    from fedspine.data.batching import iterate_batches
    from fedspine.model.importance import FlapMeter, TaylorMeter
    from fedspine.model.lora import apply_lora

    rng = np.random.default_rng(seed)
    indices = np.concatenate(exp.trainer.partitions)
    batches = list(
        iterate_batches(exp.trainer.executor.train_data, indices, cfg.train.batch_size, rng, shuffle=True)
    )
    batches = batches[:count]
    peft = apply_lora(copy.deepcopy(base), cfg.lora.rank, cfg.lora.alpha, 0.0, cfg.lora.target_modules)
    taylor, flap = TaylorMeter(peft, exp.trainer.shape.head_dim), FlapMeter(peft, exp.trainer.shape.head_dim)
    params = [p for p in peft.parameters() if p.requires_grad]
    with flap:
        train_local(
            peft,
            exp.trainer.objective,
            batches,
            make_optimizer(params, "adamw", cfg.train.lr, 0.0),
            cfg.train.max_grad_norm,
            after_backward=taylor.after_backward,
            before_forward=flap.before_forward,
        )
    return batches, {"flap": flap.result(), "taylor": taylor.result()}
