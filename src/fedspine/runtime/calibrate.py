"""``fedspine calibrate``: measure this machine for a config's model and task, as a device profile.

Measured, on the run's device (``run.device``) and with the run's threads:

* **training throughput**: local LoRA tasks of the config's task at its batch shape (``train.batch_size``
  examples of the data, ``train.local_steps`` steps per task), after one warm-up task. The cost model's
  FLOPs of each task divided by its measured seconds is the throughput the profile states as
  ``peak_flops`` (with ``mfu = 1``), so the cost model charges the calibrated workload what it took
  here; the median over tasks is used, and the spread of the per-step times (standard deviation of
  their logarithms) becomes the profile's ``slowdown_sigma``;
* **memory bandwidth**: a copy of a 256 MiB buffer (read + write), median of five;
* **peak memory**: the process's peak resident memory after training (CPU), or the peak allocated
  on the GPU;
* **memory capacity**: the host's physical memory, or the GPU's;
* **decode speed**: greedy generation of ``export.generate_tokens`` tokens by the base model, as the
  run's export measures its models.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypedDict

import torch

from fedspine.config import Config
from fedspine.model.lora import plain_copy
from fedspine.runtime.experiment import build_experiment
from fedspine.runtime.export import describe_model
from fedspine.types import ClientTask, DeviceClass

BANDWIDTH_BYTES = 256 * 2**20
"""Size of the buffer the bandwidth measurement copies."""


class Measured(TypedDict):
    """What calibration measured (a profile's ``[measured]`` table)."""

    model: str
    device: str
    threads: int
    batch_size: int
    max_length: int
    local_steps: int
    tasks: int
    train_seconds_per_step: float
    train_seconds_per_step_all: list[float]
    task_flops: float
    peak_memory_bytes: int
    decode_tokens_per_second: float
    decode_tokens: int


@dataclass(frozen=True)
class Calibration:
    """What calibration measured, and the device class it amounts to."""

    device_class: DeviceClass
    measured: Measured


def calibrate(
    cfg: Config, name: str, tasks: int = 3, status: Callable[[str], None] | None = None
) -> Calibration:
    """Measure this machine for ``cfg``'s model and task (``tasks`` timed local tasks after a warm-up)."""
    say = status or (lambda _msg: None)
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    cfg = replace(cfg, strategy=replace(cfg.strategy, name="fedit"))  # a dense LoRA task: the baseline
    say("building the model and data")
    exp = build_experiment(cfg)
    try:
        device = exp.devices[0]
        lora = exp.device_lora[device.device_id]
        generator = torch.Generator().manual_seed(cfg.run.seed)
        exp.strategy.init_global(exp.trainer.module_shapes, cfg.lora.rank, generator)
        seconds, flops, steps = [], [], cfg.train.local_steps
        for key in range(tasks + 1):
            say(f"training task {key + 1} of {tasks + 1} (the first is a warm-up)")
            dispatch = exp.strategy.configure(key, device.device_id, lora, generator)
            prepared = exp.trainer.executor.prepare(key, device, lora, steps)
            task = ClientTask(
                key, device.device_id, steps, lora, dispatch.lora_state, dispatch.downlink_bytes
            )
            update = exp.trainer.executor.run(task, prepared)
            if key > 0:
                seconds.append(update.host_train_seconds)
                flops.append(prepared.workload.flops)
        throughput = statistics.median(f / s for f, s in zip(flops, seconds, strict=True))
        per_step = [s / steps for s in seconds]
        sigma = statistics.pstdev(math.log(s) for s in per_step) if len(per_step) > 1 else 0.0
        run_device = next(exp.trainer.executor.model.parameters()).device
        say("measuring memory bandwidth, memory and decode speed")
        bandwidth = memory_bandwidth(run_device)
        peak, capacity = peak_memory_bytes(run_device), memory_capacity_bytes(run_device)
        base = plain_copy(exp.trainer.executor.model)
        train = exp.trainer.executor.train_data
        decode = describe_model(base, train.input_ids[0], train.pad_id, cfg.export.generate_tokens)
        dtype_bytes = next(exp.trainer.executor.model.parameters()).element_size()
    finally:
        exp.trainer.executor.close()
    host = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {cfg.run.threads} threads)"
    where = f"{run_device}" if run_device.type != "cpu" else host
    device_class = DeviceClass(
        name=name,
        description=f"measured: {where}",
        peak_flops=throughput,
        mfu=1.0,
        memory_bandwidth=bandwidth,
        memory_bytes=capacity,
        train_dtype_bytes=dtype_bytes,
        slowdown_sigma=sigma,
        source=f"fedspine calibrate, {exp.settings.model_name}, {time.strftime('%Y-%m-%d')}",
    )
    decode_speed = decode["tokens_per_second"]
    assert decode_speed is not None, "export.generate_tokens >= 1: describe_model measured the speed"
    measured: Measured = {
        "model": exp.settings.model_name,
        "device": str(run_device),
        "threads": cfg.run.threads,
        "batch_size": cfg.train.batch_size,
        "max_length": cfg.data.max_length,
        "local_steps": steps,
        "tasks": tasks,
        "train_seconds_per_step": statistics.median(per_step),
        "train_seconds_per_step_all": per_step,
        "task_flops": statistics.median(flops),
        "peak_memory_bytes": peak,
        "decode_tokens_per_second": float(decode_speed),
        "decode_tokens": cfg.export.generate_tokens,
    }
    return Calibration(device_class, measured)


def memory_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """Bytes/s of a buffer copy (each byte read once and written once), median of ``repeats``."""
    n = BANDWIDTH_BYTES // 4
    source = torch.ones(n, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up: pages touched, caches as they will be
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        target.copy_(source)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * BANDWIDTH_BYTES / statistics.median(times)


def peak_memory_bytes(device: torch.device) -> int:
    """The peak memory this process has used: allocated on the GPU, resident on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def memory_capacity_bytes(device: torch.device) -> int:
    """The memory a training process could use: the GPU's, or the host's physical memory."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["Calibration", "Measured", "calibrate", "memory_bandwidth"]
