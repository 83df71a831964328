"""`KVCacheManager`, `TieredStore` and the scheduler's admission, built from small parts.

No model is loaded: a two-layer cache of 4-token pages over a real local pool, driven
the way the engine drives it, with exact page entries, slot ids and keys asserted
(vLLM's tests/v1/core style). A page entry is a DEVICE slot (>= 0) or -1 - pool key.
"""

from __future__ import annotations

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
from speckv.kv.tiers import Tier, TieredStore, TierOptions
from speckv.pool.local import LocalPool
from speckv.pool.slots import SlotAllocator
from tests.conftest import step_without_model

LAYERS, PS, HEADS, DIM = 2, 4, 1, 8
CPU = torch.device("cpu")


def make_cache(device_pages: int, *, in_place: bool, pool_pages: int = 64,
               codec: str = "int8") -> KVCacheManager:
    pool = DevicePagePool(device_pages, PS, HEADS, DIM, dtype=torch.float32, device=CPU)
    c = make_codec(codec, PageShape(PS, HEADS, DIM, torch.float32))
    backend = LocalPool(c.slot_bytes, c.slot_bytes * pool_pages, device=CPU)
    store = TieredStore(pool, backend, c, TierOptions(),
                        kernels=load_cpu_kernels() if in_place else None, in_place=in_place)
    return KVCacheManager(pool, LAYERS, max_model_len=64, store=store,
                          eviction=make_eviction("lru", pool.num_slots))


def make_seq(name: str, prompt_len: int, max_tokens: int) -> Sequence:
    return Sequence(RequestId(name), "", list(range(prompt_len)),
                    SamplingParams(temperature=0, max_tokens=max_tokens), detokenizer=None)


def test_slot_allocator_hands_out_lowest_ids_first_and_takes_back_exactly():
    slots = SlotAllocator(4)
    assert slots.allocate(3).tolist() == [0, 1, 2]
    assert slots.allocate(2) is None and slots.num_free == 1  # nothing taken
    slots.free(np.array([1]))
    assert slots.allocate(2).tolist() == [1, 3]
    with pytest.raises(RuntimeError, match="freed twice"):
        slots.free(np.array([0, 0]))


def test_in_place_a_stored_page_leaves_device_and_its_entry_names_its_pool_row():
    cache = make_cache(16, in_place=True)
    a = RequestId("a")
    assert cache.allocate(a, 9)  # 3 pages per layer
    table = cache.table(a)
    assert table.slots[:, :3].tolist() == [[0, 2, 4], [1, 3, 5]]  # page-major, layer-minor
    assert cache.committed_pages == 6
    cache.store_sealed([(a, 9)])  # pages 0 and 1 are full: stored
    assert table.pool_keys[:, :3].tolist() == [[0, 1, -1], [2, 3, -1]]
    assert table.slots[:, :3].tolist() == [[-1, -2, 4], [-3, -4, 5]]  # -1 - key
    assert cache.pool.num_used_pages == 2 and cache.committed_pages == 2  # open pages only
    view = cache.ensure_resident(1, [a], cache.block_tables([a], 3)[1], cache.eviction_count)
    assert view.tolist() == [[-3, -4, 5]]  # nothing moved: read where they lie
    assert cache.store.counters.pages_fetched == 0 and cache.store.counters.evictions == 0
    cache.free(a)
    assert cache.pool.num_free_pages == 16 and cache.store.backend.num_free == 64
    assert cache.committed_pages == cache.held_pages == cache.num_evicted == 0


def test_copy_evicts_the_least_recently_read_pooled_pages_and_fetches_them_back():
    cache = make_cache(8, in_place=False)
    a, b = RequestId("a"), RequestId("b")
    assert cache.allocate(a, 9)  # slots [[0, 2, 4], [1, 3, 5]]
    cache.store_sealed([(a, 9)])  # pages 0, 1 pooled; still resident (evictable)
    assert cache.committed_pages == LAYERS * 1 + 2  # open pages + one layer's pooled pages
    cache.ensure_resident(1, [a], cache.block_tables([a], 3)[1], cache.eviction_count)
    assert cache.allocate(b, 5)  # 4 pages: 2 free, 2 evicted -- layer 0's, read least lately
    assert cache.table(a).slots[:, :3].tolist() == [[-1, -2, 4], [1, 3, 5]]
    assert sorted(cache.table(b).slots[:, :2].reshape(-1).tolist()) == [0, 2, 6, 7]
    assert cache.store.counters.evictions == 2
    cache.free(b)
    view = cache.ensure_resident(0, [a], cache.block_tables([a], 3)[0], cache.eviction_count)
    assert (view >= 0).all() and cache.store.counters.pages_fetched == 2  # came back
    cache.free(a)
    assert cache.pool.num_free_pages == 8 and cache.committed_pages == 0


