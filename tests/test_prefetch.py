"""The prefetcher: predictors, the PREFETCH tier and its worker, and their accounting.

Invariant 4 (prefetch changes timing, never results) on the real model for every
predictor, an accounting scenario whose counts are worked out by hand, cancels with
transfers in flight, and every bad option.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import torch

from conftest import assert_no_leak, check_tier_invariants
from speckv import SamplingParams
from speckv.codecs.base import PageShape, make_codec
from speckv.config import PrefetchConfig
from speckv.kv.page_pool import DevicePagePool
from speckv.kv.tiers import TieredStore, TierOptions
from speckv.pool.link import parse_link
from speckv.pool.local import LocalPool
from speckv.prefetch.buffer import PageState
from speckv.prefetch.prefetcher import Prefetcher

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
PAGE, LAYERS = 24_576, 30
PROMPTS = [
    "Once upon a time, in a small village by the mountains, " * 16,
    "Write a short poem about the sea and the wind. " * 10,
    "The capital of France is",
]
# DEVICE holds 8 pages a layer; the three sequences have ~26 a layer: most come back
# predictors move pages into fast memory: the copy path (in place, nothing is copied)
TIGHT = dict(pool="local", pool_bytes="64MiB", device_kv_bytes=8 * LAYERS * PAGE, kv_read="copy")
# quest on these short contexts: 4 pages of ~14, from the first token on
QUEST = dict(selector="quest", token_budget=64, min_context_tokens=0)
PREDICTORS = ["layer_ahead", "step_ahead", "speculative_query", "layer_ahead,step_ahead"]


@pytest.fixture(scope="module")
def references(make_llm):
    """Tokens without prefetching, per selector, on the same small DEVICE budget."""
    refs = {}
    for selector in ("full", "quest"):
        llm = make_llm(**(QUEST if selector == "quest" else {}), **TIGHT)
        refs[selector] = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        stats = llm.stats()
        assert stats["tier_pages_fetched"] > 0  # the budget is really short
        if selector == "quest":  # and quest really selects
            assert stats["selection_fraction"] < 0.7 and stats["tier_fetches_skipped"] > 0
        llm.close()
        in_place = make_llm(**(QUEST if selector == "quest" else {}),
                            **{**TIGHT, "kv_read": "in_place"})
        assert [o.token_ids for o in in_place.generate(PROMPTS, GREEDY)] == refs[selector]
        in_place.close()
    return refs


@pytest.mark.slow
@pytest.mark.parametrize("kv_read", ["copy", "in_place"])
@pytest.mark.parametrize("selector", ["full", "quest"])
@pytest.mark.parametrize("predictor", PREDICTORS)
def test_prefetching_never_changes_tokens(make_llm, references, predictor, selector, kv_read):
    """Copy: hinted pages come into the PREFETCH tier and are promoted; in place: their
    rows are software-prefetched, nothing is promoted and nothing is ever late."""
    llm = make_llm(**(QUEST if selector == "quest" else {}), predictor=predictor,
                   **{**TIGHT, "kv_read": kv_read})
    try:
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == references[selector]
        stats = llm.stats()
        assert stats["kv_read"] == kv_read
        assert stats["prefetch_issued"] > 0 and stats["prefetch_used"] > 0, stats
        assert stats["prefetch_used"] + stats["prefetch_wasted"] <= stats["prefetch_issued"]
        if kv_read == "copy":
            assert stats["prefetch_pages_promoted"] == stats["prefetch_used"]
        else:
            assert stats["prefetch_pages_promoted"] == 0 and stats["prefetch_late"] == 0
            # every row attention read in place was a hint used or a demand miss
            assert stats["prefetch_used"] + stats["prefetch_demand_misses"] <= \
                stats["tier_pages_read_in_place"]
        assert_no_leak(llm.engine)
    finally:
        llm.close()


@pytest.mark.slow
def test_prefetching_from_a_memory_node_never_changes_tokens(make_llm, references):
    """The worker reads the node's shared memory while the engine thread talks to the
    node over its socket: neither may take the other's reply for a hang-up."""
    options = {**TIGHT, "pool": "memnode", "pool_bytes": "64MiB", "link": "pcie4-x16"}
    llm = make_llm(predictor="layer_ahead,step_ahead", **options)
    try:
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == references["full"]
        assert llm.stats()["prefetch_used"] > 0
        assert_no_leak(llm.engine)
    finally:
        llm.close()


