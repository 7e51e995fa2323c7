"""Atomic checkpoints of a run, and resuming from the newest complete one.

A checkpoint is a directory ``checkpoints/round-000K`` holding

* ``global_adapter.safetensors``: the global LoRA adapter (for inspection and export);
* ``base_delta.safetensors``, ``base_weights.safetensors``: everything merged into the base weights
  so far (FLoRA, FedSpine) and the merged modules' current weights, which a rebuilt model takes over
  exactly (adding the delta again would round differently);
* ``state.json``: the rest, as JSON (:mod:`fedspine.runtime.statefile`): the strategy (global
  state, pruning masks and importance, the policy with its bandit statistics), the scheduler, the
  uplink codec's error-feedback memories on both sides, the engine's counters, the virtual clock,
  per-device LoRA ranks, the round records so far and the byte positions of the record files, and the
  event loop (pending events, such as the next synchronous round's cohort; an asynchronous run's tasks
  in flight with their trained updates, buffered arrivals, server momentum). Live objects (the model
  and its executor, the data, the fleet's devices) are not saved but referred to by name and
  re-attached from the rebuilt experiment;
* ``state_tensors.safetensors``: every tensor of that state, which the JSON refers to by key;
* ``MANIFEST.json``, written last: the round, the SHA-256 of every file, and the text of the run's
  ``config.toml`` the checkpoint was taken under (``--resume`` refuses a config edited since).

It is written into a temporary directory, fsynced, and renamed into place, so a crash leaves either a
complete checkpoint or a ``.tmp-*`` directory that is ignored. A checkpoint whose manifest is missing
or whose files do not match it is torn: it is never loaded. Random state needs no saving: every draw
of a round comes from a generator seeded by (run seed, round, device).

A checkpoint holds no pickle, so loading one cannot run code: the JSON state can only rebuild
fedspine's own classes (from their attributes, without calling any of their code), builtin
containers and ``random.Random`` states, and tensors come from safetensors. A state that does not
load is skipped for the next older checkpoint (with a warning). A crafted checkpoint can still hold
wrong *values*: resume run directories you trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedspine.algorithms.clusters import ClusterAdapters
from fedspine.algorithms.compression import UplinkChannel
from fedspine.algorithms.schedulers import Scheduler
from fedspine.algorithms.staleness import StaleUpdateHandler
from fedspine.algorithms.strategies import Strategy
from fedspine.algorithms.wire import flatten_state
from fedspine.client.personal import PrivateAdapters
from fedspine.errors import CheckpointError
from fedspine.files import MIB, InputFileError, read_text
from fedspine.metrics.records import RoundRecord
from fedspine.runtime import statefile
from fedspine.runtime.experiment import Experiment
from fedspine.runtime.state import LoopState, RunState
from fedspine.types import DeviceLora

log = logging.getLogger("fedspine.checkpoint")

CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"
CONFIG_FILE = "config.toml"
MANIFEST_LIMIT = 4 * MIB
"""A manifest holds a few checksums and the run's config: a few KiB."""
FORMAT = 11
"""Bumped whenever the saved state changes shape: an older checkpoint is refused, never misread."""
FILES = frozenset(
    {
        "base_delta.safetensors",
        "base_weights.safetensors",
        "global_adapter.safetensors",
        "state.json",
        "state_tensors.safetensors",
    }
)
"""Exactly what a checkpoint holds besides its manifest."""


@dataclass
class LoopSnapshot:
    """The engine's side of a checkpoint: where its clock, state and records stood."""

    clock: float
    device_lora: dict[int, DeviceLora]
    state: RunState
    rounds: list[RoundRecord]
    """The round records written so far (the report and the summary read them)."""
    positions: dict[str, int]
    """Byte positions of the record files, to which a resumed run truncates them."""
    loop: LoopState


@dataclass
class RunObjects:
    """The run's stateful objects a checkpoint saves, which replace the freshly built ones on resume."""

    strategy: Strategy
    scheduler: Scheduler
    uplink: UplinkChannel | None
    stale_handler: StaleUpdateHandler
    private: PrivateAdapters | None
    clusters: ClusterAdapters | None

    @classmethod
    def of(cls, exp: Experiment) -> RunObjects:
        return cls(
            exp.strategy, exp.scheduler, exp.uplink, exp.stale_handler, exp.trainer.private, exp.clusters
        )

    def restore(self, exp: Experiment) -> None:
        """Put these objects into ``exp`` in place of its own."""
        exp.strategy, exp.scheduler, exp.uplink = self.strategy, self.scheduler, self.uplink
        exp.stale_handler, exp.trainer.private, exp.clusters = self.stale_handler, self.private, self.clusters
        exp.trainer.executor.private = self.private  # the devices' private adapters live with their trainer


@dataclass
class Snapshot:
    """What the engine needs to continue after round ``round``."""

    round: int
    """The round, or for an asynchronous run the global version (server steps), it was taken after."""
    engine: LoopSnapshot
    objects: RunObjects
    base_delta: dict[str, torch.Tensor]
    base_weights: dict[str, torch.Tensor]
    """Current weights of the modules in ``base_delta``."""


