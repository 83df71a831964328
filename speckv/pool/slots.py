"""A fixed set of equal slots handed out and taken back by id (numpy, no torch)."""

from __future__ import annotations

import numpy as np


class SlotAllocator:
    """Free-stack allocator over slot ids; batched, O(n) per call.

    It owns `num_slots` ids, [first, first + num_slots), of an id space of `arena` ids
    (default: just its own) that other allocators may share: `exchange` trades an id
    in use here for one that was another's, so two allocators over one arena can hand
    a slot over without copying what is in it.
    """

    def __init__(self, num_slots: int, first: int = 0, arena: int | None = None) -> None:
        arena = first + num_slots if arena is None else arena
        if first + num_slots > arena:
            raise ValueError(f"slots [{first}, {first + num_slots}) do not fit an arena of {arena}")
        self.num_slots = num_slots
        self._free = np.arange(first, first + num_slots, dtype=np.int64)[::-1].copy()  # lowest first
        self._top = num_slots
        self._in_use = np.zeros(arena, dtype=bool)

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

    def exchange(self, give: np.ndarray, take: np.ndarray) -> None:
        """Ids `give` (in use here) leave this allocator and ids `take` (none of its,
        in use or free) take their places, in use: the counts do not change."""
        give, take = np.asarray(give, dtype=np.int64), np.asarray(take, dtype=np.int64)
        if give.size != take.size or not self._in_use[give].all() or self._in_use[take].any():
            raise RuntimeError("bug: exchanged slots must be in use here for ids not in use here")
        self._in_use[give] = False
        self._in_use[take] = True

    def in_use(self, slot: int) -> bool:
        return bool(0 <= slot < self._in_use.size and self._in_use[slot])
