"""Evaluation cost: seconds per 100 held-out examples, before and after the fast path, beside a client task.

Both sides evaluate the same model (SmolLM2 with a global LoRA adapter trained for one client task, so
the adapter is not zero) on the same held-out set, in one process, alternately ``--repeats`` times:

* ``before``: what every evaluation did until the fast path — the peft model with its adapter, the test
  set in its stored order (batches padded to their longest member), ``torch.no_grad``, the full output
  head at the last position;
* ``after``: ``executor.evaluate`` — a plain copy with the adapter merged, batches sorted by length and
  built once, ``torch.inference_mode``, the head cut to the label words, in ``eval.dtype`` (the model's
  own by default); the copy is made inside the timed region;
* ``after-bf16``: the same in bfloat16.

The reference is one client task of the default experiment (8 local steps of 8 verses), timed in the
same run. Prints medians, the ratio before/after, the cost of 600 examples in client tasks, and how many
predictions bfloat16 changes. The last line is ``RESULT ...``.

Usage:
    python bench/eval_speed.py                  # 600 test verses, 3 repeats (about 6 min on 2 cores)
    python bench/eval_speed.py --config configs/tiny.toml --test-size 100 --repeats 1   # seconds
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _benchpath import host_line  # first: keeps bench/ off sys.path
from fedspine.config import load_config
from fedspine.data.batching import iterate_batches
from fedspine.runtime.experiment import build_experiment
from fedspine.types import ClientTask


def train_one_task(exp: Any) -> float:
    """Run one client task of device 0 on the global adapter; its host seconds. Loads the result."""
    executor, strategy = exp.trainer.executor, exp.strategy
    device = exp.devices[0]
    lora = exp.device_lora[device.device_id]
    steps = exp.settings.local_steps
    strategy.init_global(exp.trainer.module_shapes, lora.rank, torch.Generator().manual_seed(0))
    prepared = executor.prepare(1, device, lora, steps)
    dispatch = strategy.configure(1, device.device_id, lora, torch.Generator().manual_seed(0))
    task = ClientTask(1, device.device_id, steps, lora, dispatch.lora_state, dispatch.downlink_bytes)
    started = time.perf_counter()
    update = executor.run(task, prepared)
    seconds = time.perf_counter() - started
    scaled = {m: {"A": f["A"], "B": f["B"] * update.lora_scaling} for m, f in update.lora_state.items()}
    executor.load_global(scaled)  # the global adapter is kept at scaling 1
    return seconds


def before(exp: Any, batch_size: int) -> tuple[float, list[int]]:
    """The evaluation path as it was: peft model, stored order, no_grad, full head."""
    data, model, objective = exp.trainer.test_data, exp.trainer.executor.model, exp.trainer.objective
    started = time.perf_counter()
    predictions: list[int] = []
    model.eval()
    with torch.no_grad():
        for batch in iterate_batches(data, np.arange(len(data)), batch_size, None, False):
            predictions += objective.label_logits(model, batch).argmax(-1).tolist()
    return time.perf_counter() - started, predictions


def after(exp: Any, dtype: str) -> tuple[float, float]:
    """``executor.evaluate`` with ``dtype``: seconds (model copy included) and accuracy."""
    exp.trainer.executor.eval_dtype = dtype
    started = time.perf_counter()
    evaluation = exp.trainer.executor.evaluate(exp.test_set)
    return time.perf_counter() - started, evaluation.metric


def predictions_of(exp: Any, dtype: str) -> list[int]:
    """Predicted label of every test example in ``exp.test_set`` order, at ``dtype``."""
    exp.trainer.executor.eval_dtype = dtype
    model = exp.trainer.executor.eval_model()
    out: list[int] = []
    with torch.inference_mode():
        for batch in exp.test_set.batches:
            out += exp.trainer.objective.label_logits(model, batch).argmax(-1).tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="base config (default: the built-in one)")
    parser.add_argument("--test-size", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data.test_size={args.test_size}"])
    exp = build_experiment(cfg)
    n = len(exp.trainer.test_data)
    print(host_line(f"{n} test examples, padding {exp.test_set.padding_fraction():.1%} after sorting"))
    task_seconds = train_one_task(exp)
    times: dict[str, list[float]] = {"before": [], "after": [], "after-bf16": []}
    accuracy: dict[str, float] = {}
    for _ in range(args.repeats):
        seconds, preds = before(exp, cfg.eval.batch_size)
        times["before"].append(seconds)
        accuracy["before"] = float(np.mean(np.array(preds) == np.array(exp.trainer.test_data.label_index)))
        for name, dtype in (("after", "model"), ("after-bf16", "bfloat16")):
            seconds, accuracy[name] = after(exp, dtype)
            times[name].append(seconds)
    per100 = {name: statistics.median(t) / n * 100 for name, t in times.items()}
    flips = sum(
        a != b for a, b in zip(predictions_of(exp, "model"), predictions_of(exp, "bfloat16"), strict=True)
    )
    print(f"one client task: {task_seconds:.1f} s host")
    for name, value in per100.items():
        cost = value * 6 / task_seconds
        row = f"{name:11} {value:6.2f} s / 100 examples  accuracy {accuracy[name]:.4f}"
        print(f"{row}  600 examples = {cost:.2f} tasks")
    print(f"bfloat16 changes {flips} of {n} predictions")
    print(
        f"RESULT before_s_per_100={per100['before']:.3f} after_s_per_100={per100['after']:.3f} "
        f"bf16_s_per_100={per100['after-bf16']:.3f} speedup={per100['before'] / per100['after']:.2f} "
        f"speedup_bf16={per100['before'] / per100['after-bf16']:.2f} task_seconds={task_seconds:.2f} "
        f"eval600_in_tasks={per100['after'] * 6 / task_seconds:.2f} "
        f"eval600_in_tasks_bf16={per100['after-bf16'] * 6 / task_seconds:.2f} bf16_flips={flips}"
    )


if __name__ == "__main__":
    main()
