"""Golden records: does a change to the engine keep every run's records byte for byte?

    python tools/golden.py record DIR     # before the change: records of every pair that runs today
    python tools/golden.py check DIR      # after it: rerun each pair, compare, list the differences
    python tools/golden.py check DIR --scheduler fedbuff --scheduler fedcompass   # only those pairs
    python tools/golden.py check tests/golden --tolerance 1e-4    # the committed goldens, any machine

Each (strategy, scheduler) pair runs ``configs/tiny.toml`` for a few rounds with dropouts
(``fleet.trace.kind = "sessions"``), and ``events.jsonl`` and ``rounds.csv`` are kept under
``DIR/<strategy>-<scheduler>/``. A pair that does not run (a config error) is recorded as such, so
``check`` also notices a pair that starts or stops running. Records are deterministic for a config,
seed and machine (docs/guide.md, "Determinism"): record and check on the same machine and torch
for a byte-for-byte check. Across machines the floating-point results of training differ in their
last bits; ``--tolerance REL`` compares every number within that relative tolerance (and 1e-9
absolute) and everything else exactly: statuses, counts, bytes, the order of events. The goldens
committed in ``tests/golden/`` are checked that way by ``tests/test_golden.py`` (in ``make
test-slow``); re-record them (``record``) in the commit that changes behaviour on purpose, and say why.
Exit code 1 when anything differs.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedspine.algorithms.schedulers.base import SCHEDULERS  # noqa: E402
from fedspine.algorithms.strategies.base import STRATEGIES  # noqa: E402
from fedspine.api import run_experiment  # noqa: E402
from fedspine.config import load_config  # noqa: E402
from fedspine.errors import FedspineError  # noqa: E402

FILES = ("events.jsonl", "rounds.csv")
COMMON = [
    "scheduler.rounds=3",
    "data.test_size=40",
    "export.speed=false",
    "export.save=false",
    "run.checkpoint_every=0",
    "fleet.trace.kind=sessions",
    "fleet.trace.mean_online_seconds=60",
    "fleet.trace.mean_offline_seconds=30",
]


def pairs(schedulers: list[str] | None = None) -> list[tuple[str, str]]:
    chosen = [s for s in SCHEDULERS.names() if not schedulers or s in schedulers]
    return [(strategy, scheduler) for strategy in STRATEGIES.names() for scheduler in chosen]


def produce(strategy: str, scheduler: str, out: Path) -> None:
    """The records of one pair in ``out`` (or ``out/ERROR`` with the config error)."""
    out.mkdir(parents=True)
    overrides = [*COMMON, f"strategy.name={strategy}", f"scheduler.name={scheduler}"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_experiment(load_config(ROOT / "configs" / "tiny.toml", overrides), Path(tmp) / "run")
        except FedspineError as exc:
            (out / "ERROR").write_text(f"{type(exc).__name__}\n", encoding="utf-8")
            return
        for name in FILES:
            shutil.copy(Path(tmp) / "run" / name, out / name)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _mismatch(a: Any, b: Any, tolerance: float, where: str) -> str | None:
    """Where ``a`` and ``b`` (parsed records) differ beyond ``tolerance``; None when they agree."""
    if isinstance(a, str) and isinstance(b, str) and (x := _number(a)) is not None:
        y = _number(b)
        if y is not None:
            a, b = x, y
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int | float):
        if isinstance(a, dict) and isinstance(b, dict):
            if a.keys() != b.keys():
                return f"{where}: keys {sorted(a.keys() ^ b.keys())} in one only"
            return next((m for k in a if (m := _mismatch(a[k], b[k], tolerance, f"{where}.{k}"))), None)
        if isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                return f"{where}: {len(a)} items, now {len(b)}"
            pairs = zip(a, b, strict=True)
            return next(
                (m for i, (x, y) in enumerate(pairs) if (m := _mismatch(x, y, tolerance, f"{where}[{i}]"))),
                None,
            )
        return None if a == b else f"{where}: {a!r}, now {b!r}"
    if not isinstance(b, int | float) or isinstance(b, bool):
        return f"{where}: {a!r}, now {b!r}"
    if a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tolerance, abs_tol=1e-9):
        return None
    return f"{where}: {a!r}, now {b!r} (beyond {tolerance:g} relative)"


def _parsed(path: Path) -> list[Any]:
    """A record file's rows: JSON objects (``.jsonl``) or CSV rows (``.csv``, header included)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines()]
    return list(csv.reader(text.splitlines()))


def differences(golden: Path, fresh: Path, tolerance: float = 0.0) -> list[str]:
    """How the records in ``fresh`` differ from ``golden``: byte for byte, or, with ``tolerance``,
    every number within that relative tolerance and everything else exactly."""
    found = []
    names = sorted({p.name for p in golden.iterdir()} | {p.name for p in fresh.iterdir()})
    for name in names:
        a, b = golden / name, fresh / name
        if not a.exists() or not b.exists():
            found.append(f"{name}: only in {'the golden' if a.exists() else 'the new'} records")
        elif tolerance > 0 and a.suffix in (".jsonl", ".csv"):
            mismatch = _mismatch(_parsed(a), _parsed(b), tolerance, "line")
            if mismatch is not None:
                found.append(f"{name}: {mismatch}")
        elif a.read_bytes() != b.read_bytes():
            diff = difflib.unified_diff(
                a.read_text().splitlines(), b.read_text().splitlines(), "golden", "new", lineterm="", n=0
            )
            found.append(f"{name}:\n" + "\n".join(list(diff)[:12]))
    return found


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("mode", choices=("record", "check"))
    parser.add_argument("dir", type=Path)
    parser.add_argument(
        "--scheduler", action="append", choices=SCHEDULERS.names(), help="only this scheduler's pairs"
    )
    parser.add_argument(
        "--pair", action="append", metavar="STRATEGY-SCHEDULER", help="only this pair (repeatable)"
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.0, help="relative tolerance on numbers (default: byte for byte)"
    )
    args = parser.parse_args()
    chosen = [p for p in pairs(args.scheduler) if not args.pair or "-".join(p) in args.pair]
    if args.mode == "record":
        if args.dir.exists():
            parser.error(f"{args.dir} exists; golden records are never overwritten")
        for strategy, scheduler in chosen:
            produce(strategy, scheduler, args.dir / f"{strategy}-{scheduler}")
            print(f"recorded {strategy}-{scheduler}", flush=True)
        return 0
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, scheduler in chosen:
            name = f"{strategy}-{scheduler}"
            produce(strategy, scheduler, Path(tmp) / name)
            if not (args.dir / name).is_dir():
                print(f"{name}: new pair (no golden records)")
                failed += 1
                continue
            found = differences(args.dir / name, Path(tmp) / name, args.tolerance)
            failed += bool(found)
            print(f"{name}: " + ("identical" if not found else "DIFFERS\n" + "\n".join(found)), flush=True)
    print(f"RESULT pairs={len(chosen)} differing={failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
