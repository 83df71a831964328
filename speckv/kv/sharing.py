"""Prefix caching in the cache manager: how shared pages join, leave and give room.

`KVCacheManager`'s methods for the pages that `speckv.kv.prefix.PrefixCache` shares,
kept in their own module (the manager is their only user and owns every array they
touch). Where a shared page lives, per tier:

    no pool     every page table that shares it names the same DEVICE slots
    pool        its pool rows: read in place, or fetched into DEVICE slots of the
                reader's own when copying; the sink page (kept in DEVICE) by its slots

A page is offered for sharing as soon as it can be (sealed without a pool, stored
with one; what is still in the residual window is stored when its sequence ends).
Idle pages are room: they are taken back, least recently released first, before
anything would be evicted or refused.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import numpy as np

from speckv.kv.prefix import CachedPage, PageKey
from speckv.pool.base import PoolUnavailable

if TYPE_CHECKING:
    from speckv.kv.cache import PageTable, RequestId

logger = logging.getLogger(__name__)

_CACHE = -2  # `_owner` of a DEVICE slot that the prefix cache shares


class SharedPages:
    """Mixin of `KVCacheManager`: reuse, registration and reclaim of shared pages."""

    def reuse_prefix(self, request_id: RequestId, keys: list[PageKey]) -> int:
        """Gives a sequence without pages the longest cached prefix of `keys` (the keys of
        its full pages that need not be computed: the last token always is). Returns the
        tokens it reuses: 0 without prefix caching, a hit, or room for it.

        Shared pages cost nothing in DEVICE without a pool (every table names the same
        slots); with one, the table reads their pool rows (in place, or fetched into slots
        of its own when copying), so it commits DEVICE room as for any stored page."""
        if self.prefix is None:
            return 0
        table = self._tables.get(request_id)
        if table is not None and table.num_pages:
            return 0
        pages = self.prefix.lookup(keys)
        held = len(pages) < len(keys) and self.store is not None and \
            self.store.backend.shares_pages
        if held:  # acquired first: making room for adopted pages must not drop them
            self.prefix.acquire(pages)
            pages += self._adopt(table, keys, len(pages))
        growth = self._attach_growth(table, len(pages)) if pages else None
        if growth is None:
            if held:
                self.prefix.release(pages)
            return 0
        if not held:
            self.prefix.acquire(pages)
        table = table or self._new_table(request_id)
        self._attach(table, pages, growth)
        return len(pages) * self.page_size

    def _adopt(self, table: PageTable | None, keys: list[PageKey], have: int) -> list[CachedPage]:
        """Pages after the first `have` of `keys` that other engines offered (a shared pool's
        `adopt`), as many as fit beside the table's, registered (refs 1: the table's)."""
        n = len(keys) - have
        while n and self._attach_growth(table, have + n) is None:
            n //= 2
        layers = self.num_layers
        self._make_pool_room(n * layers)
        n = min(n, self.store.backend.num_free // layers)
        if not n:
            return []
        pool_keys, extras = self.store.backend.adopt(self.prefix.root, keys[have:have + n],
                                                     layers, self.summaries.slot_bytes)
        ids = self.summaries.allocate(pool_keys.size).reshape(pool_keys.shape)
        self.summaries.from_bytes(ids, extras)
        pages = [CachedPage(keys[have + i], np.full(layers, -1, dtype=np.int64), pool_keys[i], ids[i])
                 for i in range(len(pool_keys))]
        for page in pages:
            self.prefix.add(page)
        self.prefix.counters.pages_adopted += len(pages)
        return pages

    def _attach(self, table: PageTable, pages: list[CachedPage], growth: tuple[int, int]) -> None:
        h = len(pages)
        slots = np.stack([p.slots for p in pages], axis=1)  # [L, h]
        keys = np.stack([p.pool_keys for p in pages], axis=1)
        entries = slots if self.store is None else \
            np.where(slots >= 0, slots, -1 - self._rows(np.maximum(keys, 0)))
        table.num_pages = h
        table.pool_keys[:, :h] = keys
        table.set_slots(slice(None), slice(0, h), entries)
        table.set_summary_ids(slice(0, h), np.stack([p.summary_ids for p in pages], axis=1))
        table.cached = list(pages)
        if self.store is not None:
            table.num_stored = max(0, h - self.store.first_stored)
            self.num_evicted += int((entries < 0).sum())
            self._set_requirement(table, growth[0])
            self._add_pool_pages(table, 0, growth[1])

    def cache_pages(self, request_id: RequestId, keys: list[PageKey], num_tokens: int) -> None:
        """Registers the sequence's sealed pages that can be shared, given `keys` (its page
        keys, at least those of its first `num_tokens // page_size` pages) when its first
        `num_tokens` tokens are computed: without a pool, every sealed page (its DEVICE slots);
        with one, every stored page (its pool keys) and the sink page (its slots). A page
        whose key another sequence registered first stays this table's own."""
        table = self._tables.get(request_id)
        if self.prefix is None or table is None:
            return
        table.page_keys = keys
        table.num_sealed = min(num_tokens // self.page_size, len(keys), table.num_pages)
        if self.store is not None and self.store.backend.reconnected:
            self._republish()
        self._register(table)

    def _register(self, table: PageTable) -> None:
        keys = table.page_keys
        shareable = table.num_sealed
        if self.store is not None:
            shareable = min(shareable, self.store.first_stored + table.num_stored)
        published = []
        for i in range(len(table.cached), shareable):
            if self.prefix.contains(keys[i]):
                table.cached.append(None)
                continue
            in_device = self.store is None or i < self.store.first_stored
            none = np.full(self.num_layers, -1, dtype=np.int64)
            page = CachedPage(keys[i], table.slots[:, i].copy() if in_device else none,
                              none if in_device else table.pool_keys[:, i].copy(),
                              table.summary_ids[:, i].copy())
            self.prefix.add(page)
            table.cached.append(page)
            if in_device and self.store is not None:
                self._owner[page.slots] = _CACHE
            elif not in_device and self.store.backend.shares_pages:
                published.append(page)
        self._publish(published)

    def _publish(self, pages: list[CachedPage]) -> None:
        """Offers cached pages held in a shared pool to other engines (from now on)."""
        if pages:
            self.store.backend.publish(
                self.prefix.root, [p.key for p in pages], np.stack([p.pool_keys for p in pages]),
                self.summaries.to_bytes(np.stack([p.summary_ids for p in pages])))

    def _republish(self) -> None:
        """The shared pool's server came back and may have lost what it held: every page
        cached here in the pool is offered again."""
        self.store.backend.reconnected = False
        pages = [p for p in self.prefix.pages() if p.shares_keys]
        logger.info("offering %d cached pages to other engines again", len(pages))
        self._publish(pages)

    def _store_for_cache(self, table: PageTable) -> None:
        """Stores the sealed pages of a table being freed that are not in the pool yet (the
        residual window), when the pool has room, and registers them."""
        first = self.store.first_stored
        start, stop = first + table.num_stored, table.num_sealed
        backend = self.store.backend
        if stop <= start or not backend.is_available:
            return
        slots = table.slots[:, start:stop]
        n = slots.size
        if (slots < 0).any():
            raise RuntimeError("bug: a page outside the pool is not in DEVICE")
        self._make_pool_room(n)
        if backend.num_free < n:
            return
        try:
            keys = self.store.store(slots.reshape(-1))
        except PoolUnavailable:
            return
        table.pool_keys[:, start:stop] = np.asarray(keys, dtype=np.int64).reshape(slots.shape)
        table.num_stored = stop - first
        self._register(table)

    def _reclaim(self, done: Callable[[], bool], slots: bool) -> None:
        """Drops idle cached pages, least recently released first, that hold DEVICE slots
        (`slots`) or pool keys, until `done()`."""
        for page in self.prefix.idle_pages():
            if done():
                return
            if page.shares_slots if slots else page.shares_keys:
                self._drop_cached([page])

    def _drop_cached(self, pages: list[CachedPage]) -> None:
        """Forgets idle cached pages and frees what they hold."""
        self.prefix.drop(pages)
        for page in pages:
            if self.summaries is not None:
                self.summaries.free(page.summary_ids)
            if page.shares_slots:
                if self.store is not None:
                    self._release(page.slots)
                self.pool.free(page.slots)
            if page.shares_keys:
                self._free_keys(page.pool_keys.tolist())

    @property
    def num_free_device_pages(self) -> int:
        """DEVICE pages free now or held only by idle cached pages (free on demand)."""
        idle = 0 if self.prefix is None else self.prefix.num_idle_sharing_slots
        return self.pool.num_free_pages + idle * self.num_layers

    def forget_pool_pages(self) -> None:
        """The pool lost what it held: the cached pages stored there are dropped (all idle:
        the sequences that read them were failed first), so none is ever read again."""
        if self.prefix is not None and self.store is not None:
            self._drop_cached([p for p in self.prefix.idle_pages() if p.shares_keys])

    def reset_prefix_cache(self) -> bool:
        """Drops every idle cached page (vLLM's `reset_prefix_cache`); False (nothing
        dropped) while some sequence still reads cached pages."""
        if self.prefix is None:
            return True
        if self.prefix.num_idle != len(self.prefix):
            return False
        pages = self.prefix.idle_pages()
        self._drop_cached(pages)
        self.prefix.counters.pages_evicted -= len(pages)  # dropped on request, not for room
        return True

    def _shared_columns(self, table: PageTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[num_pages] bool each: pages the prefix cache shares, and of those, the ones
        whose DEVICE slots / pool keys it shares (every layer alike)."""
        n = table.num_pages
        shared, slots, keys = (np.zeros(n, dtype=bool) for _ in range(3))
        for i, page in enumerate(table.cached):
            if page is not None:
                shared[i], slots[i], keys[i] = True, page.shares_slots, page.shares_keys
        return shared, slots, keys
