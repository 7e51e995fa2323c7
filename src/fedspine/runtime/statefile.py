"""A run's state as JSON: an object graph that can be saved and loaded without running code.

A checkpoint holds the strategy, scheduler, codecs and the engine's counters: a graph of fedspine
objects, builtin containers, tensors, ``random.Random`` states and references to the live model and
data. :func:`encode` turns that graph into plain JSON values plus a dictionary of tensors (saved as
safetensors); :func:`decode` rebuilds it. Unlike pickle, loading can only ever

* create instances of classes defined in a ``fedspine.*`` module (by ``object.__new__`` and their
  ``__dict__``: no constructor, no ``__reduce__``, no ``__setstate__`` runs),
* build ``list``/``tuple``/``dict``/``set``/``frozenset``/``OrderedDict``/``deque``/``bytes`` and a
  ``random.Random`` from its state,
* look up a tensor in the safetensors file or a live object by the name the saver gave it,
* bind a public method of a fedspine object.

Identity is preserved: an object reached twice (the policy held by the strategy and the scheduler, a
container shared by two objects) is written once and referred to by ``{"$ref": id}``, so a loaded
graph shares exactly what the saved one did, cycles included. Floats keep their exact value (JSON's
shortest round-trip repr; ``inf``/``nan`` tagged) and ints their full size.

Anything else met while saving — a lambda, a numpy array, a class from another package — is an error
that names the path to it, so a new kind of state cannot silently be dropped from checkpoints.
"""

from __future__ import annotations

import base64
import importlib
import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from types import MethodType
from typing import Any, TypeVar, cast

import torch

from fedspine.errors import CheckpointError
from fedspine.files import JSON

_T = TypeVar("_T")

_PREFIX = "fedspine."
_SPECIAL_FLOATS: dict[object, float] = {  # looked up with any JSON value
    "inf": math.inf,
    "-inf": -math.inf,
    "nan": math.nan,
}