@pytest.mark.slow
def test_layer_ahead_under_full_serves_most_pool_reads(make_llm):
    """Under `full` every layer reads every page, which layer_ahead asks for one layer
    early: most pages a step needs from the pool come from the PREFETCH tier. Dense
    layers are not scored for precision (predicting them is trivial)."""
    llm = make_llm(predictor="layer_ahead", **TIGHT)
    try:
        llm.generate(PROMPTS, GREEDY)
        s = llm.stats()
        assert s["prefetch_hit_rate"] > 0.9, s
        # every page brought back was promoted or fetched on demand, counted once
        assert s["prefetch_demand_misses"] == s["tier_pages_fetched"]
        assert s["prefetch_pages_promoted"] == s["prefetch_used"]
        assert "prefetch_precision" not in s and s["prefetch_read"] == 0
    finally:
        llm.close()


@pytest.mark.slow
def test_speculative_query_predicts_most_of_quests_selection(make_llm):
    llm = make_llm(**QUEST, predictor="speculative_query", **TIGHT)
    try:
        llm.generate(PROMPTS, GREEDY)
        s = llm.stats()
        assert 0.5 < s["prefetch_precision"] < 1.0 and 0.5 < s["prefetch_recall"] < 1.0, s
    finally:
        llm.close()


# ---------------------------------------------------------------- exact accounting


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


@pytest.fixture
def scripted():
    """A store of 8 pooled pages (codec none) and a prefetcher with a 4-page PREFETCH tier
    (spare pages in DEVICE's tensor)."""
    shape = PageShape(16, 3, 64, torch.float32)
    codec = make_codec("none", shape)
    device = DevicePagePool(16, 16, 3, 64, dtype=torch.float32, device=torch.device("cpu"),
                            spare=4)
    store = TieredStore(device, LocalPool(codec.slot_bytes, 1 << 20, device=torch.device("cpu")),
                        codec, TierOptions())
    slots = device.allocate(8)
    device.k_pages[slots] = torch.randn(8, 16, 3, 64)
    device.v_pages[slots] = torch.randn(8, 16, 3, 64)
    keys = store.store(slots)
    truth = (device.k_pages[slots].clone(), device.v_pages[slots].clone())
    device.free(slots)
    prefetcher = Prefetcher(store, PrefetchConfig(prefetch_bytes=4 * PAGE), LAYERS)
    yield prefetcher, keys, truth
    prefetcher.close()


def test_device_and_its_spare_pool_exchange_slots_without_copying():
    """DEVICE (3 pages) and the PREFETCH tier (2 spare pages) share one tensor: a
    promotion trades slot ids, each budget keeps its count, the page stays put."""
    device = DevicePagePool(3, 16, 3, 64, dtype=torch.float32, device=torch.device("cpu"),
                            spare=2)
    spare = device.spare_pool()
    assert device.num_slots == 5 and spare.kv is device.kv and spare.num_pages == 2
    d, p = device.allocate(1), spare.allocate(2)
    assert d.tolist() == [0] and p.tolist() == [3, 4]
    device.k_pages[3] = 7.0  # a prefetched page in spare slot 3
    device.exchange(d, p[:1])  # DEVICE gives slot 0 for slot 3 ...
    spare.exchange(p[:1], d)  # ... and the spare pool takes 0 for 3, then frees it
    spare.free(d)
    assert device.num_used_pages == 1 and spare.num_used_pages == 1
    assert (device.k_pages[3] == 7.0).all()  # not moved
    assert spare.allocate(1).tolist() == [0]  # the slot DEVICE gave
    device.free(np.array([3]))
    assert device.allocate(3).tolist() == [3, 1, 2]
    with pytest.raises(RuntimeError, match="bug: exchanged slots"):
        device.exchange(np.array([4]), np.array([0]))  # slot 4 is not DEVICE's


