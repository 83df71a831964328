"""Sampling options and stop conditions, on the real model."""

from __future__ import annotations

import torch

from speckv import SamplingParams
from speckv.engine.sampler import filter_logits
from tests.conftest import assert_no_leak


def _kept(logits, temperature=1.0, top_k=0, top_p=1.0):
    out = filter_logits(logits[None], torch.tensor([temperature]), torch.tensor([top_k]),
                        torch.tensor([top_p]))[0]
    return set(torch.nonzero(out > float("-inf")).flatten().tolist()), out


def test_top_k_keeps_exactly_the_k_best():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5])
    kept, _ = _kept(logits, top_k=2)
    assert kept == {1, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    logits = probs.log()
    assert _kept(logits, top_p=0.5)[0] == {1}
    assert _kept(logits, top_p=0.51)[0] == {1, 2}
    assert _kept(logits, top_p=0.95)[0] == {1, 2, 3}
    assert _kept(logits, top_p=1.0)[0] == {0, 1, 2, 3}


def test_temperature_scales_logits():
    logits = torch.tensor([1.0, 2.0, 4.0])
    _, out = _kept(logits, temperature=0.5)
    assert torch.allclose(out, logits / 0.5)


def test_seed_reproducible_and_independent_of_batch(llm):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=7)
    alone = llm.generate("My favourite animal is", params)[0].token_ids
    again = llm.generate("My favourite animal is", params)[0].token_ids
    other = llm.generate("My favourite animal is", SamplingParams(
        max_tokens=24, temperature=1.0, top_p=0.95, seed=8))[0].token_ids
    assert alone == again
    assert alone != other
    assert_no_leak(llm.engine)


def test_top_k_1_sampling_equals_greedy(llm):
    greedy = llm.generate("Bees make", SamplingParams(temperature=0, max_tokens=12))[0].token_ids
    sampled = llm.generate("Bees make", SamplingParams(
        max_tokens=12, temperature=0.8, top_k=1, seed=3))[0].token_ids
    assert greedy == sampled


def test_stop_string_truncates_and_streams_consistently(llm):
    prompt = "The capital of France is"  # greedy: " Paris.\n\nThe answer is: ..."
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20))[0].text
    assert "answer" in full
    params = SamplingParams(temperature=0, max_tokens=20, stop=["answer"])
    out = llm.generate(prompt, params)[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:full.index("answer")]
    deltas = [o.delta for o in llm.stream(prompt, params)]
    assert "".join(deltas) == out.text
    assert_no_leak(llm.engine)


def test_eos_stops_and_ignore_eos_continues(llm):
    prompt = llm.apply_chat_template([{"role": "user", "content": "Say hi."}])
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == llm.tokenizer.eos_token_id
    assert "<|im_end|>" not in out.text
    n = out.num_generated_tokens
    longer = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n + 5, ignore_eos=True))[0]
    assert longer.num_generated_tokens == n + 5 and longer.finish_reason == "length"
    assert longer.token_ids[:n] == out.token_ids


