"""Behaviour kept: a run's records equal the committed golden records (``tests/golden/``).

Each golden pair runs ``configs/tiny.toml`` for a few rounds with dropouts (``tools/golden.py``), and
its ``events.jsonl`` and ``rounds.csv`` must equal the committed ones: every status, count, byte and
virtual time, and the order of events, exactly; every number within a relative 1e-4 (training's
floating point differs in its last bits between machines). A change that alters them on purpose
re-records them (``python tools/golden.py record``) in the same commit and says why.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
TOLERANCE = 1e-4

PAIRS = [
    "fedit-sync",
    "fedit-fedbuff",
    "fedspine-sync",
    "fedmp-fedcompass",
    "prune_then_tune-fedbuff",
    "flora-fedasync",
    "flexlora-sync",
    "hetlora-fedcompass",
    "zeropad-fedasync",
]
"""Every strategy once and every scheduler twice: the slow suite's share of the 36 committed pairs."""


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("golden", ROOT / "tools" / "golden.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_strategy_and_scheduler_pair_has_committed_goldens() -> None:
    tool = _tool()
    names = {f"{strategy}-{scheduler}" for strategy, scheduler in tool.pairs()}
    assert names == {p.name for p in GOLDEN.iterdir() if p.is_dir()}
    assert set(PAIRS) <= names


def test_the_tolerant_comparison_catches_a_changed_status_and_a_moved_number(tmp_path: Path) -> None:
    tool = _tool()
    golden, fresh = GOLDEN / "fedit-sync", tmp_path / "fedit-sync"
    fresh.mkdir()
    for name in ("events.jsonl", "rounds.csv"):
        (fresh / name).write_bytes((golden / name).read_bytes())
    assert tool.differences(golden, fresh, TOLERANCE) == []
    events = (fresh / "events.jsonl").read_text()
    (fresh / "events.jsonl").write_text(events.replace('"status": "ok"', '"status": "late"', 1))
    assert any("status" in d for d in tool.differences(golden, fresh, TOLERANCE))
    (fresh / "events.jsonl").write_text(events)
    lines = (fresh / "rounds.csv").read_text().splitlines()
    cells = lines[1].split(",")
    cells[1] = repr(float(cells[2]) * 1.001)  # a round's virtual start, moved by 0.1%
    (fresh / "rounds.csv").write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    assert tool.differences(golden, fresh, TOLERANCE) != []


@pytest.mark.slow
@pytest.mark.parametrize("pair", PAIRS)
def test_records_equal_the_committed_goldens(tmp_path: Path, pair: str) -> None:
    tool = _tool()
    strategy, scheduler = pair.split("-")
    tool.produce(strategy, scheduler, tmp_path / pair)
    assert tool.differences(GOLDEN / pair, tmp_path / pair, TOLERANCE) == []
