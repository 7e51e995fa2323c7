"""TOML in and out: checked conversion of dicts to the dataclass tree, files, ``--set`` overrides."""

from __future__ import annotations

import dataclasses
import math
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import tomli_w

from fedspine.config.tree import Config
from fedspine.errors import ConfigError
from fedspine.files import CONFIG_LIMIT, InputFileError, read_text

if sys.version_info >= (3, 11):
    import tomllib as tomllib  # re-exported: the deployment reads its TOML through this module
else:  # pragma: no cover
    import tomli as tomllib


# --- dict <-> dataclass ------------------------------------------------------------------------


def _type_name(tp: object) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: object, tp: object, key: str) -> object:
    """Check ``value`` against type ``tp`` and convert it (dicts to dataclasses), naming ``key``."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {type(value).__name__}")
        return _from_dict(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(key, f"got {value!r}; allowed values: {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__}")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__}")
        _, val_tp = get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if not isinstance(tp, type):  # pragma: no cover - every config field has a concrete type
        raise ConfigError(key, f"unsupported field type {tp!r}")
    return _convert_scalar(value, tp, key)


def _convert_scalar(value: object, tp: type, key: str) -> object:
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(key, f"expected {tp.__name__}, got bool {value!r}")
    if isinstance(value, int) and tp in (int, float) and not -(2**63) <= value < 2**63:
        raise ConfigError(key, f"{value} is outside the 64-bit integer range")
    if tp is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, tp):
        raise ConfigError(key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value!r}")
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in data:
        if name not in names:
            where = f"{prefix}.{name}" if prefix else name
            raise ConfigError(where, f"unknown key; allowed keys here: {', '.join(names)}")
    kwargs = {n: _convert(v, hints[n], f"{prefix}.{n}" if prefix else n) for n, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise ConfigError(prefix or "config", str(exc)) from exc


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a TOML-shaped dict."""
    config: Config = _from_dict(Config, data, "")
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """The config as a TOML-shaped dict (every field, defaults included)."""
    return dataclasses.asdict(config)


def to_toml(config: Config) -> str:
    """The resolved config as TOML text."""
    return tomli_w.dumps(to_dict(config))


# --- files and overrides ------------------------------------------------------------------------


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file (a regular file of at most :data:`~fedspine.files.CONFIG_LIMIT` bytes); every
    problem, a syntax error included, becomes a ConfigError naming the file."""
    try:
        return tomllib.loads(read_text(path, CONFIG_LIMIT))
    except InputFileError as exc:
        raise ConfigError(str(path), exc.reason) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML: {exc}") from exc


def config_differences(before: Config, after: Config) -> list[str]:
    """Every key whose value differs between two configs, as ``key: BEFORE -> AFTER`` (sorted)."""
    old, new = _flatten(to_dict(before)), _flatten(to_dict(after))
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    items: list[tuple[str, Any]]
    if isinstance(tree, dict):
        items = list(tree.items())
    elif isinstance(tree, list) and tree and all(isinstance(item, dict) for item in tree):
        items = [(f"[{i}]", item) for i, item in enumerate(tree)]
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        name = f"{prefix}{key}" if key.startswith("[") or not prefix else f"{prefix}.{key}"
        flat.update(_flatten(value, name))
    return flat


def key_parts(key: str) -> list[str]:
    """The path of a dotted key: ``fleet.groups[0].count`` -> ``["fleet", "groups", "0", "count"]``.

    Raises:
        ConfigError: the key is empty.
    """
    parts = [p for p in key.strip().replace("[", ".").replace("]", "").split(".") if p]
    if not parts:
        raise ConfigError(key, "empty key")
    return parts


def parse_override(text: str) -> tuple[list[str], object]:
    """Parse ``a.b.c=value``; the value is read as TOML (``8``, ``1e-3``, ``"x"``, ``[1, 2]``),
    and as a bare string when it is not valid TOML (``strategy.name=fedit``)."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = key_parts(key) if key.strip() else []
    if not parts:
        raise ConfigError(text, "empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_override(data: dict[str, Any], parts: list[str], value: object) -> None:
    """Set ``value`` at the path ``parts`` inside ``data``; list items are addressed by index."""
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        key = ".".join(parts[: depth + 1])
        node = _list_item(node, part, key) if isinstance(node, list) else node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(key, "is a value, not a table")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(parts))] = value
    else:
        node[last] = value


def _list_index(node: list[Any], part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(key, f"list index must be in 0..{len(node) - 1}")
    return int(part)


def _list_item(node: list[Any], part: str, key: str) -> Any:
    return node[_list_index(node, part, key)]


def load_config(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config (or, with no file, the built-in default experiment), apply ``--set``
    overrides, validate.

    Overrides are applied to the raw values before validation, so the same errors apply.
    ``configs/default.toml`` is a copy of the built-in default (a test keeps them equal).
    """
    data = read_toml(path) if path is not None else to_dict(Config())
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(data, parts, value)
    return from_dict(data)
