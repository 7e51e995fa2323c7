"""Random values of the right and the wrong type for every key of the tiny config. Each either loads
and runs, or ends in one ``error:`` line from fedspine: never a traceback, a hang, or a non-fedspine
exception (docs/reliability.md, "What each command accepts").

Two passes: every key with a few seeded random values through loading and the build's cheap checks
(all keys, a few seconds), and a sample of (key, value) pairs run end to end through the CLI (a
bounded number in the default suite, more in the slow one)."""

from __future__ import annotations

import math
import random
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedspine.cli import app as cli
from fedspine.config import from_dict, load_config, to_dict
from fedspine.errors import ConfigError, FedspineError
from fedspine.runtime.experiment import check_config
from tests.config_tree import lookup, replaced

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "scheduler.rounds=1",
    "data.test_size=40",
    "export.save=false",
    "export.speed=false",
    "run.threads=1",
]
BASE = to_dict(load_config(ROOT / "configs" / "tiny.toml", QUICK))
RUN_SECONDS = 180
"""No single run of the tiny model may take longer: a hang is a failure, not a wait. The longest valid
draw (``train.local_steps = 2552``) takes 71 s on an idle 2-core host, so the limit leaves it room."""


def _leaves(tree: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(tree, dict) and tree:
        return [leaf for key, value in tree.items() for leaf in _leaves(value, (*path, key))]
    if isinstance(tree, list) and tree and all(isinstance(item, dict) for item in tree):
        return [leaf for i, item in enumerate(tree) for leaf in _leaves(item, (*path, i))]
    return [path]


KEYS = _leaves(BASE)


def _dotted(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _right_type(default: Any) -> st.SearchStrategy[Any]:
    """Values of the key's own type: boundaries, huge and tiny magnitudes, odd text."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        edges = [0, -1, 1, 2, 7, 2**31, 2**62, 10**9, -(2**40)]
        return st.one_of(st.sampled_from(edges), st.integers(-(2**64), 2**64))
    if isinstance(default, float):
        edges = [0.0, -0.0, -1.0, 1e-300, 1e308, 0.5, 1.0, 1e12, math.nan, math.inf, -math.inf]
        return st.one_of(st.sampled_from(edges), st.floats())
    if isinstance(default, str):
        edges = ["", " ", "../x", "/dev/zero", "{text}", "{text}{text}", "{", "x" * 300, "auto", "none"]
        return st.one_of(st.sampled_from(edges), st.text(max_size=12))
    if isinstance(default, list):
        return st.lists(st.one_of(st.integers(-5, 10**6), st.floats(), st.text(max_size=6)), max_size=4)
    if isinstance(default, dict):
        return st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.text(max_size=6)), max_size=3)
    return st.none()


WRONG_TYPE = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(),
    st.text(max_size=8),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _value(default: Any) -> st.SearchStrategy[Any]:
    return st.one_of(_right_type(default), _right_type(default), WRONG_TYPE)


def _random_value(default: Any, rng: random.Random) -> Any:
    """A seeded value for the every-key pass: the right type's edges, or a value of another type."""
    wrong = [-7, 2.5, "x", True, [1], {"a": 1}]
    if isinstance(default, bool):
        right: list[Any] = [True, False]
    elif isinstance(default, int):
        right = [0, -1, 2**62, 10**9, rng.randint(-(10**6), 10**6)]
    elif isinstance(default, float):
        right = [0.0, -1.0, 1e308, 1e-300, math.nan, math.inf, rng.uniform(-1e6, 1e6)]
    elif isinstance(default, str):
        right = ["", "../x", "{text}{text}", "".join(rng.choices("ab{}./ _", k=rng.randint(0, 9)))]
    elif isinstance(default, list):
        right = [[], [0], [-1], [10**9], ["x"]]
    else:
        right = [{}, {"x": 1}]
    return rng.choice(right if rng.random() < 0.7 else wrong)


@pytest.mark.parametrize("path", KEYS, ids=[_dotted(k) for k in KEYS])
def test_every_key_with_random_values_loads_and_builds_or_names_itself(path: tuple[Any, ...]) -> None:
    """Loading and the build's cheap checks: a typed fedspine error (a config error naming the key's
    section), or a config that passes them."""
    rng = random.Random(_dotted(path))
    for _ in range(4):
        value = _random_value(lookup(BASE, path), rng)
        try:
            config = from_dict(replaced(BASE, path, value))
            check_config(config)
        except ConfigError as exc:
            assert str(path[0]) in exc.key or exc.key.startswith(("fleet", "lora", "data")), (
                path,
                value,
                exc,
            )
        except FedspineError:
            pass


@contextmanager
def _limit(seconds: int) -> Iterator[None]:
    def stop(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _run_through_the_cli(path: tuple[Any, ...], value: Any) -> None:
    """One run of the tiny config with ``value`` at ``path``, in a fresh directory: it finishes, or
    exits 1 or 2 with exactly one error line; nothing else."""
    try:
        text = tomli_w.dumps(replaced(BASE, path, value))
    except (TypeError, ValueError):  # not expressible in TOML (a NaN inside a list is): nobody can write it
        return
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(text, encoding="utf-8")
        with _limit(RUN_SECONDS):
            result = CliRunner().invoke(
                cli, ["run", "--config", str(config), "--out", str(Path(tmp) / "run")]
            )
    where = f"{_dotted(path)} = {value!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{where}: {result.exception!r}\n{result.output}"
    )
    assert "Traceback" not in result.output, (where, result.output)
    if result.exit_code != 0:
        assert result.exit_code in (1, 2), (where, result.exit_code, result.output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, (where, result.stderr)


def _fuzz(examples: int) -> Any:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@st.composite
def key_and_value(draw: st.DrawFn) -> tuple[tuple[Any, ...], Any]:
    path = draw(st.sampled_from(KEYS))
    return path, draw(_value(lookup(BASE, path)))


@_fuzz(60)
@given(case=key_and_value())
def test_random_values_run_or_end_in_one_error_line(case: tuple[tuple[Any, ...], Any]) -> None:
    _run_through_the_cli(*case)


@pytest.mark.slow
@_fuzz(300)
@given(case=key_and_value())
def test_many_random_values_run_or_end_in_one_error_line(case: tuple[tuple[Any, ...], Any]) -> None:
    _run_through_the_cli(*case)
