"""Name -> implementation registries for the pluggable parts (codecs, pool backends,
selectors, eviction policies, predictors).

A registry knows its built-in implementations by module path (`"speckv.codecs.quant:
Int8Codec"`) and imports one only when it is first asked for by name, so listing the
names (help texts, validation) imports nothing, and a new built-in is one class plus
one line in its registry's table. Code outside speckv registers its own with the
`register` decorator. An unknown or duplicate name raises `ValueError` listing the
known names.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Implementations of one kind, by name."""

    def __init__(self, kind: str, builtin: dict[str, str] | None = None) -> None:
        """`builtin`: name -> "module:attribute" of the implementations that ship with
        speckv, imported on first lookup of their name."""
        self.kind = kind
        self._paths = dict(builtin or {})
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: registers the class under `name` and sets its `name`."""

        def add(item: T) -> T:
            self.add(name, item)
            return item

        return add

    def add(self, name: str, item: T) -> None:
        if name in self._items or name in self._paths:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._set(name, item)

    def names(self) -> list[str]:
        return sorted({*self._paths, *self._items})

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self._paths

    def get(self, name: str) -> T:
        if name not in self._items:
            path = self._paths.get(name)
            if path is None:
                raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
            module, _, attribute = path.partition(":")
            self._set(name, getattr(importlib.import_module(module), attribute))
        return self._items[name]

    def _set(self, name: str, item: T) -> None:
        if isinstance(item, type):
            item.name = name
        self._items[name] = item
