"""Which resident pages leave the DEVICE tier when room is needed.

Only pages already stored in the pool may leave (invariant 2), and never a page the
layer being computed reads: the cache passes those as `candidates`. A policy sees
every use and every arrival as a logical clock tick (one tick per layer attended)
and picks victims among the candidates.

A new policy is one subclass plus `@register_eviction("name")`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from speckv.registry import Registry


class EvictionPolicy(ABC):
    name: str = ""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots

    def on_use(self, slots: np.ndarray, clock: int) -> None:
        """`slots` were read by attention at `clock`."""

    def on_arrival(self, slots: np.ndarray, clock: int) -> None:
        """`slots` became resident (allocated, or fetched from the pool) at `clock`."""

    @abstractmethod
    def victims(self, candidates: np.ndarray, n: int) -> np.ndarray:
        """The `n` slots to evict among the `candidates` (bool [num_slots], >= n True)."""


class _Stamped(EvictionPolicy):
    """Evicts the candidates with the oldest stamp."""

    def __init__(self, num_slots: int) -> None:
        super().__init__(num_slots)
        self.stamp = np.zeros(num_slots, dtype=np.int64)

    def victims(self, candidates: np.ndarray, n: int) -> np.ndarray:
        ids = np.flatnonzero(candidates)
        if n < ids.size:
            ids = ids[np.argpartition(self.stamp[ids], n - 1)[:n]]
        return ids


EVICTIONS: Registry[type[EvictionPolicy]] = Registry("eviction policy")
register_eviction = EVICTIONS.register


@register_eviction("lru")
class LRU(_Stamped):
    """Least recently used (CXL-SpecKV's L1 policy)."""

    def on_use(self, slots: np.ndarray, clock: int) -> None:
        self.stamp[slots] = clock

    def on_arrival(self, slots: np.ndarray, clock: int) -> None:
        self.stamp[slots] = clock


@register_eviction("fifo")
class FIFO(_Stamped):
    """First in, first out: the page resident the longest leaves first."""

    def on_arrival(self, slots: np.ndarray, clock: int) -> None:
        self.stamp[slots] = clock


def make_eviction(name: str, num_slots: int) -> EvictionPolicy:
    return EVICTIONS.get(name)(num_slots)
