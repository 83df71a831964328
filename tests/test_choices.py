"""n > 1, best_of, logprobs and prompt_logprobs on the bundled model (issue 17, item 2).

Log probabilities are checked against the model's own logits from `engine.score`
(teacher-forced over the same tokens): the engine's numbers must be the model's,
not a re-derivation of the sampler's.
"""

from __future__ import annotations

import pytest

from speckv import SamplingParams
from tests.conftest import assert_no_leak

PROMPT = ("The lighthouse keeper climbed the spiral stairs each evening, counting the steps "
          "as his father had, and at the top he trimmed the wick and wiped the salt from the "
          "glass before the ships came in.")


def test_each_choice_is_the_single_request_with_its_own_seed(llm):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=41, n=3)
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for i, choice in enumerate(out.outputs):
        alone = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95,
                                                    seed=41 + i), use_tqdm=False)[0]
        assert choice.token_ids == alone.outputs[0].token_ids
        assert choice.text == alone.outputs[0].text
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # they are different draws
    assert out.num_generated_tokens == sum(len(c.token_ids) for c in out.outputs)
    assert out.finished and out.text == out.outputs[0].text
    assert_no_leak(llm.engine)


@pytest.mark.parametrize("caching", [True, False])
def test_later_choices_share_the_first_ones_prompt_pages(make_llm, caching):
    llm = make_llm(device_kv_bytes="64MiB", enable_prefix_caching=caching)
    greedy = SamplingParams(temperature=0, max_tokens=10)
    want = llm.generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0].token_ids
    llm.reset_prefix_cache()
    before = llm.stats().get("prefix_cache_hit_tokens", 0)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, n=4), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [want] * 4  # greedy: four times the same
    full_pages = (len(out.prompt_token_ids) - 1) // 16
    hits = llm.stats().get("prefix_cache_hit_tokens", 0) - before
    assert hits == (3 * full_pages * 16 if caching else 0)
    assert_no_leak(llm.engine)
    llm.close()


def test_logprobs_are_the_models_own(llm):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3, logprobs=4)
    choice = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    prompt = llm.tokenizer.encode(PROMPT)
    logits = llm.engine.score(prompt + choice.token_ids[:-1])
    want = logits[len(prompt) - 1:].log_softmax(dim=-1)  # row j predicts generated token j
    assert len(choice.logprobs) == len(choice.token_ids)
    total = 0.0
    for j, (token, entry) in enumerate(zip(choice.token_ids, choice.logprobs)):
        assert abs(entry[token].logprob - want[j, token].item()) < 1e-4
        assert entry[token].rank == int((want[j] > want[j, token]).sum()) + 1
        top = want[j].topk(4)
        ranked = sorted((lp for t, lp in entry.items() if lp.rank <= 4), key=lambda lp: lp.rank)
        assert [lp.rank for lp in ranked] == [1, 2, 3, 4]
        assert {t for t, lp in entry.items() if lp.rank <= 4} == set(top.indices.tolist())
        assert entry[token].decoded_token == llm.tokenizer.decode([token]) or "\ufffd" in \
            entry[token].decoded_token
        total += entry[token].logprob
    assert abs(choice.cumulative_logprob - total) < 1e-6


def test_logprobs_do_not_depend_on_penalties_or_temperature(llm):
    """Raw logprobs: the same tokens scored the same whatever picked them."""
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6, logprobs=0),
                          use_tqdm=False)[0]
    forced = SamplingParams(max_tokens=6, logprobs=0, temperature=0.5, seed=1,
                            logit_bias={t: 100.0 for t in greedy.outputs[0].token_ids[:1]})
    biased = llm.generate(PROMPT, forced, use_tqdm=False)[0].outputs[0]
    first = greedy.outputs[0].token_ids[0]
    assert biased.token_ids[0] == first
    assert abs(biased.logprobs[0][first].logprob - greedy.outputs[0].logprobs[0][first].logprob) < 1e-5
    assert greedy.outputs[0].logprobs[0][first].rank == 1  # greedy picks the top


def test_prompt_logprobs_cover_the_whole_prompt_even_when_it_is_cached(make_llm):
    llm = make_llm(device_kv_bytes="64MiB", max_num_batched_tokens=16, max_num_seqs=4)  # chunked
    prompt = llm.tokenizer.encode(PROMPT)
    want = llm.engine.score(prompt).log_softmax(dim=-1)
    llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # now cached
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2),
                       use_tqdm=False)[0]
    assert out.num_cached_tokens == 0  # every prompt position computed
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for p in range(1, len(prompt)):
        entry = out.prompt_logprobs[p]
        assert abs(entry[prompt[p]].logprob - want[p - 1, prompt[p]].item()) < 1e-4
        assert len([lp for lp in entry.values() if lp.rank <= 2]) == 2
    assert out.outputs[0].logprobs is None and out.outputs[0].cumulative_logprob is None
    assert_no_leak(llm.engine)
    llm.close()


def test_best_of_returns_the_n_most_likely_choices(llm):
    sampled = SamplingParams(max_tokens=8, temperature=1.2, seed=11, n=4, logprobs=0)
    every = llm.generate(PROMPT, sampled, use_tqdm=False)[0].outputs
    best = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=1.2, seed=11, n=2,
                                               best_of=4), use_tqdm=False)[0]
    ranked = sorted(every, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked]
    assert [c.index for c in best.outputs] == [0, 1]
    assert all(c.logprobs is None for c in best.outputs)  # not asked for
    assert best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob


def test_aborting_a_request_of_several_choices_frees_them_all(llm):
    engine = llm.engine
    rid = engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=50, n=3, ignore_eos=True))
    for _ in range(4):
        engine.step()
    out = engine.abort(rid)
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort"] * 3
    assert engine.abort(rid) is None
    assert_no_leak(engine)
    assert llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].finished


@pytest.mark.parametrize("bad, named", [
    ({"n": 0}, "n must"), ({"n": 129}, "n must"), ({"n": 3, "best_of": 2}, "best_of"),
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ({"prompt_logprobs": 1.5}, "prompt_logprobs"), ({"best_of": True}, "best_of"),
])
def test_bad_choice_options_are_refused_by_name(bad, named):
    with pytest.raises(ValueError, match=named):
        SamplingParams(**bad)


def test_a_sampling_error_in_one_choice_fails_the_request_alone(llm, monkeypatch):
    from speckv.engine.sampler import SampleError, Sampler

    real = Sampler._draw
    calls = {"n": 0}

    def draw(probs, generator):
        calls["n"] += 1
        return SampleError("injected") if calls["n"] == 5 else real(probs, generator)

    monkeypatch.setattr(Sampler, "_draw", staticmethod(draw))
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=2, n=2)
    outs = llm.generate([PROMPT, PROMPT + " Again."], [params, SamplingParams(temperature=0,
                                                                              max_tokens=6)],
                        use_tqdm=False)
    assert outs[0].finish_reason == "error" and "injected" in outs[0].error
    assert "abort" in [c.finish_reason for c in outs[0].outputs]  # the other choice stopped
    assert outs[1].finish_reason in ("stop", "length") and outs[1].error is None
    monkeypatch.undo()
    assert_no_leak(llm.engine)
