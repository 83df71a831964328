"""Prefix caching: sealed pages addressed by their content, shared by every sequence
that starts with the same tokens.

A sealed page's key is a hash of its parent's key and its own token ids, inside a
namespace that fingerprints everything that makes KV bytes differ (the model's
weights, the compute dtype, the codec, the page size, the layout version)::

    key(page 0) = H(namespace, tokens[0:ps])
    key(page i) = H(key(page i-1), tokens[i*ps:(i+1)*ps])

so one key names a whole prefix, the same prefix has the same keys in every engine
with the same namespace, and a different namespace never matches. The open page is
never shared. Sealed pages are immutable, so sharing needs reference counts, not
copy-on-write.

`PrefixCache` is the index: key -> `CachedPage`, what the page's K/V occupy on
behalf of everyone who reads it (per layer: a DEVICE slot, a pool key, a summary
slot). A page is *live* while some sequence reads it (`refs` > 0) and *idle* once
none does: idle pages stay cached, in least-recently-released order, until their
room is needed (`KVCacheManager` takes them back oldest first, before it would
evict or refuse anything). LRU because a chat's next turn and the next user of a
system prompt come soon after the last, and it is what vLLM, SGLang and llama.cpp
use; a page is released only after every page behind it in the same sequence, so
a prefix's tail is evicted before its head (the head is what more prompts share).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

LAYOUT_VERSION = 1  # bump when the page layout or a codec's row format changes
PageKey = bytes  # 16 bytes of BLAKE2b


def namespace_key(*parts: object) -> PageKey:
    """The root key of a namespace: a hash of everything that makes KV bytes differ."""
    text = "\x1f".join(str(p) for p in (LAYOUT_VERSION, *parts))
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def extend_page_keys(keys: list[PageKey], root: PageKey, token_ids: list[int],
                     page_size: int) -> list[PageKey]:
    """Appends to `keys` the keys of the full pages of `token_ids` it lacks (in place);
    returns it. Only whole pages have keys."""
    for i in range(len(keys), len(token_ids) // page_size):
        parent = keys[i - 1] if i else root
        # little-endian int64 whatever the machine: the same key in every engine
        tokens = np.asarray(token_ids[i * page_size:(i + 1) * page_size], dtype="<i8")
        keys.append(hashlib.blake2b(parent + tokens.tobytes(), digest_size=16).digest())
    return keys


@dataclass(slots=True, eq=False)
class CachedPage:
    """What one sealed page's K/V occupy for all its readers, per layer.

    `slots[l]` is a DEVICE slot every reader's page table names (-1: not shared in
    DEVICE: readers read the pool key, or copy it into a slot of their own), and
    `pool_keys[l]` the pool key holding it (-1: not in the pool)."""

    key: PageKey
    slots: np.ndarray  # [L] int64
    pool_keys: np.ndarray  # [L] int64
    summary_ids: np.ndarray  # [L] int64
    refs: int = 0  # sequences whose page tables hold it

    @property
    def shares_slots(self) -> bool:
        return bool(self.slots[0] >= 0)

    @property
    def shares_keys(self) -> bool:
        return bool(self.pool_keys[0] >= 0)


@dataclass(slots=True)
class PrefixStats:
    """What prefix caching did, counted as it happened (cumulative)."""

    lookups: int = 0  # sequences admitted with caching on (each looked its prompt up)
    query_tokens: int = 0  # tokens they could have reused (whole pages, last token excluded)
    hit_tokens: int = 0  # tokens they did reuse
    pages_cached: int = 0  # pages registered
    pages_evicted: int = 0  # idle pages dropped for room
    pages_adopted: int = 0  # of the pages cached, those another engine computed (shared pool)

    def record(self, query_tokens: int, hit_tokens: int) -> None:
        """A sequence was admitted: it could have reused `query_tokens`, and reused `hit_tokens`."""
        self.lookups += 1
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class PrefixCache:
    """The index of shared pages: lookup by key, reference counts, LRU of idle pages."""

    def __init__(self, page_size: int, root: PageKey) -> None:
        """`root`: the namespace's key (`namespace_key`)."""
        self.page_size = page_size
        self.root = root
        self.counters = PrefixStats()
        self._pages: dict[PageKey, CachedPage] = {}
        self._idle: OrderedDict[PageKey, CachedPage] = OrderedDict()  # next to evict first
        self.num_sharing_slots = 0  # cached pages that hold DEVICE slots
        self.num_sharing_keys = 0  # cached pages that hold pool keys
        self.num_idle_sharing_slots = 0  # of those, idle ones
        self.num_idle_sharing_keys = 0

    def __len__(self) -> int:
        return len(self._pages)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def stats(self, num_layers: int, page_bytes: int, slot_bytes: int) -> dict[str, int | float]:
        """Counters, and what the cache holds now: pages, and bytes per tier (`page_bytes`
        per DEVICE page and `slot_bytes` per pool slot, of `num_layers` layers each)."""
        c = self.counters
        return {
            "prefix_cache_hit_rate": c.hit_rate,
            "prefix_cache_queries": c.lookups,
            "prefix_cache_query_tokens": c.query_tokens,
            "prefix_cache_hit_tokens": c.hit_tokens,
            "prefix_cache_pages_cached": c.pages_cached,
            "prefix_cache_pages_evicted": c.pages_evicted,
            "prefix_cache_pages_adopted": c.pages_adopted,
            "prefix_cache_pages": len(self),
            "prefix_cache_pages_idle": self.num_idle,
            "prefix_cache_device_pages": self.num_sharing_slots * num_layers,
            "prefix_cache_device_pages_idle": self.num_idle_sharing_slots * num_layers,
            "prefix_cache_device_bytes": self.num_sharing_slots * num_layers * page_bytes,
            "prefix_cache_pool_bytes": self.num_sharing_keys * num_layers * slot_bytes,
        }

    def keys_of(self, keys: list[PageKey], token_ids: list[int]) -> list[PageKey]:
        """`keys` extended to every full page of `token_ids` (in place)."""
        return extend_page_keys(keys, self.root, token_ids, self.page_size)

    def lookup(self, keys: list[PageKey]) -> list[CachedPage]:
        """The cached pages of the longest prefix of `keys` (nothing is acquired)."""
        found = []
        for key in keys:
            page = self._pages.get(key)
            if page is None:
                break
            found.append(page)
        return found

    def contains(self, key: PageKey) -> bool:
        return key in self._pages

    def add(self, page: CachedPage) -> None:
        """Registers a page its sequence holds (refs 1)."""
        if page.key in self._pages:
            raise RuntimeError("bug: a page key was registered twice")
        page.refs = 1
        self._pages[page.key] = page
        self.counters.pages_cached += 1
        self.num_sharing_slots += page.shares_slots
        self.num_sharing_keys += page.shares_keys

    def acquire(self, pages: list[CachedPage]) -> None:
        for page in pages:
            page.refs += 1
            if self._idle.pop(page.key, None) is not None:
                self._count_idle(page, -1)

    def release(self, pages: list[CachedPage]) -> None:
        """A sequence stops reading `pages` (in page order). Those that become idle join
        the young end of the LRU tail first, so a prefix's tail is evicted before its head."""
        for page in reversed(pages):
            if page.refs <= 0:
                raise RuntimeError("bug: a cached page was released more often than acquired")
            page.refs -= 1
            if page.refs == 0:
                self._idle[page.key] = page
                self._count_idle(page, 1)

    def _count_idle(self, page: CachedPage, change: int) -> None:
        self.num_idle_sharing_slots += change * page.shares_slots
        self.num_idle_sharing_keys += change * page.shares_keys

    def pages(self) -> list[CachedPage]:
        """Every cached page, live or idle."""
        return list(self._pages.values())

    def idle_pages(self) -> list[CachedPage]:
        """Idle pages, next to be evicted first."""
        return list(self._idle.values())

    def drop(self, pages: list[CachedPage]) -> None:
        """Forgets idle pages (their owner frees what they occupy)."""
        for page in pages:
            if page.refs:
                raise RuntimeError("bug: dropping a cached page that is still read")
            del self._idle[page.key]
            del self._pages[page.key]
            self._count_idle(page, -1)
            self.num_sharing_slots -= page.shares_slots
            self.num_sharing_keys -= page.shares_keys
        self.counters.pages_evicted += len(pages)
