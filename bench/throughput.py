"""Simulator training throughput: one round's tasks trained one by one, in one batch, and raw peft.

The round is the 80-device config's (``configs/fleet80.toml``: 16 clients x 8 local steps of 8 verses):
the same prepared tasks are trained by the simulator's executor one by one (``executor.batch_clients =
1``), all together (``client/batched.py``) and spread over Ray workers that each hold a model replica
(``executor.name = "ray"``, ``--ray-workers``; a local Ray instance), and, as the anchor for what this
hardware does with this model, raw peft trains one adapter on the same batches concatenated (the same
tokens, one task). Each side runs ``--repeats`` times after a warm-up; the median is reported.

    python bench/throughput.py                              # the fleet80 round, this host's device
    python bench/throughput.py --clients 4 --steps 2        # a quick look on a small CPU

Prints tokens/s per side, ``batched_vs_sequential``, ``ray_vs_sequential`` and ``sim_vs_raw`` (the
faster in-process side over raw peft, on the same hardware; Ray's workers use more of it), and a last
line ``RESULT key=value ...``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import _benchpath  # noqa: F401  (must come first: fixes sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model.source (smollm2 or tiny)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="run.device")
    parser.add_argument("--dtype", default="auto", help="model.dtype")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (of each Ray worker too)")
    parser.add_argument("--ray-workers", type=int, default=2, help="0 skips the Ray side")
    args = parser.parse_args()

    from fedspine.config import load_config
    from fedspine.runtime.experiment import build_experiment

    config_path = Path(__file__).resolve().parents[1] / "configs" / "fleet80.toml"
    overrides = [
        f"model.source={args.model}",
        f"run.device={args.device}",
        f"model.dtype={args.dtype}",
        f"run.threads={args.threads}",
        f"train.local_steps={args.steps}",
        "data.test_size=32",
    ]
    config = load_config(config_path, overrides)
    exp = build_experiment(config)
    tasks, prepared = _round(exp, args.clients, args.steps)
    tokens = sum(p.workload.tokens for p in prepared)
    executor = exp.trainer.executor
    device = next(executor.model.parameters()).device

    def simulator(batch: int) -> float:
        executor.batch_clients = batch
        return _timed(lambda: executor.run_many(tasks, prepared), device)

    sides = {
        "sequential": lambda: simulator(1),
        "batched": lambda: simulator(args.clients),
        "raw_peft": lambda: _timed(lambda: _raw_peft(exp, prepared), device),
    }
    on_ray = None
    if args.ray_workers:
        ray_overrides = ["executor.name=ray", f"executor.workers={args.ray_workers}"]
        on_ray = build_experiment(load_config(config_path, [*overrides, *ray_overrides])).trainer.executor
        sides["ray"] = lambda: _timed(lambda: on_ray.run_many(tasks, prepared), device)
    seconds = {}
    try:
        for name, side in sides.items():
            side()  # warm-up
            seconds[name] = statistics.median(side() for _ in range(args.repeats))
    finally:
        if on_ray is not None:
            on_ray.close()
    speed = {name: tokens / s for name, s in seconds.items()}
    print(f"host: {platform.processor() or platform.machine()}, device {device}, torch {torch.__version__}")
    print(f"round: {args.clients} clients x {args.steps} steps, {tokens} tokens, model {args.model}")
    for name in sides:
        print(f"  {name:<11} {seconds[name]:8.2f} s  {speed[name]:10.0f} tokens/s")
    ratio = speed["batched"] / speed["sequential"]
    sim_vs_raw = max(speed["batched"], speed["sequential"]) / speed["raw_peft"]  # the same hardware
    ray = speed.get("ray")
    ray_ratio = f"{ray / speed['sequential']:.3f}" if ray else "none"
    print(f"batched_vs_sequential {ratio:.2f}  ray_vs_sequential {ray_ratio}  sim_vs_raw {sim_vs_raw:.2f}")
    print(
        f"RESULT device={device.type} clients={args.clients} steps={args.steps} tokens={tokens} "
        f"sequential_tps={speed['sequential']:.0f} batched_tps={speed['batched']:.0f} "
        f"ray_tps={ray or 0:.0f} raw_tps={speed['raw_peft']:.0f} batched_vs_sequential={ratio:.3f} "
        f"ray_vs_sequential={ray_ratio} sim_vs_raw={sim_vs_raw:.3f}"
    )


def _round(exp: Any, clients: int, steps: int) -> tuple[list[Any], list[Any]]:
    """The first ``clients`` devices' tasks of round 1, from the global adapter, as the engine makes them."""
    from fedspine.types import ClientTask

    rank = max(lora.rank for lora in exp.device_lora.values())
    exp.strategy.init_global(exp.trainer.module_shapes, rank, torch.Generator().manual_seed(0))
    tasks, prepared = [], []
    for device in exp.devices[:clients]:
        lora = exp.device_lora[device.device_id]
        assignment = exp.strategy.assign(1, device.device_id, lora)
        prepared.append(exp.trainer.executor.prepare(1, device, assignment.lora, steps))
        dispatch = exp.strategy.configure(1, device.device_id, assignment.lora, torch.Generator())
        tasks.append(ClientTask(1, device.device_id, steps, assignment.lora, dispatch.lora_state, 0))
    return tasks, prepared


def _raw_peft(exp: Any, prepared: list[Any]) -> None:
    """One peft adapter trained on every task's step-t batches concatenated: the same tokens, one task."""
    from fedspine.client.batched import concat_batches
    from fedspine.client.train import make_optimizer, train_local
    from fedspine.model.lora import ADAPTER, activate_adapter

    model = exp.trainer.executor.model
    activate_adapter(model, ADAPTER)
    steps = max(len(p.batches) for p in prepared)
    data = exp.trainer.executor.train_data
    batches = [
        concat_batches([p.batches[t] for p in prepared if t < len(p.batches)], data.padding_side, data.pad_id)
        for t in range(steps)
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    train_local(model, exp.trainer.objective, batches, make_optimizer(params, "adamw", 1e-3, 0.0), 1.0)


def _timed(work: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
