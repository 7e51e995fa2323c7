"""How much one-shot structured pruning hurts SmolLM2 before any recovery, by importance score.

For each score (weight magnitude; FLAP's WIFV from forward passes over device data; LoRA-guided Taylor
from one local task of 8 LoRA steps) and ratio, prunes KV groups and MLP channels of every layer of
the default experiment's model and reports the held-out loss and accuracy of the Bible genre task,
beside the dense model's. This is why FedSpine trains densely until the first importance scores
arrive (docs/guide.md). Last line ``RESULT …``.

Usage:
    python bench/pruning_damage.py            # ratios 0.2 and 0.3, 100 test verses (about 1.5 min on 2 cores)
"""

from __future__ import annotations

import argparse
import platform
from typing import Any

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from _benchpath import local_task_scores  # first: keeps bench/ off sys.path
from fedspine.client.evaluate import evaluate
from fedspine.config import load_config
from fedspine.data.batching import iterate_batches
from fedspine.model.lora import plain_copy
from fedspine.model.pruning import magnitude_scores, plan_from_scores, prune_model
from fedspine.runtime.experiment import build_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.3])
    parser.add_argument("--test-size", type=int, default=100)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    print(f"host: {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    cfg = load_config(None, [f"data.test_size={args.test_size}"])
    exp = build_experiment(cfg)
    base = plain_copy(exp.trainer.executor.model)

    def score(model: Any) -> tuple[float, float]:
        data = exp.trainer.test_data
        batches = iterate_batches(data, np.arange(len(data)), 50, None, shuffle=False)
        result = evaluate(model, exp.trainer.objective, batches)
        return result.metric, result.loss

    _, measured = local_task_scores(exp, cfg, base, cfg.run.seed)  # one local task's worth of device data
    scores = {"magnitude": magnitude_scores(base), **measured}

    dense_acc, dense_loss = score(base)
    print(f"\n{'score':10} {'ratio':>5} {'loss':>7} {'accuracy':>8}")
    print(f"{'dense':10} {0.0:5.2f} {dense_loss:7.3f} {dense_acc:8.3f}")
    result = [f"dense_loss={dense_loss:.3f}"]
    for ratio in args.ratios:
        for name, (heads, channels) in scores.items():
            acc, loss = score(prune_model(base, plan_from_scores(heads, channels, ratio)))
            print(f"{name:10} {ratio:5.2f} {loss:7.3f} {acc:8.3f}", flush=True)
            result.append(f"{name}_{ratio:g}_loss={loss:.3f}")
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
