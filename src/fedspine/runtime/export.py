"""A model for every device: the final pruned (or dense) fine-tuned models of a run, saved and measured.

For a pruning strategy each device deploys the base pruned at its policy's best ratio (at least the
target sparsity). Devices at the same ratio share one model, since masks come from the one global
importance, so the run saves one Hugging Face directory per distinct ratio under ``models/`` and
``models/manifest.json`` maps devices to them. For the other strategies every device gets the merged
dense model. Each model's parameters, bytes, held-out metric and CPU generation speed are recorded
beside the dense base's. Personal models (``[personalize]``), one per device, are saved by
:func:`~fedspine.runtime.personal.personalize` under ``models/personal/`` and named in the manifest.

Speed is greedy generation of ``generate_tokens`` new tokens after a prompt from the test set on this
host's CPU, median of three runs after a warm-up; it compares models with each other, it does not
predict a device's speed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import time
from copy import deepcopy
from pathlib import Path
from typing import Any, Protocol, TypedDict

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

from fedspine.algorithms.strategies import FedSpine
from fedspine.client.evaluate import evaluate, prepare_eval_model
from fedspine.errors import ConfigError, FedspineError, ModelError
from fedspine.files import InputFileError, check_tree, copy_tree, is_inside, parse_json, read_bytes
from fedspine.metrics.summary import check_device_models
from fedspine.model.lora import plain_copy
from fedspine.model.pruning import (
    PruningPlan,
    add_zero_mlp_biases,
    decoder_layers,
    plan_to_json,
    pruned_hf_config,
    shape_of,
    write_model_code,
)
from fedspine.runtime.experiment import Experiment
from fedspine.runtime.replica import ModelReplica

MANIFEST = "manifest.json"
PERSONAL_DIR = "personal"
"""Where under ``models/`` a run saves its devices' personal models (``[personalize]``), one per device."""


class ModelDescription(TypedDict):
    """What :func:`describe_model` measures of a model."""

    parameters: int
    bytes: int
    kv_heads_per_layer: list[int]
    channels_per_layer: list[int]
    tokens_per_second: float | None
    """Greedy generation speed (None: not measured)."""


class SavedModel(Protocol):
    """A device's personal model to save (a :class:`~fedspine.runtime.personal.PersonalModel`)."""

    @property
    def model(self) -> PreTrainedModel: ...

    @property
    def plan(self) -> PruningPlan | None: ...

    @property
    def means(self) -> list[torch.Tensor] | None: ...


