"""The tiered KV cache: DEVICE backed by an encoded POOL (local and memnode backends).

Scenarios against the real bundled model: offloading never changes greedy tokens
with codec `none` (invariant 1), pages are never lost or leaked (invariant 2),
budgets hold (invariant 3), and every bad option is refused with a clear error.
"""

from __future__ import annotations

import random

import pytest

from conftest import assert_no_leak, check_tier_invariants, run_to_completion
from speckv import SamplingParams
from speckv.pool.base import PoolUnavailable

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PAGE = 24_576  # one page of one layer, float32
LAYERS = 30

# mixed lengths: one page, several pages, a partial last page, a longer prompt
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea and the wind. " * 6,
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 " * 4,
    "Hello",
    "Once upon a time, in a small village by the mountains, " * 9,
]


@pytest.fixture(scope="module")
def reference(make_llm):
    """F1's all-resident engine (no pool): the tokens every tiered run must reproduce."""
    llm = make_llm(device_kv_bytes="64MiB")
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _tight_budget(make_llm, **pool_options) -> int:
    """The smallest DEVICE budget that still runs the longest request alone."""
    probe = make_llm(device_kv_bytes="64MiB", **pool_options)
    engine = probe.engine
    longest = max(len(engine.tokenizer.encode(p)) for p in PROMPTS) + GREEDY.max_tokens
    pages = engine.cache.worst_requirement(longest)
    probe.close()
    return pages * PAGE


@pytest.mark.slow
@pytest.mark.parametrize("kv_read", ["copy", "in_place"])
@pytest.mark.parametrize("backend", ["local", "memnode"])
def test_offloading_never_changes_greedy_tokens(make_llm, reference, backend, kv_read):
    options = dict(pool=backend, pool_bytes="64MiB", kv_read=kv_read)
    tight = _tight_budget(make_llm, **options)
    for budget in ["64MiB", 60 * LAYERS * PAGE, 2 * tight, tight]:
        llm = make_llm(device_kv_bytes=budget, **options)
        try:
            outs = llm.generate(PROMPTS, GREEDY)
            assert [o.token_ids for o in outs] == reference, f"budget {budget}"
            stats = llm.stats()
            assert stats["kv_read"] == kv_read
            if kv_read == "in_place":  # pooled pages were read where they lie, never copied
                assert stats["tier_pages_read_in_place"] > 0
                assert stats["tier_pages_fetched"] == 0 and stats["tier_evictions"] == 0
                assert stats["pool_pages_loaded"] == stats["tier_pages_read_in_place"]
            elif budget == tight:  # the budget was short: pages really came back from the pool
                assert stats["tier_pages_fetched"] > 0 and stats["tier_evictions"] > 0
                assert stats["pool_pages_loaded"] == stats["tier_pages_fetched"]
            elif budget == "64MiB":  # everything fits: nothing fetched, F1's behaviour
                assert stats["tier_pages_fetched"] == 0
            assert_no_leak(llm.engine)
        finally:
            llm.close()


def test_lossy_codec_outputs_do_not_depend_on_the_budget(make_llm):
    """A resident page is replaced by its decoded form when stored, so a page reads the
    same whether it stayed in DEVICE or came back from the pool."""
    outs = []
    for budget in ["64MiB", 8 * LAYERS * PAGE]:
        llm = make_llm(device_kv_bytes=budget, pool="local", pool_bytes="64MiB", codec="kivi4",
                       kv_read="copy")
        outs.append([o.token_ids for o in llm.generate(PROMPTS[:3], GREEDY)])
        if budget != "64MiB":
            assert llm.stats()["tier_pages_fetched"] > 0
        assert_no_leak(llm.engine)
        llm.close()
    assert outs[0] == outs[1]