def test_accounting_is_exact_on_a_scripted_scenario(scripted):
    prefetcher, keys, (k_truth, v_truth) = scripted
    store, device = prefetcher.store, prefetcher.store.device_pool
    k = [int(x) for x in keys]

    def demand(wanted):  # what promote does between prepare_load and complete_load
        dst = device.allocate(len(wanted))
        taken = dst.copy()
        hit = prefetcher.adopt(np.array(wanted), dst)  # promoted: dst now the PREFETCH slots
        assert (dst[~hit] == taken[~hit]).all() and not np.isin(dst[hit], taken).any()
        return hit.tolist(), dst

    assert prefetcher.prefetch([k[0], k[1], k[2]], "script") == 3  # issued 3
    prefetcher.drain()
    hit, dst = demand([k[0], k[5]])  # k0 prefetched and ready: used; k5 a demand miss
    assert hit == [True, False]
    assert torch.equal(device.k_pages[dst[0]], k_truth[0])  # promoted bit-exact
    assert torch.equal(device.v_pages[dst[0]], v_truth[0])
    # 3 more into a 4-page tier holding k1, k2: the oldest ready page (k1) is dropped
    assert prefetcher.prefetch([k[3], k[4], k[6]], "script") == 3
    prefetcher.forget([k[2]])  # k2's page is freed unused: wasted
    prefetcher.drain()
    store.backend.link = parse_link("custom:100,400000000")  # 0.4 s a transfer ...
    assert prefetcher.prefetch([k[7]], "script") == 1
    wait_for(lambda: prefetcher.buffer.state(k[7]) == PageState.MOVING)
    hit, dst = demand([k[7]])  # ... so a step that demands k7 mid-transfer waits: late, used
    assert hit == [True]
    assert torch.equal(device.k_pages[dst[0]], k_truth[7])
    store.backend.link = None
    prefetcher.worker.pause()  # k5's transfer is queued, not begun ...
    assert prefetcher.prefetch([k[5]], "script") == 1
    assert prefetcher.buffer.state(k[5]) == PageState.QUEUED
    hit, _ = demand([k[5]])  # ... so the step fetches it itself: overtaken, a demand miss
    assert hit == [False] and prefetcher.buffer.state(k[5]) == PageState.ABSENT
    prefetcher.worker.resume()
    assert prefetcher.prefetch([k[3], k[4]], "script") == 0  # already there: not reissued
    prefetcher.forget([k[3], k[4], k[6]])  # the rest are freed unused
    stats = prefetcher.stats()
    assert {name: stats[f"prefetch_{name}"] for name in
            ("issued", "used", "late", "overtaken", "wasted", "no_room", "failed",
             "demand_misses", "pages_promoted")} == {
        "issued": 8, "used": 2, "late": 1, "overtaken": 1, "wasted": 5, "no_room": 0,
        "failed": 0, "demand_misses": 2, "pages_promoted": 2}
    assert stats["prefetch_hit_rate"] == pytest.approx(2 / 4)
    assert stats["prefetch_bytes_read"] == 7 * PAGE  # codec none: a page's bytes each, not k5's
    assert stats["prefetch_late_wait_seconds"] > 0.1
    prefetcher.drain()
    assert prefetcher.buffer.num_used == 0 and not prefetcher.buffer.keys()


def test_in_place_hints_are_accounted_exactly():
    """Read in place, a hint software-prefetches the rows (nothing is copied): a row is
    used when attention then reads it, wasted when freed first or not read by the end
    of the step after its hint, and a row hinted twice is issued once."""
    from speckv.kv.cpu_kernels import load_cpu_kernels
    from speckv.prefetch.predictors import StepView

    kernels = load_cpu_kernels()
    shape = PageShape(16, 3, 64, torch.float32)
    codec = make_codec("none", shape)
    device = DevicePagePool(16, 16, 3, 64, dtype=torch.float32, device=torch.device("cpu"))
    store = TieredStore(device, LocalPool(codec.slot_bytes, 1 << 20, device=torch.device("cpu")),
                        codec, TierOptions(), kernels=kernels, in_place=True)
    slots = device.allocate(8)
    k = [int(x) for x in store.store(slots)]
    prefetcher = Prefetcher(store, PrefetchConfig(), LAYERS)
    view = StepView(0, [], np.zeros(0, dtype=np.int64), 0, LAYERS,
                    lambda layer: np.ones(0, dtype=bool))
    prefetcher.begin_step(view, None)  # step 1
    assert prefetcher.prefetch([k[0], k[1], k[2]], "a") == 3
    assert prefetcher.prefetch([k[1], k[3]], "b") == 1  # k1 is hinted already
    prefetcher.consumed(np.array([k[0], k[5]]))  # k0 used; k5 a demand miss
    prefetcher.forget([k[2]])  # freed unread: wasted
    prefetcher.end_step()  # k1, k3 were hinted this step: kept for the next one
    prefetcher.begin_step(view, None)  # step 2
    prefetcher.consumed(np.array([k[1]]))  # used
    prefetcher.end_step()  # k3 unread through the step after its hint: wasted
    prefetcher.begin_step(view, None)  # step 3
    assert prefetcher.prefetch([k[6]], "a") == 1
    prefetcher.set_predictors(())  # switching predictors drops what is hinted: wasted
    stats = prefetcher.stats()
    assert stats["prefetch_into"] == "cpu_caches"
    assert {name: stats[f"prefetch_{name}"] for name in
            ("issued", "used", "late", "wasted", "demand_misses", "pages_promoted")} == {
        "issued": 5, "used": 2, "late": 0, "wasted": 3, "demand_misses": 1,
        "pages_promoted": 0}
    assert (stats["prefetch_a_issued"], stats["prefetch_b_issued"]) == (4, 1)
    assert (stats["prefetch_a_wasted"], stats["prefetch_b_wasted"]) == (2, 1)
    assert stats["prefetch_hit_rate"] == pytest.approx(2 / 3)
    assert stats["prefetch_bytes_read"] == 5 * PAGE  # codec none: a page's bytes each
    with pytest.raises(RuntimeError, match="row out of range"):
        kernels.prefetch_rows(store.rows(), torch.tensor([store.rows().shape[0]]))
    prefetcher.close()


