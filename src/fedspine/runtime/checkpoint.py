"""Atomic checkpoints of a synchronous run, and resuming from the newest complete one.

A checkpoint is a directory ``checkpoints/round-000K`` holding

* ``global_adapter.safetensors``: the global LoRA adapter (for inspection and export);
* ``base_delta.safetensors``, ``base_weights.safetensors``: everything merged into the base weights
  so far (FLoRA, FedSpine) and the merged modules' current weights, which a rebuilt model takes over
  exactly (adding the delta again would round differently);
* ``state.pkl``: the rest, pickled: the strategy (global state, pruning masks and importance, the
  policy with its bandit statistics), the scheduler, the uplink codec's error-feedback memories on
  both sides, the engine's counters, the virtual clock, per-device LoRA ranks, the round records so
  far and the byte positions of the record files. Live objects (the model and its executor, the data)
  are not pickled but referred to by name and re-attached from the rebuilt experiment;
* ``state_tensors.safetensors``: every tensor of that state, which the pickle refers to by key;
* ``MANIFEST.json``, written last: the round and the SHA-256 of every file.

It is written into a temporary directory, fsynced, and renamed into place, so a crash leaves either a
complete checkpoint or a ``.tmp-*`` directory that is ignored. A checkpoint whose manifest is missing
or whose files do not match it is torn: it is never loaded. Random state needs no saving: every draw
of a round comes from a generator seeded by (run seed, round, device).

Loading the pickle cannot run code: the unpickler resolves only fedspine's own classes,
``collections.OrderedDict``, ``collections.deque`` and ``random.Random``, and ``getattr`` for public
names (a bound method of a fedspine object); tensors come from the safetensors file, never from
pickled storages (whose loader is ``torch.load`` without ``weights_only``). Anything else fails the
load, and the next older checkpoint is tried (with a warning). A crafted checkpoint can still hold
wrong *values*: resume run directories you trust.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedspine.algorithms.wire import flatten_state
from fedspine.errors import CheckpointError
from fedspine.runtime.build import Experiment

log = logging.getLogger("fedspine.checkpoint")

CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"
FORMAT = 2
FILES = frozenset(
    {
        "base_delta.safetensors",
        "base_weights.safetensors",
        "global_adapter.safetensors",
        "state.pkl",
        "state_tensors.safetensors",
    }
)
"""Exactly what a checkpoint holds besides its manifest."""


@dataclass
class Snapshot:
    """What the engine needs to continue after round ``round``."""

    round: int
    engine: dict[str, Any]
    """Clock, per-device LoRA, run state, round records and record-file positions."""
    objects: dict[str, Any]
    """Strategy, scheduler, uplink channel, stale-update handler."""
    base_delta: dict[str, torch.Tensor]
    base_weights: dict[str, torch.Tensor]
    """Current weights of the modules in ``base_delta``."""


def _named(exp: Experiment) -> dict[str, Any]:
    """Objects referred to by name instead of pickled (they are rebuilt from the config)."""
    named = {"executor": exp.executor, "model": exp.executor.model, "objective": exp.objective}
    named.update(test_data=exp.test_data, train_data=exp.executor.train_data, tokenizer=exp.tokenizer)
    return {name: obj for name, obj in named.items() if obj is not None}


def _live(exp: Experiment) -> dict[int, str]:
    return {id(obj): name for name, obj in _named(exp).items()}


class _Pickler(pickle.Pickler):
    """Pickles the state with live objects by name and tensors by key into :attr:`tensors`."""

    def __init__(self, file: io.BytesIO, live: dict[int, str]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.live = live
        self.tensors: dict[str, torch.Tensor] = {}
        self._keys: dict[int, str] = {}

    def persistent_id(self, obj: Any) -> Any:
        if id(obj) in self.live:
            return self.live[id(obj)]
        if isinstance(obj, torch.Tensor):
            key = self._keys.get(id(obj))
            if key is None:
                key = self._keys[id(obj)] = f"t{len(self._keys)}"
                self.tensors[key] = obj.detach().cpu().clone().contiguous()
            return ("tensor", key)
        return None


_SAFE_GLOBALS = {("collections", "OrderedDict"), ("collections", "deque"), ("random", "Random")}


def _public_getattr(obj: Any, name: str) -> Any:
    """``getattr`` as a checkpoint may use it: a bound method of a restored object, never a dunder."""
    if not isinstance(name, str) or name.startswith("_"):
        raise pickle.UnpicklingError(f"the checkpoint asks for attribute {name!r}")
    return getattr(obj, name)


class _Unpickler(pickle.Unpickler):
    """Resolves only fedspine classes and :data:`_SAFE_GLOBALS`; tensors and live objects by reference."""

    def __init__(self, file: io.BytesIO, live: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(file)
        self.live = live
        self.tensors = tensors

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return _public_getattr
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module.startswith("fedspine.") and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"a checkpoint may not refer to {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "tensor" and pid[1] in self.tensors:
            return self.tensors[pid[1]]
        if isinstance(pid, str) and pid in self.live:
            return self.live[pid]
        raise CheckpointError(f"the checkpoint refers to {pid!r}, which this run does not have")


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
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, _live(exp))
    pickler.dump({"engine": snapshot.engine, "objects": snapshot.objects})
    (tmp / "state.pkl").write_bytes(buffer.getvalue())
    save_file(pickler.tensors, str(tmp / "state_tensors.safetensors"))
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
    for name in files:
        _fsync(tmp / name)
    manifest = {"format": FORMAT, "round": snapshot.round, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _fsync(tmp / MANIFEST)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in sorted(complete(run_dir))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            return f"format {manifest.get('format')!r}, expected {FORMAT}"
    except (ValueError, KeyError, TypeError) as exc:
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
    state = _Unpickler(io.BytesIO((directory / "state.pkl").read_bytes()), _named(exp), tensors).load()
    delta = load_file(str(directory / "base_delta.safetensors"))
    weights = load_file(str(directory / "base_weights.safetensors"))
    round_no = int(json.loads((directory / MANIFEST).read_text())["round"])
    return Snapshot(round_no, state["engine"], state["objects"], delta, weights)
