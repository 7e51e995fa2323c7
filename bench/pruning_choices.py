"""The measurements behind FedSpine's defaults: what to prune, by which score, and how to scale rank arms.

On the default experiment's model and task (SmolLM2-135M, Bible genre), centralised, seed by seed:

1. **Scores.** Importance of every MLP channel from one local task's worth of device data (8 batches
   of 8 verses): FLAP (forward-only), LoRA-guided Taylor (from the adapter's gradients), and the
   full-gradient Taylor score (every weight's gradient: what neither device-side score can afford).
   Prints the mean over layers of the Spearman rank correlation of each device-side score with the
   full-gradient one.
2. **Damage.** Held-out LM cross-entropy (next-token loss on the test verses) and label accuracy right
   after one-shot pruning, no recovery: 30% of KV groups and channels everywhere (FLAP), 30% and 40% of
   channels only everywhere, and 40% of channels with layers 0-2 and the last dense.
3. **Recovery.** The same pruned models after ``--steps`` LoRA steps on fresh device data (8 verses
   each, lr 2e-3, every linear layer), beside the dense model trained alike.
4. **Rank arms.** LoRA ranks 4, 8 and 16 after ``--steps`` steps on the dense model, at a fixed scale
   alpha / r = 2 (alpha grows with r) and at a fixed alpha = 16 (the scale falls with r).

Every configuration runs for each of ``--seeds`` seeds (the seed draws the batches and the adapter's
initialisation); prints means with 95% t-intervals over seeds. The last line is ``RESULT …``.

Usage:
    python bench/pruning_choices.py        # 3 seeds, 64 steps, 300 test verses (~1.5 h on 2 cores)
    python bench/pruning_choices.py --seeds 1 --steps 4 --test-size 40 --config configs/tiny.toml  # smoke
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _benchpath import host_line, lm_loss, local_task_scores  # first: keeps bench/ off sys.path
from fedspine.client.evaluate import evaluate, prepare_eval_model
from fedspine.client.train import make_optimizer, train_local
from fedspine.config import load_config
from fedspine.data.batching import iterate_batches
from fedspine.metrics.stats import t_interval
from fedspine.model.lora import apply_lora, merged_model, plain_copy
from fedspine.model.pruning import (
    LayerKeep,
    PruningPlan,
    decoder_layers,
    plan_from_scores,
    prune_model,
)
from fedspine.runtime.experiment import Experiment, build_experiment

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def device_batches(exp: Experiment, batch_size: int, seed: int, count: int, skip: int = 0) -> list[Any]:
    """``count`` training batches drawn across the fleet's partitions (one local task's worth)."""
    rng = np.random.default_rng(seed)
    indices = np.concatenate(exp.trainer.partitions)
    batches = iterate_batches(exp.trainer.executor.train_data, indices, batch_size, rng, shuffle=True)
    return list(batches)[skip : skip + count]


def full_gradient_channels(base: Any, exp: Experiment, batches: list[Any]) -> list[torch.Tensor]:
    """|sum over a channel's weights of W * dL/dW| (gate and up rows, down column), every weight's grad."""
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    mlps = [layer.mlp for layer in decoder_layers(model)]
    for mlp in mlps:
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(mlp, name).weight.requires_grad_(True)
    sums = [torch.zeros(mlp.gate_proj.weight.shape[0]) for mlp in mlps]
    for batch in batches:
        model.zero_grad(set_to_none=True)
        exp.trainer.objective.loss(model, batch).backward()
        with torch.no_grad():
            for index, mlp in enumerate(mlps):
                value = (mlp.gate_proj.weight * mlp.gate_proj.weight.grad).sum(1)
                value += (mlp.up_proj.weight * mlp.up_proj.weight.grad).sum(1)
                value += (mlp.down_proj.weight * mlp.down_proj.weight.grad).sum(0)
                sums[index] += value.abs()
    return sums


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.argsort(torch.argsort(a.float())).float()
    rb = torch.argsort(torch.argsort(b.float())).float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def accuracy(model: Any, exp: Experiment) -> float:
    copy_ = prepare_eval_model(copy.deepcopy(model), exp.trainer.objective)
    return float(evaluate(copy_, exp.trainer.objective, exp.test_set.batches).metric)


def recover(
    model: Any, exp: Experiment, lr: float, batches: list[Any], rank: int, alpha: float, seed: int
) -> Any:
    """``model`` after LoRA training on ``batches`` (every linear layer), the adapter merged."""
    peft = apply_lora(copy.deepcopy(model), rank, alpha, 0.0, ALL, seed=seed)
    params = [p for p in peft.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    train_local(peft, exp.trainer.objective, batches, make_optimizer(params, "adamw", lr, 0.0), 1.0)
    return merged_model(peft)


def channels_only(plan: PruningPlan, kv_heads: int) -> PruningPlan:
    return {layer: LayerKeep(tuple(range(kv_heads)), keep.channels) for layer, keep in plan.items()}


def interval(values: list[float]) -> str:
    i = t_interval(values)
    return f"{i.mean:.3f}" if i.n < 2 else f"{i.mean:.3f} [{i.low:.3f}, {i.high:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--test-size", type=int, default=300)
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data.test_size={args.test_size}"])
    exp = build_experiment(cfg)
    base = plain_copy(exp.trainer.executor.model)
    kv, layers = exp.trainer.shape.kv_heads, exp.trainer.shape.layers
    print(
        host_line(f"{args.seeds} seeds, {args.steps} steps, {len(exp.trainer.test_data)} test verses"),
        flush=True,
    )
    results: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)
        print(f"  {key}: {value:.4f}", flush=True)

    add("dense_lm_loss", lm_loss(base, exp))
    add("dense_accuracy", accuracy(base, exp))
    for seed in range(args.seeds):
        print(f"seed {seed}", flush=True)
        calibration, scores = local_task_scores(exp, cfg, base, seed)
        training = device_batches(exp, cfg.train.batch_size, seed + 1000, args.steps)
        full = full_gradient_channels(base, exp, calibration)
        for name, (_, channels) in scores.items():
            add(
                f"{name}_spearman",
                float(np.mean([spearman(c, f) for c, f in zip(channels, full, strict=True)])),
            )
        heads, channels = scores["flap"]
        plans: dict[str, PruningPlan] = {
            "heads+channels_0.3": plan_from_scores(heads, channels, 0.3),
            "channels_0.3": channels_only(plan_from_scores(heads, channels, 0.3), kv),
            "channels_0.4": channels_only(plan_from_scores(heads, channels, 0.4), kv),
            "channels_0.4_dense_ends": channels_only(
                plan_from_scores(heads, channels, 0.4, dense_layers=(0, 1, 2, layers - 1)), kv
            ),
        }
        for label, plan in plans.items():
            pruned = prune_model(base, plan)
            add(f"{label}_lm_loss", lm_loss(pruned, exp))
            add(f"{label}_accuracy", accuracy(pruned, exp))
            add(
                f"{label}_recovered",
                accuracy(recover(pruned, exp, cfg.train.lr, training, 8, 16.0, seed), exp),
            )
        for rank in (4, 8, 16):
            add(
                f"rank{rank}_scale2",
                accuracy(recover(base, exp, cfg.train.lr, training, rank, 2.0 * rank, seed), exp),
            )
            add(
                f"rank{rank}_alpha16",
                accuracy(recover(base, exp, cfg.train.lr, training, rank, 16.0, seed), exp),
            )
    print(f"\n{'measure':32} mean [95% interval over seeds]")
    for key, values in results.items():
        print(f"{key:32} {interval(values)}")
    print("RESULT " + " ".join(f"{k}={float(np.mean(v)):.4f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
