"""Golden records: does a change to the engine keep every run's records byte for byte?

    python tools/golden.py record DIR     # before the change: records of every pair that runs today
    python tools/golden.py check DIR      # after it: rerun each pair, compare, list the differences
    python tools/golden.py check DIR --scheduler fedbuff --scheduler fedcompass   # only those pairs

Each (strategy, scheduler) pair runs ``configs/tiny.toml`` for a few rounds with dropouts
(``fleet.trace.kind = "sessions"``), and ``events.jsonl`` and ``rounds.csv`` are kept under
``DIR/<strategy>-<scheduler>/``. A pair that does not run (a config error) is recorded as such, so
``check`` also notices a pair that starts or stops running. Records are deterministic for a config,
seed and machine (docs/guide.md, "Determinism"): record and check on the same machine and torch.
Exit code 1 when anything differs. Not a test: its goldens are machine-specific.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
from pathlib import Path

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


def differences(golden: Path, fresh: Path) -> list[str]:
    found = []
    names = sorted({p.name for p in golden.iterdir()} | {p.name for p in fresh.iterdir()})
    for name in names:
        a, b = golden / name, fresh / name
        if not a.exists() or not b.exists():
            found.append(f"{name}: only in {'the golden' if a.exists() else 'the new'} records")
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
    args = parser.parse_args()
    chosen = pairs(args.scheduler)
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
            found = differences(args.dir / name, Path(tmp) / name)
            failed += bool(found)
            print(f"{name}: " + ("identical" if not found else "DIFFERS\n" + "\n".join(found)), flush=True)
    print(f"RESULT pairs={len(chosen)} differing={failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
