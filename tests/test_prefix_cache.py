"""Prefix caching in `KVCacheManager`, built from small parts (no model).

A two-layer cache of 4-token pages, driven the way the engine drives it: allocate,
store, `cache_pages` after each step, `reuse_prefix` at admission, free. Exact slots,
keys and eviction order are asserted; every scenario ends with the cache holding
nothing but idle pages, which `reset_prefix_cache` gives back.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from speckv import SamplingParams
from speckv.codecs import PageShape, make_codec
from speckv.config import SchedulerConfig
from speckv.engine.scheduler import Scheduler
from speckv.engine.sequence import Sequence
from speckv.kv.cache import KVCacheManager, RequestId
from speckv.kv.cpu_kernels import load_cpu_kernels
from speckv.kv.eviction import make_eviction
from speckv.kv.page_pool import DevicePagePool
from speckv.kv.prefix import PrefixCache, extend_page_keys, namespace_key
from speckv.kv.summaries import SummaryStore
from speckv.kv.tiers import TieredStore, TierOptions
from speckv.pool.local import LocalPool
from speckv.pool.valkey import ValkeyPool
from tests.conftest import assert_prefix_cache_holds_the_rest, step_without_model

LAYERS, PS, HEADS, DIM = 2, 4, 1, 8
CPU = torch.device("cpu")
ROOT = namespace_key("test-model", PS)
A_TOKENS = list(range(9))  # two full pages and one token
B_TOKENS = list(range(8)) + [100, 101]  # the same two pages, then its own


def make_cache(device_pages: int, pool: str = "none", pool_pages: int = 64,
               keep_sink_page: bool = False, codec: str = "int8",
               valkey_url: str | None = None) -> KVCacheManager:
    """pool: none | in_place | copy (with `valkey_url`: a `valkey` pool on that server)."""
    device = DevicePagePool(device_pages, PS, HEADS, DIM, dtype=torch.float32, device=CPU)
    store = None
    if pool != "none":
        c = make_codec(codec, PageShape(PS, HEADS, DIM, torch.float32))
        backend = LocalPool(c.slot_bytes, c.slot_bytes * pool_pages, device=CPU) \
            if valkey_url is None else \
            ValkeyPool(c.slot_bytes, c.slot_bytes * pool_pages, device=CPU, url=valkey_url)
        in_place = pool == "in_place"
        store = TieredStore(device, backend, c, TierOptions(keep_sink_page=keep_sink_page),
                            kernels=load_cpu_kernels() if in_place else None, in_place=in_place)
    summaries = SummaryStore(device_pages + pool_pages, HEADS, DIM, dtype=torch.float32,
                             device=CPU)
    return KVCacheManager(device, LAYERS, max_model_len=64, store=store, summaries=summaries,
                          eviction=make_eviction("lru", device.num_slots),
                          prefix=PrefixCache(PS, ROOT))


def keys_of(tokens: list[int]) -> list[bytes]:
    return extend_page_keys([], ROOT, tokens, PS)


def compute(cache: KVCacheManager, rid: str, tokens: list[int]) -> None:
    """Allocates and 'computes' every token of a new sequence, as one prefill step."""
    assert cache.allocate(RequestId(rid), len(tokens))
    cache.store_sealed([(RequestId(rid), len(tokens))])
    cache.cache_pages(RequestId(rid), keys_of(tokens), len(tokens))


def reuse(cache: KVCacheManager, rid: str, tokens: list[int]) -> int:
    reusable = (len(tokens) - 1) // PS
    return cache.reuse_prefix(RequestId(rid), keys_of(tokens)[:reusable])


def assert_only_idle_pages_held(cache: KVCacheManager) -> None:
    prefix = cache.prefix
    assert cache.num_sequences() == 0
    assert_prefix_cache_holds_the_rest(cache)
    if cache.store is not None:
        assert cache.held_pages == cache.committed_pages == cache.num_evicted == 0
        assert cache.reserved_pool_pages == 0
    assert cache.reset_prefix_cache() and len(prefix) == 0
    assert cache.pool.num_free_pages == cache.pool.num_pages and cache.summaries.num_used == 0
    if cache.store is not None:
        assert cache.store.backend.num_free == cache.store.backend.num_slots
        assert cache.num_slots_held() == 0


def test_page_keys_chain_the_prefix_and_the_namespace():
    keys = keys_of(A_TOKENS)
    assert len(keys) == 2  # full pages only
    assert keys_of(B_TOKENS)[:2] == keys  # same tokens, same keys
    assert keys_of([0, 1, 2, 3, 9, 9, 9, 9])[0] == keys[0]
    assert keys_of([0, 1, 2, 3, 9, 9, 9, 9])[1] != keys[1]
    assert keys_of([5, 1, 2, 3, 4, 5, 6, 7])[1] != keys[1]  # a page's key names its parents
    other = extend_page_keys([], namespace_key("test-model", PS, "int8"), A_TOKENS, PS)
    assert not set(other) & set(keys)  # another namespace never matches


def test_without_a_pool_sequences_share_device_slots_and_idle_pages_go_tail_first():
    cache = make_cache(16)
    compute(cache, "a", A_TOKENS)  # slots [[0, 2, 4], [1, 3, 5]]: pages 0 and 1 cached
    assert len(cache.prefix) == 2
    assert reuse(cache, "b", B_TOKENS) == 8
    b = cache.table(RequestId("b"))
    assert b.slots[:, :2].tolist() == [[0, 2], [1, 3]]  # a's slots, not copies
    assert b.summary_ids[:, :2].tolist() == cache.table(RequestId("a")).summary_ids[:, :2].tolist()
    assert cache.allocate(RequestId("b"), len(B_TOKENS))  # its own third page
    assert b.slots[:, :3].tolist() == [[0, 2, 6], [1, 3, 7]]
    cache.free(RequestId("a"))
    assert cache.pool.num_free_pages == 10  # b still reads 0-3
    cache.free(RequestId("b"))
    assert cache.pool.num_free_pages == 12 and cache.prefix.num_idle == 2
    assert cache.num_free_device_pages == 16  # idle pages' slots count as free
    # one more page than is free: the tail of the cached prefix goes, its head stays
    assert cache.allocate(RequestId("c"), 7 * PS)
    assert [p.slots.tolist() for p in cache.prefix.lookup(keys_of(A_TOKENS))] == [[0, 1]]
    assert cache.prefix.counters.pages_evicted == 1
    cache.free(RequestId("c"))
    assert_only_idle_pages_held(cache)


def test_in_place_a_hit_reads_the_pool_rows_and_cached_keys_make_room_tail_first():
    cache = make_cache(16, "in_place", pool_pages=10)
    compute(cache, "a", A_TOKENS)  # pool keys [[0, 1], [2, 3]]
    assert reuse(cache, "b", B_TOKENS) == 8
    b = cache.table(RequestId("b"))
    assert b.slots[:, :2].tolist() == [[-1, -2], [-3, -4]]  # -1 - row: read where they lie
    assert b.pool_keys[:, :2].tolist() == [[0, 1], [2, 3]] and b.num_stored == 2
    assert cache.committed_pages == LAYERS * 1  # a's open page; b commits nothing yet
    cache.free(RequestId("a"))
    cache.free(RequestId("b"))
    assert cache.store.backend.num_free == 6  # the four cached rows stay
    compute(cache, "d", [50 + i for i in range(17)])  # needs eight keys: page 1's go
    d_keys = cache.table(RequestId("d")).pool_keys[:, :4].reshape(-1).tolist()
    assert sorted(d_keys) == [1, 3, 4, 5, 6, 7, 8, 9]
    assert [p.pool_keys.tolist() for p in cache.prefix.lookup(keys_of(A_TOKENS))] == [[0, 2]]
    cache.free(RequestId("d"))
    assert_only_idle_pages_held(cache)


def test_copy_a_hit_is_fetched_into_slots_of_its_own_and_the_pool_copy_stays():
    cache = make_cache(16, "copy")
    cache.pool.kv[:, :6] = torch.randn(2, 6, PS, HEADS, DIM)
    compute(cache, "a", A_TOKENS)  # stored; a's decoded copies stay resident
    truth = cache.pool.k_pages[[0, 2]].clone()  # layer 0, pages 0 and 1
    cache.free(RequestId("a"))
    assert cache.pool.num_free_pages == 16  # a's own slots went; the pool rows stay
    assert reuse(cache, "b", B_TOKENS) == 8 and cache.num_evicted == 4
    view = cache.ensure_resident(0, [RequestId("b")], cache.block_tables([RequestId("b")], 2)[0],
                                 cache.eviction_count)
    assert (view >= 0).all() and cache.store.counters.pages_fetched == 2
    assert torch.equal(cache.pool.k_pages[view[0]], truth)
    cache.free(RequestId("b"))
    assert cache.pool.num_free_pages == 16
    assert_only_idle_pages_held(cache)


def test_the_sink_page_is_shared_in_device_and_the_rest_through_the_pool():
    cache = make_cache(16, "in_place", keep_sink_page=True)
    compute(cache, "a", A_TOKENS)  # page 0 pinned (slots 0, 1), page 1 stored
    assert reuse(cache, "b", B_TOKENS) == 8
    b = cache.table(RequestId("b"))
    assert b.slots[:, 0].tolist() == [0, 1] and (b.slots[:, 1] < 0).all()
    assert b.num_stored == 1
    cache.free(RequestId("a"))
    cache.free(RequestId("b"))
    assert cache.pool.num_used_pages == 2  # the shared sink page
    assert_only_idle_pages_held(cache)


def test_a_page_computed_twice_at_once_stays_private_to_the_second():
    cache = make_cache(16)
    compute(cache, "a", A_TOKENS)
    compute(cache, "b", A_TOKENS)  # no hit was asked for: its own copies
    assert [c is None for c in cache.table(RequestId("b")).cached] == [True, True]
    cache.free(RequestId("b"))
    assert cache.pool.num_free_pages == 10  # all of b's went; a's stay
    cache.free(RequestId("a"))
    assert_only_idle_pages_held(cache)


def test_with_a_pool_the_residual_window_is_stored_when_its_sequence_ends():
    device = DevicePagePool(16, PS, HEADS, DIM, dtype=torch.float32, device=CPU)
    c = make_codec("int8", PageShape(PS, HEADS, DIM, torch.float32))
    backend = LocalPool(c.slot_bytes, c.slot_bytes * 64, device=CPU)
    store = TieredStore(device, backend, c, TierOptions(residual_tokens=2 * PS),
                        kernels=load_cpu_kernels(), in_place=True)
    cache = KVCacheManager(device, LAYERS, 64, store=store,
                           summaries=SummaryStore(80, HEADS, DIM, dtype=torch.float32, device=CPU),
                           prefix=PrefixCache(PS, ROOT))
    compute(cache, "a", A_TOKENS)  # both full pages are in the residual window: not stored
    assert len(cache.prefix) == 0
    cache.free(RequestId("a"))  # now stored, and cached
    assert len(cache.prefix) == 2 and backend.num_free == 60
    assert reuse(cache, "b", B_TOKENS) == 8
    cache.free(RequestId("b"))
    assert_only_idle_pages_held(cache)


def make_seq(name: str, tokens: list[int], max_tokens: int) -> Sequence:
    return Sequence(RequestId(name), "", tokens, SamplingParams(temperature=0, max_tokens=max_tokens),
                    detokenizer=None)


def test_a_waiting_sequence_that_cannot_run_gives_its_hit_back():
    cache = make_cache(8)  # four pages per layer
    compute(cache, "a", A_TOKENS)
    cache.free(RequestId("a"))  # 2 pages cached, idle; 1 free
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), cache)
    scheduler.add(make_seq("x", [60 + i for i in range(4)], 4))
    assert [s.request_id for s in step_without_model(cache, scheduler)] == ["x"]  # 1 page
    scheduler.add(make_seq("b", B_TOKENS + [200, 201, 202, 203], 2))  # 4 pages, 2 cached
    step_without_model(cache, scheduler)  # x takes the last free page: b's other 2 do not fit
    assert [s.request_id for s in scheduler.waiting] == ["b"]
    assert scheduler.waiting[0].num_computed_tokens == 0  # it holds nothing while waiting
    while scheduler.has_unfinished():
        step_without_model(cache, scheduler)
    assert_only_idle_pages_held(cache)


@pytest.mark.parametrize("pool", ["none", "in_place", "copy"])
def test_no_leak_after_random_adds_aborts_and_completions_with_sharing(pool):
    """Prompts drawn from three shared heads, random lengths, aborts at random steps:
    budgets hold at every step, and at the end only idle cached pages are held."""
    cache = make_cache(40, pool, pool_pages=48)
    random_run([cache], random.Random(7))
    assert_only_idle_pages_held(cache)


def random_run(caches: list[KVCacheManager], rng: random.Random) -> None:
    """Requests over `caches` (engines, taking turns) drawn from three shared heads, random
    lengths, aborts at random steps; budgets hold at every step; sharing must happen."""
    schedulers = [Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=24), c)
                  for c in caches]
    heads = [[rng.randrange(50) for _ in range(rng.choice([4, 8, 12]))] for _ in range(3)]
    reused = 0
    for i in range(60):
        turn = i % len(caches)
        cache, scheduler = caches[turn], schedulers[turn]
        if rng.random() < 0.5:
            tokens = rng.choice(heads) + [rng.randrange(50) for _ in range(rng.randrange(1, 9))]
            scheduler.add(make_seq(f"r{i}", tokens, rng.randrange(1, 6)))
        live = scheduler.running + list(scheduler.waiting)
        if live and rng.random() < 0.15:
            scheduler.remove(rng.choice(live).request_id)  # an abort
        for seq in step_without_model(cache, scheduler):
            reused += seq.num_cached_tokens or 0
        assert cache.pool.num_used_pages <= cache.pool.num_pages
        if cache.store is not None:
            assert cache.held_pages <= cache.pool.num_pages
            assert cache.reserved_pool_pages <= cache.store.backend.num_slots
    for cache, scheduler in zip(caches, schedulers):
        while scheduler.has_unfinished():
            step_without_model(cache, scheduler)
    assert sum(c.prefix.counters.hit_tokens for c in caches) > 0 and reused > 0


def test_summary_slots_of_shared_pages_are_freed_once():
    cache = make_cache(16)
    compute(cache, "a", A_TOKENS)
    reuse(cache, "b", B_TOKENS)
    used = cache.summaries.num_used
    cache.free(RequestId("a"))
    assert cache.summaries.num_used == used - LAYERS  # a's open page only
    cache.free(RequestId("b"))
    assert cache.summaries.num_used == LAYERS * 2  # the cached pages'
    assert np.unique(np.concatenate([p.summary_ids for p in cache.prefix.idle_pages()])).size == 4
    assert_only_idle_pages_held(cache)