def _named(exp: Experiment) -> dict[str, Any]:
    """Objects referred to by name instead of saved (they are rebuilt from the config)."""
    named = {
        "executor": exp.trainer.executor,
        "model": exp.trainer.executor.model,
        "objective": exp.trainer.objective,
    }
    named.update(
        test_data=exp.trainer.test_data,
        train_data=exp.trainer.executor.train_data,
        tokenizer=exp.trainer.tokenizer,
    )
    named.update({f"device-{d.device_id}": d for d in exp.devices})
    return {name: obj for name, obj in named.items() if obj is not None}


def _live(exp: Experiment) -> dict[int, str]:
    return {id(obj): name for name, obj in _named(exp).items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: Path, exp: Experiment, snapshot: Snapshot, keep: int = 2) -> Path:
    """Write ``snapshot`` atomically as ``checkpoints/round-000K``; keep the newest ``keep``."""
    root = run_dir / CHECKPOINTS
    root.mkdir(exist_ok=True)
    final = root / f"round-{snapshot.round:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {
        "base_delta.safetensors": snapshot.base_delta,
        "base_weights.safetensors": snapshot.base_weights,
        "global_adapter.safetensors": flatten_state(exp.strategy.global_lora()),
    }
    for name, values in tensors.items():
        save_file({k: v.contiguous() for k, v in values.items()}, str(tmp / name))
    everything = {"engine": snapshot.engine, "objects": snapshot.objects}
    state, state_tensors = statefile.encode(everything, _live(exp))
    (tmp / "state.json").write_text(json.dumps(state, allow_nan=False), encoding="utf-8")
    save_file(state_tensors, str(tmp / "state_tensors.safetensors"))
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
    for name in files:
        _fsync(tmp / name)
    manifest = {"format": FORMAT, "round": snapshot.round, "files": files, "config": _config_text(run_dir)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _fsync(tmp / MANIFEST)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in sorted(complete(run_dir))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _config_text(run_dir: Path) -> str | None:
    path = run_dir / CONFIG_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def recorded_config(run_dir: Path) -> str | None:
    """The ``config.toml`` text the newest checkpoint with a readable manifest recorded (None: none
    recorded). Checksums are not verified here (:func:`load_latest` does): every checkpoint of a run
    records the same config."""
    root = run_dir / CHECKPOINTS
    for directory in sorted(root.glob("round-*"), reverse=True) if root.is_dir() else []:
        try:
            config = json.loads(read_text(directory / MANIFEST, MANIFEST_LIMIT, within=directory)).get(
                "config"
            )
        except (InputFileError, ValueError, AttributeError):
            continue
        if isinstance(config, str):
            return config
    return None


def complete(run_dir: Path) -> list[Path]:
    """Checkpoint directories that verify against their manifest, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return [d for d in sorted(root.glob("round-*")) if verify(d) is None]


def verify(directory: Path) -> str | None:
    """Why ``directory`` is not a complete checkpoint, or None if it is."""
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        return "no manifest (the checkpoint was not finished)"
    try:
        manifest = json.loads(read_text(manifest_path, MANIFEST_LIMIT, within=directory))
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            return f"format {manifest.get('format')!r}, expected {FORMAT}"
    except InputFileError as exc:
        return exc.reason
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable manifest: {exc}"
    if not isinstance(files, dict) or set(files) != FILES:
        return (
            f"the manifest lists {sorted(files) if isinstance(files, dict) else files!r}, not {sorted(FILES)}"
        )
    present = {p.name for p in directory.iterdir()} - {MANIFEST}
    if present - FILES:
        return f"holds files a checkpoint does not have: {sorted(present - FILES)}"
    for name, digest in files.items():
        path = directory / name
        if not path.exists():
            return f"{name} is missing"
        if path.is_symlink() or not path.is_file():  # a FIFO would block the checksum's read
            return f"{name} is not a regular file of the checkpoint"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum"
    return None


def load_latest(run_dir: Path, exp: Experiment) -> Snapshot:
    """The newest complete checkpoint of ``run_dir`` that loads, re-attached to the rebuilt ``exp``.

    A checkpoint that fails its manifest or cannot be loaded is skipped for the next older one.
    """
    candidates = sorted((run_dir / CHECKPOINTS).glob("round-*")) if (run_dir / CHECKPOINTS).is_dir() else []
    reasons = []
    for directory in reversed(candidates):
        reason = verify(directory)
        if reason is None:
            try:
                return _load(directory, exp)
            except Exception as exc:  # a checkpoint that verified but does not load: try an older one
                reason = f"cannot be loaded ({type(exc).__name__}: {exc})"
        reasons.append(f"{directory.name}: {reason}")
        log.warning("checkpoint %s skipped: %s", directory, reason)
    detail = f" ({'; '.join(reasons)})" if reasons else ""
    raise CheckpointError(f"{run_dir} has no complete checkpoint to resume from{detail}")


def _load(directory: Path, exp: Experiment) -> Snapshot:
    tensors = load_file(str(directory / "state_tensors.safetensors"))
    data = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    state = statefile.decode(data, _named(exp), tensors)
    if (
        not isinstance(state, dict)
        or set(state) != {"engine", "objects"}
        or not isinstance(state["engine"], LoopSnapshot)
        or not isinstance(state["objects"], RunObjects)
    ):
        raise CheckpointError("the checkpoint's state is not an engine and its objects")
    delta = load_file(str(directory / "base_delta.safetensors"))
    weights = load_file(str(directory / "base_weights.safetensors"))
    round_no = int(json.loads((directory / MANIFEST).read_text())["round"])
    return Snapshot(round_no, state["engine"], state["objects"], delta, weights)
