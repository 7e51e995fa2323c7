"""How personal is a device's mask: FLAP (activations only) against Taylor (its own task loss).

On the default experiment's model and task with label skew (Dirichlet ``--alpha``), every one of
``--devices`` devices scores the dense model's units on ``--batches`` batches of its own data, both
ways, and keeps 30% fewer MLP channels in every layer but the dense ones (``dense_layers = "auto"``).
For each importance the script prints the share of kept channels two devices' masks have in common
(mean over device pairs, and its range): 1.0 would mean every device keeps the same units, so a
personal mask could not differ from a global one. It also prints the overlap of each device's FLAP and
Taylor masks. No training, one seed: what the scores see, not what the masks are worth (that is the
personalization sweep, ``bench/sweeps/personal.toml``). The last line is ``RESULT ...``.

With ``--run DIR`` (a finished pruning run with held-out device data, ``eval.mode = "both"``, and
checkpoints) the scores come from that run's newest checkpoint instead, and each device's global model
(at its deployed plan) and its FLAP and Taylor masks at the same widths are also evaluated on its
held-out slice: mean loss and accuracy over devices (one run: a hint, not a comparison).

Usage:
    python bench/personal_mask.py                       # SmolLM2, 10 devices (~3 min on one core)
    python bench/personal_mask.py --config configs/tiny.toml --devices 4   # smoke
    python bench/personal_mask.py --run runs/fedspine-mask   # masks of a run's model, evaluated
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

from _benchpath import host_line  # first: keeps bench/ off sys.path
from fedspine.client.evaluate import Evaluation, evaluate
from fedspine.config import load_config
from fedspine.model.pruning import PruningPlan, dense_layer_indices, plan_from_scores, plan_like
from fedspine.runtime.checkpoint import load_latest
from fedspine.runtime.experiment import Experiment, build_experiment
from fedspine.runtime.personal import PERSONAL_TASK_KEY


def overlap(a: PruningPlan, b: PruningPlan) -> float:
    """Share of kept MLP channels two plans of equal widths have in common."""
    return sum(len(set(a[layer].channels) & set(b[layer].channels)) for layer in a) / sum(
        len(a[layer].channels) for layer in a
    )


def widths(plan: PruningPlan) -> list[int]:
    return [len(plan[layer].channels) for layer in sorted(plan)]


def restore(exp: Experiment, run: Path) -> None:
    """Put the newest checkpoint of ``run`` into ``exp`` (its strategy and merged base weights)."""
    snapshot = load_latest(run, exp)
    snapshot.objects.restore(exp)
    exp.trainer.executor.set_base_weights(snapshot.base_weights)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=None, help="base config (default: the built-in one)")
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--batches", type=int, default=4, help="batches of its data each device scores")
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the label split")
    parser.add_argument("--ratio", type=float, default=0.3, help="share of MLP channels removed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run", type=Path, default=None, help="score and evaluate this run's model")
    args = parser.parse_args()

    if args.run is not None:
        exp = build_experiment(load_config(args.run / "config.toml", [f"run.threads={args.threads}"]))
        restore(exp, args.run)
    else:
        overrides = [f"run.threads={args.threads}", f"data.dirichlet_alpha={args.alpha}", "eval.mode=both"]
        exp = build_experiment(load_config(args.config, overrides))
    print(host_line(f"{len(exp.devices)} devices, {args.batches} batches each"), flush=True)
    executor, strategy = exp.trainer.executor, exp.strategy
    # a run's global adapter, or none: the pretrained model (the strategy is not initialised then)
    executor.load_global(strategy.global_lora() if args.run is not None else {})
    base = executor.deployed_model()
    dense = dense_layer_indices("auto", exp.trainer.shape.layers)
    plans: dict[str, dict[int, PruningPlan]] = {"flap": {}, "taylor": {}}
    results: dict[str, list[Evaluation]] = {"global": [], "flap": [], "taylor": []}
    means = strategy.channel_means()
    started = time.perf_counter()
    for device in exp.devices[: args.devices]:
        batches = executor.local_batches(device, args.batches, PERSONAL_TASK_KEY)
        deployed = strategy.device_eval_plan(device.device_id) if args.run is not None else None
        held_out = exp.trainer.local_tests.get(device.device_id)
        if deployed is not None and held_out is not None:
            results["global"].append(
                evaluate(executor.eval_model(deployed, means), exp.trainer.objective, held_out.batches)
            )
        for kind in plans:
            heads, channels, own = executor.local_importance(
                base, batches, kind, compensated=means is not None
            )
            if deployed is None or held_out is None:
                plans[kind][device.device_id] = plan_from_scores(heads, channels, args.ratio, dense)
                continue
            plans[kind][device.device_id] = mine = plan_like(deployed, heads, channels)
            model = executor.ready(executor.deployed_model(mine, own if means is not None else None))
            results[kind].append(evaluate(model, exp.trainer.objective, held_out.batches))
    print(f"scored in {time.perf_counter() - started:.0f} s", flush=True)
    result = {}
    for kind, by_device in plans.items():
        pairs = [
            overlap(by_device[a], by_device[b])
            for a, b in itertools.combinations(sorted(by_device), 2)
            if widths(by_device[a]) == widths(by_device[b])
        ]
        if not pairs:
            continue
        mean = statistics.fmean(pairs)
        spread = f"pairs {min(pairs):.3f}..{max(pairs):.3f}"
        print(f"{kind:>6}: two devices' masks share {mean:.3f} of their kept channels ({spread})")
        result[f"{kind}_pair_overlap"] = f"{mean:.3f}"
    same = [overlap(plans["flap"][d], plans["taylor"][d]) for d in plans["flap"]]
    print(f"a device's FLAP and Taylor masks share {statistics.fmean(same):.3f} of their kept channels")
    result["flap_vs_taylor_overlap"] = f"{statistics.fmean(same):.3f}"
    for name, evaluations in results.items():
        if evaluations:
            loss, value = (statistics.fmean(getattr(e, k) for e in evaluations) for k in ("loss", "metric"))
            print(
                f"{name:>6} model on the devices' own held-out data: mean loss {loss:.3f}, mean {value:.3f}"
            )
            result[f"{name}_loss"] = f"{loss:.3f}"
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