@pytest.mark.parametrize("codec", ["int8", "kivi4"])
def test_in_place_and_copy_read_the_same_values(make_llm, codec):
    """The kernels decode a pool row as the codec's `decode` does, bit for bit, so reading
    in place and copying into DEVICE first give identical tokens, dense and selected."""
    outs = {}
    for kv_read in ("copy", "in_place"):
        for selector in ("full", "quest"):
            llm = make_llm(device_kv_bytes=8 * LAYERS * PAGE, pool="local", pool_bytes="64MiB",
                           codec=codec, kv_read=kv_read, selector=selector, token_budget=64,
                           min_context_tokens=32)
            outs[kv_read, selector] = [o.token_ids for o in llm.generate(PROMPTS[:3], GREEDY)]
            stats = llm.stats()
            moved = stats["tier_pages_read_in_place" if kv_read == "in_place" else
                          "tier_pages_fetched"]
            assert moved > 0, f"{kv_read}: no page came from the pool"
            assert_no_leak(llm.engine)
            llm.close()
    assert outs["copy", "full"] == outs["in_place", "full"]
    assert outs["copy", "quest"] == outs["in_place", "quest"]


@pytest.mark.slow
@pytest.mark.parametrize("kv_read", ["copy", "in_place"])
def test_random_adds_aborts_and_completions_lose_and_leak_nothing(make_llm, kv_read):
    rng = random.Random(7)
    llm = make_llm(device_kv_bytes=20 * LAYERS * PAGE, pool="local", pool_bytes="24MiB",
                   codec="int8", residual_tokens=20, keep_sink_page=True, max_num_seqs=4,
                   max_num_batched_tokens=64, kv_read=kv_read)
    engine = llm.engine
    live: list[str] = []
    steps = 0
    for _ in range(120):
        action = rng.random()
        if action < 0.25 and len(live) < 6:
            prompt = " ".join(rng.choice(["sea", "wind", "stone", "river", "light"])
                              for _ in range(rng.randint(1, 120)))
            params = SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.8,
                                    seed=rng.randint(0, 99))
            live.append(engine.add_request(prompt, params))
        elif action < 0.35 and live:
            engine.abort(live.pop(rng.randrange(len(live))))
        for out in engine.step():
            if out.finished:
                live.remove(out.request_id)
        steps += 1
        check_tier_invariants(engine)
    run_to_completion(engine)
    counters = engine.cache.store.counters
    if kv_read == "copy":
        assert counters.evictions > 0, "the scenario never evicted"
    else:
        assert counters.pages_read_in_place > 0 and counters.evictions == 0
    assert_no_leak(engine)
    llm.close()


def test_sealed_pages_are_stored_once_they_leave_the_residual_window(make_llm):
    llm = make_llm(device_kv_bytes="16MiB", pool="local", pool_bytes="16MiB",
                   residual_tokens=32, keep_sink_page=True)
    engine = llm.engine
    rid = engine.add_request(list(range(100, 200)), SamplingParams(temperature=0,
                                                                   max_tokens=2))  # 100 tokens
    engine.step()  # prefill: pages 0-5 sealed, 6 open
    table = engine.cache.table(rid)
    # sink page 0 never stored; pages wholly before the last 32 tokens (1..3) stored
    assert table.num_stored == 3
    assert (table.pool_keys[:, 0] == -1).all() and (table.pool_keys[:, 1:4] >= 0).all()
    assert (table.pool_keys[:, 4:] == -1).all()
    assert engine.stats()["pool_slots_used"] == 3 * LAYERS
    run_to_completion(engine)
    assert_no_leak(engine)
    llm.close()


def test_budget_below_one_step_fails_at_start_with_the_minimum(make_llm):
    with pytest.raises(ValueError, match=r"minimum is 2211840 bytes"):
        make_llm(device_kv_bytes=LAYERS * PAGE * 3 - 1, pool="local", residual_tokens=17)
    llm = make_llm(device_kv_bytes=LAYERS * PAGE * 3, pool="local", pool_bytes="8MiB",
                   residual_tokens=17)  # exactly the minimum works
    assert llm.generate("Hi", SamplingParams(temperature=0, max_tokens=3))[0].num_generated_tokens == 3
    llm.close()


