"""Property-based tests: random and mutated input to the config loader and the update decoder
fails only with fedspine's typed errors, never with an arbitrary exception; and whatever mutated
reply the server accepts is sound."""

from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedspine.algorithms.compression import ErrorFeedback, FeedbackState, UplinkChannel, make_codec
from fedspine.algorithms.validation import check_update
from fedspine.config import Config, from_dict, load_config, to_dict
from fedspine.deploy.records import (
    Timing,
    max_reply_bytes,
    read_task,
    read_update,
    task_record,
    update_record,
)
from fedspine.errors import ConfigError, DeployError
from fedspine.model.footprint import ModelShape
from fedspine.types import ClientTask, ClientUpdate, DeviceLora
from tests.config_tree import lookup, replaced

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


@SETTINGS
@given(path=st.sampled_from(PATHS), value=values)
def test_a_mutated_config_loads_or_raises_a_config_error(path: tuple[Any, ...], value: Any) -> None:
    try:
        from_dict(replaced(DEFAULT, path, value))
    except ConfigError as exc:
        assert exc.key  # names the field
    except ValueError as exc:  # pragma: no cover - the property's failure
        raise AssertionError(f"untyped error for {path}={value!r}: {exc!r}") from exc


BOUNDARIES = [0, -1, 2**63, -(2**63) - 1, float("nan"), float("inf"), float("-inf"), -0.5, 1e308]
NUMERIC_PATHS = [p for p in PATHS if type(lookup(DEFAULT, p)) in (int, float)]


@pytest.mark.parametrize("path", NUMERIC_PATHS, ids=lambda p: ".".join(map(str, p)))
def test_every_numeric_field_at_its_boundaries_loads_or_names_itself(path: tuple[Any, ...]) -> None:
    """Sampling can miss one bad value of one field (``model.tiny.heads = 0`` was missed): every
    number of the config at every boundary value either loads or is a ConfigError naming that field."""
    for value in BOUNDARIES:
        try:
            config = from_dict(replaced(DEFAULT, path, value))
        except ConfigError as exc:
            assert str(path[0]) in exc.key, (path, value, exc.key)
            continue
        loaded = lookup(to_dict(config), path)
        assert not isinstance(loaded, float) or math.isfinite(loaded), (path, value)


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
            content[name] = _mutated_fields(draw, record, [*record, "extra"], scalars)
    return content


def _mutated_fields(draw: st.DrawFn, record: ConfigRecord, keys: list[str], values: Any) -> ConfigRecord:
    """``record`` with up to three of ``keys`` set to a drawn value, or removed when it is None."""
    fields = dict(record)
    for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
        value = draw(values)
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    return ConfigRecord(fields)


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


# --- a compressed reply with importance scores, decoded and checked as the server does --------------------

SHAPE = ModelShape(
    hidden=5, layers=2, heads=2, kv_heads=2, head_dim=2, intermediate=3, vocab=11, tied_embeddings=True
)
SAMPLES = 9
WIRE_TASK = ClientTask(
    2,
    1,
    4,
    DeviceLora(2, 2.0),
    {"m.q": {"A": torch.randn(2, 5), "B": torch.zeros(3, 2)}},
    0,
    extra={"measure_importance": True},
)
_trained = {"m.q": {"A": torch.randn(2, 5), "B": torch.randn(3, 2)}}
_honest = ClientUpdate(2, 1, SAMPLES, _trained, 0, 1.0, 10, 0.1, 2, 2.0, probe_loss=0.5)
_honest.importance = {"heads": [torch.rand(2), torch.rand(2)], "channels": [torch.rand(3), torch.rand(3)]}
_honest.wire = UplinkChannel(ErrorFeedback(make_codec("topk", 0.5))).send(
    FeedbackState(), _honest, WIRE_TASK.payload, torch.Generator().manual_seed(0)
)
WIRE_GOOD = update_record(_honest, Timing(1.0, 2.0, 0.5))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