def export_models(exp: Experiment, run_dir: Path, personal: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save (if configured) and measure every distinct device model; returns the manifest. ``personal``
    (the summary's part, when the run built personal models): the manifest names each device's saved
    personal model beside its global one."""
    cfg = exp.settings.export
    strategy = exp.strategy
    executor = exp.trainer.executor
    models_dir = run_dir / "models"
    device_ids = [d.device_id for d in exp.devices]
    base = plain_copy(executor.model)
    tokens = cfg.generate_tokens if cfg.speed else 0
    prompt = exp.trainer.test_data.input_ids[0]
    pad = exp.trainer.test_data.pad_id
    dense = describe_model(base, prompt, pad, tokens)
    entries: list[dict[str, Any]] = []
    devices: dict[str, dict[str, Any]] = {}
    if isinstance(strategy, FedSpine):
        arms = strategy.deployment(device_ids)
        for ratio in sorted({arm.ratio for arm in arms.values()}):
            plan = strategy.plan_for(ratio)
            means = strategy.channel_means()
            model = device_model(executor, plan, means)
            name = f"sparsity-{ratio:.2f}"
            entry = {"dir": name, "ratio": ratio, **describe_model(model, prompt, pad, tokens)}
            entry["metric"] = _metric(model, exp)
            entry["saved"] = bool(cfg.save)
            if cfg.save:
                entry["format"] = save_model(model, exp.trainer.tokenizer, models_dir / name, plan, means)
            (models_dir).mkdir(parents=True, exist_ok=True)
            (models_dir / f"{name}.plan.json").write_text(json.dumps(plan_to_json(plan)), encoding="utf-8")
            entries.append(entry)
            for device, arm in arms.items():
                if arm.ratio == ratio:
                    devices[str(device)] = {"ratio": ratio, "rank": arm.rank, "model": name}
    else:
        executor.load_global(strategy.global_lora())
        model = device_model(executor, None, None)
        entry = {"dir": "dense", "ratio": 0.0, **describe_model(model, prompt, pad, tokens)}
        entry["metric"] = _metric(model, exp)
        entry["saved"] = bool(cfg.save)
        if cfg.save:
            save_model(model, exp.trainer.tokenizer, models_dir / "dense")
        entries.append(entry)
        devices = {
            str(d): {"ratio": 0.0, "rank": exp.device_lora[d].rank, "model": "dense"} for d in device_ids
        }
    for device, name in ((personal or {}).get("models") or {}).items():
        devices[device]["personal"] = name
    manifest = {"dense_base": dense, "models": entries, "devices": devices}
    if cfg.save or strategy.prunes:
        models_dir.mkdir(parents=True, exist_ok=True)
        _write_json(models_dir / MANIFEST, manifest)
    return manifest


def save_personal_model(
    built: SavedModel, tokenizer: PreTrainedTokenizerBase | None, models_dir: Path, device_id: int
) -> str:
    """Save a device's personal model (a :class:`~fedspine.runtime.personal.PersonalModel`) as
    ``personal/device-N`` under ``models_dir``, with a config that describes its shape; returns that
    name (relative to ``models_dir``)."""
    if built.plan is not None and built.means is not None:
        add_zero_mlp_biases(built.model)  # a stock config with mlp_bias has biases on gate/up too
    name = f"{PERSONAL_DIR}/device-{device_id}"
    (models_dir / PERSONAL_DIR).mkdir(parents=True, exist_ok=True)
    save_model(built.model, tokenizer, models_dir / name, built.plan, built.means)
    return name


def device_model(
    executor: ModelReplica, plan: PruningPlan | None, means: list[torch.Tensor] | None
) -> PreTrainedModel:
    """A device's model as a plain copy (``executor.deployed_model``): the executor's base pruned by
    ``plan`` (the removed channels' mean outputs kept as biases with ``means``), or, without a plan, the
    base with the global adapter loaded by ``executor.load_global`` merged in (none: the base alone,
    never an adapter a device trained last)."""
    model: PreTrainedModel = executor.deployed_model(plan, means)
    if plan is not None and means is not None:
        add_zero_mlp_biases(model)  # a stock config with mlp_bias has biases on gate/up too
    return model


def record_hand_out(run_dir: Path, manifest: dict[str, Any], reports: dict[int, dict[str, Any]]) -> None:
    """Add what each device reported about the model it received (``on_device``) to ``manifest``, and
    rewrite ``models/manifest.json``."""
    for device, report in reports.items():
        entry = manifest["devices"].setdefault(str(device), {})
        entry["on_device"] = report
    models_dir = run_dir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    _write_json(models_dir / MANIFEST, manifest)


def describe_model(
    model: PreTrainedModel, prompt: list[int], pad_id: int, new_tokens: int
) -> ModelDescription:
    """Parameters, bytes, widths and (``new_tokens`` > 0) greedy generation speed after ``prompt``."""
    shape = shape_of(model)
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    widths = [
        (_out_features(layer, "self_attn.k_proj") // shape.head_dim, _out_features(layer, "mlp.gate_proj"))
        for layer in decoder_layers(model)
    ]
    return {
        "parameters": params,
        "bytes": nbytes,
        "kv_heads_per_layer": sorted({w[0] for w in widths}),
        "channels_per_layer": sorted({w[1] for w in widths}),
        "tokens_per_second": _tokens_per_second(model, prompt, pad_id, new_tokens)
        if new_tokens > 0
        else None,
    }


def _out_features(layer: nn.Module, name: str) -> int:
    """The output width of the linear ``name`` of a decoder ``layer``."""
    linear = layer.get_submodule(name)
    if not isinstance(linear, nn.Linear):
        raise ModelError(f"{name} of a decoder layer is a {type(linear).__name__}, not a linear layer")
    return linear.out_features


@torch.no_grad()
def _tokens_per_second(model: PreTrainedModel, prompt: list[int], pad_id: int, new_tokens: int) -> float:
    """Median greedy-generation speed (new tokens / s) over three runs after one warm-up run."""
    model.eval()
    device = next(model.parameters()).device
    if not isinstance(model, GenerationMixin):
        raise ModelError(f"{type(model).__name__} cannot generate text")
    row = torch.tensor([prompt], device=device)
    kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": pad_id,
    }
    model.generate(row, **kwargs)
    speeds = []
    for _ in range(3):
        start = time.perf_counter()
        model.generate(row, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        speeds.append(new_tokens / (time.perf_counter() - start))
    return statistics.median(speeds)


def _metric(model: PreTrainedModel, exp: Experiment) -> float:
    """The held-out metric of ``model``, measured like the run's evaluations (on a copy: it is saved)."""
    copy = prepare_eval_model(deepcopy(model), exp.trainer.objective, exp.settings.eval_dtype)
    return float(evaluate(copy, exp.trainer.objective, exp.test_set.batches).metric)


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out: Path,
    plan: PruningPlan | None = None,
    means: list[torch.Tensor] | None = None,
) -> str:
    """Save ``model`` (pruned by ``plan``, compensated with ``means``: its config is rewritten to
    describe that shape) as a Hugging Face directory; returns its config's ``model_type``.

    Write-then-rename, so a crash never leaves a directory that looks complete; an existing ``out`` is
    replaced.
    """
    if plan is not None:
        model.config = pruned_hf_config(model.config, plan, mlp_bias=means is not None)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    write_model_code(model.config, partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return str(model.config.model_type)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def copy_device_models(
    run_dir: Path, out: Path, device: int | None = None, global_model: bool = False
) -> list[Path]:
    """Copy a device's model (or every device's, with the manifest) out of a finished run. A device's
    model is its personal one when the run saved one (``[personalize]``), the global device model with
    ``global_model`` or without one.

    The run directory is untrusted: its manifest is read through the size-capped regular-file reader
    and checked, ``out`` is checked, and every directory to copy is checked whole (a link leaving the
    run, a FIFO, device or socket refused; links inside it are copied as files) before anything is
    written.

    Raises:
        ConfigError: the device is not in the run (``--device``), or ``out`` is not a new or empty
            directory outside the run.
        FedspineError: the run saved no models, its manifest is malformed, or a model directory holds
            what cannot be copied (:class:`~fedspine.files.InputFileError`, naming it).
    """
    models_dir = run_dir / "models"
    manifest_path = models_dir / MANIFEST
    if not os.path.lexists(manifest_path):
        raise FedspineError(f"{run_dir} has no models/{MANIFEST}: the run did not finish or saved no models")
    data = read_bytes(manifest_path, within=run_dir)
    manifest = _parse_manifest(manifest_path, data)
    _check_out(out, run_dir)
    names = _models_to_copy(manifest, manifest_path, device, global_model)
    for name in names:
        check_tree(models_dir / name, run_dir)
    created = not out.exists()
    try:
        if device is not None:
            copy_tree(models_dir / names[0], out, run_dir)
            return [out]
        for name in names:
            copy_tree(models_dir / name, out / name, run_dir)
        (out / MANIFEST).write_bytes(data)
    except OSError as error:  # the source changed under the copy, or the target is full or read-only
        _remove_copy(out, created)
        raise FedspineError(f"copying the models to {out} failed ({error}); nothing was kept") from error
    return [out / name for name in names]


def _parse_manifest(path: Path, data: bytes) -> dict[str, Any]:
    """``models/manifest.json``, checked (:func:`~fedspine.metrics.summary.check_device_models`)."""
    try:
        return check_device_models(parse_json(data.decode("utf-8")), key="")
    except UnicodeDecodeError as error:
        raise InputFileError(path, f"is not UTF-8 text (byte {error.start})") from error
    except ValueError as error:
        raise InputFileError(path, f"is not a run's manifest: {error}") from error


def _check_out(out: Path, run_dir: Path) -> None:
    """Refuse an ``out`` that is not a new or empty directory, or lies inside the run directory (the
    copy would land in what it copies, or in another run's records)."""
    if os.path.lexists(out) and not out.is_dir():
        kind = "a symbolic link that leads to no directory" if out.is_symlink() else "not a directory"
        raise ConfigError("--out", f"{out} exists and is {kind}")
    if is_inside(out, run_dir):
        raise ConfigError(
            "--out", f"{out} lies inside the run directory {run_dir}; export copies out of a run"
        )
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError("--out", f"{out} exists and is not empty")


def _models_to_copy(
    manifest: dict[str, Any], path: Path, device: int | None, global_model: bool
) -> list[str]:
    """The model directories (relative to ``models/``) to copy: ``device``'s one, or every saved one
    and every personal one. Only names a run writes are accepted, so a manifest cannot point the copy
    elsewhere."""
    saved = {m["dir"] for m in manifest["models"] if m.get("saved")}
    for name in saved:
        if not re.fullmatch(r"dense|sparsity-[0-9]+\.[0-9]+", name):
            raise InputFileError(path, f"names a model directory {name[:60]!r}: not a run's")
    devices = manifest["devices"]
    if device is None and not saved:
        raise FedspineError(f"{path.parent.parent} saved no models (export.save = false?)")
    if device is None:
        personal = (_personal_dir(path, entry, d) for d, entry in devices.items())
        return sorted(saved) + sorted(name for name in personal if name is not None)
    entry = devices.get(str(device))
    if entry is None:
        known = sorted(map(int, devices))
        raise ConfigError("--device", f"no device {device} in this run; devices: {known}")
    mine = _personal_dir(path, entry, device)
    if mine is not None and not global_model:
        return [mine]
    if entry["model"] not in saved:
        raise FedspineError(
            f"device {device}'s model ({entry['model']}) was not saved (export.save = false?)"
        )
    return [entry["model"]]


def _personal_dir(path: Path, entry: dict[str, Any], device: int | str) -> str | None:
    """The directory of ``device``'s saved personal model named by its manifest ``entry`` (None: none
    saved); the one name a run writes, so a manifest cannot point the copy elsewhere."""
    name = entry.get("personal")
    if name is None:
        return None
    if name != f"{PERSONAL_DIR}/device-{device}":
        raise InputFileError(path, f"names device {device}'s personal model {name[:60]!r}: not a run's")
    return str(name)


def _remove_copy(out: Path, created: bool) -> None:
    """Remove what a failed copy wrote: ``out`` itself when it created it, else ``out``'s contents
    (it was empty before)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


__all__ = [
    "MANIFEST",
    "PERSONAL_DIR",
    "copy_device_models",
    "describe_model",
    "device_model",
    "export_models",
    "record_hand_out",
    "save_model",
    "save_personal_model",
]
