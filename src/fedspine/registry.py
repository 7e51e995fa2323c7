"""Explicit name -> factory registries; configs and the CLI resolve names only through them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from fedspine.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories, e.g. every strategy fedspine knows.

    Example:
        >>> STRATEGIES: Registry[type] = Registry("strategy")
        >>> @STRATEGIES.register("fedit")
        ... class FedIT: ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; a name can be registered once."""

        def decorate(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = obj
            return obj

        return decorate

    def get(self, name: str, key: str) -> T:
        """Look ``name`` up; an unknown name raises a ConfigError for config key ``key``."""
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "(none registered)"
            raise ConfigError(key, f"unknown {self.kind} '{name}'; known: {known}")
        return self._entries[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
