"""Page tables per sequence and the cache manager that grows, tiers and frees them.

A sequence owns one page per layer for every `page_size` tokens. Layers have their
own pages (not one block shared by all layers, as in vLLM) because the tiers
evict, fetch and select pages per layer. For each (layer, page) the table keeps
a page *entry* and the pool key (-1 until stored)::

    entry >= 0     the page is in DEVICE slot `entry`
    entry <  0     the page is only in the pool, in arena row -entry - 1 (`ArenaPool.rows`
                   of its key; keys themselves are the backend's, opaque here)

so a stacked page table is, as it is, what the attention kernels read: a DEVICE
slot or a pool row in place (`--kv-read in_place`).

Without a pool every page stays in DEVICE. With one, DEVICE room is committed,
not merely allocated: a sequence needs at once

    L * pinned + stored        pinned = pages not (yet) in the pool: the open
                               page, the residual window, the sink page;
                               stored = its pooled pages of ONE layer, the
                               layer being attended (copy: they come back into
                               DEVICE to be read); 0 when pages are read in place

and the manager admits growth only while the sum over sequences fits. That sum
is what guarantees a step can always run: any page beyond it is evictable. When
pages are read in place, a page leaves DEVICE as soon as it is stored: a pool
row is what attention reads (for int8 a quarter of the float32 page's bytes).

The manager is the only owner of placement: which table holds each DEVICE slot, which
resident pages may leave (already pooled), the eviction policy and its clock (one
tick per layer attended). `TieredStore` only moves and counts. A copy-mode read is
two calls, so that a prefetcher can hand over pages it already holds in between:

    plan = cache.prepare_load(layer, ...)   DEVICE slots taken for the pooled pages
                                            the read needs (evicting others)
    prefetcher.promote(plan)                prefetched ones swap in their own slots
    cache.complete_load(plan)               the rest fetched; the block table to read

(`ensure_resident` is the two without a prefetcher). Freed pool keys are announced
to whoever subscribed (`on_keys_freed`): the cache holds no pointer to a prefetcher.

With prefix caching (`speckv.kv.prefix`, `speckv.kv.sharing`), a table's first pages
may be shared with other tables and with the cache's idle pages: `reuse_prefix` gives a
new sequence the cached pages of its prompt's longest cached prefix, `cache_pages`
offers its sealed pages, `free` releases shared pages to the cache instead of freeing
them. Reservations count a shared page in each table that holds it (conservative).

Admission with a pool is batch-aware: a sequence is admitted only when what it
needs at its longest (prompt + max_tokens) fits beside what every admitted one
holds at its longest (`admit`), so that admitted sequences all decode every step
and none is preempted for room another one took.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NewType

import numpy as np
import torch

from speckv.kv.eviction import EvictionPolicy, make_eviction
from speckv.kv.page_pool import DevicePagePool
from speckv.kv.prefix import CachedPage, PageKey, PrefixCache
from speckv.kv.sharing import SharedPages
from speckv.kv.summaries import SummaryStore
from speckv.kv.tiers import Tier, TieredStore
from speckv.pool.base import ArenaPool

RequestId = NewType("RequestId", str)


class PageTable:
    """The pages of one sequence: `(layer, i)` holds tokens [i*ps, (i+1)*ps)."""

    def __init__(self, uid: int, num_layers: int, max_pages: int, device: torch.device) -> None:
        self.uid = uid
        # page entry: DEVICE slot, or -1 - arena row; 0 past num_pages (valid padding)
        self.slots = np.zeros((num_layers, max_pages), dtype=np.int64)
        self.pool_keys = np.full((num_layers, max_pages), -1, dtype=np.int64)
        self.summary_ids = np.zeros((num_layers, max_pages), dtype=np.int64)  # 0 past num_pages
        self.num_pages = 0
        self.num_stored = 0  # pages per layer in the pool (counted after the sink page)
        self.requirement = 0  # DEVICE pages committed to this sequence
        self.reserved = 0  # DEVICE pages it may need at its longest (batch-aware admission)
        self.reserved_pool = 0  # pool pages it may need at its longest
        # prefix caching: cached[i] is page i as the prefix cache shares it (None: this
        # table's own copy); pages past len(cached) are not registered yet
        self.cached: list[CachedPage | None] = []
        self.page_keys: list[PageKey] = []  # keys of its full pages (as last told)
        self.num_sealed = 0  # pages whose tokens are all computed (as last told)
        # what block tables are stacked from; on the CPU it shares memory with `slots`
        self._shared = device.type == "cpu"
        self.tensor = torch.from_numpy(self.slots) if self._shared else \
            torch.zeros(num_layers, max_pages, dtype=torch.long, device=device)
        self.summary_tensor = torch.from_numpy(self.summary_ids) if self._shared else \
            torch.zeros(num_layers, max_pages, dtype=torch.long, device=device)

    def set_slots(self, layer: int | slice, pages: np.ndarray | slice, slots: np.ndarray) -> None:
        self.slots[layer, pages] = slots
        if not self._shared:
            self.tensor[:, :self.num_pages] = torch.from_numpy(self.slots[:, :self.num_pages])

    def set_summary_ids(self, pages: slice, ids: np.ndarray) -> None:
        self.summary_ids[:, pages] = ids
        if not self._shared:
            self.summary_tensor[:, pages] = torch.from_numpy(ids).to(self.summary_tensor.device)


@dataclass(slots=True, eq=False)
class LoadPlan:
    """The pooled pages one layer's read needs back in DEVICE, from `prepare_load` to
    `complete_load`. Empty when nothing is missing or pages are read in place."""

    layer: int
    keys: np.ndarray  # [n] their pool keys
    slots: np.ndarray  # [n] the DEVICE slots taken for them (a promoter swaps in its own)
    promoted: np.ndarray  # [n] bool: already in its slot, not to be fetched
    tables: list[PageTable]
    block_table: torch.Tensor  # [B, P] as the caller built it
    built_at: int  # the eviction count it was built at
    missing: list[tuple[PageTable, np.ndarray]]  # per table, the pages of `layer` missing
    wanted: np.ndarray | None  # [B, P] bool, the pages read (None: all)


_NONE = np.zeros(0, dtype=np.int64)


class KVCacheManager(SharedPages):
    """Allocates pages for sequences as they grow, places them in the tiers, frees them."""

    def __init__(self, pool: DevicePagePool, num_layers: int, max_model_len: int,
                 store: TieredStore | None = None, summaries: SummaryStore | None = None,
                 eviction: EvictionPolicy | None = None,
                 prefix: PrefixCache | None = None) -> None:
        """`eviction`: which pooled pages leave DEVICE first (with a pool; default LRU).
        `prefix`: share sealed pages by content (prefix caching); None: off."""
        self.pool = pool
        self.prefix = prefix
        self.store = store
        self.summaries = summaries
        self.num_layers = num_layers
        self.page_size = pool.page_size
        self.max_pages_per_seq = -(-max_model_len // self.page_size)
        self._tables: dict[RequestId, PageTable] = {}
        self._by_uid: dict[int, PageTable] = {}
        self._next_uid = 0
        self._committed = 0  # DEVICE pages committed to all tables (with a pool)
        self._pool_reserved = 0  # pool slots promised to all tables' future stores
        self._held = 0  # sum over tables of max(reserved, requirement): DEVICE
        self._pool_held = 0  # sum over tables of max(reserved_pool, pool pages): pool
        self.num_evicted = 0  # pages of live tables currently not resident
        self.reads_in_place = store is not None and store.in_place
        # placement of DEVICE slots (slot ids of the whole tensor: PREFETCH pages promoted
        # into DEVICE keep theirs)
        n = pool.num_slots
        self.eviction = None if store is None else eviction or make_eviction("lru", n)
        self._owner = np.full(n, -1, dtype=np.int64)  # uid of the table holding the slot
        self._where = np.zeros(n, dtype=np.int64)  # flat [layer, page] index in that table
        self._evictable = np.zeros(n, dtype=bool)  # resident and already in the pool
        self._clock = 0  # one tick per layer attended
        self._keys_freed: list[Callable[[list[int]], None]] = []

    # ------------------------------------------------------------ accounting

    def requirement(self, num_pages: int, num_stored: int) -> int:
        """DEVICE pages a sequence with these page counts must be able to hold at once."""
        if self.store is None:
            return self.num_layers * num_pages
        one_layer = 0 if self.reads_in_place else num_stored  # read where they lie
        return self.num_layers * (num_pages - num_stored) + one_layer

    def _pool_pages(self, num_pages: int) -> int:
        """Pool slots a sequence of `num_pages` pages will take once all are stored."""
        return self.num_layers * max(0, num_pages - self.store.first_stored)

    def worst_requirement(self, num_tokens: int) -> int:
        """The most DEVICE pages one request of `num_tokens` needs at once when it runs
        alone (prefill chunks shrink to fit, down to one page)."""
        num_pages = -(-num_tokens // self.page_size)
        if self.store is None:
            return self.requirement(num_pages, 0)
        stored = min(num_pages, self.store.target_stored(max(0, num_tokens - self.page_size)))
        return self.requirement(num_pages, stored)

    def worst_pool_pages(self, num_tokens: int) -> int:
        """The most pool pages one request of `num_tokens` holds (0 without a pool)."""
        return 0 if self.store is None else self._pool_pages(-(-num_tokens // self.page_size))

    def fitting_tokens(self, request_id: RequestId, start: int, want: int) -> int:
        """The most tokens <= `want` after `start` that the sequence can grow by now
        (whole pages, or `want` itself); 0 if not even one more page fits."""
        if self.can_allocate(request_id, start + want):
            return want
        ps = self.page_size
        lo, hi = 0, (start + want) // ps - start // ps  # in pages past start's page
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.can_allocate(request_id, (start // ps + mid) * ps):
                lo = mid
            else:
                hi = mid - 1
        return max(0, (start // ps + lo) * ps - start)

    def pages_needed(self, request_id: RequestId, num_tokens: int) -> int:
        """Physical pages to allocate so that the sequence can hold `num_tokens` tokens."""
        table = self._tables.get(request_id)
        have = 0 if table is None else table.num_pages
        return max(0, -(-num_tokens // self.page_size) - have) * self.num_layers

    def can_allocate(self, request_id: RequestId, num_tokens: int) -> bool:
        return self._growth(request_id, num_tokens) is not None

    def _growth(self, request_id: RequestId, num_tokens: int) -> tuple[int, int, int] | None:
        """(new pages, new requirement, new pool pages) if the growth fits, else None.

        A sequence grows into its own reservation first, then into room nobody holds."""
        table = self._tables.get(request_id)
        have, stored, req, res, res_pool = (0, 0, 0, 0, 0) if table is None else \
            (table.num_pages, table.num_stored, table.requirement, table.reserved,
             table.reserved_pool)
        new = max(0, -(-num_tokens // self.page_size) - have)
        if self.store is None:
            fits = new * self.num_layers <= self.num_free_device_pages
            return (new, 0, 0) if fits else None
        new_req = self.requirement(have + new, stored)
        pages_before, pages_after = self._pool_pages(have), self._pool_pages(have + new)
        if self._held + _held_change(res, req, new_req) > self.pool.num_pages:
            return None
        pool_held = self._pool_held + _held_change(res_pool, pages_before, pages_after)
        if pool_held > self.store.backend.num_slots:
            return None
        return new, new_req, pages_after - pages_before

    def _set_requirement(self, table: PageTable, new_req: int) -> None:
        self._held += _held_change(table.reserved, table.requirement, new_req)
        self._committed += new_req - table.requirement
        table.requirement = new_req

    def _add_pool_pages(self, table: PageTable, before: int, after: int) -> None:
        """The table's pooled pages (stored or promised) go from `before` to `after`."""
        self._pool_held += _held_change(table.reserved_pool, before, after)
        self._pool_reserved += after - before

    def _attach_growth(self, table: PageTable | None, num_pages: int) -> tuple[int, int] | None:
        """(requirement, pool pages) of a table given `num_pages` shared pages, if that fits."""
        if self.store is None:
            return 0, 0
        stored = max(0, num_pages - self.store.first_stored)
        req, res, res_pool = (0, 0, 0) if table is None else \
            (table.requirement, table.reserved, table.reserved_pool)
        new_req, pages = self.requirement(num_pages, stored), self._pool_pages(num_pages)
        if self._held + _held_change(res, req, new_req) > self.pool.num_pages:
            return None
        if self._pool_held + _held_change(res_pool, 0, pages) > self.store.backend.num_slots:
            return None
        return new_req, pages

    # ------------------------------------------------------------ admission

    def admit(self, request_id: RequestId, num_tokens: int) -> bool:
        """Reserves, for a sequence that will hold at most `num_tokens` tokens, the DEVICE
        and pool pages it needs at its longest; False (nothing reserved) if they do not
        fit beside the other reservations. Without a pool there is nothing to reserve:
        sequences are admitted by what they need now, and preempted when short."""
        room = self._admission(request_id, num_tokens)
        if room is None:
            return False
        if self.store is None:
            return True
        reserved, reserved_pool, held, pool_held = room
        table = self._tables.get(request_id) or self._new_table(request_id)
        self._held, self._pool_held = held, pool_held
        table.reserved, table.reserved_pool = reserved, reserved_pool
        return True

    def _admission(self, request_id: RequestId,
                   num_tokens: int) -> tuple[int, int, int, int] | None:
        """(DEVICE and pool reservation, held DEVICE and pool pages after it) if they fit."""
        if self.store is None:
            return 0, 0, 0, 0
        reserved = self.worst_requirement(num_tokens)
        reserved_pool = self.worst_pool_pages(num_tokens)
        table = self._tables.get(request_id)
        req, res, pages, res_pool = (0, 0, 0, 0) if table is None else \
            (table.requirement, table.reserved, self._pool_pages(table.num_pages),
             table.reserved_pool)
        # the reservation changes; what the table holds now (req, pages) stays
        held = self._held + max(reserved, req) - max(res, req)
        pool_held = self._pool_held + max(reserved_pool, pages) - max(res_pool, pages)
        if held > self.pool.num_pages or pool_held > self.store.backend.num_slots:
            return None
        return reserved, reserved_pool, held, pool_held

    # ------------------------------------------------------------ grow and free

    def allocate(self, request_id: RequestId, num_tokens: int) -> bool:
        """Grows the sequence's table to hold `num_tokens`; False (nothing taken) if no room."""
        growth = self._growth(request_id, num_tokens)
        if growth is None:
            return False
        new, new_req, pool_new = growth
        if new == 0:
            return True
        table = self._tables.get(request_id)
        if table is None:
            table = self._new_table(request_id)
        slots = self._take_device_pages(new * self.num_layers).reshape(new, self.num_layers).T
        first = table.num_pages
        table.num_pages += new
        table.set_slots(slice(None), slice(first, first + new), slots)
        if self.summaries is not None:
            ids = self.summaries.allocate(new * self.num_layers).reshape(self.num_layers, new)
            table.set_summary_ids(slice(first, first + new), ids)
        if self.store is not None:
            width = self.max_pages_per_seq
            where = np.arange(self.num_layers)[:, None] * width + np.arange(first, first + new)
            self._claim(slots.reshape(-1), table.uid, where.reshape(-1))
            self._set_requirement(table, new_req)
            before = self._pool_pages(first)
            self._add_pool_pages(table, before, before + pool_new)
        return True

    def _new_table(self, request_id: RequestId) -> PageTable:
        table = PageTable(self._next_uid, self.num_layers, self.max_pages_per_seq,
                          self.pool.kv.device)
        self._next_uid += 1
        self._tables[request_id] = table
        self._by_uid[table.uid] = table
        return table

    def _take_device_pages(self, n: int, protected: np.ndarray | None = None) -> np.ndarray:
        """`n` DEVICE slots: free ones first, then idle cached pages', then evicted pages
        (already in the pool)."""
        short = n - self.pool.num_free_pages
        if short > 0 and self.prefix is not None:
            self._reclaim(lambda: self.pool.num_free_pages >= n, slots=True)
            short = n - self.pool.num_free_pages
        if short > 0:
            if self.store is None:
                raise RuntimeError("bug: DEVICE pages were promised but are not free")
            self._evict(self._choose_victims(short, protected))
        slots = self.pool.allocate(n)
        if slots is None:
            raise RuntimeError("bug: DEVICE pages still missing after eviction")
        return slots

    def _evict(self, victims: np.ndarray) -> None:
        owners = self._owner[victims]
        width = self.max_pages_per_seq
        for uid in np.unique(owners):
            where = self._where[victims[owners == uid]]
            self._leave_device(self._by_uid[int(uid)], where // width, where % width)
        self._release(victims)
        self.pool.free(victims)
        self.num_evicted += len(victims)

    def _leave_device(self, table: PageTable, layers: np.ndarray | slice,
                      pages: np.ndarray | slice) -> None:
        """The pages' entries name their pool rows: they are only in the pool now. (Pool
        keys are the backend's; only an arena backend says which row holds one.)"""
        keys = table.pool_keys[layers, pages]
        if (keys < 0).any():
            raise RuntimeError("bug: a page left DEVICE before it was stored in the pool")
        table.set_slots(layers, pages, -1 - self._rows(keys))

    def _rows(self, keys: np.ndarray) -> np.ndarray:
        backend = self.store.backend
        return backend.rows(keys) if isinstance(backend, ArenaPool) else keys

    def free(self, request_id: RequestId) -> None:
        """Frees the sequence's pages in every tier; the pages the prefix cache shares are
        released to it instead (with a pool, sealed pages not yet stored are stored first,
        so that they can be shared)."""
        table = self._tables.get(request_id)
        if table is None:
            return
        if self.prefix is not None and self.store is not None:
            self._store_for_cache(table)
        del self._tables[request_id]
        del self._by_uid[table.uid]
        n = table.num_pages
        shared, shared_slots, shared_keys = self._shared_columns(table)
        entries = table.slots[:, :n]
        resident = entries[:, ~shared_slots]
        resident = resident[resident >= 0]
        if self.summaries is not None:
            self.summaries.free(table.summary_ids[:, :n][:, ~shared].reshape(-1))
        if self.store is not None:
            self.num_evicted -= int((entries < 0).sum())
            self._release(resident)
            keys = table.pool_keys[:, :n][:, ~shared_keys]
            self._free_keys(keys[keys >= 0].tolist())
            self._set_requirement(table, 0)
            self._held -= table.reserved
            self._add_pool_pages(table, self._pool_pages(n), 0)
            self._pool_held -= table.reserved_pool
        self.pool.free(resident)
        if self.prefix is not None:
            self.prefix.release([c for c in table.cached if c is not None])

    def _free_keys(self, keys: list[int]) -> None:
        for listener in self._keys_freed:  # before the keys can be reused
            listener(keys)
        self.store.backend.free(keys)

    # ------------------------------------------------------------ append

    def append(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               sealed: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Writes one layer's new keys and values into their DEVICE slots.

        Args:
            slot_mapping: [T] DEVICE slot * page_size + offset of each token.
            k, v: [T, Hkv, D].
            sealed: (summary slots [S], DEVICE slots [S]) of the pages these tokens
                fill: their key summaries are written.
        """
        pool = self.pool
        pool.k_pages.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
        pool.v_pages.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)
        if sealed is not None and self.summaries is not None:
            summary_ids, slots = sealed
            self.summaries.summarize(summary_ids, pool.k_pages[slots])

    # ------------------------------------------------------------ tiers

    def store_sealed(self, tables_and_lengths: list[tuple[RequestId, int]]) -> None:
        """Stores the pages that left the residual window: after every forward pass."""
        if self.store is None:
            return
        parts, plan = [], []
        first = self.store.first_stored
        for rid, num_tokens in tables_and_lengths:
            table = self._tables[rid]
            target = self.store.target_stored(num_tokens)
            if target > table.num_stored:
                cols = slice(first + table.num_stored, first + target)
                parts.append(table.slots[:, cols].reshape(-1))
                plan.append((table, cols, target))
        if not parts:
            return
        slots = np.concatenate(parts)
        self._make_pool_room(len(slots))
        keys = np.asarray(self.store.store(slots), dtype=np.int64)
        offset = 0
        for table, cols, target in plan:
            n = (cols.stop - cols.start) * self.num_layers
            table.pool_keys[:, cols] = keys[offset:offset + n].reshape(self.num_layers, -1)
            offset += n
            table.num_stored = target
            if self.reads_in_place:  # the pool row is what attention reads from now on
                self._leave_device(table, slice(None), cols)
            self._set_requirement(table, self.requirement(table.num_pages, target))
        if self.reads_in_place:
            self._release(slots)
            self.pool.free(slots)
            self.num_evicted += len(slots)
        else:  # in the pool now: may leave DEVICE
            self._evictable[slots] = True

    def _make_pool_room(self, n: int) -> None:
        """Frees pool keys that idle cached pages hold until `n` are free (the reservations
        guarantee that this suffices)."""
        if self.prefix is not None and self.store.backend.num_free < n:
            self._reclaim(lambda: self.store.backend.num_free >= n, slots=False)

    @property
    def eviction_count(self) -> int:
        """Evictions so far: a block table built before the last one may be stale."""
        return 0 if self.store is None else self.store.counters.evictions

    def on_keys_freed(self, listener: Callable[[list[int]], None]) -> None:
        """Calls `listener(keys)` with the pool keys of every freed sequence, before the
        keys can be reused (the prefetcher drops its copies of those pages)."""
        self._keys_freed.append(listener)

    def ensure_resident(self, layer: int, request_ids: list[RequestId],
                        block_table: torch.Tensor, built_at: int,
                        needed: torch.Tensor | None = None) -> torch.Tensor:
        """Makes the pages of `layer` that the batch reads readable; returns its block table
        (`prepare_load` then `complete_load`, with nothing promoted in between)."""
        return self.complete_load(self.prepare_load(layer, request_ids, block_table, built_at,
                                                    needed))

    def prepare_load(self, layer: int, request_ids: list[RequestId],
                     block_table: torch.Tensor, built_at: int,
                     needed: torch.Tensor | None = None) -> LoadPlan:
        """The pooled pages of `layer` that the batch reads and DEVICE lacks, each given a
        DEVICE slot (evicting other pooled pages for room, never one this read needs).

        Copy: those pages must come back before attention. In place: nothing moves (the
        plan is empty; the table's pool entries are read where they lie, and the caller
        accounts those reads with `TieredStore.read_in_place`).

        Args:
            block_table: [B, P] page entries of the batch in this layer (columns past a
                sequence's pages are padding), built when `eviction_count` was `built_at`.
            needed: [B, P] bool, the pages attention will read (a selection); default
                every page. Pages left out are not fetched, and counted as skipped.
        """
        if self.reads_in_place:  # the table already says where pages are
            return LoadPlan(layer, _NONE, _NONE, _NONE.astype(bool), [], block_table,
                            built_at, [], None)
        self._clock += 1
        tables = [self._tables[r] for r in request_ids]
        wanted = None if needed is None else needed.cpu().numpy()
        missing = []
        if self.num_evicted:
            for row, t in enumerate(tables):
                absent = t.slots[layer, :t.num_pages] < 0
                if wanted is not None:
                    skipped = absent & ~wanted[row, :t.num_pages]
                    if skipped.any():
                        self._count_skipped(t.pool_keys[layer, :t.num_pages][skipped])
                    absent &= wanted[row, :t.num_pages]
                if absent.any():
                    missing.append((t, np.flatnonzero(absent)))
        if not missing:
            keys = slots = _NONE
        else:
            keys = np.concatenate([t.pool_keys[layer, idx] for t, idx in missing])
            if (keys < 0).any():
                raise RuntimeError("bug: a page left DEVICE before it was stored in the pool")
            here = np.concatenate([t.slots[layer, :t.num_pages] for t in tables])
            slots = self._take_device_pages(len(keys), protected=here[here >= 0])
        return LoadPlan(layer, keys, slots, np.zeros(len(keys), dtype=bool), tables,
                        block_table, built_at, missing, wanted)

    def complete_load(self, plan: LoadPlan) -> torch.Tensor:
        """Fetches the plan's pages not promoted (a demand fetch: the step waits), records
        where every page now is, and returns the layer's block table to read."""
        if self.reads_in_place:
            return plan.block_table
        layer, tables, block_table = plan.layer, plan.tables, plan.block_table
        if plan.missing:
            offset, width = 0, self.max_pages_per_seq
            for table, idx in plan.missing:
                mine = plan.slots[offset:offset + idx.size]
                offset += idx.size
                table.set_slots(layer, idx, mine)
                self._claim(mine, table.uid, layer * width + idx)
            self.num_evicted -= len(plan.keys)
            promoted = plan.promoted
            if promoted.any():  # evictable again: they are in the pool
                self._arrived(plan.slots[promoted])
            if not promoted.all():
                fetched = plan.slots[~promoted]
                self.store.fetch(plan.keys[~promoted].tolist(), fetched)
                self._arrived(fetched)
            block_table = self.block_table(layer, tables, block_table.shape[1])
        elif self.eviction_count != plan.built_at:  # slots may have been reused since
            block_table = self.block_table(layer, tables, block_table.shape[1])
        used = block_table.cpu().numpy() if block_table.device.type != "cpu" else block_table.numpy()
        used = used if plan.wanted is None else used[plan.wanted]
        self.eviction.on_use(used.reshape(-1), self._clock)
        return block_table

    def _count_skipped(self, keys: np.ndarray) -> None:
        counters = self.store.counters
        counters.fetches_skipped += len(keys)
        counters.fetch_bytes_skipped += self.store.backend.stored_bytes(keys)

    # ------------------------------------------------------------ DEVICE placement

    def _claim(self, slots: np.ndarray, uid: int, where: np.ndarray) -> None:
        """Table `uid` holds `slots` at flat positions `where` (not evictable yet)."""
        self._owner[slots] = uid
        self._where[slots] = where
        self._evictable[slots] = False
        self.eviction.on_arrival(slots, self._clock)

    def _release(self, slots: np.ndarray) -> None:
        self._owner[slots] = -1
        self._evictable[slots] = False

    def _arrived(self, slots: np.ndarray) -> None:
        """Pooled pages brought back into DEVICE `slots` (fetched or promoted)."""
        self._evictable[slots] = True
        self.eviction.on_arrival(slots, self._clock)

    def _choose_victims(self, n: int, protected: np.ndarray | None = None) -> np.ndarray:
        """`n` evictable slots, none of `protected` (slots the current layer reads)."""
        candidates = self._evictable.copy()
        if protected is not None:
            candidates[protected] = False
        if candidates.sum() < n:
            raise RuntimeError(f"bug: need {n} DEVICE pages but only {int(candidates.sum())} "
                               "can be evicted; the cache's commitment accounting is wrong")
        victims = self.eviction.victims(candidates, n)
        self.store.counters.evictions += len(victims)
        return victims

    @property
    def num_pooled_resident(self) -> int:
        """Resident pages that are also in the pool (may leave DEVICE when room is needed)."""
        return int(self._evictable.sum())

    def num_slots_held(self) -> int:
        """DEVICE slots some table or the prefix cache holds."""
        return int((self._owner != -1).sum())

    def tiers(self, request_id: RequestId) -> np.ndarray:
        """[num_layers, num_pages] `Tier` of each of the sequence's pages: DEVICE where
        resident (pooled too, or not yet), POOL where read from the pool."""
        table = self._tables[request_id]
        return _tiers(table.slots[:, :table.num_pages])

    def pool_keys(self, layer: int, request_ids: list[RequestId],
                  num_pages: int) -> tuple[np.ndarray, np.ndarray]:
        """([B, num_pages] pool keys (-1: not stored), their `Tier`) of a batch's pages of
        `layer`; columns past a sequence's pages are padding (DEVICE, key -1)."""
        keys = np.full((len(request_ids), num_pages), -1, dtype=np.int64)
        tiers = np.full(keys.shape, Tier.DEVICE, dtype=np.int64)
        for row, rid in enumerate(request_ids):
            t = self._tables[rid]
            n = min(t.num_pages, num_pages)
            keys[row, :n] = t.pool_keys[layer, :n]
            tiers[row, :n] = _tiers(t.slots[layer, :n])
        return keys, tiers

    # ------------------------------------------------------------ lookups

    def table(self, request_id: RequestId) -> PageTable:
        return self._tables[request_id]

    def num_sequences(self) -> int:
        return len(self._tables)

    def block_tables(self, request_ids: list[RequestId], num_pages: int) -> torch.Tensor:
        """Stacked page tables of a batch: [num_layers, B, num_pages]."""
        return torch.stack([self._tables[r].tensor[:, :num_pages] for r in request_ids], dim=1)

    def summary_tables(self, request_ids: list[RequestId], num_pages: int) -> torch.Tensor:
        """Stacked summary slots of a batch: [num_layers, B, num_pages]."""
        return torch.stack([self._tables[r].summary_tensor[:, :num_pages] for r in request_ids],
                           dim=1)

    def block_table(self, layer: int, tables: list[PageTable], num_pages: int) -> torch.Tensor:
        """One layer's stacked page table: [B, num_pages]."""
        return torch.stack([t.tensor[layer, :num_pages] for t in tables])

    @property
    def committed_pages(self) -> int:
        """DEVICE pages promised to the live sequences (<= the DEVICE tier's pages)."""
        return self._committed

    @property
    def held_pages(self) -> int:
        """DEVICE pages committed or reserved for the live sequences' longest lengths
        (<= the DEVICE tier's pages)."""
        return self._held

    @property
    def reserved_pool_pages(self) -> int:
        """Pool pages promised to the live sequences' sealed pages (<= the pool's)."""
        return self._pool_reserved

    def all_tables(self) -> list[PageTable]:
        return list(self._tables.values())

    def request_ids(self) -> list[RequestId]:
        """The sequences with a page table, in the order `all_tables` lists them."""
        return list(self._tables)


def _tiers(entries: np.ndarray) -> np.ndarray:
    """The `Tier` each page entry is read from."""
    return np.where(entries >= 0, Tier.DEVICE, Tier.POOL)


def _held_change(reserved: int, before: int, after: int) -> int:
    """How much a table's hold, max(its reservation, what it needs), changes when what it
    needs goes from `before` to `after`."""
    return max(reserved, after) - max(reserved, before)
