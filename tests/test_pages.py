"""The paged KV cache under continuous batching: no leak, hard limits, waiting, preemption."""

from __future__ import annotations

import pytest

from speckv import SamplingParams
from speckv.engine.sequence import Status
from tests.conftest import assert_no_leak, run_to_completion

PAGE = 16
LAYERS = 30


def pages_for(tokens: int) -> int:
    return -(-tokens // PAGE) * LAYERS


def test_pages_freed_after_batch_finishes(llm):
    prompts = ["Once upon a time", "The quick brown fox jumps over the lazy dog. " * 5, "Hi"]
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=n,
                                                 ignore_eos=True) for n in (5, 17, 33)])
    assert [o.num_generated_tokens for o in outs] == [5, 17, 33]
    assert_no_leak(llm.engine)


def test_abort_midway_frees_every_page(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    running = engine.add_request("A long story about a dragon " * 4, params)
    waiting = engine.add_request("Another prompt", params)
    engine.step()
    engine.step()
    assert engine.cache.pool.num_used_pages > 0
    out = engine.abort(running)
    assert out.finished and out.finish_reason == "abort" and out.num_generated_tokens == 2
    assert engine.abort(waiting).finish_reason == "abort"
    assert engine.abort("no-such-request") is None
    assert_no_leak(engine)
    # the engine is still usable
    assert llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3))[0].num_generated_tokens >= 1


def test_stream_closed_early_aborts(llm):
    stream = llm.stream("Tell me a story.", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    first = next(stream)
    assert first.num_generated_tokens == 1
    stream.close()
    assert_no_leak(llm.engine)


def test_pool_filled_exactly_second_request_waits(make_llm):
    """The pool holds exactly request A (48-token prompt + 16 new = 4 pages a layer).
    B (2 pages a layer) cannot be admitted beside it, so it waits; the pool becomes
    completely full; when A finishes, B runs. Both produce what they produce alone."""
    llm = make_llm()
    prompt_a = llm.tokenizer.encode("one two three four five six seven eight " * 20)[:48]
    prompt_b = llm.tokenizer.encode("Water boils at a temperature of " * 3)[:20]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    solo = [o.token_ids for o in llm.generate([prompt_a, prompt_b], params)]

    need = pages_for(48 + 16)
    tight = make_llm(device_kv_bytes=need * llm.engine.page_bytes)
    engine = tight.engine
    assert engine.cache.pool.num_pages == need
    a = engine.add_request(prompt_a, params)
    b = engine.add_request(prompt_b, params)
    finals, free_seen, b_waited = {}, [], 0
    while engine.has_unfinished():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
        free_seen.append(engine.cache.pool.num_free_pages)
        if a not in finals:
            assert engine._sequences[b].status == Status.WAITING
            b_waited += 1
    assert b_waited == 15  # after each of A's 16 steps but its last, B was still waiting
    assert min(free_seen) == 0  # the pool was full to the last page
    assert engine.scheduler.num_preemptions == 0
    assert [finals[a].token_ids, finals[b].token_ids] == solo
    assert_no_leak(engine)


@pytest.mark.slow
def test_preemption_recomputes_and_keeps_results(make_llm):
    """Pages for the prompts but not for all of their growth: the youngest running
    request is preempted (pages freed) and recomputed; outputs do not change."""
    llm = make_llm()
    prompts = [llm.tokenizer.encode(p) for p in
               ["Rivers flow to the sea because", "A good breakfast has", "The moon orbits"]]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    solo = [o.token_ids for o in llm.generate(prompts, params)]
    budget = pages_for(max(len(p) for p in prompts) + 48) + 2 * pages_for(PAGE)
    tight = make_llm(device_kv_bytes=budget * llm.engine.page_bytes)
    rids = [tight.engine.add_request(p, params) for p in prompts]
    finals = {}
    while tight.engine.has_unfinished():
        finals.update({o.request_id: o for o in tight.engine.step() if o.finished})
        assert tight.engine.cache.pool.num_used_pages <= budget
    assert tight.engine.scheduler.num_preemptions >= 1
    assert [finals[r].token_ids for r in rids] == solo
    assert_no_leak(tight.engine)


def test_request_larger_than_pool_is_rejected_and_engine_usable(make_llm):
    llm = make_llm(device_kv_bytes=pages_for(64) * 24576)
    with pytest.raises(ValueError, match="DEVICE tier holds"):
        llm.generate("x " * 40, SamplingParams(temperature=0, max_tokens=100))
    assert_no_leak(llm.engine)
    assert llm.generate("Hi", SamplingParams(temperature=0, max_tokens=4))[0].num_generated_tokens >= 1


def test_budget_below_one_step_names_the_minimum(make_llm):
    with pytest.raises(ValueError, match=r"minimum is 737280 bytes"):
        make_llm(device_kv_bytes="100KiB")
