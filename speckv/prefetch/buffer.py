"""The PREFETCH tier: decoded pages fetched ahead of use, in a budget of their own.

Pages here are keyed by their pool key. A transfer is two-step:

    prepare(keys)  -> reserves slots (in flight); the worker reads and decodes into them
    complete(t)    -> READY, or the slots are released (cancelled or failed)

so a cancelled or failed prefetch never leaves a page half-present. A READY page is
taken by the step that demands it (its slot handed over to DEVICE: promoted) or
dropped unused — oldest first, when room is needed — and counted as wasted. DEVICE
pages are never evicted for a prefetch: the two budgets are separate.

A page's state is kept in arrays indexed by pool key (a decode step moves thousands
of pages; one Python object each would cost more than the copies):

    slot[key]      its PREFETCH slot, -1: not here
    transfer[key]  the transfer bringing it, -1: READY (or not here)

A page removed while in flight (its pool page freed, or overtaken by a step that
fetched it itself) is forgotten at once; its slot is released when its transfer ends.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

import numpy as np

from speckv.kv.page_pool import DevicePagePool


class PageState(enum.IntEnum):
    """Where a page is in the PREFETCH tier, ordered by how far it has come."""

    ABSENT = 0
    QUEUED = 1  # reserved; the worker has not begun its transfer
    MOVING = 2  # the worker is reading and decoding it
    READY = 3


@dataclass(eq=False)
class Transfer:
    """Pages the worker moves together (one prepare)."""

    id: int
    keys: np.ndarray  # [n] int64 pool keys
    slots: np.ndarray  # [n] int64 PREFETCH slots
    source: int  # the predictor that asked (the prefetcher's index for its name)
    started: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class PrefetchBuffer:
    """PREFETCH slots (the DEVICE page layout) and the pages in them; thread-safe."""

    def __init__(self, pages: DevicePagePool, num_keys: int) -> None:
        """`num_keys`: the pool's slot count (pool keys are below it)."""
        self.pages = pages
        self._lock = threading.Lock()
        self._slot = np.full(num_keys, -1, dtype=np.int64)
        self._transfer = np.full(num_keys, -1, dtype=np.int64)
        self._source = np.zeros(num_keys, dtype=np.int64)
        self._age = np.zeros(num_keys, dtype=np.int64)  # prepare order: oldest dropped first
        self._transfers: dict[int, Transfer] = {}  # in flight, by id
        self._next_id = 0

    @property
    def num_slots(self) -> int:
        return self.pages.num_pages

    @property
    def num_used(self) -> int:
        return self.pages.num_used_pages

    def keys(self) -> list[int]:
        with self._lock:
            return np.flatnonzero(self._slot >= 0).tolist()

    def state(self, key: int) -> PageState:
        with self._lock:
            if self._slot[key] < 0:
                return PageState.ABSENT
            t = self._transfers.get(int(self._transfer[key]))
            if t is None:
                return PageState.READY
            return PageState.MOVING if t.started else PageState.QUEUED

    def num_in_flight(self) -> int:
        with self._lock:
            return int(((self._slot >= 0) & (self._transfer >= 0)).sum())

    # ------------------------------------------------------------ engine thread

    def prepare(self, keys: np.ndarray, source: int) -> tuple[Transfer | None, np.ndarray, int]:
        """Reserves slots for `keys` not already here, dropping the oldest READY pages to
        make room (never one in flight).

        Returns:
            (the transfer of the new pages — fewer than asked when the tier is full of
            pages in flight; None when there are none, the sources of the dropped READY
            pages: wasted, how many keys found no room).
        """
        with self._lock:
            keys = np.unique(keys)
            keys = keys[self._slot[keys] < 0]
            short = keys.size - self.pages.num_free_pages
            dropped = np.zeros(0, dtype=np.int64)
            if short > 0:
                ready = np.flatnonzero((self._slot >= 0) & (self._transfer < 0))
                oldest = ready[np.argsort(self._age[ready], kind="stable")[:short]]
                dropped = self._remove(oldest)
            n = min(keys.size, self.pages.num_free_pages)
            no_room, keys = keys.size - n, keys[:n]
            if n == 0:
                return None, dropped, no_room
            t = Transfer(self._next_id, keys, self.pages.allocate(n), source)
            self._next_id += 1
            self._slot[keys] = t.slots
            self._transfer[keys] = t.id
            self._source[keys] = source
            self._age[keys] = t.id
            self._transfers[t.id] = t
            return t, dropped, no_room

    def claim(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Transfer]]:
        """Overtakes the demanded pages whose transfer has not begun (forgotten here: the
        step fetches them itself) and finds the transfers under way that it must wait for.

        Returns:
            (the overtaken pages' sources, the moving pages' keys, their transfers).
        """
        with self._lock:
            here = keys[self._slot[keys] >= 0]
            tids = self._transfer[here]
            flying, tids = here[tids >= 0], tids[tids >= 0]
            waits = [self._transfers[i] for i in np.unique(tids).tolist()
                     if self._transfers[i].started]  # per transfer, not per page
            started = np.isin(tids, [t.id for t in waits])
            overtaken = self._remove(flying[~started])
            return overtaken, flying[started], waits

    def take(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Removes the READY pages of `keys` (none may be in flight: `claim` and wait
        first); the caller hands their slots over (`exchange`).

        Returns:
            ([n] bool: READY here, the PREFETCH slots of those, their sources).
        """
        with self._lock:
            slots = self._slot[keys]
            hit = slots >= 0
            if (self._transfer[keys[hit]] >= 0).any():
                raise RuntimeError("bug: a page in flight was taken")
            taken = keys[hit]
            sources = self._source[taken]
            self._slot[taken] = -1
            return hit, slots[hit], sources

    def exchange(self, taken: np.ndarray, given: np.ndarray) -> None:
        """Taken pages' slots went to DEVICE, which gave the free slots `given` for them."""
        with self._lock:
            self.pages.exchange(taken, given)
            self.pages.free(given)

    def forget(self, keys: np.ndarray) -> np.ndarray:
        """Drops `keys` (their pages were freed): READY slots are released now, those in
        flight when their transfer ends. Returns the dropped pages' sources (wasted)."""
        with self._lock:
            return self._remove(keys[self._slot[keys] >= 0])

    def _remove(self, keys: np.ndarray) -> np.ndarray:
        """Forgets pages here; frees the READY ones' slots. Returns their sources."""
        ready = keys[self._transfer[keys] < 0]
        if ready.size:
            self.pages.free(self._slot[ready])
        self._slot[keys] = -1
        self._transfer[keys] = -1  # an in-flight one is no longer its transfer's
        return self._source[keys]

    # ------------------------------------------------------------ worker thread

    def begin(self, t: Transfer) -> tuple[np.ndarray, np.ndarray]:
        """The worker starts `t`: returns the keys and slots still wanted (a step that
        demands one of them from now on waits for it instead of overtaking it)."""
        with self._lock:
            t.started = True
            mine = self._transfer[t.keys] == t.id
            return t.keys[mine], t.slots[mine]

    def still_wanted(self, t: Transfer, keys: np.ndarray) -> bool:
        """Whether none of `t`'s `keys` was forgotten since `begin`."""
        with self._lock:
            return bool((self._transfer[keys] == t.id).all())

    def complete(self, t: Transfer, ok: bool) -> None:
        """Commits `t`'s pages (READY), or releases their slots (failed, or forgotten
        in flight), then wakes the steps waiting for them."""
        with self._lock:
            mine = self._transfer[t.keys] == t.id
            if ok:
                self._transfer[t.keys[mine]] = -1
                released = t.slots[~mine]
            else:
                self._slot[t.keys[mine]] = -1
                self._transfer[t.keys[mine]] = -1
                released = t.slots
            if released.size:
                self.pages.free(released)
            del self._transfers[t.id]
        t.done.set()