def test_a_full_tier_of_pages_in_flight_issues_no_more(scripted):
    prefetcher, keys, _ = scripted
    k = [int(x) for x in keys]
    prefetcher.start()
    prefetcher.worker.pause()
    assert prefetcher.prefetch(k[:6], "script") == 4  # 4 slots, none ready to drop
    assert prefetcher.stats()["prefetch_no_room"] == 2
    prefetcher.forget(k[:4])  # cancelled in flight: released when their transfer ends
    prefetcher.worker.resume()
    prefetcher.drain()
    assert prefetcher.buffer.num_used == 0
    assert prefetcher.stats()["prefetch_wasted"] == 4


# ---------------------------------------------------------------- cancels, trace


@pytest.mark.slow
def test_abort_with_prefetches_in_flight_leaks_nothing(make_llm):
    llm = make_llm(predictor="layer_ahead", **TIGHT)
    engine = llm.engine
    try:
        for p in PROMPTS:
            engine.add_request(p, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        for _ in range(6):
            engine.step()
            check_tier_invariants(engine)
        engine.prefetcher.worker.pause()
        engine.step()  # this step's last layer hints the next step's first: held in flight
        in_flight = engine.prefetcher.buffer.num_in_flight()
        assert in_flight > 0
        for rid in list(engine._sequences):
            engine.abort(rid)
        engine.prefetcher.worker.resume()
        assert_no_leak(engine)
        assert engine.stats()["prefetch_wasted"] >= in_flight
        out = llm.generate(PROMPTS[2], GREEDY)[0]  # and the engine goes on
        assert out.num_generated_tokens == GREEDY.max_tokens
    finally:
        llm.close()


@pytest.mark.slow
def test_trace_has_one_line_per_step_and_sums_to_the_stats(make_llm, tmp_path):
    path = tmp_path / "trace.jsonl"
    llm = make_llm(predictor="layer_ahead", trace=str(path), **TIGHT)
    llm.generate(PROMPTS, GREEDY)
    stats = llm.stats()
    llm.close()
    meta, *lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert meta["meta"]["predictor"] == "layer_ahead" and meta["meta"]["pool"] != "none"
    assert [r["step"] for r in lines] == list(range(1, len(lines) + 1))
    assert len(lines) >= GREEDY.max_tokens
    for key in ("prefetch_issued", "prefetch_used", "tier_pages_fetched", "tier_stall_seconds"):
        assert sum(r[key] for r in lines) == pytest.approx(stats[key]), key
    assert all(r["seconds"] > 0 and r["batch"] >= 1 for r in lines)


# ---------------------------------------------------------------- bad input


def test_bad_prefetch_options_are_refused(make_llm, caplog):
    with pytest.raises(ValueError, match="unknown predictor 'psychic'; known: none, layer_ahead"):
        make_llm(predictor="psychic", **TIGHT)
    with pytest.raises(ValueError, match="prefetch_depth=30 must be below the model's 30 layers"):
        make_llm(predictor="layer_ahead", prefetch_depth=30, **TIGHT)
    with pytest.raises(ValueError, match="pool='none'"):
        make_llm(predictor="layer_ahead", device_kv_bytes="64MiB")
    with pytest.raises(ValueError, match="cannot be combined"):
        make_llm(predictor="none,layer_ahead", **TIGHT)
    with pytest.raises(ValueError, match="prefetch_depth must be >= 1"):
        make_llm(prefetch_depth=0, **TIGHT)
    with pytest.raises(ValueError, match="cannot write the trace file"):
        make_llm(trace="/nonexistent/dir/trace.jsonl", **TIGHT)
    auto = make_llm(predictor="layer_ahead", **{**TIGHT, "kv_read": "auto"})
    stats = auto.stats()  # on CPU a predictor prefetches rows into the caches
    assert stats["kv_read"] == "in_place" and stats["prefetch_into"] == "cpu_caches", stats
    auto.close()
    with caplog.at_level(logging.WARNING):
        llm = make_llm(predictor="layer_ahead", prefetch_bytes=0, **TIGHT)
    assert "prefetch disabled" in caplog.text
    assert llm.stats()["prefetch_predictor"] == "none"
    with pytest.raises(ValueError, match="unknown predictor"):
        llm.engine.set_prefetch("psychic")
    out = llm.generate(PROMPTS[2], GREEDY)[0]  # still serving
    assert out.num_generated_tokens == GREEDY.max_tokens
    llm.close()
