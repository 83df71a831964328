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
    greedy = llm.generate("Bees make", SamplingParams(max_tokens=12))[0].token_ids
    sampled = llm.generate("Bees make", SamplingParams(
        max_tokens=12, temperature=0.8, top_k=1, seed=3))[0].token_ids
    assert greedy == sampled


def test_stop_string_truncates_and_streams_consistently(llm):
    prompt = "The capital of France is"  # greedy: " Paris.\n\nThe answer is: ..."
    full = llm.generate(prompt, SamplingParams(max_tokens=20))[0].text
    assert "answer" in full
    params = SamplingParams(max_tokens=20, stop=["answer"])
    out = llm.generate(prompt, params)[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:full.index("answer")]
    deltas = [o.delta for o in llm.stream(prompt, params)]
    assert "".join(deltas) == out.text
    assert_no_leak(llm.engine)


def test_eos_stops_and_ignore_eos_continues(llm):
    prompt = llm.apply_chat_template([{"role": "user", "content": "Say hi."}])
    out = llm.generate(prompt, SamplingParams(max_tokens=64))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == llm.tokenizer.eos_token_id
    assert "<|im_end|>" not in out.text
    n = out.num_generated_tokens
    longer = llm.generate(prompt, SamplingParams(max_tokens=n + 5, ignore_eos=True))[0]
    assert longer.num_generated_tokens == n + 5 and longer.finish_reason == "length"
    assert longer.token_ids[:n] == out.token_ids


def test_max_tokens_and_timings(llm):
    out = llm.generate("Count: one, two,", SamplingParams(max_tokens=7, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.num_generated_tokens == 7
    assert out.num_prompt_tokens == len(llm.tokenizer.encode("Count: one, two,"))
    assert out.time_to_first_token > 0 and out.per_token_latency > 0


def test_context_window_ends_generation(make_llm):
    small = make_llm(max_model_len=32, device_kv_bytes="16MiB")
    ids = small.tokenizer.encode("a b c d e f g h i j k l m n o p q r s t")
    out = small.generate(ids, SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(ids) + out.num_generated_tokens == 32


def test_chat_template_renders_smollm_format(llm):
    text = llm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                    "by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = llm.tokenizer.encode(text)
    assert ids[0] == 1  # <|im_start|> is one special token
