"""The PREFETCH tier: decoded pages fetched ahead of use, in a budget of their own.

Pages here are keyed by their pool key. A transfer is two-step:

    prepare(keys)  -> reserves slots (IN_FLIGHT); the worker reads and decodes into them
    complete(e)    -> READY, or the slot is released (cancelled or failed)

so a cancelled or failed prefetch never leaves a page half-present. A READY page is
taken by the step that demands it (then copied into a DEVICE slot: promoted) or
dropped unused — first, when room is needed — and counted as wasted. DEVICE pages are
never evicted for a prefetch: the two budgets are separate.
"""

from __future__ import annotations

import enum
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from speckv.kv.page_pool import DevicePagePool


class EntryState(enum.IntEnum):
    IN_FLIGHT = 0
    READY = 1


@dataclass(slots=True, eq=False)
class Entry:
    """One page on its way into (or in) the PREFETCH tier."""

    key: int  # its pool key
    slot: int  # its PREFETCH slot
    source: str  # the predictor that asked for it
    state: EntryState = EntryState.IN_FLIGHT
    started: bool = False  # the worker has begun its transfer
    cancelled: bool = False  # freed, or overtaken, while in flight: release on completion
    done: threading.Event | None = None  # set when its transfer (shared by a batch) ends


class PrefetchBuffer:
    """PREFETCH slots (the DEVICE page layout) and the pages in them; thread-safe."""

    def __init__(self, pages: DevicePagePool) -> None:
        self.pages = pages
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # by key, oldest first

    @property
    def num_slots(self) -> int:
        return self.pages.num_pages

    @property
    def num_used(self) -> int:
        return self.pages.num_used_pages

    def keys(self) -> list[int]:
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: int) -> bool:
        return key in self._entries

    def prepare(self, keys: list[int], source: str) -> tuple[list[Entry], list[Entry], int]:
        """Reserves slots for `keys` not already here, dropping the oldest READY pages to
        make room (never an IN_FLIGHT one).

        Returns:
            (the new IN_FLIGHT entries — fewer than asked when the tier is full of
            pages in flight, the dropped READY entries: wasted, how many keys found no
            room).
        """
        with self._lock:
            keys = [k for k in dict.fromkeys(keys) if k not in self._entries]
            dropped = []
            short = len(keys) - self.pages.num_free_pages
            if short > 0:
                for entry in list(self._entries.values()):
                    if len(dropped) == short:
                        break
                    if entry.state == EntryState.READY:
                        dropped.append(self._pop(entry))
            no_room = max(0, len(keys) - self.pages.num_free_pages)
            keys = keys[:self.pages.num_free_pages]
            slots = self.pages.allocate(len(keys))
            done = threading.Event()  # one per transfer: cheaper than one per page
            entries = [Entry(k, s, source, done=done) for k, s in zip(keys, slots.tolist())]
            for e in entries:
                self._entries[e.key] = e
            return entries, dropped, no_room

    def complete(self, entries: list[Entry], ok: bool) -> None:
        """Commits a transfer's pages (READY), or releases their slots (failed, or
        cancelled), then wakes the steps waiting for them."""
        with self._lock:
            released = []
            for entry in entries:
                if entry.cancelled or not ok:
                    if self._entries.get(entry.key) is entry:
                        del self._entries[entry.key]
                    released.append(entry.slot)
                else:
                    entry.state = EntryState.READY
            if released:
                self.pages.free(np.array(released))
        for done in {id(e.done): e.done for e in entries}.values():
            done.set()

    def begin(self, entries: list[Entry]) -> list[Entry]:
        """The worker starts a transfer: returns the entries still wanted, now `started`
        (a step that demands one of them waits for it instead of overtaking it)."""
        with self._lock:
            live = [e for e in entries if not e.cancelled]
            for e in live:
                e.started = True
            return live

    def take(self, keys: list[int]) -> tuple[list[Entry | None], list[Entry]]:
        """Removes and returns the entries of `keys` (None where a key is not here); the
        caller waits for IN_FLIGHT ones (`entry.done`), copies, then `release`s them.

        An entry whose transfer has not begun is overtaken instead: cancelled (its slot
        is released when the worker reaches it) and returned as None, so a demanding
        step fetches the page itself rather than wait behind the worker's queue.

        Returns:
            (the entries, the overtaken ones).
        """
        with self._lock:
            out, overtaken = [], []
            for k in keys:
                entry = self._entries.pop(k, None)
                if entry is not None and not entry.started:
                    entry.cancelled = True
                    overtaken.append(entry)
                    entry = None
                out.append(entry)
            return out, overtaken

    def release(self, entries: list[Entry]) -> None:
        """Frees the slots of taken entries."""
        if entries:
            with self._lock:
                self.pages.free(np.array([e.slot for e in entries]))

    def forget(self, keys: list[int]) -> list[Entry]:
        """Drops `keys` (their pages were freed): READY slots are released now, IN_FLIGHT
        ones when their transfer completes. Returns the dropped entries (wasted)."""
        with self._lock:
            dropped = []
            for k in keys:
                entry = self._entries.get(k)
                if entry is not None:
                    dropped.append(self._pop(entry))
            return dropped

    def _pop(self, entry: Entry) -> Entry:
        del self._entries[entry.key]
        if entry.state == EntryState.READY:
            self.pages.free(np.array([entry.slot]))
        else:
            entry.cancelled = True
        return entry

    def num_in_flight(self) -> int:
        with self._lock:
            return sum(e.state == EntryState.IN_FLIGHT for e in self._entries.values())