def test_a_load_plan_takes_slots_for_missing_pages_and_fetches_only_those_not_promoted():
    """prepare_load -> (a prefetcher promotes) -> complete_load, as the engine step does."""
    cache = make_cache(8, in_place=False)
    a, b = RequestId("a"), RequestId("b")
    assert cache.allocate(a, 9)  # slots [[0, 2, 4], [1, 3, 5]]
    cache.pool.kv[:, :6] = torch.randn(2, 6, PS, HEADS, DIM)
    cache.store_sealed([(a, 9)])  # keys [[0, 1], [2, 3]]
    truth = cache.pool.k_pages[[0, 2]].clone()  # layer 0's pooled pages (decoded int8)
    cache.ensure_resident(1, [a], cache.block_tables([a], 3)[1], cache.eviction_count)
    assert cache.allocate(b, 5)  # evicts layer 0's pages 0 and 1 (slots 0, 2)
    assert cache.tiers(a).tolist() == [[Tier.POOL, Tier.POOL, Tier.DEVICE], [Tier.DEVICE] * 3]
    cache.free(b)
    cache.pool.k_pages[[0, 2, 6, 7]] = 0  # what b left there
    plan = cache.prepare_load(0, [a], cache.block_tables([a], 3)[0], cache.eviction_count)
    assert plan.keys.tolist() == [0, 1]  # layer 0's pages 0 and 1, in the pool only
    slots = plan.slots.tolist()
    assert len(set(slots)) == 2 and set(slots) <= {0, 2, 6, 7}  # free ones: nothing evicted
    assert cache.store.counters.evictions == 2
    cache.pool.k_pages[slots[1]] = truth[1]  # as if promoted: already in its slot
    plan.promoted[1] = True
    view = cache.complete_load(plan)
    assert view.tolist() == [[slots[0], slots[1], 4]]
    assert cache.store.counters.pages_fetched == 1  # only the page not promoted
    assert torch.equal(cache.pool.k_pages[slots], truth)
    assert cache.num_pooled_resident == 4  # all four pooled pages resident again
    freed = []
    cache.on_keys_freed(freed.append)
    cache.free(a)
    assert freed == [[0, 1, 2, 3]] and cache.num_slots_held() == 0


def test_in_place_a_load_plan_is_empty_and_the_table_is_read_as_it_is():
    cache = make_cache(16, in_place=True)
    a = RequestId("a")
    assert cache.allocate(a, 9)
    cache.store_sealed([(a, 9)])
    table = cache.block_tables([a], 3)[0]
    plan = cache.prepare_load(0, [a], table, cache.eviction_count)
    assert plan.keys.size == 0 and cache.complete_load(plan) is table
    assert cache.tiers(a).tolist() == [[Tier.POOL, Tier.POOL, Tier.DEVICE]] * 2
    cache.free(a)


def _step(cache: KVCacheManager, scheduler: Scheduler) -> list[str]:
    """`step_without_model`; the ids that ran."""
    return [s.request_id for s in step_without_model(cache, scheduler)]


@pytest.mark.parametrize("in_place", [False, True])
def test_admission_reserves_each_sequence_at_its_longest_so_all_decode_every_step(in_place):
    probe = make_cache(64, in_place=in_place)
    longest = probe.worst_requirement(8 + 6)
    cache = make_cache(2 * longest, in_place=in_place)  # room for two at their longest
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), cache)
    for name in "abc":
        scheduler.add(make_seq(name, 8, 6))
    ran = [_step(cache, scheduler) for _ in range(6)]
    assert ran == [["a", "b"]] * 6  # c waits; a and b decode in every step, none preempted
    assert scheduler.num_preemptions == 0
    assert _step(cache, scheduler) == ["c"]  # a and b finished: their room is c's
    while scheduler.has_unfinished():
        _step(cache, scheduler)
    assert cache.held_pages == 0 and cache.pool.num_free_pages == cache.pool.num_pages
