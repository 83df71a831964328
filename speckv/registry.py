"""Name -> class registries for the pluggable parts (codecs, pool backends, eviction, ...).

A new implementation is one class plus one decorator line; an unknown or duplicate
name raises `ValueError` listing the known names.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Implementations of one kind, by name, in registration order."""

    def __init__(self, kind: str, load: Callable[[], None] | None = None) -> None:
        """`load` imports the modules whose classes register themselves, on first lookup."""
        self.kind = kind
        self._items: dict[str, T] = {}
        self._load = load

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: registers the class under `name` and sets its `name`."""

        def add(item: T) -> T:
            self.add(name, item)
            item.name = name
            return item

        return add

    def add(self, name: str, item: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._items

    def get(self, name: str) -> T:
        self._ensure_loaded()
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._items[name]

    def _ensure_loaded(self) -> None:
        if self._load is not None:
            load, self._load = self._load, None
            load()
