"""Paths into a TOML-shaped config dict (keys and list indexes), for tests that mutate one value."""

from __future__ import annotations

import copy
from typing import Any


def lookup(tree: Any, path: tuple[Any, ...]) -> Any:
    """The value at ``path``."""
    for key in path:
        tree = tree[key]
    return tree


def replaced(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A deep copy of ``tree`` with ``value`` at ``path``."""
    tree = copy.deepcopy(tree)
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return tree
