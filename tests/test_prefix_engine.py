"""Prefix caching on the bundled model: hits change what is computed, never the tokens.

Each scenario runs twice on the same weights, prefix caching on and off, and compares
greedy tokens exactly; the hits themselves are counted (`num_cached_tokens`, stats).
"""

from __future__ import annotations

import pytest

from speckv import SamplingParams
from tests.conftest import assert_no_leak, check_tier_invariants

SYSTEM = ("You are a careful assistant for a library. Answer questions about opening hours, "
          "borrowing rules and the reading rooms briefly and politely. ") * 4
QUESTIONS = ["When does the library open?", "How many books may I borrow?",
             "Is there a quiet room?", "Can I renew a loan online?"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

# (engine options, what the hit reads): DEVICE slots shared, pool rows read in place or
# fetched into slots of their own; codec none, so every configuration is lossless
CONFIGS = {
    "device": {},
    "pool-in-place": {"pool": "local", "pool_bytes": "64MiB", "kv_read": "in_place"},
    "pool-copy": {"pool": "local", "pool_bytes": "64MiB", "kv_read": "copy",
                  "device_kv_bytes": "8MiB"},
    "pool-sink-residual": {"pool": "local", "pool_bytes": "64MiB", "keep_sink_page": True,
                           "residual_tokens": 32},
    "memnode": {"pool": "memnode", "pool_bytes": "64MiB"},  # a node process of its own
    "valkey": {"pool": "valkey", "pool_bytes": "64MiB"},  # a Valkey server of its own
}


def run_both(make_llm, options: dict, scenario) -> tuple[list, list, object]:
    """`scenario(llm)` -> outputs, with prefix caching off and on; returns both and the
    caching engine (the other one closed)."""
    # pool=valkey exists to share cached pages: without caching the same pool is local
    plain = make_llm(enable_prefix_caching=False,
                     **{**options, "pool": "local"} if options.get("pool") == "valkey" else options)
    off = scenario(plain)
    plain.close()
    llm = make_llm(**options)
    return off, scenario(llm), llm


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("config", CONFIGS)
def test_a_shared_system_prompt_is_prefilled_once_and_tokens_do_not_change(make_llm, config):
    def scenario(llm):
        return [llm.generate(SYSTEM + q, GREEDY, use_tqdm=False)[0] for q in QUESTIONS]

    off, on, llm = run_both(make_llm, CONFIGS[config], scenario)
    assert tokens(on) == tokens(off)
    system_pages = len(llm.tokenizer.encode(SYSTEM)) // 16
    assert on[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens >= (system_pages - 1) * 16 for o in on[1:])
    assert all(o.num_cached_tokens == 0 for o in off)
    stats = llm.engine.stats()
    assert stats["prefix_cache_hit_tokens"] == sum(o.num_cached_tokens for o in on)
    assert 0 < stats["prefix_cache_hit_rate"] < 1
    assert_no_leak(llm.engine)
    llm.close()  # (stops a memory node it spawned)


def test_a_multi_turn_chat_reuses_its_whole_history(make_llm):
    def scenario(llm):
        history, outs = [{"role": "system", "content": SYSTEM}], []
        for q in QUESTIONS:
            history.append({"role": "user", "content": q})
            out = llm.chat(history, GREEDY, use_tqdm=False)[0]
            history.append({"role": "assistant", "content": out.outputs[0].text})
            outs.append(out)
        return outs

    off, on, llm = run_both(make_llm, {}, scenario)
    assert tokens(on) == tokens(off)
    for turn in on[1:]:  # all but the new message and the last partial page
        assert turn.num_cached_tokens >= turn.num_prompt_tokens - 40
    assert_no_leak(llm.engine)


@pytest.mark.parametrize("config", ["device", "pool-in-place", "valkey"])
def test_requests_sharing_a_prefix_admitted_at_different_steps(make_llm, config):
    """The first request is mid-decode when the others arrive: they reuse its pages
    while it still reads them."""
    def scenario(llm):
        engine = llm.engine
        first = engine.add_request(SYSTEM + QUESTIONS[0], GREEDY)
        finals = {}
        for _ in range(3):
            finals.update({o.request_id: o for o in engine.step() if o.finished})
        later = [engine.add_request(SYSTEM + q, GREEDY) for q in QUESTIONS[1:]]
        while engine.has_unfinished():
            finals.update({o.request_id: o for o in engine.step() if o.finished})
            if engine.cache.store is not None:
                check_tier_invariants(engine)
        return [finals[r] for r in [first, *later]]

    off, on, llm = run_both(make_llm, CONFIGS[config], scenario)
    assert tokens(on) == tokens(off)
    assert all(o.num_cached_tokens > 0 for o in on[1:])
    assert_no_leak(llm.engine)


def test_int8_pages_reused_from_the_pool_give_int8s_tokens(make_llm):
    """A hit reads the prefix as its pool copy decodes, as every decode step reads it
    without caching too; only the tail's prefill differs (uncached, it reads the exact
    values it just computed), by int8's error in attention. Not a guarantee of equal
    tokens in general: on these prompts they are equal."""
    options = {"pool": "local", "pool_bytes": "64MiB", "codec": "int8"}

    def scenario(llm):
        return [llm.generate(SYSTEM + q, GREEDY, use_tqdm=False)[0] for q in QUESTIONS]

    off, on, llm = run_both(make_llm, options, scenario)
    assert tokens(on) == tokens(off)
    assert all(o.num_cached_tokens > 0 for o in on[1:])
    assert_no_leak(llm.engine)


def test_a_request_that_opts_out_neither_reuses_nor_leaves_pages(make_llm):
    llm = make_llm()
    opt_out = SamplingParams(temperature=0, max_tokens=4, cache_prompt=False)
    first = llm.generate(SYSTEM + QUESTIONS[0], opt_out, use_tqdm=False)[0]
    assert len(llm.engine.cache.prefix) == 0  # nothing was cached
    llm.generate(SYSTEM + QUESTIONS[0], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    again = llm.generate(SYSTEM + QUESTIONS[1], opt_out, use_tqdm=False)[0]
    assert first.num_cached_tokens == again.num_cached_tokens == 0
    with pytest.raises(ValueError, match="cache_prompt must be true or false"):
        SamplingParams(temperature=0, cache_prompt="no")
    assert_no_leak(llm.engine)


def test_cached_pages_give_way_to_live_requests_under_a_small_budget(make_llm):
    """A DEVICE tier that holds two requests: the cache fills it between requests, and a
    new request takes cached pages back (least recently released first) without a
    preemption or a refusal."""
    llm = make_llm(device_kv_bytes=2 * 30 * 24 * 16 * 3 * 64 * 2 * 4)
    engine = llm.engine
    prompts = [f"Story {i}: " + "the river ran past the old mill and on to the sea. " * 12
               for i in range(6)]
    outs = [llm.generate(p, GREEDY, use_tqdm=False)[0] for p in prompts]
    assert all(o.num_generated_tokens == 12 for o in outs)
    assert engine.stats()["prefix_cache_pages_evicted"] > 0
    assert engine.scheduler.num_preemptions == 0
    assert_no_leak(engine)


def test_the_namespace_is_the_same_for_the_same_bytes_and_differs_otherwise(make_llm):
    """Two engines on the same weights and options name pages alike (what a shared pool
    will rely on); a codec or a page size that changes the bytes never matches."""
    root = make_llm().engine.cache.prefix.root
    assert make_llm().engine.cache.prefix.root == root
    for options in ({"pool": "local", "pool_bytes": "16MiB", "codec": "int8"},
                    {"page_size": 32}):
        assert make_llm(**options).engine.cache.prefix.root != root, options
