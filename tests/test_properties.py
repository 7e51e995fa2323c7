"""Property-based tests: random and mutated input to the config loader and the update decoder
fails only with fedspine's typed errors, never with an arbitrary exception."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedspine.algorithms.validation import check_update
from fedspine.config import Config, from_dict, load_config, to_dict
from fedspine.deploy.records import Timing, read_task, read_update, task_record, update_record
from fedspine.errors import ConfigError, DeployError
from fedspine.types import ClientTask, ClientUpdate, DeviceLora

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found += _paths(value, (*prefix, i))
    return found


DEFAULT = to_dict(Config())
PATHS = _paths(DEFAULT)


def _set(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    tree = copy.deepcopy(tree)
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return tree


@SETTINGS
@given(path=st.sampled_from(PATHS), value=values)
def test_a_mutated_config_loads_or_raises_a_config_error(path: tuple[Any, ...], value: Any) -> None:
    try:
        from_dict(_set(DEFAULT, path, value))
    except ConfigError as exc:
        assert exc.key  # names the field
    except ValueError as exc:  # pragma: no cover - the property's failure
        raise AssertionError(f"untyped error for {path}={value!r}: {exc!r}") from exc


@SETTINGS
@given(
    extra=st.dictionaries(st.text(min_size=1, max_size=8), values, min_size=1, max_size=3),
    table=st.sampled_from(sorted(DEFAULT)),
)
def test_unknown_keys_are_config_errors_naming_them(extra: dict[str, Any], table: str) -> None:
    data = copy.deepcopy(DEFAULT)
    if not isinstance(data[table], dict):
        return
    unknown = {k: v for k, v in extra.items() if k not in data[table]}
    if not unknown:
        return
    data[table].update(unknown)
    try:
        from_dict(data)
    except ConfigError as exc:
        assert exc.key.startswith(table)
    else:  # pragma: no cover - the property's failure
        raise AssertionError(f"unknown keys {sorted(unknown)} in [{table}] were accepted")


@SETTINGS
@given(text=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_any_file_content_loads_or_raises_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "random.toml"
    path.write_text(text, encoding="utf-8")
    with contextlib.suppress(ConfigError):
        load_config(path)


# --- the update decoder ----------------------------------------------------------------------------------

TASK = ClientTask(
    2,
    1,
    4,
    DeviceLora(2, 2.0),
    {"m.q": {"A": torch.randn(2, 5), "B": torch.zeros(3, 2)}},
    0,
)
GOOD = update_record(
    ClientUpdate(2, 1, 9, {"m.q": {"A": torch.randn(2, 5), "B": torch.randn(3, 2)}}, 0, 1.0, 10, 0.1, 2, 2.0),
    Timing(1.0, 2.0, 0.5),
)

arrays = st.builds(
    lambda shape, dtype: torch.zeros(shape, dtype=dtype),
    st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.float64, torch.int64, torch.int16, torch.uint8, torch.bool]),
)
scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=5)


@st.composite
def mutated_updates(draw: st.DrawFn) -> RecordDict:
    content = RecordDict()
    for name, record in GOOD.array_records.items():
        if draw(st.booleans()):
            tensors = {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}
            for key in draw(st.lists(st.sampled_from([*tensors, "m.q/C", "x", "m.k/A", "/"]), max_size=3)):
                tensors[key] = draw(arrays)
            content[name] = ArrayRecord({k: Array(t) for k, t in tensors.items()})
    for name, record in GOOD.config_records.items():
        if draw(st.booleans()):
            fields = dict(record)
            for key in draw(st.lists(st.sampled_from([*fields, "extra"]), max_size=3)):
                value = draw(scalars)
                if value is None:
                    fields.pop(key, None)
                else:
                    fields[key] = value
            content[name] = ConfigRecord(fields)
    return content


@SETTINGS
@given(content=mutated_updates())
def test_a_mutated_reply_decodes_or_raises_a_deploy_error(content: RecordDict) -> None:
    try:
        update, _ = read_update(content, TASK)
    except DeployError:
        return
    reason = check_update(update, TASK)  # whatever decodes is either sound or rejected with a reason
    assert reason is None or isinstance(reason, str)


@SETTINGS
@given(
    keys=st.lists(
        st.sampled_from(["round", "device_id", "rank", "scaling", "plan", "extra", "sent_at"]), max_size=3
    ),
    value=scalars,
)
def test_a_mutated_task_decodes_or_raises_a_deploy_error(keys: list[str], value: Any) -> None:
    content = task_record(TASK, {}, 1.0)
    fields = dict(content.config_records["task"])
    for key in keys:
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    content["task"] = ConfigRecord(fields)
    with contextlib.suppress(DeployError):
        read_task(content)
