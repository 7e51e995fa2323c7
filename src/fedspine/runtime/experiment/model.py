"""Loading a run's model from its config, the checks that need its shape, and the one workload helper
that predictions and checks share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fedspine.config import Config
from fedspine.errors import ConfigError, FleetError, ModelError
from fedspine.fleet.cost import CostModel
from fedspine.model.footprint import ModelShape, model_shape
from fedspine.model.load import default_cache_dir, resolve_model, resolve_model_config
from fedspine.model.pruning import PruningPlan, pruned_workload
from fedspine.types import Device, TrainWorkload


def check_dense_layers(cfg: Config, shape: ModelShape) -> None:
    """``strategy.fedspine.dense_layers`` must name layers of the model (negative: from the end)."""
    setting = cfg.strategy.fedspine.dense_layers
    for i, layer in enumerate([] if setting == "auto" else setting):
        if not -shape.layers <= layer < shape.layers:
            raise ConfigError(
                f"strategy.fedspine.dense_layers[{i}]",
                f"layer {layer} does not exist; the model has layers 0..{shape.layers - 1} "
                f"(or -1..-{shape.layers})",
            )


@dataclass(frozen=True)
class TaskWorkloads:
    """What a task of full batches of full-length sequences costs on a submodel: what predictions and
    checks charge before any real batch is drawn (a task's own workload comes from its batches,
    :meth:`InProcessExecutor.prepare`). The one workload helper of the build."""

    shape: ModelShape
    seq_len: int
    batch_size: int
    lora_targets: int
    logits_positions: Literal["all", "last"]

    @classmethod
    def from_config(
        cls, cfg: Config, shape: ModelShape, logits_positions: Literal["all", "last"]
    ) -> TaskWorkloads:
        return cls(
            shape, cfg.data.max_length, cfg.train.batch_size, len(cfg.lora.target_modules), logits_positions
        )

    def of(self, plan: PruningPlan | None, rank: int, steps: int, dtype_bytes: int = 4) -> TrainWorkload:
        """``steps`` local steps at LoRA ``rank`` on the submodel ``plan`` describes (None: dense)."""
        return pruned_workload(
            plan,
            self.shape,
            seq_lens=[self.seq_len] * self.batch_size * steps,
            lora_rank=rank,
            num_lora_targets=self.lora_targets,
            logits_positions=self.logits_positions,
            dtype_bytes=dtype_bytes,
            batch_size=self.batch_size,
            steps=steps,
        )


def check_fleet_fits(devices: Sequence[Device], shape: ModelShape, cfg: Config) -> None:
    """Fail early when no device can hold even one local step of the model."""

    workloads = TaskWorkloads.from_config(cfg, shape, "all")

    def workload_for(d: Device) -> TrainWorkload:
        return workloads.of(None, cfg.lora.rank, 1, d.device_class.train_dtype_bytes)

    if not any(CostModel.for_device(d).fits(workload_for(d).peak_memory_bytes) for d in devices):
        biggest = max(d.device_class.memory_bytes for d in devices)
        need = min(workload_for(d).peak_memory_bytes for d in devices)
        raise FleetError(
            f"no device in the fleet can hold the model: it needs {need / 2**30:.2f} GiB, "
            f"the largest device has {biggest / 2**30:.2f} GiB"
        )


def model_args(cfg: Config) -> tuple[str, str | None, Path, dict[str, int]]:
    m = cfg.model
    cache = Path(m.cache_dir) if m.cache_dir else default_cache_dir()
    tiny = {
        "hidden": m.tiny.hidden,
        "layers": m.tiny.layers,
        "heads": m.tiny.heads,
        "kv_heads": m.tiny.kv_heads,
        "intermediate": m.tiny.intermediate,
        "seed": cfg.run.seed,
    }
    return m.source, m.path or None, cache, tiny


def resolve_device(cfg: Config) -> torch.device:
    """The torch device of ``run.device`` ("auto": the first CUDA device when there is one).

    Raises:
        ConfigError: CUDA requested but not available, or no such CUDA device.
    """
    name = cfg.run.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("run.device", f"CUDA requested but not available on this host ({name!r})")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                "run.device", f"no CUDA device {index}; this host has {torch.cuda.device_count()}"
            )
    return torch.device(name)


def model_dtype(cfg: Config, device: torch.device) -> str:
    """``model.dtype`` resolved: "auto" is float32 on a CPU and bfloat16 on a GPU."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "float32" if device.type == "cpu" else "bfloat16"


def load_model(cfg: Config, device: torch.device) -> tuple[Any, Any]:
    """The run's model and tokenizer, in ``model.dtype`` on ``device``."""
    model: Any
    model, tokenizer = resolve_model(*model_args(cfg), model_dtype(cfg, device))
    return model.to(device), tokenizer


def check_fits_before_loading(cfg: Config, devices: Sequence[Device]) -> None:
    """Reject a fleet that cannot hold the model from its config alone, before reading weights.

    Architectures whose shape needs the real parameter count are checked after loading instead.
    """
    try:
        shape = model_shape(resolve_model_config(*model_args(cfg)))
    except ModelError:
        return
    check_fleet_fits(devices, shape, cfg)