raw_arrays = st.builds(
    lambda dtype, shape, stype, data: Array(dtype=dtype, shape=shape, stype=stype, data=data),
    st.sampled_from(["float32", "<U3", "int16", "object", "float64", ""]),
    st.lists(st.integers(-2, 20000), max_size=3).map(tuple),
    st.sampled_from(["numpy.ndarray", "torch.Tensor", ""]),
    st.binary(max_size=64)
    | st.sampled_from(
        [_npy(np.array(["ab", "c"])), _npy(np.zeros((2, 2), np.float64)), _npy(np.arange(3, dtype=">i4"))]
    ),
)
wire_arrays = st.one_of(
    arrays,
    raw_arrays,
    st.builds(lambda n: torch.tensor([n, n], dtype=torch.int32), st.integers(-5, 2**31 - 1)),
    st.builds(lambda n: torch.tensor([n], dtype=torch.int16), st.integers(-(2**15), 2**15 - 1)),
    st.builds(lambda x: torch.tensor([x], dtype=torch.float32), st.floats(width=32)),
)
reply_scalars = scalars | st.sampled_from([0, -1, 10**9, 1e4, float("inf"), float("nan")])


@st.composite
def mutated_wire_updates(draw: st.DrawFn) -> RecordDict:
    content = RecordDict()
    for name, record in WIRE_GOOD.array_records.items():
        if draw(st.integers(0, 9)) == 0:
            continue  # the whole record dropped
        items = {k: a for k, a in record.items()}
        keys = [*items, "m.q/A/index", "m.q/B/values", "heads/2", "channels/2", "m.k/A/shape"]
        for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
            value = draw(wire_arrays)
            items[key] = value if isinstance(value, Array) else Array(value)
        content[name] = ArrayRecord(items)
    for name, record in WIRE_GOOD.config_records.items():
        content[name] = _mutated_fields(draw, record, list(record), reply_scalars)
    return content


@SETTINGS
@given(content=mutated_wire_updates())
def test_a_mutated_compressed_reply_is_rejected_or_sound(content: RecordDict) -> None:
    """The server's path: decode within the byte cap, decompress, check. A mutation may only end in a
    typed error or a rejection reason; an update that passes holds the task's scaling, a sample count
    within the device's partition, finite scalars and factors of the task's shapes."""
    channel = UplinkChannel(ErrorFeedback(make_codec("topk", 0.5)))
    try:
        update, _ = read_update(content, WIRE_TASK, max_reply_bytes(WIRE_TASK, SHAPE))
        if update.wire is None:
            raise DeployError("no wire payload")
        update = channel.receive(update, WIRE_TASK.payload)
    except (DeployError, ValueError) as error:
        assert not channel.server_states, f"state changed before the update passed ({error})"
        return
    reason = check_update(update, WIRE_TASK, max_samples=SAMPLES, shape=SHAPE)
    if reason is not None:
        return
    assert update.lora_scaling == WIRE_TASK.lora.scaling and 1 <= update.num_samples <= SAMPLES
    assert all(math.isfinite(v) for v in (update.train_loss, update.host_train_seconds))
    for factors in update.lora_state.values():
        assert (
            factors["A"].shape[1] == 5 and factors["B"].shape[0] == 3 and torch.isfinite(factors["A"]).all()
        )
    assert update.importance is None or [s.numel() for s in update.importance["channels"]] == [3, 3]


def test_the_honest_compressed_reply_passes_the_same_path() -> None:
    channel = UplinkChannel(ErrorFeedback(make_codec("topk", 0.5)))
    update, _ = read_update(WIRE_GOOD, WIRE_TASK, max_reply_bytes(WIRE_TASK, SHAPE))
    update = channel.receive(update, WIRE_TASK.payload)
    assert check_update(update, WIRE_TASK, max_samples=SAMPLES, shape=SHAPE) is None