def test_max_tokens_and_timings(llm):
    out = llm.generate("Count: one, two,", SamplingParams(temperature=0, max_tokens=7,
                                                          ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.num_generated_tokens == 7
    assert out.num_prompt_tokens == len(llm.tokenizer.encode("Count: one, two,"))
    assert out.time_to_first_token > 0 and out.per_token_latency > 0


def test_context_window_ends_generation(make_llm):
    small = make_llm(max_model_len=32, device_kv_bytes="16MiB")
    ids = small.tokenizer.encode("a b c d e f g h i j k l m n o p q r s t")
    out = small.generate(ids, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(ids) + out.num_generated_tokens == 32


def test_chat_template_renders_smollm_format(llm):
    text = llm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                    "by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = llm.tokenizer.encode(text)
    assert ids[0] == 1  # <|im_start|> is one special token


# ---------------------------------------------------------------- penalties and bias


def test_penalties_and_bias_are_their_definitions():
    from speckv.engine.sampler import adjust_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 3
    prompt, output = [1, 2, 2, 7], [7, 9, 9, 9, 3]
    params = SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5,
                            presence_penalty=0.25, logit_bias={4: 5.0, 9: -1.5})
    expected = logits.clone()
    for t in {1, 2, 7, 9, 3}:  # in the prompt or the output
        expected[t] = expected[t] / 1.3 if expected[t] > 0 else expected[t] * 1.3
    for t, count in {7: 1, 9: 3, 3: 1}.items():  # generated: frequency and presence
        expected[t] -= 0.5 * count + 0.25
    expected[4] += 5.0
    expected[9] -= 1.5
    got = adjust_logits(logits, params, prompt, output, frozenset())
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(logits, logits.clone())  # the input is left as it was


def test_min_tokens_holds_back_eos_and_stop_tokens():
    from speckv.engine.sampler import adjust_logits

    logits = torch.zeros(10)
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(5,))
    early = adjust_logits(logits, params, [1], [3], frozenset({2}))
    assert early[2] == float("-inf") and early[5] == float("-inf") and early[3] == 0
    assert torch.equal(adjust_logits(logits, params, [1], [3, 4], frozenset({2})), logits)


def test_min_p_drops_tokens_below_a_fraction_of_the_top_one():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    out = filter_logits(probs.log()[None], torch.tensor([1.0]), torch.tensor([0]),
                        torch.tensor([1.0]), torch.tensor([0.2]))[0]
    assert set(torch.nonzero(out > float("-inf")).flatten().tolist()) == {0, 1, 2}  # 0.08 < 0.1


def test_logit_bias_and_stop_token_ids_on_the_engine(llm):
    forced = llm.tokenizer.encode(" harbour")[0]
    out = llm.generate("Once upon a time", SamplingParams(
        temperature=0, max_tokens=5, logit_bias={forced: 100.0}, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == [forced] * 5
    free = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=8),
                        use_tqdm=False)[0]
    stop = free.token_ids[3]
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=8,
                                                          stop_token_ids=(stop,)),
                       use_tqdm=False)[0]
    first = free.token_ids.index(stop)
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"
    assert out.text == llm.tokenizer.decode(free.token_ids[:first])  # the stop token's text left out
    held = llm.generate("Once upon a time", SamplingParams(
        temperature=0, max_tokens=8, stop_token_ids=(stop,), min_tokens=8), use_tqdm=False)[0]
    assert len(held.token_ids) == 8 and stop not in held.token_ids
    plain = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=24,
                                                            ignore_eos=True),
                         use_tqdm=False)[0]
    assert len(set(plain.token_ids)) < 24  # greedy repeats itself here...
    penalized = llm.generate("Once upon a time", SamplingParams(
        temperature=0, max_tokens=24, repetition_penalty=10.0, ignore_eos=True), use_tqdm=False)[0]
    prompt = set(llm.tokenizer.encode("Once upon a time"))
    assert len(set(penalized.token_ids)) == 24 and not prompt & set(penalized.token_ids)


def test_bad_sampling_options_are_refused_by_name(llm):
    import pytest

    for kwargs, name in (({"presence_penalty": 3}, "presence_penalty"),
                         ({"frequency_penalty": "a"}, "frequency_penalty"),
                         ({"repetition_penalty": 0}, "repetition_penalty"),
                         ({"min_p": 1.5}, "min_p"),
                         ({"logit_bias": {"x": 1}}, "logit_bias"),
                         ({"logit_bias": {3: 200}}, "logit_bias"),
                         ({"stop_token_ids": (-1,)}, "stop_token_ids"),
                         ({"min_tokens": 100, "max_tokens": 10}, "min_tokens")):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="logit_bias names token ids outside the vocabulary"):
        llm.generate("hi", SamplingParams(temperature=0, logit_bias={10**6: 1.0}), use_tqdm=False)
