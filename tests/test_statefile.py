"""The JSON state of a checkpoint: exact round trips of object graphs, and nothing loads that is not data."""

from __future__ import annotations

import json
import math
import random
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import pytest
import torch

from fedspine.algorithms.policies import SlidingWindowUCB
from fedspine.errors import CheckpointError
from fedspine.runtime import statefile


def roundtrip(state: Any, live: dict[str, Any] | None = None) -> Any:
    live = live or {}
    data, tensors = statefile.encode(state, {id(obj): name for name, obj in live.items()})
    text = json.dumps(data, allow_nan=False)  # what the checkpoint writes: strict JSON
    return statefile.decode(json.loads(text), live, tensors)


def test_values_come_back_exactly() -> None:
    rng = random.Random(7)
    rng.random()
    state = {
        "floats": [0.1, -0.0, 1e-310, math.inf, -math.inf, 2.0**-1074],
        "ints": [0, -1, 2**80],
        "text": "ünïcödé",
        "flags": (True, False, None),
        "bytes": b"\x00\xff",
        "deque": deque([1, 2], maxlen=3),
        "ordered": OrderedDict([("b", 1), ("a", 2)]),
        "sets": ({3, 1, 2}, frozenset({"x"})),
        7: "an int key",
        (1, 2): "a tuple key",
        "rng": rng,
    }
    back = roundtrip(state)
    assert back == {k: v for k, v in state.items() if k != "rng"} | {"rng": back["rng"]}
    assert math.copysign(1.0, back["floats"][1]) == -1.0
    assert back["deque"].maxlen == 3 and type(back["ordered"]) is OrderedDict
    assert back["rng"].random() == rng.random()  # the generator continues where it was saved
    nan = roundtrip([math.nan])[0]
    assert math.isnan(nan)


def test_sharing_and_cycles_survive() -> None:
    shared = [1, 2]
    cycle: list[Any] = []
    cycle.append(cycle)
    tensor = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    back = roundtrip({"a": shared, "b": shared, "cycle": cycle, "t1": tensor, "t2": tensor})
    assert back["a"] is back["b"] and back["cycle"][0] is back["cycle"]
    assert back["t1"] is back["t2"] and back["t1"].dtype == torch.bfloat16
    assert torch.equal(back["t1"], tensor)


def test_fedspine_objects_and_their_bound_methods() -> None:
    bandit = SlidingWindowUCB([0.1, 0.3], [4, 8], window=5)
    arm = bandit.eligible(0.0)[0]
    bandit.history[0] = deque([(arm, 0.5), (arm, -0.25)], maxlen=5)
    bandit.pulls[0] = 2
    model = object()  # live: re-attached by name, never saved
    state = {"policy": bandit, "again": bandit, "choose": bandit.choose, "model": model}
    back = roundtrip(state, live={"model": model})
    assert isinstance(back["policy"], SlidingWindowUCB) and back["policy"] is back["again"]
    assert vars(back["policy"]) == vars(bandit)  # frozen dataclass arms as keys and in tuples included
    assert back["choose"].__self__ is back["policy"] and back["model"] is model
    assert back["choose"](0, 0.0) == bandit.choose(0, 0.0)


@pytest.mark.parametrize(
    ("value", "what"),
    [
        (np.float64(1.0), "numpy.float64"),
        (lambda: 0, "function"),
        ({"deep": [torch.nn.Linear(1, 1)]}, r"state\['x'\]\['deep'\]\[0\]"),
    ],
)
def test_saving_anything_else_names_it(value: Any, what: str) -> None:
    with pytest.raises(CheckpointError, match=what):
        statefile.encode({"x": value}, {})


@pytest.mark.parametrize(
    "data",
    [
        {"$object": "os:system", "$id": 0, "fields": {}},
        {"$object": "builtins:eval", "$id": 0, "fields": {}},
        {"$object": "fedspine.runtime.checkpoint:os", "$id": 0, "fields": {}},  # a module, not a class
        {"$object": "fedspine.runtime.checkpoint:save_file", "$id": 0, "fields": {}},  # imported, not defined
        {"$object": "fedspine.nowhere:X", "$id": 0, "fields": {}},
        {"$method": "__init__", "self": {"$list": [], "$id": 1}, "$id": 0},
        {"$method": "append", "self": {"$list": [], "$id": 1}, "$id": 0},  # a method of a non-fedspine object
        {"$live": "model"},
        {"$tensor": "t0"},
        {"$ref": 5},
        {"$float": "1e999"},
        {"$list": [], "$id": True},
        {"$list": [{"$list": [], "$id": 0}], "$id": 0},  # an id defined twice
        {"$deque": [], "maxlen": -1, "$id": 0},
        {"$bytes": "not base64!", "$id": 0},
        {"$random": {"$tuple": [1], "$id": 1}, "$id": 0},
        {"$unknown": 1, "$id": 0},
        [1, 2],
    ],
)
def test_loading_refuses_what_is_not_plain_state(data: Any) -> None:
    with pytest.raises((CheckpointError, ValueError)):
        statefile.decode(data, {}, {})
