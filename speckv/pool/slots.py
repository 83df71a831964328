"""A fixed set of equal slots handed out and taken back by id (numpy, no torch)."""

from __future__ import annotations

import numpy as np


class SlotAllocator:
    """Free-stack allocator over slot ids [0, num_slots); batched, O(n) per call."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = np.arange(num_slots, dtype=np.int64)[::-1].copy()  # pop lowest first
        self._top = num_slots
        self._in_use = np.zeros(num_slots, dtype=bool)

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.num_slots - self._top

    def allocate(self, n: int) -> np.ndarray | None:
        """Takes `n` slots, or returns None (nothing taken) if fewer are free."""
        if n > self._top:
            return None
        ids = self._free[self._top - n:self._top][::-1].copy()
        self._top -= n
        self._in_use[ids] = True
        return ids

    def free(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        if not self._in_use[ids].all() or np.unique(ids).size != ids.size:
            raise RuntimeError("bug: a slot was freed twice or was never allocated")
        self._in_use[ids] = False
        self._free[self._top:self._top + ids.size] = ids[::-1]
        self._top += ids.size

    def in_use(self, slot: int) -> bool:
        return bool(0 <= slot < self.num_slots and self._in_use[slot])