def _float_tag(x: float) -> JSON:
    if math.isfinite(x):
        return x
    return {"$float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


class _Encoder:
    def __init__(self, live: Mapping[int, str]) -> None:
        self.live = live
        self.tensors: dict[str, torch.Tensor] = {}
        self._tensor_keys: dict[int, str] = {}
        self._ids: dict[int, int] = {}
        self._kept: list[object] = []  # keeps every encoded object alive, so no id() is reused meanwhile

    def encode(self, obj: object, path: str) -> JSON:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if type(obj) is int:
            return obj
        if type(obj) is float:
            return _float_tag(obj)
        if id(obj) in self.live:
            return {"$live": self.live[id(obj)]}
        if isinstance(obj, torch.Tensor):
            return {"$tensor": self._tensor(obj)}
        if id(obj) in self._ids:
            return {"$ref": self._ids[id(obj)]}
        ref = self._ids[id(obj)] = len(self._ids)
        self._kept.append(obj)
        body = self._body(obj, path)
        body["$id"] = ref
        return body

    def _tensor(self, tensor: torch.Tensor) -> str:
        key = self._tensor_keys.get(id(tensor))
        if key is None:
            key = self._tensor_keys[id(tensor)] = f"t{len(self._tensor_keys)}"
            self.tensors[key] = tensor.detach().cpu().clone().contiguous()
            self._kept.append(tensor)
        return key

    def _items(self, items: Iterable[object], path: str) -> list[JSON]:
        return [self.encode(x, f"{path}[{i}]") for i, x in enumerate(items)]

    def _body(self, obj: object, path: str) -> dict[str, JSON]:
        kind = type(obj)
        if type(obj) is list:
            return {"$list": self._items(obj, path)}
        if type(obj) is tuple:
            return {"$tuple": self._items(obj, path)}
        if type(obj) is set or type(obj) is frozenset:
            return {"$set" if kind is set else "$frozenset": self._items(_sorted(obj), path)}
        if type(obj) is dict or type(obj) is OrderedDict:
            pairs: list[JSON] = [
                [self.encode(k, f"{path}.key"), self.encode(v, f"{path}[{k!r}]")] for k, v in obj.items()
            ]
            return {"$dict" if kind is dict else "$ordereddict": pairs}
        if type(obj) is deque:
            return {"$deque": self._items(obj, path), "maxlen": obj.maxlen}
        if type(obj) is bytes:
            return {"$bytes": base64.b64encode(obj).decode("ascii")}
        if type(obj) is random.Random:
            return {"$random": self.encode(obj.getstate(), f"{path}.state")}
        if isinstance(obj, MethodType) and not obj.__name__.startswith("_"):
            return {"$method": obj.__name__, "self": self.encode(obj.__self__, f"{path}.__self__")}
        if kind.__module__.startswith(_PREFIX) and "." not in kind.__qualname__ and hasattr(obj, "__dict__"):
            fields = {name: self.encode(v, f"{path}.{name}") for name, v in vars(obj).items()}
            return {"$object": f"{kind.__module__}:{kind.__qualname__}", "fields": fields}
        raise CheckpointError(f"cannot save {path} in a checkpoint: {kind.__module__}.{kind.__qualname__}")


def _sorted(values: Iterable[Any]) -> list[Any]:
    """A set's items in a stable order where they can be ordered (so equal states write equal files)."""
    items = list(values)
    try:
        return sorted(items)
    except TypeError:
        return items


def encode(state: object, live: Mapping[int, str]) -> tuple[JSON, dict[str, torch.Tensor]]:
    """``state`` as JSON values and the tensors they refer to by key.

    ``live`` maps ``id()`` of objects that are not saved but re-attached on load to their names.
    """
    encoder = _Encoder(live)
    return encoder.encode(state, "state"), encoder.tensors


class _Decoder:
    def __init__(self, live: Mapping[str, object], tensors: Mapping[str, torch.Tensor]) -> None:
        self.live = live
        self.tensors = tensors
        self._objects: dict[object, object] = {}  # keyed by ref (an int), looked up with any JSON value

    def decode(self, data: JSON) -> object:
        if data is None or isinstance(data, (bool, str, int, float)):
            return data
        if isinstance(data, list):
            raise CheckpointError("a bare list in a checkpoint's state (containers are tagged)")
        if not isinstance(data, dict):
            raise CheckpointError(f"unexpected {type(data).__name__} in a checkpoint's state")
        if "$float" in data:
            value = data["$float"]
            if value not in _SPECIAL_FLOATS:
                raise CheckpointError(f"unknown float {value!r} in a checkpoint's state")
            return _SPECIAL_FLOATS[value]
        if "$live" in data:
            name = data["$live"]
            if name not in self.live:
                raise CheckpointError(f"the checkpoint refers to {name!r}, which this run does not have")
            return self.live[cast(str, name)]  # a key of live: a str
        if "$tensor" in data:
            key = data["$tensor"]
            if key not in self.tensors:
                raise CheckpointError(f"the checkpoint refers to a tensor {key!r} it does not hold")
            return self.tensors[cast(str, key)]  # a key of tensors: a str
        if "$ref" in data:
            if data["$ref"] not in self._objects:
                raise CheckpointError(f"the checkpoint refers to object {data['$ref']!r} before defining it")
            return self._objects[data["$ref"]]
        ref = data.get("$id")
        if not isinstance(ref, int) or isinstance(ref, bool) or ref in self._objects:
            raise CheckpointError(f"bad or repeated object id {ref!r} in a checkpoint's state")
        return self._build(data, ref)

    def _register(self, ref: int, obj: _T) -> _T:
        self._objects[ref] = obj
        return obj

    def _list(self, data: dict[str, JSON], key: str) -> list[object]:
        items = data[key]
        if not isinstance(items, list):
            raise CheckpointError(f"{key} in a checkpoint's state is not a list")
        return [self.decode(x) for x in items]

    def _build(self, data: dict[str, JSON], ref: int) -> object:
        # Mutable containers and objects are registered before their contents are decoded, so a
        # reference back to them from inside (a cycle) finds them.
        if "$list" in data:
            out: list[object] = self._register(ref, [])
            out.extend(self._list(data, "$list"))
            return out
        if "$dict" in data or "$ordereddict" in data:
            key = "$dict" if "$dict" in data else "$ordereddict"
            mapping: dict[object, object] = self._register(ref, {} if key == "$dict" else OrderedDict())
            pairs = data[key]
            if not isinstance(pairs, Iterable):  # what iterating it raises
                raise TypeError(f"'{type(pairs).__name__}' object is not iterable")
            for pair in pairs:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise CheckpointError("a dictionary entry in a checkpoint's state is not a pair")
                mapping[self.decode(pair[0])] = self.decode(pair[1])
            return mapping
        if "$set" in data:
            members: set[object] = self._register(ref, set())
            members.update(self._list(data, "$set"))
            return members
        if "$deque" in data:
            maxlen = data.get("maxlen")
            if maxlen is not None and (not isinstance(maxlen, int) or maxlen < 0):
                raise CheckpointError(f"bad deque length {maxlen!r} in a checkpoint's state")
            queue: deque[object] = self._register(ref, deque(maxlen=maxlen))
            queue.extend(self._list(data, "$deque"))
            return queue
        if "$object" in data:
            return self._object(data, ref)
        if "$method" in data:
            return self._register(ref, self._method(data))
        builders: dict[str, Callable[[dict[str, JSON]], object]] = {
            "$tuple": lambda d: tuple(self._list(d, "$tuple")),
            "$frozenset": lambda d: frozenset(self._list(d, "$frozenset")),
            "$bytes": lambda d: base64.b64decode(str(d["$bytes"]), validate=True),
            "$random": self._random,
        }
        for key, build in builders.items():
            if key in data:
                return self._register(ref, build(data))
        raise CheckpointError(f"unknown entry {sorted(data)!r} in a checkpoint's state")

    def _random(self, data: dict[str, JSON]) -> random.Random:
        rng = random.Random()
        try:
            state: Any = self.decode(data["$random"])  # checked by Random.setstate itself
            rng.setstate(state)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"bad random state in a checkpoint: {exc}") from exc
        return rng

    def _method(self, data: dict[str, JSON]) -> MethodType:
        name = data["$method"]
        if not isinstance(name, str) or name.startswith("_"):
            raise CheckpointError(f"the checkpoint asks for attribute {name!r}")
        owner = self.decode(data["self"])
        if not type(owner).__module__.startswith(_PREFIX):
            raise CheckpointError(f"the checkpoint asks for {name!r} of a {type(owner).__name__}")
        method = getattr(owner, name, None)
        if not isinstance(method, MethodType):
            raise CheckpointError(f"the checkpoint asks for {name!r}, which is not a method")
        return method

    def _object(self, data: dict[str, JSON], ref: int) -> object:
        cls = _fedspine_class(data["$object"])
        fields = data.get("fields")
        if not isinstance(fields, dict):
            raise CheckpointError(f"the fields of a {cls.__name__} in a checkpoint are not a mapping")
        obj: object = self._register(ref, object.__new__(cls))  # no constructor, no custom __new__
        try:
            attributes = vars(obj)
        except TypeError as exc:
            raise CheckpointError(f"a {cls.__name__} has no attributes to restore") from exc
        attributes.update({str(name): self.decode(value) for name, value in fields.items()})
        return obj


def _fedspine_class(name: JSON) -> type:
    """The class ``module:Name`` if it is one defined in a fedspine module; never anything else."""
    if not isinstance(name, str) or name.count(":") != 1:
        raise CheckpointError(f"a checkpoint may not refer to {name!r}")
    module_name, attr = name.split(":")
    if not module_name.startswith(_PREFIX) or not attr.isidentifier():
        raise CheckpointError(f"a checkpoint may not refer to {name}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckpointError(f"a checkpoint refers to {name}, which does not exist") from exc
    found = getattr(module, attr, None)
    if not isinstance(found, type) or found.__module__ != module_name:
        raise CheckpointError(f"a checkpoint may not refer to {name}")
    return found


def decode(data: JSON, live: Mapping[str, object], tensors: Mapping[str, torch.Tensor]) -> object:
    """The object graph :func:`encode` wrote, with ``live`` objects and ``tensors`` re-attached."""
    return _Decoder(live, tensors).decode(data)
