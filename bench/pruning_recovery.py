"""Which pruned SmolLM2 recovers: FLAP bias compensation and dense first/last layers, centralised.

On the default experiment's model and task, one seed: FLAP scores (Var(X_j) ||W_:,j||^2 of every MLP
channel) and the mean input of every ``down_proj`` channel from ``--calibration`` batches of device
data on the dense model; then 30% (and 20%) of the MLP channels of every layer removed, or of every
layer but 0-2 and the last; each with and without FLAP's bias compensation (the removed channels'
mean contribution ``W_down[:, removed] @ mean[removed]`` added as ``down_proj``'s bias, which a stock
Llama config with ``mlp_bias = true`` describes). Prints held-out LM cross-entropy, label loss and
accuracy before recovery, and label loss and accuracy after ``--steps`` LoRA steps (rank 8, alpha 16,
every linear layer, lr of the default config) on fresh device data, beside the dense model trained
alike. One seed: a hint where to look, not a comparison. The last line is ``RESULT ...``.

Usage:
    python bench/pruning_recovery.py            # 32 steps, 300 test verses (~25 min on one core)
    python bench/pruning_recovery.py --steps 2 --test-size 20 --config configs/tiny.toml   # smoke
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _benchpath import host_line, lm_loss  # first: keeps bench/ off sys.path
from fedspine.client.evaluate import evaluate, prepare_eval_model
from fedspine.client.train import make_optimizer, train_local
from fedspine.config import load_config
from fedspine.data.batching import iterate_batches
from fedspine.model.lora import apply_lora, merged_model, plain_copy
from fedspine.model.pruning import PruningPlan, decoder_layers, plan_from_scores, prune_model
from fedspine.runtime.experiment import Experiment, build_experiment

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def device_batches(exp: Experiment, batch_size: int, seed: int, count: int) -> list[Any]:
    """``count`` training batches drawn across the fleet's partitions."""
    rng = np.random.default_rng(seed)
    indices = np.concatenate(exp.trainer.partitions)
    batches = iterate_batches(exp.trainer.executor.train_data, indices, batch_size, rng, shuffle=True)
    return list(batches)[:count]


@torch.inference_mode()
def down_input_stats(base: Any, batches: list[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the mean and FLAP score of every ``down_proj`` input channel over real tokens."""
    sums: dict[int, list[Any]] = {}
    mask: list[torch.Tensor] = []

    def hook_for(index: int) -> Any:
        def hook(_module: Any, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()[mask[0]]
            s = sums.setdefault(index, [0, 0.0, 0.0])
            s[0] += x.shape[0]
            s[1] = s[1] + x.sum(0)
            s[2] = s[2] + x.pow(2).sum(0)

        return hook

    layers = decoder_layers(base)
    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            mask[:] = [batch.attention_mask.reshape(-1).bool()]
            base(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    means, scores = [], []
    for i, layer in enumerate(layers):
        count, total, squares = sums[i]
        mean = total / count
        variance = (squares / count - mean.pow(2)).clamp_min(0.0)
        means.append(mean.float())
        scores.append(variance.float() * layer.mlp.down_proj.weight.detach().pow(2).sum(0))
    return means, scores


def compensated(base: Any, plan: PruningPlan, means: list[torch.Tensor]) -> Any:
    """``base`` pruned by ``plan``, each pruned layer's removed channels replaced by their mean output."""
    pruned = prune_model(base, plan)
    full = decoder_layers(base)
    for index, layer in enumerate(decoder_layers(pruned)):
        if index not in plan:
            continue
        weight = full[index].mlp.down_proj.weight.detach()
        removed = torch.ones(weight.shape[1], dtype=torch.bool)
        removed[list(plan[index].channels)] = False
        bias = weight[:, removed] @ means[index][removed]
        layer.mlp.down_proj.bias = torch.nn.Parameter(bias, requires_grad=False)
    return pruned


def label_eval(model: Any, exp: Experiment) -> tuple[float, float]:
    """(accuracy, label loss) on the test verses."""
    result = evaluate(
        prepare_eval_model(copy.deepcopy(model), exp.trainer.objective),
        exp.trainer.objective,
        exp.test_set.batches,
    )
    return float(result.metric), float(result.loss)


def recover(model: Any, exp: Experiment, lr: float, batches: list[Any], seed: int) -> Any:
    """``model`` after LoRA training (rank 8, alpha 16, every linear layer) on ``batches``, merged."""
    peft = apply_lora(copy.deepcopy(model), 8, 16.0, 0.0, ALL, seed=seed)
    params = [p for p in peft.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    train_local(peft, exp.trainer.objective, batches, make_optimizer(params, "adamw", lr, 0.0), 1.0)
    return merged_model(peft)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=16, help="batches for scores and means")
    parser.add_argument("--test-size", type=int, default=300)
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data.test_size={args.test_size}"])
    exp = build_experiment(cfg)
    base = plain_copy(exp.trainer.executor.model)
    layers, kv = exp.trainer.shape.layers, exp.trainer.shape.kv_heads
    print(
        host_line(f"seed {args.seed}, {args.steps} steps, {len(exp.trainer.test_data)} test verses"),
        flush=True,
    )
    means, scores = down_input_stats(
        base, device_batches(exp, cfg.train.batch_size, args.seed, args.calibration)
    )
    heads = [torch.ones(kv) for _ in range(layers)]  # every KV group kept: channels only
    dense_ends = (0, 1, 2, layers - 1) if layers > 4 else ()
    plans = {
        "ch0.2": plan_from_scores(heads, scores, 0.2),
        "ch0.3": plan_from_scores(heads, scores, 0.3),
        "ch0.3_dense_ends": plan_from_scores(heads, scores, 0.3, dense_layers=dense_ends),
    }
    models: dict[str, Any] = {"dense": base}
    for label, plan in plans.items():
        models[label] = prune_model(base, plan)
        models[f"{label}+bias"] = compensated(base, plan, means)
    results: dict[str, float] = {}
    print(f"{'model':24} {'params':>8} {'LM CE':>7} {'label loss':>10} {'accuracy':>8}")
    for label, model in models.items():
        accuracy, loss = label_eval(model, exp)
        ce = lm_loss(model, exp)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{label:24} {params:7.1f}M {ce:7.3f} {loss:10.3f} {accuracy:8.3f}", flush=True)
        results[f"{label}_ce"] = ce
    training = device_batches(exp, cfg.train.batch_size, args.seed + 1000, args.steps)
    start = time.perf_counter()
    print(f"\nafter {args.steps} LoRA steps")
    for label in ("dense", "ch0.3", "ch0.3+bias", "ch0.3_dense_ends", "ch0.3_dense_ends+bias"):
        accuracy, loss = label_eval(recover(models[label], exp, cfg.train.lr, training, args.seed), exp)
        print(
            f"{label:24} label loss {loss:.3f} accuracy {accuracy:.3f} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        results[f"{label}_recovered"] = accuracy
    print("RESULT " + " ".join(f"{k}={v:.4f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