@pytest.mark.parametrize("options, message", [
    (dict(pool="local", codec="int9"), r"unknown codec 'int9'; known codecs: .*int8.*kivi4"),
    (dict(pool="local", codec="int8+gzip"), r"unknown codec .*<codec>\+zstd"),
    (dict(pool="disk"), r"unknown pool backend 'disk'; known: none, local, memnode"),
    (dict(pool="memnode", link="cxl9"), r"unknown link 'cxl9'; known links: none, cxl2-x16"),
    (dict(pool="memnode", link="custom:0,5"), r"custom:<GB/s>,<ns>"),
    (dict(pool="local", eviction="random"), r"unknown eviction policy 'random'; known: fifo, lru"),
    (dict(codec="int8"), r"pool='none'"),
    (dict(pool="local", pool_bytes="0"), r"pool_bytes must be > 0"),
    (dict(pool="local", residual_tokens=-1), r"residual_tokens must be >= 0"),
    (dict(pool="local", link="cxl2-x16"), r"apply to pool='memnode' only"),
    (dict(pool="local", pool_numa_node=7), r"NUMA nodes \[0"),
    (dict(pool="local", codec="fp16", kv_read="in_place"),
     r"kv_read='in_place' needs .*a codec they read \(.*int8.*; not 'fp16'\).*use kv_read='copy'"),
    (dict(pool="local", kv_read="sideways"), r"kv_read='sideways' is not one of auto, in_place, copy"),
])
def test_bad_pool_options_are_refused_clearly(make_llm, options, message):
    with pytest.raises(ValueError, match=message):
        make_llm(device_kv_bytes="8MiB", **options)


def test_request_larger_than_the_pool_is_rejected_and_engine_stays_usable(make_llm):
    llm = make_llm(device_kv_bytes="8MiB", pool="local", pool_bytes=20 * LAYERS * PAGE)
    with pytest.raises(ValueError, match=r"pool pages but the pool holds 600"):
        llm.generate(list(range(100, 500)), SamplingParams(temperature=0, max_tokens=4))
    assert_no_leak(llm.engine)
    assert llm.generate("Hi", SamplingParams(temperature=0, max_tokens=2))[0].num_generated_tokens == 2
    # at the edge: 20 pages a layer hold 309 + 11 tokens (the 20th page open); one more
    # token is refused up front, never admitted to wait for room that cannot come
    fits = llm.generate(list(range(100, 409)), SamplingParams(temperature=0, max_tokens=11,
                                                              ignore_eos=True))
    assert fits[0].num_generated_tokens == 11
    with pytest.raises(ValueError, match=r"needs up to 630 pool pages but the pool holds 600"):
        llm.generate(list(range(100, 409)), SamplingParams(temperature=0, max_tokens=12))
    assert_no_leak(llm.engine)
    llm.close()


def test_full_pool_makes_requests_wait_and_never_drops_a_page(make_llm, reference):
    """Two requests that each fit the pool but not together: admission reserves what the
    first needs at its longest, so the second waits, whole, until the first finishes
    (nothing of it is computed only to be preempted), nothing is dropped, and both
    produce the all-resident tokens."""
    probe = make_llm(device_kv_bytes="8MiB")
    prompt = probe.tokenizer.encode(PROMPTS[1])
    pages = -(-(len(prompt) + GREEDY.max_tokens) // 16)  # one request's most pages a layer
    assert 2 * -(-len(prompt) // 16) > pages + 1  # two prompts do not fit together
    llm = make_llm(device_kv_bytes="16MiB", pool="local", pool_bytes=(pages + 1) * LAYERS * PAGE)
    engine = llm.engine
    a = engine.add_request(prompt, GREEDY)
    b = engine.add_request(prompt, GREEDY)
    finals, steps_b_waited = {}, 0
    while engine.has_unfinished():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
        check_tier_invariants(engine)
        running = [s.request_id for s in engine.scheduler.running]
        if a not in finals:
            assert running == [a]  # b is never admitted beside a
            steps_b_waited += 1
    assert steps_b_waited > 0 and engine.scheduler.num_preemptions == 0
    assert finals[a].token_ids == finals[b].token_ids == reference[1]
    assert_no_leak(engine)
    llm.close()


def test_pool_unavailable_is_a_runtime_error_with_the_socket(make_llm, tmp_path):
    sock = str(tmp_path / "nobody.sock")
    with pytest.raises(PoolUnavailable, match=rf"cannot reach the memory node at {sock}.*speckv memnode"):
        make_llm(device_kv_bytes="8MiB", pool="memnode", memnode_socket=sock)
